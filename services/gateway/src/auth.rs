//! JWT bearer authentication and role authorization.
//!
//! Roles are ordered: `admin` ⊇ `writer` ⊇ `reader`. `reader` may `GET`/`HEAD`, `writer` may send commands,
//! `admin` may use `/admin/*` (and everything else). A token's `roles` claim may list several; the highest
//! known one counts, unknown ones are ignored.
//!
//! The key is chosen by the token's `alg` *family*: HMAC algorithms only ever verify against the shared
//! secret and RSA/EC/EdDSA only against the configured public keys, so a token "signed" with a public key as
//! an HMAC secret (the classic algorithm-confusion attack) cannot verify.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cqrs_common::Problem;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::config::JwtSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
    fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who is calling, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`, when any (also the rate-limit key).
    pub subject: Option<String>,
    /// The highest known role in the token, `None` when it lists none.
    pub role: Option<Role>,
}

impl Principal {
    /// The identity used when auth is disabled.
    pub fn anonymous_admin() -> Self {
        Self {
            subject: None,
            role: Some(Role::Admin),
        }
    }
}

/// The role a request needs. `/admin` paths are recognised after percent-decoding, dot-segment removal,
/// slash collapsing and lowercasing, so `//Admin/./x` or `/%61dmin` cannot slip past as a plain read.
pub fn required_role(method: &Method, path: &str) -> Role {
    if is_admin_path(path) {
        Role::Admin
    } else if method == Method::GET || method == Method::HEAD {
        Role::Reader
    } else {
        Role::Writer
    }
}

pub fn is_admin_path(path: &str) -> bool {
    // Fast path for the common case: nothing that normalization could change.
    if !path.contains(['%', '.']) && !path.contains("//") {
        let p = path.as_bytes();
        return p.len() >= 6
            && p[..6].eq_ignore_ascii_case(b"/admin")
            && (p.len() == 6 || p[6] == b'/');
    }
    let decoded = percent_decode(path);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments
        .first()
        .is_some_and(|s| s.eq_ignore_ascii_case("admin"))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a request was refused. 401 variants mean "who are you?", `Forbidden` means "not allowed".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    NotBearer,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token's algorithm is not accepted")]
    WrongAlgorithm,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("this request needs the `{}` role", .required.as_str())]
    Forbidden { required: Role },
}

impl AuthError {
    /// Bounded label for `cqrs_gateway_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::NotBearer => "not_bearer",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::Malformed(_) => "malformed",
            AuthError::Forbidden { .. } => "forbidden",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (kind, challenge) = match &self {
            AuthError::Missing => ("unauthenticated", r#"Bearer realm="cqrs""#.to_owned()),
            AuthError::Forbidden { .. } => (
                "forbidden",
                r#"Bearer realm="cqrs", error="insufficient_scope""#.to_owned(),
            ),
            other => (
                "unauthenticated",
                // error_description is a quoted-string: keep it to our own fixed, quote-free messages.
                format!(
                    r#"Bearer realm="cqrs", error="invalid_token", error_description="{}""#,
                    other.reason().replace('_', " ")
                ),
            ),
        };
        let mut res = Problem::new(status, kind, self.to_string()).into_response();
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        res
    }
}

/// An invalid key configuration, found at startup.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "JWT auth is enabled but no key is configured (set AUTH_JWT_SECRET[_FILE] or AUTH_PUBLIC_KEY[_FILE])"
    )]
    NoKey,
    #[error("the HS256 secret is shorter than 32 bytes")]
    WeakSecret,
    #[error("public key #{index} in the PEM is not an RSA, EC or Ed25519 public key: {source}")]
    BadPem {
        index: usize,
        source: jsonwebtoken::errors::Error,
    },
    #[error("the public key PEM holds no `-----BEGIN` block")]
    EmptyPem,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// Verifies bearer tokens against the configured keys and claims.
pub struct Verifier {
    /// Per accepted algorithm: its validation rules and the candidate keys.
    by_alg: HashMap<Algorithm, (Validation, Vec<DecodingKey>)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.by_alg.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Verifier {
    pub fn new(s: &JwtSettings) -> Result<Self, KeyError> {
        let validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            v.leeway = s.leeway.as_secs();
            v.validate_nbf = true;
            let mut required = vec!["exp"];
            if let Some(iss) = &s.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            match &s.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            v.set_required_spec_claims(&required);
            v
        };
        let mut by_alg: HashMap<Algorithm, (Validation, Vec<DecodingKey>)> = HashMap::new();
        let mut add = |algs: &[Algorithm], key: DecodingKey| {
            for &alg in algs {
                by_alg
                    .entry(alg)
                    .or_insert_with(|| (validation(alg), Vec::new()))
                    .1
                    .push(key.clone());
            }
        };
        if let Some(secret) = &s.hs256_secret {
            if secret.len() < 32 {
                return Err(KeyError::WeakSecret);
            }
            add(
                &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                DecodingKey::from_secret(secret),
            );
        }
        if let Some(pem) = &s.public_keys_pem {
            let blocks = split_pem(pem);
            if blocks.is_empty() {
                return Err(KeyError::EmptyPem);
            }
            for (index, block) in blocks.iter().enumerate() {
                let b = block.as_bytes();
                if let Ok(k) = DecodingKey::from_rsa_pem(b) {
                    add(
                        &[
                            Algorithm::RS256,
                            Algorithm::RS384,
                            Algorithm::RS512,
                            Algorithm::PS256,
                            Algorithm::PS384,
                            Algorithm::PS512,
                        ],
                        k,
                    );
                } else if let Ok(k) = DecodingKey::from_ec_pem(b) {
                    add(&[Algorithm::ES256, Algorithm::ES384], k);
                } else {
                    let k = DecodingKey::from_ed_pem(b)
                        .map_err(|source| KeyError::BadPem { index, source })?;
                    add(&[Algorithm::EdDSA], k);
                }
            }
        }
        if by_alg.is_empty() {
            return Err(KeyError::NoKey);
        }
        Ok(Self { by_alg })
    }

    /// Authenticates the request's `Authorization: Bearer` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        self.verify(token.trim())
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(map_err)?;
        let (validation, keys) = self
            .by_alg
            .get(&header.alg)
            .ok_or(AuthError::WrongAlgorithm)?;
        let mut last = AuthError::BadSignature;
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    let role = data
                        .claims
                        .roles
                        .iter()
                        .filter_map(|r| Role::parse(r))
                        .max();
                    return Ok(Principal {
                        subject: data.claims.sub,
                        role,
                    });
                }
                // Another key (rotation) may verify it; any other failure is final.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = AuthError::BadSignature
                }
                Err(e) => return Err(map_err(e)),
            }
        }
        Err(last)
    }
}

/// Decides whether `principal` may make a request needing `required`.
pub fn authorize(principal: &Principal, required: Role) -> Result<(), AuthError> {
    match principal.role {
        Some(have) if have >= required => Ok(()),
        _ => Err(AuthError::Forbidden { required }),
    }
}

fn map_err(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(c) => AuthError::Malformed(format!("missing `{c}` claim")),
        _ => AuthError::Malformed(e.to_string()),
    }
}

fn split_pem(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in pem.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END")
            && let Some(c) = cur.take()
        {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_routes_need_the_right_one() {
        assert!(Role::Admin > Role::Writer && Role::Writer > Role::Reader);
        assert_eq!(required_role(&Method::GET, "/product/1"), Role::Reader);
        assert_eq!(required_role(&Method::HEAD, "/product/1"), Role::Reader);
        assert_eq!(required_role(&Method::POST, "/product"), Role::Writer);
        assert_eq!(required_role(&Method::DELETE, "/user/1"), Role::Writer);
        assert_eq!(required_role(&Method::GET, "/admin/dlq"), Role::Admin);
        assert_eq!(required_role(&Method::POST, "/admin"), Role::Admin);
        assert_eq!(required_role(&Method::GET, "/administrator"), Role::Reader);
    }

    #[test]
    fn disguised_admin_paths_are_still_admin() {
        for p in [
            "//admin/x",
            "/./admin/x",
            "/%61dmin/x",
            "/ADMIN/x",
            "/product/../admin/rebuild",
            "/%2e/admin",
        ] {
            assert!(is_admin_path(p), "{p}");
        }
        for p in ["/product/1", "/admins", "/%zz/admin", "/", "", "/%"] {
            assert!(!is_admin_path(p), "{p}");
        }
    }

    #[test]
    fn highest_role_wins_and_none_is_forbidden() {
        let p = Principal {
            subject: None,
            role: Some(Role::Writer),
        };
        assert!(authorize(&p, Role::Reader).is_ok());
        assert!(authorize(&p, Role::Writer).is_ok());
        assert_eq!(
            authorize(&p, Role::Admin),
            Err(AuthError::Forbidden {
                required: Role::Admin
            })
        );
        let none = Principal {
            subject: None,
            role: None,
        };
        assert!(authorize(&none, Role::Reader).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        let s = JwtSettings {
            hs256_secret: Some(b"short".to_vec()),
            ..Default::default()
        };
        assert!(matches!(Verifier::new(&s), Err(KeyError::WeakSecret)));
        assert!(matches!(
            Verifier::new(&JwtSettings::default()),
            Err(KeyError::NoKey)
        ));
    }
}

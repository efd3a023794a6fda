//! `gateway mint-token`: development tokens signed with the configured secret or a private key.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::auth::Role;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "give a signing key: --secret/--secret-file (HS256) or --private-key-file (RS256/ES256)"
    )]
    NoKey,
    #[error("the private key is neither an RSA nor an EC (P-256) PEM key")]
    BadKey,
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The claims the gateway reads.
#[derive(Debug, Serialize)]
pub struct Claims {
    pub sub: String,
    pub roles: Vec<String>,
    pub iat: u64,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    pub fn new(
        sub: &str,
        role: Role,
        ttl: Duration,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Self {
        let now = jsonwebtoken::get_current_timestamp();
        Self {
            sub: sub.to_owned(),
            roles: vec![role.as_str().to_owned()],
            iat: now,
            exp: now + ttl.as_secs(),
            iss: issuer,
            aud: audience,
        }
    }
}

/// Signs `claims` with an HS256 secret, or with an RSA (RS256) / EC P-256 (ES256) private key PEM.
pub fn mint(
    claims: &Claims,
    secret: Option<&[u8]>,
    private_key_pem: Option<&[u8]>,
) -> Result<String, MintError> {
    let (alg, key) = match (secret, private_key_pem) {
        (_, Some(pem)) => match EncodingKey::from_rsa_pem(pem) {
            Ok(k) => (Algorithm::RS256, k),
            Err(_) => (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(pem).map_err(|_| MintError::BadKey)?,
            ),
        },
        (Some(secret), None) => (Algorithm::HS256, EncodingKey::from_secret(secret)),
        (None, None) => return Err(MintError::NoKey),
    };
    Ok(jsonwebtoken::encode(&Header::new(alg), claims, &key)?)
}

//! A client of the gateway only: HS256 tokens minted with the gateway's secret, JSON in and out.

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde::Serialize;
use serde_json::Value;

use crate::E2eError;

/// The claims the gateway reads (`sub`, `roles`, `exp`).
#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    roles: Vec<&'a str>,
    iat: i64,
    exp: i64,
}

/// Mints HS256 bearer tokens the way the gateway expects them.
#[derive(Clone)]
pub struct TokenMinter {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenMinter(<secret>)")
    }
}

impl TokenMinter {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
        }
    }

    /// A token with `roles`, valid for `ttl_secs` from now (negative: already expired).
    pub fn mint(&self, sub: &str, roles: &[&str], ttl_secs: i64) -> Result<String, E2eError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub,
            roles: roles.to_vec(),
            iat: now.min(now + ttl_secs),
            exp: now + ttl_secs,
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )
        .map_err(|e| E2eError::Setup(format!("minting a token: {e}")))
    }
}

/// base64url without padding (JWT segments).
pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// One answer: status, headers, the body as JSON (`Null` when it is not JSON) and the latency.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
    pub latency: Duration,
}

impl Resp {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }
    /// The `version` of a write answer (body), if any.
    pub fn version(&self) -> Option<u64> {
        self.body.get("version").and_then(Value::as_u64)
    }
    pub fn id(&self) -> Option<String> {
        self.body
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
    pub fn content_type(&self) -> &str {
        self.headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A request as the hostile suite builds it: anything goes.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// `None`: no Authorization header at all.
    pub bearer: Option<String>,
}

/// Talks to the gateway only.
#[derive(Clone, Debug)]
pub struct Gateway {
    base: String,
    http: reqwest::Client,
    minter: TokenMinter,
    token: String,
}

impl Gateway {
    /// `base` like `http://127.0.0.1:3123`; acts with an `admin` token minted with `secret`.
    pub fn new(base: &str, secret: &[u8]) -> Result<Self, E2eError> {
        let minter = TokenMinter::new(secret);
        let token = minter.mint("cqrs-e2e", &["admin"], 24 * 3600)?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| E2eError::Setup(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            minter,
            token,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }
    pub fn minter(&self) -> &TokenMinter {
        &self.minter
    }
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn finish(
        &self,
        rb: reqwest::RequestBuilder,
        started: Instant,
    ) -> Result<Resp, E2eError> {
        let res = rb.send().await.map_err(|e| E2eError::Http(e.to_string()))?;
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res
            .bytes()
            .await
            .map_err(|e| E2eError::Http(e.to_string()))?;
        let latency = started.elapsed();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            body,
            text,
            latency,
        })
    }

    /// `POST path` with a JSON body, as admin.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Resp, E2eError> {
        self.send_json(Method::POST, path, Some(body), &[]).await
    }

    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Resp, E2eError> {
        let started = Instant::now();
        let mut rb = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        self.finish(rb, started).await
    }

    /// `GET path` as admin, waiting for `min_version` (read-your-writes) when given.
    pub async fn get(&self, path: &str, min_version: Option<u64>) -> Result<Resp, E2eError> {
        self.get_waiting(path, min_version, None).await
    }

    /// `GET path` with `X-Min-Version` and `Prefer: wait=<secs>` (the query service caps the wait).
    pub async fn get_waiting(
        &self,
        path: &str,
        min_version: Option<u64>,
        wait_secs: Option<u64>,
    ) -> Result<Resp, E2eError> {
        let started = Instant::now();
        let mut rb = self.http.get(self.url(path)).bearer_auth(&self.token);
        if let Some(v) = min_version {
            rb = rb.header("x-min-version", v.to_string());
        }
        if let Some(w) = wait_secs {
            rb = rb.header("prefer", format!("wait={w}"));
        }
        self.finish(rb, started).await
    }

    /// Anything, exactly as given (the hostile suite).
    pub async fn raw(&self, r: &RawRequest) -> Result<Resp, E2eError> {
        let started = Instant::now();
        let mut rb = self.http.request(r.method.clone(), self.url(&r.path));
        if let Some(t) = &r.bearer {
            rb = rb.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in &r.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = &r.body {
            rb = rb.body(b.clone());
        }
        self.finish(rb, started).await
    }

    /// `GET /sync-status`.
    pub async fn sync_status(&self) -> Result<Value, E2eError> {
        let r = self.get("/sync-status", None).await?;
        if !r.ok() {
            return Err(E2eError::Http(format!(
                "GET /sync-status: {} {}",
                r.status, r.text
            )));
        }
        Ok(r.body)
    }

    /// Polls `/sync-status` until `caughtUp` is true.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<Duration, E2eError> {
        let started = Instant::now();
        let mut last = Value::Null;
        while started.elapsed() < timeout {
            if let Ok(s) = self.sync_status().await {
                if s.get("caughtUp") == Some(&Value::Bool(true)) {
                    return Ok(started.elapsed());
                }
                last = s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(E2eError::Timeout(format!(
            "not caught up after {timeout:?}: {last}"
        )))
    }

    /// Counts the records of a list route (`/user`, `/product`, `/order`) by following its cursors.
    pub async fn count(&self, path: &str) -> Result<u64, E2eError> {
        let mut n = 0u64;
        let mut cursor: Option<String> = None;
        loop {
            let url = match &cursor {
                Some(c) => format!("{path}?limit=500&cursor={c}"),
                None => format!("{path}?limit=500"),
            };
            let r = self.get(&url, None).await?;
            if !r.ok() {
                return Err(E2eError::Http(format!(
                    "GET {url}: {} {}",
                    r.status, r.text
                )));
            }
            n += r.body["items"].as_array().map_or(0, |a| a.len() as u64);
            match r.body["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(n),
            }
        }
    }

    /// `GET /readyz` of the gateway itself (no auth).
    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status().is_success())
    }
}

//! The gateway's resolved configuration. [`crate::cli::ServeArgs`] produces it from flags/env; tests build it
//! directly with [`Config::new`] and struct update syntax.

use std::{net::SocketAddr, path::Path, time::Duration};

/// How requests are authenticated.
#[derive(Debug, Clone)]
pub enum AuthSettings {
    /// Every request passes as if it carried an `admin` token. Local development only; logged loudly.
    Disabled,
    /// JWT bearer tokens.
    Jwt(JwtSettings),
}

/// Keys and claim checks for JWT bearer tokens. At least one of `hs256_secret` / `public_keys_pem` is required.
#[derive(Clone, Default)]
pub struct JwtSettings {
    /// Shared secret for HS256/HS384/HS512.
    pub hs256_secret: Option<Vec<u8>>,
    /// PEM text holding one or more RSA, EC (P-256/P-384) or Ed25519 public keys (several allow key rotation).
    pub public_keys_pem: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required member of `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    pub leeway: Duration,
}

impl std::fmt::Debug for JwtSettings {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "public_keys_pem",
                &self.public_keys_pem.as_ref().map(|_| "<pem>"),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// A token bucket per client: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Base URL of mutation (commands), e.g. `http://mutation:3124`.
    pub mutation_url: String,
    /// Base URL of query (reads), e.g. `http://query:3125`.
    pub query_url: String,
    pub auth: AuthSettings,
    /// Largest accepted request body; larger is 413 (checked on `Content-Length` upfront and while streaming).
    pub max_body_bytes: u64,
    /// Open client connections; beyond this the gateway stops accepting (the kernel backlog queues).
    pub max_connections: usize,
    /// Requests being handled at once; beyond this new requests are shed with 503.
    pub max_in_flight: usize,
    /// A client must send a complete request head within this, on a new or an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Reads (`GET`/`HEAD`): bound on the whole exchange (SSE streams: only until the response head).
    pub read_timeout: Duration,
    /// Commands: bound on the whole exchange.
    pub write_timeout: Duration,
    /// `/admin/*`: bound on the whole exchange.
    pub admin_timeout: Duration,
    /// TCP connect to an upstream.
    pub connect_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream.
    pub pool_max_idle_per_host: usize,
    /// Bound on draining in-flight requests at shutdown.
    pub drain_timeout: Duration,
    /// After SIGTERM, keep accepting and serving this long, answering every request with `Connection: close`,
    /// so that clients leave their pooled connections to this pod on a response of their own instead of
    /// racing the close of an idle connection (a request sent as the server closes it is lost).
    pub shutdown_linger: Duration,
    pub rate_limit: Option<RateLimit>,
}

impl Config {
    /// Defaults for everything but the upstreams and auth, listening on an ephemeral loopback port.
    pub fn new(
        mutation_url: impl Into<String>,
        query_url: impl Into<String>,
        auth: AuthSettings,
    ) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            mutation_url: mutation_url.into(),
            query_url: query_url.into(),
            auth,
            max_body_bytes: 256 * 1024,
            max_connections: 10_000,
            max_in_flight: 2_048,
            header_read_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 512,
            drain_timeout: Duration::from_secs(20),
            shutdown_linger: Duration::ZERO,
            rate_limit: None,
        }
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`, `2d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 10s, 5m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// Reads a secret file the way Kubernetes mounts them: trailing newlines are not part of the secret.
pub fn read_secret_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }
}

//! Command-line and environment configuration. Every option has an environment variable so a Kubernetes
//! Deployment (and a Secret for the auth keys) can configure it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use cqrs_common::TelemetryArgs;

use crate::{
    auth::Role,
    config::{AuthSettings, Config, JwtSettings, RateLimit, parse_duration, read_secret_file},
};

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    about = "CQRS gateway: authenticating, streaming reverse proxy",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a signed development token.
    MintToken(MintArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Require JWT bearer tokens (default).
    Jwt,
    /// No authentication: every request acts as admin. Local development only.
    Disabled,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:3123")]
    pub listen: SocketAddr,
    /// Base URL of the mutation service (commands).
    #[arg(long, env = "MUTATION_URL", default_value = "http://127.0.0.1:3124")]
    pub mutation_url: String,
    /// Base URL of the query service (reads).
    #[arg(long, env = "QUERY_URL", default_value = "http://127.0.0.1:3125")]
    pub query_url: String,

    /// `jwt` (default) or `disabled` (local development only; logged as a warning).
    #[arg(long = "auth", env = "AUTH_MODE", value_enum, default_value_t = AuthMode::Jwt)]
    pub auth_mode: AuthMode,
    /// HS256 shared secret (at least 32 bytes). Prefer the _FILE form with a mounted Secret.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 shared secret (trailing newlines ignored).
    #[arg(long, env = "AUTH_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key(s) (RSA for RS256, EC for ES256/ES384, Ed25519), inline.
    #[arg(long, env = "AUTH_PUBLIC_KEY", hide_env_values = true)]
    pub public_key: Option<String>,
    /// File with one or more PEM public keys (several = key rotation).
    #[arg(long, env = "AUTH_PUBLIC_KEY_FILE")]
    pub public_key_file: Option<PathBuf>,
    /// Required token issuer (`iss`).
    #[arg(long, env = "AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// Required token audience (`aud`).
    #[arg(long, env = "AUTH_AUDIENCE")]
    pub audience: Option<String>,
    /// Clock skew tolerated on exp/nbf.
    #[arg(long, env = "AUTH_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub auth_leeway: Duration,

    /// Largest request body in bytes (413 beyond). Keep it at most mutation's `MAX_BODY_BYTES` (both default to
    /// 256 KiB): a body the gateway passes but mutation refuses would be cut off mid-stream.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: u64,
    /// Open client connections before the gateway stops accepting.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Requests handled at once before new ones are shed with 503.
    #[arg(long, env = "GATEWAY_MAX_IN_FLIGHT", default_value_t = 2_048)]
    pub max_in_flight: usize,
    /// Time a client has to send a request head (also the idle keep-alive timeout).
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Total time for a read (SSE streams: until the response head only).
    #[arg(long, env = "GATEWAY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Total time for a command.
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Total time for an /admin request.
    #[arg(long, env = "GATEWAY_ADMIN_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub admin_timeout: Duration,
    /// TCP connect timeout to an upstream.
    #[arg(long, env = "GATEWAY_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Idle pooled upstream connections close after this.
    #[arg(long, env = "GATEWAY_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream.
    #[arg(long, env = "GATEWAY_POOL_MAX_IDLE", default_value_t = 512)]
    pub pool_max_idle: usize,
    /// Bound on draining in-flight requests at shutdown.
    #[arg(long, env = "GATEWAY_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// After SIGTERM, keep serving this long with `Connection: close` on every answer, before draining.
    #[arg(long, env = "GATEWAY_SHUTDOWN_LINGER", default_value = "2s", value_parser = parse_duration)]
    pub shutdown_linger: Duration,
    /// Per-client sustained requests per second (token subject, else client IP); 0 disables rate limiting.
    #[arg(long, env = "GATEWAY_RATE_LIMIT_RPS", default_value_t = 0.0)]
    pub rate_limit_rps: f64,
    /// Per-client burst size.
    #[arg(long, env = "GATEWAY_RATE_LIMIT_BURST", default_value_t = 100)]
    pub rate_limit_burst: u32,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("give either {0} or its _FILE form, not both")]
    Both(&'static str),
    #[error("the public key file is not UTF-8 PEM text")]
    NotPem,
}

fn one_of(
    what: &'static str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::Both(what)),
        (Some(v), None) => Ok(Some(v.into_bytes())),
        (None, Some(path)) => read_secret_file(&path)
            .map(Some)
            .map_err(|source| ConfigError::Read { what, path, source }),
        (None, None) => Ok(None),
    }
}

impl ServeArgs {
    /// The resolved configuration (reads key files) and the telemetry settings.
    pub fn into_config(self) -> Result<(Config, TelemetryArgs), ConfigError> {
        let ServeArgs {
            listen,
            mutation_url,
            query_url,
            auth_mode,
            jwt_secret,
            jwt_secret_file,
            public_key,
            public_key_file,
            issuer,
            audience,
            auth_leeway,
            max_body_bytes,
            max_connections,
            max_in_flight,
            header_read_timeout,
            read_timeout,
            write_timeout,
            admin_timeout,
            connect_timeout,
            pool_idle_timeout,
            pool_max_idle,
            drain_timeout,
            shutdown_linger,
            rate_limit_rps,
            rate_limit_burst,
            telemetry,
        } = self;
        let auth = match auth_mode {
            AuthMode::Disabled => AuthSettings::Disabled,
            AuthMode::Jwt => {
                let hs256_secret = one_of("AUTH_JWT_SECRET", jwt_secret, jwt_secret_file)?;
                let public_keys_pem = one_of("AUTH_PUBLIC_KEY", public_key, public_key_file)?
                    .map(String::from_utf8)
                    .transpose()
                    .map_err(|_| ConfigError::NotPem)?;
                AuthSettings::Jwt(JwtSettings {
                    hs256_secret,
                    public_keys_pem,
                    issuer,
                    audience,
                    leeway: auth_leeway,
                })
            }
        };
        let rate_limit = (rate_limit_rps > 0.0).then_some(RateLimit {
            per_second: rate_limit_rps,
            burst: rate_limit_burst,
        });
        let config = Config {
            listen,
            mutation_url,
            query_url,
            auth,
            max_body_bytes,
            max_connections,
            max_in_flight,
            header_read_timeout,
            read_timeout,
            write_timeout,
            admin_timeout,
            connect_timeout,
            pool_idle_timeout,
            pool_max_idle_per_host: pool_max_idle,
            drain_timeout,
            shutdown_linger,
            rate_limit,
        };
        Ok((config, telemetry))
    }
}

#[derive(Debug, clap::Args)]
pub struct MintArgs {
    /// Role to grant (admin implies writer implies reader).
    #[arg(long, env = "MINT_ROLE", value_enum)]
    pub role: Role,
    /// Token subject (`sub`).
    #[arg(long, env = "MINT_SUBJECT", default_value = "dev")]
    pub sub: String,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, env = "MINT_TTL", default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// HS256 shared secret.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// File holding the HS256 shared secret.
    #[arg(long, env = "AUTH_JWT_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// RSA or EC (P-256) private key PEM: signs RS256 or ES256 instead of HS256.
    #[arg(long, env = "AUTH_PRIVATE_KEY_FILE")]
    pub private_key_file: Option<PathBuf>,
    /// `iss` claim.
    #[arg(long, env = "AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// `aud` claim.
    #[arg(long, env = "AUTH_AUDIENCE")]
    pub audience: Option<String>,
}

impl MintArgs {
    pub fn run(self) -> anyhow::Result<String> {
        let MintArgs {
            role,
            sub,
            ttl,
            secret,
            secret_file,
            private_key_file,
            issuer,
            audience,
        } = self;
        let secret = one_of("AUTH_JWT_SECRET", secret, secret_file)?;
        let private = match private_key_file {
            Some(path) => Some(std::fs::read(&path).map_err(|source| ConfigError::Read {
                what: "private key",
                path,
                source,
            })?),
            None => None,
        };
        let claims = crate::mint::Claims::new(&sub, role, ttl, issuer, audience);
        Ok(crate::mint::mint(
            &claims,
            secret.as_deref(),
            private.as_deref(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_serve_flags_and_the_mint_subcommand() {
        let cli = Cli::try_parse_from(["gateway", "--auth", "disabled", "--max-body-bytes", "10"])
            .expect("parse");
        assert!(cli.command.is_none());
        let (config, _) = cli.serve.into_config().expect("config");
        assert!(matches!(config.auth, AuthSettings::Disabled));
        assert_eq!(config.max_body_bytes, 10);

        let cli = Cli::try_parse_from([
            "gateway",
            "mint-token",
            "--role",
            "writer",
            "--secret",
            "s",
            "--ttl",
            "2h",
        ])
        .expect("parse");
        match cli.command {
            Some(Command::MintToken(m)) => {
                assert_eq!(m.role, Role::Writer);
                assert_eq!(m.ttl, Duration::from_secs(7200));
            }
            None => panic!("expected mint-token"),
        }
    }
}

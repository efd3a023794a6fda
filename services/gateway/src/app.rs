//! Binding, wiring and serving: [`Application::build`] then [`Application::run_until_stopped`].

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, http::Request};
use cqrs_common::{HealthState, health::check_fn, health_router};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::Semaphore,
};
use tower::ServiceExt;

use crate::{
    auth::{KeyError, Verifier},
    config::{AuthSettings, Config},
    metrics::Metrics,
    proxy::{Gateway, Upstream, UpstreamUrlError},
    ratelimit::RateLimiter,
};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamUrlError),
    #[error("invalid auth configuration: {0}")]
    Auth(#[from] KeyError),
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A bound, fully wired gateway that is not serving yet.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    health: Router,
    registry: prometheus::Registry,
    max_connections: usize,
    header_read_timeout: Duration,
    drain_timeout: Duration,
    shutdown_linger: Duration,
}

/// Paths the gateway answers itself; everything else is proxied.
fn is_own_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, BuildError> {
        let Config {
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
            pool_max_idle_per_host,
            drain_timeout,
            shutdown_linger,
            rate_limit,
        } = config;

        let verifier = match &auth {
            AuthSettings::Disabled => {
                tracing::warn!(
                    "!!! AUTHENTICATION IS DISABLED (AUTH_MODE=disabled): every request is treated as admin. \
                     Never run this way outside local development. !!!"
                );
                None
            }
            AuthSettings::Jwt(s) => Some(Verifier::new(s)?),
        };

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(pool_idle_timeout)
            .pool_max_idle_per_host(pool_max_idle_per_host)
            .build(connector);

        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry)?;
        let gateway = Arc::new(Gateway {
            client,
            mutation: Upstream::parse("mutation", &mutation_url)?,
            query: Upstream::parse("query", &query_url)?,
            verifier,
            rate_limiter: rate_limit.map(RateLimiter::new),
            in_flight: Semaphore::new(max_in_flight),
            max_body_bytes,
            read_timeout,
            write_timeout,
            admin_timeout,
            metrics,
        });

        // The gateway is ready on its own: it can proxy whatever state the upstreams are in (their readiness
        // is their own business, and a proxied request to a down upstream is a clean 503). Their health is
        // reported in /readyz's body and in cqrs_dependency_up only.
        let mut health = HealthState::new(registry.clone());
        for which in ["mutation", "query"] {
            let gw = gateway.clone();
            health = health.with_info_check(check_fn(which, move || {
                let gw = gw.clone();
                async move {
                    let upstream = if which == "mutation" {
                        &gw.mutation
                    } else {
                        &gw.query
                    };
                    upstream.ready(&gw.client).await
                }
            }));
        }

        let socket = if listen.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|source| BuildError::Bind {
            addr: listen,
            source,
        })?;
        socket
            .set_reuseaddr(true)
            .map_err(|source| BuildError::Bind {
                addr: listen,
                source,
            })?;
        socket.bind(listen).map_err(|source| BuildError::Bind {
            addr: listen,
            source,
        })?;
        // A deep backlog: bursts of connections wait in the kernel rather than being refused.
        let listener = socket.listen(4096).map_err(|source| BuildError::Bind {
            addr: listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| BuildError::Bind {
            addr: listen,
            source,
        })?;

        Ok(Self {
            listener,
            addr,
            gateway,
            health: health_router(health),
            registry,
            max_connections,
            header_read_timeout,
            drain_timeout,
            shutdown_linger,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registry behind `/metrics` (tests read counters from it).
    pub fn registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets in-flight requests finish for at most the
    /// drain timeout, and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let Self {
            listener,
            addr,
            gateway,
            health,
            registry: _,
            max_connections,
            header_read_timeout,
            drain_timeout,
            shutdown_linger,
        } = self;
        tracing::info!(%addr, "gateway listening");
        let connections = Arc::new(Semaphore::new(max_connections));
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true);
        // Shutdown in two steps: first linger (still accepting, every answer closes its connection), then stop
        // accepting and drain.
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = {
            let draining = draining.clone();
            async move {
                shutdown.await;
                draining.store(true, std::sync::atomic::Ordering::SeqCst);
                if !shutdown_linger.is_zero() {
                    tracing::info!(
                        ?shutdown_linger,
                        "shutting down: closing connections after each answer"
                    );
                    tokio::time::sleep(shutdown_linger).await;
                }
            }
        };
        let mut shutdown = std::pin::pin!(stop);

        loop {
            // At the connection cap, stop accepting: further clients wait in the kernel backlog.
            let permit = tokio::select! {
                p = connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE/ENFILE and friends: back off briefly instead of spinning on the error.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let gw = gateway.clone();
            let health = health.clone();
            let draining = draining.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let gw = gw.clone();
                let health = health.clone();
                let draining = draining.clone();
                async move {
                    let mut res = if is_own_path(req.uri().path()) {
                        health.oneshot(req.map(Body::new)).await?
                    } else {
                        gw.handle(req, peer).await
                    };
                    if draining.load(std::sync::atomic::Ordering::SeqCst) {
                        res.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(res)
                }
            });
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            let open = gateway.metrics.open_connections.clone();
            tokio::spawn(async move {
                open.inc();
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                open.dec();
                drop(permit);
            });
        }

        drop(listener);
        tracing::info!(
            ?drain_timeout,
            "shutting down: no longer accepting, draining in-flight requests"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections drained"),
            () = tokio::time::sleep(drain_timeout) => {
                tracing::warn!(?drain_timeout, "drain timeout elapsed with connections still open; exiting");
            }
        }
        Ok(())
    }
}

//! Graceful HTTP serving: stop accepting on shutdown, let in-flight requests finish within a bound.

use std::{
    future::{Future, IntoFuture},
    time::Duration,
};

use axum::Router;
use tokio::net::TcpListener;

/// Serves `app` until `shutdown` resolves, then drains in-flight requests for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => r,
        _ = async {
            // Shutdown was requested: give in-flight requests `drain` to finish.
            let _ = rx.await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(?drain, "drain period elapsed with requests still in flight; exiting");
            Ok(())
        }
    }
}

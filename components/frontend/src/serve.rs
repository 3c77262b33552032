//! The frontend's HTTP server: the axum router on hyper's connection
//! builder, with deadlines for slow and idle clients (`axum::serve` sets
//! none, so a client could hold a connection open for ever by sending
//! nothing) and a graceful drain.
//!
//! - A new connection must send its first byte within the idle timeout.
//! - HTTP/1: a connection must deliver each request's headers within the
//!   idle timeout, counted from when the server starts waiting for them, so
//!   an idle keep-alive connection is closed after it too.
//! - HTTP/2: the server pings at that interval and closes a connection whose
//!   peer does not answer within it.
//! - Bodies are read under the same deadline by the handlers (408).
//! - Answers being streamed have no deadline here (the worker side has the
//!   stall deadline, `--stream-stall-timeout-secs`).

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `draining` is cancelled; then stops
/// accepting and waits for every open connection to finish its answers.
pub(crate) async fn serve(listener: TcpListener, app: Router, idle_timeout: Duration, draining: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(idle_timeout)
        .keep_alive_timeout(idle_timeout);
    let connections = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            _ = draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let (builder, app, draining) = (builder.clone(), app.clone(), draining.clone());
        connections.spawn(async move {
            // hyper first reads to tell HTTP/1 from HTTP/2, with no deadline;
            // a client that sends nothing at all is dropped here.
            let mut first = [0u8; 1];
            tokio::select! {
                _ = draining.cancelled() => return,
                sent = tokio::time::timeout(idle_timeout, socket.peek(&mut first)) => {
                    if !matches!(sent, Ok(Ok(1..))) {
                        return;
                    }
                }
            }
            let service = app.map_request(|request: Request<Incoming>| request.map(Body::new));
            let connection =
                builder.serve_connection_with_upgrades(TokioIo::new(socket), TowerToHyperService::new(service));
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = draining.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

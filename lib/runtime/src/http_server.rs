//! Serving an axum router over HTTP with deadlines for slow and idle
//! clients (`axum::serve` sets none, so a client could hold a connection
//! open for ever by sending nothing) and a graceful drain. Used by the
//! status server of every process and by the OpenAI frontend.
//!
//! - A new connection must send its first byte within the idle timeout.
//! - HTTP/1: a connection must deliver each request's headers within the
//!   idle timeout, counted from when the server starts waiting for them, so
//!   an idle keep-alive connection is closed after it too.
//! - HTTP/2: the server pings at that interval and closes a connection whose
//!   peer does not answer within it.
//! - Bodies are read by the handlers, under a deadline of their own (the
//!   frontend answers 408).
//! - Answers being streamed have no deadline here.
//! - With TLS ([`serve_tls`]) the handshake must finish within the idle
//!   timeout too; ALPN picks HTTP/2 or HTTP/1.1.

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `draining` is cancelled; then stops
/// accepting and waits for every open connection to finish its answers.
pub async fn serve(listener: TcpListener, app: Router, idle_timeout: Duration, draining: CancellationToken) {
    serve_with(listener, app, idle_timeout, draining, None, Limits::default()).await;
}

/// [`serve`] over TLS: every connection is a TLS session made by `tls`.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    idle_timeout: Duration,
    draining: CancellationToken,
    tls: TlsAcceptor,
) {
    serve_with(listener, app, idle_timeout, draining, Some(tls), Limits::default()).await;
}

/// Caps on what one server holds; `None` leaves hyper's defaults.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Connections open at once; one over the cap is closed at accept, and
    /// `on_refused` is called.
    pub max_connections: Option<usize>,
    /// HTTP/2 streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: Option<u32>,
    /// Counts a refused connection.
    pub on_refused: Option<prometheus::IntCounter>,
    /// Bytes of answers one connection may hold queued for the HTTP/2 stack:
    /// each connection gets a [`SendBudget`] of this size in the extensions
    /// of its requests, for handlers that stream to draw on.
    pub send_queue_bytes: Option<usize>,
}

/// One connection's budget of queued answer bytes, shared by its streams:
/// what a caller that stops reading can make the server hold, whatever the
/// number of its streams. Handlers that stream take from it before queueing
/// a chunk and give back when the HTTP/2 stack takes the chunk (which it does
/// only as the peer's flow-control window opens).
#[derive(Debug, Clone)]
pub struct SendBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl SendBudget {
    fn new(total: usize) -> Self {
        // The semaphore's own maximum is far above any configured budget
        // (DYN_TCP_MAX_SEND_QUEUE is at most 2^40); clamp all the same.
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits until `bytes` more may be queued. A chunk larger than the whole
    /// budget waits for all of it, so it still goes out once the queue empties.
    pub async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        self.bytes
            .clone()
            .acquire_many_owned(self.permits(bytes))
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Like [`SendBudget::reserve`], without waiting: `None` when there is no room now.
    pub fn try_reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.bytes.clone().try_acquire_many_owned(self.permits(bytes)).ok()
    }

    fn permits(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.total).min(u32::MAX as usize) as u32
    }
}

/// Connections under a cap that have not opened yet (first byte, TLS),
/// each holding its slot, oldest first. The slots live here, not in the
/// connections' tasks, so that evicting one hands its slot to the newcomer
/// at once (the TCP request plane does the same; see its server).
#[derive(Debug, Default)]
struct Opening {
    state: std::sync::Mutex<OpeningState>,
}

#[derive(Debug, Default)]
struct OpeningState {
    next_id: u64,
    /// By id, which grows with time: the first entry is the oldest.
    waiting: BTreeMap<u64, Waiting>,
}

#[derive(Debug)]
struct Waiting {
    /// Cancelled when the connection is evicted.
    evicted: CancellationToken,
    slot: OwnedSemaphorePermit,
}

impl Opening {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpeningState> {
        // Single insert/remove updates: a poisoned map is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new connection with its slot.
    fn enter(self: &Arc<Self>, slot: OwnedSemaphorePermit) -> Place {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        state.waiting.insert(
            id,
            Waiting {
                evicted: evicted.clone(),
                slot,
            },
        );
        Place {
            id,
            evicted,
            opening: self.clone(),
        }
    }

    /// Cuts off the connection that has waited longest and returns its slot.
    fn evict_oldest(&self) -> Option<OwnedSemaphorePermit> {
        let (_, oldest) = self.lock().waiting.pop_first()?;
        oldest.evicted.cancel();
        Some(oldest.slot)
    }
}

/// A connection's entry in [`Opening`]; dropped before it opens, it gives
/// its slot back.
#[derive(Debug)]
struct Place {
    id: u64,
    evicted: CancellationToken,
    opening: Arc<Opening>,
}

impl Place {
    /// The connection opened: its slot, or `Err` when it was evicted first.
    fn open(self) -> Result<OwnedSemaphorePermit, ()> {
        let waiting = self.opening.lock().waiting.remove(&self.id);
        waiting.map(|waiting| waiting.slot).ok_or(())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.opening.lock().waiting.remove(&self.id);
    }
}

/// [`serve`] (or [`serve_tls`]) with [`Limits`].
pub(crate) async fn serve_with(
    listener: TcpListener,
    app: Router,
    idle_timeout: Duration,
    draining: CancellationToken,
    tls: Option<TlsAcceptor>,
    limits: Limits,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(idle_timeout)
        .keep_alive_timeout(idle_timeout)
        .max_concurrent_streams(limits.max_streams_per_connection);
    let slots = limits.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let opening = Arc::new(Opening::default());
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
        // Under a cap, a new connection takes a free slot, else the slot of
        // the connection that has waited longest without opening (sending
        // its first byte and finishing TLS): a flood of silent connections
        // must not keep callers out. Only when every slot is an open
        // connection is the new one closed.
        let place = match &slots {
            None => None,
            Some(slots) => {
                let free = slots.clone().try_acquire_owned().ok();
                let slot = free.or_else(|| {
                    let slot = opening.evict_oldest()?;
                    if let Some(refused) = &limits.on_refused {
                        refused.inc();
                    }
                    tracing::debug!("cut off a connection that had not opened, to make room (connection cap)");
                    Some(slot)
                });
                let Some(slot) = slot else {
                    // Closed at once: the open connections keep working.
                    if let Some(refused) = &limits.on_refused {
                        refused.inc();
                    }
                    tracing::debug!(%peer, "refusing a connection over the server's connection cap");
                    continue;
                };
                Some(opening.enter(slot))
            }
        };
        let _ = socket.set_nodelay(true);
        let (builder, app, draining, tls) = (builder.clone(), app.clone(), draining.clone(), tls.clone());
        let budget = limits.send_queue_bytes.map(SendBudget::new);
        let evicted = place
            .as_ref()
            .map_or_else(CancellationToken::new, |place| place.evicted.clone());
        connections.spawn(async move {
            // hyper first reads to tell HTTP/1 from HTTP/2, with no deadline;
            // a client that sends nothing at all is dropped here.
            let mut first = [0u8; 1];
            tokio::select! {
                _ = draining.cancelled() => return,
                _ = evicted.cancelled() => return,
                sent = tokio::time::timeout(idle_timeout, socket.peek(&mut first)) => {
                    if !matches!(sent, Ok(Ok(1..))) {
                        return;
                    }
                }
            }
            let ended = match tls {
                None => {
                    // Open: its slot is its own now, unless it was just evicted.
                    let Ok(_slot) = place.map(Place::open).transpose() else {
                        return;
                    };
                    serve_connection(&builder, app, socket, budget, &draining).await
                }
                Some(tls) => {
                    let handshake = tokio::select! {
                        _ = draining.cancelled() => return,
                        _ = evicted.cancelled() => return,
                        done = tokio::time::timeout(idle_timeout, tls.accept(socket)) => done,
                    };
                    match handshake {
                        Ok(Ok(session)) => {
                            let Ok(_slot) = place.map(Place::open).transpose() else {
                                return;
                            };
                            serve_connection(&builder, app, session, budget, &draining).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake did not finish within the idle timeout");
                            return;
                        }
                    }
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

/// Serves one connection until it ends, or finishes its answers once
/// `draining` is cancelled. `budget`, when given, is put in every request's
/// extensions.
async fn serve_connection<S>(
    builder: &Builder<TokioExecutor>,
    app: Router,
    io: S,
    budget: Option<SendBudget>,
    draining: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |request: Request<Incoming>| {
        let mut request = request.map(Body::new);
        if let Some(budget) = &budget {
            request.extensions_mut().insert(budget.clone());
        }
        request
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        ended = connection.as_mut() => ended,
        _ = draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SendBudget, serve};
    use axum::Router;
    use axum::routing::get;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    async fn exchange(address: std::net::SocketAddr, request: &[u8]) -> String {
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_clients_are_dropped_and_a_drain_finishes_the_answers_in_flight() {
        let app = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let draining = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, Duration::from_millis(200), draining.clone()));

        // Sends nothing: closed at the idle timeout.
        let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut nothing = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut nothing)).await;
        assert!(closed.is_ok() && nothing.is_empty(), "a silent connection stayed open");

        // A request in flight when the drain starts is answered; then the server ends.
        let in_flight = tokio::spawn(exchange(address, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        draining.cancel();
        let answer = in_flight.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server ends once its connections have")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "nothing listens after the drain"
        );
    }

    #[tokio::test]
    async fn a_send_budget_holds_back_what_does_not_fit_until_room_is_made() {
        let budget = SendBudget::new(100);
        let first = budget.reserve(60).await;
        let second = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(60).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "60 + 60 bytes fit in a budget of 100");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("room made, the waiting chunk goes")
            .unwrap();
        // A chunk larger than the whole budget waits for all of it, then goes.
        let huge = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(1 << 30).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!huge.is_finished());
        drop(second);
        let all = tokio::time::timeout(Duration::from_secs(10), huge)
            .await
            .expect("an empty budget lets the huge chunk through")
            .unwrap();
        assert_eq!(all.num_permits(), 100);
    }
}

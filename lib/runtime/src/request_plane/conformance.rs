//! The request-plane conformance suite: the same checks, over real
//! loopback sockets, for every transport (tcp, http, nats). A transport's
//! tests implement [`PlaneKit`] and invoke `conformance_tests!(kit)`.

use crate::config::RuntimeConfig;
use crate::engine::{Context, Controller};
use crate::error::{ErrorKind, RequestError};
use crate::request_plane::handlers::EndpointObservers;
use crate::request_plane::handlers::{Handlers, PushHandler};
use crate::request_plane::{ByteStream, RequestClient, RequestServer, Target};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) const INSTANCE: u64 = 0x5eed;
/// Generous bound on anything a test waits for; hitting it means a hang.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// What the `count` handler saw happen to its requests.
#[derive(Debug, Default)]
struct Seen {
    stopped: Vec<String>,
    killed: Vec<String>,
}

/// Test handlers, selected by endpoint name.
#[derive(Clone, Default)]
pub(crate) struct Fixtures {
    seen: Arc<Mutex<Seen>>,
}

impl Fixtures {
    /// `ns/c/echo`: one item, the request body.
    fn echo(&self) -> Arc<dyn PushHandler> {
        Arc::new(FnHandler(|request: Context<Bytes>| {
            async move { Ok(stream(vec![Ok(request.into_parts().0)])) }.boxed()
        }))
    }

    /// `ns/c/count`: body is "n[,delay_ms]"; yields "0".."n-1", pausing
    /// between items; on stop it ends early, and it records stop/kill.
    fn count(&self) -> Arc<dyn PushHandler> {
        let seen = self.seen.clone();
        Arc::new(FnHandler(move |request: Context<Bytes>| {
            let seen = seen.clone();
            async move {
                let (body, controller) = request.into_parts();
                let text = String::from_utf8(body.to_vec()).unwrap();
                let mut parts = text.split(',');
                let n: u64 = parts.next().unwrap().parse().unwrap();
                let delay = Duration::from_millis(parts.next().map_or(0, |d| d.parse().unwrap()));
                let items = futures::stream::unfold((0, controller, seen), move |(i, controller, seen)| async move {
                    if i == n {
                        return None;
                    }
                    if !delay.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = controller.stopped() => {}
                        }
                    }
                    if controller.is_stopped() {
                        record(&seen, &controller);
                        return None;
                    }
                    Some((Ok(Bytes::from(i.to_string())), (i + 1, controller, seen)))
                });
                Ok(Box::pin(items) as ByteStream)
            }
            .boxed()
        }))
    }

    /// `ns/c/hang`: yields one item, then waits until killed (and records it).
    fn hang(&self) -> Arc<dyn PushHandler> {
        let seen = self.seen.clone();
        Arc::new(FnHandler(move |request: Context<Bytes>| {
            let seen = seen.clone();
            async move {
                let controller = request.controller().clone();
                let first = futures::stream::iter([Ok(Bytes::from_static(b"started"))]);
                let rest = futures::stream::once(async move {
                    // The runtime stops polling a killed stream, so the record
                    // is made by a guard that runs when the stream is dropped.
                    let _guard = RecordOnDrop(seen, controller.clone());
                    futures::future::pending::<()>().await;
                    Err(RequestError::engine("unreachable"))
                });
                Ok(Box::pin(first.chain(rest)) as ByteStream)
            }
            .boxed()
        }))
    }

    /// `ns/c/fail`: refuses with the kind named in the body, or fails mid-stream.
    fn fail(&self) -> Arc<dyn PushHandler> {
        Arc::new(FnHandler(|request: Context<Bytes>| {
            async move {
                match &request.data()[..] {
                    b"overloaded" => Err(RequestError::new(ErrorKind::Overloaded, "queue full")),
                    _ => Ok(stream(vec![
                        Ok(Bytes::from_static(b"partial")),
                        Err(RequestError::engine("model exploded")),
                    ])),
                }
            }
            .boxed()
        }))
    }

    /// `ns/c/panic`: panics before answering ("at-once"), or after one item.
    fn panic(&self) -> Arc<dyn PushHandler> {
        Arc::new(FnHandler(|request: Context<Bytes>| {
            if &request.data()[..] == b"at-once" {
                panic!("the test handler panics before answering");
            }
            let first = futures::stream::iter([Ok(Bytes::from_static(b"partial"))]);
            let rest = futures::stream::poll_fn(|_| -> std::task::Poll<Option<Result<Bytes, RequestError>>> {
                panic!("the test handler panics after one item")
            });
            async move { Ok(Box::pin(first.chain(rest)) as ByteStream) }.boxed()
        }))
    }

    /// `ns/c/big`: one item of the size given in the body.
    fn big(&self) -> Arc<dyn PushHandler> {
        Arc::new(FnHandler(|request: Context<Bytes>| {
            async move {
                let size: usize = String::from_utf8(request.data().to_vec()).unwrap().parse().unwrap();
                Ok(stream(vec![Ok(Bytes::from(vec![b'x'; size]))]))
            }
            .boxed()
        }))
    }

    pub(crate) fn handlers(&self) -> Arc<Handlers> {
        let handlers = Arc::new(Handlers::new(INSTANCE));
        for (name, handler) in [
            ("echo", self.echo()),
            ("count", self.count()),
            ("hang", self.hang()),
            ("fail", self.fail()),
            ("big", self.big()),
            ("panic", self.panic()),
        ] {
            handlers
                .insert(&format!("ns/c/{name}"), handler, EndpointObservers::unregistered())
                .unwrap();
        }
        handlers
    }
}

fn record(seen: &Mutex<Seen>, controller: &Controller) {
    let mut seen = seen.lock().unwrap();
    if controller.is_killed() {
        seen.killed.push(controller.id().to_string());
    } else if controller.is_stopped() {
        seen.stopped.push(controller.id().to_string());
    }
}

struct RecordOnDrop(Arc<Mutex<Seen>>, Controller);

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        record(&self.0, &self.1);
    }
}

fn stream(items: Vec<Result<Bytes, RequestError>>) -> ByteStream {
    Box::pin(futures::stream::iter(items))
}

pub(crate) struct FnHandler<F>(pub(crate) F);

impl<F> PushHandler for FnHandler<F>
where
    F: Fn(Context<Bytes>) -> BoxFuture<'static, Result<ByteStream, RequestError>> + Send + Sync,
{
    fn handle(&self, request: Context<Bytes>) -> BoxFuture<'static, Result<ByteStream, RequestError>> {
        (self.0)(request)
    }
}

/// How to start one transport's server and client, for the shared suite.
pub(crate) trait PlaneKit: Send + Sync {
    /// A server for `handlers`, with settings `vars`, stopping (killing its
    /// requests) when `stop` is cancelled.
    fn server(
        &self,
        vars: RuntimeConfig,
        handlers: Arc<Handlers>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Arc<dyn RequestServer>>;

    /// A client with settings `vars`.
    fn client(&self, vars: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>>;
}

/// Any transport with mutual TLS on both sides, every peer's certificate
/// from [`test_mesh`]'s CA: the suite run over TLS.
pub(crate) struct MutualTls<K>(pub(crate) K);

impl<K: PlaneKit> PlaneKit for MutualTls<K> {
    fn server(
        &self,
        config: RuntimeConfig,
        handlers: Arc<Handlers>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
        let config = config.with_request_plane_tls(Some(test_mesh_tls()));
        self.0.server(config, handlers, stop)
    }

    fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
        self.0.client(config.with_request_plane_tls(Some(test_mesh_tls())))
    }
}

/// One throw-away CA and certificates for the whole test binary (made with
/// the `openssl` command, as the etcd TLS tests do).
pub(crate) fn test_mesh() -> &'static switchyard_test_support::etcd_server::TestCertificates {
    static MESH: std::sync::OnceLock<switchyard_test_support::etcd_server::TestCertificates> =
        std::sync::OnceLock::new();
    MESH.get_or_init(switchyard_test_support::etcd_server::TestCertificates::generate)
}

/// The settings turning mutual TLS on with `ca`, `cert` and `key`.
pub(crate) fn tls_vars(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("DYN_REQUEST_PLANE_TLS_CA_PATH", ca.display().to_string()),
        ("DYN_REQUEST_PLANE_TLS_CERT_PATH", cert.display().to_string()),
        ("DYN_REQUEST_PLANE_TLS_KEY_PATH", key.display().to_string()),
    ]
}

/// The test mesh's identity, as a worker and caller with `server.pem`
/// (which carries both serverAuth and clientAuth, and 127.0.0.1).
pub(crate) fn test_mesh_tls() -> crate::config::RequestPlaneTls {
    let mesh = test_mesh();
    let vars = tls_vars(&mesh.ca, &mesh.server_cert, &mesh.server_key);
    let config = RuntimeConfig::from_vars(vars.iter().map(|(k, v)| (*k, v.as_str()))).unwrap();
    config.tcp().tls().clone().expect("TLS settings given")
}

/// The worker side of a [`Pair`].
pub(crate) struct ServerSide {
    pub(crate) server: Arc<dyn RequestServer>,
    pub(crate) stop: CancellationToken,
    pub(crate) fixtures: Fixtures,
}

impl ServerSide {
    pub(crate) async fn start(kit: &dyn PlaneKit, vars: &[(&str, &str)]) -> Self {
        let fixtures = Fixtures::default();
        let stop = CancellationToken::new();
        let config = RuntimeConfig::from_vars(vars.iter().copied()).unwrap();
        let server = kit.server(config, fixtures.handlers(), stop.clone()).await;
        Self { server, stop, fixtures }
    }
}

/// A server and a client on loopback, each with its own shutdown token.
pub(crate) struct Pair {
    pub(crate) server: Arc<dyn RequestServer>,
    pub(crate) client: Arc<dyn RequestClient>,
    pub(crate) server_stop: CancellationToken,
    pub(crate) fixtures: Fixtures,
}

impl Pair {
    pub(crate) async fn start(kit: &dyn PlaneKit) -> Self {
        Self::with_limits(kit, &[], &[]).await
    }

    pub(crate) async fn with_limits(
        kit: &dyn PlaneKit,
        server_vars: &[(&str, &str)],
        client_vars: &[(&str, &str)],
    ) -> Self {
        let server = ServerSide::start(kit, server_vars).await;
        Self::connect(kit, server, client_vars).await
    }

    pub(crate) async fn connect(kit: &dyn PlaneKit, server: ServerSide, client_vars: &[(&str, &str)]) -> Self {
        let config = RuntimeConfig::from_vars(client_vars.iter().copied()).unwrap();
        Self {
            client: kit.client(config).await,
            server: server.server,
            server_stop: server.stop,
            fixtures: server.fixtures,
        }
    }

    pub(crate) fn target(&self, endpoint: &str) -> Target {
        Target {
            transport: self.server.transport(),
            endpoint: format!("ns/c/{endpoint}"),
            instance_id: INSTANCE,
        }
    }

    pub(crate) async fn call(&self, endpoint: &str, body: &str) -> Result<ByteStream, RequestError> {
        self.call_with(endpoint, body, Controller::new()).await
    }

    pub(crate) async fn call_with(
        &self,
        endpoint: &str,
        body: &str,
        controller: Controller,
    ) -> Result<ByteStream, RequestError> {
        let request = Context::with_controller(Bytes::from(body.to_string()), controller);
        tokio::time::timeout(DEADLINE, self.client.call(&self.target(endpoint), request))
            .await
            .expect("call returns within the deadline")
    }
}

/// Drains a stream into its items (as strings) and its final error, if any.
pub(crate) async fn collect(mut stream: ByteStream) -> (Vec<String>, Option<RequestError>) {
    let mut items = vec![];
    loop {
        match tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("stream item within the deadline")
        {
            None => return (items, None),
            Some(Ok(bytes)) => items.push(String::from_utf8_lossy(&bytes).into_owned()),
            Some(Err(error)) => {
                assert!(stream.next().await.is_none(), "an error must be the last item");
                return (items, Some(error));
            }
        }
    }
}

pub(crate) fn numbers(n: u64) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

pub(crate) async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) async fn unary_request_gets_its_one_response(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let (items, error) = collect(pair.call("echo", "hello").await.unwrap()).await;
    assert_eq!(items, vec!["hello"]);
    assert!(error.is_none());
}

pub(crate) async fn streaming_response_arrives_in_order(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let (items, error) = collect(pair.call("count", "1000").await.unwrap()).await;
    assert_eq!(items, numbers(1000));
    assert!(error.is_none());
}

pub(crate) async fn a_thousand_concurrent_streams_share_one_connection(kit: &dyn PlaneKit) {
    let pair = Arc::new(Pair::start(kit).await);
    let calls = (0..1000).map(|i| {
        let pair = pair.clone();
        tokio::spawn(async move {
            let n = 5 + i % 20;
            let (items, error) = collect(pair.call("count", &format!("{n},1")).await.unwrap()).await;
            assert!(error.is_none(), "stream {i}: {error:?}");
            assert_eq!(items, numbers(n), "stream {i}");
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap();
    }
}

pub(crate) async fn caller_stop_reaches_the_handler_which_ends_gracefully(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let controller = Controller::new();
    let mut stream = pair.call_with("count", "1000000,20", controller.clone()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "0");
    controller.stop();
    let (_, error) = collect(stream).await;
    assert!(
        error.is_none(),
        "a graceful stop ends the stream cleanly, got {error:?}"
    );
    let seen = pair.fixtures.seen.clone();
    eventually("the handler saw the stop", || {
        seen.lock().unwrap().stopped.contains(&controller.id().to_string())
    })
    .await;
}

/// Request ids are the callers' to choose, so two requests may share one: a
/// stop of one must not reach the other (finding 5 of issue #21).
pub(crate) async fn two_requests_sharing_a_request_id_are_stopped_apart(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let (first, second) = (Controller::with_id("shared-id"), Controller::with_id("shared-id"));
    let mut one = pair.call_with("count", "1000000,20", first.clone()).await.unwrap();
    let mut two = pair.call_with("count", "1000000,20", second.clone()).await.unwrap();
    assert_eq!(one.next().await.unwrap().unwrap(), "0");
    assert_eq!(two.next().await.unwrap().unwrap(), "0");
    first.stop();
    let (_, error) = tokio::time::timeout(DEADLINE, collect(one))
        .await
        .expect("the stopped request ends, though another shares its id");
    assert!(error.is_none(), "{error:?}");
    // The other one is still streaming.
    for _ in 0..3 {
        assert!(two.next().await.unwrap().is_ok());
    }
    second.stop();
    tokio::time::timeout(DEADLINE, collect(two))
        .await
        .expect("and it can be stopped in turn");
}

pub(crate) async fn caller_kill_ends_the_stream_and_reaches_the_handler(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let controller = Controller::new();
    let mut stream = pair.call_with("hang", "", controller.clone()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "started");
    controller.kill();
    let (_, error) = collect(stream).await;
    assert_eq!(error.map(|e| e.kind()), Some(ErrorKind::Cancelled));
    let seen = pair.fixtures.seen.clone();
    eventually("the handler was killed", || {
        seen.lock().unwrap().killed.contains(&controller.id().to_string())
    })
    .await;
}

pub(crate) async fn dropping_the_stream_kills_the_work_on_the_worker(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let controller = Controller::new();
    let mut stream = pair.call_with("hang", "", controller.clone()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "started");
    drop(stream);
    let seen = pair.fixtures.seen.clone();
    eventually("the handler was killed", || {
        seen.lock().unwrap().killed.contains(&controller.id().to_string())
    })
    .await;
}

pub(crate) async fn worker_shutdown_cancels_in_flight_streams_with_shutting_down(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let mut stream = pair.call("hang", "").await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "started");
    pair.server_stop.cancel();
    let (_, error) = collect(stream).await;
    let kind = error.expect("the stream ends with an error").kind();
    // Depending on timing the caller hears the worker's ShuttingDown frame or,
    // if the socket closed first, that it disconnected; both are retryable, never a hang.
    assert!(
        matches!(kind, ErrorKind::ShuttingDown | ErrorKind::Disconnected),
        "{kind:?}"
    );
}

pub(crate) async fn unknown_endpoint_and_wrong_instance_are_not_found(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let (_, error) = collect(pair.call("nope", "").await.unwrap()).await;
    let error = error.unwrap();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert!(error.message().contains("ns/c/nope"), "{error}");

    let mut target = pair.target("echo");
    target.instance_id = 0xdead;
    let stream = pair.client.call(&target, Context::new(Bytes::new())).await.unwrap();
    assert_eq!(collect(stream).await.1.unwrap().kind(), ErrorKind::NotFound);
}

pub(crate) async fn handler_errors_cross_the_wire_with_their_kind(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let (items, error) = collect(pair.call("fail", "overloaded").await.unwrap()).await;
    assert!(items.is_empty());
    let error = error.unwrap();
    assert_eq!((error.kind(), error.message()), (ErrorKind::Overloaded, "queue full"));

    let (items, error) = collect(pair.call("fail", "midway").await.unwrap()).await;
    assert_eq!(items, vec!["partial"]);
    assert_eq!(error.unwrap().kind(), ErrorKind::Engine);
}

pub(crate) async fn a_panicking_handler_ends_only_its_own_request_with_an_engine_error(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    // Alone on its connection, then with another request open beside it.
    let (items, error) = tokio::time::timeout(DEADLINE, collect(pair.call("panic", "at-once").await.unwrap()))
        .await
        .expect("a caller whose handler panicked is told, not left waiting");
    assert!(items.is_empty());
    assert_eq!(error.expect("an error, not a clean end").kind(), ErrorKind::Engine);
    let mut beside = pair.call("hang", "").await.unwrap();
    assert_eq!(beside.next().await.unwrap().unwrap(), Bytes::from_static(b"started"));

    let (items, error) = tokio::time::timeout(DEADLINE, collect(pair.call("panic", "at-once").await.unwrap()))
        .await
        .expect("a caller whose handler panicked is told, not left waiting");
    assert!(items.is_empty());
    let error = error.expect("an error, not a clean end");
    assert_eq!(error.kind(), ErrorKind::Engine, "{error}");
    assert!(error.message().contains("panicked"), "{error}");

    let (items, error) = tokio::time::timeout(DEADLINE, collect(pair.call("panic", "midway").await.unwrap()))
        .await
        .expect("a caller whose handler panicked is told, not left waiting");
    assert_eq!(items, vec!["partial"]);
    assert_eq!(error.expect("an error, not a clean end").kind(), ErrorKind::Engine);

    // The connection, and the request beside them, carry on.
    let (items, error) = collect(pair.call("echo", "still here").await.unwrap()).await;
    assert_eq!(
        (items, error.map(|e| e.to_string())),
        (vec!["still here".to_string()], None)
    );
    drop(beside);
}

pub(crate) async fn large_payloads_within_the_limit_round_trip(kit: &dyn PlaneKit) {
    let pair = Pair::start(kit).await;
    let body = "y".repeat(4 * 1024 * 1024);
    let (items, _) = collect(pair.call("echo", &body).await.unwrap()).await;
    assert_eq!(items, vec![body]);
}

pub(crate) async fn request_over_the_limit_is_refused_before_sending(kit: &dyn PlaneKit) {
    let pair = Pair::with_limits(kit, &[], &[("DYN_TCP_MAX_MESSAGE_SIZE", "4096")]).await;
    let error = pair.call("echo", &"z".repeat(5000)).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::TooLarge);
    assert!(error.message().contains("DYN_TCP_MAX_MESSAGE_SIZE"), "{error}");
}

pub(crate) async fn request_over_the_worker_limit_fails_only_its_stream(kit: &dyn PlaneKit) {
    let pair = Pair::with_limits(kit, &[("DYN_TCP_MAX_MESSAGE_SIZE", "4096")], &[]).await;
    // The refusal may come as the call's error (HTTP's 413) or as the stream's.
    let kind = match pair.call("echo", &"z".repeat(8000)).await {
        Err(error) => error.kind(),
        Ok(stream) => collect(stream).await.1.unwrap().kind(),
    };
    assert_eq!(kind, ErrorKind::TooLarge);
    let (items, _) = collect(pair.call("echo", "still works").await.unwrap()).await;
    assert_eq!(items, vec!["still works"]);
}

pub(crate) async fn response_over_the_limit_is_a_typed_error_on_either_side(kit: &dyn PlaneKit) {
    // The worker refuses to send an item over its own limit …
    let pair = Pair::with_limits(kit, &[("DYN_TCP_MAX_MESSAGE_SIZE", "4096")], &[]).await;
    let (_, error) = collect(pair.call("big", "5000").await.unwrap()).await;
    assert_eq!(error.unwrap().kind(), ErrorKind::TooLarge);

    // … and a caller with a smaller limit skips an item over its limit, keeping the connection.
    let pair = Pair::with_limits(kit, &[], &[("DYN_TCP_MAX_MESSAGE_SIZE", "4096")]).await;
    let (_, error) = collect(pair.call("big", "5000").await.unwrap()).await;
    assert_eq!(error.unwrap().kind(), ErrorKind::TooLarge);
    let (items, _) = collect(pair.call("echo", "after").await.unwrap()).await;
    assert_eq!(items, vec!["after"]);
}

pub(crate) async fn a_slow_consumer_does_not_stall_other_streams_on_its_connection(kit: &dyn PlaneKit) {
    let pair = Pair::with_limits(kit, &[], &[("DYN_TCP_STREAM_WINDOW", "4")]).await;
    // Never read beyond the first item: the worker runs out of credit for it.
    let mut slow = pair.call("count", "100000").await.unwrap();
    assert_eq!(slow.next().await.unwrap().unwrap(), "0");
    let (items, error) = collect(pair.call("count", "5000").await.unwrap()).await;
    assert!(error.is_none());
    assert_eq!(items.len(), 5000);
    // The slow stream resumes where it stopped.
    assert_eq!(slow.next().await.unwrap().unwrap(), "1");
}

/// The worker lives on its own tokio runtime; dropping that runtime drops
/// its sockets without any goodbye, as a killed process would.
pub(crate) fn worker_crash_mid_stream_ends_the_stream_with_disconnected(kit: &dyn PlaneKit) {
    let worker = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = worker.block_on(ServerSide::start(kit, &[]));
    caller.block_on(async {
        let pair = Pair::connect(kit, server, &[]).await;
        let mut stream = pair.call("count", "1000000,5").await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), "0");
        worker.shutdown_background();
        let (_, error) = collect(stream).await;
        assert_eq!(
            error.expect("an error, not a clean end").kind(),
            ErrorKind::Disconnected
        );
    });
}

/// Generates one `#[test]` per suite check for the transport kit `$kit`.
macro_rules! conformance_tests {
    ($kit:expr) => {
        #[tokio::test]
        async fn unary_request_gets_its_one_response() {
            $crate::request_plane::conformance::unary_request_gets_its_one_response(&$kit).await;
        }
        #[tokio::test]
        async fn streaming_response_arrives_in_order() {
            $crate::request_plane::conformance::streaming_response_arrives_in_order(&$kit).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_thousand_concurrent_streams_share_one_connection() {
            $crate::request_plane::conformance::a_thousand_concurrent_streams_share_one_connection(&$kit).await;
        }
        #[tokio::test]
        async fn caller_stop_reaches_the_handler_which_ends_gracefully() {
            $crate::request_plane::conformance::caller_stop_reaches_the_handler_which_ends_gracefully(&$kit).await;
        }
        #[tokio::test]
        async fn two_requests_sharing_a_request_id_are_stopped_apart() {
            $crate::request_plane::conformance::two_requests_sharing_a_request_id_are_stopped_apart(&$kit).await;
        }
        #[tokio::test]
        async fn caller_kill_ends_the_stream_and_reaches_the_handler() {
            $crate::request_plane::conformance::caller_kill_ends_the_stream_and_reaches_the_handler(&$kit).await;
        }
        #[tokio::test]
        async fn dropping_the_stream_kills_the_work_on_the_worker() {
            $crate::request_plane::conformance::dropping_the_stream_kills_the_work_on_the_worker(&$kit).await;
        }
        #[tokio::test]
        async fn worker_shutdown_cancels_in_flight_streams_with_shutting_down() {
            $crate::request_plane::conformance::worker_shutdown_cancels_in_flight_streams_with_shutting_down(&$kit)
                .await;
        }
        #[tokio::test]
        async fn unknown_endpoint_and_wrong_instance_are_not_found() {
            $crate::request_plane::conformance::unknown_endpoint_and_wrong_instance_are_not_found(&$kit).await;
        }
        #[tokio::test]
        async fn handler_errors_cross_the_wire_with_their_kind() {
            $crate::request_plane::conformance::handler_errors_cross_the_wire_with_their_kind(&$kit).await;
        }
        #[tokio::test]
        async fn a_panicking_handler_ends_only_its_own_request_with_an_engine_error() {
            $crate::request_plane::conformance::a_panicking_handler_ends_only_its_own_request_with_an_engine_error(
                &$kit,
            )
            .await;
        }
        #[tokio::test]
        async fn large_payloads_within_the_limit_round_trip() {
            $crate::request_plane::conformance::large_payloads_within_the_limit_round_trip(&$kit).await;
        }
        #[tokio::test]
        async fn request_over_the_limit_is_refused_before_sending() {
            $crate::request_plane::conformance::request_over_the_limit_is_refused_before_sending(&$kit).await;
        }
        #[tokio::test]
        async fn request_over_the_worker_limit_fails_only_its_stream() {
            $crate::request_plane::conformance::request_over_the_worker_limit_fails_only_its_stream(&$kit).await;
        }
        #[tokio::test]
        async fn response_over_the_limit_is_a_typed_error_on_either_side() {
            $crate::request_plane::conformance::response_over_the_limit_is_a_typed_error_on_either_side(&$kit).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_slow_consumer_does_not_stall_other_streams_on_its_connection() {
            $crate::request_plane::conformance::a_slow_consumer_does_not_stall_other_streams_on_its_connection(&$kit)
                .await;
        }
        #[test]
        fn worker_crash_mid_stream_ends_the_stream_with_disconnected() {
            $crate::request_plane::conformance::worker_crash_mid_stream_ends_the_stream_with_disconnected(&$kit);
        }
    };
}
pub(crate) use conformance_tests;

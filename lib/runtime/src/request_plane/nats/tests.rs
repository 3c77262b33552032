//! The NATS plane's tests: the shared conformance suite, its frames'
//! numbering and batches, the shared reply subscription, and heartbeats.

use super::*;
use crate::config::RuntimeConfig;
use crate::request_plane::conformance::{PlaneKit, conformance_tests};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::OnceLock;
use switchyard_test_support::nats_server::NatsServer as NatsProcess;

/// One NATS server (8 MiB max_payload) for this test binary.
fn server_url() -> String {
    static SERVER: OnceLock<NatsProcess> = OnceLock::new();
    SERVER
        .get_or_init(|| NatsProcess::start_with_max_payload(8 * 1024 * 1024))
        .url()
}

struct Nats;

impl PlaneKit for Nats {
    fn server(
        &self,
        config: RuntimeConfig,
        handlers: Arc<Handlers>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
        async move {
            let client = async_nats::connect(server_url()).await.unwrap();
            // Every test's worker has the same instance id: give each its own subject.
            let subject = format!("test.{:016x}.{:x}", rand::random::<u64>(), handlers.instance_id());
            let limit = *config.tcp().max_message_size();
            let server = NatsServer::start(client, subject, handlers, limit, stop, TaskTracker::new())
                .await
                .unwrap();
            Arc::new(server) as Arc<dyn RequestServer>
        }
        .boxed()
    }

    fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
        async move {
            let client = async_nats::connect(server_url()).await.unwrap();
            Arc::new(NatsRequestClient::new(client, &config)) as Arc<dyn RequestClient>
        }
        .boxed()
    }
}

conformance_tests!(Nats);

/// A hand-written worker on a bare NATS subject, and a caller aimed at it.
struct HandWritten {
    worker: async_nats::Client,
    subject: String,
    requests: async_nats::Subscriber,
    caller: NatsRequestClient,
    target: Target,
}

async fn hand_written_worker() -> HandWritten {
    let url = server_url();
    let worker = async_nats::connect(&url).await.unwrap();
    let subject = format!("test.frames.{:016x}", rand::random::<u64>());
    let requests = worker.subscribe(subject.clone()).await.unwrap();
    worker.flush().await.unwrap();
    let caller = NatsRequestClient::new(async_nats::connect(&url).await.unwrap(), &RuntimeConfig::local());
    let target = Target {
        transport: Transport::Nats(subject.clone()),
        endpoint: "test/frames/generate".into(),
        instance_id: 1,
    };
    HandWritten {
        worker,
        subject,
        requests,
        caller,
        target,
    }
}

/// A hand-written worker answers `request` with `frames`; returns what the
/// caller's stream yields.
async fn answered_with(frames: Vec<Bytes>) -> Vec<Result<Bytes, RequestError>> {
    let HandWritten {
        worker,
        mut requests,
        caller,
        target,
        ..
    } = hand_written_worker().await;
    let answering = tokio::spawn(async move {
        let request = requests.next().await.unwrap();
        let reply = request.reply.unwrap();
        for frame in frames {
            worker.publish(reply.clone(), frame).await.unwrap();
        }
        worker.flush().await.unwrap();
    });
    let stream = caller
        .call(&target, Context::new(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    let items = tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ends");
    answering.await.unwrap();
    items
}

/// Core NATS loses what is in flight across a restart: an answer with a
/// hole in it must end as a broken stream (which the frontend migrates
/// from what arrived), never pass for a whole one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_item_lost_on_the_way_ends_the_stream_as_broken_not_shorter() {
    let end = |count| counted_frame(FrameType::End as u8, count, &[]);
    let whole = answered_with(vec![data_frame(0, b"a"), data_frame(1, b"b"), end(2)]).await;
    let whole: Vec<Bytes> = whole.into_iter().map(Result::unwrap).collect();
    assert_eq!(whole, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);

    // Item 1 lost in the middle.
    let holed = answered_with(vec![data_frame(0, b"a"), data_frame(2, b"c"), end(3)]).await;
    assert_eq!(holed.len(), 2, "{holed:?}");
    assert_eq!(holed[0].as_ref().unwrap(), &Bytes::from_static(b"a"));
    let error = holed[1].as_ref().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Disconnected, "{error}");
    assert!(
        error.message().contains("1 response item(s) from item 1 on were lost"),
        "{error}"
    );

    // The last item lost just before the end.
    let cut = answered_with(vec![data_frame(0, b"a"), end(2)]).await;
    assert_eq!(cut[1].as_ref().unwrap_err().kind(), ErrorKind::Disconnected, "{cut:?}");

    // Items lost before an error: the error does not hide the hole.
    let error = super::super::encode_error(&RequestError::new(ErrorKind::ShuttingDown, "draining"));
    let failed = answered_with(vec![
        data_frame(0, b"a"),
        counted_frame(FrameType::Error as u8, 3, &error),
    ])
    .await;
    let last = failed[1].as_ref().unwrap_err();
    assert_eq!(last.kind(), ErrorKind::Disconnected, "{last}");
    assert!(last.message().contains("2 response item(s)"), "{last}");
}

/// Items that were ready together arrive in one Batch message, numbered
/// like Data frames; a batch cut short, an oversized item in one, or a
/// batch after a lost message ends the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_yields_its_items_in_order_and_is_checked_like_data_frames() {
    let end = |count| counted_frame(FrameType::End as u8, count, &[]);
    let items = |names: &[&'static [u8]]| names.iter().map(|n| Bytes::from_static(n)).collect::<Vec<_>>();
    let answer = answered_with(vec![
        data_frame(0, b"a"),
        batch_frame(BATCH_KIND, 1, &items(&[b"b", b"", b"cd"])),
        data_frame(4, b"e"),
        end(5),
    ])
    .await;
    let answer: Vec<Bytes> = answer.into_iter().map(Result::unwrap).collect();
    assert_eq!(answer, items(&[b"a", b"b", b"", b"cd", b"e"]));

    let holed = answered_with(vec![
        data_frame(0, b"a"),
        batch_frame(BATCH_KIND, 2, &items(&[b"c"])),
        end(3),
    ])
    .await;
    assert_eq!(
        holed[1].as_ref().unwrap_err().kind(),
        ErrorKind::Disconnected,
        "{holed:?}"
    );

    // A Last batch ends the stream after its items (none, too, is an
    // end), and is checked for lost messages like the others.
    let last = answered_with(vec![
        data_frame(0, b"a"),
        batch_frame(LAST_BATCH_KIND, 1, &items(&[b"b", b"c"])),
    ])
    .await;
    let last: Vec<Bytes> = last.into_iter().map(Result::unwrap).collect();
    assert_eq!(last, items(&[b"a", b"b", b"c"]));
    let empty = answered_with(vec![data_frame(0, b"a"), batch_frame(LAST_BATCH_KIND, 1, &[])]).await;
    let empty: Vec<Bytes> = empty.into_iter().map(Result::unwrap).collect();
    assert_eq!(empty, items(&[b"a"]));
    let holed = answered_with(vec![
        data_frame(0, b"a"),
        batch_frame(LAST_BATCH_KIND, 2, &items(&[b"c"])),
    ])
    .await;
    assert_eq!(holed.len(), 2, "{holed:?}");
    assert_eq!(
        holed[1].as_ref().unwrap_err().kind(),
        ErrorKind::Disconnected,
        "{holed:?}"
    );

    let mut cut = batch_frame(BATCH_KIND, 0, &items(&[b"ab", b"cd"])).to_vec();
    cut.pop();
    let cut = answered_with(vec![Bytes::from(cut), end(2)]).await;
    assert_eq!(cut[0].as_ref().unwrap(), &Bytes::from_static(b"ab"));
    let error = cut[1].as_ref().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol, "{error}");
    assert_eq!(cut.len(), 2, "the stream ends after the error: {cut:?}");

    let mut oversized = BytesMut::new();
    oversized.put_u8(BATCH_KIND);
    oversized.put_u32(0);
    oversized.put_u32(u32::MAX);
    let oversized = answered_with(vec![oversized.freeze(), end(1)]).await;
    assert_eq!(
        oversized[0].as_ref().unwrap_err().kind(),
        ErrorKind::TooLarge,
        "{oversized:?}"
    );
}

/// Every call of a client shares one reply subscription, each call with
/// an inbox of its own under it; a call's route goes with the call, and
/// a worker that floods one call past its queue ends that call alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_share_one_reply_subscription_and_a_flooded_call_ends_alone() {
    let client = async_nats::connect(server_url()).await.unwrap();
    let inboxes = Inboxes::default();
    let mut flooded = inboxes.open(&client, 4).await.unwrap();
    let mut other = inboxes.open(&client, 4).await.unwrap();
    let (prefix, number) = flooded.subject.rsplit_once('.').unwrap();
    let (other_prefix, other_number) = other.subject.rsplit_once('.').unwrap();
    assert_eq!(prefix, other_prefix, "one subscription");
    assert_ne!(number, other_number, "an inbox per call");

    for _ in 0..10 {
        client
            .publish(flooded.subject.clone(), Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    client
        .publish(other.subject.clone(), Bytes::from_static(b"y"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), other.messages.recv()).await;
    assert_eq!(answer.unwrap().unwrap(), Bytes::from_static(b"y"));
    // The flooded call keeps what its queue held, then its queue ends.
    let kept = tokio::time::timeout(Duration::from_secs(10), async {
        let mut kept = 0;
        while let Some(message) = flooded.messages.recv().await {
            assert_eq!(message, Bytes::from_static(b"x"));
            kept += 1;
        }
        kept
    })
    .await
    .expect("the flooded call's queue ends");
    assert_eq!(kept, 4);

    drop(other);
    let replies = inboxes.replies.get().unwrap();
    assert!(
        replies.calls().is_empty(),
        "routes left behind: {:?}",
        replies.calls().keys()
    );
}

/// A stream that goes quiet for longer than the silence limit stays open
/// while the worker lives: its heartbeats keep it, and the caller's one
/// silence deadline is moved on rather than firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_outlives_the_silence_limit_on_heartbeats() {
    let pair = crate::request_plane::conformance::Pair::start(&Nats).await;
    let mut stream = pair.call("hang", "").await.unwrap();
    assert_eq!(&stream.next().await.unwrap().unwrap()[..], b"started");
    let quiet = SILENCE_LIMIT + HEARTBEAT + HEARTBEAT / 2;
    let next = tokio::time::timeout(quiet, stream.next()).await;
    assert!(next.is_err(), "the stream ended while the worker lived: {next:?}");
}

/// The same suite through a NATS server that speaks only TLS and
/// requires a client certificate from the test CA: every connection is
/// opened as the runtime opens it, from `NATS_AUTH_CA`,
/// `NATS_AUTH_CLIENT_CERT` and `NATS_AUTH_CLIENT_KEY`.
mod over_tls {
    use super::*;
    use crate::request_plane::conformance::test_mesh;

    fn tls_server() -> &'static NatsProcess {
        static SERVER: OnceLock<NatsProcess> = OnceLock::new();
        SERVER.get_or_init(|| NatsProcess::start_with_mutual_tls(test_mesh(), 8 * 1024 * 1024))
    }

    /// A connection with the test mesh's client certificate.
    async fn connect() -> async_nats::Client {
        let mesh = test_mesh();
        let url = tls_server().url();
        let config = RuntimeConfig::from_vars([
            ("NATS_SERVER", url.as_str()),
            ("NATS_AUTH_CA", mesh.ca.to_str().unwrap()),
            ("NATS_AUTH_CLIENT_CERT", mesh.client_cert.to_str().unwrap()),
            ("NATS_AUTH_CLIENT_KEY", mesh.client_key.to_str().unwrap()),
        ])
        .unwrap();
        crate::nats::connect(config.nats()).await.unwrap()
    }

    struct NatsOverTls;

    impl PlaneKit for NatsOverTls {
        fn server(
            &self,
            config: RuntimeConfig,
            handlers: Arc<Handlers>,
            stop: CancellationToken,
        ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
            async move {
                let subject = format!("test.{:016x}.{:x}", rand::random::<u64>(), handlers.instance_id());
                let limit = *config.tcp().max_message_size();
                let server = NatsServer::start(connect().await, subject, handlers, limit, stop, TaskTracker::new())
                    .await
                    .unwrap();
                Arc::new(server) as Arc<dyn RequestServer>
            }
            .boxed()
        }

        fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
            async move { Arc::new(NatsRequestClient::new(connect().await, &config)) as Arc<dyn RequestClient> }.boxed()
        }
    }

    conformance_tests!(NatsOverTls);
}

/// A request the NATS server could not carry is refused before it is sent,
/// naming the server's limit; a small one skips the check.
#[tokio::test]
async fn a_request_over_the_servers_max_payload_is_refused_before_sending() {
    let server = NatsProcess::start_with_max_payload(4096);
    let connection = async_nats::connect(server.url()).await.unwrap();
    let caller = NatsRequestClient::new(connection.clone(), &RuntimeConfig::local());
    let target = Target {
        transport: Transport::Nats(format!("test.limit.{:016x}", rand::random::<u64>())),
        endpoint: "test/limit/generate".into(),
        instance_id: 1,
    };
    // 4096 bytes less the 1 KiB kept for the request's head.
    let over = caller
        .call(&target, Context::new(Bytes::from(vec![b'x'; 3073])))
        .await
        .err()
        .expect("a request over the server's max_payload is refused");
    assert_eq!(over.kind(), ErrorKind::TooLarge, "{over}");
    assert!(over.message().contains("max_payload"), "{over}");
    // Within the limit it is sent.
    let Transport::Nats(subject) = target.transport.clone() else {
        unreachable!()
    };
    let listener = async_nats::connect(server.url()).await.unwrap();
    let mut requests = listener.subscribe(subject).await.unwrap();
    listener.flush().await.unwrap();
    let call = tokio::spawn(async move {
        caller
            .call(&target, Context::new(Bytes::from(vec![b'x'; 3072])))
            .await
            .err()
    });
    let Ok(sent) = tokio::time::timeout(Duration::from_secs(10), requests.next()).await else {
        // What the caller saw, to tell a refusal from a lost message.
        let outcome = if call.is_finished() {
            format!("the call ended with {:?}", call.await)
        } else {
            "the call is still waiting".to_string()
        };
        panic!(
            "a request within the limit was not sent; {outcome}; the caller's connection is {:?}",
            connection.connection_state()
        );
    };
    let sent = sent.unwrap();
    assert!(sent.payload.len() > 3072);
    call.abort();
}

/// A caller that drops its stream after the last item, with the worker's
/// End already received but not read, sends no Kill: the work is done.
#[tokio::test]
async fn a_stream_dropped_after_its_end_arrived_sends_no_kill() {
    let HandWritten {
        worker,
        subject,
        mut requests,
        caller,
        target,
    } = hand_written_worker().await;
    let mut controls = worker.subscribe(control_subject(&subject)).await.unwrap();
    worker.flush().await.unwrap();
    let answering = tokio::spawn(async move {
        let reply = requests.next().await.unwrap().reply.unwrap();
        worker.publish(reply.clone(), data_frame(0, b"last")).await.unwrap();
        worker
            .publish(reply, counted_frame(FrameType::End as u8, 1, &[]))
            .await
            .unwrap();
        worker.flush().await.unwrap();
        worker
    });
    let mut stream = caller
        .call(&target, Context::new(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    let _worker = answering.await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), Bytes::from_static(b"last"));
    // Let the End reach the call's queue, then stop reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    let kill = tokio::time::timeout(Duration::from_millis(500), controls.next()).await;
    assert!(kill.is_err(), "a control message after the end: {kill:?}");
}

//! The TCP transport: the shared conformance suite, plus what only TCP
//! has (one multiplexed connection per worker, frames, connect errors).

use super::frame::{self, Decoded, Frame, FrameDecoder, FrameType, RequestHead};
use super::{TcpClient, TcpServer};
use crate::config::RuntimeConfig;
use crate::engine::Context;
use crate::error::ErrorKind;
use crate::metrics::TransportMetrics;
use crate::request_plane::conformance::{DEADLINE, INSTANCE, Pair, PlaneKit, collect, conformance_tests, numbers};
use crate::request_plane::handlers::Handlers;
use crate::request_plane::{RequestClient, RequestServer, Target, Transport};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) struct Tcp;

impl PlaneKit for Tcp {
    fn server(
        &self,
        config: RuntimeConfig,
        handlers: Arc<Handlers>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
        async move {
            let server = TcpServer::bind(
                config.tcp(),
                handlers,
                TransportMetrics::unregistered(),
                stop,
                TaskTracker::new(),
            )
            .await
            .unwrap();
            Arc::new(server) as Arc<dyn RequestServer>
        }
        .boxed()
    }

    fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
        async move {
            Arc::new(TcpClient::new(
                config.tcp(),
                CancellationToken::new(),
                TaskTracker::new(),
            )) as Arc<dyn RequestClient>
        }
        .boxed()
    }
}

conformance_tests!(Tcp);

/// The same suite, and the attacks on TLS, with mutual TLS on both sides.
mod over_mutual_tls {
    use super::Tcp;
    use crate::request_plane::conformance::{MutualTls, conformance_tests};
    use crate::request_plane::tls_suite::mutual_tls_tests;

    conformance_tests!(MutualTls(Tcp));
    mutual_tls_tests!(Tcp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_to_a_worker_shares_one_connection_even_after_failures() {
    let config = RuntimeConfig::from_vars([("DYN_TCP_MAX_MESSAGE_SIZE", "4096")]).unwrap();
    let handlers = crate::request_plane::conformance::Fixtures::default().handlers();
    let server = TcpServer::bind(
        config.tcp(),
        handlers,
        TransportMetrics::unregistered(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
    .unwrap();
    let client = default_client();
    let target = |endpoint: &str| Target {
        transport: server.transport(),
        endpoint: format!("ns/c/{endpoint}"),
        instance_id: INSTANCE,
    };
    let calls = (0..1000).map(|i| {
        let (client, target) = (&client, target("count"));
        async move {
            let request = Context::new(Bytes::from(format!("{},1", 3 + i % 5)));
            collect(client.call(&target, request).await.unwrap()).await
        }
    });
    for (items, error) in futures::future::join_all(calls).await {
        assert!(error.is_none() && !items.is_empty());
    }
    // An oversized request and an oversized response fail only their streams.
    let big = client
        .call(&target("echo"), Context::new(Bytes::from(vec![b'z'; 8000])))
        .await
        .unwrap();
    assert_eq!(collect(big).await.1.unwrap().kind(), ErrorKind::TooLarge);
    let huge = client
        .call(&target("big"), Context::new(Bytes::from_static(b"5000")))
        .await
        .unwrap();
    assert_eq!(collect(huge).await.1.unwrap().kind(), ErrorKind::TooLarge);
    let (items, _) = collect(
        client
            .call(&target("count"), Context::new(Bytes::from_static(b"3")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(items, numbers(3));
    assert_eq!(server.connections_accepted(), 1);
}

#[tokio::test]
async fn a_corrupt_frame_closes_only_its_own_connection() {
    let pair = Pair::start(&Tcp).await;
    let healthy = pair.call("count", "3,50").await.unwrap();
    let Transport::Tcp(address) = pair.server.transport() else {
        unreachable!("a TCP server")
    };
    let mut rogue = tokio::net::TcpStream::connect(&address).await.unwrap();
    rogue
        .write_all(&[0, 0, 0, 1, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0])
        .await
        .unwrap();
    let mut rest = vec![];
    let closed = tokio::time::timeout(DEADLINE, rogue.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the worker kept a corrupt connection open");
    assert_eq!(collect(healthy).await.0, numbers(3));
}

#[tokio::test]
async fn an_unreachable_worker_fails_fast_with_unreachable() {
    let client_config = RuntimeConfig::from_vars([("DYN_TCP_CONNECT_TIMEOUT", "2s")]).unwrap();
    let client = TcpClient::new(client_config.tcp(), CancellationToken::new(), TaskTracker::new());
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = Target {
        transport: Transport::Tcp(format!("127.0.0.1:{port}")),
        endpoint: "ns/c/echo".into(),
        instance_id: INSTANCE,
    };
    let error = client.call(&target, Context::new(Bytes::new())).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unreachable);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_connect_timeout() {
    let pair = Pair::with_limits(&Tcp, &[("DYN_TCP_CONNECT_TIMEOUT", "200ms")], &[]).await;
    let Transport::Tcp(address) = pair.server.transport() else {
        unreachable!("a TCP server")
    };
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut rest = vec![];
    let closed = tokio::time::timeout(DEADLINE, silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the worker kept a silent connection open");

    // A caller that talks is not affected, however long it then stays idle.
    let answer = pair.call("count", "2,0").await.unwrap();
    assert_eq!(collect(answer).await.0, numbers(2));
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let answer = pair.call("count", "3,0").await.unwrap();
    assert_eq!(collect(answer).await.0, numbers(3));
}

/// A worker with `vars` whose transport counters the test can read.
async fn worker_with(vars: &[(&str, &str)]) -> (TcpServer, TransportMetrics) {
    let config = RuntimeConfig::from_vars(vars.iter().copied()).unwrap();
    let metrics = TransportMetrics::unregistered();
    let server = TcpServer::bind(
        config.tcp(),
        crate::request_plane::conformance::Fixtures::default().handlers(),
        metrics.clone(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
    .unwrap();
    (server, metrics)
}

/// A caller with the default settings, on its own token and tracker.
fn default_client() -> TcpClient {
    TcpClient::new(
        RuntimeConfig::default().tcp(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
}

fn address(server: &TcpServer) -> String {
    let Transport::Tcp(address) = server.transport() else {
        unreachable!("a TCP server")
    };
    address
}

fn target(server: &TcpServer, endpoint: &str) -> Target {
    Target {
        transport: server.transport(),
        endpoint: format!("ns/c/{endpoint}"),
        instance_id: INSTANCE,
    }
}

fn encoded(frame: Frame) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frame.encode(&mut buf);
    buf.to_vec()
}

fn hello(version: u16) -> Vec<u8> {
    encoded(Frame::new(FrameType::Hello, 0, frame::encode_hello(version)))
}

fn request(stream_id: u64, endpoint: &str, body: &str) -> Vec<u8> {
    let head = RequestHead {
        instance_id: INSTANCE,
        window: u32::MAX,
        endpoint: format!("ns/c/{endpoint}"),
        request_id: format!("rogue-{stream_id}"),
        body: Bytes::from(body.to_string()),
    };
    encoded(Frame::new(FrameType::Request, stream_id, head.encode()))
}

/// Every frame `socket` receives until the worker closes it.
async fn frames_until_closed(socket: &mut tokio::net::TcpStream) -> Vec<Frame> {
    let mut bytes = vec![];
    tokio::time::timeout(DEADLINE, socket.read_to_end(&mut bytes))
        .await
        .expect("the worker closes the connection")
        .unwrap();
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut frames = vec![];
    while let Some(Decoded::Frame(frame)) = decoder.decode(&mut buf).unwrap() {
        frames.push(frame);
    }
    frames
}

fn refusals(metrics: &TransportMetrics, limit: &str) -> u64 {
    metrics.limit_refusals.with_label_values(&[limit]).get()
}

#[tokio::test]
async fn a_caller_speaking_another_protocol_version_is_refused_with_both_versions_named() {
    let (server, metrics) = worker_with(&[]).await;
    let mut old = tokio::net::TcpStream::connect(address(&server)).await.unwrap();
    old.write_all(&hello(99)).await.unwrap();
    old.write_all(&request(1, "echo", "hi")).await.unwrap();
    let frames = frames_until_closed(&mut old).await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0].frame_type, FrameType::Hello);
    assert_eq!(
        frame::decode_hello(&frames[0].payload).unwrap(),
        frame::PROTOCOL_VERSION
    );
    assert_eq!((frames[1].frame_type, frames[1].stream_id), (FrameType::Error, 0));
    let error =
        crate::error::RequestError::from(rmp_serde::from_slice::<crate::error::WireError>(&frames[1].payload).unwrap());
    let text = error.to_string();
    assert!(text.contains("version 99") && text.contains("version 1"), "{text}");
    assert_eq!(refusals(&metrics, "handshake"), 1);

    // The request sent after the wrong Hello never ran; a current caller is served.
    let client = default_client();
    let answer = client
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"2")))
        .await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(2));
}

#[tokio::test]
async fn a_caller_that_sends_no_hello_is_refused() {
    let (server, _) = worker_with(&[]).await;
    let mut old = tokio::net::TcpStream::connect(address(&server)).await.unwrap();
    old.write_all(&request(1, "echo", "hi")).await.unwrap();
    let frames = frames_until_closed(&mut old).await;
    let last = frames.last().unwrap();
    assert_eq!(last.frame_type, FrameType::Error);
    let text = String::from_utf8_lossy(&last.payload).to_string();
    assert!(text.contains("expected a Hello frame first"), "{text}");
}

#[tokio::test]
async fn a_worker_speaking_another_protocol_version_is_refused_with_both_versions_named() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let fake = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(&hello(2)).await.unwrap();
        let mut rest = vec![];
        let _ = socket.read_to_end(&mut rest).await;
    });
    let client = default_client();
    let target = Target {
        transport: Transport::Tcp(address),
        endpoint: "ns/c/echo".into(),
        instance_id: INSTANCE,
    };
    let error = client.call(&target, Context::new(Bytes::new())).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Protocol);
    let text = error.to_string();
    assert!(text.contains("version 2") && text.contains("version 1"), "{text}");
    drop(client);
    fake.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_keeps_neither_open_nor_new_callers_out() {
    let (server, metrics) = worker_with(&[("DYN_TCP_MAX_CONNECTIONS", "20")]).await;
    let client = default_client();
    let first = client
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"1")))
        .await;
    assert_eq!(collect(first.unwrap()).await.0, numbers(1));

    // A rogue caller opens 300 connections and holds them, saying nothing.
    let mut rogue = vec![];
    for _ in 0..300 {
        rogue.push(tokio::net::TcpStream::connect(address(&server)).await.unwrap());
    }
    // The cap holds: all but the 19 newest silent ones are cut off.
    crate::request_plane::conformance::eventually("the cap cuts off the rogue connections", || {
        refusals(&metrics, "connections") >= 281
    })
    .await;
    // The open connection is still served...
    let answer = client
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"5")))
        .await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(5));
    // ...and so is a new caller: its connection takes the place of the
    // oldest one still silent in its handshake.
    let newcomer = default_client();
    let answer = newcomer
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"3")))
        .await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(3));
    drop(rogue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_slot_is_a_working_connection_a_new_one_is_refused() {
    let (server, metrics) = worker_with(&[("DYN_TCP_MAX_CONNECTIONS", "1")]).await;
    let client = default_client();
    let first = client
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"1")))
        .await;
    assert_eq!(collect(first.unwrap()).await.0, numbers(1));
    let other = default_client();
    let refused = other
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"1")))
        .await;
    assert_eq!(refused.err().unwrap().kind(), ErrorKind::Unreachable);
    assert_eq!(refusals(&metrics, "connections"), 1);
    let answer = client
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"2")))
        .await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_cap_fail_as_overloaded_while_other_callers_are_served() {
    let (server, metrics) = worker_with(&[("DYN_TCP_MAX_STREAMS_PER_CONNECTION", "16")]).await;
    let rogue = default_client();
    let mut hanging = vec![];
    let mut overloaded = 0;
    for _ in 0..200 {
        let stream = rogue
            .call(&target(&server, "hang"), Context::new(Bytes::new()))
            .await
            .unwrap();
        let mut stream = stream;
        match tokio::time::timeout(DEADLINE, futures::StreamExt::next(&mut stream))
            .await
            .unwrap()
        {
            Some(Ok(_)) => hanging.push(stream),
            Some(Err(error)) => {
                assert_eq!(error.kind(), ErrorKind::Overloaded, "{error}");
                assert!(
                    error.to_string().contains("DYN_TCP_MAX_STREAMS_PER_CONNECTION"),
                    "{error}"
                );
                overloaded += 1;
            }
            None => panic!("a hanging stream ended"),
        }
    }
    assert_eq!((hanging.len(), overloaded), (16, 184));
    assert_eq!(refusals(&metrics, "streams"), 184);
    // Another caller (its own connection) is served meanwhile.
    let other = default_client();
    let answer = other
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"3")))
        .await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_is_cut_off_while_others_are_served() {
    let (server, metrics) =
        worker_with(&[("DYN_TCP_MAX_SEND_QUEUE", "1048576"), ("DYN_TCP_WRITE_TIMEOUT", "2s")]).await;
    let mut rogue = tokio::net::TcpStream::connect(address(&server)).await.unwrap();
    rogue.write_all(&hello(frame::PROTOCOL_VERSION)).await.unwrap();
    // 64 answers of 1 MB each, asked for with the largest window, never read.
    for stream_id in 1..=64 {
        rogue.write_all(&request(stream_id, "big", "1000000")).await.unwrap();
    }
    crate::request_plane::conformance::eventually("the worker cuts off the caller that does not read", || {
        refusals(&metrics, "send_queue") + refusals(&metrics, "write_timeout") > 0
    })
    .await;
    let client = default_client();
    let answer = client
        .call(&target(&server, "count"), Context::new(Bytes::from_static(b"3")))
        .await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(3));
    drop(rogue);
}

#[tokio::test]
async fn a_worker_that_ignores_the_window_is_cut_off() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    // A rogue worker: a correct Hello, then 1,000 items on stream 1 at once,
    // never waiting for credit.
    let rogue = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(&hello(frame::PROTOCOL_VERSION)).await.unwrap();
        let mut flood = vec![];
        for i in 0..1000u32 {
            flood.extend(encoded(Frame::new(FrameType::Data, 1, Bytes::from(i.to_string()))));
        }
        let _ = socket.write_all(&flood).await;
        let mut rest = vec![];
        let _ = socket.read_to_end(&mut rest).await;
    });
    let config = RuntimeConfig::from_vars([("DYN_TCP_STREAM_WINDOW", "8")]).unwrap();
    let client = TcpClient::new(config.tcp(), CancellationToken::new(), TaskTracker::new());
    let target = Target {
        transport: Transport::Tcp(address),
        endpoint: "ns/c/echo".into(),
        instance_id: INSTANCE,
    };
    let stream = client.call(&target, Context::new(Bytes::new())).await.unwrap();
    let (items, error) = collect(stream).await;
    // The window (and at most one batch of credit returned meanwhile) is
    // delivered; the rest is refused with the connection.
    assert!(items.len() <= 8 + 4, "{} items", items.len());
    let error = error.expect("the stream fails");
    assert_eq!(error.kind(), ErrorKind::Disconnected);
    assert!(error.to_string().contains("window"), "{error}");
    drop(client);
    rogue.abort();
}

/// A caller that drops its stream after the last item, with the worker's
/// End already received but not read, sends no Cancel: the work is done.
#[tokio::test]
async fn a_stream_dropped_after_its_end_arrived_sends_no_cancel() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let worker = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(&hello(frame::PROTOCOL_VERSION)).await.unwrap();
        // Read until the request, then answer it whole: one item and End.
        let (mut buf, mut decoder) = (bytes::BytesMut::new(), FrameDecoder::new(1 << 20));
        let stream_id = loop {
            match decoder.decode(&mut buf).unwrap() {
                Some(Decoded::Frame(frame)) if frame.frame_type == FrameType::Request => break frame.stream_id,
                Some(_) => continue,
                None => assert_ne!(socket.read_buf(&mut buf).await.unwrap(), 0, "the caller left"),
            }
        };
        let mut answer = encoded(Frame::new(FrameType::Data, stream_id, Bytes::from_static(b"last")));
        answer.extend(encoded(Frame::new(FrameType::End, stream_id, Bytes::new())));
        socket.write_all(&answer).await.unwrap();
        frames_until_closed(&mut socket).await
    });
    let shutdown = CancellationToken::new();
    let client = TcpClient::new(RuntimeConfig::local().tcp(), shutdown.clone(), TaskTracker::new());
    let target = Target {
        transport: Transport::Tcp(address),
        endpoint: "ns/c/echo".into(),
        instance_id: INSTANCE,
    };
    let mut stream = client.call(&target, Context::new(Bytes::new())).await.unwrap();
    assert_eq!(
        futures::StreamExt::next(&mut stream).await.unwrap().unwrap(),
        Bytes::from_static(b"last")
    );
    // On this single-threaded runtime the reader has queued End by now.
    drop(stream);
    // Closes the connection, so that the worker sees everything it was sent.
    shutdown.cancel();
    let after = worker.await.unwrap();
    let kinds: Vec<FrameType> = after.iter().map(|frame| frame.frame_type).collect();
    assert!(
        !kinds.contains(&FrameType::Cancel),
        "frames after the answer: {kinds:?}"
    );
}

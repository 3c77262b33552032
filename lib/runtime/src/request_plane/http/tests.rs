//! The HTTP/2 plane's tests: the shared conformance suite (plain and over
//! mutual TLS), and its limits tried by raw HTTP/2 peers (the connection and
//! stream caps, the write deadline).

use super::*;
use crate::request_plane::conformance::{PlaneKit, conformance_tests};
use futures::FutureExt;
use futures::future::BoxFuture;

struct Http;

impl PlaneKit for Http {
    fn server(
        &self,
        config: RuntimeConfig,
        handlers: Arc<Handlers>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
        async move {
            let server = HttpServer::bind(
                config.http(),
                *config.tcp().max_message_size(),
                config.tcp().tls().as_ref(),
                HttpLimits::unlimited(),
                handlers,
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
        async move { Arc::new(HttpClient::new(&config)) as Arc<dyn RequestClient> }.boxed()
    }
}

conformance_tests!(Http);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_while_open_ones_keep_working() {
    let limits = HttpLimits {
        max_connections: Some(5),
        max_streams_per_connection: Some(64),
        ..HttpLimits::unlimited()
    };
    let refused = limits.metrics.limit_refusals.with_label_values(&["connections"]);
    let config = RuntimeConfig::default();
    let server = HttpServer::bind(
        config.http(),
        *config.tcp().max_message_size(),
        None,
        limits,
        Fixtures::default().handlers(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
    .unwrap();
    let client = HttpClient::new(&config);
    let target = count_target(&server);
    let first = client.call(&target, Context::new(Bytes::from_static(b"1"))).await;
    assert_eq!(collect(first.unwrap()).await.0, numbers(1));
    let Transport::Http(base) = server.transport() else {
        unreachable!("an HTTP server")
    };
    let address = base.trim_start_matches("http://").to_string();
    let mut rogue = vec![];
    for _ in 0..100 {
        rogue.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    eventually("the cap refuses the rogue connections", || refused.get() >= 96).await;
    let answer = client.call(&target, Context::new(Bytes::from_static(b"5"))).await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(5));
    drop(rogue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_keeps_no_new_caller_out() {
    let (server, _, metrics) = plane_with(HttpLimits {
        max_connections: Some(20),
        ..HttpLimits::unlimited()
    })
    .await;
    let Transport::Http(base) = server.transport() else {
        unreachable!("an HTTP server")
    };
    // A rogue opens 300 connections and holds them, saying nothing.
    let mut rogue = vec![];
    for _ in 0..300 {
        rogue.push(
            tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
                .await
                .unwrap(),
        );
    }
    let refused = metrics.limit_refusals.with_label_values(&["connections"]);
    eventually("the cap cuts off the rogue connections", || refused.get() >= 280).await;
    // A new caller's connection takes the place of the oldest silent one.
    a_caller_is_served(&server).await;
    drop(rogue);
}

/// A rogue HTTP/2 caller speaking raw frames, so that it can ignore the
/// server's settings and flow control as an attacker would.
struct RawH2 {
    socket: tokio::net::TcpStream,
    next_stream: u32,
}

impl RawH2 {
    /// Connects, exchanges SETTINGS (ours empty: the default 64 KiB
    /// window, never raised) and acknowledges the server's.
    async fn connect(server: &HttpServer) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Transport::Http(base) = server.transport() else {
            unreachable!("an HTTP server")
        };
        let mut socket = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
            .await
            .unwrap();
        socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        socket.write_all(&Self::frame(0x4, 0, 0, &[])).await.unwrap();
        let mut header = [0u8; 9];
        socket.read_exact(&mut header).await.unwrap();
        assert_eq!(header[3], 0x4, "the server opens with SETTINGS");
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        socket.read_exact(&mut vec![0; length]).await.unwrap();
        socket.write_all(&Self::frame(0x4, 0x1, 0, &[])).await.unwrap();
        Self { socket, next_stream: 1 }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    /// The frames of one POST to `endpoint` with `body` (HPACK literals
    /// without indexing, so every request stands alone).
    fn post(&mut self, endpoint: &str, body: &[u8]) -> Vec<u8> {
        let literal = |out: &mut Vec<u8>, text: &str| {
            out.push(text.len() as u8);
            out.extend(text.as_bytes());
        };
        let mut headers = vec![0x83, 0x86]; // :method POST, :scheme http
        headers.push(0x04); // :path, by its static index
        literal(&mut headers, &format!("/v1/rpc/{endpoint}"));
        headers.push(0x01); // :authority
        literal(&mut headers, "127.0.0.1");
        headers.push(0x00);
        literal(&mut headers, INSTANCE_HEADER);
        literal(&mut headers, &format!("{INSTANCE:x}"));
        let stream = self.next_stream;
        self.next_stream += 2;
        if body.is_empty() {
            // END_HEADERS | END_STREAM
            Self::frame(0x1, 0x5, stream, &headers)
        } else {
            let mut frames = Self::frame(0x1, 0x4, stream, &headers);
            frames.extend(Self::frame(0x0, 0x1, stream, body));
            frames
        }
    }
}

use crate::request_plane::conformance::{Fixtures, INSTANCE, collect, eventually, numbers};

async fn plane_with(limits: HttpLimits) -> (HttpServer, Arc<Handlers>, TransportMetrics) {
    let config = RuntimeConfig::default();
    let handlers = Fixtures::default().handlers();
    let metrics = limits.metrics.clone();
    let server = HttpServer::bind(
        config.http(),
        *config.tcp().max_message_size(),
        None,
        limits,
        handlers.clone(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
    .unwrap();
    (server, handlers, metrics)
}

/// The fixtures' `count` endpoint on `server`.
fn count_target(server: &HttpServer) -> Target {
    Target {
        transport: server.transport(),
        endpoint: "ns/c/count".into(),
        instance_id: INSTANCE,
    }
}

/// A legitimate caller, on a connection of its own, gets `count n`.
async fn a_caller_is_served(server: &HttpServer) {
    let client = HttpClient::new(&RuntimeConfig::default());
    let target = count_target(server);
    let answer = client.call(&target, Context::new(Bytes::from_static(b"5"))).await;
    assert_eq!(collect(answer.unwrap()).await.0, numbers(5));
}

/// Reads what the server sends until it closes the connection; returns
/// how many frames of each type (HEADERS = 1, RST_STREAM = 3, GOAWAY = 7)
/// came, and the RST_STREAM error codes.
async fn frames_until_closed(reader: &mut tokio::net::tcp::OwnedReadHalf) -> (HashMap<u8, usize>, Vec<u32>) {
    use tokio::io::AsyncReadExt;
    let mut all = vec![];
    tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut all))
        .await
        .expect("the server closes the rogue's connection")
        .unwrap();
    let (mut kinds, mut resets) = (HashMap::new(), vec![]);
    let mut at = 0;
    while at + 9 <= all.len() {
        let length = u32::from_be_bytes([0, all[at], all[at + 1], all[at + 2]]) as usize;
        let kind = all[at + 3];
        *kinds.entry(kind).or_default() += 1;
        if kind == 0x3 && at + 13 <= all.len() {
            resets.push(u32::from_be_bytes(all[at + 9..at + 13].try_into().unwrap()));
        }
        at += 9 + length;
    }
    (kinds, resets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_on_one_connection_are_held_to_the_stream_cap_and_a_caller_is_served() {
    use tokio::io::AsyncWriteExt;
    const CAP: usize = 100;
    let (server, handlers, _) = plane_with(HttpLimits {
        max_streams_per_connection: Some(CAP as u32),
        ..HttpLimits::unlimited()
    })
    .await;
    let mut rogue = RawH2::connect(&server).await;
    // First as many requests as the cap allows, each holding its stream...
    let mut first = vec![];
    for _ in 0..CAP {
        first.extend(rogue.post("ns/c/hang", b""));
    }
    let mut later = vec![];
    for _ in CAP..10_000 {
        later.extend(rogue.post("ns/c/hang", b""));
    }
    let (mut reader, mut writer) = rogue.socket.into_split();
    writer.write_all(&first).await.unwrap();
    eventually("the first streams run", || handlers.inflight("ns/c/hang") == CAP).await;
    // ...then 9,900 more at once, whatever SETTINGS_MAX_CONCURRENT_STREAMS says.
    let flood = tokio::spawn(async move {
        // The server may close the connection before taking them all.
        let _ = writer.write_all(&later).await;
        writer
    });
    let reading = tokio::spawn(async move { frames_until_closed(&mut reader).await });
    let mut most = 0;
    while !reading.is_finished() {
        most = most.max(handlers.inflight("ns/c/hang"));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (kinds, resets) = reading.await.unwrap();
    println!("frames from the server: {kinds:?}; at most {most} streams ran at once");
    assert!(
        most <= CAP,
        "{most} streams ran on one connection, over the cap of {CAP}"
    );
    let answered = kinds.get(&0x1).copied().unwrap_or_default();
    assert!(
        answered <= CAP,
        "{answered} of the streams were answered, over the cap of {CAP}"
    );
    // Streams over the cap are refused (REFUSED_STREAM), and a peer that
    // keeps opening them loses its connection (GOAWAY, ENHANCE_YOUR_CALM).
    assert!(resets.contains(&0x7), "no stream was refused: {resets:?}");
    assert_eq!(kinds.get(&0x7), Some(&1), "no GOAWAY");
    eventually("the rogue's streams are gone with its connection", || {
        handlers.inflight("ns/c/hang") == 0
    })
    .await;
    a_caller_is_served(&server).await;
    drop(flood.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_is_cut_off_at_the_write_timeout_and_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let (server, handlers, metrics) = plane_with(HttpLimits {
        write_timeout: Some(Duration::from_millis(300)),
        ..HttpLimits::unlimited()
    })
    .await;
    // A million items on each of ten streams, and never a WINDOW_UPDATE
    // nor a read: the server can send 64 KiB, then must wait.
    let mut rogue = RawH2::connect(&server).await;
    for _ in 0..10 {
        let frames = rogue.post("ns/c/count", b"1000000");
        rogue.socket.write_all(&frames).await.unwrap();
    }
    eventually("the rogue's streams run", || handlers.inflight("ns/c/count") > 0).await;
    eventually("the stalled streams are cut off at the write timeout", || {
        metrics.limit_refusals.with_label_values(&["write_timeout"]).get() >= 10 && handlers.inflight("ns/c/count") == 0
    })
    .await;
    a_caller_is_served(&server).await;
    drop(rogue);
}

/// The same suite, and the attacks on TLS, with mutual TLS on both sides.
mod over_mutual_tls {
    use super::Http;
    use crate::request_plane::conformance::{MutualTls, conformance_tests};
    use crate::request_plane::tls_suite::mutual_tls_tests;

    conformance_tests!(MutualTls(Http));
    mutual_tls_tests!(Http);
}

/// Frames queued together leave as one body chunk, up to `CHUNK` bytes;
/// a frame alone, or one larger than a chunk, leaves as it is.
#[tokio::test]
async fn frames_queued_together_leave_in_one_chunk_up_to_the_chunk_size() {
    let (sender, queue) = mpsc::channel::<Queued>(BODY_QUEUE);
    let mut chunks = BodyChunks { queue, carry: None };
    let send = |frame: &Bytes| {
        sender
            .try_send(Queued {
                frame: frame.clone(),
                _budget: None,
            })
            .unwrap()
    };
    let small = |byte: u8| frame(FrameType::Data, &[byte; 10]);

    send(&small(1));
    assert_eq!(chunks.next().await.unwrap(), small(1));

    for byte in 1..=3 {
        send(&small(byte));
    }
    assert_eq!(chunks.next().await.unwrap(), [small(1), small(2), small(3)].concat());

    // Half a chunk, then two more: the third does not fit and waits.
    let half = |byte: u8| frame(FrameType::Data, &vec![byte; CHUNK / 2 - 5]);
    for byte in 1..=3 {
        send(&half(byte));
    }
    assert_eq!(chunks.next().await.unwrap(), [half(1), half(2)].concat());
    assert_eq!(chunks.next().await.unwrap(), half(3));

    // Larger than a chunk: alone, before and after smaller ones.
    let big = frame(FrameType::Data, &vec![7; CHUNK * 2]);
    send(&small(1));
    send(&big);
    send(&small(2));
    assert_eq!(chunks.next().await.unwrap(), small(1));
    assert_eq!(chunks.next().await.unwrap(), big);
    assert_eq!(chunks.next().await.unwrap(), small(2));

    drop(sender);
    assert!(chunks.next().await.is_none());
}

/// An answer whose frames are all queued (ready at once) goes out as one
/// chunk when it fits one; a larger one is streamed, in order, nothing lost.
#[tokio::test]
async fn a_finished_answer_is_one_chunk_when_it_fits_and_streamed_in_order_when_not() {
    let queued = |frames: &[Bytes]| {
        let (sender, queue) = mpsc::channel::<Queued>(BODY_QUEUE);
        for frame in frames {
            let queued = Queued {
                frame: frame.clone(),
                _budget: None,
            };
            sender.try_send(queued).unwrap();
        }
        queue
    };
    let small = |byte: u8| frame(FrameType::Data, &[byte; 10]);
    let end = frame(FrameType::End, &[]);

    let whole = [small(1), end.clone()];
    let body = finished_body(queued(&whole));
    assert_eq!(hyper::body::Body::size_hint(&body).exact(), Some(20), "one chunk");
    assert_eq!(body.collect().await.unwrap().to_bytes(), whole.concat());

    let big = frame(FrameType::Data, &vec![7; CHUNK]);
    let streamed = [small(1), small(2), big, small(3), end];
    let body = finished_body(queued(&streamed));
    assert_eq!(hyper::body::Body::size_hint(&body).exact(), None, "streamed");
    assert_eq!(body.collect().await.unwrap().to_bytes(), streamed.concat());
}

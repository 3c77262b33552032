//! The floor side of the cross-process bench: the floor process, which
//! serves the bare transports (a blocking TCP echo and stream, a bare hyper
//! h2c server, NATS responders), and the caller's measurements of them.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use crate::{
    CALLERS, MESSAGE, NATS_ECHO, NATS_STREAM, Rates, RoundTrips, Sizes, callers_rate, median_rate, on_worker_thread,
    timed,
};

// ------------------------------------------------------------ the process

/// The floor process: a blocking TCP server, a bare hyper h2c server and
/// NATS responders. Prints `tcp_port http_port` once all three listen, and
/// exits when its standard input closes.
pub(crate) fn run(nats_url: &str) -> anyhow::Result<()> {
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let tcp_port = tcp.local_addr()?.port();
    std::thread::spawn(move || {
        for socket in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = serve_raw(socket);
            });
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http_port = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(serve_hyper(listener));
        let client = async_nats::connect(nats_url).await?;
        serve_nats(client).await?;
        anyhow::Ok(port)
    })?;
    println!("{tcp_port} {http_port}");
    std::io::stdout().flush()?;
    // Runs until the caller closes our standard input (or dies).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// One raw connection: the first byte picks echo (`E`: 100-byte messages
/// back, until the peer closes) or stream (`S`: a `u64` count, then that
/// many items, each `len:u32be` + `u64`, as the TCP plane frames them).
fn serve_raw(mut socket: TcpStream) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    socket.read_exact(&mut mode)?;
    if mode[0] == b'E' {
        let mut buf = [0u8; MESSAGE];
        loop {
            socket.read_exact(&mut buf)?;
            socket.write_all(&buf)?;
        }
    }
    let mut count = [0u8; 8];
    loop {
        socket.read_exact(&mut count)?;
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, &socket);
        for i in 0..u64::from_be_bytes(count) {
            out.write_all(&8u32.to_be_bytes())?;
            out.write_all(&i.to_be_bytes())?;
        }
        out.flush()?;
    }
}

/// Bare hyper over h2c: `/echo` answers the body; `/stream/N` streams N
/// twelve-byte data frames.
async fn serve_hyper(listener: tokio::net::TcpListener) {
    while let Ok((socket, _)) = listener.accept().await {
        let _ = socket.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                let path = request.uri().path().to_string();
                let body = match path.strip_prefix("/stream/").map(str::parse::<u64>) {
                    Some(Ok(n)) => {
                        let frames = futures::stream::iter(0..n).map(|i| {
                            let mut item = Vec::with_capacity(12);
                            item.extend_from_slice(&8u32.to_be_bytes());
                            item.extend_from_slice(&i.to_be_bytes());
                            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(item)))
                        });
                        BodyExt::boxed(StreamBody::new(frames))
                    }
                    _ => {
                        let bytes = request.into_body().collect().await?.to_bytes();
                        Full::new(bytes).map_err(|never| match never {}).boxed()
                    }
                };
                Ok::<_, hyper::Error>(hyper::Response::new(body))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// NATS responders: `floor.echo` answers the payload; `floor.stream` sends
/// N messages (`u64` items) to the reply subject, then an empty one.
async fn serve_nats(client: async_nats::Client) -> anyhow::Result<()> {
    let mut echo = client.subscribe(NATS_ECHO).await?;
    let mut stream = client.subscribe(NATS_STREAM).await?;
    let (echo_client, stream_client) = (client.clone(), client.clone());
    tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = echo_client.publish(reply, message.payload).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(message) = stream.next().await {
            let (Some(reply), Ok(count)) = (message.reply, <[u8; 8]>::try_from(&message.payload[..])) else {
                continue;
            };
            for i in 0..u64::from_be_bytes(count) {
                let _ = stream_client
                    .publish(reply.clone(), Bytes::copy_from_slice(&i.to_be_bytes()))
                    .await;
            }
            let _ = stream_client.publish(reply, Bytes::new()).await;
        }
    });
    client.flush().await?;
    Ok(())
}

// ------------------------------------------------------------ measurements

/// A raw connection to the floor process, in `mode` (`E` echo, `S` stream).
fn connect_raw(address: SocketAddr, mode: u8) -> std::io::Result<TcpStream> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_nodelay(true)?;
    socket.write_all(&[mode])?;
    Ok(socket)
}

/// One blocking 100-byte round trip.
fn raw_round_trip(socket: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [7u8; MESSAGE];
    socket.write_all(&buf)?;
    socket.read_exact(&mut buf)
}

/// `n` timed blocking round trips.
fn raw_round_trips(socket: &mut TcpStream, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        raw_round_trip(socket)?;
        times.push(start.elapsed());
    }
    Ok(times)
}

/// The TCP floor: blocking sockets on threads, as the floor process serves them.
fn measure_tcp_floor(address: SocketAddr, sizes: Sizes) -> std::io::Result<Rates> {
    let connect = |mode| connect_raw(address, mode);
    let mut stream = BufReader::with_capacity(64 * 1024, connect(b'S')?);
    let mut one_stream = || -> std::io::Result<()> {
        stream.get_mut().write_all(&sizes.stream_items.to_be_bytes())?;
        let mut item = [0u8; 12];
        for i in 0..sizes.stream_items {
            stream.read_exact(&mut item)?;
            if item[4..] != i.to_be_bytes() {
                return Err(std::io::Error::other("raw stream out of order"));
            }
        }
        Ok(())
    };
    one_stream()?;
    let mut rates = Vec::with_capacity(sizes.stream_runs);
    for _ in 0..sizes.stream_runs {
        let start = Instant::now();
        one_stream()?;
        rates.push(sizes.stream_items as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let items_per_second = rates[sizes.stream_runs / 2];

    // One connection and one thread per caller: the floor has no multiplexing.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            let mut socket = connect(b'E');
            std::thread::spawn(move || -> std::io::Result<()> {
                let socket = socket
                    .as_mut()
                    .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                while !stop.load(Ordering::Relaxed) {
                    raw_round_trip(socket)?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(sizes.callers_for);
    stop.store(true, Ordering::Relaxed);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("a caller thread panicked"))??;
    }
    Ok(Rates {
        items_per_second,
        requests_per_second: counted as f64 / elapsed.as_secs_f64(),
    })
}

/// One bare hyper request; returns the bytes of the response body.
async fn call(sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>, uri: &str, body: Bytes) -> usize {
    let request = hyper::Request::post(uri)
        .body(Full::new(body))
        .expect("a valid request");
    let response = sender.clone().send_request(request).await.expect("hyper call");
    let mut body = response.into_body();
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("hyper body").into_data() {
            bytes += data.len();
        }
    }
    bytes
}

/// A bare hyper h2c connection to the floor process, as the plane keeps one per worker.
async fn hyper_sender(address: SocketAddr) -> anyhow::Result<HyperSender> {
    let socket = tokio::net::TcpStream::connect(address).await?;
    socket.set_nodelay(true)?;
    // The plane's windows (request_plane/http.rs): with h2's defaults a fast
    // stream of small frames exhausts the receiver's small-frame budget.
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024)
        .handshake::<_, Full<Bytes>>(TokioIo::new(socket))
        .await?;
    tokio::spawn(connection);
    Ok(sender)
}

type HyperSender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// `n` timed bare hyper echo calls.
async fn hyper_round_trips(sender: HyperSender, address: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let (uri, message) = (format!("http://{address}/echo"), Bytes::from(vec![b'x'; MESSAGE]));
    Ok(timed(n, || {
        let (sender, uri, message) = (sender.clone(), uri.clone(), message.clone());
        async move {
            call(&sender, &uri, message).await;
        }
    })
    .await)
}

/// The HTTP/2 floor's throughput.
async fn measure_http_floor(sender: HyperSender, address: SocketAddr, sizes: Sizes) -> anyhow::Result<Rates> {
    let base = format!("http://{address}");
    let echo_uri = format!("{base}/echo");
    let message = Bytes::from(vec![b'x'; MESSAGE]);
    let stream_uri = format!("{base}/stream/{}", sizes.stream_items);
    let items_per_second = median_rate(sizes.stream_runs, sizes.stream_items, || {
        let (sender, uri) = (sender.clone(), stream_uri.clone());
        async move {
            let bytes = call(&sender, &uri, Bytes::new()).await;
            assert_eq!(bytes as u64, sizes.stream_items * 12, "the hyper stream ended early");
        }
    })
    .await;
    let requests_per_second = callers_rate(sizes.callers_for, move || {
        let (sender, uri, message) = (sender.clone(), echo_uri.clone(), message.clone());
        async move {
            call(&sender, &uri, message).await;
        }
    })
    .await;
    Ok(Rates {
        items_per_second,
        requests_per_second,
    })
}

/// A NATS client of the floor. Its streams have no flow control (the
/// plane's have credit): room for a whole stream, so that NATS drops
/// nothing for a slow reader.
async fn nats_floor_client(url: String, sizes: Sizes) -> anyhow::Result<async_nats::Client> {
    Ok(async_nats::ConnectOptions::new()
        .subscription_capacity(2 * sizes.stream_items as usize)
        .connect(url)
        .await?)
}

/// `n` timed async-nats request-replies.
async fn nats_round_trips(client: async_nats::Client, n: usize) -> anyhow::Result<Vec<Duration>> {
    let message = Bytes::from(vec![b'x'; MESSAGE]);
    Ok(timed(n, || {
        let (client, message) = (client.clone(), message.clone());
        async move {
            client.request(NATS_ECHO, message).await.expect("nats request");
        }
    })
    .await)
}

/// The NATS floor's throughput: a stream of messages to an inbox, and request-reply.
async fn measure_nats_floor(client: async_nats::Client, sizes: Sizes) -> anyhow::Result<Rates> {
    let message = Bytes::from(vec![b'x'; MESSAGE]);
    let items = sizes.stream_items;
    let items_per_second = median_rate(sizes.stream_runs, items, || {
        let client = client.clone();
        async move {
            let inbox = client.new_inbox();
            let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
            client
                .publish_with_reply(NATS_STREAM, inbox, Bytes::copy_from_slice(&items.to_be_bytes()))
                .await
                .expect("publish");
            let mut n = 0;
            while let Some(reply) = replies.next().await {
                if reply.payload.is_empty() {
                    break;
                }
                n += 1;
            }
            assert_eq!(n, items, "the NATS stream ended early");
        }
    })
    .await;
    let requests_per_second = callers_rate(sizes.callers_for, move || {
        let (client, message) = (client.clone(), message.clone());
        async move {
            client.request(NATS_ECHO, message).await.expect("nats request");
        }
    })
    .await;
    Ok(Rates {
        items_per_second,
        requests_per_second,
    })
}

/// The caller's way to one plane's floor, opened once and shared by the
/// floor's unary and throughput measures.
pub(crate) enum FloorClient {
    /// The floor process's TCP address: a connection per measure (each
    /// picks its mode when it connects).
    Tcp(SocketAddr),
    /// One bare hyper h2c connection, and the floor's address.
    Http(HyperSender, SocketAddr),
    Nats(async_nats::Client),
}

impl FloorClient {
    /// Connects to the floor of `plane` ("tcp", "http" or "nats").
    pub(crate) fn open(
        rt: &tokio::runtime::Runtime,
        plane: &str,
        tcp: SocketAddr,
        http: SocketAddr,
        nats_url: &str,
        sizes: Sizes,
    ) -> anyhow::Result<Self> {
        Ok(match plane {
            "tcp" => Self::Tcp(tcp),
            "http" => Self::Http(on_worker_thread(rt, hyper_sender(http))?, http),
            _ => Self::Nats(on_worker_thread(rt, nats_floor_client(nats_url.to_string(), sizes))?),
        })
    }

    /// Timed unary round trips, `n` per call.
    pub(crate) fn round_trips<'a>(&self, rt: &'a tokio::runtime::Runtime) -> anyhow::Result<RoundTrips<'a>> {
        Ok(match self {
            Self::Tcp(address) => {
                let mut socket = connect_raw(*address, b'E')?;
                Box::new(move |n| raw_round_trips(&mut socket, n))
            }
            Self::Http(sender, address) => {
                let (sender, address) = (sender.clone(), *address);
                Box::new(move |n| on_worker_thread(rt, hyper_round_trips(sender.clone(), address, n)))
            }
            Self::Nats(client) => {
                let client = client.clone();
                Box::new(move |n| on_worker_thread(rt, nats_round_trips(client.clone(), n)))
            }
        })
    }

    /// One stream's items per second, and requests per second from many callers.
    pub(crate) fn rates(self, rt: &tokio::runtime::Runtime, sizes: Sizes) -> anyhow::Result<Rates> {
        match self {
            Self::Tcp(address) => Ok(measure_tcp_floor(address, sizes)?),
            Self::Http(sender, address) => on_worker_thread(rt, measure_http_floor(sender, address, sizes)),
            Self::Nats(client) => on_worker_thread(rt, measure_nats_floor(client, sizes)),
        }
    }
}

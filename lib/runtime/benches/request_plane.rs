//! Request-plane benchmarks over loopback, for the tcp, http and nats planes,
//! next to a raw tokio TCP baseline:
//!
//! - `round_trip/raw_tcp_ping_pong`: 100-byte echo on a plain tokio socket;
//! - `round_trip/{plane}_unary`: a 100-byte string through `PushRouter` →
//!   request plane → echo engine, until the stream ends;
//! - `streaming/{plane}_items_per_second`: one stream of 100,000 small items.
//!
//! `tcp+mtls` and `http+mtls` are the same planes with mutual TLS on both
//! sides (a throw-away CA made with `openssl`), for the TLS on/off ratio.
//!
//! NATS runs on a local `nats-server` started by the bench.
//!
//! After criterion, a percentile pass prints p50/p90/p99 of both round trips
//! and their ratio (criterion reports means). Run with:
//!
//! ```text
//! cargo bench -p switchyard-runtime --bench request_plane
//! ```

use criterion::{Criterion, Throughput};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::{MemDiscovery, MemRegistry};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::RequestError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::Runtime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const MESSAGE: usize = 100;
const STREAM_ITEMS: u64 = 100_000;

/// Answers with the request itself.
struct Echo;

#[async_trait::async_trait]
impl AsyncEngine<String, String> for Echo {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        Ok(Box::pin(futures::stream::iter([Ok(request.into_parts().0)])))
    }
}

/// Streams `0..n`.
struct Counter;

#[async_trait::async_trait]
impl AsyncEngine<u64, u64> for Counter {
    async fn generate(&self, request: Context<u64>) -> Result<ResponseStream<u64>, RequestError> {
        Ok(Box::pin(futures::stream::iter((0..*request.data()).map(Ok))))
    }
}

fn process(registry: &MemRegistry, vars: &[(&str, &str)]) -> DistributedRuntime {
    let mut all = vec![("DYN_DISCOVERY_BACKEND", "mem")];
    all.extend_from_slice(vars);
    let config = RuntimeConfig::from_vars(all).unwrap();
    DistributedRuntime::with_discovery(Runtime::new(config), Arc::new(MemDiscovery::new(registry.clone()))).unwrap()
}

struct Routers {
    echo: PushRouter<String, String>,
    counter: PushRouter<u64, u64>,
}

/// A worker on the plane set by `vars`, serving `echo` and `counter`, and a
/// caller with a router to each.
async fn start_mesh(vars: &[(&str, &str)]) -> Routers {
    let registry = MemRegistry::new();
    let worker = process(&registry, vars);
    let component = worker.namespace("bench").unwrap().component("worker").unwrap();
    component
        .endpoint("echo")
        .endpoint_builder()
        .handler(Echo)
        .spawn()
        .await
        .unwrap();
    component
        .endpoint("counter")
        .endpoint_builder()
        .handler(Counter)
        .spawn()
        .await
        .unwrap();
    let caller = process(&registry, vars);
    let component = caller.namespace("bench").unwrap().component("worker").unwrap();
    let echo = component.endpoint("echo").client().await.unwrap();
    let counter = component.endpoint("counter").client().await.unwrap();
    Routers {
        echo: PushRouter::from_client(echo, RouterMode::RoundRobin).await.unwrap(),
        counter: PushRouter::from_client(counter, RouterMode::RoundRobin).await.unwrap(),
    }
}

/// A plain tokio echo server and a connected client socket.
async fn start_raw_echo() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.set_nodelay(true).unwrap();
        let mut buf = [0u8; MESSAGE];
        while socket.read_exact(&mut buf).await.is_ok() {
            if socket.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let socket = TcpStream::connect(address).await.unwrap();
    socket.set_nodelay(true).unwrap();
    socket
}

async fn raw_round_trip(socket: &mut TcpStream) {
    let mut buf = [7u8; MESSAGE];
    socket.write_all(&buf).await.unwrap();
    socket.read_exact(&mut buf).await.unwrap();
}

async fn unary_round_trip(router: &PushRouter<String, String>, message: &str) {
    let mut stream = router.generate(message.to_string().into()).await.unwrap();
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bench_round_trip(c: &mut Criterion, rt: &tokio::runtime::Runtime, planes: &[(&str, Routers)]) {
    let message = "x".repeat(MESSAGE);
    let mut group = c.benchmark_group("round_trip");
    let socket = rt.block_on(start_raw_echo());
    let socket = tokio::sync::Mutex::new(socket);
    group.bench_function("raw_tcp_ping_pong", |b| {
        b.to_async(rt)
            .iter(|| async { raw_round_trip(&mut *socket.lock().await).await })
    });
    for (plane, routers) in planes {
        group.bench_function(format!("{plane}_unary"), |b| {
            b.to_async(rt).iter(|| unary_round_trip(&routers.echo, &message))
        });
    }
    group.finish();
}

fn bench_streaming(c: &mut Criterion, rt: &tokio::runtime::Runtime, planes: &[(&str, Routers)]) {
    let mut group = c.benchmark_group("streaming");
    group.throughput(Throughput::Elements(STREAM_ITEMS));
    group.sample_size(10);
    for (plane, routers) in planes {
        group.bench_function(format!("{plane}_items_per_second"), |b| {
            b.to_async(rt).iter(|| async {
                let mut stream = routers.counter.generate(STREAM_ITEMS.into()).await.unwrap();
                let mut n = 0;
                while let Some(item) = stream.next().await {
                    item.unwrap();
                    n += 1;
                }
                assert_eq!(n, STREAM_ITEMS);
            })
        });
    }
    group.finish();
}

/// p50/p90/p99 of `samples` timed runs of `op`, after a warm-up.
async fn percentiles(samples: usize, mut op: impl AsyncFnMut()) -> [Duration; 3] {
    for _ in 0..samples / 10 {
        op().await;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        op().await;
        times.push(start.elapsed());
    }
    times.sort();
    [50, 90, 99].map(|p| times[samples * p / 100])
}

fn print_percentiles(rt: &tokio::runtime::Runtime, planes: &[(&str, Routers)]) {
    const SAMPLES: usize = 20_000;
    let message = "x".repeat(MESSAGE);
    let rows = rt.block_on(async {
        let mut rows = vec![];
        let mut socket = start_raw_echo().await;
        rows.push((
            "raw tokio TCP ping-pong".to_string(),
            percentiles(SAMPLES, async || raw_round_trip(&mut socket).await).await,
        ));
        for (plane, routers) in planes {
            let timing = percentiles(SAMPLES, async || unary_round_trip(&routers.echo, &message).await).await;
            rows.push((format!("switchyard unary, {plane}"), timing));
        }
        rows
    });
    println!("\nround trip over loopback, {SAMPLES} samples each (µs)");
    println!("| case | p50 | p90 | p99 | p50 / raw |");
    println!("|---|---|---|---|---|");
    let raw = rows[0].1[0].as_secs_f64();
    for (name, [p50, p90, p99]) in &rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.2} |",
            p50.as_secs_f64() * 1e6,
            p90.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            p50.as_secs_f64() / raw
        );
    }
}

fn main() {
    let rt = tokio_runtime();
    let nats = switchyard_test_support::nats_server::NatsServer::start();
    let url = nats.url();
    let certs = switchyard_test_support::etcd_server::TestCertificates::generate();
    let (ca, cert, key) = (
        certs.ca.display().to_string(),
        certs.server_cert.display().to_string(),
        certs.server_key.display().to_string(),
    );
    let tls = [
        ("DYN_REQUEST_PLANE_TLS_CA_PATH", ca.as_str()),
        ("DYN_REQUEST_PLANE_TLS_CERT_PATH", cert.as_str()),
        ("DYN_REQUEST_PLANE_TLS_KEY_PATH", key.as_str()),
    ];
    let planes = rt.block_on(async {
        vec![
            ("tcp", start_mesh(&[]).await),
            ("tcp+mtls", start_mesh(&tls).await),
            ("http", start_mesh(&[("DYN_REQUEST_PLANE", "http")]).await),
            (
                "http+mtls",
                start_mesh(&[&tls[..], &[("DYN_REQUEST_PLANE", "http")]].concat()).await,
            ),
            (
                "nats",
                start_mesh(&[("DYN_REQUEST_PLANE", "nats"), ("NATS_SERVER", &url)]).await,
            ),
        ]
    });
    let mut c = Criterion::default().configure_from_args();
    bench_round_trip(&mut c, &rt, &planes);
    bench_streaming(&mut c, &rt, &planes);
    c.final_summary();
    // `cargo test --all-targets` runs benches once as a smoke test, without `--bench`.
    if std::env::args().any(|arg| arg == "--bench") {
        print_percentiles(&rt, &planes);
    }
}

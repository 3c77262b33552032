//! Every request plane across processes, beside the floor of its own
//! transport measured in the same run: a worker process and a caller process
//! as users run them (file discovery, the public API of the README), and a
//! floor process serving bare transports to the same caller.
//!
//! - tcp: the TCP plane beside a blocking-socket ping-pong (`TCP_NODELAY`,
//!   100 bytes) and a raw stream of length-prefixed items;
//! - http: the HTTP/2 plane beside a bare hyper h2c client and server;
//! - nats: the NATS plane beside async-nats request-reply (and a stream of
//!   messages to an inbox) on the same `nats-server`.
//!
//! For each: unary p50/p90/p99 (100 bytes, round trip until the stream
//! ends), one stream's items per second (`u64` items), and requests per
//! second with 32 concurrent callers (one-item requests), each with its
//! ratio to the floor. Run with:
//!
//! ```text
//! cargo bench -p switchyard-runtime --bench cross_process
//! ```
//!
//! Naming planes after `--` (`-- tcp nats`) measures only those.
//! `DYN_RUNTIME_NUM_WORKER_THREADS=N` sets the runtime threads of both the
//! worker and the caller (default: one per core).
//!
//! Without `--bench` (as `cargo test --bench '*'` runs it) every measurement
//! runs for a moment only, so the bench cannot rot unnoticed; nothing is
//! asserted on time.
//!
//! The same binary is the worker and the floor process: the caller starts
//! it again with `worker` or `floor` as its first argument.

use futures::StreamExt;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::RequestError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::worker::Worker;
use switchyard_test_support::RemovedOnDrop;
use tokio::time::Instant;

mod floor;
use floor::FloorClient;

/// The allocator the `switchyard` binary uses (docs/adr/0014-mimalloc-in-the-binaries.md):
/// the worker and caller processes here should run as ours do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Request size of the unary round trips (the issue's yardstick).
const MESSAGE: usize = 100;
/// Concurrent callers of the throughput measure.
const CALLERS: usize = 32;
/// NATS subjects of the floor process's responders.
const NATS_ECHO: &str = "floor.echo";
const NATS_STREAM: &str = "floor.stream";
/// How long the caller waits for a child process to be ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// How much to measure: the full run, or a moment of each (`cargo test`).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    samples: usize,
    stream_items: u64,
    /// Streams per measure; the median is reported.
    stream_runs: usize,
    callers_for: Duration,
}

impl Sizes {
    fn from_args() -> Self {
        if std::env::args().any(|arg| arg == "--bench") {
            Self {
                samples: 20_000,
                stream_items: 100_000,
                stream_runs: 5,
                callers_for: Duration::from_secs(3),
            }
        } else {
            Self {
                samples: 200,
                stream_items: 2_000,
                stream_runs: 1,
                callers_for: Duration::from_millis(200),
            }
        }
    }
}

// ---------------------------------------------------------------- the worker

/// Answers with the request itself.
#[derive(Debug)]
struct Echo;

#[async_trait::async_trait]
impl AsyncEngine<String, String> for Echo {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        Ok(Box::pin(futures::stream::iter([Ok(request.into_parts().0)])))
    }
}

/// Streams `0..n`.
#[derive(Debug)]
struct Counter;

#[async_trait::async_trait]
impl AsyncEngine<u64, u64> for Counter {
    async fn generate(&self, request: Context<u64>) -> Result<ResponseStream<u64>, RequestError> {
        Ok(Box::pin(futures::stream::iter((0..*request.data()).map(Ok))))
    }
}

/// The worker process: serves `bench/worker/{echo,counter}` on the plane
/// its environment names, until SIGTERM.
fn worker() -> anyhow::Result<()> {
    Worker::from_settings()?.execute(async |rt: Runtime| {
        let drt = DistributedRuntime::from_settings(rt).await?;
        let component = drt.namespace("bench")?.component("worker")?;
        let _echo = component
            .endpoint("echo")
            .endpoint_builder()
            .handler(Echo)
            .spawn()
            .await?;
        component
            .endpoint("counter")
            .endpoint_builder()
            .handler(Counter)
            .start()
            .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

// ------------------------------------------------------------- measurements

/// One plane's figures, or its floor's.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Unary round trip p50, p90, p99.
    unary: [Duration; 3],
    items_per_second: f64,
    requests_per_second: f64,
}

/// The throughput half of [`Figures`]: one stream, and many callers.
#[derive(Debug, Clone, Copy)]
struct Rates {
    items_per_second: f64,
    requests_per_second: f64,
}

/// Unary round trips of one side, floor or plane: `n` of them, each timed.
type RoundTrips<'a> = Box<dyn FnMut(usize) -> anyhow::Result<Vec<Duration>> + 'a>;

/// Blocks the floor's and the plane's unary round trips alternate in.
const UNARY_BLOCKS: usize = 20;

/// p50/p90/p99 of the floor's and of the plane's unary round trips, after a
/// tenth of `samples` of each as warm-up, timed in alternating blocks: the
/// two see the same state of the machine, whose idle CPUs wake more or less
/// slowly from one moment to the next (`docs/performance.md`), so that
/// their ratio does not move with it as when one was measured after the other.
fn interleaved(
    samples: usize,
    mut floor: RoundTrips<'_>,
    mut plane: RoundTrips<'_>,
) -> anyhow::Result<([Duration; 3], [Duration; 3])> {
    floor(samples / 10)?;
    plane(samples / 10)?;
    let per_block = samples.div_ceil(UNARY_BLOCKS);
    let (mut floor_times, mut plane_times) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    while floor_times.len() < samples {
        floor_times.extend(floor(per_block)?);
        plane_times.extend(plane(per_block)?);
    }
    Ok((percentiles(floor_times), percentiles(plane_times)))
}

fn percentiles(mut times: Vec<Duration>) -> [Duration; 3] {
    times.sort();
    [50, 90, 99].map(|p| times[times.len() * p / 100])
}

/// `n` timed runs of `op`.
///
/// `op` makes each run's future (owning what it uses, so that the measuring
/// task stays `Send`).
async fn timed<Fut: Future<Output = ()>>(n: usize, mut op: impl FnMut() -> Fut) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        op().await;
        times.push(start.elapsed());
    }
    times
}

/// The median of `runs` rates, each `items / time of one run of op`.
async fn median_rate<Fut: Future<Output = ()>>(runs: usize, items: u64, mut op: impl FnMut() -> Fut) -> f64 {
    op().await; // warm-up
    let mut rates = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        op().await;
        rates.push(items as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[runs / 2]
}

/// Requests per second of [`CALLERS`] tasks running `op` in a loop for `window`.
async fn callers_rate<F, Fut>(window: Duration, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (op, done, stop) = (op.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    op().await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    for task in tasks {
        task.await.expect("a caller task panicked");
    }
    counted as f64 / elapsed.as_secs_f64()
}

/// One 100-byte request through the plane, until its stream ends.
async fn unary(echo: &PushRouter<String, String>, message: &str) {
    let mut stream = echo.generate(message.to_string().into()).await.expect("unary call");
    while let Some(item) = stream.next().await {
        item.expect("unary item");
    }
}

/// A plane through the public API: `PushRouter`s to the worker process.
struct PlaneSession {
    runtime: Runtime,
    echo: Arc<PushRouter<String, String>>,
    counter: Arc<PushRouter<u64, u64>>,
}

impl PlaneSession {
    async fn open(config: RuntimeConfig) -> anyhow::Result<Self> {
        let runtime = Runtime::new(config);
        let drt = DistributedRuntime::from_settings(runtime.clone()).await?;
        let component = drt.namespace("bench")?.component("worker")?;
        let echo = component.endpoint("echo").client().await?;
        let counter = component.endpoint("counter").client().await?;
        tokio::time::timeout(READY_DEADLINE, echo.wait_for_instances()).await??;
        tokio::time::timeout(READY_DEADLINE, counter.wait_for_instances()).await??;
        Ok(Self {
            runtime,
            echo: Arc::new(PushRouter::from_client(echo, RouterMode::RoundRobin).await?),
            counter: Arc::new(PushRouter::from_client(counter, RouterMode::RoundRobin).await?),
        })
    }

    /// `n` timed unary calls.
    async fn round_trips(echo: Arc<PushRouter<String, String>>, n: usize) -> anyhow::Result<Vec<Duration>> {
        let message = "x".repeat(MESSAGE);
        Ok(timed(n, || {
            let (router, message) = (echo.clone(), message.clone());
            async move { unary(&router, &message).await }
        })
        .await)
    }

    async fn rates(
        echo: Arc<PushRouter<String, String>>,
        counter: Arc<PushRouter<u64, u64>>,
        sizes: Sizes,
    ) -> anyhow::Result<Rates> {
        let items = sizes.stream_items;
        let items_per_second = median_rate(sizes.stream_runs, items, || {
            let counter = counter.clone();
            async move {
                let mut stream = counter.generate(items.into()).await.expect("stream call");
                let mut n = 0;
                while let Some(item) = stream.next().await {
                    item.expect("stream item");
                    n += 1;
                }
                assert_eq!(n, items, "the stream ended early");
            }
        })
        .await;
        let message = "x".repeat(MESSAGE);
        let requests_per_second = callers_rate(sizes.callers_for, move || {
            let (router, message) = (echo.clone(), message.clone());
            async move { unary(&router, &message).await }
        })
        .await;
        Ok(Rates {
            items_per_second,
            requests_per_second,
        })
    }
}

// ------------------------------------------------------------------ driving

/// A child process, stopped when dropped.
struct ChildProcess(Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // SIGTERM first, so a worker leaves discovery; SIGKILL if that fails.
        let stopped = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn spawn_worker(plane: &str, discovery: &Path, nats_url: &str) -> std::io::Result<ChildProcess> {
    Command::new(std::env::current_exe()?)
        .arg("worker")
        .env("DYN_DISCOVERY_BACKEND", "file")
        .env("DYN_FILE_KV", discovery)
        .env("DYN_REQUEST_PLANE", plane)
        .env("NATS_SERVER", nats_url)
        .env("DYN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map(ChildProcess)
}

/// Starts the floor process; returns it and its TCP and HTTP ports.
fn spawn_floor(nats_url: &str) -> anyhow::Result<(ChildProcess, u16, u16)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["floor", nats_url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let child = ChildProcess(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ports: Vec<u16> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let [tcp, http] = ports[..] else {
        anyhow::bail!("the floor process printed {line:?}, not two ports");
    };
    Ok((child, tcp, http))
}

struct Row {
    plane: &'static str,
    floor_name: &'static str,
    floor: Figures,
    plane_figures: Figures,
}

fn print_table(rows: &[Row], sizes: Sizes, threads: usize) {
    let micros = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let rate = |r: f64| {
        if r >= 1e6 {
            format!("{:.2} M", r / 1e6)
        } else {
            format!("{:.1} k", r / 1e3)
        }
    };
    // Other work on the machine moves every figure (and the ratios less):
    // say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "\ncross-process, worker and caller in separate processes on file discovery \
         ({} unary samples, {} items per stream, median of {}, {CALLERS} callers for {:?}; \
         runtime threads per process: {threads}; load average {load})\n",
        sizes.samples, sizes.stream_items, sizes.stream_runs, sizes.callers_for
    );
    println!("| plane | measure | floor | floor figure | plane figure | plane / floor |");
    println!("|---|---|---|---|---|---:|");
    for row in rows {
        let (f, p) = (row.floor, row.plane_figures);
        for (i, name) in ["unary p50 µs", "unary p90 µs", "unary p99 µs"].iter().enumerate() {
            println!(
                "| {} | {name} | {} | {} | {} | {:.2} |",
                row.plane,
                row.floor_name,
                micros(f.unary[i]),
                micros(p.unary[i]),
                p.unary[i].as_secs_f64() / f.unary[i].as_secs_f64()
            );
        }
        println!(
            "| {} | one stream, items/s | {} | {} | {} | {:.2} |",
            row.plane,
            row.floor_name,
            rate(f.items_per_second),
            rate(p.items_per_second),
            p.items_per_second / f.items_per_second
        );
        println!(
            "| {} | {CALLERS} callers, requests/s | {} | {} | {} | {:.2} |",
            row.plane,
            row.floor_name,
            rate(f.requests_per_second),
            rate(p.requests_per_second),
            p.requests_per_second / f.requests_per_second
        );
    }
    let ratio = |plane: &str, i: usize| {
        rows.iter()
            .find(|r| r.plane == plane)
            .map(|r| r.plane_figures.unary[i].as_secs_f64() / r.floor.unary[i].as_secs_f64())
    };
    let tcp = rows.iter().find(|r| r.plane == "tcp").map(|r| r.plane_figures);
    let met = |ok: bool| if ok { "met" } else { "missed" };
    if sizes.samples < 1_000 {
        println!("\n(a short run, as `cargo test` makes it: the figures say only that every plane answered)");
    }
    println!("\n| goal (issue 24) | measured | |\n|---|---:|---|");
    for (goal, value, limit) in [
        ("tcp unary p50 ≤ 1.3× floor", ratio("tcp", 0), 1.3),
        ("tcp unary p99 ≤ 1.5× floor", ratio("tcp", 2), 1.5),
        ("nats unary p50 ≤ 1.5× request-reply", ratio("nats", 0), 1.5),
        ("http unary p50 ≤ 3× bare hyper", ratio("http", 0), 3.0),
    ] {
        if let Some(value) = value {
            println!("| {goal} | {value:.2}× | {} |", met(value <= limit));
        }
    }
    if let Some(tcp) = tcp {
        println!(
            "| tcp one stream ≥ 1.5 M items/s | {} | {} |",
            rate(tcp.items_per_second),
            met(tcp.items_per_second >= 1.5e6)
        );
        println!(
            "| tcp {CALLERS} callers ≥ 100 k requests/s | {} | {} |",
            rate(tcp.requests_per_second),
            met(tcp.requests_per_second >= 100e3)
        );
    }
}

/// Runs `measure` as a task on the runtime's worker threads, where a
/// program under `Worker::execute` runs (`block_on` would poll it on this
/// thread instead, one more thread hand-off per response).
fn on_worker_thread<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    measure: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    rt.block_on(rt.spawn(measure))?
}

fn caller() -> anyhow::Result<()> {
    let sizes = Sizes::from_args();
    let nats = switchyard_test_support::nats_server::NatsServer::start();
    let nats_url = nats.url();
    let (_floor, tcp_port, http_port) = spawn_floor(&nats_url)?;
    let discovery =
        RemovedOnDrop(std::env::temp_dir().join(format!("switchyard-cross-process-{:016x}", rand::random::<u64>())));
    // The caller's threads follow DYN_RUNTIME_NUM_WORKER_THREADS as the
    // worker's do (it inherits the environment): both sides run as configured.
    let threads = *RuntimeConfig::from_settings()?.worker_threads();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    // `cargo bench ... -- tcp nats` measures only the planes named.
    let chosen: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let mut rows = Vec::new();
    for (plane, floor_name) in [
        ("tcp", "blocking TCP ping-pong"),
        ("http", "bare hyper h2c"),
        ("nats", "async-nats request-reply"),
    ] {
        if !chosen.is_empty() && !chosen.iter().any(|c| c == plane) {
            continue;
        }
        // Each plane on a directory of its own: a worker that left no trace.
        let directory = discovery.0.join(plane);
        let _worker = spawn_worker(plane, &directory, &nats_url)?;
        let config = RuntimeConfig::from_vars([
            ("DYN_DISCOVERY_BACKEND", "file"),
            ("DYN_FILE_KV", &directory.display().to_string()),
            ("NATS_SERVER", nats_url.as_str()),
        ])?;
        let session = on_worker_thread(&rt, PlaneSession::open(config))?;

        // Unary: the floor's round trips and the plane's, in alternating blocks.
        let rt = &rt;
        let floor = FloorClient::open(
            rt,
            plane,
            SocketAddr::from(([127, 0, 0, 1], tcp_port)),
            SocketAddr::from(([127, 0, 0, 1], http_port)),
            &nats_url,
            sizes,
        )?;
        let echo = session.echo.clone();
        let plane_unary: RoundTrips<'_> =
            Box::new(move |n| on_worker_thread(rt, PlaneSession::round_trips(echo.clone(), n)));
        let (floor_unary, plane_unary) = interleaved(sizes.samples, floor.round_trips(rt)?, plane_unary)?;

        // Throughput: the floor's, then the plane's.
        let floor = floor.rates(rt, sizes)?;
        let PlaneSession { runtime, echo, counter } = session;
        let plane_rates = on_worker_thread(rt, PlaneSession::rates(echo, counter, sizes))?;
        on_worker_thread(rt, async move {
            runtime.shutdown().await;
            anyhow::Ok(())
        })?;
        let (floor, plane_figures) = (
            Figures {
                unary: floor_unary,
                items_per_second: floor.items_per_second,
                requests_per_second: floor.requests_per_second,
            },
            Figures {
                unary: plane_unary,
                items_per_second: plane_rates.items_per_second,
                requests_per_second: plane_rates.requests_per_second,
            },
        );
        rows.push(Row {
            plane,
            floor_name,
            floor,
            plane_figures,
        });
    }
    print_table(&rows, sizes, threads);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("worker") => worker(),
        Some("floor") => floor::run(args.get(2).map_or("nats://127.0.0.1:4222", String::as_str)),
        _ => caller(),
    }
}

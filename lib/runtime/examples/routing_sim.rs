//! A deterministic simulation of routing policies (paused tokio time, no
//! sockets): `c` single-server FIFO workers with exponential service times,
//! Poisson arrivals at utilisation ρ, and the real `routing` policies over the
//! real occupancy table. Prints mean and p99 latency, load spread and
//! rejections per policy, next to the M/M/c central-queue bound and `c`
//! independent M/M/1 queues (what blind random routing amounts to).
//!
//! ```text
//! cargo run --release --example routing_sim -- [rho] [workers] [requests]
//! ```
//!
//! Defaults: ρ = 0.9, c = 8, 200,000 requests. Latencies are in units of
//! the mean service time.

use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::component::Instance;
use switchyard_runtime::request_plane::Transport;
use switchyard_runtime::routing::occupancy::Occupancy;
use switchyard_runtime::routing::{LeastLoaded, LoadView, Policy, PowerOfTwo, Random, RoundRobin};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Mean service time. Simulated time is free (paused clock), so it is long
/// enough that tokio's 1 ms timer granularity does not distort the model;
/// results are reported in units of this mean.
const SERVICE_MEAN: Duration = Duration::from_secs(10);

struct View<'a>(&'a Occupancy);

impl LoadView for View<'_> {
    fn load(&self, id: u64) -> u64 {
        self.0.load(id)
    }
    fn available(&self, _id: u64) -> bool {
        true
    }
    fn least_loaded(&self, allowed: &dyn Fn(u64) -> bool) -> Option<u64> {
        self.0.least_loaded(|id, _| allowed(id), Instant::now())
    }
}

/// A tiny deterministic PRNG (xorshift), so every policy sees the same arrivals.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn exponential(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-(1.0 - self.next_f64()).ln())
    }
}

struct Outcome {
    mean: f64,
    p99: f64,
    spread: f64,
}

async fn simulate(policy: Arc<dyn Policy>, workers: usize, rho: f64, requests: usize) -> Outcome {
    let instances: Vec<Instance> = (0..workers as u64)
        .map(|id| Instance {
            namespace: "sim".into(),
            component: "worker".into(),
            endpoint: "generate".into(),
            instance_id: id,
            transport: Transport::Tcp(String::new()),
        })
        .collect();
    let occupancy = Occupancy::new();
    occupancy.sync(&(0..workers as u64).collect::<Vec<_>>());
    // One FIFO server per worker.
    let mut queues = vec![];
    let mut served = vec![];
    for w in 0..workers {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Duration, oneshot::Sender<()>)>();
        queues.push(tx);
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        served.push(count.clone());
        let _ = w;
        tokio::spawn(async move {
            while let Some((service, done)) = rx.recv().await {
                tokio::time::sleep(service).await;
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = done.send(());
            }
        });
    }
    let arrival_mean = SERVICE_MEAN.div_f64(rho * workers as f64);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<f64>();
    for _ in 0..requests {
        tokio::time::sleep(rng.exponential(arrival_mean)).await;
        let service = rng.exponential(SERVICE_MEAN);
        let chosen = policy.select(&instances, &View(&occupancy)).expect("a worker");
        let guard = occupancy.acquire(instances[chosen].instance_id);
        let (done_tx, done_rx) = oneshot::channel();
        queues[chosen].send((service, done_tx)).expect("worker alive");
        let started = Instant::now();
        let lat_tx = lat_tx.clone();
        tokio::spawn(async move {
            let _ = done_rx.await;
            drop(guard);
            let _ = lat_tx.send(started.elapsed().as_secs_f64());
        });
    }
    drop(lat_tx);
    let mut latencies = vec![];
    while let Some(latency) = lat_rx.recv().await {
        latencies.push(latency);
    }
    latencies.sort_by(f64::total_cmp);
    let counts: Vec<f64> = served
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed) as f64)
        .collect();
    let avg = counts.iter().sum::<f64>() / counts.len() as f64;
    let spread = counts.iter().map(|c| (c - avg).abs()).fold(0.0, f64::max) / avg;
    Outcome {
        mean: latencies.iter().sum::<f64>() / latencies.len() as f64,
        p99: latencies[latencies.len() * 99 / 100],
        spread,
    }
}

/// Mean time in an M/M/c system (Erlang C): T = L_q/λ + 1/μ.
fn mmc_mean(c: usize, rho: f64, service: f64) -> f64 {
    let mu = 1.0 / service;
    let lambda = rho * c as f64 * mu;
    let a = lambda / mu;
    let mut sum = 0.0;
    let mut term = 1.0;
    for k in 0..c {
        if k > 0 {
            term *= a / k as f64;
        }
        sum += term;
    }
    let last = term * a / c as f64; // a^c / c!
    let p0 = 1.0 / (sum + last / (1.0 - rho));
    let lq = last * rho / ((1.0 - rho).powi(2)) * p0;
    lq / lambda + 1.0 / mu
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rho: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0.9);
    let workers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let service = SERVICE_MEAN.as_secs_f64();
    let bound = mmc_mean(workers, rho, service);
    let mm1 = service / (1.0 - rho);
    println!("ρ = {rho}, c = {workers}, {requests} requests; latency in units of the mean service time");
    println!("| policy | mean | p99 | mean / M/M/c | max load spread |");
    println!("|---|---|---|---|---|");
    println!(
        "| M/M/c bound (one central queue) | {:.2} | – | 1.00 | – |",
        bound / service
    );
    println!(
        "| {workers} × M/M/1 (independent queues) | {:.2} | – | {:.2} | – |",
        mm1 / service,
        mm1 / bound
    );
    let policies: [(&str, Arc<dyn Policy>); 4] = [
        ("random", Arc::new(Random)),
        ("round_robin", Arc::new(RoundRobin::default())),
        ("power_of_two", Arc::new(PowerOfTwo)),
        ("least_loaded", Arc::new(LeastLoaded)),
    ];
    for (name, policy) in policies {
        let outcome = runtime.block_on(simulate(policy, workers, rho, requests));
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.1} % |",
            outcome.mean / service,
            outcome.p99 / service,
            outcome.mean / bound,
            outcome.spread * 100.0
        );
    }
}

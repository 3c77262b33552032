//! A deterministic simulation of routing policies (paused tokio time, no
//! sockets): `c` single-server FIFO workers with exponential service times,
//! Poisson arrivals at utilisation ρ, and the real `routing` policies over the
//! real occupancy table (in-flight guards, ejection after failures, load
//! reports). Prints mean and p99 latency, load spread and failed requests per
//! policy, next to the M/M/c central-queue bound and `c` independent M/M/1
//! queues (what blind random routing amounts to), for five scenarios: a
//! uniform fleet; one worker three times slower; one worker that fails every
//! request at once (each router ejects it and retries once elsewhere); and
//! four routers sharing the fleet, without and with the workers' load reports.
//!
//! ```text
//! cargo run --release --example routing_sim -- [rho] [workers] [requests]
//! ```
//!
//! Defaults: ρ = 0.9, c = 8, 200,000 requests. Latencies are in units of
//! the mean service time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use switchyard_runtime::instance::Instance;
use switchyard_runtime::request_plane::Transport;
use switchyard_runtime::routing::occupancy::Occupancy;
use switchyard_runtime::routing::{LeastLoaded, LoadView, Policy, PowerOfTwo, Random, RoundRobin};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Mean service time. Simulated time is free (paused clock), so it is long
/// enough that tokio's 1 ms timer granularity does not distort the model;
/// results are reported in units of this mean.
const SERVICE_MEAN: Duration = Duration::from_secs(10);

/// One router's view for one selection: its own occupancy table, minus an
/// instance already tried for this request.
struct View<'a> {
    occupancy: &'a Occupancy,
    exclude: Option<u64>,
    now: Instant,
    /// When every instance is ejected, trying one beats failing (as PushRouter does).
    ignore_ejection: bool,
}

impl LoadView for View<'_> {
    fn load(&self, id: u64) -> u64 {
        self.occupancy.load(id)
    }
    fn available(&self, id: u64) -> bool {
        Some(id) != self.exclude && (self.ignore_ejection || self.occupancy.is_available(id, self.now))
    }
    fn least_loaded(&self, allowed: &dyn Fn(u64) -> bool) -> Option<u64> {
        if self.ignore_ejection {
            return None;
        }
        self.occupancy
            .least_loaded(|id, _| Some(id) != self.exclude && allowed(id), self.now)
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

/// The fleet and the routers in front of it.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// Worker 0 takes this many times the mean service time.
    slow: Option<f64>,
    /// Worker 0 fails every request at once (after 1% of a service time).
    failing: bool,
    /// Routers sharing the workers; arrivals alternate between them.
    routers: usize,
    /// Workers report their queue length to every router (after a short delay).
    reports: bool,
}

/// How long a worker's load report takes to reach the routers (the
/// publisher's debounce plus the event plane), relative to a service time
/// of ~100 ms in a real deployment: 20 ms → 0.2 of the mean.
const REPORT_DELAY: Duration = Duration::from_secs(2);

struct Outcome {
    mean: f64,
    p99: f64,
    spread: f64,
    /// Requests whose retry failed too (the client saw an error).
    failed: usize,
}

enum Job {
    /// Serve for this long, then say whether it worked.
    Serve(Duration, oneshot::Sender<bool>),
}

async fn simulate(policy: Arc<dyn Policy>, scenario: Scenario, workers: usize, rho: f64, requests: usize) -> Outcome {
    let instances: Vec<Instance> = (0..workers as u64)
        .map(|id| Instance {
            namespace: "sim".into(),
            component: "worker".into(),
            endpoint: "generate".into(),
            instance_id: id,
            transport: Transport::Tcp(String::new()),
        })
        .collect();
    let ids: Vec<u64> = (0..workers as u64).collect();
    let routers: Arc<Vec<Occupancy>> = Arc::new(
        (0..scenario.routers)
            .map(|_| {
                let occupancy = Occupancy::new();
                occupancy.sync(&ids);
                occupancy
            })
            .collect(),
    );
    // One FIFO server per worker, counting what it served and what it holds.
    let mut queues = vec![];
    let mut served = vec![];
    for w in 0..workers {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        queues.push(tx);
        let count = Arc::new(AtomicU64::new(0));
        served.push(count.clone());
        let (fails, factor) = match (w, scenario.slow) {
            (0, Some(factor)) => (false, factor),
            (0, None) => (scenario.failing, 1.0),
            _ => (false, 1.0),
        };
        tokio::spawn(async move {
            while let Some(Job::Serve(service, done)) = rx.recv().await {
                if fails {
                    tokio::time::sleep(service.mul_f64(0.01)).await;
                    let _ = done.send(false);
                } else {
                    tokio::time::sleep(service.mul_f64(factor)).await;
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = done.send(true);
                }
            }
        });
    }
    // Requests held per worker (queued or in service), for load reports.
    let held: Arc<Vec<AtomicU64>> = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
    let report = {
        let (held, routers) = (held.clone(), routers.clone());
        move |w: usize| {
            if !scenario.reports {
                return;
            }
            let (held, routers) = (held.clone(), routers.clone());
            tokio::spawn(async move {
                tokio::time::sleep(REPORT_DELAY).await;
                let load = held[w].load(Ordering::Relaxed);
                for occupancy in routers.iter() {
                    occupancy.report(w as u64, load, Instant::now() + SERVICE_MEAN * 1000);
                }
            });
        }
    };
    // ρ is relative to what the fleet can really serve: a slow worker adds a
    // fraction of one, a failing worker nothing.
    let odd_one = if scenario.failing {
        0.0
    } else {
        1.0 / scenario.slow.unwrap_or(1.0)
    };
    let capacity = workers as f64 - 1.0 + odd_one;
    let arrival_mean = SERVICE_MEAN.div_f64(rho * capacity);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<Option<f64>>();
    for i in 0..requests {
        tokio::time::sleep(rng.exponential(arrival_mean)).await;
        let service = rng.exponential(SERVICE_MEAN);
        let router = i % scenario.routers;
        let (policy, routers, instances, queues, held, report, lat_tx) = (
            policy.clone(),
            routers.clone(),
            instances.clone(),
            queues.clone(),
            held.clone(),
            report.clone(),
            lat_tx.clone(),
        );
        let started = Instant::now();
        tokio::spawn(async move {
            let occupancy = &routers[router];
            let mut exclude = None;
            // One try, and one retry elsewhere after a failure, as PushRouter does.
            for _ in 0..2 {
                let view = View {
                    occupancy,
                    exclude,
                    now: Instant::now(),
                    ignore_ejection: false,
                };
                let chosen = policy
                    .select(&instances, &view)
                    .or_else(|| {
                        let anyway = View {
                            ignore_ejection: true,
                            ..view
                        };
                        RoundRobin::default().select(&instances, &anyway)
                    })
                    .expect("a worker");
                let id = instances[chosen].instance_id;
                let guard = occupancy.acquire(id);
                let (done_tx, done_rx) = oneshot::channel();
                held[chosen].fetch_add(1, Ordering::Relaxed);
                report(chosen);
                queues[chosen].send(Job::Serve(service, done_tx)).expect("worker alive");
                let ok = done_rx.await.unwrap_or(false);
                held[chosen].fetch_sub(1, Ordering::Relaxed);
                report(chosen);
                drop(guard);
                if ok {
                    occupancy.record_success(id);
                    let _ = lat_tx.send(Some(started.elapsed().as_secs_f64()));
                    return;
                }
                occupancy.record_failure(id, Instant::now());
                exclude = Some(id);
            }
            let _ = lat_tx.send(None);
        });
    }
    drop(lat_tx);
    let mut latencies = vec![];
    let mut failed = 0;
    while let Some(latency) = lat_rx.recv().await {
        match latency {
            Some(latency) => latencies.push(latency),
            None => failed += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    // Spread over the healthy, full-speed workers (the odd one out is meant to get less).
    let odd = usize::from(scenario.slow.is_some() || scenario.failing);
    let counts: Vec<f64> = served[odd..].iter().map(|c| c.load(Ordering::Relaxed) as f64).collect();
    let avg = counts.iter().sum::<f64>() / counts.len() as f64;
    let spread = counts.iter().map(|c| (c - avg).abs()).fold(0.0, f64::max) / avg;
    Outcome {
        mean: latencies.iter().sum::<f64>() / latencies.len() as f64,
        p99: latencies[latencies.len() * 99 / 100],
        spread,
        failed,
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
    println!("| reference | mean | mean / M/M/c |");
    println!("|---|---|---|");
    println!("| M/M/c bound (one central queue) | {:.2} | 1.00 |", bound / service);
    println!(
        "| {workers} × M/M/1 (independent queues) | {:.2} | {:.2} |",
        mm1 / service,
        mm1 / bound
    );
    let policies: [(&str, Arc<dyn Policy>); 4] = [
        ("random", Arc::new(Random)),
        ("round_robin", Arc::new(RoundRobin::default())),
        ("power_of_two", Arc::new(PowerOfTwo)),
        ("least_loaded", Arc::new(LeastLoaded)),
    ];
    let scenarios = [
        Scenario {
            name: "uniform",
            slow: None,
            failing: false,
            routers: 1,
            reports: false,
        },
        Scenario {
            name: "one worker 3× slower",
            slow: Some(3.0),
            failing: false,
            routers: 1,
            reports: false,
        },
        Scenario {
            name: "one worker fails fast",
            slow: None,
            failing: true,
            routers: 1,
            reports: false,
        },
        Scenario {
            name: "4 routers, no load reports",
            slow: None,
            failing: false,
            routers: 4,
            reports: false,
        },
        Scenario {
            name: "4 routers, load reports",
            slow: None,
            failing: false,
            routers: 4,
            reports: true,
        },
    ];
    println!();
    println!("| scenario | policy | mean | p99 | mean / M/M/c | max load spread | failed |");
    println!("|---|---|---|---|---|---|---|");
    for scenario in scenarios {
        for (name, policy) in &policies {
            let outcome = runtime.block_on(simulate(policy.clone(), scenario, workers, rho, requests));
            println!(
                "| {} | {name} | {:.2} | {:.2} | {:.2} | {:.1} % | {} |",
                scenario.name,
                outcome.mean / service,
                outcome.p99 / service,
                outcome.mean / bound,
                outcome.spread * 100.0,
                outcome.failed
            );
        }
    }
}

//! The chaos run: two frontends (KV-aware routing) and four mocker workers as
//! processes, with the infrastructure they need (etcd, NATS), started in an
//! order drawn from a seed; many concurrent streaming clients; and a fault
//! schedule drawn from the same seed, one fault at a time: worker SIGKILL,
//! SIGTERM and SIGSTOP/SIGCONT (a process that exits is restarted by the
//! run's supervisor, as Kubernetes or compose would), etcd and NATS
//! restarts, and a network fault between the frontends and one worker
//! (delay, a blackhole that holds every byte, a partition that cuts every
//! connection) through a fault-injecting proxy the worker advertises
//! (`DYN_TCP_RPC_ADVERTISE`). All the while, every worker's engine hangs
//! before the first token of every 40th request and withholds every other
//! KV event batch (routers must see the gap and replay it).
//!
//! It runs on every request plane (tcp, http, nats) and on file and etcd
//! discovery. Afterwards the history is checked ([`history::check`]: ended
//! exactly once, none lost, byte-equal to the fault-free answers, failures
//! explained, no routing to departed instances), then a cancel must reach
//! the engines within 100 ms, and the frontends' memory and open files must
//! be back near where they were before the faults.
//!
//! `chaos_short` (a few seconds per combination) runs in `make test`;
//! `make chaos` runs `chaos_long` (200 clients, 60 s per combination) in a
//! release build. `SWITCHYARD_CHAOS_SEED`, `_CLIENTS`, `_SECONDS` and
//! `_ONLY` (e.g. `tcp/file,nats/etcd`) override the defaults; the seed of a
//! run is printed with its results, so a run can be repeated.

use crate::history::{self, Ending, Expectations, Load, Presence, Record};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::Discovery;
use switchyard_runtime::discovery::etcd::EtcdDiscovery;
use switchyard_runtime::discovery::file::FileDiscovery;
use switchyard_test_support::etcd_server::EtcdServer;
use switchyard_test_support::free_ports;
use switchyard_test_support::nats_server::NatsServer;
use switchyard_test_support::switchyard::binary;
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Registration lifetime: short, so that a frozen worker leaves discovery.
const TTL: Duration = Duration::from_secs(1);
/// Distinct prompts the clients draw from (each with its own answer).
const PROMPTS: usize = 8;
/// Output tokens per request (about 0.4 s of simulated decode).
const TOKENS: u32 = 48;
/// A request still running this long after it was sent is lost.
const LOST_AFTER: Duration = Duration::from_secs(30);
/// How far behind a cancel may reach the engines.
const CANCEL_WITHIN: Duration = Duration::from_millis(100);
const WORKERS: usize = 4;
const FRONTENDS: usize = 2;

/// How one run is sized; the environment may override each.
#[derive(Debug, Clone)]
struct Settings {
    seed: u64,
    clients: usize,
    seconds: u64,
    /// A new fault starts this often.
    fault_every: Duration,
    combinations: Vec<Combination>,
}

impl Settings {
    // The run's own knobs, not runtime settings: read straight from the environment.
    #[allow(clippy::disallowed_methods)]
    fn from_env(clients: usize, seconds: u64, fault_every: Duration) -> Self {
        let number = |name: &str, default: u64| -> u64 {
            match std::env::var(name) {
                Ok(text) => text
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
                Err(_) => default,
            }
        };
        let combinations = match std::env::var("SWITCHYARD_CHAOS_ONLY") {
            Ok(list) => list.split(',').map(Combination::parse).collect(),
            Err(_) => Combination::all(),
        };
        Settings {
            seed: number("SWITCHYARD_CHAOS_SEED", rand::random::<u32>() as u64),
            clients: number("SWITCHYARD_CHAOS_CLIENTS", clients as u64) as usize,
            seconds: number("SWITCHYARD_CHAOS_SECONDS", seconds),
            fault_every,
            combinations,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiscoveryKind {
    File,
    Etcd,
}

/// A request plane and a discovery backend.
#[derive(Debug, Clone, Copy)]
struct Combination {
    plane: &'static str,
    discovery: DiscoveryKind,
}

impl Combination {
    fn all() -> Vec<Self> {
        let mut all = Vec::new();
        for discovery in [DiscoveryKind::File, DiscoveryKind::Etcd] {
            for plane in ["tcp", "http", "nats"] {
                all.push(Combination { plane, discovery });
            }
        }
        all
    }

    /// `plane/discovery`, e.g. `tcp/file`.
    fn parse(text: &str) -> Self {
        let (plane, discovery) = text
            .trim()
            .split_once('/')
            .unwrap_or_else(|| panic!("{text:?} is not plane/discovery, e.g. tcp/file"));
        let plane = ["tcp", "http", "nats"]
            .into_iter()
            .find(|p| *p == plane)
            .unwrap_or_else(|| panic!("{plane:?} is not a request plane: tcp, http or nats"));
        let discovery = match discovery {
            "file" => DiscoveryKind::File,
            "etcd" => DiscoveryKind::Etcd,
            other => panic!("{other:?} is not a discovery backend here: file or etcd"),
        };
        Combination { plane, discovery }
    }

    fn name(&self) -> String {
        let discovery = match self.discovery {
            DiscoveryKind::File => "file",
            DiscoveryKind::Etcd => "etcd",
        };
        format!("{}/{discovery}", self.plane)
    }

    /// Whether NATS runs: the nats request plane, and the event plane on etcd.
    fn uses_nats(&self) -> bool {
        self.plane == "nats" || self.discovery == DiscoveryKind::Etcd
    }
}

/// One kind of fault the schedule may draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WorkerKill,
    WorkerTerm,
    WorkerFreeze,
    EtcdRestart,
    NatsRestart,
    NetworkDelay,
    NetworkBlackhole,
    NetworkPartition,
}

impl Fault {
    fn applicable(combination: Combination) -> Vec<Fault> {
        let mut faults = vec![
            Fault::WorkerKill,
            Fault::WorkerTerm,
            Fault::WorkerFreeze,
            Fault::NetworkDelay,
            Fault::NetworkBlackhole,
            Fault::NetworkPartition,
        ];
        if combination.discovery == DiscoveryKind::Etcd {
            faults.push(Fault::EtcdRestart);
        }
        if combination.uses_nats() {
            faults.push(Fault::NatsRestart);
        }
        faults
    }

    fn describe(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker SIGKILL, restarted",
            Fault::WorkerTerm => "worker SIGTERM (1 s drain), restarted",
            Fault::WorkerFreeze => "worker SIGSTOP 3 s, SIGCONT",
            Fault::EtcdRestart => "etcd down 2 s, restarted",
            Fault::NatsRestart => "NATS down 1 s, restarted",
            Fault::NetworkDelay => "network: +100 ms per chunk to worker 0 for 3 s",
            Fault::NetworkBlackhole => "network: worker 0 blackholed 3 s",
            Fault::NetworkPartition => "network: worker 0 partitioned 3 s",
        }
    }
}

/// What the proxy in front of worker 0 does to its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Network {
    Healthy,
    /// Every chunk waits this long before it is passed on.
    Delay(Duration),
    /// Connections stay open but nothing is passed on.
    Blackhole,
    /// Every connection is cut and new ones are refused.
    Partition,
}

/// A TCP proxy on a loopback port that passes traffic to `target`, or
/// delays, holds or cuts it.
#[derive(Clone)]
struct Proxy {
    mode: Arc<Mutex<Network>>,
    /// Cancelled to cut every open connection (a partition).
    cut: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(listen: u16, target: u16, stop: CancellationToken) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await.unwrap();
        let proxy = Proxy {
            mode: Arc::new(Mutex::new(Network::Healthy)),
            cut: Arc::default(),
        };
        let accepting = proxy.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                if accepting.mode() == Network::Partition {
                    continue; // dropped: the caller sees its connection closed
                }
                let proxy = accepting.clone();
                let cut = accepting.cut.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = proxy.pump(in_read, out_write) => {}
                        _ = proxy.pump(out_read, in_write) => {}
                    }
                });
            }
        });
        proxy
    }

    fn mode(&self) -> Network {
        *self.mode.lock().unwrap()
    }

    fn set(&self, mode: Network) {
        *self.mode.lock().unwrap() = mode;
        if mode == Network::Partition {
            let mut cut = self.cut.lock().unwrap();
            cut.cancel();
            *cut = CancellationToken::new();
        }
    }

    /// Copies one direction until either side closes. Bytes are stamped
    /// when they arrive and written when they are due, so a delay adds
    /// latency without choking throughput; a blackhole holds them.
    async fn pump(&self, mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
        let (queue, mut due) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
        let reading = async move {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let Ok(read) = from.read(&mut buffer).await else { return };
                if read == 0 {
                    return;
                }
                let delay = match self.mode() {
                    Network::Delay(delay) => delay,
                    _ => Duration::ZERO,
                };
                if queue
                    .send((Instant::now() + delay, buffer[..read].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        };
        let writing = async move {
            while let Some((at, bytes)) = due.recv().await {
                loop {
                    match self.mode() {
                        Network::Blackhole => tokio::time::sleep(Duration::from_millis(20)).await,
                        Network::Partition => return,
                        _ => break,
                    }
                }
                tokio::time::sleep_until(at).await;
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        };
        // Either direction's end ends the connection (a closed reader drops the
        // queue; the writer flushes what is queued first).
        tokio::join!(reading, writing);
    }
}

/// How to start one process: its name, arguments and environment.
type Spec = (String, Vec<String>, Vec<(String, String)>);

/// A process of the run, restarted whenever it exits, as a container
/// orchestrator would restart it.
struct Supervised {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    process: WorkerProcess,
    /// Exits seen (each followed by a restart), with the end of the log.
    exits: Vec<String>,
}

impl Supervised {
    fn spawn(name: String, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        let process = Self::launch(&args, &env);
        Supervised {
            name,
            args,
            env,
            process,
            exits: Vec::new(),
        }
    }

    fn launch(args: &[String], env: &[(String, String)]) -> WorkerProcess {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        WorkerProcess::spawn(binary(), &args, &env)
    }

    /// Restarts the process if it has exited.
    fn tend(&mut self) {
        self.process.read_log();
        if let Some(status) = self.process.exited() {
            let log = self.process.read_log();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            self.exits.push(format!("{status}: {}", tail.join(" / ")));
            self.process = Self::launch(&self.args, &self.env);
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// The processes of one combination and the infrastructure under them.
struct Mesh {
    combination: Combination,
    processes: Arc<Mutex<Vec<Supervised>>>,
    etcd: Option<EtcdServer>,
    nats: Option<NatsServer>,
    proxy: Proxy,
    frontend_urls: Vec<String>,
    worker_status_ports: Vec<u16>,
    dir: PathBuf,
    stop: CancellationToken,
    /// The order everything was started in.
    start_order: Vec<String>,
}

impl Mesh {
    /// Starts everything in an order drawn from `rng`.
    async fn start(combination: Combination, rng: &mut rand::rngs::StdRng) -> Self {
        let stop = CancellationToken::new();
        let dir = std::env::temp_dir().join(format!("switchyard-chaos-{:016x}", rand::random::<u64>()));
        let etcd = (combination.discovery == DiscoveryKind::Etcd).then(EtcdServer::unstarted);
        let nats = combination.uses_nats().then(NatsServer::unstarted);

        let mut env: Vec<(String, String)> = vec![
            ("DYN_REQUEST_PLANE".into(), combination.plane.into()),
            ("DYN_LEASE_TTL".into(), "1s".into()),
            ("DYN_LOG".into(), "info".into()),
            ("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT".into(), "1".into()),
        ];
        match &etcd {
            Some(etcd) => {
                env.push(("DYN_DISCOVERY_BACKEND".into(), "etcd".into()));
                env.push(("ETCD_ENDPOINTS".into(), etcd.url()));
            }
            None => {
                env.push(("DYN_DISCOVERY_BACKEND".into(), "file".into()));
                env.push(("DYN_FILE_KV".into(), dir.to_str().unwrap().into()));
            }
        }
        if let Some(nats) = &nats {
            env.push(("NATS_SERVER".into(), nats.url()));
        }

        // Worker 0 sits behind the proxy: on tcp and http it advertises the
        // proxy's port; on nats it reaches NATS through it.
        // Every fixed port of the run, distinct: a process restarted on its
        // port must not find it taken by a sibling.
        let mut ports = free_ports(2 + WORKERS + FRONTENDS).into_iter();
        let mut port = move || ports.next().expect("enough ports were chosen");
        let proxy_port = port();
        let behind_proxy = port();
        let proxy_target = match (combination.plane, &nats) {
            ("nats", Some(nats)) => nats.url().rsplit(':').next().unwrap().parse().unwrap(),
            _ => behind_proxy,
        };
        let proxy = Proxy::start(proxy_port, proxy_target, stop.clone()).await;

        let mut specs: Vec<Spec> = Vec::new();
        let worker_status_ports: Vec<u16> = (0..WORKERS).map(|_| port()).collect();
        for (index, status_port) in worker_status_ports.iter().enumerate() {
            let mut env = env.clone();
            env.push(("DYN_SYSTEM_PORT".into(), status_port.to_string()));
            if index == 0 {
                match combination.plane {
                    "tcp" => {
                        env.push(("DYN_TCP_RPC_PORT".into(), behind_proxy.to_string()));
                        env.push(("DYN_TCP_RPC_ADVERTISE".into(), format!("127.0.0.1:{proxy_port}")));
                    }
                    "http" => {
                        env.push(("DYN_HTTP_RPC_PORT".into(), behind_proxy.to_string()));
                        env.push(("DYN_HTTP_RPC_ADVERTISE".into(), format!("127.0.0.1:{proxy_port}")));
                    }
                    _ => env.push(("NATS_SERVER".into(), format!("nats://127.0.0.1:{proxy_port}"))),
                }
            }
            let args = [
                "worker",
                "mocker",
                "--speedup-ratio",
                "1",
                "--kv-events-withhold-every",
                "2",
                "--stall-first-token-every",
                "40",
            ];
            specs.push((
                format!("worker {index}"),
                args.iter().map(|a| a.to_string()).collect(),
                env,
            ));
        }
        let mut frontend_urls = Vec::new();
        for index in 0..FRONTENDS {
            let http_port = port().to_string();
            let args = [
                "frontend",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                &http_port,
                "--router-mode",
                "kv",
                "--first-token-timeout-secs",
                "2",
                "--stream-stall-timeout-secs",
                "2",
            ];
            frontend_urls.push(format!("http://127.0.0.1:{http_port}"));
            specs.push((
                format!("frontend {index}"),
                args.iter().map(|a| a.to_string()).collect(),
                env.clone(),
            ));
        }

        // Shuffle processes and infrastructure together.
        let mut order: Vec<Option<usize>> = specs.iter().enumerate().map(|(i, _)| Some(i)).collect();
        order.push(None); // the infrastructure (etcd, NATS), when there is any
        order.shuffle(rng);
        let mut etcd = etcd;
        let mut nats = nats;
        let mut slots: Vec<Option<Supervised>> = specs.iter().map(|_| None).collect();
        let mut start_order = Vec::new();
        for item in order {
            match item {
                Some(i) => {
                    let (name, args, env) = specs[i].clone();
                    start_order.push(name.clone());
                    slots[i] = Some(Supervised::spawn(name, args, env));
                }
                None => {
                    if let Some(etcd) = &mut etcd {
                        tokio::task::block_in_place(|| etcd.restart());
                        start_order.push("etcd".into());
                    }
                    if let Some(nats) = &mut nats {
                        tokio::task::block_in_place(|| nats.restart());
                        start_order.push("NATS".into());
                    }
                }
            }
        }
        let processes = Arc::new(Mutex::new(slots.into_iter().map(Option::unwrap).collect::<Vec<_>>()));
        let tending = processes.clone();
        let stopping = stop.clone();
        tokio::spawn(async move {
            while !stopping.is_cancelled() {
                for process in tending.lock().unwrap().iter_mut() {
                    process.tend();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Mesh {
            combination,
            processes,
            etcd,
            nats,
            proxy,
            frontend_urls,
            worker_status_ports,
            dir,
            stop,
            start_order,
        }
    }

    /// Waits until every frontend serves the model from all four workers.
    async fn ready(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(90);
        for url in &self.frontend_urls {
            loop {
                let mesh: serde_json::Value = match http.get(format!("{url}/api/mesh")).send().await {
                    Ok(response) => response.json().await.unwrap_or_default(),
                    Err(_) => serde_json::Value::Null,
                };
                let instances = mesh["models"][0]["instances"].as_array().map_or(0, Vec::len);
                if instances == WORKERS {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: {url} never saw all {WORKERS} workers (it sees {instances}); logs:\n{}",
                    self.combination.name(),
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn logs(&self) -> String {
        let mut processes = self.processes.lock().unwrap();
        processes
            .iter_mut()
            .map(|p| {
                let name = p.name.clone();
                let log = p.process.read_log();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("--- {name} ---\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A watcher of who is in discovery.
    async fn presence(&self) -> Presence {
        let discovery: Arc<dyn Discovery> = match &self.etcd {
            Some(etcd) => {
                let url = etcd.url();
                let config = RuntimeConfig::from_vars([("ETCD_ENDPOINTS", url.as_str())]).unwrap();
                Arc::new(
                    EtcdDiscovery::connect(config.etcd(), TTL, TaskTracker::new(), self.stop.clone())
                        .await
                        .unwrap(),
                )
            }
            None => Arc::new(
                FileDiscovery::open(self.dir.clone(), TTL, TaskTracker::new(), self.stop.clone())
                    .await
                    .unwrap(),
            ),
        };
        Presence::watch(discovery, self.stop.clone()).await
    }

    fn signal_worker(&self, index: usize, signal: &str) {
        let processes = self.processes.lock().unwrap();
        processes[index].process.signal(signal);
    }

    /// Runs one fault to its end.
    async fn inflict(&mut self, fault: Fault, worker: usize) {
        match fault {
            Fault::WorkerKill => {
                self.signal_worker(worker, "-KILL");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Fault::WorkerTerm => {
                self.signal_worker(worker, "-TERM");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Fault::WorkerFreeze => {
                self.signal_worker(worker, "-STOP");
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.signal_worker(worker, "-CONT");
            }
            Fault::EtcdRestart => {
                let etcd = self.etcd.as_mut().expect("etcd runs");
                etcd.stop();
                tokio::time::sleep(Duration::from_secs(2)).await;
                tokio::task::block_in_place(|| etcd.restart());
            }
            Fault::NatsRestart => {
                let nats = self.nats.as_mut().expect("NATS runs");
                nats.stop();
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| nats.restart());
            }
            Fault::NetworkDelay | Fault::NetworkBlackhole | Fault::NetworkPartition => {
                self.proxy.set(match fault {
                    Fault::NetworkDelay => Network::Delay(Duration::from_millis(100)),
                    Fault::NetworkBlackhole => Network::Blackhole,
                    _ => Network::Partition,
                });
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.proxy.set(Network::Healthy);
            }
        }
    }

    /// Requests running in each worker's engine (asked of all at once, so
    /// that a cancel is timed by the slowest answer, not their sum).
    async fn running(&self, http: &reqwest::Client) -> Vec<u64> {
        let ask = |port: u16| async move {
            let text = match http.get(format!("http://127.0.0.1:{port}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            text.lines()
                .find(|l| l.starts_with("vllm:num_requests_running"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        futures::future::join_all(self.worker_status_ports.iter().map(|port| ask(*port))).await
    }

    /// Migrations counted by the frontends.
    async fn migrations(&self, http: &reqwest::Client) -> u64 {
        let mut total = 0.0;
        for url in &self.frontend_urls {
            let text = match http.get(format!("{url}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            total += text
                .lines()
                .filter(|l| l.starts_with("dynamo_frontend_model_migration_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        total as u64
    }

    /// Each frontend's resident memory and open file descriptors.
    fn frontend_resources(&self) -> Vec<Resources> {
        let processes = self.processes.lock().unwrap();
        processes
            .iter()
            .filter(|p| p.name.starts_with("frontend"))
            .map(|p| Resources::of(p.pid()))
            .collect()
    }

    /// Lines in the workers' logs that contain `text`.
    fn count_in_worker_logs(&self, text: &str) -> usize {
        let mut processes = self.processes.lock().unwrap();
        processes
            .iter_mut()
            .filter(|p| p.name.starts_with("worker"))
            .map(|p| p.process.read_log().matches(text).count())
            .sum()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process's resident memory (KiB) and open file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    rss_kib: u64,
    fds: usize,
}

impl Resources {
    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        Resources { rss_kib, fds }
    }
}

/// After the run, a frontend may hold a little more than before (caches,
/// pooled connections to the restarted workers), not a leak's worth.
fn check_resources(scenario: &str, before: &[Resources], after: &[Resources]) {
    for (i, (before, after)) in before.iter().zip(after).enumerate() {
        let rss_limit = before.rss_kib + (before.rss_kib / 4).max(16 * 1024);
        assert!(
            after.rss_kib <= rss_limit,
            "{scenario}: frontend {i} holds {} KiB after the run, {} KiB before (limit {rss_limit} KiB)",
            after.rss_kib,
            before.rss_kib
        );
        let fd_limit = before.fds + 32;
        assert!(
            after.fds <= fd_limit,
            "{scenario}: frontend {i} has {} files open after the run, {} before (limit {fd_limit})",
            after.fds,
            before.fds
        );
    }
}

/// Every cancel must have reached the engines within [`CANCEL_WITHIN`].
fn check_cancel(scenario: &str, took: Duration) {
    assert!(
        took <= CANCEL_WITHIN,
        "{scenario}: the engines still ran cancelled requests {took:?} after the clients left (limit {CANCEL_WITHIN:?})"
    );
}

/// The prompts of the run, as streaming chat bodies: a long shared system
/// prompt (so KV-aware routing has cached blocks to find, and the workers
/// publish KV events) and a question of each prompt's own.
fn bodies() -> Vec<serde_json::Value> {
    let system = "You are a patient guide to the railways of the world. ".repeat(12);
    (0..PROMPTS)
        .map(|i| {
            let question = format!("Story number {i}: tell me about the trains of line {i}, ").repeat(6);
            json!({"model": "mock-model", "max_tokens": TOKENS, "stream": true,
                   "messages": [{"role": "system", "content": system},
                                {"role": "user", "content": question}]})
        })
        .collect()
}

/// One fault as it happened.
#[derive(Debug, Clone)]
struct Struck {
    fault: Fault,
    worker: usize,
    from: Instant,
    to: Instant,
    /// Migrations the frontends counted from this fault's start to the next's.
    migrated: u64,
}

/// The figures of one combination.
struct Report {
    name: String,
    seed: u64,
    tally: history::Tally,
    migrated: u64,
    faults: Vec<Struck>,
    restarts: usize,
    stalled: usize,
    withheld: usize,
    cancel: Duration,
    before: Vec<Resources>,
    after: Vec<Resources>,
    failures: BTreeMap<String, usize>,
    per_fault: BTreeMap<Fault, history::Tally>,
    start_order: Vec<String>,
    /// Invariants the run broke (empty: none).
    violations: Vec<String>,
    /// Completed answers that differ from the fault-free ones.
    corrupted: usize,
}

/// Runs one combination under chaos and checks it.
async fn run(combination: Combination, settings: &Settings) -> Report {
    let name = combination.name();
    let seed = settings.seed
        ^ (name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut mesh = Mesh::start(combination, &mut rng).await;
    mesh.ready(&http).await;
    let presence = mesh.presence().await;

    // The fault-free answers, through each frontend.
    let bodies = Arc::new(bodies());
    let fault_free = |prompt: usize, url: String| {
        let (http, body) = (http.clone(), bodies[prompt].clone());
        async move {
            let history = history::History::default();
            history.lock().unwrap().push(Record::new(prompt));
            (url.clone(), history::stream_chat(&http, &url, &body, &history, 0).await)
        }
    };
    let mut answers = Vec::new();
    for prompt in 0..PROMPTS {
        let endings =
            futures::future::join_all(mesh.frontend_urls.iter().map(|url| fault_free(prompt, url.clone()))).await;
        let mut texts = Vec::new();
        for (url, ending) in endings {
            match ending {
                Ending::Completed { text, finished: true } => texts.push(text),
                other => panic!(
                    "{name}: the fault-free request to {url} failed: {other:?}\n{}",
                    mesh.logs()
                ),
            }
        }
        assert!(
            texts.windows(2).all(|w| w[0] == w[1]),
            "{name}: two frontends gave two answers to one prompt: {texts:?}"
        );
        answers.push(texts.swap_remove(0));
    }

    // Warm up with the full load, then take the frontends' resources at rest.
    let warm = Load::start(&mesh.frontend_urls, settings.clients, bodies.clone(), seed, LOST_AFTER);
    tokio::time::sleep(Duration::from_secs(2)).await;
    warm.finish().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = mesh.frontend_resources();

    // The chaos.
    let load = Load::start(
        &mesh.frontend_urls,
        settings.clients,
        bodies.clone(),
        seed.rotate_left(17),
        LOST_AFTER,
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(settings.seconds);
    let mut schedule = Fault::applicable(combination);
    schedule.shuffle(&mut rng);
    let mut faults: Vec<Struck> = Vec::new();
    let mut next = 0;
    while Instant::now() + Duration::from_secs(1) < end {
        let pause = settings.fault_every.mul_f64(rng.random_range(0.5..1.0));
        tokio::time::sleep(pause).await;
        let fault = schedule[next % schedule.len()];
        next += 1;
        let worker = match fault {
            // The proxy stands in front of worker 0.
            Fault::NetworkDelay | Fault::NetworkBlackhole | Fault::NetworkPartition => 0,
            _ => rng.random_range(0..WORKERS),
        };
        let migrated_before = mesh.migrations(&http).await;
        if let Some(last) = faults.last_mut() {
            last.migrated = migrated_before.saturating_sub(last.migrated);
        }
        let from = Instant::now();
        println!(
            "  {name} +{:.1}s: {} (worker {worker})",
            (from - started).as_secs_f64(),
            fault.describe()
        );
        mesh.inflict(fault, worker).await;
        faults.push(Struck {
            fault,
            worker,
            from,
            to: Instant::now(),
            // The count at its start, until the next fault's start is known.
            migrated: migrated_before,
        });
    }
    tokio::time::sleep_until(end).await;
    let history = load.finish().await;
    let migrated_at_end = mesh.migrations(&http).await;
    if let Some(last) = faults.last_mut() {
        last.migrated = migrated_at_end.saturating_sub(last.migrated);
    }

    // The history, against the fault-free answers and who was in discovery.
    let expected = Expectations {
        answers: &answers,
        presence: Some(&presence),
        ttl: TTL,
    };
    // A broken invariant is recorded, not thrown at once, so the run's
    // figures are still reported beside it.
    let mut violations = Vec::new();
    let tally = match caught(|| history::check(&name, &history, &expected)) {
        Ok(tally) => tally,
        Err(violation) => {
            violations.push(violation);
            history::tally(&history)
        }
    };
    let corrupted = history
        .iter()
        .filter(|r| matches!(&r.ending, Some(Ending::Completed { text, .. }) if *text != answers[r.prompt]))
        .count();
    let migrated = mesh.migrations(&http).await;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for record in history::failures(&history) {
        if let Some(Ending::Failed(why)) = &record.ending {
            // Group by the message without ids and numbers.
            let key: String = why.chars().filter(|c| !c.is_ascii_digit()).take(120).collect();
            *failures.entry(key).or_default() += 1;
        }
    }
    let mut per_fault: BTreeMap<Fault, history::Tally> = BTreeMap::new();
    for struck in &faults {
        let window_end = struck.to + Duration::from_secs(2);
        let tally = per_fault.entry(struck.fault).or_default();
        for record in &history {
            let ended = record.ended_at.unwrap_or(record.sent_at);
            if record.sent_at <= window_end && ended >= struck.from {
                tally.sent += 1;
                match record.ending {
                    Some(Ending::Completed { .. }) => tally.completed += 1,
                    Some(Ending::Failed(_)) => tally.failed += 1,
                    _ => tally.lost += 1,
                }
            }
        }
    }

    // Every worker back and idle, then a cancel must reach the engines.
    mesh.ready(&http).await;
    let cancel = cancel_latency(&mesh, &http, &bodies).await;
    violations.extend(caught(|| check_cancel(&name, cancel)).err());

    // Back at rest: the frontends' memory and open files.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = mesh.frontend_resources();
    violations.extend(caught(|| check_resources(&name, &before, &after)).err());

    let restarts = mesh.processes.lock().unwrap().iter().map(|p| p.exits.len()).sum();
    Report {
        name,
        seed: settings.seed,
        tally,
        migrated,
        faults,
        restarts,
        stalled: mesh.count_in_worker_logs("stalling before the first token"),
        withheld: mesh.count_in_worker_logs("KV event batch withheld"),
        cancel,
        before,
        after,
        failures,
        per_fault,
        start_order: mesh.start_order.clone(),
        violations,
        corrupted,
    }
}

/// Runs a check that panics when an invariant breaks; returns the message instead.
fn caught<T>(check: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a check panicked".into())
    })
}

/// Starts a few streams, waits until every one has its first token, drops
/// them all at once, and measures how long until no engine runs any.
async fn cancel_latency(mesh: &Mesh, http: &reqwest::Client, bodies: &[serde_json::Value]) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(20);
    while mesh.running(http).await.iter().sum::<u64>() > 0 {
        assert!(Instant::now() < deadline, "the engines never went idle after the run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let streams = 8;
    let (first_tokens, mut arrived) = tokio::sync::mpsc::channel(streams);
    let mut tasks = Vec::new();
    for i in 0..streams {
        let url = mesh.frontend_urls[i % FRONTENDS].clone();
        let mut body = bodies[i % bodies.len()].clone();
        body["max_tokens"] = json!(4000);
        let (http, first_tokens) = (http.clone(), first_tokens.clone());
        tasks.push(tokio::spawn(async move {
            use futures::StreamExt;
            let response = http.post(format!("{url}/v1/chat/completions")).json(&body).send().await;
            let Ok(response) = response else { return };
            let mut bytes = response.bytes_stream();
            let mut told = false;
            while let Some(Ok(chunk)) = bytes.next().await {
                if !told && String::from_utf8_lossy(&chunk).contains("\"content\"") {
                    told = true;
                    let _ = first_tokens.send(()).await;
                }
            }
        }));
    }
    for _ in 0..streams {
        tokio::time::timeout(Duration::from_secs(20), arrived.recv())
            .await
            .expect("every cancel-probe stream gets its first token");
    }
    // Let them run a little, as streams a client leaves mid-answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        mesh.running(http).await.iter().sum::<u64>() > 0,
        "the probes run in the engines"
    );
    let dropped = Instant::now();
    for task in &tasks {
        task.abort();
    }
    loop {
        if mesh.running(http).await.iter().sum::<u64>() == 0 {
            return dropped.elapsed();
        }
        if dropped.elapsed() > Duration::from_secs(10) {
            return dropped.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Prints one combination's results as markdown.
fn print(report: &Report) {
    let t = &report.tally;
    println!(
        "\n### {} (seed {}: `SWITCHYARD_CHAOS_SEED={} SWITCHYARD_CHAOS_ONLY={}`)\n",
        report.name, report.seed, report.seed, report.name
    );
    println!(
        "| sent | completed | migrated | failed | lost | corrupted | faults | restarts | stalled first tokens | KV batches withheld | cancel reached engines | frontend RSS before → after | frontend fds before → after |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    let rss: Vec<String> = report
        .before
        .iter()
        .zip(&report.after)
        .map(|(b, a)| format!("{}→{} MiB", b.rss_kib / 1024, a.rss_kib / 1024))
        .collect();
    let fds: Vec<String> = report
        .before
        .iter()
        .zip(&report.after)
        .map(|(b, a)| format!("{}→{}", b.fds, a.fds))
        .collect();
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} ms | {} | {} |",
        t.sent,
        t.completed,
        report.migrated,
        t.failed,
        t.lost,
        report.corrupted,
        report.faults.len(),
        report.restarts,
        report.stalled,
        report.withheld,
        report.cancel.as_secs_f64() * 1000.0,
        rss.join(", "),
        fds.join(", ")
    );
    println!("\n| fault | times | requests in flight | completed | migrated | failed | lost |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (fault, tally) in &report.per_fault {
        let struck = report.faults.iter().filter(|s| s.fault == *fault);
        let times = struck.clone().count();
        let migrated: u64 = struck.map(|s| s.migrated).sum();
        println!(
            "| {} | {times} | {} | {} | {migrated} | {} | {} |",
            fault.describe(),
            tally.sent,
            tally.completed,
            tally.failed,
            tally.lost
        );
    }
    if !report.failures.is_empty() {
        println!("\nFailures, by message:");
        for (why, count) in &report.failures {
            println!("- {count} × {why}");
        }
    }
    let schedule: Vec<String> = report
        .faults
        .iter()
        .map(|s| match s.fault {
            Fault::EtcdRestart | Fault::NatsRestart => format!("{:?} {:.1}s", s.fault, (s.to - s.from).as_secs_f64()),
            _ => format!("{:?}(w{}) {:.1}s", s.fault, s.worker, (s.to - s.from).as_secs_f64()),
        })
        .collect();
    for violation in &report.violations {
        println!("\n**Invariant broken**: {violation}");
    }
    println!("\nStarted in this order: {}.", report.start_order.join(", "));
    println!("Schedule: {}.", schedule.join(", "));
}

/// Runs every combination (a failed one does not stop the others), then
/// fails with what went wrong in each.
async fn chaos(settings: Settings) {
    use futures::FutureExt;
    println!(
        "chaos: seed {}, {} clients, {} s per combination, a fault every ≤ {:?}",
        settings.seed, settings.clients, settings.seconds, settings.fault_every
    );
    let mut failed = Vec::new();
    for combination in &settings.combinations {
        let outcome = std::panic::AssertUnwindSafe(run(*combination, &settings))
            .catch_unwind()
            .await;
        let report = match outcome {
            Ok(report) => report,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("\n### {} FAILED\n\n{message}", combination.name());
                failed.push(message);
                continue;
            }
        };
        print(&report);
        failed.extend(report.violations.iter().cloned());
        let success = report.tally.completed as f64 / report.tally.sent.max(1) as f64;
        if success < 0.9 {
            failed.push(format!(
                "{}: only {:.1} % of requests completed: {:?}",
                report.name,
                success * 100.0,
                report.failures
            ));
        }
    }
    assert!(failed.is_empty(), "chaos (seed {}): {failed:#?}", settings.seed);
}

/// The short chaos run of `make test`: every combination, a few seconds each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    chaos(Settings::from_env(24, 6, Duration::from_millis(2500))).await;
}

/// The long chaos run (`make chaos`, release build): 200 clients, 60 s per combination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with `make chaos`"]
async fn chaos_long() {
    chaos(Settings::from_env(200, 60, Duration::from_secs(4))).await;
}

#[test]
#[should_panic(expected = "holds 40000 KiB after the run")]
fn checker_fails_a_frontend_that_kept_memory() {
    let before = [Resources {
        rss_kib: 20_000,
        fds: 30,
    }];
    let after = [Resources {
        rss_kib: 40_000,
        fds: 30,
    }];
    check_resources("leak", &before, &after);
}

#[test]
#[should_panic(expected = "has 80 files open after the run")]
fn checker_fails_a_frontend_that_kept_files_open() {
    let before = [Resources {
        rss_kib: 20_000,
        fds: 30,
    }];
    let after = [Resources {
        rss_kib: 20_000,
        fds: 80,
    }];
    check_resources("fd leak", &before, &after);
}

#[test]
fn checker_passes_a_frontend_back_at_rest() {
    let before = [Resources {
        rss_kib: 20_000,
        fds: 30,
    }];
    let after = [Resources {
        rss_kib: 30_000,
        fds: 40,
    }];
    check_resources("at rest", &before, &after);
}

#[test]
#[should_panic(expected = "still ran cancelled requests")]
fn checker_fails_a_cancel_that_reached_the_engine_late() {
    check_cancel("slow cancel", Duration::from_millis(150));
}

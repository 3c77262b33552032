//! `switchyard kv-quality`: the routing modes side by side on one trace.
//!
//! For each mode it starts a fresh local cluster of separate processes (this
//! same binary: `--workers` mocker workers, then a frontend in that mode, on
//! file discovery in a temporary directory), replays the same generated
//! trace with `bench --trace`, reads the workers' prefix-cache counters, and
//! stops the cluster. Then a trace without shared prefixes, least_loaded
//! against kv. It writes the traces, each run's JSON, a Markdown table and
//! two SVG charts into `--out`, and prints the table. It asserts nothing:
//! the goals are reported as measured.

use crate::bench::{self, Api, BenchArgs, Length, Report};
use crate::svg::{Chart, Series};
use crate::trace::{self, TraceArgs};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

type AppError = Box<dyn std::error::Error + Send + Sync>;

/// How long a process of the cluster may take to come up.
const START_WAIT: Duration = Duration::from_secs(30);

/// Flags of `switchyard kv-quality`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct QualityArgs {
    /// Where the traces, each run's JSON, the table and the charts go.
    #[arg(long, default_value = "target/kv-quality")]
    pub(crate) out: PathBuf,
    /// Mocker worker processes per cluster.
    #[arg(long, default_value_t = 8)]
    pub(crate) workers: usize,
    /// Share of the cluster's KV cache the prefix groups fill when each is cached once.
    #[arg(long, default_value_t = 0.7)]
    pub(crate) kv_fraction: f64,
    /// Mocker speed-up and trace speed-up alike (the load stays the same, only faster).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) speedup: f64,
    /// Requests in each trace.
    #[arg(long, default_value_t = 2400)]
    pub(crate) requests: usize,
    /// Poisson arrivals per second of simulated time.
    #[arg(long, default_value_t = 48.0)]
    pub(crate) rate: f64,
    /// Seed of the traces.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}

/// The trace shape: `switchyard trace`'s defaults, after llm-d's published
/// shared-prefix benchmark scaled down (150 groups of a 12-block, 6k-token
/// prefix, 2–3 unique blocks ≈ its 1.2k-token queries, 32–96 output
/// tokens, blocks of 512).
fn trace_args(args: &QualityArgs, no_shared_prefix: bool) -> TraceArgs {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        trace: TraceArgs,
    }
    let defaults = <Defaults as clap::Parser>::parse_from(["trace"]).trace;
    TraceArgs {
        requests: args.requests,
        rate: args.rate,
        seed: args.seed,
        no_shared_prefix,
        ..defaults
    }
}

/// One run: a routing mode on one trace.
struct Run {
    label: &'static str,
    frontend: &'static [&'static str],
    shared: bool,
}

const RUNS: [Run; 6] = [
    Run {
        label: "random",
        frontend: &["--router-mode", "random"],
        shared: true,
    },
    Run {
        label: "least_loaded",
        frontend: &["--router-mode", "least_loaded"],
        shared: true,
    },
    Run {
        label: "kv, approximate only",
        frontend: &["--router-mode", "kv", "--no-router-kv-events"],
        shared: true,
    },
    Run {
        label: "kv, events",
        frontend: &["--router-mode", "kv"],
        shared: true,
    },
    Run {
        label: "least_loaded",
        frontend: &["--router-mode", "least_loaded"],
        shared: false,
    },
    Run {
        label: "kv, events",
        frontend: &["--router-mode", "kv"],
        shared: false,
    },
];

/// What the cluster's workers are given, derived from the trace.
#[derive(Debug, Clone, Copy)]
struct Sizing {
    /// The mocker's own block size (its default, 64), the unit of `--num-gpu-blocks`.
    mocker_block: u32,
    blocks_per_worker: u64,
    context_length: u32,
}

fn sizing(args: &QualityArgs, shape: &TraceArgs, trace: &[trace::TraceRequest]) -> Result<Sizing, String> {
    let mocker_block = 64;
    let prefix_tokens = u64::from(shape.groups) * u64::from(shape.prefix_blocks) * u64::from(shape.block_size);
    let cluster_tokens = prefix_tokens as f64 / args.kv_fraction;
    let blocks_per_worker = (cluster_tokens / args.workers as f64 / f64::from(mocker_block)).ceil() as u64;
    let largest = trace
        .iter()
        .map(|r| r.input_length + r.output_length)
        .max()
        .unwrap_or(1);
    if blocks_per_worker * u64::from(mocker_block) < u64::from(largest) {
        return Err(format!(
            "{blocks_per_worker} blocks of {mocker_block} per worker cannot hold the largest request \
             ({largest} tokens); raise --kv-fraction's denominator or lower --workers"
        ));
    }
    Ok(Sizing {
        mocker_block,
        blocks_per_worker,
        context_length: largest.max(8192),
    })
}

/// A local cluster; dropping it kills its processes (only those) and removes its directory.
struct Cluster {
    children: Vec<Child>,
    dir: PathBuf,
    frontend_url: String,
    worker_metrics: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Frontend first (it was pushed last), so it does not retry on dying workers.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> std::io::Result<u16> {
    // The port is free when we look; nothing else on this machine races for it in practice.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(exe: &Path, args: &[String], env: &[(&str, String)], log: &Path) -> Result<Child, AppError> {
    let file = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    Ok(child)
}

async fn wait_until(what: &str, mut ready: impl AsyncFnMut() -> bool) -> Result<(), AppError> {
    let deadline = tokio::time::Instant::now() + START_WAIT;
    while !ready().await {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what} within {START_WAIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn start_cluster(args: &QualityArgs, sizing: Sizing, frontend_flags: &[&str]) -> Result<Cluster, AppError> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("switchyard-kv-quality-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    let mut cluster = Cluster {
        children: Vec::new(),
        dir: dir.clone(),
        frontend_url: String::new(),
        worker_metrics: Vec::new(),
    };
    let env = vec![
        ("DYN_DISCOVERY_BACKEND", "file".to_string()),
        ("DYN_FILE_KV", dir.join("kv").display().to_string()),
        ("DYN_EVENT_PLANE", "zmq".to_string()),
        ("DYN_LOG", "info".to_string()),
    ];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    for index in 0..args.workers {
        let port = free_port()?;
        let mut env = env.clone();
        env.push(("DYN_SYSTEM_PORT", port.to_string()));
        let flags: Vec<String> = [
            "worker",
            "mocker",
            "--num-gpu-blocks",
            &sizing.blocks_per_worker.to_string(),
            "--block-size",
            &sizing.mocker_block.to_string(),
            "--speedup-ratio",
            &args.speedup.to_string(),
            "--context-length",
            &sizing.context_length.to_string(),
        ]
        .map(String::from)
        .to_vec();
        cluster
            .children
            .push(spawn(&exe, &flags, &env, &dir.join(format!("worker-{index}.log")))?);
        let health = format!("http://127.0.0.1:{port}/health");
        wait_until(
            &format!("worker {index} was not healthy (log: {})", dir.display()),
            async || http.get(&health).send().await.is_ok_and(|r| r.status().is_success()),
        )
        .await?;
        cluster.worker_metrics.push(format!("http://127.0.0.1:{port}/metrics"));
    }
    let port = free_port()?;
    let mut flags: Vec<String> = ["frontend", "--http-host", "127.0.0.1", "--http-port", &port.to_string()]
        .map(String::from)
        .to_vec();
    flags.extend(frontend_flags.iter().map(|f| f.to_string()));
    let log = dir.join("frontend.log");
    cluster.children.push(spawn(&exe, &flags, &env, &log)?);
    cluster.frontend_url = format!("http://127.0.0.1:{port}");
    // Every worker's card seen, and with events, every subscription made.
    let events = frontend_flags.contains(&"kv") && !frontend_flags.contains(&"--no-router-kv-events");
    wait_until(
        &format!("the frontend did not see all workers (log: {})", log.display()),
        async || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.matches("model worker added").count() >= args.workers
                && (!events || text.matches("following KV events").count() >= args.workers)
        },
    )
    .await?;
    Ok(cluster)
}

fn bench_args(url: &str, trace: &Path, speedup: f64, worker_metrics: Vec<String>) -> BenchArgs {
    BenchArgs {
        url: url.to_string(),
        model: "mock-model".into(),
        concurrency: 1,
        rate: None,
        requests: 1,
        duration: None,
        prompt_tokens: Length::Fixed(1),
        output_tokens: Length::Fixed(1),
        stream: true,
        // The completions API hands the prompt to the mocker as is, so each
        // trace block is exactly its tokens (chat would add a role word).
        api: Api::Completions,
        seed: 0,
        json: None,
        markdown: None,
        plot: None,
        quiet: true,
        trace: Some(trace.to_path_buf()),
        trace_block_size: 512,
        trace_speedup: speedup,
        max_in_flight: 4096,
        api_key: None,
        worker_metrics,
    }
}

pub(crate) async fn main(args: QualityArgs) -> Result<(), AppError> {
    if args.workers == 0 || !(args.kv_fraction > 0.0 && args.kv_fraction.is_finite()) {
        return Err("--workers must be at least 1 and --kv-fraction positive".into());
    }
    if !(args.speedup > 0.0 && args.speedup.is_finite()) {
        return Err("--speedup must be a positive number".into());
    }
    std::fs::create_dir_all(&args.out)?;
    let shape = trace_args(&args, false);
    let shared = trace::generate(&shape)?;
    let unique = trace::generate(&trace_args(&args, true))?;
    let sizing = sizing(&args, &shape, &shared)?;
    let write_trace = |name: &str, trace: &[trace::TraceRequest]| -> std::io::Result<PathBuf> {
        let path = args.out.join(name);
        let text: String = trace.iter().map(|r| trace::to_line(r) + "\n").collect();
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let shared_path = write_trace("shared-prefix.jsonl", &shared)?;
    let unique_path = write_trace("no-shared-prefix.jsonl", &unique)?;

    let span_s = shared.last().map_or(0.0, |r| r.timestamp_ms) / 1000.0;
    let mut intro = String::new();
    writeln!(
        intro,
        "Trace: {} requests, Poisson {}/s over {:.0} s of simulated time; {} prefix groups of {} blocks of {} tokens \
         ({} tokens each), then {} unique blocks, last block cut by < {}; output {} tokens. \
         Cluster: {} mocker workers × {} blocks of {} tokens ({:.0} % of the cluster's KV holds every prefix once); \
         speed-up {}.\n",
        shape.requests,
        shape.rate,
        span_s,
        shape.groups,
        shape.prefix_blocks,
        shape.block_size,
        shape.prefix_blocks * shape.block_size,
        length_text(shape.suffix_blocks),
        shape.block_size.div_ceil(2),
        length_text(shape.output_tokens),
        args.workers,
        sizing.blocks_per_worker,
        sizing.mocker_block,
        args.kv_fraction * 100.0,
        args.speedup,
    )?;
    print!("{intro}");

    let mut results: Vec<(&Run, Report)> = Vec::new();
    for run in &RUNS {
        let trace = if run.shared { &shared_path } else { &unique_path };
        eprintln!("kv-quality: {} on {} …", run.label, trace.display());
        let cluster = start_cluster(&args, sizing, run.frontend).await?;
        let report = bench::run(&bench_args(
            &cluster.frontend_url,
            trace,
            args.speedup,
            cluster.worker_metrics.clone(),
        ))
        .await?;
        drop(cluster);
        let name = format!(
            "{}-{}.json",
            run.label
                .replace([',', ' '], "")
                .replace("kvapproximateonly", "kv-approximate"),
            if run.shared { "shared" } else { "unique" }
        );
        std::fs::write(args.out.join(name), serde_json::to_vec_pretty(&report)?)?;
        eprintln!(
            "kv-quality: {}: p90 TTFT {:.0} ms, {:.0} output tok/s",
            run.label, report.ttft_ms.p90, report.output_tokens_per_s
        );
        results.push((run, report));
    }

    let mut out = intro;
    out.push_str(&table(&results));
    out.push('\n');
    out.push_str(&goals(&results));
    print!("{}", &out[out.find('|').unwrap_or(0)..]);
    std::fs::write(args.out.join("kv-quality.md"), &out)?;
    std::fs::write(args.out.join("kv-quality-ttft.svg"), ttft_chart(&results).render())?;
    eprintln!("kv-quality: wrote {}", args.out.display());
    Ok(())
}

fn length_text(length: Length) -> String {
    match length {
        Length::Fixed(n) => n.to_string(),
        Length::Uniform(a, b) => format!("{a}–{b}"),
    }
}

fn table(results: &[(&Run, Report)]) -> String {
    let mut out = String::from(
        "| router | trace | ok | req/s | output tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 ms | E2E p90 ms | prefix-cache hits | errors |\n\
         |---|---|---:|---:|---:|---|---|---:|---:|---|\n",
    );
    for (run, r) in results {
        let errors = if r.errors.is_empty() {
            "none".to_string()
        } else {
            r.errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}/{} | {:.2} | {:.0} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} | {:.0} | {} | {} |",
            run.label,
            if run.shared {
                "shared prefixes"
            } else {
                "no shared prefix"
            },
            r.completed,
            r.requests,
            r.requests_per_s,
            r.output_tokens_per_s,
            r.ttft_ms.p50,
            r.ttft_ms.p90,
            r.ttft_ms.p99,
            r.itl_ms.p50,
            r.itl_ms.p90,
            r.e2e_ms.p90,
            r.prefix_cache_hit_rate
                .map_or_else(|| "n/a".into(), |h| format!("{:.1} %", h * 100.0)),
            errors,
        );
    }
    out
}

/// The goals, each with its measured figures and met or missed.
fn goals(results: &[(&Run, Report)]) -> String {
    let find = |label: &str, shared: bool| {
        results
            .iter()
            .find(|(run, _)| run.label == label && run.shared == shared)
            .map(|(_, report)| report)
    };
    let (Some(ll), Some(approx), Some(kv), Some(ll_unique), Some(kv_unique)) = (
        find("least_loaded", true),
        find("kv, approximate only", true),
        find("kv, events", true),
        find("least_loaded", false),
        find("kv, events", false),
    ) else {
        return String::new();
    };
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let ttft_ratio = ll.ttft_ms.p90 / kv.ttft_ms.p90;
    let throughput_ratio = kv.output_tokens_per_s / ll.output_tokens_per_s;
    let unique_throughput = kv_unique.output_tokens_per_s / ll_unique.output_tokens_per_s - 1.0;
    let unique_ttft = kv_unique.ttft_ms.p90 / ll_unique.ttft_ms.p90 - 1.0;
    let mut out = String::from("| goal | measured | |\n|---|---|---|\n");
    let _ = writeln!(
        out,
        "| kv p90 TTFT ≥ 5× lower than least_loaded | {ttft_ratio:.1}× ({:.0} vs {:.0} ms) | {} |",
        kv.ttft_ms.p90,
        ll.ttft_ms.p90,
        verdict(ttft_ratio >= 5.0)
    );
    let _ = writeln!(
        out,
        "| kv p90 TTFT lower than approximate-only | {:.0} vs {:.0} ms | {} |",
        kv.ttft_ms.p90,
        approx.ttft_ms.p90,
        verdict(kv.ttft_ms.p90 < approx.ttft_ms.p90)
    );
    let _ = writeln!(
        out,
        "| kv throughput ≥ 1.3× least_loaded | {throughput_ratio:.2}× ({:.0} vs {:.0} output tok/s) | {} |",
        kv.output_tokens_per_s,
        ll.output_tokens_per_s,
        verdict(throughput_ratio >= 1.3)
    );
    let _ = writeln!(
        out,
        "| no shared prefix: kv within 5 % of least_loaded | throughput {:+.1} %, p90 TTFT {:+.1} % | {} |",
        unique_throughput * 100.0,
        unique_ttft * 100.0,
        verdict(unique_throughput.abs() <= 0.05 && unique_ttft <= 0.05)
    );
    out
}

fn ttft_chart(results: &[(&Run, Report)]) -> Chart {
    Chart {
        title: "TTFT by percentile (log scale)".into(),
        x_label: "percentile".into(),
        y_label: "log10 TTFT ms (2 = 100 ms, 3 = 1 s)".into(),
        series: results
            .iter()
            .map(|(run, report)| Series {
                name: format!("{}{}", run.label, if run.shared { "" } else { " (no sharing)" }),
                points: report
                    .ttft_curve_ms
                    .iter()
                    .map(|&(p, ms)| (p, ms.max(1.0).log10()))
                    .collect(),
                dots: !run.shared,
            })
            .collect(),
    }
}

//! `switchyard sweep`: the real stack against the queueing model.
//!
//! For c = 1 … `--max-workers` it starts, in this process, a frontend and c
//! mocker workers that run one request at a time (`max_num_seqs = 1`) with a
//! fixed service time 1/μ (the engine's timing model scaled by its speed-up),
//! drives Poisson load at several utilisations through the OpenAI API, and
//! prints measured throughput and mean latency beside the M/M/c prediction.
//! A second table runs closed batches (all tasks sent at once) of 5 ms tasks,
//! the setting of the reference orchestrator figures.

use crate::bench::{self, Api, BenchArgs, Length};
use crate::model::mmc;
use crate::svg::{Chart, Series};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchyard_frontend::FrontendArgs;
use switchyard_mocker::timing::{decode_ms, prefill_ms};
use switchyard_mocker_worker::MockerArgs;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::{MemDiscovery, MemRegistry};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::runtime::Runtime;

type AppError = Box<dyn std::error::Error + Send + Sync>;

/// Flags of `switchyard sweep`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SweepArgs {
    /// Service rate μ of one worker, requests per second.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) mu: f64,
    /// Largest worker count c.
    #[arg(long, default_value_t = 4)]
    pub(crate) max_workers: usize,
    /// Utilisations ρ = λ/(cμ) to run at.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.8,0.9")]
    pub(crate) rho: Vec<f64>,
    /// Requests per point.
    #[arg(long, default_value_t = 400)]
    pub(crate) requests: usize,
    /// Batch sizes of the closed-batch table (0 to skip it).
    #[arg(long, value_delimiter = ',', default_value = "500,1200")]
    pub(crate) batches: Vec<usize>,
    /// Write the tables here (Markdown).
    #[arg(long)]
    pub(crate) markdown: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
}

/// The engine's own time for a one-token prompt and one output token (ms),
/// before the speed-up: one step that prefills and decodes.
fn raw_service_ms() -> f64 {
    prefill_ms(1) + decode_ms(0.0)
}

/// A frontend and `workers` single-sequence mocker workers on private in-memory discovery.
struct Stack {
    runtime: Runtime,
    url: String,
}

async fn start_stack(workers: usize, service_ms: f64) -> Result<Stack, AppError> {
    let registry = MemRegistry::new();
    let runtime = Runtime::new(RuntimeConfig::local());
    let drt = |runtime: &Runtime| {
        DistributedRuntime::with_discovery(runtime.clone(), Arc::new(MemDiscovery::new(registry.clone())))
    };
    let mocker = MockerArgs {
        max_num_seqs: 1,
        speedup_ratio: raw_service_ms() / service_ms,
        ..MockerArgs::default()
    };
    for _ in 0..workers {
        switchyard_mocker_worker::serve(&drt(&runtime)?, &mocker).await?;
    }
    let frontend = FrontendArgs {
        http_host: "127.0.0.1".into(),
        http_port: 0,
        ..FrontendArgs::default()
    };
    let serving = switchyard_frontend::start(&drt(&runtime)?, &frontend).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while serving
        .models
        .get(&mocker.model_name)
        .is_none_or(|m| m.cards.len() < workers || !m.has_live_worker())
    {
        if tokio::time::Instant::now() > deadline {
            return Err("the sweep's frontend did not see its workers within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Stack {
        runtime,
        url: format!("http://{}", serving.address),
    })
}

fn load(url: &str, rate: Option<f64>, concurrency: usize, requests: usize) -> BenchArgs {
    BenchArgs {
        url: url.to_string(),
        model: "mock-model".into(),
        concurrency,
        rate,
        requests,
        duration: None,
        prompt_tokens: Length::Fixed(1),
        output_tokens: Length::Fixed(1),
        stream: false,
        api: Api::Completions,
        seed: 7,
        json: None,
        markdown: None,
        plot: None,
        quiet: true,
        trace: None,
        trace_block_size: 512,
        trace_speedup: 1.0,
        max_in_flight: 4096,
        api_key: None,
        worker_metrics: Vec::new(),
    }
}

/// One measured point of the open-loop table.
struct Point {
    workers: usize,
    rho: f64,
    lambda: f64,
    throughput: f64,
    mean_ms: f64,
    model_ms: f64,
    md_ms: f64,
}

pub(crate) async fn main(args: SweepArgs) -> Result<(), AppError> {
    if !(args.mu > 0.0 && args.mu.is_finite()) || args.max_workers == 0 || args.requests == 0 {
        return Err("--mu must be positive; --max-workers and --requests at least 1".into());
    }
    if let Some(bad) = args.rho.iter().find(|r| !(**r > 0.0 && **r < 1.0)) {
        return Err(format!("--rho values must lie strictly between 0 and 1 (got {bad})").into());
    }
    let service_ms = 1000.0 / args.mu;
    let mut out = String::new();

    // Calibration on one worker. Its real service rate: the throughput of a
    // worker that is never idle (the timer rounds each simulated step up to
    // whole milliseconds, so it is a little below the nominal μ). Then the
    // dispatch delay d: what one request costs beyond that, at no load.
    let stack = start_stack(1, service_ms).await?;
    bench::run(&load(&stack.url, None, 1, 20)).await?;
    let saturated = bench::run(&load(&stack.url, None, 4, 200)).await?;
    let idle = bench::run(&load(&stack.url, None, 1, 100)).await?;
    stack.runtime.shutdown().await;
    let mu = saturated.requests_per_s;
    let effective_ms = 1000.0 / mu;
    let delay_ms = (idle.e2e_ms.mean - effective_ms).max(0.0);
    out.push_str(&format!(
        "Nominal service time {service_ms:.2} ms (μ = {}/s); measured on one saturated worker: μ = {mu:.1}/s \
         ({effective_ms:.2} ms per request); end-to-end at no load {:.2} ms, so dispatch delay d = {delay_ms:.2} ms. \
         The model below uses the measured μ and d; λ = ρ·c·μ.\n\n",
        args.mu, idle.e2e_ms.mean
    ));

    out.push_str(
        "| workers c | ρ | λ (/s) | measured throughput (/s) | measured mean (ms) | M/M/c + d (ms) | M/D/c ≈ (ms) | measured / M/M/c |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut points = Vec::new();
    for workers in 1..=args.max_workers {
        let stack = start_stack(workers, service_ms).await?;
        for &rho in &args.rho {
            let lambda = rho * workers as f64 * mu;
            let report = bench::run(&load(&stack.url, Some(lambda), 1, args.requests)).await?;
            let model = mmc(lambda, mu, workers, delay_ms / 1000.0);
            // Deterministic service halves the queueing delay (the M/D/c approximation).
            let md = delay_ms + model.lq / lambda * 1000.0 / 2.0 + effective_ms;
            let point = Point {
                workers,
                rho,
                lambda,
                throughput: report.requests_per_s,
                mean_ms: report.e2e_ms.mean,
                model_ms: model.time_s * 1000.0,
                md_ms: md,
            };
            out.push_str(&format!(
                "| {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                point.workers,
                point.rho,
                point.lambda,
                point.throughput,
                point.mean_ms,
                point.model_ms,
                point.md_ms,
                point.mean_ms / point.model_ms
            ));
            points.push(point);
        }
        stack.runtime.shutdown().await;
    }

    let batches: Vec<usize> = args.batches.iter().copied().filter(|b| *b > 0).collect();
    if !batches.is_empty() {
        out.push_str(
            "\nClosed batches of 5 ms tasks (every task sent at once; tasks/s = tasks / time to finish all):\n\n\
             | workers | ",
        );
        out.push_str(
            &batches
                .iter()
                .map(|b| format!("{b} tasks"))
                .collect::<Vec<_>>()
                .join(" | "),
        );
        out.push_str(" | reference orchestrator |\n|---:|");
        out.push_str(&"---:|".repeat(batches.len() + 1));
        out.push('\n');
        let reference = ["≈82", "≈137", "175–182", "209–220"];
        for workers in 1..=args.max_workers.min(4) {
            let stack = start_stack(workers, 5.0).await?;
            bench::run(&load(&stack.url, None, 32, 64)).await?;
            let mut row = format!("| {workers} |");
            for &tasks in &batches {
                let report = bench::run(&load(&stack.url, None, tasks, tasks)).await?;
                row.push_str(&format!(" {:.0} |", report.completed as f64 / report.duration_s));
            }
            row.push_str(&format!(" {} |\n", reference[workers - 1]));
            out.push_str(&row);
            stack.runtime.shutdown().await;
        }
    }

    print!("{out}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &out)?;
    }
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir)?;
        let mut series = Vec::new();
        for workers in 1..=args.max_workers {
            let mine: Vec<&Point> = points.iter().filter(|p| p.workers == workers).collect();
            series.push(Series {
                name: format!("c={workers} measured"),
                points: mine.iter().map(|p| (p.rho, p.mean_ms)).collect(),
                dots: false,
            });
            series.push(Series {
                name: format!("c={workers} M/M/c"),
                points: mine.iter().map(|p| (p.rho, p.model_ms)).collect(),
                dots: true,
            });
        }
        let chart = Chart {
            title: "Mean latency: measured vs M/M/c".into(),
            x_label: "utilisation ρ".into(),
            y_label: "mean latency (ms)".into(),
            series,
        };
        std::fs::write(dir.join("sweep-latency.svg"), chart.render())?;
        let chart = Chart {
            title: "Throughput: measured vs offered".into(),
            x_label: "offered λ (/s)".into(),
            y_label: "completed (/s)".into(),
            series: vec![
                Series {
                    name: "measured".into(),
                    points: points.iter().map(|p| (p.lambda, p.throughput)).collect(),
                    dots: true,
                },
                Series {
                    name: "offered".into(),
                    points: points.iter().map(|p| (p.lambda, p.lambda)).collect(),
                    dots: false,
                },
            ],
        };
        std::fs::write(dir.join("sweep-throughput.svg"), chart.render())?;
    }
    Ok(())
}

//! `switchyard`: one binary for every process of a deployment.
//!
//! - `switchyard run`: the all-in-one local job — frontend plus mocker
//!   workers in one process on in-memory discovery, no infrastructure.
//! - `switchyard frontend`: the OpenAI HTTP frontend.
//! - `switchyard worker mocker`: a simulated vLLM worker.
//! - `switchyard worker vllm`: a worker in front of vLLM servers.
//! - `switchyard instances`: what discovery holds.
//! - `switchyard bench`, `model`, `sweep`: load generation, the M/M/c
//!   model, and the real stack measured beside it.
//! - `switchyard trace`: writes a shared-prefix trace for `bench --trace`.
//! - `switchyard kv-quality`: the routing modes side by side on one trace,
//!   each on its own cluster of separate processes.
//! - `switchyard mocker-vllm serve`: the mocker behind vLLM's own HTTP API, a
//!   stand-in for `vllm serve` to test the vLLM worker without a GPU.
//!
//! Runtime settings (discovery, planes, status server) come from `DYN_*`
//! variables as for every Switchyard process; the flags here are the
//! component's own.

mod bench;
#[cfg(test)]
mod flag_tests;
mod instances;
mod mocker_vllm;
mod model;
mod quality;
mod svg;
mod sweep;
#[cfg(test)]
mod tests;
mod trace;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use switchyard_frontend::FrontendArgs;
use switchyard_mocker_worker::{KvEventsBind, MockerArgs};
use switchyard_runtime::config::{DiscoveryBackend, RuntimeConfig};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::error::Report;
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::worker::Worker;

/// mimalloc, not the system allocator: on a multi-threaded runtime a buffer
/// is often freed on another thread than the one that made it, and glibc
/// then takes the other thread's arena lock (docs/adr/0014-mimalloc-in-the-binaries.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// vLLM's default KV-cache block size, the stand-in's too.
const VLLM_BLOCK_SIZE: &str = "16";

/// How long `run` waits for its own frontend to see its own workers.
const READY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "A service mesh for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Frontend and mocker workers in one process, on in-memory discovery.
    Run {
        #[command(flatten)]
        frontend: FrontendArgs,
        #[command(flatten)]
        mocker: MockerArgs,
    },
    /// The OpenAI-compatible HTTP frontend.
    Frontend(FrontendArgs),
    /// A worker process.
    #[command(subcommand)]
    Worker(WorkerKind),
    /// Load-test an OpenAI-compatible endpoint (ours or any other).
    Bench(bench::BenchArgs),
    /// The M/M/c queueing model with dispatch delay, across worker counts.
    Model(model::ModelArgs),
    /// Run the real stack at several loads and worker counts beside the queueing model.
    Sweep(sweep::SweepArgs),
    /// Write a shared-prefix request trace (Mooncake's format) for `bench --trace`.
    Trace(trace::TraceArgs),
    /// Replay one trace through each routing mode, each on its own local cluster, side by side.
    KvQuality(quality::QualityArgs),
    /// List what discovery holds: endpoint instances, their addresses and models.
    Instances(instances::InstancesArgs),
    /// A stand-in for vLLM's OpenAI server, backed by the mocker (for tests without a GPU).
    #[command(subcommand, name = "mocker-vllm")]
    MockerVllm(VllmCompat),
}

#[derive(Debug, Subcommand)]
enum VllmCompat {
    /// `vllm serve`'s shape: `serve [--host H] [--port P] MODEL [ignored vLLM flags…]`.
    // Two mocker flags take vLLM's form and default here: a bare
    // `--enable-prefix-caching` (vLLM's flag takes no value), and a block
    // size of 16 (vLLM's), so the card a vLLM worker writes for its engine
    // holds for the stand-in too.
    #[command(
        mut_arg("enable_prefix_caching", |arg| arg.num_args(0..=1).default_missing_value("true")),
        mut_arg("block_size", |arg| arg.default_value(VLLM_BLOCK_SIZE)),
    )]
    Serve {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// vLLM's KV event settings (JSON): when they enable events, the
        /// engine publishes them where they say, as vLLM does.
        #[arg(long, value_name = "JSON")]
        kv_events_config: Option<String>,
        /// The model name to serve.
        model: String,
        /// vLLM flags the mocker has no use for.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ignored: Vec<String>,
        #[command(flatten)]
        mocker: MockerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum WorkerKind {
    /// A simulated vLLM engine (no GPU).
    Mocker(MockerArgs),
    /// In front of vLLM OpenAI servers: attach to running ones or start them.
    Vllm(Box<switchyard_vllm::VllmArgs>),
}

type AppError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchyard: {}", Report(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<(), AppError> {
    // The measuring commands need no mesh settings, only an async runtime.
    match command {
        Command::Model(args) => return model::main(args),
        Command::Bench(args) => return measuring_runtime()?.block_on(bench::main(args)),
        Command::Sweep(args) => return measuring_runtime()?.block_on(sweep::main(args)),
        Command::Trace(args) => return trace::main(args),
        Command::KvQuality(args) => return measuring_runtime()?.block_on(quality::main(args)),
        _ => {}
    }
    let mut config = RuntimeConfig::from_settings()?;
    if matches!(command, Command::Run { .. } | Command::MockerVllm(_)) {
        config = config.with_discovery_backend(DiscoveryBackend::Mem);
    }
    let worker = Worker::from_config(config)?;
    worker.execute(move |runtime| async move {
        match command {
            Command::Run { frontend, mocker } => {
                let kv_events = mocker.kv_events.then_some(KvEventsBind::Ephemeral);
                run_all(runtime, frontend, mocker, kv_events, true).await
            }
            Command::MockerVllm(VllmCompat::Serve {
                host,
                port,
                model,
                kv_events_config,
                ignored,
                mocker,
            }) => {
                // vLLM publishes KV events only when its config asks, whatever the mocker's default.
                let kv_events = mocker_vllm::kv_events_bind(kv_events_config.as_deref())?;
                if !ignored.is_empty() {
                    tracing::info!(?ignored, "ignoring vLLM flags the mocker does not use");
                }
                let frontend = FrontendArgs {
                    http_host: host,
                    http_port: port,
                    ..FrontendArgs::default()
                };
                let mocker = MockerArgs {
                    model_name: model,
                    num_workers: 1,
                    ..mocker
                };
                run_all(runtime, frontend, mocker, kv_events, false).await
            }
            Command::Instances(args) => instances::list(runtime.clone(), args).await,
            Command::Model(_) | Command::Bench(_) | Command::Sweep(_) | Command::Trace(_) | Command::KvQuality(_) => {
                unreachable!("handled before the mesh runtime starts")
            }
            Command::Worker(WorkerKind::Vllm(args)) => {
                switchyard_vllm::run(runtime, *args).await.map_err(AppError::from)
            }
            Command::Frontend(args) => switchyard_frontend::run(runtime, args).await.map_err(AppError::from),
            Command::Worker(WorkerKind::Mocker(args)) => switchyard_mocker_worker::run(runtime, args)
                .await
                .map_err(AppError::from),
        }
    })?;
    Ok(())
}

fn measuring_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// The all-in-one job: workers first (each its own instance), then the
/// frontend, then a banner once the frontend can route to them. The first
/// worker shares the frontend's runtime, so its `vllm:*` gauges appear on
/// the frontend's `/metrics` (what a vLLM server shows on its own port).
/// `kv_events` says where the first worker publishes its KV events; the
/// others publish where `mocker.kv_events` says (the stand-in has only one).
async fn run_all(
    runtime: Runtime,
    frontend: FrontendArgs,
    mocker: MockerArgs,
    kv_events: Option<KvEventsBind>,
    banner: bool,
) -> Result<(), AppError> {
    if mocker.num_workers == 0 {
        return Err("--num-workers must be at least 1 (got 0)".into());
    }
    let drt = DistributedRuntime::from_settings(runtime.clone()).await?;
    let mut workers = vec![switchyard_mocker_worker::serve_with(&drt, &mocker, kv_events).await?];
    for _ in 1..mocker.num_workers {
        let own = DistributedRuntime::connect(runtime.clone()).await?;
        workers.push(switchyard_mocker_worker::serve(&own, &mocker).await?);
    }
    let serving = switchyard_frontend::start(&drt, &frontend).await?;
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    while !serving
        .models
        .get(&mocker.model_name)
        .is_some_and(|model| model.has_live_worker())
    {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the frontend did not see its workers within {READY_WAIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let host = match frontend.http_host.as_str() {
        "0.0.0.0" | "::" | "[::]" => "127.0.0.1".to_string(),
        other => other.to_string(),
    };
    let url = format!("http://{host}:{}", serving.address.port());
    if !banner {
        tracing::info!(%url, model = %mocker.model_name, "mocker ready behind the vLLM API");
    }
    if banner {
        println!(
            "Switchyard is ready: OpenAI API at {url}/v1 serving model {:?} on {} mocker worker(s).\n\
         Try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
         -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":20}}'",
            mocker.model_name, mocker.num_workers, mocker.model_name
        );
        if frontend.mesh_page == switchyard_frontend::mesh::MeshPage::On {
            println!("The mesh (workers, load, routing decisions): open {url}/ in a browser, or GET {url}/api/mesh");
        }
        println!("Press Ctrl-C to stop.");
    }
    for worker in workers {
        worker.serving.wait().await;
    }
    runtime.root_token().cancelled().await;
    Ok(())
}

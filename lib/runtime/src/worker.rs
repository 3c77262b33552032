//! [`Worker`]: the entry point of a Switchyard process. It builds the tokio
//! runtime from the settings, runs the application, and turns SIGINT/SIGTERM
//! into a graceful shutdown (drain, then stop; a second signal stops at once).

use crate::config::{ConfigError, RuntimeConfig};
use crate::runtime::{Runtime, ShutdownOutcome};
use std::future::Future;
use std::time::Duration;

/// How long the application gets to return after the runtime has stopped
/// (its endpoints are drained and killed by then, so `start()` returns at once).
const APP_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Builds the process runtime and runs one application on it.
///
/// ```ignore
/// fn main() -> anyhow::Result<()> {
///     Worker::from_settings()?.execute(|rt| async move {
///         let drt = DistributedRuntime::from_settings(rt).await?;
///         // register endpoints, call others …
///         Ok::<_, anyhow::Error>(())
///     })?;
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct Worker {
    config: RuntimeConfig,
    tokio: tokio::runtime::Runtime,
}

impl Worker {
    /// Reads the settings (defaults → `DYN_CONFIG_FILE` → environment) and
    /// builds the tokio runtime.
    pub fn from_settings() -> Result<Self, WorkerError> {
        Self::from_config(RuntimeConfig::from_settings()?)
    }

    pub fn from_config(config: RuntimeConfig) -> Result<Self, WorkerError> {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(*config.worker_threads())
            .enable_all()
            .build()
            .map_err(WorkerError::Tokio)?;
        Ok(Self { config, tokio })
    }

    /// Runs `app` until it returns or a signal arrives, then shuts the runtime
    /// down gracefully. Logging is set up from `DYN_LOG` first.
    pub fn execute<F, Fut, E>(self, app: F) -> Result<(), WorkerError>
    where
        F: FnOnce(Runtime) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        init_logging(self.config.log_filter());
        tracing::info!(
            discovery = self.config.discovery_backend().as_str(),
            request_plane = self.config.request_plane().as_str(),
            event_plane = self.config.event_plane().as_str(),
            "configuration valid"
        );
        let Worker { config, tokio } = self;
        let result = tokio.block_on(async move {
            let runtime = Runtime::new(config);
            let mut app = tokio::spawn(app(runtime.clone()));
            let joined = tokio::select! {
                joined = &mut app => {
                    runtime.shutdown().await;
                    joined
                }
                signal = shutdown_signal() => {
                    tracing::info!(signal, "shutting down: draining in-flight requests");
                    tokio::select! {
                        outcome = runtime.shutdown() => {
                            if outcome == ShutdownOutcome::DeadlinePassed {
                                tracing::warn!("some requests were cancelled at the drain deadline");
                            }
                        }
                        signal = shutdown_signal() => {
                            tracing::warn!(signal, "second signal: stopping now");
                            runtime.stop().await;
                        }
                    }
                    match tokio::time::timeout(APP_EXIT_GRACE, &mut app).await {
                        Ok(joined) => joined,
                        Err(_) => {
                            app.abort();
                            return Err(WorkerError::AppDidNotStop(APP_EXIT_GRACE));
                        }
                    }
                }
            };
            match joined {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(WorkerError::App(error.into())),
                Err(join) => Err(WorkerError::AppPanicked(join.to_string())),
            }
        });
        // Blocking tasks (none of ours) must not keep the process alive.
        tokio.shutdown_timeout(Duration::from_secs(1));
        result
    }
}

/// Resolves with the signal's name on SIGINT or SIGTERM.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT will shut down");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// Sets up the `tracing` subscriber from `DYN_LOG` (already validated by the
/// config), logging to stderr so stdout stays the application's. A
/// subscriber installed earlier by the application wins.
fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::new(filter);
    // Colours only on a terminal: log files and collectors get plain text.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours)
        .try_init();
}

/// Why a worker could not run, or how its application failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the tokio runtime")]
    Tokio(#[source] std::io::Error),
    #[error("application failed")]
    App(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("application panicked: {0}")]
    AppPanicked(String),
    #[error("application did not return within {0:?} after the runtime stopped")]
    AppDidNotStop(Duration),
}

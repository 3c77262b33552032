//! Managed mode: start `vllm serve` children, each on its own port, wait
//! until they answer `/health`, and stop them when the worker stops —
//! SIGTERM, then SIGKILL after a grace period.
//!
//! A child never outlives the worker: it is started through `setpriv
//! --pdeathsig KILL` when `setpriv` (util-linux) is installed, so the kernel
//! kills it even if the worker itself is SIGKILLed; without `setpriv` that
//! last guarantee is lost (a warning says so), the orderly paths still hold.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_runtime::error::Report;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Log lines kept per child, for the error when it fails to start.
const LOG_TAIL: usize = 20;
/// How often a starting child's `/health` is tried.
const HEALTH_POLL: Duration = Duration::from_millis(200);

/// Why a managed vLLM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error(
        "cannot find the vLLM command {command:?} (--vllm-command): it is not an executable path and not on PATH; install vLLM or point --vllm-command at it"
    )]
    MissingCommand { command: String },
    #[error("cannot start {command:?}: {reason}")]
    Spawn { command: String, reason: String },
    #[error("vLLM on port {port} exited with {status} before it was healthy; its last log lines:\n{tail}")]
    Exited { port: u16, status: String, tail: String },
    #[error(
        "vLLM on port {port} was not healthy within {timeout:?} (--startup-timeout-secs); its last log lines:\n{tail}"
    )]
    NotHealthy { port: u16, timeout: Duration, tail: String },
}

/// One `vllm serve` child.
#[derive(Debug)]
pub struct ManagedVllm {
    pub port: u16,
    pub base_url: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Finds `command` the way a shell would: a path as given, else on PATH.
pub fn resolve_command(command: &str, path_var: Option<&str>) -> Option<PathBuf> {
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
    };
    if command.contains('/') {
        let path = PathBuf::from(command);
        return executable(&path).then_some(path);
    }
    path_var?
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(command))
        .find(|path| executable(path))
}

impl ManagedVllm {
    /// Starts `command serve --host 127.0.0.1 --port PORT MODEL ARGS…` and
    /// waits until its `/health` answers.
    pub async fn start(
        command: &Path,
        setpriv: Option<&Path>,
        port: u16,
        model: &str,
        extra_args: &[String],
        http: &reqwest::Client,
        startup_timeout: Duration,
    ) -> Result<Self, ManagedError> {
        let port_text = port.to_string();
        let mut args: Vec<&str> = vec!["serve", "--host", "127.0.0.1", "--port", &port_text, model];
        args.extend(extra_args.iter().map(String::as_str));
        let mut process = match setpriv {
            Some(setpriv) => {
                let mut process = Command::new(setpriv);
                process.args(["--pdeathsig", "KILL", "--"]).arg(command).args(&args);
                process
            }
            None => {
                let mut process = Command::new(command);
                process.args(&args);
                process
            }
        };
        process
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = process.spawn().map_err(|e| ManagedError::Spawn {
            command: command.display().to_string(),
            reason: e.to_string(),
        })?;
        tracing::info!(pid = child.id(), port, command = %command.display(), ?args, "started vllm");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(keep_tail(BufReader::new(stdout), tail.clone(), port));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(keep_tail(BufReader::new(stderr), tail.clone(), port));
        }
        let mut managed = Self {
            port,
            base_url: format!("http://127.0.0.1:{port}"),
            child,
            tail,
        };
        managed.wait_healthy(http, startup_timeout).await?;
        Ok(managed)
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client, timeout: Duration) -> Result<(), ManagedError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let url = format!("{}/health", self.base_url);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the log readers a moment to catch the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(ManagedError::Exited {
                    port: self.port,
                    status: status.to_string(),
                    tail: self.tail(),
                });
            }
            if let Ok(Ok(response)) = tokio::time::timeout(HEALTH_POLL, http.get(&url).send()).await
                && response.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ManagedError::NotHealthy {
                    port: self.port,
                    timeout,
                    tail: self.tail(),
                });
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.is_empty() {
            "(no output)".to_string()
        } else {
            tail.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }

    /// SIGTERM, then SIGKILL when it has not exited after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let Some(pid) = self.child.id() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if let Err(error) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            tracing::warn!(%pid, %error, "cannot SIGTERM vllm");
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => tracing::info!(%pid, status = ?status.ok(), "vllm stopped"),
            Err(_) => {
                tracing::warn!(%pid, ?grace, "vllm ignored SIGTERM; killing it");
                if let Err(error) = self.child.kill().await {
                    tracing::warn!(%pid, error = %Report(&error), "cannot kill vllm");
                }
            }
        }
    }
}

/// Keeps the last [`LOG_TAIL`] lines of a child's output (and logs them at debug).
async fn keep_tail<R: tokio::io::AsyncRead + Unpin>(
    reader: BufReader<R>,
    tail: Arc<Mutex<VecDeque<String>>>,
    port: u16,
) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(port, "vllm: {line}");
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == LOG_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// `n` distinct ports free on every interface (vLLM binds its event ports
/// on `*`), all held until all are chosen so that none is picked twice.
/// They are released before the child binds them, so another process may
/// take one meanwhile (docs/vllm.md §10).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("0.0.0.0:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

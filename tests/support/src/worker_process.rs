//! A worker running in its own OS process — the runtime's `hello_world`
//! example binary (which plain `cargo test` builds next to the test
//! binaries), the `switchyard` binary ([`crate::switchyard`]), or any other —
//! with its log read on a thread so no read can block a test past its
//! deadline.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: String,
}

impl WorkerProcess {
    /// Starts `hello_world server` with `env` and waits until its endpoint serves.
    pub fn start_hello_server(env: &[(&str, &str)], deadline: Duration) -> Self {
        let example = std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(|deps| deps.parent())
            .map(|profile| profile.join("examples").join("hello_world"))
            .unwrap();
        Self::start(example, &["server"], env, "endpoint serving", deadline)
    }

    /// Starts `binary` and waits until its log (stderr) shows `ready`.
    pub fn start(binary: PathBuf, args: &[&str], env: &[(&str, &str)], ready: &str, deadline: Duration) -> Self {
        let mut worker = Self::spawn(binary, args, env);
        worker.wait_for_log(ready, deadline);
        worker
    }

    /// Starts `binary` without waiting for it (see [`WorkerProcess::read_log`]).
    pub fn spawn(binary: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Self {
        assert!(
            binary.exists(),
            "{} is missing: run the tests with `cargo test` (it builds the examples)",
            binary.display()
        );
        let mut child = Command::new(&binary)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Takes what the process logged since the last read, without waiting;
    /// returns the whole log so far.
    pub fn read_log(&mut self) -> &str {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push_str(&line);
            self.log.push('\n');
        }
        &self.log
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Reads the log until a line contains `text`; panics with the log so far after `deadline`.
    pub fn wait_for_log(&mut self, text: &str, deadline: Duration) {
        self.wait_for_log_times(text, 1, deadline);
    }

    /// Reads the log until `text` has appeared `times` times; panics with
    /// the log so far after `deadline`.
    pub fn wait_for_log_times(&mut self, text: &str, times: usize, deadline: Duration) {
        let started = Instant::now();
        while self.log.matches(text).count() < times {
            let left = deadline.saturating_sub(started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                }
                Err(_) => panic!(
                    "the worker exited or did not log {text:?} {times} time(s) within {deadline:?}:\n{}",
                    self.log
                ),
            }
        }
    }

    /// The log read so far.
    pub fn log(&self) -> &str {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`-TERM`, `-KILL`) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {} failed", self.pid());
    }

    /// Waits for the process to exit; returns its status and whole log.
    pub fn wait(mut self, deadline: Duration) -> (std::process::ExitStatus, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > deadline {
                let _ = self.child.kill();
                panic!("the worker still runs {deadline:?} later:\n{}", self.log);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.log.push_str(&line);
            self.log.push('\n');
        }
        (status, std::mem::take(&mut self.log))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

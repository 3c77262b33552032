//! A real NATS server for tests (Debian's `nats-server`), on a free loopback
//! port, stopped when dropped; a watchdog shell process kills it if the test
//! process dies first.

use crate::etcd_server::TestCertificates;
use crate::free_port;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const START_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    watchdog: Option<Child>,
    port: u16,
    /// A config file raising `max_payload`, when asked for.
    config: Option<std::path::PathBuf>,
    /// A token clients must present, when asked for.
    token: Option<String>,
}

impl NatsServer {
    pub fn start() -> Self {
        let mut server = Self::unstarted();
        server.launch();
        server
    }

    /// A server with its port chosen but not running yet: [`NatsServer::restart`]
    /// starts it (so a test can start it after the processes that use it).
    pub fn unstarted() -> Self {
        Self {
            child: None,
            watchdog: None,
            port: free_port(),
            config: None,
            token: None,
        }
    }

    /// A server that requires `token` (`--auth`).
    pub fn start_with_token(token: &str) -> Self {
        let mut server = Self {
            child: None,
            watchdog: None,
            port: free_port(),
            config: None,
            token: Some(token.to_string()),
        };
        server.launch();
        server
    }

    /// A server that accepts messages up to `bytes` (the default is 1 MiB).
    pub fn start_with_max_payload(bytes: usize) -> Self {
        Self::start_with_config(&format!("max_payload: {bytes}\n"))
    }

    /// A server that speaks only TLS, with `certificates`' server certificate
    /// (for 127.0.0.1), and requires a client certificate signed by their CA
    /// (`verify: true`); it accepts messages up to `max_payload` bytes.
    pub fn start_with_mutual_tls(certificates: &TestCertificates, max_payload: usize) -> Self {
        Self::start_with_config(&format!(
            "max_payload: {max_payload}\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
            certificates.server_cert, certificates.server_key, certificates.ca,
        ))
    }

    fn start_with_config(text: &str) -> Self {
        let config = crate::scratch_dir("nats").join("nats.conf");
        std::fs::write(&config, text).unwrap();
        let mut server = Self {
            child: None,
            watchdog: None,
            port: free_port(),
            config: Some(config),
            token: None,
        };
        server.launch();
        server
    }

    /// `nats://127.0.0.1:PORT`, for `NATS_SERVER`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        for mut child in [self.child.take(), self.watchdog.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn launch(&mut self) {
        let binary = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or("nats-server");
        let mut command = Command::new(binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        if let Some(token) = &self.token {
            command.arg("--auth").arg(token);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary} (run `make test`, which installs nats-server): {e}"));
        let script = format!(
            "while kill -0 {parent} 2>/dev/null && kill -0 {nats} 2>/dev/null; do sleep 0.5; done; kill {nats} 2>/dev/null",
            parent = std::process::id(),
            nats = child.id(),
        );
        self.watchdog = Some(
            Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sh is available"),
        );
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < START_DEADLINE,
                "nats-server did not listen within {START_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.config.as_deref().and_then(std::path::Path::parent) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

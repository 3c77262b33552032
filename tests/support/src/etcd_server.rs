//! A real etcd server for tests: started on free loopback ports with a
//! fresh data directory (on /dev/shm when there is one, for steadier
//! latency), stopped when dropped. A watchdog shell process kills it if the
//! test process dies first, so no server outlives its tests.

use crate::{RemovedOnDrop, free_port};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a fresh server may take to answer its health check.
const START_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    watchdog: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` when the client port speaks TLS.
    metrics_port: u16,
    data_dir: PathBuf,
    tls: Option<TestCertificates>,
}

/// A throw-away CA and the certificates it signed, made with the `openssl`
/// command: a server certificate for 127.0.0.1 and a client certificate.
/// Their directory is removed with the last clone.
#[derive(Debug, Clone)]
pub struct TestCertificates {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _removed_with_last_clone: Arc<RemovedOnDrop>,
}

impl TestCertificates {
    pub fn generate() -> Self {
        let dir = crate::scratch_dir("tls");
        let script = r#"
            set -e
            key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
            key ca.key; key server.key; key client.key
            openssl req -x509 -new -key ca.key -out ca.pem -days 1 -subj /CN=switchyard-test-ca                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
            openssl req -new -key server.key -out server.csr -subj /CN=127.0.0.1
            printf 'subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth
' > server.ext
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile server.ext 2>/dev/null
            openssl req -new -key client.key -out client.csr -subj /CN=root
            printf 'extendedKeyUsage=clientAuth
' > client.ext
            openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.ext 2>/dev/null
        "#;
        let status = Command::new("sh")
            .args(["-c", script])
            .current_dir(&dir)
            .status()
            .expect("sh is available");
        assert!(status.success(), "openssl could not make the test certificates");
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            _removed_with_last_clone: Arc::new(RemovedOnDrop(dir.clone())),
            dir,
        }
    }
}

impl EtcdServer {
    /// Starts a server and waits until it is healthy.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server whose client port speaks TLS with `certificates` and
    /// requires a client certificate signed by their CA.
    pub fn start_with_mutual_tls(certificates: &TestCertificates) -> Self {
        Self::start_with(Some(certificates.clone()))
    }

    /// A server with its ports chosen but not running yet: [`EtcdServer::restart`]
    /// starts it (so a test can start it after the processes that use it).
    pub fn unstarted() -> Self {
        Self::new(None)
    }

    fn start_with(tls: Option<TestCertificates>) -> Self {
        let mut server = Self::new(tls);
        server.launch();
        server
    }

    fn new(tls: Option<TestCertificates>) -> Self {
        let data_root = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Self {
            child: None,
            watchdog: None,
            client_port: free_port(),
            peer_port: free_port(),
            metrics_port: free_port(),
            data_dir: data_root.join(format!("switchyard-etcd-{:016x}", rand::random::<u64>())),
            tls,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), for `ETCD_ENDPOINTS`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills the server (its data stays, for [`EtcdServer::restart`]).
    pub fn stop(&mut self) {
        for mut child in [self.child.take(), self.watchdog.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn launch(&mut self) {
        let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .unwrap_or("etcd");
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let mut command = Command::new(binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--heartbeat-interval", "10", "--election-timeout", "50"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary} (run `make test`, which installs etcd-server): {e}"));
        // Kill etcd (and remove its data) once this test process is gone.
        let script = format!(
            "while kill -0 {parent} 2>/dev/null && kill -0 {etcd} 2>/dev/null; do sleep 0.5; done; \
             kill {etcd} 2>/dev/null; if ! kill -0 {parent} 2>/dev/null; then rm -rf '{dir}'; fi",
            parent = std::process::id(),
            etcd = child.id(),
            dir = self.data_dir.display(),
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh is available");
        self.child = Some(child);
        self.watchdog = Some(watchdog);
        let started = Instant::now();
        while !self.healthy() {
            assert!(
                started.elapsed() < START_DEADLINE,
                "etcd did not become healthy within {START_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /health` answers `"health":"true"`.
    fn healthy(&self) -> bool {
        let Ok(mut socket) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
        let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.metrics_port);
        if socket.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

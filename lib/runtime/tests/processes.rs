//! Workers and callers in separate OS processes, finding each other through
//! the discovery backends that cross processes — a shared directory (`file`)
//! and a real etcd server — and what callers see when a worker is killed or
//! etcd goes away under it.
//!
//! The worker is the `hello_world` example in server mode; the caller runs in
//! the test. Measured figures are printed (`cargo test -- --nocapture`) and
//! recorded in `docs/performance.md`.

use futures::StreamExt;
use std::time::Duration;
use switchyard_runtime::component::client::Client;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::Query;
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::Runtime;
use switchyard_test_support::etcd_server::EtcdServer;
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::time::Instant;

/// Generous bound on anything a test waits for; hitting it means a hang.
const DEADLINE: Duration = Duration::from_secs(30);
/// Short lease so that expiry tests run in seconds.
const TTL: Duration = Duration::from_secs(2);
const TTL_TEXT: &str = "2s";

/// Settings shared by the worker process and the in-test caller.
struct Backend {
    vars: Vec<(&'static str, String)>,
    _dir: Option<TempDir>,
}

impl Backend {
    fn file() -> Self {
        let dir = TempDir::new();
        Self {
            vars: vec![
                ("DYN_DISCOVERY_BACKEND", "file".into()),
                ("DYN_FILE_KV", dir.0.display().to_string()),
                ("DYN_LEASE_TTL", TTL_TEXT.into()),
            ],
            _dir: Some(dir),
        }
    }

    fn etcd(server: &EtcdServer) -> Self {
        Self {
            vars: vec![
                ("DYN_DISCOVERY_BACKEND", "etcd".into()),
                ("ETCD_ENDPOINTS", server.url()),
                ("DYN_LEASE_TTL", TTL_TEXT.into()),
            ],
            _dir: None,
        }
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        self.vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    fn start_worker(&self) -> WorkerProcess {
        let mut env = self.pairs();
        env.push(("DYN_LOG", "info"));
        WorkerProcess::start_hello_server(&env, DEADLINE)
    }

    async fn caller(&self) -> DistributedRuntime {
        let config = RuntimeConfig::from_vars(self.pairs()).unwrap();
        DistributedRuntime::from_settings(Runtime::new(config)).await.unwrap()
    }
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("switchyard-processes-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn hello_client(caller: &DistributedRuntime) -> Client {
    let endpoint = caller
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("generate");
    endpoint.client().await.unwrap()
}

/// Sends "hello world" and returns what came back, or the first error.
async fn say_hello(client: &Client) -> Result<String, String> {
    let router = PushRouter::<String, String>::from_client(client.clone(), RouterMode::RoundRobin)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = router
        .generate("hello world".to_string().into())
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    while let Some(item) = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("item within the deadline")
    {
        text.push_str(&item.map_err(|e| e.to_string())?);
    }
    Ok(text)
}

async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

async fn processes_find_each_other_and_stream(backend: Backend) {
    let worker = backend.start_worker();
    let caller = backend.caller().await;
    let client = hello_client(&caller).await;
    let instances = tokio::time::timeout(DEADLINE, client.wait_for_instances())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(say_hello(&client).await.unwrap(), "hello world");

    // A clean stop removes the worker from discovery at once (no TTL wait).
    worker.signal("-TERM");
    let (status, log) = worker.wait(DEADLINE);
    assert!(status.success(), "{log}");
    let gone = wait_until("the stopped worker left discovery", DEADLINE, || {
        client.instances().is_empty()
    })
    .await;
    assert!(
        gone < TTL,
        "a clean stop took {gone:?} to leave discovery: it waited for expiry"
    );
    caller.runtime().stop().await;
}

async fn a_killed_worker_leaves_the_callers_view_within_ttl(backend: Backend, name: &str) {
    let worker = backend.start_worker();
    let caller = backend.caller().await;
    let client = hello_client(&caller).await;
    tokio::time::timeout(DEADLINE, client.wait_for_instances())
        .await
        .unwrap()
        .unwrap();

    worker.signal("-KILL");
    let killed_at = Instant::now();
    drop(worker);
    wait_until("the killed worker left discovery", DEADLINE, || {
        client.instances().is_empty()
    })
    .await;
    let gone = killed_at.elapsed();
    println!("{name}: a worker killed with SIGKILL left the caller's view after {gone:?} (DYN_LEASE_TTL={TTL_TEXT})");
    assert!(
        gone <= TTL + Duration::from_secs(1),
        "took {gone:?}, more than TTL + 1 s"
    );
    caller.runtime().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_find_each_other_over_a_shared_directory() {
    processes_find_each_other_and_stream(Backend::file()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_find_each_other_over_etcd() {
    let server = EtcdServer::start();
    processes_find_each_other_and_stream(Backend::etcd(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_expires_from_a_shared_directory_within_ttl() {
    a_killed_worker_leaves_the_callers_view_within_ttl(Backend::file(), "file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_expires_from_etcd_within_ttl() {
    let server = EtcdServer::start();
    a_killed_worker_leaves_the_callers_view_within_ttl(Backend::etcd(&server), "etcd").await;
}

/// etcd is stopped for longer than the lease TTL under a running worker, then
/// started again on the same data: the worker re-registers by itself and the
/// caller routes to it again, with no process restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_recovers_its_registration_after_etcd_comes_back() {
    let mut server = EtcdServer::start();
    let backend = Backend::etcd(&server);
    let mut worker = backend.start_worker();
    let caller = backend.caller().await;
    let client = hello_client(&caller).await;
    tokio::time::timeout(DEADLINE, client.wait_for_instances())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(say_hello(&client).await.unwrap(), "hello world");

    server.stop();
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    server.restart();
    let restarted = Instant::now();
    // The worker's registration must be back in etcd by itself: read etcd
    // directly (not the caller's cached view, which kept the instance).
    let query = Query::endpoint("demo", "backend", "generate");
    loop {
        assert!(
            restarted.elapsed() < DEADLINE,
            "the worker did not re-register within {DEADLINE:?}"
        );
        if caller
            .discovery()
            .list(&query)
            .await
            .is_ok_and(|found| found.len() == 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registered = restarted.elapsed();
    // A caller that starts from etcd's view now routes to the worker.
    let fresh = hello_client(&caller).await;
    assert_eq!(fresh.instances().len(), 1);
    assert_eq!(say_hello(&fresh).await.unwrap(), "hello world");
    // And the old client, whose watch broke, still routes too.
    assert_eq!(say_hello(&client).await.unwrap(), "hello world");
    println!(
        "etcd: the worker's registration was back {registered:?} after etcd restarted (down {:?}), no process restarted",
        TTL + Duration::from_secs(1)
    );
    // etcd restores leases with a fresh TTL when it restarts, so the key may
    // never have vanished; the worker still saw its keep-alive fail and moved
    // its keys to a new lease.
    worker.wait_for_log("etcd lease lost", DEADLINE);
    worker.wait_for_log("etcd lease recovered", DEADLINE);
    println!(
        "etcd: the worker logged its lease recovery {:?} after etcd restarted",
        restarted.elapsed()
    );
    caller.runtime().stop().await;
}

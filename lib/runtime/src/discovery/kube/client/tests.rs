//! The Kubernetes backend's client, run for real against the fake API
//! server: the shared discovery suite, then what is particular to
//! Kubernetes (Pod readiness, ownership, debounce, resync, API errors).

use super::*;
use crate::discovery::suite::registration;
use crate::discovery::{Bucket, suite};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use switchyard_test_support::fake_api::FakeApiServer;

const NAMESPACE: &str = "switchyard-test";
/// How long a watcher may take to report a change before a check fails.
const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// A fake cluster and the processes (Pods) that join it.
struct Cluster {
    api: FakeApiServer,
    tracker: TaskTracker,
    stop: CancellationToken,
    pods: AtomicU64,
    /// Makes Pod names unique in this test process (a process may hold one client per Pod).
    prefix: u32,
}

impl Cluster {
    async fn start() -> Arc<Self> {
        Arc::new(Self {
            api: FakeApiServer::start().await.expect("the fake API server starts"),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            pods: AtomicU64::new(0),
            prefix: rand::random(),
        })
    }

    /// A kube client for the fake API server (built here: the fake knows no
    /// kube-rs types, see `switchyard_test_support`).
    fn client(&self) -> kube::Client {
        let url = self.api.url().parse().expect("a loopback URL parses");
        kube::Client::try_from(kube::Config::new(url)).expect("a client for a plain-HTTP URL builds")
    }

    fn options(debounce: Duration) -> KubeOptions {
        KubeOptions {
            debounce,
            api_timeout: Duration::from_secs(5),
        }
    }

    /// A new Pod that the EndpointSlice controller lists as ready, and its process.
    async fn ready_pod(&self) -> Result<KubeDiscovery, DiscoveryError> {
        self.pod_with(Duration::from_millis(20), true).await
    }

    async fn pod_with(&self, debounce: Duration, ready: bool) -> Result<KubeDiscovery, DiscoveryError> {
        let n = self.pods.fetch_add(1, Ordering::Relaxed);
        let pod = PodIdentity::new(format!("worker-{:x}-{n}", self.prefix), NAMESPACE, format!("uid-{n}"));
        self.api.set_ready(NAMESPACE, pod.name(), ready);
        let (tracker, stop) = (self.tracker.clone(), self.stop.clone());
        KubeDiscovery::connect(self.client(), pod, Self::options(debounce), tracker, stop).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The instance key of `endpoint` of component `dynamo/backend`.
fn instance_key(process: &KubeDiscovery, endpoint: &str) -> Key {
    suite::endpoint_key(process, "dynamo", "backend", endpoint)
}

fn backend_instances() -> Query {
    Query::bucket(Bucket::Instances)
        .namespace("dynamo")
        .component("backend")
}

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(EVENT_DEADLINE, watch.next())
        .await
        .expect("a watch event within the deadline")
        .expect("the watch stream is open")
        .expect("the watch event is not an error")
}

/// The shared suite, each check on a fake API server of its own.
mod discovery_suite {
    use super::*;
    use crate::discovery::suite::{Backend, discovery_suite};

    discovery_suite!({
        let cluster = Cluster::start().await;
        Backend::new(move || {
            let cluster = cluster.clone();
            async move { Ok(Arc::new(cluster.ready_pod().await?) as Arc<dyn Discovery>) }
        })
    });
}

#[tokio::test]
async fn a_process_writes_one_resource_owned_by_its_pod_with_server_side_apply() {
    let cluster = Cluster::start().await;
    let worker = cluster.ready_pod().await.unwrap();
    let key = instance_key(&worker, "generate");
    worker
        .register(registration(&key, r#"{"address":"10.0.0.1:7000"}"#))
        .await
        .unwrap();

    let name = worker.pod.name();
    let stored = cluster
        .api
        .worker_metadata(NAMESPACE, name)
        .expect("the resource exists");
    let owner = &stored["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Pod");
    assert_eq!(owner["name"], name.as_str());
    assert_eq!(owner["uid"], worker.pod.uid().as_str());
    assert_eq!(owner["controller"], true);
    assert_eq!(stored["spec"]["instanceId"], format!("{:x}", worker.instance_id()));
    assert_eq!(
        stored["spec"]["registrations"],
        serde_json::json!([{ "key": key.to_string(), "value": r#"{"address":"10.0.0.1:7000"}"# }])
    );

    let applies: Vec<_> = cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(applies.len(), 1, "one apply per registration, none at connect");
    for apply in &applies {
        assert_eq!(apply.content_type, "application/apply-patch+yaml");
        assert!(
            apply.uri.contains("fieldManager=switchyard") && apply.uri.contains("force=true"),
            "{}",
            apply.uri
        );
    }

    // Registering the same value again writes nothing; unregistering writes the smaller set.
    worker
        .register(registration(&key, r#"{"address":"10.0.0.1:7000"}"#))
        .await
        .unwrap();
    worker.unregister(&key).await.unwrap();
    let patches = cluster.api.requests().iter().filter(|r| r.method == "PATCH").count();
    assert_eq!(patches, 2);
    let stored = cluster.api.worker_metadata(NAMESPACE, name).unwrap();
    assert_eq!(stored["spec"]["registrations"], serde_json::json!([]));

    worker.shutdown().await.unwrap();
    assert!(
        cluster.api.worker_metadata(NAMESPACE, name).is_none(),
        "shutdown deletes the resource"
    );
}

#[tokio::test]
async fn an_instance_is_visible_only_while_its_pod_is_ready() {
    let cluster = Cluster::start().await;
    let worker = cluster.pod_with(Duration::from_millis(20), false).await.unwrap();
    let watcher = cluster.ready_pod().await.unwrap();
    let key = instance_key(&worker, "generate");
    worker.register(registration(&key, "{}")).await.unwrap();

    // Registered, but the Pod is not ready yet: nobody sees it.
    assert!(watcher.list(&backend_instances()).await.unwrap().is_empty());
    let mut watch = watcher.watch(&backend_instances()).await.unwrap();
    assert_eq!(next_event(&mut watch).await, WatchEvent::Snapshot(vec![]));

    let pod = worker.pod.name().clone();
    cluster.api.set_ready(NAMESPACE, &pod, true);
    assert_eq!(next_event(&mut watch).await, WatchEvent::Put(registration(&key, "{}")));
    assert_eq!(
        watcher.list(&backend_instances()).await.unwrap(),
        vec![registration(&key, "{}")]
    );

    // The readiness probe fails: the instance goes, and comes back with the Pod.
    cluster.api.set_ready(NAMESPACE, &pod, false);
    assert_eq!(next_event(&mut watch).await, WatchEvent::Delete(key.clone()));
    cluster.api.set_ready(NAMESPACE, &pod, true);
    assert_eq!(next_event(&mut watch).await, WatchEvent::Put(registration(&key, "{}")));

    // The Pod is deleted without its process saying goodbye (SIGKILL, node
    // lost): the garbage collector removes its resource, and the instance goes.
    cluster.api.delete_pod(NAMESPACE, &pod);
    assert_eq!(next_event(&mut watch).await, WatchEvent::Delete(key));
    assert!(cluster.api.worker_metadata(NAMESPACE, &pod).is_none());
}

#[tokio::test]
async fn a_readiness_flap_within_the_debounce_window_sends_nothing() {
    let cluster = Cluster::start().await;
    let worker = cluster.ready_pod().await.unwrap();
    let watcher = cluster.pod_with(Duration::from_secs(1), true).await.unwrap();
    let key = instance_key(&worker, "generate");
    worker.register(registration(&key, "{}")).await.unwrap();
    let mut watch = watcher.watch(&backend_instances()).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Snapshot(vec![registration(&key, "{}")])
    );

    let pod = worker.pod.name().clone();
    cluster.api.set_ready(NAMESPACE, &pod, false);
    // Long enough for a watcher without a debounce to report the flap
    // (this test fails with a zero debounce), well inside the window.
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.api.set_ready(NAMESPACE, &pod, true);
    // A later change, as a marker: it must be the next event, with no
    // Delete/Put pair for the flap before it.
    let marker = instance_key(&worker, "health");
    worker.register(registration(&marker, "{}")).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Put(registration(&marker, "{}"))
    );
}

#[tokio::test]
async fn a_watcher_that_must_list_again_after_compaction_catches_up() {
    let cluster = Cluster::start().await;
    let watcher = cluster.ready_pod().await.unwrap();
    let mut watch = watcher.watch(&backend_instances()).await.unwrap();
    assert_eq!(next_event(&mut watch).await, WatchEvent::Snapshot(vec![]));
    // Let the watch streams open before they are cut.
    while cluster
        .api
        .requests()
        .iter()
        .filter(|r| r.uri.contains("watch=true"))
        .count()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Lists of the registrations (not watches) the API server has answered.
    let lists = || {
        cluster
            .api
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && !r.uri.contains("watch=true") && r.uri.contains("workermetadatas"))
            .count()
    };

    // Changes elsewhere move the API server's version past the one the
    // watcher holds; then it restarts and forgets its history (a compaction).
    cluster.api.set_ready("elsewhere", "unrelated", true);
    let before = lists();
    cluster.api.restart_watches(true);
    // The watcher, the only client now, must list again: lists made before
    // the 410 do not count.
    let started = tokio::time::Instant::now();
    while lists() == before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the watcher did not list again after 410 Gone ({before} lists, all before it)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // And it keeps following: a worker that joins afterwards is seen.
    let worker = cluster.ready_pod().await.unwrap();
    let key = instance_key(&worker, "generate");
    worker.register(registration(&key, "{}")).await.unwrap();
    assert_eq!(next_event(&mut watch).await, WatchEvent::Put(registration(&key, "{}")));
}

#[tokio::test]
async fn api_errors_say_how_to_fix_them() {
    let cluster = Cluster::start().await;
    cluster.api.fail_next(403, 1);
    let error = cluster.ready_pod().await.unwrap_err().to_string();
    assert!(
        error.contains("list workermetadatas") && error.contains("rbac.yaml"),
        "{error}"
    );

    cluster.api.fail_next(404, 1);
    let error = cluster.ready_pod().await.unwrap_err().to_string();
    assert!(error.contains("crd.yaml"), "{error}");

    // Allowed to read but not to write: the first registration says so.
    let worker = cluster.ready_pod().await.unwrap();
    cluster.api.fail_next(403, 1);
    let key = instance_key(&worker, "generate");
    let error = worker.register(registration(&key, "{}")).await.unwrap_err().to_string();
    assert!(
        error.contains("apply WorkerMetadata/") && error.contains("create/patch"),
        "{error}"
    );
}

#[tokio::test]
async fn a_process_that_only_reads_never_touches_its_pods_registrations() {
    let cluster = Cluster::start().await;
    let worker = cluster.ready_pod().await.unwrap();
    let key = instance_key(&worker, "generate");
    worker.register(registration(&key, "{}")).await.unwrap();
    let pod = worker.pod.clone();
    drop(worker);

    // Say, `switchyard instances` run in the worker's Pod after the worker's
    // process died: it reads and leaves without writing or deleting.
    let (tracker, stop) = (cluster.tracker.clone(), cluster.stop.clone());
    let options = Cluster::options(Duration::from_millis(20));
    let reader = KubeDiscovery::connect(cluster.client(), pod.clone(), options, tracker, stop)
        .await
        .unwrap();
    assert_eq!(
        reader.list(&backend_instances()).await.unwrap(),
        vec![registration(&key, "{}")]
    );
    reader.shutdown().await.unwrap();
    assert!(cluster.api.worker_metadata(NAMESPACE, pod.name()).is_some());

    // Two clients for one Pod in one process would overwrite each other.
    let first = KubeDiscovery::connect(
        cluster.client(),
        pod.clone(),
        Cluster::options(Duration::from_millis(20)),
        cluster.tracker.clone(),
        cluster.stop.clone(),
    )
    .await
    .unwrap();
    let second = KubeDiscovery::connect(
        cluster.client(),
        pod,
        Cluster::options(Duration::from_millis(20)),
        cluster.tracker.clone(),
        cluster.stop.clone(),
    )
    .await
    .unwrap_err();
    assert!(matches!(second, DiscoveryError::PodTaken { .. }), "{second}");
    drop(first);
}

#[tokio::test]
async fn a_failed_apply_leaves_the_registrations_as_they_were() {
    let cluster = Cluster::start().await;
    let worker = cluster.ready_pod().await.unwrap();
    let (first, second) = (instance_key(&worker, "generate"), instance_key(&worker, "health"));
    cluster.api.fail_next(500, 1);
    worker.register(registration(&first, "{}")).await.unwrap_err();
    worker.register(registration(&second, "{}")).await.unwrap();

    let stored = cluster.api.worker_metadata(NAMESPACE, worker.pod.name()).unwrap();
    assert_eq!(
        stored["spec"]["registrations"],
        serde_json::json!([{ "key": second.to_string(), "value": "{}" }]),
        "the failed registration must not come back with the next apply"
    );
}

#[tokio::test]
async fn a_silent_api_server_fails_the_call_at_the_deadline() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _held = tokio::spawn(async move {
        let mut open = vec![];
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let options = KubeOptions {
        debounce: Duration::from_millis(20),
        api_timeout: Duration::from_millis(300),
    };
    let pod = PodIdentity::new("worker-silent", NAMESPACE, "uid-0");
    let error = KubeDiscovery::connect(client, pod, options, TaskTracker::new(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(error, DiscoveryError::KubeTimeout { .. }), "{error}");
    assert!(error.to_string().contains("no answer within 300ms"), "{error}");
}

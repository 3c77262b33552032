//! A small in-memory Kubernetes API server: just enough of the real one for
//! the `kubernetes` discovery backend to run for real without a cluster
//! (there is none in CI). It serves, on a loopback port, over plain HTTP:
//!
//! - `WorkerMetadata` objects (group `switchyard.dev`): list, watch, get,
//!   server-side apply (PATCH with `fieldManager`), delete;
//! - EndpointSlices (`discovery.k8s.io/v1`): list and watch;
//!
//! with resource versions, watch streams of `ADDED`/`MODIFIED`/`DELETED`
//! events resumable from a version, and `410 Gone` for a version older than
//! the last compaction, the way the API server answers. What the kubelet and
//! the controllers would do is in the test's hands: [`FakeApiServer::set_ready`]
//! plays the EndpointSlice controller, [`FakeApiServer::delete_pod`] the
//! garbage collector. Every request is recorded for assertions, and failures
//! can be injected.
//!
//! What it does not do: authentication, admission, field ownership between
//! several managers (an apply replaces the object), label or field
//! selectors, pagination.
//!
//! It knows the objects only as JSON, not as kube-rs or runtime types, so
//! that this crate stays free of both (see the crate's doc). A test builds
//! its client from [`FakeApiServer::url`], or hands a process
//! [`FakeApiServer::kubeconfig`].

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The kinds of object the fake stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    WorkerMetadata,
    EndpointSlice,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::WorkerMetadata => "switchyard.dev/v1alpha1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::WorkerMetadata => "WorkerMetadata",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query string.
    pub uri: String,
    pub content_type: String,
    pub body: String,
}

/// A stored change, for watchers.
#[derive(Debug, Clone)]
struct Change {
    version: u64,
    kind: Kind,
    namespace: String,
    event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    version: u64,
    /// Watches may resume only from versions after this one.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    changes: Vec<Change>,
    requests: Vec<RecordedRequest>,
    /// Injected failures: the next `count` requests (watches excluded) get `status`.
    failures: Option<(u16, usize)>,
    /// Bumped to end every open watch stream.
    watch_generation: u64,
    uids: u64,
}

impl Store {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Stores `object` (or deletes it, when `None`) and records the change.
    fn write(&mut self, kind: Kind, namespace: &str, name: &str, object: Option<Value>) -> Option<Value> {
        let key = (kind, namespace.to_string(), name.to_string());
        let version = self.bump();
        let (event, stored) = match object {
            Some(mut object) => {
                let previous = self.objects.get(&key);
                let uid = previous
                    .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
                    .unwrap_or_else(|| {
                        self.uids += 1;
                        format!("00000000-0000-0000-0000-{:012}", self.uids)
                    });
                let event = if previous.is_some() { "MODIFIED" } else { "ADDED" };
                object["apiVersion"] = json!(kind.api_version());
                object["kind"] = json!(kind.name());
                let metadata = &mut object["metadata"];
                metadata["name"] = json!(name);
                metadata["namespace"] = json!(namespace);
                metadata["uid"] = json!(uid);
                metadata["resourceVersion"] = json!(version.to_string());
                metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                self.objects.insert(key, object.clone());
                (event, object)
            }
            None => {
                let mut object = self.objects.remove(&key)?;
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                ("DELETED", object)
            }
        };
        self.changes.push(Change {
            version,
            kind,
            namespace: namespace.to_string(),
            event,
            object: stored.clone(),
        });
        Some(stored)
    }

    fn list(&self, kind: Kind, namespace: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && ns == namespace)
            .map(|(_, object)| object.clone())
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    /// The latest resource version (or watch generation), for waking watchers.
    changed: watch::Sender<(u64, u64)>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` on the store, then wakes the watchers.
    fn change<T>(&self, change: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.lock();
        let result = change(&mut store);
        let now = (store.version, store.watch_generation);
        drop(store);
        self.changed.send_replace(now);
        result
    }
}

/// The fake API server; it stops when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Shared,
    address: SocketAddr,
    stop: CancellationToken,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeApiServer {
    /// Starts serving on a free loopback port (needs a tokio runtime).
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shared = Shared {
            store: Arc::default(),
            changed: watch::channel((0, 0)).0,
        };
        let router = Router::new()
            .route(
                "/apis/switchyard.dev/v1alpha1/namespaces/{namespace}/workermetadatas",
                get(list_or_watch_resources),
            )
            .route(
                "/apis/switchyard.dev/v1alpha1/namespaces/{namespace}/workermetadatas/{name}",
                get(get_resource).patch(apply_resource).delete(delete_resource),
            )
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                get(list_or_watch_slices),
            )
            .fallback(unknown_path)
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, router).with_graceful_shutdown(stopped.cancelled_owned());
            if let Err(error) = served.await {
                tracing::warn!(%error, "fake API server failed");
            }
        });
        Ok(Self { shared, address, stop })
    }

    /// The server's URL, `http://127.0.0.1:PORT`, for a client's
    /// `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A kubeconfig file's text pointing at this server, for processes
    /// started with `KUBECONFIG`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url()
        )
    }

    /// Plays the EndpointSlice controller: lists `pod` in its namespace's
    /// worker slice as ready or not ready (adding it when new).
    pub fn set_ready(&self, namespace: &str, pod: &str, ready: bool) {
        self.shared.change(|store| {
            let mut endpoints = slice_endpoints(store, namespace);
            endpoints.insert(pod.to_string(), ready);
            write_slice(store, namespace, &endpoints);
        });
    }

    /// Plays the garbage collector after a Pod is deleted: the Pod leaves the
    /// EndpointSlice and the WorkerMetadata objects it owns are deleted.
    pub fn delete_pod(&self, namespace: &str, pod: &str) {
        self.shared.change(|store| {
            let mut endpoints = slice_endpoints(store, namespace);
            if endpoints.remove(pod).is_some() {
                write_slice(store, namespace, &endpoints);
            }
            let owned: Vec<String> = store
                .list(Kind::WorkerMetadata, namespace)
                .into_iter()
                .filter(|object| {
                    object["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|owners| owners.iter().any(|o| o["kind"] == "Pod" && o["name"] == pod))
                })
                .filter_map(|object| object["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            for name in owned {
                store.write(Kind::WorkerMetadata, namespace, &name, None);
            }
        });
    }

    /// The stored `WorkerMetadata/{name}`, as the API server would return it.
    pub fn worker_metadata(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = (Kind::WorkerMetadata, namespace.to_string(), name.to_string());
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Answers the next `count` requests (watch streams excluded) with
    /// `status` and a Kubernetes `Status` body.
    pub fn fail_next(&self, status: u16, count: usize) {
        self.shared.lock().failures = Some((status, count));
    }

    /// Ends every open watch stream, as an API server restart would; with
    /// `compact`, the history goes too, so resuming watchers get `410 Gone`
    /// and must list again.
    pub fn restart_watches(&self, compact: bool) {
        self.shared.change(|store| {
            store.watch_generation += 1;
            if compact {
                store.compacted = store.version;
                store.changes.clear();
            }
        });
    }
}

/// The worker slice's endpoints of `namespace`: Pod name → ready.
fn slice_endpoints(store: &Store, namespace: &str) -> BTreeMap<String, bool> {
    let key = (
        Kind::EndpointSlice,
        namespace.to_string(),
        "switchyard-workers-fake".to_string(),
    );
    let Some(slice) = store.objects.get(&key) else {
        return BTreeMap::new();
    };
    slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["targetRef"]["name"].as_str()?.to_string(),
                e["conditions"]["ready"] == true,
            ))
        })
        .collect()
}

fn write_slice(store: &mut Store, namespace: &str, endpoints: &BTreeMap<String, bool>) {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(n, (pod, ready))| {
            json!({
                "addresses": [format!("10.0.0.{}", n + 1)],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "targetRef": { "kind": "Pod", "name": pod, "namespace": namespace },
            })
        })
        .collect();
    let slice = json!({
        "metadata": { "labels": { "kubernetes.io/service-name": "switchyard-workers" } },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "system", "port": 9090, "protocol": "TCP" }],
    });
    store.write(Kind::EndpointSlice, namespace, "switchyard-workers-fake", Some(slice));
}

/// The API server's answer for a `WorkerMetadata` that does not exist.
fn not_found(name: &str) -> Response {
    status(
        404,
        "NotFound",
        format!("workermetadatas.switchyard.dev \"{name}\" not found"),
    )
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

/// Records the request; returns the injected failure, when one is due.
fn record(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    watch: bool,
) -> Option<Response> {
    let mut store = shared.lock();
    store.requests.push(RecordedRequest {
        method: method.to_string(),
        uri: uri.to_string(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
    if watch {
        return None;
    }
    let (code, count) = store.failures?;
    store.failures = (count > 1).then(|| (code, count - 1));
    let reason = match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    Some(status(code, reason, format!("injected failure {code}")))
}

async fn unknown_path(method: Method, uri: Uri) -> Response {
    status(
        404,
        "NotFound",
        format!("the fake API server does not serve {method} {uri}"),
    )
}

async fn list_or_watch_resources(
    State(shared): State<Shared>,
    Path(namespace): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    list_or_watch(shared, Kind::WorkerMetadata, namespace, method, uri, headers)
}

async fn list_or_watch_slices(
    State(shared): State<Shared>,
    Path(namespace): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    list_or_watch(shared, Kind::EndpointSlice, namespace, method, uri, headers)
}

fn list_or_watch(
    shared: Shared,
    kind: Kind,
    namespace: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let params = query_params(&uri);
    let watching = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    if let Some(failure) = record(&shared, &method, &uri, &headers, &[], watching) {
        return failure;
    }
    if watching {
        let from = params.get("resourceVersion").and_then(|v| v.parse::<u64>().ok());
        return watch_stream(shared, kind, namespace, from);
    }
    let store = shared.lock();
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": { "resourceVersion": store.version.to_string() },
        "items": store.list(kind, &namespace),
    });
    axum::Json(body).into_response()
}

/// A watch: the changes after `from` (or, without a version, every current
/// object as `ADDED`), then each change as it happens, one JSON per line.
fn watch_stream(shared: Shared, kind: Kind, namespace: String, from: Option<u64>) -> Response {
    let mut changes = shared.changed.subscribe();
    let (mut cursor, generation, backlog) = {
        let store = shared.lock();
        match from.filter(|&v| v != 0) {
            Some(version) if version < store.compacted => {
                let gone = json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {version} ({})", store.compacted),
                        "reason": "Expired", "code": 410,
                    },
                });
                return line(&gone).into_response();
            }
            Some(version) => (version, store.watch_generation, vec![]),
            None => {
                let added = store
                    .list(kind, &namespace)
                    .into_iter()
                    .map(|object| json!({ "type": "ADDED", "object": object }))
                    .collect::<Vec<_>>();
                (store.version, store.watch_generation, added)
            }
        }
    };
    // A producer task writes the lines; it ends when the client hangs up
    // (the body, and with it the receiver, is dropped) or the watches restart.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        for event in backlog {
            if sender.send(line(&event)).await.is_err() {
                return;
            }
        }
        loop {
            let (due, generation_now) = {
                let store = shared.lock();
                let due: Vec<Value> = store
                    .changes
                    .iter()
                    .filter(|c| c.version > cursor && c.kind == kind && c.namespace == namespace)
                    .map(|c| json!({ "type": c.event, "object": c.object }))
                    .collect();
                cursor = store.version;
                (due, store.watch_generation)
            };
            if generation_now != generation {
                return;
            }
            for event in due {
                if sender.send(line(&event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = sender.closed() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), receiver))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The query string's parameters (the ones kube sends need no decoding).
fn query_params(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

async fn get_resource(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(failure) = record(&shared, &method, &uri, &headers, &[], false) {
        return failure;
    }
    let key = (Kind::WorkerMetadata, namespace, name.clone());
    match shared.lock().objects.get(&key) {
        Some(object) => axum::Json(object.clone()).into_response(),
        None => not_found(&name),
    }
}

/// Server-side apply, checked the way the API server checks it: a field
/// manager, a body of this kind and name, and `spec.registrations` as the
/// CRD's schema has it. The applied object replaces the stored one.
async fn apply_resource(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(failure) = record(&shared, &method, &uri, &headers, &body, false) {
        return failure;
    }
    let params = query_params(&uri);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/apply-patch+yaml" {
        return status(
            415,
            "UnsupportedMediaType",
            format!("the fake serves only server-side apply, not {content_type}"),
        );
    }
    if params.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return status(400, "BadRequest", "PATCH with apply requires fieldManager".to_string());
    }
    let object: Value = match serde_json::from_slice(&body) {
        Ok(object) => object,
        Err(error) => return status(400, "BadRequest", format!("body is not JSON: {error}")),
    };
    if object["apiVersion"] != Kind::WorkerMetadata.api_version() || object["kind"] != Kind::WorkerMetadata.name() {
        return status(400, "BadRequest", "apiVersion/kind do not match the path".to_string());
    }
    if object["metadata"]["name"] != name.as_str() {
        return status(400, "BadRequest", "metadata.name does not match the path".to_string());
    }
    let registrations_valid = match &object["spec"]["registrations"] {
        Value::Null => true,
        Value::Array(entries) => entries.iter().all(|e| e["key"].is_string() && e["value"].is_string()),
        _ => false,
    };
    if !registrations_valid {
        return status(
            422,
            "Invalid",
            "spec.registrations: must be a list of {key: string, value: string}".to_string(),
        );
    }
    let stored = shared.change(|store| store.write(Kind::WorkerMetadata, &namespace, &name, Some(object)));
    axum::Json(stored).into_response()
}

async fn delete_resource(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(failure) = record(&shared, &method, &uri, &headers, &body, false) {
        return failure;
    }
    match shared.change(|store| store.write(Kind::WorkerMetadata, &namespace, &name, None)) {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(&name),
    }
}

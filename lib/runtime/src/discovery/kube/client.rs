//! The Kubernetes backend's client (`DYN_DISCOVERY_BACKEND=kubernetes`,
//! cargo feature `kubernetes`): the API server is the registry.
//!
//! - A process owns one `WorkerMetadata` object named after its Pod, with an
//!   owner reference to the Pod, so Kubernetes deletes it with the Pod.
//!   Every `register`/`unregister` server-side-applies the process's whole
//!   set of registrations into that object's `spec.registrations`.
//! - `list` reads the objects and the EndpointSlices afresh and joins them
//!   (see the parent module): a registration is visible while its Pod is ready.
//! - `watch` follows both kinds with kube-rs watchers (list + watch, resumed
//!   or re-listed after errors); the join of their first lists, fresh reads
//!   too, is its snapshot, and after a short debounce it sends the
//!   difference between views.
//!
//! Every API call has a deadline; an error says what failed and, for the
//! usual causes (CRD not installed, RBAC), how to fix it.

use super::{EndpointSlice as SliceView, WorkerMetadata as ResourceView, instance_id_for_pod, join, ready_pods};
use crate::config::PodIdentity;
use crate::discovery::{
    Discovery, DiscoveryError, Key, Query, Registration, WatchEvent, WatchStream, diff, ensure_owner, registrations,
    watch_stream,
};
use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The custom resource's API group, version, kind and plural (deploy/k8s/crd.yaml).
pub const GROUP: &str = "switchyard.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "WorkerMetadata";
pub const PLURAL: &str = "workermetadatas";
/// The field manager of server-side apply: the fields this process owns.
pub const FIELD_MANAGER: &str = "switchyard";

/// Tuning of the backend; the defaults suit a cluster.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// How long a watcher collects changes before it sends them: a burst (a
    /// rollout, a resync) becomes one set of events.
    pub debounce: Duration,
    /// Deadline of every single API call (apply, delete, list).
    pub api_timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(250),
            api_timeout: Duration::from_secs(10),
        }
    }
}

/// One process's view of the registry kept by the Kubernetes API server.
pub struct KubeDiscovery {
    resources: Api<DynamicObject>,
    slices: Api<EndpointSlice>,
    pod: PodIdentity,
    instance_id: u64,
    options: KubeOptions,
    /// Everything this process has registered: the resource's spec is always
    /// this whole set. The lock also orders applies, so they never overtake.
    own: tokio::sync::Mutex<BTreeMap<Key, Bytes>>,
    /// Whether this process has written the Pod's resource (and so deletes it at shutdown).
    wrote: AtomicBool,
    shut_down: AtomicBool,
    /// Ends this process's watch tasks (at shutdown, or when the runtime stops).
    stop: CancellationToken,
    tracker: TaskTracker,
    /// Held until shutdown.
    claim: std::sync::Mutex<Option<PodClaim>>,
}

/// The Pods that have a discovery client in this process. A Pod is one
/// instance (its name is the instance id and the resource's name), so a
/// second client for it would overwrite the first one's registrations.
static CLAIMED_PODS: std::sync::Mutex<BTreeSet<(String, String)>> = std::sync::Mutex::new(BTreeSet::new());

/// This process's claim on a Pod's identity, given back when dropped.
#[derive(Debug)]
struct PodClaim((String, String));

impl PodClaim {
    fn take(pod: &PodIdentity) -> Result<Self, DiscoveryError> {
        let id = (pod.namespace().clone(), pod.name().clone());
        let mut claimed = CLAIMED_PODS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !claimed.insert(id.clone()) {
            return Err(DiscoveryError::PodTaken {
                pod: pod.name().clone(),
            });
        }
        Ok(Self(id))
    }
}

impl Drop for PodClaim {
    fn drop(&mut self) {
        let mut claimed = CLAIMED_PODS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        claimed.remove(&self.0);
    }
}

impl std::fmt::Debug for KubeDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDiscovery")
            .field("pod", &self.pod)
            .field("instance_id", &format_args!("{:x}", self.instance_id))
            .finish_non_exhaustive()
    }
}

/// The `WorkerMetadata` type for kube's dynamic API.
fn resource_type() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

impl KubeDiscovery {
    /// Connects with the credentials Kubernetes gives a Pod (its service
    /// account), or outside a cluster with the current `KUBECONFIG` context.
    pub async fn connect_from_environment(
        pod: PodIdentity,
        options: KubeOptions,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        let config = kube::Config::infer().await.map_err(|error| DiscoveryError::Kube {
            operation: "find the API server".to_string(),
            hint: " (in a Pod, the service account's token and KUBERNETES_SERVICE_HOST; outside, KUBECONFIG)",
            source: Box::new(error),
        })?;
        let client = kube::Client::try_from(config).map_err(|error| DiscoveryError::Kube {
            operation: "build the API client".to_string(),
            hint: "",
            source: Box::new(error),
        })?;
        Self::connect(client, pod, options, tracker, stop).await
    }

    /// Joins the registry as the process of `pod`. A read of the resources
    /// proves now, not at the first registration, that the API server
    /// answers, the CRD is installed and RBAC lets this process read.
    ///
    /// Nothing is written until the first registration, which replaces
    /// whatever the Pod's resource held (a restarted container's leftovers);
    /// so a process that only reads (a frontend, `switchyard instances` run
    /// in a worker's Pod) never touches the Pod's registrations.
    pub async fn connect(
        client: kube::Client,
        pod: PodIdentity,
        options: KubeOptions,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        let claim = PodClaim::take(&pod)?;
        let discovery = Self {
            resources: Api::namespaced_with(client.clone(), pod.namespace(), &resource_type()),
            slices: Api::namespaced(client, pod.namespace()),
            instance_id: instance_id_for_pod(pod.name()),
            pod,
            options,
            own: tokio::sync::Mutex::new(BTreeMap::new()),
            wrote: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
            stop: stop.child_token(),
            tracker,
            claim: std::sync::Mutex::new(Some(claim)),
        };
        let params = ListParams::default().limit(1);
        discovery
            .call(|| format!("list {PLURAL}"), discovery.resources.list(&params))
            .await?;
        tracing::info!(
            pod = discovery.pod.name(),
            namespace = discovery.pod.namespace(),
            "joined discovery through the Kubernetes API (registrations go to WorkerMetadata/{})",
            discovery.pod.name()
        );
        Ok(discovery)
    }

    /// Runs one API call under the deadline, turning its failure into an
    /// error that names the call.
    async fn call<T>(
        &self,
        operation: impl FnOnce() -> String,
        future: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, DiscoveryError> {
        match tokio::time::timeout(self.options.api_timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(DiscoveryError::Kube {
                operation: operation(),
                hint: hint(&error),
                source: Box::new(error),
            }),
            Err(_) => Err(DiscoveryError::KubeTimeout {
                operation: operation(),
                timeout: self.options.api_timeout,
            }),
        }
    }

    /// Makes the Pod's resource hold exactly `registrations`.
    async fn apply(&self, registrations: &BTreeMap<Key, Bytes>) -> Result<(), DiscoveryError> {
        let entries = registrations
            .iter()
            .map(|(key, value)| {
                let value = std::str::from_utf8(value).map_err(|_| DiscoveryError::NotText { key: key.clone() })?;
                Ok(serde_json::json!({ "key": key.to_string(), "value": value }))
            })
            .collect::<Result<Vec<_>, DiscoveryError>>()?;
        let body = serde_json::json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": KIND,
            "metadata": {
                "name": self.pod.name(),
                "namespace": self.pod.namespace(),
                "labels": { "app.kubernetes.io/part-of": "switchyard" },
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.pod.name(),
                    "uid": self.pod.uid(),
                    "controller": true,
                }],
            },
            "spec": {
                "instanceId": format!("{:x}", self.instance_id),
                "podName": self.pod.name(),
                "podUid": self.pod.uid(),
                "registrations": entries,
            },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.call(
            || format!("apply WorkerMetadata/{}", self.pod.name()),
            self.resources.patch(self.pod.name(), &params, &Patch::Apply(&body)),
        )
        .await?;
        self.wrote.store(true, Ordering::Release);
        Ok(())
    }

    /// Changes this process's set with `change` and applies it; on failure
    /// the set is left as it was, so it always matches the API server.
    async fn update(&self, change: impl FnOnce(&mut BTreeMap<Key, Bytes>) -> bool) -> Result<(), DiscoveryError> {
        let mut own = self.own.lock().await;
        self.check_open()?;
        let mut next = own.clone();
        if !change(&mut next) {
            return Ok(());
        }
        self.apply(&next).await?;
        *own = next;
        Ok(())
    }

    fn check_open(&self) -> Result<(), DiscoveryError> {
        if self.shut_down.load(Ordering::Acquire) {
            Err(DiscoveryError::ShutDown)
        } else {
            Ok(())
        }
    }

    /// The registrations visible now: every resource joined with the
    /// EndpointSlices, read afresh from the API server.
    async fn current_view(&self) -> Result<BTreeMap<Key, Bytes>, DiscoveryError> {
        let params = ListParams::default();
        let resources = self.call(|| format!("list {PLURAL}"), self.resources.list(&params));
        let slices = self.call(|| "list endpointslices".to_string(), self.slices.list(&params));
        let (resources, slices) = futures::try_join!(resources, slices)?;
        let resources: Vec<ResourceView> = resources.items.iter().filter_map(view_of).collect();
        let slices: Vec<SliceView> = slices.items.iter().filter_map(view_of).collect();
        Ok(join(&resources, &ready_pods(&slices)))
    }
}

/// Converts an API object into the join's view of it; an object that does
/// not have the expected shape (a hand-edited resource) is skipped with a
/// warning rather than hiding every other worker.
fn view_of<T: Serialize + kube::ResourceExt, V: DeserializeOwned>(object: &T) -> Option<V> {
    match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(view) => Some(view),
        Err(error) => {
            tracing::warn!(name = object.name_any(), %error, "skipping a malformed object");
            None
        }
    }
}

/// How to fix the usual failures, judged from the API server's answer.
fn hint(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if matches!(status.code, 401 | 403) => {
            " (RBAC: the Pod's service account needs get/list/watch/create/patch/delete on \
             workermetadatas.switchyard.dev and list/watch on endpointslices, see deploy/k8s/rbac.yaml)"
        }
        kube::Error::Api(status) if status.code == 404 => {
            " (is the WorkerMetadata CRD installed? kubectl apply -f deploy/k8s/crd.yaml; does POD_NAMESPACE exist?)"
        }
        _ => "",
    }
}

#[async_trait::async_trait]
impl Discovery for KubeDiscovery {
    fn instance_id(&self) -> u64 {
        self.instance_id
    }

    async fn register(&self, registration: Registration) -> Result<(), DiscoveryError> {
        ensure_owner(self.instance_id, &registration)?;
        self.update(|own| {
            own.insert(registration.key, registration.value.clone()).as_ref() != Some(&registration.value)
        })
        .await
    }

    async fn unregister(&self, key: &Key) -> Result<(), DiscoveryError> {
        self.update(|own| own.remove(key).is_some()).await
    }

    async fn list(&self, query: &Query) -> Result<Vec<Registration>, DiscoveryError> {
        self.check_open()?;
        let mut view = self.current_view().await?;
        view.retain(|key, _| query.matches(key));
        Ok(registrations(&view))
    }

    async fn watch(&self, query: &Query) -> Result<WatchStream, DiscoveryError> {
        self.check_open()?;
        let (events, receiver) = mpsc::unbounded_channel();
        let mut follow = Follow {
            query: query.clone(),
            view: BTreeMap::new(),
            debounce: self.options.debounce,
            events,
            resources: watcher(self.resources.clone(), watcher::Config::default())
                .default_backoff()
                .boxed(),
            slices: watcher(self.slices.clone(), watcher::Config::default())
                .default_backoff()
                .boxed(),
            resource_mirror: Mirror::new(),
            slice_mirror: Mirror::new(),
        };
        // The watchers' own first lists (fresh reads) make the snapshot.
        match tokio::time::timeout(self.options.api_timeout, follow.first_lists()).await {
            Ok(listed) => listed?,
            Err(_) => {
                return Err(DiscoveryError::KubeTimeout {
                    operation: format!("list {PLURAL} and endpointslices"),
                    timeout: self.options.api_timeout,
                });
            }
        }
        follow.view = follow.joined();
        let _ = follow
            .events
            .send(Ok(WatchEvent::Snapshot(registrations(&follow.view))));
        self.tracker.spawn(follow.run(self.stop.clone()));
        Ok(watch_stream(receiver))
    }

    async fn shutdown(&self) -> Result<(), DiscoveryError> {
        let mut own = self.own.lock().await;
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        own.clear();
        self.stop.cancel();
        self.claim
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if !self.wrote.load(Ordering::Acquire) {
            return Ok(());
        }
        let delete = async {
            match self.resources.delete(self.pod.name(), &DeleteParams::default()).await {
                // Already gone (the Pod's garbage collection got there first).
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        };
        self.call(|| format!("delete WorkerMetadata/{}", self.pod.name()), delete)
            .await
    }
}

/// The objects a watcher has seen, by name, as the watcher events built them.
#[derive(Debug)]
struct Mirror<V> {
    objects: BTreeMap<String, V>,
    /// Filled during a (re-)list and swapped in when it is complete.
    relisting: Option<BTreeMap<String, V>>,
    /// Whether the first complete list has arrived.
    listed: bool,
}

impl<V: DeserializeOwned> Mirror<V> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            listed: false,
        }
    }

    /// Applies one watcher event; true when the set of objects may have changed.
    fn apply<T: Serialize + kube::ResourceExt>(&mut self, event: watcher::Event<T>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let (Some(buffer), Some(view)) = (self.relisting.as_mut(), view_of(&object)) {
                    buffer.insert(object.name_any(), view);
                }
                false
            }
            watcher::Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.listed = true;
                true
            }
            watcher::Event::Apply(object) => {
                match view_of(&object) {
                    Some(view) => self.objects.insert(object.name_any(), view),
                    None => self.objects.remove(&object.name_any()),
                };
                true
            }
            watcher::Event::Delete(object) => self.objects.remove(&object.name_any()).is_some(),
        }
    }

    fn values(&self) -> Vec<V>
    where
        V: Clone,
    {
        self.objects.values().cloned().collect()
    }
}

/// A watcher's events, boxed so a `watch` can read the first lists and
/// then hand the streams to its task.
type Events<K> = futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// One `watch` stream's task: mirrors the resources and the EndpointSlices,
/// and after each debounced burst sends what changed in the joined view.
struct Follow {
    query: Query,
    /// What the receiver has been told.
    view: BTreeMap<Key, Bytes>,
    debounce: Duration,
    events: mpsc::UnboundedSender<Result<WatchEvent, DiscoveryError>>,
    resources: Events<DynamicObject>,
    slices: Events<EndpointSlice>,
    resource_mirror: Mirror<ResourceView>,
    slice_mirror: Mirror<SliceView>,
}

impl Follow {
    /// Reads both watchers until their first lists are complete; the first
    /// error (RBAC, a missing CRD) is the caller's.
    async fn first_lists(&mut self) -> Result<(), DiscoveryError> {
        let failed = |kind: &str, error: watcher::Error| {
            let hint = match &error {
                watcher::Error::InitialListFailed(error) | watcher::Error::WatchStartFailed(error) => hint(error),
                _ => "",
            };
            DiscoveryError::Kube {
                operation: format!("list {kind}"),
                hint,
                source: Box::new(error),
            }
        };
        while !(self.resource_mirror.listed && self.slice_mirror.listed) {
            tokio::select! {
                Some(event) = self.resources.next() => {
                    self.resource_mirror.apply(event.map_err(|e| failed(PLURAL, e))?);
                }
                Some(event) = self.slices.next() => {
                    self.slice_mirror.apply(event.map_err(|e| failed("endpointslices", e))?);
                }
                else => return Err(DiscoveryError::ShutDown),
            }
        }
        Ok(())
    }

    /// The registrations the mirrors make visible for the query.
    fn joined(&self) -> BTreeMap<Key, Bytes> {
        let mut view = join(&self.resource_mirror.values(), &ready_pods(&self.slice_mirror.values()));
        view.retain(|key, _| self.query.matches(key));
        view
    }

    async fn run(mut self, stop: CancellationToken) {
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let changed = tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.events.closed() => return,
                event = self.resources.next() => match event {
                    Some(Ok(event)) => self.resource_mirror.apply(event),
                    Some(Err(error)) => { tracing::warn!(%error, "watching {PLURAL} failed; retrying"); false }
                    None => return,
                },
                event = self.slices.next() => match event {
                    Some(Ok(event)) => self.slice_mirror.apply(event),
                    Some(Err(error)) => { tracing::warn!(%error, "watching endpointslices failed; retrying"); false }
                    None => return,
                },
                _ = sleep_until(due), if due.is_some() => {
                    due = None;
                    let next = self.joined();
                    for event in diff(&self.view, &next) {
                        if self.events.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    self.view = next;
                    false
                }
            };
            if changed && due.is_none() {
                due = Some(tokio::time::Instant::now() + self.debounce);
            }
        }
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;

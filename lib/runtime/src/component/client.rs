//! Calling an endpoint: [`Client`] follows the endpoint's instances in
//! discovery (who exists) and hands routers a cheap snapshot of them.

use super::Endpoint;
use crate::discovery::{DiscoveryError, Query, WatchEvent, WatchStream};
use crate::error::Report;
use crate::instance::Instance;
use crate::names::NameError;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// First and longest pause before re-opening a failed discovery watch.
const REWATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// The live set of instances of one endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// Sorted by instance id; replaced as a whole on every change, so a
    /// router reads it with one `Arc` clone and never copies the fleet.
    instances: watch::Receiver<Arc<Vec<Instance>>>,
}

impl Client {
    pub(crate) async fn new(endpoint: Endpoint) -> Result<Self, ClientError> {
        endpoint.validate()?;
        let drt = endpoint.drt().clone();
        let query = Query::endpoint(endpoint.namespace(), endpoint.component(), endpoint.name());
        let mut stream = drt.discovery().watch(&query).await?;
        let mut follower = Follower {
            known: BTreeMap::new(),
            publish: watch::channel(Arc::new(Vec::new())).0,
        };
        // Apply the first snapshot before returning, so `instances()` is
        // right from the start.
        if let Some(Ok(event)) = stream.next().await {
            follower.apply(event);
        }
        let instances = follower.publish.subscribe();
        let runtime = drt.runtime().clone();
        let stopped = runtime.root_token().clone();
        runtime.spawn(async move {
            let discovery = drt.discovery().clone();
            follower.run(stream, &stopped, || discovery.watch(&query)).await;
        });
        Ok(Self { endpoint, instances })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The instances known right now, sorted by id.
    pub fn instances(&self) -> Arc<Vec<Instance>> {
        self.instances.borrow().clone()
    }

    pub fn instance_ids(&self) -> Vec<u64> {
        self.instances().iter().map(|i| i.instance_id).collect()
    }

    /// Waits until at least one instance exists and returns them. Fails when
    /// the runtime shuts down first.
    pub async fn wait_for_instances(&self) -> Result<Arc<Vec<Instance>>, ClientError> {
        let mut instances = self.instances.clone();
        let stopped = self.endpoint.drt().runtime().root_token().clone();
        tokio::select! {
            _ = stopped.cancelled() => Err(ClientError::ShuttingDown),
            found = instances.wait_for(|list| !list.is_empty()) => match found {
                Ok(list) => Ok(list.clone()),
                Err(_) => Err(ClientError::ShuttingDown),
            },
        }
    }
}

/// Keeps the published instance list in step with a discovery watch.
struct Follower {
    known: BTreeMap<u64, Instance>,
    publish: watch::Sender<Arc<Vec<Instance>>>,
}

impl Follower {
    /// Follows `stream` until `stopped`, or until every [`Client`] reading
    /// the list is gone; re-opens the watch (with backoff) when it fails.
    /// Each new watch starts with a snapshot, so nothing is missed.
    async fn run<F, Fut>(&mut self, mut stream: WatchStream, stopped: &CancellationToken, rewatch: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<WatchStream, DiscoveryError>>,
    {
        let mut backoff = REWATCH_BACKOFF.0;
        loop {
            let event = tokio::select! {
                _ = stopped.cancelled() => return,
                _ = self.publish.closed() => return,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    backoff = REWATCH_BACKOFF.0;
                    self.apply(event);
                    continue;
                }
                Some(Err(error)) => tracing::warn!(%error, "discovery watch failed; re-watching"),
                None => tracing::warn!("discovery watch ended; re-watching"),
            }
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = self.publish.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(REWATCH_BACKOFF.1);
                match rewatch().await {
                    Ok(new_stream) => {
                        stream = new_stream;
                        break;
                    }
                    Err(error) => tracing::warn!(%error, ?backoff, "cannot re-open discovery watch"),
                }
            }
        }
    }

    fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot(registrations) => {
                self.known.clear();
                for registration in &registrations {
                    self.insert(registration);
                }
            }
            WatchEvent::Put(registration) => self.insert(&registration),
            WatchEvent::Delete(key) => {
                if let Some(instance) = self.known.remove(&key.instance_id) {
                    tracing::debug!(%instance, "instance left discovery");
                }
            }
        }
        self.publish
            .send_replace(Arc::new(self.known.values().cloned().collect()));
    }

    fn insert(&mut self, registration: &crate::discovery::Registration) {
        match Instance::from_registration(registration) {
            Ok(instance) => {
                if !self.known.contains_key(&instance.instance_id) {
                    tracing::debug!(%instance, "instance joined discovery");
                }
                self.known.insert(instance.instance_id, instance);
            }
            Err(error) => tracing::warn!(error = %Report(&error), "ignoring an unreadable instance registration"),
        }
    }
}

/// Why a client could not follow an endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot watch the endpoint in discovery")]
    Discovery(#[from] DiscoveryError),
    #[error("the runtime shut down while waiting for instances")]
    ShuttingDown,
}

#[cfg(test)]
mod tests {
    use crate::config::RuntimeConfig;
    use crate::discovery::mem::{MemDiscovery, MemRegistry};
    use crate::distributed::DistributedRuntime;
    use crate::runtime::Runtime;
    use std::sync::Arc;
    use std::time::Duration;

    /// A frontend makes a client per model it sees; when the model goes,
    /// the client's discovery watch must go with it, not live until exit.
    #[tokio::test]
    async fn the_watch_task_ends_when_the_last_client_is_dropped() {
        let runtime = Runtime::new(RuntimeConfig::local());
        let drt = DistributedRuntime::with_discovery(runtime.clone(), Arc::new(MemDiscovery::new(MemRegistry::new())))
            .unwrap();
        let endpoint = drt.namespace("ns").unwrap().component("c").unwrap().endpoint("e");
        let before = runtime.tracker().len();
        let client = endpoint.client().await.unwrap();
        let copy = client.clone();
        assert_eq!(
            runtime.tracker().len(),
            before + 1,
            "the client follows discovery in one task"
        );
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(runtime.tracker().len(), before + 1, "a copy still reads the list");
        drop(copy);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runtime.tracker().len() > before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watch task outlived every client"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        runtime.shutdown().await;
    }
}

//! In-process discovery: a registry shared by every `DistributedRuntime` of
//! one process. For single-process runs (`DYN_DISCOVERY_BACKEND=mem`) and tests.
//!
//! Each watcher has its own unbounded channel, fed under the registry lock, so
//! a watcher sees every change in order and none is dropped. The cost is that a
//! watcher that is never polled keeps its changes in memory; in one process
//! the watchers are our own client tasks, which always poll.

use super::{Discovery, DiscoveryError, Key, Query, Registration, WatchEvent, WatchStream};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::mpsc;

/// The shared state behind every [`MemDiscovery`] of a process (or of a test).
#[derive(Debug, Clone, Default)]
pub struct MemRegistry {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<Key, Bytes>,
    watchers: Vec<Watcher>,
}

#[derive(Debug)]
struct Watcher {
    query: Query,
    events: mpsc::UnboundedSender<Result<WatchEvent, DiscoveryError>>,
}

impl State {
    /// Sends `event` (about `key`) to every matching watcher, forgetting the
    /// watchers whose stream was dropped.
    fn notify(&mut self, key: &Key, event: WatchEvent) {
        self.watchers.retain(|w| {
            if !w.query.matches(key) {
                return !w.events.is_closed();
            }
            w.events.send(Ok(event.clone())).is_ok()
        });
    }
}

impl MemRegistry {
    /// A new, empty registry (tests use one each, to stay isolated).
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry shared by all runtimes of this process that were built
    /// from settings with `DYN_DISCOVERY_BACKEND=mem`.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<MemRegistry> = OnceLock::new();
        GLOBAL.get_or_init(MemRegistry::new).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated
        // (every update is a single insert/remove), so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One process's view of a [`MemRegistry`].
#[derive(Debug)]
pub struct MemDiscovery {
    registry: MemRegistry,
    instance_id: u64,
    /// Keys this process registered, removed together at shutdown.
    own: Mutex<BTreeSet<Key>>,
    shut_down: AtomicBool,
}

impl MemDiscovery {
    /// Joins `registry` as a new process with a random instance id.
    pub fn new(registry: MemRegistry) -> Self {
        Self {
            registry,
            // Ids are printed as hex in keys; keep them within 53 bits so they
            // survive JSON numbers in tools that parse them as doubles.
            instance_id: rand::random::<u64>() & 0x001F_FFFF_FFFF_FFFF,
            own: Mutex::new(BTreeSet::new()),
            shut_down: AtomicBool::new(false),
        }
    }

    fn own(&self) -> std::sync::MutexGuard<'_, BTreeSet<Key>> {
        self.own.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_open(&self) -> Result<(), DiscoveryError> {
        if self.shut_down.load(Ordering::Acquire) {
            Err(DiscoveryError::ShutDown)
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Discovery for MemDiscovery {
    fn instance_id(&self) -> u64 {
        self.instance_id
    }

    async fn register(&self, registration: Registration) -> Result<(), DiscoveryError> {
        super::ensure_owner(self.instance_id, &registration)?;
        // Both locks are held (in the order `shutdown` takes them): a
        // registration racing a shutdown is either removed by it or refused.
        let mut own = self.own();
        self.check_open()?;
        own.insert(registration.key.clone());
        let mut state = self.registry.lock();
        state
            .entries
            .insert(registration.key.clone(), registration.value.clone());
        let key = registration.key.clone();
        state.notify(&key, WatchEvent::Put(registration));
        Ok(())
    }

    async fn unregister(&self, key: &Key) -> Result<(), DiscoveryError> {
        self.own().remove(key);
        let mut state = self.registry.lock();
        if state.entries.remove(key).is_some() {
            state.notify(key, WatchEvent::Delete(key.clone()));
        }
        Ok(())
    }

    async fn list(&self, query: &Query) -> Result<Vec<Registration>, DiscoveryError> {
        self.check_open()?;
        Ok(snapshot(&self.registry.lock(), query))
    }

    async fn watch(&self, query: &Query) -> Result<WatchStream, DiscoveryError> {
        self.check_open()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.registry.lock();
        // Snapshot and subscription under one lock: no change can fall between them.
        tx.send(Ok(WatchEvent::Snapshot(snapshot(&state, query))))
            .expect("receiver is alive");
        state.watchers.push(Watcher {
            query: query.clone(),
            events: tx,
        });
        Ok(super::watch_stream(rx))
    }

    async fn shutdown(&self) -> Result<(), DiscoveryError> {
        let keys = {
            let mut own = self.own();
            self.shut_down.store(true, Ordering::Release);
            std::mem::take(&mut *own)
        };
        let mut state = self.registry.lock();
        for key in keys {
            if state.entries.remove(&key).is_some() {
                state.notify(&key, WatchEvent::Delete(key.clone()));
            }
        }
        Ok(())
    }
}

fn snapshot(state: &State, query: &Query) -> Vec<Registration> {
    state
        .entries
        .iter()
        .filter(|(key, _)| query.matches(key))
        .map(|(key, value)| Registration {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// The shared suite, each check on a registry of its own.
    mod discovery_suite {
        use super::super::*;
        use crate::discovery::suite::{Backend, discovery_suite};

        discovery_suite!({
            let registry = MemRegistry::new();
            Backend::new(move || {
                let registry = registry.clone();
                async move { Ok(Arc::new(MemDiscovery::new(registry)) as Arc<dyn Discovery>) }
            })
        });
    }
}

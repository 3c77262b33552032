//! The behavioural suite every [`Discovery`] backend must pass. A backend's
//! tests invoke [`discovery_suite!`] with an expression that makes a
//! [`Backend`]: a factory that joins the *same* registry as a new process
//! each time it is called. The macro generates one named test per check, so
//! that one failing check does not hide the others.
//!
//! Every check uses its own random namespace, so backends with shared state
//! (one etcd server per test binary) can run the checks side by side.

use super::{Bucket, Discovery, DiscoveryError, Key, Query, Registration, WatchEvent, WatchStream};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long a watcher may take to report a change before the check fails.
const EVENT_DEADLINE: Duration = Duration::from_secs(5);

/// Generates one `#[tokio::test]` per check of the suite, in the module it is
/// invoked in, each running the check against the [`Backend`] that
/// `$backend` makes. `$backend` is evaluated afresh in every test (it may
/// `.await`), so each check gets a registry of its own unless the backend
/// shares one on purpose.
///
/// ```ignore
/// mod discovery_suite {
///     use super::*;
///     discovery_suite!(suite::Backend::new(move || async move { ... }));
/// }
/// ```
macro_rules! discovery_suite {
    ($backend:expr) => {
        $crate::discovery::suite::discovery_suite!(
            @checks $backend;
            processes_get_distinct_instance_ids,
            list_matches_whole_segments,
            watch_yields_current_set_then_changes,
            reregistering_replaces_the_value,
            unregister_removes_the_registration,
            shutdown_removes_everything_the_process_registered,
            a_process_cannot_register_another_process_key,
        );
    };
    (@checks $backend:expr; $($check:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let backend: $crate::discovery::suite::Backend = $backend;
                $crate::discovery::suite::$check(&backend).await;
            }
        )*
    };
}
pub(crate) use discovery_suite;

/// Joins the backend under test as a new process.
type JoinFn = Box<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Discovery>, DiscoveryError>>>;

/// The backend under test, as a way to join its registry as a new process.
/// Whatever the factory captures (a server, a directory guard) lives as long
/// as the check.
pub(crate) struct Backend {
    join: JoinFn,
}

impl Backend {
    /// A backend whose processes `join` makes, all on the same registry.
    pub(crate) fn new<F, Fut>(join: F) -> Self
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = Result<Arc<dyn Discovery>, DiscoveryError>> + Send + 'static,
    {
        Self {
            join: Box::new(move || Box::pin(join())),
        }
    }

    async fn join(&self) -> Arc<dyn Discovery> {
        (self.join)().await.expect("backend joins")
    }
}

fn namespace() -> String {
    format!("suite-{:x}", rand::random::<u32>())
}

pub(crate) fn endpoint_key(process: &dyn Discovery, ns: &str, component: &str, endpoint: &str) -> Key {
    Key {
        bucket: Bucket::Instances,
        namespace: ns.to_string(),
        component: component.to_string(),
        name: endpoint.to_string(),
        instance_id: process.instance_id(),
    }
}

pub(crate) fn registration(key: &Key, value: &str) -> Registration {
    Registration {
        key: key.clone(),
        value: Bytes::from(value.to_string()),
    }
}

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(EVENT_DEADLINE, watch.next())
        .await
        .expect("watch event within the deadline")
        .expect("watch stream still open")
        .expect("watch event is not an error")
}

pub(crate) async fn processes_get_distinct_instance_ids(backend: &Backend) {
    let a = backend.join().await;
    let b = backend.join().await;
    assert_ne!(a.instance_id(), b.instance_id(), "two processes share an instance id");
}

pub(crate) async fn list_matches_whole_segments(backend: &Backend) {
    let p = backend.join().await;
    let ns = namespace();
    let gen_ = endpoint_key(&*p, &ns, "backend", "gen");
    let generate = endpoint_key(&*p, &ns, "backend", "generate");
    let other_component = endpoint_key(&*p, &ns, "backend2", "gen");
    for key in [&gen_, &generate, &other_component] {
        p.register(registration(key, "{}")).await.unwrap();
    }

    let keys = |regs: Vec<Registration>| regs.into_iter().map(|r| r.key).collect::<Vec<_>>();
    assert_eq!(
        keys(p.list(&Query::endpoint(&ns, "backend", "gen")).await.unwrap()),
        vec![gen_.clone()]
    );
    let component = keys(
        p.list(&Query::bucket(Bucket::Instances).namespace(&ns).component("backend"))
            .await
            .unwrap(),
    );
    assert_eq!(component.len(), 2, "component query returned {component:?}");
    assert!(!component.contains(&other_component));
    let namespace = keys(p.list(&Query::bucket(Bucket::Instances).namespace(&ns)).await.unwrap());
    assert_eq!(namespace.len(), 3);
    assert!(
        p.list(&Query::bucket(Bucket::Models).namespace(&ns))
            .await
            .unwrap()
            .is_empty()
    );
    p.shutdown().await.unwrap();
}

pub(crate) async fn watch_yields_current_set_then_changes(backend: &Backend) {
    let worker = backend.join().await;
    let watcher = backend.join().await;
    let ns = namespace();
    let first = endpoint_key(&*worker, &ns, "backend", "generate");
    worker.register(registration(&first, "1")).await.unwrap();

    let mut watch = watcher
        .watch(&Query::endpoint(&ns, "backend", "generate"))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Snapshot(vec![registration(&first, "1")])
    );

    // A change to another endpoint of the same component must not show up.
    let unrelated = endpoint_key(&*worker, &ns, "backend", "generate_more");
    worker.register(registration(&unrelated, "x")).await.unwrap();

    let second_process = backend.join().await;
    let second = endpoint_key(&*second_process, &ns, "backend", "generate");
    second_process.register(registration(&second, "2")).await.unwrap();
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Put(registration(&second, "2"))
    );

    worker.unregister(&first).await.unwrap();
    assert_eq!(next_event(&mut watch).await, WatchEvent::Delete(first));
    worker.shutdown().await.unwrap();
    second_process.shutdown().await.unwrap();
}

pub(crate) async fn reregistering_replaces_the_value(backend: &Backend) {
    let p = backend.join().await;
    let ns = namespace();
    let key = endpoint_key(&*p, &ns, "backend", "generate");
    p.register(registration(&key, "old")).await.unwrap();
    let mut watch = p.watch(&Query::endpoint(&ns, "backend", "generate")).await.unwrap();
    next_event(&mut watch).await;
    p.register(registration(&key, "new")).await.unwrap();
    assert_eq!(next_event(&mut watch).await, WatchEvent::Put(registration(&key, "new")));
    let listed = p.list(&Query::endpoint(&ns, "backend", "generate")).await.unwrap();
    assert_eq!(listed, vec![registration(&key, "new")]);
    p.shutdown().await.unwrap();
}

pub(crate) async fn unregister_removes_the_registration(backend: &Backend) {
    let p = backend.join().await;
    let ns = namespace();
    let key = endpoint_key(&*p, &ns, "backend", "generate");
    p.register(registration(&key, "{}")).await.unwrap();
    p.unregister(&key).await.unwrap();
    assert!(
        p.list(&Query::endpoint(&ns, "backend", "generate"))
            .await
            .unwrap()
            .is_empty()
    );
    // Unregistering again is not an error.
    p.unregister(&key).await.unwrap();
    p.shutdown().await.unwrap();
}

pub(crate) async fn shutdown_removes_everything_the_process_registered(backend: &Backend) {
    let leaving = backend.join().await;
    let staying = backend.join().await;
    let ns = namespace();
    let a = endpoint_key(&*leaving, &ns, "backend", "generate");
    let b = endpoint_key(&*leaving, &ns, "backend", "health");
    let kept = endpoint_key(&*staying, &ns, "backend", "generate");
    for (process, key) in [(&leaving, &a), (&leaving, &b), (&staying, &kept)] {
        process.register(registration(key, "{}")).await.unwrap();
    }
    let mut watch = staying
        .watch(&Query::bucket(Bucket::Instances).namespace(&ns))
        .await
        .unwrap();
    let WatchEvent::Snapshot(initial) = next_event(&mut watch).await else {
        panic!("the first watch event is not a snapshot");
    };
    assert_eq!(initial.len(), 3);

    leaving.shutdown().await.unwrap();
    leaving.shutdown().await.unwrap();
    let mut deleted = vec![];
    for _ in 0..2 {
        match next_event(&mut watch).await {
            WatchEvent::Delete(key) => deleted.push(key),
            other => panic!("expected a delete after shutdown, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, vec![a, b]);
    let listed = staying
        .list(&Query::bucket(Bucket::Instances).namespace(&ns))
        .await
        .unwrap();
    assert_eq!(listed.into_iter().map(|r| r.key).collect::<Vec<_>>(), vec![kept]);
    staying.shutdown().await.unwrap();
}

pub(crate) async fn a_process_cannot_register_another_process_key(backend: &Backend) {
    let a = backend.join().await;
    let b = backend.join().await;
    let ns = namespace();
    let key_of_b = endpoint_key(&*b, &ns, "backend", "generate");
    let err = a.register(registration(&key_of_b, "{}")).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::NotOwner { .. }), "{err}");
}

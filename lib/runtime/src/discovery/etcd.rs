//! Discovery on etcd (`DYN_DISCOVERY_BACKEND=etcd`, `ETCD_ENDPOINTS`).
//!
//! One lease per process (TTL `DYN_LEASE_TTL`, kept alive every TTL/3); every
//! registration is attached to it, so a dead process's keys vanish when its
//! lease expires, and a clean shutdown revokes it so they vanish at once.
//!
//! Unlike Dynamo, losing the lease is not fatal: the process keeps serving,
//! grants a new lease with jittered exponential backoff and puts every key
//! again. The instance id is *not* the lease id — it is chosen once per
//! process — so callers see the same instance before and after the outage
//! (see `docs/adr/0002-discovery-backends.md`).
//!
//! Watches resume from the last revision they saw after a broken stream; when
//! that revision was compacted away, they list again and emit the difference,
//! so a watcher neither misses nor repeats a change.

use super::{Discovery, DiscoveryError, Key, Query, Registration, WatchEvent, WatchStream, diff};
use crate::config::EtcdConfig;
use bytes::Bytes;
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deadline for reaching etcd at start-up (connect and first status call).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for one unary etcd call; nothing waits on etcd forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between attempts to recover a lease or a watch.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// One process's connection to etcd discovery.
#[derive(Debug)]
pub struct EtcdDiscovery {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    instance_id: u64,
    ttl: Duration,
    /// The lease every registration is attached to; replaced on recovery.
    lease: AtomicI64,
    /// What this process registered, to put again under a new lease.
    own: Mutex<BTreeMap<Key, Bytes>>,
    health: Arc<LeaseHealth>,
    shut_down: AtomicBool,
    /// Stops the keep-alive and watch tasks.
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// Whether this process's lease is alive, for logs, metrics and `/health`.
#[derive(Debug, Default)]
pub struct LeaseHealth {
    lost: AtomicBool,
    recoveries: AtomicU64,
}

impl LeaseHealth {
    /// True while the lease is lost and being recovered (registrations may be
    /// missing from etcd; the endpoints are still served).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// How many times a lost lease was replaced and the keys put again.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Acquire)
    }
}

impl EtcdDiscovery {
    /// Connects to etcd (bounded by [`CONNECT_TIMEOUT`]), grants this
    /// process's lease and starts keeping it alive on `tracker` until `stop`.
    pub async fn connect(
        config: &EtcdConfig,
        ttl: Duration,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        // For logs and errors: no credentials a URL may carry.
        let endpoints = crate::config::redact_urls(config.endpoints());
        let unreachable = |source| DiscoveryError::EtcdUnreachable {
            endpoints: endpoints.clone(),
            timeout: CONNECT_TIMEOUT,
            source,
        };
        let options = connect_options(config)?;
        let refused = |source| DiscoveryError::EtcdAccess {
            endpoints: endpoints.clone(),
            source,
        };
        let failed = |error: etcd_client::Error| {
            if access_refused(&error) {
                refused(error)
            } else {
                unreachable(Some(error))
            }
        };
        let mut client = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(config.endpoints(), Some(options)))
            .await
            .map_err(|_| unreachable(None))?
            .map_err(failed)?;
        // Connecting is lazy; a status call proves a server answers.
        tokio::time::timeout(CONNECT_TIMEOUT, client.status())
            .await
            .map_err(|_| unreachable(None))?
            .map_err(failed)?;
        // With authentication on, etcd grants leases to anyone: a read of the
        // key space proves now, not at the first registration, that the
        // credentials let this process in.
        let probe = GetOptions::new().with_prefix().with_keys_only().with_limit(1);
        tokio::time::timeout(CONNECT_TIMEOUT, client.get(Key::ROOT, Some(probe)))
            .await
            .map_err(|_| unreachable(None))?
            .map_err(failed)?;
        let lease = grant(&mut client, ttl).await?;
        let inner = Arc::new(Inner {
            client,
            instance_id: rand::random::<u64>() & 0x001F_FFFF_FFFF_FFFF,
            ttl,
            lease: AtomicI64::new(lease),
            own: Mutex::new(BTreeMap::new()),
            health: Arc::new(LeaseHealth::default()),
            shut_down: AtomicBool::new(false),
            stop,
            tracker,
        });
        tracing::info!(endpoints, lease = format!("{lease:x}"), "connected to etcd");
        inner.tracker.spawn(keep_lease(inner.clone()));
        Ok(Self { inner })
    }

    /// The state of this process's lease.
    pub fn lease_health(&self) -> Arc<LeaseHealth> {
        self.inner.health.clone()
    }
}

/// Whether etcd answered that these credentials may not do this (as opposed
/// to not answering at all).
fn access_refused(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    let message = status.message();
    [
        "authentication failed",
        "user name is empty",
        "permission denied",
        "invalid auth token",
    ]
    .iter()
    .any(|sign| message.contains(sign))
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, DiscoveryError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
    if let Some((user, password)) = config.credentials() {
        options = options.with_user(user.clone(), password.clone());
    }
    if config.ca().is_some() || config.identity().is_some() {
        let read = |variable: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| DiscoveryError::TlsFile {
                variable,
                path: path.to_path_buf(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = config.ca() {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read("ETCD_AUTH_CA", ca)?));
        }
        if let Some((cert, key)) = config.identity() {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("ETCD_AUTH_CLIENT_CERT", cert)?,
                read("ETCD_AUTH_CLIENT_KEY", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// Runs one etcd call with [`CALL_TIMEOUT`].
async fn call<T>(
    operation: &'static str,
    future: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(result) => result.map_err(|source| DiscoveryError::Etcd { operation, source }),
        Err(_) => Err(DiscoveryError::Etcd {
            operation,
            source: etcd_client::Error::InvalidArgs(format!("no answer within {CALL_TIMEOUT:?}")),
        }),
    }
}

async fn grant(client: &mut Client, ttl: Duration) -> Result<i64, DiscoveryError> {
    let seconds = ttl.as_secs().max(1) as i64;
    Ok(call("lease grant", client.lease_grant(seconds, None)).await?.id())
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("instance_id", &self.instance_id)
            .field("lease", &self.lease)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn own(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Bytes>> {
        // Updates are single insert/remove calls: a poisoned map is still consistent.
        self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn put(&self, key: &Key, value: &Bytes, lease: i64) -> Result<(), DiscoveryError> {
        let mut client = self.client.clone();
        let options = PutOptions::new().with_lease(lease);
        call("put", client.put(key.to_string(), value.to_vec(), Some(options))).await?;
        Ok(())
    }

    /// Everything under `query`'s prefix that matches it, and the revision read.
    async fn list(&self, query: &Query) -> Result<(BTreeMap<Key, Bytes>, i64), DiscoveryError> {
        let mut client = self.client.clone();
        let response = call("get", client.get(query.prefix(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut view = BTreeMap::new();
        for kv in response.kvs() {
            if let Some(key) = parse_key(kv.key()).filter(|key| query.matches(key)) {
                view.insert(key, Bytes::copy_from_slice(kv.value()));
            }
        }
        Ok((view, revision))
    }
}

fn parse_key(raw: &[u8]) -> Option<Key> {
    std::str::from_utf8(raw).ok().and_then(|text| Key::parse(text).ok())
}

#[async_trait::async_trait]
impl Discovery for EtcdDiscovery {
    fn instance_id(&self) -> u64 {
        self.inner.instance_id
    }

    async fn register(&self, registration: Registration) -> Result<(), DiscoveryError> {
        super::ensure_owner(self.inner.instance_id, &registration)?;
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Err(DiscoveryError::ShutDown);
        }
        // Recorded first, so a lease recovery running now puts it too.
        self.inner
            .own()
            .insert(registration.key.clone(), registration.value.clone());
        let lease = self.inner.lease.load(Ordering::Acquire);
        if let Err(error) = self.inner.put(&registration.key, &registration.value, lease).await {
            self.inner.own().remove(&registration.key);
            return Err(error);
        }
        Ok(())
    }

    async fn unregister(&self, key: &Key) -> Result<(), DiscoveryError> {
        self.inner.own().remove(key);
        let mut client = self.inner.client.clone();
        call("delete", client.delete(key.to_string(), None)).await?;
        Ok(())
    }

    async fn list(&self, query: &Query) -> Result<Vec<Registration>, DiscoveryError> {
        let (view, _) = self.inner.list(query).await?;
        Ok(super::registrations(&view))
    }

    async fn watch(&self, query: &Query) -> Result<WatchStream, DiscoveryError> {
        let (view, revision) = self.inner.list(query).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Ok(WatchEvent::Snapshot(super::registrations(&view))))
            .expect("receiver is alive");
        self.inner
            .tracker
            .spawn(follow(self.inner.clone(), query.clone(), view, revision, tx));
        Ok(super::watch_stream(rx))
    }

    async fn shutdown(&self) -> Result<(), DiscoveryError> {
        if self.inner.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.own().clear();
        // Revoking the lease deletes every key of this process at once.
        let lease = self.inner.lease.load(Ordering::Acquire);
        let mut client = self.inner.client.clone();
        let revoked = call("lease revoke", client.lease_revoke(lease)).await;
        self.inner.stop.cancel();
        revoked.map(|_| ())
    }
}

/// Keeps the lease alive; when it is lost, replaces it and puts every key
/// again, retrying with jittered exponential backoff until it succeeds.
async fn keep_lease(inner: Arc<Inner>) {
    // Retry well within one TTL: when etcd comes back it restores the old
    // lease with a fresh TTL, and if that runs out before the keys are put
    // again under a new lease, every watcher sees this process vanish (and
    // come back) for nothing.
    let ceiling = (inner.ttl / 3).clamp(RETRY_BACKOFF.0, RETRY_BACKOFF.1);
    let mut backoff = Backoff::up_to(ceiling);
    loop {
        let lease = inner.lease.load(Ordering::Acquire);
        let reason = tokio::select! {
            _ = inner.stop.cancelled() => return,
            reason = keep_alive(&inner, lease) => reason,
        };
        if inner.shut_down.load(Ordering::Acquire) {
            return;
        }
        inner.health.lost.store(true, Ordering::Release);
        let lost_at = tokio::time::Instant::now();
        tracing::warn!(lease = format!("{lease:x}"), %reason, "etcd lease lost; recovering (endpoints stay served)");
        loop {
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
            match recover(&inner).await {
                Ok(keys) => {
                    inner.health.lost.store(false, Ordering::Release);
                    inner.health.recoveries.fetch_add(1, Ordering::AcqRel);
                    backoff = Backoff::up_to(ceiling);
                    tracing::info!(
                        lease = format!("{:x}", inner.lease.load(Ordering::Acquire)),
                        keys,
                        outage = ?lost_at.elapsed(),
                        "etcd lease recovered; registrations restored"
                    );
                    break;
                }
                Err(error) => tracing::warn!(%error, "etcd lease recovery failed; retrying"),
            }
        }
    }
}

/// Sends keep-alives every TTL/3 until the lease is lost; returns why.
async fn keep_alive(inner: &Inner, lease: i64) -> String {
    let mut client = inner.client.clone();
    let (mut keeper, mut responses) = match call("lease keep-alive", client.lease_keep_alive(lease)).await {
        Ok(pair) => pair,
        Err(error) => return error.to_string(),
    };
    loop {
        if let Err(error) = keeper.keep_alive().await {
            return format!("keep-alive send failed: {error}");
        }
        match tokio::time::timeout(inner.ttl, responses.message()).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return "the lease expired".to_string(),
            Ok(Ok(None)) => return "the keep-alive stream ended".to_string(),
            Ok(Err(error)) => return format!("keep-alive failed: {error}"),
            Err(_) => return format!("no keep-alive answer within {:?}", inner.ttl),
        }
        tokio::time::sleep(inner.ttl / 3).await;
    }
}

/// Grants a new lease and puts every registration under it. Returns how
/// many keys were restored.
async fn recover(inner: &Inner) -> Result<usize, DiscoveryError> {
    let mut client = inner.client.clone();
    let old = inner.lease.load(Ordering::Acquire);
    let lease = grant(&mut client, inner.ttl).await?;
    inner.lease.store(lease, Ordering::Release);
    let own: Vec<(Key, Bytes)> = inner.own().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (key, value) in &own {
        inner.put(key, value, lease).await?;
    }
    // The old lease is normally gone already; if it is not, its keys moved to
    // the new one and it holds nothing.
    let _ = call("lease revoke", client.lease_revoke(old)).await;
    Ok(own.len())
}

/// Follows etcd changes under `query` from `revision`, re-opening the watch
/// where it stopped; after a compaction it lists again and sends the difference.
async fn follow(
    inner: Arc<Inner>,
    query: Query,
    mut view: BTreeMap<Key, Bytes>,
    revision: i64,
    tx: mpsc::UnboundedSender<Result<WatchEvent, DiscoveryError>>,
) {
    let mut next = revision + 1;
    let mut backoff = Backoff::new();
    loop {
        let outcome = tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tx.closed() => return,
            outcome = watch_from(&inner, &query, &mut view, &mut next, &tx) => outcome,
        };
        match outcome {
            WatchOutcome::ReceiverGone => return,
            WatchOutcome::Compacted => {
                // Changes between `next` and now are gone from etcd's history:
                // list again and send the difference from what the receiver has.
                match inner.list(&query).await {
                    Ok((current, revision)) => {
                        for event in diff(&view, &current) {
                            if tx.send(Ok(event)).is_err() {
                                return;
                            }
                        }
                        view = current;
                        next = revision + 1;
                        backoff = Backoff::new();
                        continue;
                    }
                    Err(error) => tracing::warn!(%error, "etcd re-list after compaction failed; retrying"),
                }
            }
            WatchOutcome::Broken(reason) => {
                tracing::warn!(%reason, revision = next, "etcd watch interrupted; resuming");
            }
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

enum WatchOutcome {
    ReceiverGone,
    Compacted,
    Broken(String),
}

/// One watch stream from revision `next`; applies events to `view` and
/// advances `next` past every revision it has delivered.
async fn watch_from(
    inner: &Inner,
    query: &Query,
    view: &mut BTreeMap<Key, Bytes>,
    next: &mut i64,
    tx: &mpsc::UnboundedSender<Result<WatchEvent, DiscoveryError>>,
) -> WatchOutcome {
    let mut client = inner.client.clone();
    let options = WatchOptions::new().with_prefix().with_start_revision(*next);
    let mut stream = match client.watch(query.prefix(), Some(options)).await {
        Ok(stream) => stream,
        Err(error) => return WatchOutcome::Broken(error.to_string()),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return WatchOutcome::Broken("the watch stream ended".to_string()),
            Err(error) => return WatchOutcome::Broken(error.to_string()),
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                return WatchOutcome::Compacted;
            }
            return WatchOutcome::Broken(format!("etcd cancelled the watch: {}", response.cancel_reason()));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            *next = (*next).max(kv.mod_revision() + 1);
            let Some(key) = parse_key(kv.key()).filter(|key| query.matches(key)) else {
                continue;
            };
            let change = match event.event_type() {
                etcd_client::EventType::Put => {
                    let value = Bytes::copy_from_slice(kv.value());
                    view.insert(key.clone(), value.clone());
                    WatchEvent::Put(Registration { key, value })
                }
                etcd_client::EventType::Delete => {
                    if view.remove(&key).is_none() {
                        continue;
                    }
                    WatchEvent::Delete(key)
                }
            };
            if tx.send(Ok(change)).is_err() {
                return WatchOutcome::ReceiverGone;
            }
        }
        if let Some(header) = response.header() {
            *next = (*next).max(header.revision() + 1);
        }
    }
}

/// Exponential backoff with full jitter between [`RETRY_BACKOFF`] bounds, so
/// many processes recovering at once do not hit etcd in step.
#[derive(Debug)]
struct Backoff {
    ceiling: Duration,
    max: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self::up_to(RETRY_BACKOFF.1)
    }

    /// Growing to `max` at most.
    fn up_to(max: Duration) -> Self {
        Self {
            ceiling: RETRY_BACKOFF.0.min(max),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.ceiling.mul_f64(rand::random_range(0.5..=1.0));
        self.ceiling = (self.ceiling * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;
    use crate::discovery::Bucket;
    use futures::StreamExt;
    use std::sync::OnceLock;
    use switchyard_test_support::etcd_server::{EtcdServer, TestCertificates};

    /// One etcd for this test binary; the watchdog stops it when the binary exits.
    fn server() -> &'static EtcdServer {
        static SERVER: OnceLock<EtcdServer> = OnceLock::new();
        SERVER.get_or_init(EtcdServer::start)
    }

    fn etcd_config(url: &str) -> EtcdConfig {
        RuntimeConfig::from_vars([("ETCD_ENDPOINTS", url)])
            .unwrap()
            .etcd()
            .clone()
    }

    async fn join(url: &str, ttl: Duration) -> Result<EtcdDiscovery, DiscoveryError> {
        EtcdDiscovery::connect(&etcd_config(url), ttl, TaskTracker::new(), CancellationToken::new()).await
    }

    /// Joins with settings of the test's own (credentials, TLS).
    async fn join_with(config: &EtcdConfig) -> Result<EtcdDiscovery, DiscoveryError> {
        EtcdDiscovery::connect(
            config,
            Duration::from_secs(10),
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .await
    }

    /// The shared suite, every check on this binary's one etcd server (each
    /// in a namespace of its own).
    mod discovery_suite {
        use super::*;
        use crate::discovery::suite::{Backend, discovery_suite};

        discovery_suite!({
            let url = server().url();
            Backend::new(move || {
                let url = url.clone();
                async move { Ok(Arc::new(join(&url, Duration::from_secs(10)).await?) as Arc<dyn Discovery>) }
            })
        });
    }

    /// An etcd of its own with authentication on (turning it on in the
    /// shared one would lock the other tests out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_with_authentication_on_takes_the_configured_credentials_and_refuses_others() {
        let server = EtcdServer::start();
        let url = server.url();
        let mut admin = Client::connect([url.as_str()], None).await.unwrap();
        admin.user_add("root", "root-secret", None).await.unwrap();
        admin.user_grant_role("root", "root").await.unwrap();
        admin.auth_enable().await.unwrap();

        let settings = |user: Option<(&str, &str)>| {
            let mut vars = vec![("ETCD_ENDPOINTS", url.as_str())];
            if let Some((name, password)) = user {
                vars.extend([("ETCD_AUTH_USERNAME", name), ("ETCD_AUTH_PASSWORD", password)]);
            }
            RuntimeConfig::from_vars(vars).unwrap().etcd().clone()
        };

        let config = settings(Some(("root", "root-secret")));
        assert!(
            !format!("{config:?}").contains("root-secret"),
            "the password must not be printable: {config:?}"
        );
        let process = join_with(&config).await.expect("the right credentials are accepted");
        registers_and_lists(&process, "auth").await;

        for (who, config) in [
            ("no credentials", settings(None)),
            ("a wrong password", settings(Some(("root", "guess")))),
        ] {
            let error = join_with(&config).await.expect_err(who);
            let text = format!("{error}: {:?}", std::error::Error::source(&error));
            assert!(!text.contains("root-secret"), "{who}: {text}");
            assert!(
                text.contains("ETCD_AUTH_USERNAME"),
                "{who}: the error names the settings: {text}"
            );
        }
    }

    /// An etcd of its own speaking TLS only and requiring client certificates.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_with_mutual_tls_is_reached_with_the_configured_certificates_only() {
        let certificates = TestCertificates::generate();
        let server = EtcdServer::start_with_mutual_tls(&certificates);
        let url = server.url();
        assert!(url.starts_with("https://"));
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let (ca, cert, key) = (
            path(&certificates.ca),
            path(&certificates.client_cert),
            path(&certificates.client_key),
        );
        let settings = |vars: &[(&str, &str)]| {
            let mut all = vec![("ETCD_ENDPOINTS", url.as_str())];
            all.extend_from_slice(vars);
            RuntimeConfig::from_vars(all).unwrap().etcd().clone()
        };

        let trusted = settings(&[
            ("ETCD_AUTH_CA", &ca),
            ("ETCD_AUTH_CLIENT_CERT", &cert),
            ("ETCD_AUTH_CLIENT_KEY", &key),
        ]);
        let process = join_with(&trusted)
            .await
            .expect("the CA and a client certificate get in");
        registers_and_lists(&process, "tls").await;

        for (who, config) in [
            ("without a client certificate", settings(&[("ETCD_AUTH_CA", &ca)])),
            ("without TLS settings", settings(&[])),
        ] {
            join_with(&config).await.expect_err(who);
        }
    }

    #[tokio::test]
    async fn unreachable_etcd_fails_fast_naming_the_endpoints_and_the_alternatives() {
        let url = format!("http://127.0.0.1:{}", switchyard_test_support::free_port());
        let started = tokio::time::Instant::now();
        let error = join(&url, Duration::from_secs(10)).await.unwrap_err().to_string();
        assert!(started.elapsed() < CONNECT_TIMEOUT * 3, "took {:?}", started.elapsed());
        assert!(error.contains(&url), "{error}");
        assert!(error.contains("DYN_DISCOVERY_BACKEND=mem"), "{error}");
    }

    /// Registers an instance in namespace `ns`, lists it back, and leaves.
    async fn registers_and_lists(process: &EtcdDiscovery, ns: &str) {
        let key = key(process, ns, "generate");
        let registration = Registration {
            key,
            value: Bytes::from_static(b"{}"),
        };
        process.register(registration.clone()).await.unwrap();
        let listed = process.list(&Query::endpoint(ns, "c", "generate")).await.unwrap();
        assert_eq!(listed, vec![registration]);
        process.shutdown().await.unwrap();
    }

    fn key(process: &EtcdDiscovery, ns: &str, endpoint: &str) -> Key {
        Key {
            bucket: Bucket::Instances,
            namespace: ns.into(),
            component: "c".into(),
            name: endpoint.into(),
            instance_id: process.instance_id(),
        }
    }

    /// A watcher that fell behind a compaction lists again and receives
    /// exactly the difference: no missed change, no repeated one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_resuming_after_compaction_sends_the_difference() {
        let process = join(&server().url(), Duration::from_secs(10)).await.unwrap();
        let ns = format!("compact-{:x}", rand::random::<u32>());
        let query = Query::bucket(Bucket::Instances).namespace(&ns);
        let (gone, kept, changed, added) = (
            key(&process, &ns, "gone"),
            key(&process, &ns, "kept"),
            key(&process, &ns, "changed"),
            key(&process, &ns, "added"),
        );
        for k in [&gone, &kept, &changed] {
            process
                .register(Registration {
                    key: k.clone(),
                    value: Bytes::from_static(b"v1"),
                })
                .await
                .unwrap();
        }
        // What a watcher had seen when it lost its stream.
        let (stale_view, stale_revision) = process.inner.list(&query).await.unwrap();
        assert_eq!(stale_view.len(), 3);

        // Meanwhile: one removed, one changed, one added, and history compacted.
        process.unregister(&gone).await.unwrap();
        process
            .register(Registration {
                key: changed.clone(),
                value: Bytes::from_static(b"v2"),
            })
            .await
            .unwrap();
        process
            .register(Registration {
                key: added.clone(),
                value: Bytes::from_static(b"v1"),
            })
            .await
            .unwrap();
        let (_, now) = process.inner.list(&query).await.unwrap();
        let mut client = process.inner.client.clone();
        client.compact(now, None).await.unwrap();

        let (tx, mut rx) = mpsc::unbounded_channel();
        process.inner.tracker.spawn(follow(
            process.inner.clone(),
            query.clone(),
            stale_view,
            stale_revision,
            tx,
        ));
        let mut events = vec![];
        for _ in 0..3 {
            let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            events.push(event);
        }
        assert_eq!(
            events,
            vec![
                WatchEvent::Delete(gone),
                WatchEvent::Put(Registration {
                    key: added.clone(),
                    value: Bytes::from_static(b"v1")
                }),
                WatchEvent::Put(Registration {
                    key: changed.clone(),
                    value: Bytes::from_static(b"v2")
                }),
            ]
        );
        // After the re-list it follows live changes again, each exactly once.
        process.unregister(&kept).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event, WatchEvent::Delete(kept));
        assert!(rx.try_recv().is_err(), "a change was delivered twice");
        process.shutdown().await.unwrap();
    }

    async fn next(watch: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(15), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_lease_is_replaced_and_every_key_put_again() {
        let ttl = Duration::from_secs(2);
        let process = join(&server().url(), ttl).await.unwrap();
        let observer = join(&server().url(), Duration::from_secs(10)).await.unwrap();
        let ns = format!("lease-{:x}", rand::random::<u32>());
        let k = key(&process, &ns, "generate");
        process
            .register(Registration {
                key: k.clone(),
                value: Bytes::from_static(b"{}"),
            })
            .await
            .unwrap();
        let mut watch = observer
            .watch(&Query::bucket(Bucket::Instances).namespace(&ns))
            .await
            .unwrap();
        assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Snapshot(s))) if s.len() == 1));

        // Someone revokes the lease behind the process's back: its keys vanish.
        let old = process.inner.lease.load(Ordering::Acquire);
        let mut client = process.inner.client.clone();
        client.lease_revoke(old).await.unwrap();
        assert_eq!(next(&mut watch).await, WatchEvent::Delete(k.clone()));
        // The process notices, grants a new lease and registers again, with the same instance id.
        assert!(matches!(next(&mut watch).await, WatchEvent::Put(r) if r.key == k));
        // The counter moves right after the keys are back.
        let health = process.lease_health();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while health.recoveries() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(health.recoveries(), 1);
        assert!(!health.is_lost());
        assert_ne!(process.inner.lease.load(Ordering::Acquire), old);
        process.shutdown().await.unwrap();
        observer.shutdown().await.unwrap();
    }
}

//! Discovery through a directory shared by the processes of one machine
//! (`DYN_DISCOVERY_BACKEND=file`, root `DYN_FILE_KV`).
//!
//! Layout: one sub-directory per bucket (`instances/`, `models/`,
//! `event_channels/`), one file per registration, named
//! `{namespace}.{component}.{name}.{instance_id:x}` with every byte outside
//! `[A-Za-z0-9_-]` of each segment percent-encoded, so any key round-trips.
//! Files are written atomically (temp file `.tmp_*`, then rename).
//!
//! Trust: the directories are created 0700, and a root or bucket directory
//! owned by another user, or writable by group or others, is refused at
//! open — whoever can write there can register models. Entries that are
//! not regular files (a FIFO would block a reader), cannot be read, or are
//! larger than [`MAX_ENTRY_BYTES`] are skipped with a warning, never fatal.
//!
//! Liveness: a process touches its files every `DYN_LEASE_TTL / 3`. A file
//! whose modification time is older than the TTL belongs to a dead process:
//! readers ignore it and delete it. Watches rescan on every inotify event and
//! at least every [`RESCAN_EVERY`] (so expiry is seen, and a dropped event
//! costs at most one interval).

use super::{Bucket, Discovery, DiscoveryError, Key, Query, Registration, WatchEvent, WatchStream, diff};
use bytes::Bytes;
use notify::Watcher;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest pause between two scans of a watched bucket. Bounds how late a
/// dead process's expiry (or a dropped inotify event) is noticed.
const RESCAN_EVERY: Duration = Duration::from_millis(500);

const BUCKETS: [Bucket; 3] = [Bucket::Instances, Bucket::Models, Bucket::EventChannels];

/// Largest registration file read; real ones are a few hundred bytes.
const MAX_ENTRY_BYTES: u64 = 1024 * 1024;

/// Paths already warned about (bounded), so a bad entry is reported once,
/// not on every scan.
static WARNED: Mutex<Option<std::collections::HashSet<PathBuf>>> = Mutex::new(None);
const MAX_WARNED: usize = 1024;

fn warn_once(path: &Path, why: &str) {
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    let warned = warned.get_or_insert_with(Default::default);
    if warned.len() < MAX_WARNED && warned.insert(path.to_path_buf()) {
        tracing::warn!(file = %path.display(), why, "file discovery: skipping an entry");
    }
}

/// Creates `dir` (and its parents) 0700 when missing.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Refuses `dir` unless `uid` owns it and only its owner may write to it.
fn check_trusted(dir: &Path, uid: u32) -> Result<(), DiscoveryError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| file_error("inspect", dir, e))?;
    let problem = if meta.file_type().is_symlink() {
        Some("it is a symbolic link".to_string())
    } else if meta.uid() != uid {
        Some(format!(
            "it is owned by uid {}, not by this process's uid {uid}",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "group or others may write to it (mode {:o})",
            meta.mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(DiscoveryError::FileUntrusted {
            path: dir.to_path_buf(),
            problem,
        }),
        None => Ok(()),
    }
}

/// One process's handle on a shared discovery directory.
#[derive(Debug)]
pub struct FileDiscovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    ttl: Duration,
    instance_id: u64,
    /// What this process registered, to refresh (and rewrite if reaped).
    own: Mutex<BTreeMap<Key, Bytes>>,
    shut_down: AtomicBool,
    /// Bumped by inotify on any change in a bucket directory; watches rescan.
    changes: watch::Sender<u64>,
    /// Kept alive for as long as the backend: dropping it stops inotify.
    _watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// Stops the refresh task and the watch tasks.
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl FileDiscovery {
    /// Opens (creating if needed) the directory `root` and starts refreshing
    /// this process's files. Tasks run on `tracker` until `stop` is cancelled.
    pub async fn open(
        root: PathBuf,
        ttl: Duration,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        let dirs: Vec<PathBuf> = BUCKETS.iter().map(|b| root.join(b.as_str())).collect();
        blocking({
            let (dirs, root) = (dirs.clone(), root.clone());
            move || {
                use std::os::unix::fs::MetadataExt;
                for dir in &dirs {
                    create_private_dir(dir).map_err(|e| file_error("create", dir, e))?;
                }
                // Fail at start-up, not at the first registration, when the
                // directory is read-only; the probe also says who we are.
                let probe = dirs[0].join(format!(".tmp_probe_{:016x}", rand::random::<u64>()));
                std::fs::write(&probe, b"").map_err(|e| file_error("write to", &dirs[0], e))?;
                let uid = std::fs::metadata(&probe).map(|m| m.uid());
                let _ = std::fs::remove_file(&probe);
                let uid = uid.map_err(|e| file_error("inspect", &probe, e))?;
                for dir in std::iter::once(&root).chain(&dirs) {
                    check_trusted(dir, uid)?;
                }
                Ok(())
            }
        })
        .await?;

        let (changes, _) = watch::channel(0u64);
        let notifier = changes.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads (open/close events) are not changes — and every watcher's
            // own scan reads the files, so counting them makes all processes
            // on the directory rescan each other in a loop.
            if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                notifier.send_modify(|n| *n = n.wrapping_add(1));
            }
        })
        .map_err(|e| file_error("watch", &root, io::Error::other(e)))?;
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(|e| file_error("watch", dir, io::Error::other(e)))?;
        }

        let inner = Arc::new(Inner {
            root,
            ttl,
            instance_id: rand::random::<u64>() & 0x001F_FFFF_FFFF_FFFF,
            own: Mutex::new(BTreeMap::new()),
            shut_down: AtomicBool::new(false),
            changes,
            _watcher: Mutex::new(Some(watcher)),
            stop,
            tracker,
        });
        inner.tracker.spawn(refresh(inner.clone()));
        Ok(Self { inner })
    }

    /// The directory this backend shares.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

impl Inner {
    fn own(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Bytes>> {
        // Updates are single insert/remove calls: a poisoned map is still consistent.
        self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(key.bucket.as_str()).join(file_name(key))
    }
}

#[async_trait::async_trait]
impl Discovery for FileDiscovery {
    fn instance_id(&self) -> u64 {
        self.inner.instance_id
    }

    async fn register(&self, registration: Registration) -> Result<(), DiscoveryError> {
        super::ensure_owner(self.inner.instance_id, &registration)?;
        let key = &registration.key;
        if [&key.namespace, &key.component, &key.name].iter().any(|s| s.is_empty()) {
            return Err(DiscoveryError::BadKey { key: key.to_string() });
        }
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Err(DiscoveryError::ShutDown);
        }
        let path = self.inner.path(&registration.key);
        let value = registration.value.clone();
        blocking(move || write_atomically(&path, &value)).await?;
        self.inner.own().insert(registration.key, registration.value);
        // Lost a race with shutdown: take the file back out.
        if self.inner.shut_down.load(Ordering::Acquire) {
            self.shutdown().await?;
            return Err(DiscoveryError::ShutDown);
        }
        Ok(())
    }

    async fn unregister(&self, key: &Key) -> Result<(), DiscoveryError> {
        self.inner.own().remove(key);
        let path = self.inner.path(key);
        blocking(move || remove_if_present(&path)).await
    }

    async fn list(&self, query: &Query) -> Result<Vec<Registration>, DiscoveryError> {
        let (root, ttl, query) = (self.inner.root.clone(), self.inner.ttl, query.clone());
        let view = blocking(move || scan(&root, ttl, &query)).await?;
        Ok(super::registrations(&view))
    }

    async fn watch(&self, query: &Query) -> Result<WatchStream, DiscoveryError> {
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Err(DiscoveryError::ShutDown);
        }
        let mut changes = self.inner.changes.subscribe();
        changes.mark_unchanged();
        let (root, ttl, query) = (self.inner.root.clone(), self.inner.ttl, query.clone());
        let view = blocking({
            let (root, query) = (root.clone(), query.clone());
            move || scan(&root, ttl, &query)
        })
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Ok(WatchEvent::Snapshot(super::registrations(&view))))
            .expect("receiver is alive");
        let stop = self.inner.stop.clone();
        self.inner.tracker.spawn(async move {
            let mut view = view;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(RESCAN_EVERY) => {}
                }
                let scanned = blocking({
                    let (root, query) = (root.clone(), query.clone());
                    move || scan(&root, ttl, &query)
                })
                .await;
                match scanned {
                    Ok(current) => {
                        for event in diff(&view, &current) {
                            if tx.send(Ok(event)).is_err() {
                                return;
                            }
                        }
                        view = current;
                    }
                    Err(error) => tracing::warn!(%error, "file discovery rescan failed"),
                }
            }
        });
        Ok(super::watch_stream(rx))
    }

    async fn shutdown(&self) -> Result<(), DiscoveryError> {
        self.inner.shut_down.store(true, Ordering::Release);
        let own = std::mem::take(&mut *self.inner.own());
        let paths: Vec<PathBuf> = own.keys().map(|key| self.inner.path(key)).collect();
        blocking(move || {
            for path in paths {
                remove_if_present(&path)?;
            }
            Ok(())
        })
        .await
    }
}

/// Keeps this process's files fresh (and rewrites any that were reaped while
/// the process was paused longer than the TTL).
async fn refresh(inner: Arc<Inner>) {
    let every = inner.ttl / 3;
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let files: Vec<(PathBuf, Bytes)> = inner
            .own()
            .iter()
            .map(|(key, value)| (inner.path(key), value.clone()))
            .collect();
        let result = blocking(move || {
            for (path, value) in files {
                touch_or_rewrite(&path, &value)?;
            }
            Ok(())
        })
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "cannot refresh file discovery registrations");
        }
    }
}

/// The current, live registrations matching `query`; reaps expired files.
fn scan(root: &Path, ttl: Duration, query: &Query) -> Result<BTreeMap<Key, Bytes>, DiscoveryError> {
    let dir = root.join(query.bucket.as_str());
    let entries = std::fs::read_dir(&dir).map_err(|e| file_error("list", &dir, e))?;
    let now = SystemTime::now();
    let mut view = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let Some(key) = parse_file_name(query.bucket, name) else {
            tracing::debug!(file = %entry.path().display(), "ignoring a file that is not a registration");
            continue;
        };
        if !query.matches(&key) {
            continue;
        }
        let path = entry.path();
        // Not followed: a symbolic link, FIFO or device is skipped, never opened.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.file_type().is_file() {
            warn_once(&path, "not a regular file");
            continue;
        }
        if meta.len() > MAX_ENTRY_BYTES {
            warn_once(&path, "larger than 1 MiB: not a registration");
            continue;
        }
        let Ok(modified) = meta.modified() else {
            continue;
        };
        // A modification time in the future (clock skew) counts as fresh.
        if now.duration_since(modified).is_ok_and(|age| age > ttl) {
            // Its owner stopped refreshing it: the process is gone.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match std::fs::read(&path) {
            Ok(value) => {
                view.insert(key, Bytes::from(value));
            }
            // Removed between listing and reading: it is gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn_once(&path, &format!("cannot be read: {e}")),
        }
    }
    Ok(view)
}

/// `{namespace}.{component}.{name}.{instance_id:x}`, each segment
/// percent-encoded (every byte outside `[A-Za-z0-9_-]`), so `.` only ever
/// separates segments and any key, even one with `/` in a segment, round-trips.
fn file_name(key: &Key) -> String {
    let id = format!("{:x}", key.instance_id);
    [
        key.namespace.as_str(),
        key.component.as_str(),
        key.name.as_str(),
        id.as_str(),
    ]
    .map(encode_segment)
    .join(".")
}

fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

fn parse_file_name(bucket: Bucket, name: &str) -> Option<Key> {
    let parts: Vec<&str> = name.split('.').collect();
    let [namespace, component, key_name, id] = parts.as_slice() else {
        return None;
    };
    Some(Key {
        bucket,
        namespace: decode_segment(namespace)?,
        component: decode_segment(component)?,
        name: decode_segment(key_name)?,
        instance_id: u64::from_str_radix(id, 16).ok()?,
    })
}

fn write_atomically(path: &Path, value: &[u8]) -> Result<(), DiscoveryError> {
    let dir = path.parent().expect("registration files live in a bucket directory");
    let temp = dir.join(format!(".tmp_{:016x}", rand::random::<u64>()));
    std::fs::write(&temp, value).map_err(|e| file_error("write", &temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        file_error("rename into place", path, e)
    })
}

fn touch_or_rewrite(path: &Path, value: &[u8]) -> Result<(), DiscoveryError> {
    match std::fs::File::options().write(true).open(path) {
        Ok(file) => file
            .set_modified(SystemTime::now())
            .map_err(|e| file_error("refresh", path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomically(path, value),
        Err(e) => Err(file_error("refresh", path, e)),
    }
}

fn remove_if_present(path: &Path) -> Result<(), DiscoveryError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_error("remove", path, e)),
    }
}

fn file_error(action: &'static str, path: &Path, source: io::Error) -> DiscoveryError {
    DiscoveryError::File {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DiscoveryError> + Send + 'static,
) -> Result<T, DiscoveryError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|join| {
        Err(file_error(
            "run a file task for",
            Path::new("discovery"),
            io::Error::other(join),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_any_key() {
        let key = Key {
            bucket: Bucket::Models,
            namespace: "ns.with/odd chars%".into(),
            component: "Ünïcode".into(),
            name: "gen-1_x".into(),
            instance_id: 0xdead_beef,
        };
        let name = file_name(&key);
        assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
        assert_eq!(parse_file_name(Bucket::Models, &name), Some(key));
        assert_eq!(parse_file_name(Bucket::Models, "not%2"), None);
        assert_eq!(parse_file_name(Bucket::Models, "a%2Fb"), None);
    }

    fn temp_root() -> PathBuf {
        std::env::temp_dir().join(format!("switchyard-file-test-{:016x}", rand::random::<u64>()))
    }

    /// A check's directory: its processes stop and it is removed when the
    /// check ends (with the suite's `Backend`, which owns it).
    struct SuiteRoot {
        path: PathBuf,
        stop: CancellationToken,
    }

    impl Drop for SuiteRoot {
        fn drop(&mut self) {
            self.stop.cancel();
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    /// The shared suite, each check in a directory of its own.
    mod discovery_suite {
        use super::*;
        use crate::discovery::suite::{Backend, discovery_suite};

        discovery_suite!({
            let root = SuiteRoot {
                path: temp_root(),
                stop: CancellationToken::new(),
            };
            let tracker = TaskTracker::new();
            Backend::new(move || {
                let (path, stop, tracker) = (root.path.clone(), root.stop.clone(), tracker.clone());
                async move {
                    let backend = FileDiscovery::open(path, Duration::from_secs(10), tracker, stop).await?;
                    Ok(Arc::new(backend) as Arc<dyn Discovery>)
                }
            })
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_of_a_process_that_stops_refreshing_expire() {
        let root = temp_root();
        let ttl = Duration::from_secs(1);
        let (dead_stop, live_stop) = (CancellationToken::new(), CancellationToken::new());
        let dead = FileDiscovery::open(root.clone(), ttl, TaskTracker::new(), dead_stop.clone())
            .await
            .unwrap();
        let watcher = FileDiscovery::open(root.clone(), ttl, TaskTracker::new(), live_stop.clone())
            .await
            .unwrap();
        let key = Key {
            bucket: Bucket::Instances,
            namespace: "ns".into(),
            component: "c".into(),
            name: "e".into(),
            instance_id: dead.instance_id(),
        };
        dead.register(Registration {
            key: key.clone(),
            value: Bytes::from_static(b"{}"),
        })
        .await
        .unwrap();
        let mut watch = watcher.watch(&Query::endpoint("ns", "c", "e")).await.unwrap();
        use futures::StreamExt;
        assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Snapshot(s))) if s.len() == 1));

        // The refresh task stops, as if the process were killed; nothing is deleted.
        dead_stop.cancel();
        let started = tokio::time::Instant::now();
        let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap();
        assert!(matches!(event, Some(Ok(WatchEvent::Delete(k))) if k == key));
        assert!(
            started.elapsed() <= ttl + Duration::from_secs(1) + RESCAN_EVERY,
            "{:?}",
            started.elapsed()
        );
        assert!(!dead.inner.path(&key).exists(), "the expired file was not reaped");
        live_stop.cancel();
        let _ = std::fs::remove_dir_all(root);
    }

    async fn open_at(root: &Path) -> Result<FileDiscovery, DiscoveryError> {
        FileDiscovery::open(
            root.to_path_buf(),
            Duration::from_secs(10),
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .await
    }

    #[tokio::test]
    async fn directories_are_created_private_and_shared_or_foreign_ones_are_refused() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = temp_root();
        drop(open_at(&root).await.unwrap());
        for dir in [root.clone(), root.join("models")] {
            assert_eq!(
                std::fs::metadata(&dir).unwrap().mode() & 0o777,
                0o700,
                "{}",
                dir.display()
            );
        }
        // Writable by everyone, as a directory another user made in /tmp could be.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = open_at(&root).await.expect_err("refused");
        assert!(matches!(error, DiscoveryError::FileUntrusted { .. }), "{error}");
        assert!(error.to_string().contains("mode 777"), "{error}");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Owned by another user (only root can hand a directory over).
        if std::os::unix::fs::chown(root.join("models"), Some(65534), None).is_ok() {
            let error = open_at(&root).await.expect_err("refused");
            assert!(error.to_string().contains("owned by uid 65534"), "{error}");
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fifo_or_an_oversized_entry_is_skipped_and_real_registrations_are_seen() {
        let root = temp_root();
        let backend = open_at(&root).await.unwrap();
        let key = Key {
            bucket: Bucket::Instances,
            namespace: "ns".into(),
            component: "c".into(),
            name: "e".into(),
            instance_id: backend.instance_id(),
        };
        backend
            .register(Registration {
                key: key.clone(),
                value: Bytes::from_static(b"{}"),
            })
            .await
            .unwrap();
        // Registration-like names: a FIFO (opening it would block for ever)
        // and a 2 MiB file.
        let fifo = root.join("instances").join("ns.c.e.1");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        let huge = std::fs::File::create(root.join("instances").join("ns.c.e.2")).unwrap();
        huge.set_len(2 * 1024 * 1024).unwrap();
        let listed = tokio::time::timeout(Duration::from_secs(5), backend.list(&Query::endpoint("ns", "c", "e")))
            .await
            .expect("the FIFO is not opened")
            .unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].key, key);
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test]
    async fn a_read_only_root_fails_at_open() {
        let err = FileDiscovery::open(
            PathBuf::from("/proc/switchyard-cannot-write-here"),
            Duration::from_secs(10),
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/proc/switchyard-cannot-write-here"), "{err}");
    }
}

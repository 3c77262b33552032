//! How long a registration takes to reach a watcher in another "process"
//! (a second backend instance), for the file and etcd backends: 1,000
//! register → seen-by-watcher round trips each, one at a time, each
//! registration removed again before the next (so the fleet stays small).
//!
//! ```text
//! cargo bench -p switchyard-runtime --bench discovery
//! ```
//!
//! etcd runs on a fresh server started by the bench (`etcd` must be
//! installed; `make test` installs it).

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::etcd::EtcdDiscovery;
use switchyard_runtime::discovery::file::FileDiscovery;
use switchyard_runtime::discovery::{Bucket, Discovery, Key, Query, Registration, WatchEvent, WatchStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SAMPLES: usize = 1_000;
/// Without `--bench` (`cargo test --bench '*'`, from `make test`): a moment of
/// each backend, so the bench cannot rot unnoticed.
const QUICK_SAMPLES: usize = 20;
const TTL: Duration = Duration::from_secs(10);

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("event within 10 s")
        .expect("stream open")
        .expect("no error")
}

/// Times `samples` registrations by `writer` until `reader`'s watch sees each.
async fn measure(writer: Arc<dyn Discovery>, reader: Arc<dyn Discovery>, samples: usize) -> Vec<Duration> {
    let namespace = format!("bench-{:x}", rand::random::<u32>());
    let mut watch = reader
        .watch(&Query::bucket(Bucket::Instances).namespace(&namespace))
        .await
        .unwrap();
    assert!(matches!(next_event(&mut watch).await, WatchEvent::Snapshot(s) if s.is_empty()));
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let key = Key {
            bucket: Bucket::Instances,
            namespace: namespace.clone(),
            component: "worker".into(),
            name: format!("endpoint{i}"),
            instance_id: writer.instance_id(),
        };
        let started = Instant::now();
        writer
            .register(Registration {
                key: key.clone(),
                value: Bytes::from_static(br#"{"transport":{"tcp":"127.0.0.1:1"}}"#),
            })
            .await
            .unwrap();
        loop {
            if matches!(next_event(&mut watch).await, WatchEvent::Put(r) if r.key == key) {
                break;
            }
        }
        times.push(started.elapsed());
        writer.unregister(&key).await.unwrap();
        assert!(matches!(next_event(&mut watch).await, WatchEvent::Delete(k) if k == key));
    }
    times.sort();
    times
}

fn report(name: &str, times: &[Duration]) {
    let at = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
        at(50),
        at(90),
        at(99),
        at(100)
    );
}

fn main() {
    let samples = if std::env::args().any(|arg| arg == "--bench") {
        SAMPLES
    } else {
        QUICK_SAMPLES
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = switchyard_test_support::etcd_server::EtcdServer::start();
    let (file, etcd) = rt.block_on(async {
        let root = std::env::temp_dir().join(format!("switchyard-bench-{:016x}", rand::random::<u64>()));
        let stop = CancellationToken::new();
        let open = || FileDiscovery::open(root.clone(), TTL, TaskTracker::new(), stop.clone());
        let file_writer: Arc<dyn Discovery> = Arc::new(open().await.unwrap());
        let file_reader: Arc<dyn Discovery> = Arc::new(open().await.unwrap());
        let file = measure(file_writer, file_reader, samples).await;
        stop.cancel();
        let _ = std::fs::remove_dir_all(&root);

        let url = server.url();
        let config = RuntimeConfig::from_vars([("ETCD_ENDPOINTS", url.as_str())]).unwrap();
        let connect = || EtcdDiscovery::connect(config.etcd(), TTL, TaskTracker::new(), CancellationToken::new());
        let etcd_writer: Arc<dyn Discovery> = Arc::new(connect().await.unwrap());
        let etcd_reader: Arc<dyn Discovery> = Arc::new(connect().await.unwrap());
        let etcd = measure(etcd_writer.clone(), etcd_reader, samples).await;
        etcd_writer.shutdown().await.unwrap();
        (file, etcd)
    });
    println!("\nregistration → seen by a watcher in another process, {samples} samples each (ms)");
    println!("| backend | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    report("file (inotify + rescan)", &file);
    report("etcd (data dir on /dev/shm)", &etcd);
}

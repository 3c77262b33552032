//! Event-plane throughput and latency, ZMQ and NATS, between two runtimes in
//! one process: events/s for a burst of 200,000 small events, and
//! publish → receive latency over 10,000 events sent one at a time.
//!
//! ```text
//! cargo bench -p switchyard-runtime --bench event_plane
//! ```
//!
//! NATS runs on a fresh `nats-server` started by the bench (`make test`
//! installs it).

use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::{MemDiscovery, MemRegistry};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::event_plane::{EventPublisher, EventSubscriber};
use switchyard_runtime::runtime::Runtime;
use tokio::time::Instant;

const BURST: u64 = 200_000;
const SAMPLES: usize = 10_000;
/// Without `--bench` (`cargo test --bench '*'`, from `make test`): a moment of
/// each transport, so the bench cannot rot unnoticed.
const QUICK_BURST: u64 = 2_000;
const QUICK_SAMPLES: usize = 100;

fn process(registry: &MemRegistry, vars: &[(&str, &str)]) -> DistributedRuntime {
    let mut all = vec![("DYN_DISCOVERY_BACKEND", "mem")];
    all.extend_from_slice(vars);
    let runtime = Runtime::new(RuntimeConfig::from_vars(all).unwrap());
    DistributedRuntime::with_discovery(runtime, Arc::new(MemDiscovery::new(registry.clone()))).unwrap()
}

async fn pair(vars: &[(&str, &str)]) -> (EventPublisher, EventSubscriber) {
    let registry = MemRegistry::new();
    let (a, b) = (process(&registry, vars), process(&registry, vars));
    let sub = a
        .namespace("bench")
        .unwrap()
        .component("w")
        .unwrap()
        .event_subscriber("load")
        .await
        .unwrap();
    let publisher = b
        .namespace("bench")
        .unwrap()
        .component("w")
        .unwrap()
        .event_publisher("load")
        .await
        .unwrap();
    let mut sub = sub;
    // Wait until the subscription is live.
    loop {
        publisher.publish(&u64::MAX).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(50), sub.next())
            .await
            .is_ok()
        {
            break;
        }
    }
    while tokio::time::timeout(Duration::from_millis(100), sub.next())
        .await
        .is_ok()
    {}
    (publisher, sub)
}

async fn measure(name: &str, vars: &[(&str, &str)], (burst, samples): (u64, usize)) {
    let (publisher, mut sub) = pair(vars).await;
    let started = Instant::now();
    let send = async {
        for i in 0..burst {
            publisher.publish(&i).await.unwrap();
        }
    };
    let receive = async {
        let mut n = 0;
        while n < burst {
            let (_, value) = sub.next_typed::<u64>().await.unwrap().unwrap();
            if value != u64::MAX {
                n += 1;
            }
        }
    };
    tokio::join!(send, receive);
    let rate = burst as f64 / started.elapsed().as_secs_f64();

    let mut times = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let sent = Instant::now();
        publisher.publish(&i).await.unwrap();
        sub.next().await.unwrap();
        times.push(sent.elapsed());
    }
    times.sort();
    let at = |p: usize| times[samples * p / 100].as_secs_f64() * 1e6;
    println!(
        "| {name} | {:.0} | {:.0} | {:.0} | {} |",
        rate,
        at(50),
        at(99),
        sub.gaps()
    );
}

fn main() {
    let (burst, samples) = if std::env::args().any(|arg| arg == "--bench") {
        (BURST, SAMPLES)
    } else {
        (QUICK_BURST, QUICK_SAMPLES)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nats = switchyard_test_support::nats_server::NatsServer::start();
    let url = nats.url();
    println!("\nevent plane, two runtimes in one process ({burst} events burst; {samples} one at a time)");
    println!("| transport | events/s | p50 µs | p99 µs | gaps |");
    println!("|---|---|---|---|---|");
    rt.block_on(async {
        measure("zmq", &[], (burst, samples)).await;
        measure(
            "nats (nats-server 2.9)",
            &[("DYN_EVENT_PLANE", "nats"), ("NATS_SERVER", &url)],
            (burst, samples),
        )
        .await;
    });
}

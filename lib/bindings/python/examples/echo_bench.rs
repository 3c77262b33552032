//! The caller side of `make bench-python`: a Rust client that measures one
//! echo endpoint — the Rust hello_world server or the Python echo worker,
//! which answer a string with its characters, one item each.
//!
//! ```text
//! echo_bench NAMESPACE/COMPONENT/ENDPOINT UNARY_REQUESTS STREAM_ITEMS
//! ```
//!
//! Prints one JSON line: unary round-trip p50/p99 (a one-character
//! request, one item back) and items per second from one streamed answer.
//! Measures; asserts nothing.

use futures::StreamExt;
use std::time::Duration;
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::worker::Worker;
use tokio::time::Instant;

/// Requests before measuring: connections, caches and the worker's code paths warm up.
const WARM_UP: usize = 500;
/// Longest wait for the worker to appear in discovery.
const WAIT_FOR_WORKER: Duration = Duration::from_secs(30);

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, unary, items] = args.as_slice() else {
        return Err("usage: echo_bench NAMESPACE/COMPONENT/ENDPOINT UNARY_REQUESTS STREAM_ITEMS".into());
    };
    let (unary, items): (usize, usize) = (unary.parse()?, items.parse()?);
    let parts: Vec<String> = path.split('/').map(str::to_string).collect();
    let [namespace, component, endpoint] = parts.as_slice() else {
        return Err(format!("{path:?} is not NAMESPACE/COMPONENT/ENDPOINT").into());
    };
    let (namespace, component, endpoint) = (namespace.clone(), component.clone(), endpoint.clone());
    let path = path.clone();
    Worker::from_settings()?.execute(move |runtime: Runtime| async move {
        let drt = DistributedRuntime::from_settings(runtime).await?;
        let client = drt
            .namespace(namespace)?
            .component(component)?
            .endpoint(endpoint)
            .client()
            .await?;
        tokio::time::timeout(WAIT_FOR_WORKER, client.wait_for_instances())
            .await
            .map_err(|_| format!("no instance of {path} within {WAIT_FOR_WORKER:?}"))??;
        let router = PushRouter::<String, String>::from_client(client, RouterMode::RoundRobin).await?;

        let mut latencies = Vec::with_capacity(unary);
        for n in 0..WARM_UP + unary {
            let start = Instant::now();
            let mut stream = router.generate("x".to_string().into()).await?;
            while let Some(item) = stream.next().await {
                item?;
            }
            if n >= WARM_UP {
                latencies.push(start.elapsed());
            }
        }
        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];

        let start = Instant::now();
        let mut stream = router.generate("a".repeat(items).into()).await?;
        let mut received = 0usize;
        while let Some(item) = stream.next().await {
            item?;
            received += 1;
        }
        let elapsed = start.elapsed();
        if received != items {
            return Err(format!("{received} items arrived of {items}").into());
        }
        println!(
            "{{\"p50_us\": {:.1}, \"p99_us\": {:.1}, \"items_per_s\": {:.0}}}",
            at(0.50).as_secs_f64() * 1e6,
            at(0.99).as_secs_f64() * 1e6,
            items as f64 / elapsed.as_secs_f64()
        );
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    Ok(())
}

//! The program `docs/writing-a-worker.md` builds, step by step: a worker
//! that streams words, counts them in a custom metric, answers a health
//! check, and a client that calls it. Every code block of the tutorial is
//! cut from this file (a test checks they still match), so the tutorial
//! always compiles.
//!
//! ```text
//! cargo run --example writing_a_worker            # worker and client in one process
//! DYN_SYSTEM_PORT=9090 cargo run --example writing_a_worker -- serve   # a worker only
//! ```

// --- step 1: the engine ---
use futures::StreamExt;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};

/// Streams the words of the request back, one per item, upper-cased.
struct Shouter {
    /// Words sent, across all requests (a custom metric, step 3).
    words: prometheus::IntCounter,
}

#[async_trait::async_trait]
impl AsyncEngine<String, String> for Shouter {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        let (text, controller) = request.into_parts();
        if text.trim().is_empty() {
            // Refused before any work: the caller gets a typed error.
            return Err(RequestError::new(ErrorKind::Invalid, "say something"));
        }
        let words: Vec<String> = text.split_whitespace().map(str::to_uppercase).collect();
        let counter = self.words.clone();
        let stream = futures::stream::iter(words)
            // Stop early when the caller stops or goes away.
            .take_while(move |_| std::future::ready(!controller.is_stopped()))
            .map(move |word| {
                counter.inc();
                Ok(word)
            });
        Ok(Box::pin(stream))
    }
}
// --- end step 1 ---

// --- step 2: serve it ---
use switchyard_runtime::component::endpoint::ServingEndpoint;
use switchyard_runtime::distributed::DistributedRuntime;

async fn serve(drt: &DistributedRuntime) -> anyhow::Result<ServingEndpoint> {
    let endpoint = drt.namespace("tutorial")?.component("shouter")?.endpoint("generate");
    // Step 3: a counter on the endpoint's metrics carries its labels
    // (namespace, component, endpoint, worker id) without naming them.
    let words = endpoint.metrics().create_counter("words_total", "Words shouted")?;
    let serving = endpoint
        .endpoint_builder()
        .handler(Shouter { words })
        // Step 4: what the canary sends when DYN_HEALTH_CHECK_ENABLED is on.
        .health_check_payload("ping".to_string())
        .spawn()
        .await?;
    Ok(serving)
}
// --- end step 2 ---

// --- step 5: call it ---
use std::time::Duration;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;

async fn call(drt: &DistributedRuntime, text: &str) -> anyhow::Result<Vec<String>> {
    let client = drt
        .namespace("tutorial")?
        .component("shouter")?
        .endpoint("generate")
        .client()
        .await?;
    tokio::time::timeout(Duration::from_secs(10), client.wait_for_instances()).await??;
    let router = PushRouter::<String, String>::from_client(client, RouterMode::LeastLoaded).await?;
    let mut stream = router.generate(text.to_string().into()).await?;
    let mut words = Vec::new();
    while let Some(word) = stream.next().await {
        words.push(word?);
    }
    Ok(words)
}
// --- end step 5 ---

// --- step 6: the process ---
use switchyard_runtime::config::{DiscoveryBackend, RuntimeConfig};
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::worker::Worker;

fn main() -> anyhow::Result<()> {
    let serve_only = std::env::args().nth(1).as_deref() == Some("serve");
    let mut config = RuntimeConfig::from_settings()?;
    if !serve_only {
        // One process needs no infrastructure: in-memory discovery.
        config = config.with_discovery_backend(DiscoveryBackend::Mem);
    }
    Worker::from_config(config)?.execute(move |runtime: Runtime| async move {
        let drt = DistributedRuntime::from_settings(runtime).await?;
        let serving = serve(&drt).await?;
        if serve_only {
            // Until SIGINT/SIGTERM: leave discovery, finish requests, exit.
            serving.wait().await;
        } else {
            let words = call(&drt, "hello from the tutorial").await?;
            println!("{}", words.join(" "));
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}
// --- end step 6 ---

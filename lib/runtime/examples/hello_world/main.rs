//! Hello world: a server whose `generate` endpoint streams the request string
//! back one character at a time, and a client that prints what it receives.
//!
//! ```text
//! cargo run --example hello_world             # server and client in one process (mem discovery)
//! cargo run --example hello_world -- server   # a server process
//! cargo run --example hello_world -- client   # a client process
//! ```
//!
//! Separate server and client processes need a discovery backend that crosses
//! processes: `DYN_DISCOVERY_BACKEND=file` (a shared directory, one machine)
//! or `etcd` (with `ETCD_ENDPOINTS`). The one-process variant needs nothing.

use futures::StreamExt;
use std::time::Duration;
use switchyard_runtime::component::Endpoint;
use switchyard_runtime::config::{DiscoveryBackend, RuntimeConfig};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::RequestError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::worker::Worker;

/// How long the client waits for a server to appear before giving up.
const WAIT_FOR_SERVER: Duration = Duration::from_secs(30);

/// Streams the request back one character at a time.
struct CharStreamer;

#[async_trait::async_trait]
impl AsyncEngine<String, String> for CharStreamer {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        let (text, _controller) = request.into_parts();
        let chars: Vec<_> = text.chars().map(|c| Ok(c.to_string())).collect();
        Ok(Box::pin(futures::stream::iter(chars)))
    }
}

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "local".to_string());
    match mode.as_str() {
        "local" => {
            let config = RuntimeConfig::from_settings()?.with_discovery_backend(DiscoveryBackend::Mem);
            Worker::from_config(config)?.execute(local)?;
        }
        "server" => Worker::from_settings()?.execute(server)?,
        "client" => Worker::from_settings()?.execute(client)?,
        other => anyhow::bail!("unknown mode {other:?}; expected local, server or client"),
    }
    Ok(())
}

fn endpoint(drt: &DistributedRuntime) -> anyhow::Result<Endpoint> {
    Ok(drt.namespace("demo")?.component("backend")?.endpoint("generate"))
}

/// Serves `demo/backend/generate` until SIGINT/SIGTERM.
async fn server(rt: Runtime) -> anyhow::Result<()> {
    let drt = DistributedRuntime::from_settings(rt).await?;
    endpoint(&drt)?.endpoint_builder().handler(CharStreamer).start().await?;
    Ok(())
}

/// Sends "hello world" to a server and prints the streamed characters.
async fn client(rt: Runtime) -> anyhow::Result<()> {
    let drt = DistributedRuntime::from_settings(rt).await?;
    say_hello(&drt).await
}

/// Server and client in one process, talking over the real TCP request plane.
async fn local(rt: Runtime) -> anyhow::Result<()> {
    let drt = DistributedRuntime::from_settings(rt).await?;
    let serving = endpoint(&drt)?.endpoint_builder().handler(CharStreamer).spawn().await?;
    println!("serving {}", serving.instance());
    say_hello(&drt).await
}

async fn say_hello(drt: &DistributedRuntime) -> anyhow::Result<()> {
    let client = endpoint(drt)?.client().await?;
    tokio::time::timeout(WAIT_FOR_SERVER, client.wait_for_instances())
        .await
        .map_err(|_| anyhow::anyhow!("no hello_world server registered within {WAIT_FOR_SERVER:?}"))??;
    let router = PushRouter::<String, String>::from_client(client, RouterMode::RoundRobin).await?;
    let mut stream = router.generate("hello world".to_string().into()).await?;
    let mut received = String::new();
    while let Some(item) = stream.next().await {
        let item = item?;
        println!("{item:?}");
        received.push_str(&item);
    }
    println!("received {received:?}");
    Ok(())
}

//! 10,000 silent connections against a worker's TCP request plane at the
//! default connection cap (`DYN_TCP_MAX_CONNECTIONS`, 4096), then a caller
//! that must still be served. In a test binary of its own: it holds 10,000
//! ephemeral ports and ~14,000 file descriptors while it runs, and tests
//! beside it that pick a free port could lose it to one of these.

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::{MemDiscovery, MemRegistry};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::RequestError;
use switchyard_runtime::request_plane::Transport;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::Runtime;
use tokio::time::Instant;

/// The flood: more than twice the default cap, so the cap is reached and
/// every slot changes hands at least once.
const SILENT: usize = 10_000;
/// Threads opening the flood at once.
const FLOOD_THREADS: usize = 2;
/// Descriptors the test needs: both ends of up to 4096 connections in this
/// process plus the rest of the flood's client ends, and some to spare.
const FILES_NEEDED: u64 = (SILENT + 4096 + 1024) as u64;

fn process(registry: &MemRegistry, vars: &[(&str, &str)]) -> DistributedRuntime {
    let mut all = vec![("DYN_DISCOVERY_BACKEND", "mem")];
    all.extend_from_slice(vars);
    let runtime = Runtime::new(RuntimeConfig::from_vars(all).unwrap());
    DistributedRuntime::with_discovery(runtime, Arc::new(MemDiscovery::new(registry.clone()))).unwrap()
}

/// Streams the request back one character at a time.
struct CharStreamer;

#[async_trait::async_trait]
impl AsyncEngine<String, String> for CharStreamer {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        let chars: Vec<_> = request.data().chars().map(|c| Ok(c.to_string())).collect();
        Ok(Box::pin(futures::stream::iter(chars)))
    }
}

/// Raises this process's soft limit on open files to what the test needs, if
/// the hard limit allows; false when it does not.
fn enough_files() -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return false;
    };
    if soft >= FILES_NEEDED {
        return true;
    }
    hard >= FILES_NEEDED && setrlimit(Resource::RLIMIT_NOFILE, FILES_NEEDED, hard).is_ok()
}

/// A flood of 10,000 connections that open and say nothing, at the default
/// cap, keeps no caller out: callers arriving while it goes on get their
/// answers, and so does one arriving after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_connections_at_the_default_cap_keep_no_caller_out() {
    if !enough_files() {
        println!(
            "SKIPPED: this test needs {FILES_NEEDED} open files and the hard limit (ulimit -Hn) is lower; \
             raise it to run the 10,000-connection flood"
        );
        return;
    }
    let registry = MemRegistry::new();
    // Silent connections are not closed by their handshake deadline during
    // the test: the cap alone must make room.
    let worker = process(&registry, &[("DYN_TCP_CONNECT_TIMEOUT", "300s")]);
    let serving = worker
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("generate")
        .endpoint_builder()
        .handler(CharStreamer)
        .spawn()
        .await
        .unwrap();
    let Transport::Tcp(address) = serving.instance().transport.clone() else {
        panic!("the default request plane is tcp");
    };

    let opening = Instant::now();
    // Two threads open the flood together, so that the worker's accept loop
    // never rests while it lasts.
    let floods: Vec<_> = (0..FLOOD_THREADS)
        .map(|_| {
            let address = address.clone();
            tokio::task::spawn_blocking(move || {
                (0..SILENT / FLOOD_THREADS)
                    .map(|i| {
                        // A pause now and then keeps the listen queue from
                        // overflowing: a dropped SYN makes its sender wait a
                        // second, which tests nothing but patience.
                        if i % 64 == 63 {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        std::net::TcpStream::connect(&address)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();

    // New callers keep coming while the flood lasts...
    let mut answered_during = 0;
    while !floods.iter().all(|flood| flood.is_finished()) {
        let text = format!("caller {answered_during} during the flood");
        assert_eq!(call(&registry, &text).await, text);
        answered_during += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut silent = vec![];
    for flood in floods {
        silent.extend(flood.await.unwrap().expect("the flood's connections open"));
    }
    println!(
        "opened {} silent connections in {:?}; {answered_during} callers were answered meanwhile",
        silent.len(),
        opening.elapsed()
    );
    assert!(answered_during >= 5, "the flood was too short to test anything");
    // ...and one comes after it, with every slot held by a silent connection.
    assert_eq!(call(&registry, "after the flood").await, "after the flood");
    drop(silent);
}

/// A new caller process sends `text` and collects the answer.
async fn call(registry: &MemRegistry, text: &str) -> String {
    // The flood and the debug build share two cores with the test: a caller
    // may be slow to connect. What this test looks for is a caller refused
    // (reset), not a slow one.
    let caller = process(registry, &[("DYN_TCP_CONNECT_TIMEOUT", "30s")]);
    let client = caller
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("generate")
        .client()
        .await
        .unwrap();
    let router = PushRouter::<String, String>::from_client(client, RouterMode::RoundRobin)
        .await
        .unwrap();
    let started = Instant::now();
    let mut stream = router
        .generate(text.to_string().into())
        .await
        .unwrap_or_else(|error| panic!("{text} is refused: {error}"));
    let mut answer = String::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an answer within 10 s")
    {
        answer.push_str(&item.unwrap_or_else(|error| panic!("{text} fails: {error}")));
    }
    let took = started.elapsed();
    if took > Duration::from_millis(500) {
        println!("{text} was answered in {took:?}");
    }
    answer
}

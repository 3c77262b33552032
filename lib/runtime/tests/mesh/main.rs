//! The runtime API end to end, as a worker author uses it: several
//! "processes" (one `DistributedRuntime` each, sharing one in-memory
//! registry) serving and calling endpoints over the real TCP request plane.

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::component::client::{Client, ClientError};
use switchyard_runtime::component::endpoint::ServingEndpoint;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::{MemDiscovery, MemRegistry};
use switchyard_runtime::discovery::{Bucket, Query};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};
use switchyard_runtime::instance::Instance;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::runtime::{Runtime, ShutdownOutcome};
use tokio::time::Instant;

mod events;
mod status;
use switchyard_test_support::nats_server::NatsServer;
use switchyard_test_support::worker_process::WorkerProcess;

/// Generous bound on anything a test waits for; hitting it means a hang.
const DEADLINE: Duration = Duration::from_secs(10);

/// One simulated process on `registry`, with extra settings.
fn process(registry: &MemRegistry, vars: &[(&str, &str)]) -> DistributedRuntime {
    let mut all = vec![("DYN_DISCOVERY_BACKEND", "mem")];
    all.extend_from_slice(vars);
    let runtime = Runtime::new(RuntimeConfig::from_vars(all).unwrap());
    DistributedRuntime::with_discovery(runtime, Arc::new(MemDiscovery::new(registry.clone()))).unwrap()
}

/// Streams the request back one character at a time (Dynamo's hello world).
struct CharStreamer;

#[async_trait::async_trait]
impl AsyncEngine<String, String> for CharStreamer {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        let chars: Vec<_> = request.data().chars().map(|c| Ok(c.to_string())).collect();
        Ok(Box::pin(futures::stream::iter(chars)))
    }
}

/// Answers with the instance id of the process serving it.
struct WhoAmI(u64);

#[async_trait::async_trait]
impl AsyncEngine<(), u64> for WhoAmI {
    async fn generate(&self, _request: Context<()>) -> Result<ResponseStream<u64>, RequestError> {
        Ok(Box::pin(futures::stream::iter([Ok(self.0)])))
    }
}

/// Streams `0..n` with a pause between items; `u64::MAX` means forever.
struct Ticker(Duration);

#[async_trait::async_trait]
impl AsyncEngine<u64, u64> for Ticker {
    async fn generate(&self, request: Context<u64>) -> Result<ResponseStream<u64>, RequestError> {
        let (n, _) = request.into_parts();
        let pause = self.0;
        Ok(Box::pin(futures::stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(pause).await;
            Some((Ok(i), i + 1))
        })))
    }
}

async fn serve<E, Req, Resp>(drt: &DistributedRuntime, endpoint: &str, engine: E) -> ServingEndpoint
where
    E: AsyncEngine<Req, Resp>,
    Req: serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + Send + 'static,
{
    drt.namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint(endpoint)
        .endpoint_builder()
        .handler(engine)
        .spawn()
        .await
        .unwrap()
}

async fn client(drt: &DistributedRuntime, endpoint: &str) -> Client {
    drt.namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint(endpoint)
        .client()
        .await
        .unwrap()
}

async fn collect<T>(mut stream: ResponseStream<T>) -> (Vec<T>, Option<RequestError>) {
    let mut items = vec![];
    loop {
        match tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("item within the deadline")
        {
            None => return (items, None),
            Some(Ok(item)) => items.push(item),
            Some(Err(error)) => return (items, Some(error)),
        }
    }
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn who_answers(router: &PushRouter<(), u64>, requests: usize) -> Vec<u64> {
    let mut answers = vec![];
    for _ in 0..requests {
        let (items, error) = collect(router.generate(().into()).await.unwrap()).await;
        assert!(error.is_none(), "{error:?}");
        answers.extend(items);
    }
    answers
}

#[tokio::test]
async fn hello_world_streams_the_request_back_one_character_at_a_time() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[]);
    let caller = process(&registry, &[]);
    serve(&worker, "generate", CharStreamer).await;

    let client = client(&caller, "generate").await;
    let instances = tokio::time::timeout(DEADLINE, client.wait_for_instances())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_id, worker.instance_id());
    let router = PushRouter::<String, String>::from_client(client, RouterMode::RoundRobin)
        .await
        .unwrap();
    let (items, error) = collect(router.generate("hello world".to_string().into()).await.unwrap()).await;
    assert!(error.is_none());
    assert_eq!(items, ["h", "e", "l", "l", "o", " ", "w", "o", "r", "l", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_the_http_plane_answers_a_caller_of_any_plane() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[("DYN_REQUEST_PLANE", "http")]);
    let serving = serve(&worker, "generate", CharStreamer).await;
    assert!(matches!(
        serving.instance().transport,
        switchyard_runtime::request_plane::Transport::Http(_)
    ));
    let caller = process(&registry, &[]);
    let client = client(&caller, "generate").await;
    let router = PushRouter::<String, String>::from_client(client, RouterMode::RoundRobin)
        .await
        .unwrap();
    let (items, error) = collect(router.generate("hi h2".to_string().into()).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(items.concat(), "hi h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_the_nats_plane_answers_a_caller_of_any_plane() {
    let server = NatsServer::start();
    let url = server.url();
    let registry = MemRegistry::new();
    let worker = process(&registry, &[("DYN_REQUEST_PLANE", "nats"), ("NATS_SERVER", &url)]);
    let serving = serve(&worker, "generate", CharStreamer).await;
    assert!(matches!(
        serving.instance().transport,
        switchyard_runtime::request_plane::Transport::Nats(_)
    ));
    let caller = process(&registry, &[("NATS_SERVER", &url)]);
    let client = client(&caller, "generate").await;
    let router = PushRouter::<String, String>::from_client(client, RouterMode::RoundRobin)
        .await
        .unwrap();
    let (items, error) = collect(router.generate("via nats".to_string().into()).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(items.concat(), "via nats");
}

/// Answers with its instance id, then holds the stream open until dropped.
struct Hold(u64);

#[async_trait::async_trait]
impl AsyncEngine<(), u64> for Hold {
    async fn generate(&self, _request: Context<()>) -> Result<ResponseStream<u64>, RequestError> {
        let id = futures::stream::iter([Ok(self.0)]);
        let forever = futures::stream::pending();
        Ok(Box::pin(id.chain(forever)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_avoids_instances_with_streams_in_flight_and_refuses_when_all_are_busy() {
    let registry = MemRegistry::new();
    let workers: Vec<_> = (0..2).map(|_| process(&registry, &[])).collect();
    for worker in &workers {
        serve(worker, "hold", Hold(worker.instance_id())).await;
    }
    let caller = process(&registry, &[]);
    let router = PushRouter::<(), u64>::from_client(client(&caller, "hold").await, RouterMode::LeastLoaded)
        .await
        .unwrap()
        .with_busy_threshold(1);
    let step = |what: &'static str| move |_| panic!("{what} did not finish within {DEADLINE:?}");
    let mut first = tokio::time::timeout(DEADLINE, router.generate(().into()))
        .await
        .unwrap_or_else(step("first"))
        .unwrap();
    let a = first.next().await.unwrap().unwrap();
    let mut second = tokio::time::timeout(DEADLINE, router.generate(().into()))
        .await
        .unwrap_or_else(step("second"))
        .unwrap();
    let b = second.next().await.unwrap().unwrap();
    assert_ne!(a, b, "least_loaded sent a second request to the instance already busy");
    assert_eq!(router.occupancy().load(a), 1);

    let refused = tokio::time::timeout(DEADLINE, router.generate(().into()))
        .await
        .unwrap_or_else(step("refusal"))
        .err()
        .expect("every instance is busy");
    assert_eq!(refused.kind(), ErrorKind::Overloaded);

    // The in-flight count lasts until the stream is dropped, not the first item.
    drop(first);
    assert_eq!(router.occupancy().load(a), 0);
    let mut third = tokio::time::timeout(DEADLINE, router.generate(().into()))
        .await
        .unwrap_or_else(step("third"))
        .unwrap();
    assert_eq!(third.next().await.unwrap().unwrap(), a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wait_queue_a_request_waits_for_a_busy_instance_to_free_up_within_bounds() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[]);
    serve(&worker, "hold", Hold(worker.instance_id())).await;
    let caller = process(&registry, &[]);
    let router = Arc::new(
        PushRouter::<(), u64>::from_client(client(&caller, "hold").await, RouterMode::LeastLoaded)
            .await
            .unwrap()
            .with_busy_threshold(1)
            .with_wait_queue(Duration::from_secs(5), 1),
    );
    let mut busy = router.generate(().into()).await.unwrap();
    busy.next().await.unwrap().unwrap();

    // The first waiter queues; a second finds the queue full and is refused at once.
    let waiter = tokio::spawn({
        let router = router.clone();
        async move { router.generate(().into()).await.map(|_| ()) }
    });
    let queued = Instant::now();
    while router.waiting() == 0 {
        assert!(queued.elapsed() < DEADLINE, "the request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = router.generate(().into()).await.err().expect("the queue is full");
    assert_eq!(refused.kind(), ErrorKind::Overloaded);
    assert!(refused.message().contains("already wait"), "{}", refused.message());

    // Ending the busy stream lets the waiter through.
    drop(busy);
    tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("the waiter was woken")
        .unwrap()
        .expect("the waiter got the freed instance");
    assert_eq!(router.waiting(), 0);

    // A wait that outlasts max_wait ends as Overloaded.
    let short = PushRouter::<(), u64>::from_client(client(&caller, "hold").await, RouterMode::LeastLoaded)
        .await
        .unwrap()
        .with_busy_threshold(1)
        .with_wait_queue(Duration::from_millis(200), 4);
    let _held = short.generate(().into()).await.unwrap();
    let started = Instant::now();
    let timed_out = short.generate(().into()).await.err().expect("still busy");
    assert_eq!(timed_out.kind(), ErrorKind::Overloaded);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(timed_out.message().contains("stayed busy"), "{}", timed_out.message());
}

async fn get_metrics(drt: &DistributedRuntime) -> (axum::http::StatusCode, String) {
    use tower::ServiceExt;
    let app = switchyard_runtime::status::router(drt.status_state(), drt.runtime().config().system());
    let request = axum::http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn metric_line_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// Two routers sharing two workers: with worker load reports, the second
/// router sees the first one's stream and picks the other worker; without
/// them it would pick the same "least loaded" worker (both look idle to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_that_share_workers_see_each_others_load_through_worker_reports() {
    let registry = MemRegistry::new();
    let mut ids = vec![];
    let mut workers = vec![];
    for _ in 0..2 {
        let worker = process(&registry, &[]);
        worker
            .namespace("demo")
            .unwrap()
            .component("backend")
            .unwrap()
            .endpoint("hold")
            .endpoint_builder()
            .handler(Hold(worker.instance_id()))
            .publish_load()
            .spawn()
            .await
            .unwrap();
        ids.push(worker.instance_id());
        workers.push(worker);
    }
    ids.sort();
    let (first_router, second_router) = (process(&registry, &[]), process(&registry, &[]));
    let a = PushRouter::<(), u64>::from_client(client(&first_router, "hold").await, RouterMode::LeastLoaded)
        .await
        .unwrap();
    let blind = PushRouter::<(), u64>::from_client(client(&second_router, "hold").await, RouterMode::LeastLoaded)
        .await
        .unwrap();
    let informed = PushRouter::<(), u64>::from_client(client(&second_router, "hold").await, RouterMode::LeastLoaded)
        .await
        .unwrap()
        .with_load_reports()
        .await
        .unwrap();

    // Router A opens a long stream on the lower id (ties go to the lowest id).
    let mut held = a.generate(().into()).await.unwrap();
    assert_eq!(held.next().await.unwrap().unwrap(), ids[0]);
    let occupancy = informed.occupancy().clone();
    let busy = ids[0];
    wait_until("the busy worker's report reached the second router", || {
        occupancy.load(busy) == 1
    })
    .await;

    let mut from_informed = informed.generate(().into()).await.unwrap();
    assert_eq!(
        from_informed.next().await.unwrap().unwrap(),
        ids[1],
        "herded onto the busy worker"
    );
    let mut from_blind = blind.generate(().into()).await.unwrap();
    assert_eq!(
        from_blind.next().await.unwrap().unwrap(),
        ids[0],
        "without reports the busy worker looks idle"
    );
}

#[test]
fn a_killed_worker_is_ejected_and_no_request_is_lost() {
    let registry = MemRegistry::new();
    // The doomed worker runs on its own runtime; dropping that runtime kills
    // its sockets without unregistering, as a crashed process would.
    let doomed_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let doomed = doomed_runtime.block_on(async {
        let worker = process(&registry, &[]);
        serve(&worker, "whoami", WhoAmI(worker.instance_id())).await;
        worker
    });
    let caller_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    caller_runtime.block_on(async {
        let mut healthy = vec![];
        for _ in 0..2 {
            let worker = process(&registry, &[]);
            serve(&worker, "whoami", WhoAmI(worker.instance_id())).await;
            healthy.push(worker);
        }
        let caller = process(&registry, &[]);
        let router = PushRouter::<(), u64>::from_client(client(&caller, "whoami").await, RouterMode::RoundRobin)
            .await
            .unwrap();
        let answers = who_answers(&router, 30).await;
        assert!(answers.contains(&doomed.instance_id()));

        doomed_runtime.shutdown_background();
        let killed_at = tokio::time::Instant::now();
        // Every request still succeeds: the one that hits the dead worker is
        // retried on another instance, and the dead worker is ejected.
        let answers = who_answers(&router, 300).await;
        assert!(!answers.contains(&doomed.instance_id()));
        println!("300 requests after the kill, none lost, in {:?}", killed_at.elapsed());
        let (_, metrics) = get_metrics(&caller).await;
        assert!(
            metric_line_value(&metrics, "dynamo_router_retries_total") >= 1.0,
            "{metrics}"
        );
        assert!(
            metric_line_value(&metrics, "dynamo_router_ejections_total") >= 1.0,
            "{metrics}"
        );
    });
}

#[tokio::test]
async fn round_robin_spreads_requests_and_follows_instances_as_they_come_and_go() {
    let registry = MemRegistry::new();
    let workers: Vec<_> = (0..3).map(|_| process(&registry, &[])).collect();
    let mut serving = vec![];
    for worker in &workers {
        serving.push(serve(worker, "whoami", WhoAmI(worker.instance_id())).await);
    }
    let caller = process(&registry, &[]);
    let client = client(&caller, "whoami").await;
    assert_eq!(client.instances().len(), 3);
    let router = PushRouter::<(), u64>::from_client(client.clone(), RouterMode::RoundRobin)
        .await
        .unwrap();

    let answers = who_answers(&router, 30).await;
    for worker in &workers {
        let count = answers.iter().filter(|id| **id == worker.instance_id()).count();
        assert_eq!(count, 10, "round robin gave {count} of 30 to one of three workers");
    }

    // One worker leaves: the client forgets it and nothing is sent to it.
    let leaving = serving.remove(0);
    leaving.stop();
    leaving.wait().await;
    wait_until("the client forgot the stopped worker", || client.instances().len() == 2).await;
    let answers = who_answers(&router, 20).await;
    assert!(!answers.contains(&workers[0].instance_id()));

    // A new worker joins and gets its share.
    let newcomer = process(&registry, &[]);
    serve(&newcomer, "whoami", WhoAmI(newcomer.instance_id())).await;
    wait_until("the client saw the new worker", || client.instances().len() == 3).await;
    let answers = who_answers(&router, 30).await;
    assert_eq!(answers.iter().filter(|id| **id == newcomer.instance_id()).count(), 10);
}

/// A worker restarted on the same address comes back as a new instance,
/// while its old instance is still in discovery (until its lease expires):
/// requests for the old one reach the new process, which answers that the
/// instance is not served there. The router tries another instance instead
/// of failing the request.
#[tokio::test]
async fn a_request_for_an_instance_no_longer_at_its_address_goes_elsewhere() {
    let registry = MemRegistry::new();
    let workers: Vec<_> = (0..2).map(|_| process(&registry, &[])).collect();
    for worker in &workers {
        serve(worker, "whoami", WhoAmI(worker.instance_id())).await;
    }
    // The departed instance: registered by a process that serves nothing,
    // at worker 0's address.
    let departed = process(&registry, &[]);
    let instances = workers[0]
        .discovery()
        .list(&Query::bucket(Bucket::Instances))
        .await
        .unwrap();
    let registration = instances
        .iter()
        .find(|r| r.key.instance_id == workers[0].instance_id())
        .expect("worker 0 is registered");
    let mut stale = Instance::from_registration(registration).unwrap();
    stale.instance_id = departed.instance_id();
    departed.discovery().register(stale.to_registration()).await.unwrap();

    let caller = process(&registry, &[]);
    let client = client(&caller, "whoami").await;
    wait_until("the caller sees three instances", || client.instances().len() == 3).await;
    let router = PushRouter::<(), u64>::from_client(client, RouterMode::RoundRobin)
        .await
        .unwrap();
    let answers = who_answers(&router, 12).await;
    assert_eq!(answers.len(), 12, "every request was answered");
    assert!(!answers.contains(&departed.instance_id()));
}

/// Refuses every request: it is at capacity.
struct Full;

#[async_trait::async_trait]
impl AsyncEngine<(), u64> for Full {
    async fn generate(&self, _request: Context<()>) -> Result<ResponseStream<u64>, RequestError> {
        Err(RequestError::new(ErrorKind::Overloaded, "no room for another request"))
    }
}

/// A worker that refuses requests because it is full is skipped: the
/// request goes to another instance, and the full one is left alone for a
/// backoff rather than asked again at once.
#[tokio::test]
async fn a_worker_refusing_for_capacity_is_ejected_and_its_requests_go_elsewhere() {
    let registry = MemRegistry::new();
    let (full, open) = (process(&registry, &[]), process(&registry, &[]));
    serve(&full, "whoami", Full).await;
    serve(&open, "whoami", WhoAmI(open.instance_id())).await;
    let caller = process(&registry, &[]);
    let client = client(&caller, "whoami").await;
    wait_until("the caller sees both", || client.instances().len() == 2).await;
    let router = PushRouter::<(), u64>::from_client(client, RouterMode::RoundRobin)
        .await
        .unwrap();
    let answers = who_answers(&router, 10).await;
    assert_eq!(
        answers,
        vec![open.instance_id(); 10],
        "every request answered by the open worker"
    );
    let (_, metrics) = get_metrics(&caller).await;
    assert_eq!(
        metric_line_value(&metrics, "dynamo_router_retries_total"),
        1.0,
        "one retry: after it, the full worker was ejected and not asked again"
    );
}

/// `n` worker processes serving `WhoAmI` on "whoami", and a router over them
/// from another process. The workers' runtimes are returned to keep them up.
async fn whoami_workers(n: usize, mode: RouterMode) -> (Vec<DistributedRuntime>, PushRouter<(), u64>) {
    let registry = MemRegistry::new();
    let workers: Vec<_> = (0..n).map(|_| process(&registry, &[])).collect();
    for worker in &workers {
        serve(worker, "whoami", WhoAmI(worker.instance_id())).await;
    }
    let caller = process(&registry, &[]);
    let router = PushRouter::from_client(client(&caller, "whoami").await, mode)
        .await
        .unwrap();
    (workers, router)
}

#[tokio::test]
async fn the_explicit_round_robin_call_takes_turns_whatever_the_router_mode() {
    let (workers, router) = whoami_workers(3, RouterMode::Random).await;
    let mut answers = vec![];
    for _ in 0..6 {
        let (items, error) = collect(router.round_robin(().into()).await.unwrap()).await;
        assert!(error.is_none(), "{error:?}");
        answers.extend(items);
    }
    for worker in &workers {
        let count = answers.iter().filter(|id| **id == worker.instance_id()).count();
        assert_eq!(
            count, 2,
            "round_robin() gave {count} of 6 to one of three workers: {answers:x?}"
        );
    }
}

#[tokio::test]
async fn an_endpoint_whose_load_reports_cannot_start_is_not_left_in_discovery() {
    // The event plane is NATS, and it refuses this process's (missing)
    // token: a settings error, which fails, unlike a server that is down.
    let nats = switchyard_test_support::nats_server::NatsServer::start_with_token("s3cret");
    let url = nats.url();
    let registry = MemRegistry::new();
    let worker = process(&registry, &[("DYN_EVENT_PLANE", "nats"), ("NATS_SERVER", &url)]);
    let endpoint = worker
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("whoami");
    let error = endpoint
        .endpoint_builder()
        .handler(WhoAmI(worker.instance_id()))
        .publish_load()
        .spawn()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("load reports"), "{error}");

    let caller = process(&registry, &[]);
    let registered = caller
        .discovery()
        .list(&Query::bucket(Bucket::Instances).namespace("demo"))
        .await
        .unwrap();
    assert!(registered.is_empty(), "still registered: {registered:?}");
    // The path is free again: serving it without load reports works.
    endpoint
        .endpoint_builder()
        .handler(WhoAmI(worker.instance_id()))
        .spawn()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_request_kept_away_from_instances_goes_elsewhere_unless_none_is_left() {
    let (workers, router) = whoami_workers(3, RouterMode::RoundRobin).await;
    let broken = workers[0].instance_id();
    for _ in 0..12 {
        let routed = router
            .generate_routed_avoiding(None, ().into(), &[broken])
            .await
            .unwrap();
        let (items, error) = collect(routed.stream).await;
        assert!(error.is_none(), "{error:?}");
        assert_ne!(items, vec![broken], "sent to the instance it was to avoid");
    }
    // Every instance on the list: one of them answers rather than none.
    let everyone: Vec<u64> = workers.iter().map(|w| w.instance_id()).collect();
    let routed = router
        .generate_routed_avoiding(None, ().into(), &everyone)
        .await
        .unwrap();
    let (items, error) = collect(routed.stream).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(items.len(), 1);
    assert!(everyone.contains(&items[0]));
}

#[tokio::test]
async fn random_mode_reaches_every_instance() {
    let (workers, router) = whoami_workers(3, RouterMode::Random).await;
    let answers = who_answers(&router, 200).await;
    for worker in &workers {
        assert!(
            answers.contains(&worker.instance_id()),
            "random never picked a worker in 200 tries"
        );
    }
}

#[tokio::test]
async fn direct_sends_to_the_named_instance_only() {
    let (workers, router) = whoami_workers(3, RouterMode::Direct).await;
    let target = workers[1].instance_id();
    for _ in 0..5 {
        let (items, _) = collect(router.direct(().into(), target).await.unwrap()).await;
        assert_eq!(items, vec![target]);
    }
    let unknown = router.direct(().into(), 0xbad).await.err().unwrap();
    assert_eq!(unknown.kind(), ErrorKind::NotFound);
    let wrong_mode = router.generate(().into()).await.err().unwrap();
    assert_eq!(wrong_mode.kind(), ErrorKind::Invalid);
    assert!(wrong_mode.message().contains("direct"), "{wrong_mode}");
}

#[tokio::test]
async fn calling_an_endpoint_nobody_serves_is_not_found() {
    let registry = MemRegistry::new();
    let caller = process(&registry, &[]);
    let router = PushRouter::<String, String>::from_client(client(&caller, "generate").await, RouterMode::RoundRobin)
        .await
        .unwrap();
    let error = router.generate("hi".to_string().into()).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert!(error.message().contains("demo/backend/generate"), "{error}");
}

#[tokio::test]
async fn a_request_of_the_wrong_type_is_invalid() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[]);
    serve(&worker, "ticker", Ticker(Duration::ZERO)).await;
    let caller = process(&registry, &[]);
    let router = PushRouter::<String, u64>::from_client(client(&caller, "ticker").await, RouterMode::RoundRobin)
        .await
        .unwrap();
    let (_, error) = collect(router.generate("not a number".to_string().into()).await.unwrap()).await;
    let error = error.unwrap();
    assert_eq!(error.kind(), ErrorKind::Invalid);
    assert!(error.message().contains("u64"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_leaves_discovery_first_then_finishes_in_flight_streams() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", "10s")]);
    serve(&worker, "ticker", Ticker(Duration::from_millis(20))).await;
    let caller = process(&registry, &[]);
    let client = client(&caller, "ticker").await;
    let router = PushRouter::<u64, u64>::from_client(client.clone(), RouterMode::RoundRobin)
        .await
        .unwrap();

    let mut stream = router.generate(30.into()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), 0);
    let shutdown = tokio::spawn({
        let runtime = worker.runtime().clone();
        async move { runtime.shutdown().await }
    });
    wait_until("the draining worker left discovery", || client.instances().is_empty()).await;

    let (rest, error) = collect(stream).await;
    assert!(error.is_none(), "an in-flight stream was cut during drain: {error:?}");
    assert_eq!(rest, (1..30).collect::<Vec<u64>>());
    assert_eq!(shutdown.await.unwrap(), ShutdownOutcome::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_still_running_at_the_drain_deadline_end_with_shutting_down() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", "300ms")]);
    serve(&worker, "ticker", Ticker(Duration::from_millis(10))).await;
    let caller = process(&registry, &[]);
    let router = PushRouter::<u64, u64>::from_client(client(&caller, "ticker").await, RouterMode::RoundRobin)
        .await
        .unwrap();

    let mut stream = router.generate(u64::MAX.into()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), 0);
    let outcome = tokio::time::timeout(DEADLINE, worker.runtime().shutdown())
        .await
        .unwrap();
    assert_eq!(outcome, ShutdownOutcome::DeadlinePassed);
    let (_, error) = collect(stream).await;
    let kind = error
        .expect("the stream must end with an error, not hang or end cleanly")
        .kind();
    assert!(
        matches!(kind, ErrorKind::ShuttingDown | ErrorKind::Disconnected),
        "{kind:?}"
    );
}

#[tokio::test]
async fn a_stopped_runtime_makes_waiting_for_instances_fail_instead_of_hanging() {
    let registry = MemRegistry::new();
    let caller = process(&registry, &[]);
    let client = client(&caller, "generate").await;
    let waiting = tokio::spawn(async move { client.wait_for_instances().await });
    caller.runtime().stop().await;
    let result = tokio::time::timeout(DEADLINE, waiting).await.unwrap().unwrap();
    assert!(matches!(result, Err(ClientError::ShuttingDown)));
}

#[tokio::test]
async fn bad_names_are_rejected_with_the_rule() {
    let registry = MemRegistry::new();
    let drt = process(&registry, &[]);
    let error = drt.namespace("My Namespace").unwrap_err();
    assert!(error.to_string().contains("\"My Namespace\""), "{error}");
    let endpoint = drt
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("gen/v2");
    let error = endpoint.client().await.unwrap_err();
    assert!(error.to_string().contains("lowercase letters, digits"), "{error}");
    let error = endpoint
        .endpoint_builder()
        .handler(CharStreamer)
        .start()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("gen/v2"), "{error}");
}

#[tokio::test]
async fn an_endpoint_without_a_handler_says_how_to_fix_it() {
    let registry = MemRegistry::new();
    let drt = process(&registry, &[]);
    let builder = drt
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("x")
        .endpoint_builder();
    let error = builder.start().await.unwrap_err();
    assert!(error.to_string().contains(".handler("), "{error}");
}

/// SIGTERM to a real worker process: it drains and exits 0.
#[test]
fn sigterm_drains_a_worker_process_and_exits_cleanly() {
    let worker = WorkerProcess::start_hello_server(&[("DYN_DISCOVERY_BACKEND", "mem"), ("DYN_LOG", "info")], DEADLINE);
    worker.signal("-TERM");
    let (status, log) = worker.wait(DEADLINE);
    assert!(status.success(), "worker exited with {status}: {log}");
    assert!(log.contains("SIGTERM") && log.contains("endpoint drained"), "{log}");
}

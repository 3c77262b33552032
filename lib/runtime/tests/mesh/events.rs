//! The event plane across runtimes: ZMQ (publishers found through
//! discovery) and NATS (a real server), typed events with their envelopes,
//! publishers appearing after subscribers and going away, gap counting over
//! a million events, and a NATS restart in the middle of a stream.

use super::{DEADLINE, process, wait_until};
use std::time::Duration;
use switchyard_runtime::config::EventPlaneKind;
use switchyard_runtime::discovery::mem::MemRegistry;
use switchyard_runtime::discovery::{Bucket, Key, Query, Registration};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::error::Report;
use switchyard_runtime::event_plane::{EventChannel, EventPublisher, EventSubscriber, EventTransport};
use switchyard_test_support::nats_server::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A load report, as workers will publish them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Load {
    active: u32,
    queued: u32,
}

async fn publisher(drt: &DistributedRuntime) -> EventPublisher {
    let component = drt.namespace("demo").unwrap().component("backend").unwrap();
    component.event_publisher("load").await.unwrap()
}

/// A subscriber process and a publisher process on `registry`, connected
/// and exchanging events: (subscriber's runtime, subscriber, publisher's
/// runtime, publisher).
async fn connected_pair(
    registry: &MemRegistry,
) -> (DistributedRuntime, EventSubscriber, DistributedRuntime, EventPublisher) {
    let listener = process(registry, &[]);
    let mut events = subscriber(&listener).await;
    let worker = process(registry, &[]);
    let load = publisher(&worker).await;
    wait_until("connected", || events.connected_publishers() == Some(1)).await;
    until_connected(&load, &mut events).await;
    (listener, events, worker, load)
}

async fn subscriber(drt: &DistributedRuntime) -> EventSubscriber {
    let component = drt.namespace("demo").unwrap().component("backend").unwrap();
    component.event_subscriber("load").await.unwrap()
}

/// Publishes `marker` until the subscriber sees one (subscriptions take a
/// moment to reach a publisher; what was sent before is simply not received).
async fn until_connected(publisher: &EventPublisher, subscriber: &mut EventSubscriber) {
    let marker = Load {
        active: u32::MAX,
        queued: 0,
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        publisher.publish(&marker).await.unwrap();
        if let Ok(Some(received)) =
            tokio::time::timeout(Duration::from_millis(50), subscriber.next_typed::<Load>()).await
        {
            assert_eq!(received.unwrap().1, marker);
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscriber never received anything"
        );
    }
}

/// Sends `n` reports and checks they arrive in order, with no gap.
async fn exchange(publisher: &EventPublisher, subscriber: &mut EventSubscriber, n: u32) {
    let send = async {
        for i in 0..n {
            publisher
                .publish(&Load {
                    active: i,
                    queued: n - i,
                })
                .await
                .unwrap();
        }
    };
    let receive = async {
        let mut next = 0;
        while next < n {
            let (envelope, load) = tokio::time::timeout(DEADLINE, subscriber.next_typed::<Load>())
                .await
                .expect("event within the deadline")
                .expect("subscriber open")
                .expect("decodes");
            if load.active == u32::MAX {
                continue; // a late connection marker
            }
            assert_eq!(load.active, next, "events out of order or missing");
            assert_eq!(envelope.publisher_id, publisher.publisher_id());
            assert_eq!(envelope.topic, "load");
            next += 1;
        }
    };
    tokio::join!(send, receive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_events_reach_subscribers_that_follow_publishers_through_discovery() {
    let registry = MemRegistry::new();
    let listener = process(&registry, &[]);
    assert_eq!(listener.event_plane_kind(), EventPlaneKind::Zmq);
    // The subscriber exists before any publisher.
    let mut events = subscriber(&listener).await;
    assert_eq!(events.connected_publishers(), Some(0));

    let worker = process(&registry, &[]);
    let load = publisher(&worker).await;
    wait_until("the subscriber connected to the new publisher", || {
        events.connected_publishers() == Some(1)
    })
    .await;
    until_connected(&load, &mut events).await;
    exchange(&load, &mut events, 1_000).await;
    assert_eq!(events.gaps(), 0);

    // The publisher's process stops: its registration goes, and so does the connection.
    worker.runtime().stop().await;
    wait_until("the stopped publisher was dropped", || {
        events.connected_publishers() == Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_on_the_way_are_counted_as_gaps() {
    let registry = MemRegistry::new();
    let (listener, mut events, _worker, load) = connected_pair(&registry).await;
    exchange(&load, &mut events, 10).await;
    assert_eq!(events.gaps(), 0);
    // Three events lost between two that arrive, then seven more lost.
    load.withhold(3);
    exchange(&load, &mut events, 10).await;
    load.withhold(7);
    exchange(&load, &mut events, 1).await;
    assert_eq!(events.gaps(), 10);
    // The same count as `dynamo_event_plane_gaps_total` on /metrics.
    assert_eq!(listener.plane_counts().event_gaps, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_zmq_events_arrive_without_gaps() {
    let registry = MemRegistry::new();
    let (_listener, mut events, _worker, load) = connected_pair(&registry).await;
    let started = tokio::time::Instant::now();
    exchange(&load, &mut events, 1_000_000).await;
    println!(
        "zmq: 1,000,000 events in {:?}, {} gaps",
        started.elapsed(),
        events.gaps()
    );
    assert_eq!(events.gaps(), 0);
}

/// A ZMTP 3.1 greeting for the NULL mechanism (64 bytes), then a READY
/// command announcing `socket_type`: what any libzmq peer sends first.
fn zmtp_hello(socket_type: &str, as_server: bool) -> Vec<u8> {
    let mut out = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 1];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    out.extend(mechanism);
    out.push(u8::from(as_server));
    out.extend([0; 31]);
    assert_eq!(out.len(), 64);
    let mut body = vec![5];
    body.extend(b"READY");
    body.push(11);
    body.extend(b"Socket-Type");
    body.extend((socket_type.len() as u32).to_be_bytes());
    body.extend(socket_type.as_bytes());
    out.extend([0x04, body.len() as u8]);
    out.extend(body);
    out
}

/// The attack: the header of a long frame declaring 2^60 bytes, which a
/// reader that trusts declared lengths tries to allocate.
fn huge_frame_header() -> Vec<u8> {
    let mut out = vec![0x02];
    out.extend((1u64 << 60).to_be_bytes());
    out
}

/// The `tcp://host:port` a process's publisher of `demo/backend/load` registered.
async fn registered_endpoint(drt: &DistributedRuntime) -> String {
    let query = Query::bucket(Bucket::EventChannels).namespace("demo");
    let registrations = drt.discovery().list(&query).await.unwrap();
    let channel: EventChannel = serde_json::from_slice(&registrations[0].value).unwrap();
    let EventTransport::Zmq(endpoint) = channel.transport;
    endpoint
}

async fn event_disconnects(drt: &DistributedRuntime) -> f64 {
    let (_, text) = super::get_metrics(drt).await;
    super::metric_line_value(&text, "dynamo_event_plane_disconnects_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_declaring_a_huge_frame_to_a_zmq_publisher_is_cut_off_and_events_keep_flowing() {
    let registry = MemRegistry::new();
    let (_listener, mut events, worker, load) = connected_pair(&registry).await;

    let endpoint = registered_endpoint(&worker).await;
    let address = endpoint.trim_start_matches("tcp://").replace("0.0.0.0", "127.0.0.1");
    let mut attacker = tokio::net::TcpStream::connect(&address).await.unwrap();
    attacker.write_all(&zmtp_hello("SUB", false)).await.unwrap();
    attacker.write_all(&huge_frame_header()).await.unwrap();
    // The publisher hangs up on the attacker rather than allocating.
    let mut sink = vec![0; 4096];
    let closed = tokio::time::timeout(DEADLINE, async {
        while attacker.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "the publisher kept the attacker's connection open");

    // The process lives on, and the legitimate subscriber still gets everything.
    exchange(&load, &mut events, 1_000).await;
    assert_eq!(events.gaps(), 0);
    let disconnects = || async { event_disconnects(&worker).await };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while disconnects().await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cut connection was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_publisher_declaring_a_huge_frame_is_cut_off_and_real_publishers_keep_flowing() {
    let registry = MemRegistry::new();
    let listener = process(&registry, &[]);
    let mut events = subscriber(&listener).await;

    // A "publisher" listed in discovery that answers every connection with a
    // greeting and a 2^60-byte frame header.
    let rogue = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_address = rogue.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = served.clone();
    let rogue_task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = rogue.accept().await else {
                return;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = stream.write_all(&zmtp_hello("PUB", true)).await;
                let _ = stream.write_all(&huge_frame_header()).await;
                let mut sink = vec![0; 4096];
                while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    let liar = process(&registry, &[]);
    let record = EventChannel {
        namespace: "demo".into(),
        component: "backend".into(),
        topic: "load".into(),
        instance_id: liar.instance_id(),
        transport: EventTransport::Zmq(format!("tcp://{rogue_address}")),
    };
    liar.discovery()
        .register(Registration {
            key: Key {
                bucket: Bucket::EventChannels,
                namespace: "demo".into(),
                component: "backend".into(),
                name: "load".into(),
                instance_id: liar.instance_id(),
            },
            value: serde_json::to_vec(&record).unwrap().into(),
        })
        .await
        .unwrap();
    wait_until("the subscriber reached the rogue publisher", || {
        served.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;

    // The subscriber's process lives on and still follows real publishers.
    let worker = process(&registry, &[]);
    let load = publisher(&worker).await;
    until_connected(&load, &mut events).await;
    exchange(&load, &mut events, 1_000).await;
    assert_eq!(events.gaps(), 0);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while event_disconnects(&listener).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cut connection was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rogue_task.abort();
}

fn nats_vars(server: &NatsServer) -> [(&'static str, String); 2] {
    [("DYN_EVENT_PLANE", "nats".to_string()), ("NATS_SERVER", server.url())]
}

fn with<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_events_flow_between_runtimes_and_a_million_arrive_without_gaps() {
    let server = NatsServer::start();
    let vars = nats_vars(&server);
    let registry = MemRegistry::new();
    let listener = process(&registry, &with(&vars));
    assert_eq!(listener.event_plane_kind(), EventPlaneKind::Nats);
    let mut events = subscriber(&listener).await;
    let worker = process(&registry, &with(&vars));
    let load = publisher(&worker).await;
    until_connected(&load, &mut events).await;
    let started = tokio::time::Instant::now();
    exchange(&load, &mut events, 1_000_000).await;
    println!(
        "nats: 1,000,000 events in {:?}, {} gaps",
        started.elapsed(),
        events.gaps()
    );
    assert_eq!(events.gaps(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_restart_both_sides_reconnect_and_events_flow_again() {
    let mut server = NatsServer::start();
    let vars = nats_vars(&server);
    let registry = MemRegistry::new();
    let listener = process(&registry, &with(&vars));
    let mut events = subscriber(&listener).await;
    let worker = process(&registry, &with(&vars));
    let load = publisher(&worker).await;
    until_connected(&load, &mut events).await;
    exchange(&load, &mut events, 100).await;

    server.restart();
    // Publishing while disconnected may fail or be lost; keep going until
    // events arrive again (the client resubscribes after reconnecting).
    let restarted = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let marker = Load { active: 7, queued: 7 };
    loop {
        let _ = load.publish(&marker).await;
        if let Ok(Some(Ok((_, received)))) =
            tokio::time::timeout(Duration::from_millis(100), events.next_typed::<Load>()).await
            && received == marker
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events did not flow again after the restart"
        );
    }
    println!(
        "nats: events flowed again {:?} after the server restarted",
        restarted.elapsed()
    );
}

#[tokio::test]
async fn a_nats_event_plane_that_is_down_at_start_up_connects_when_it_comes_up() {
    let mut server = NatsServer::start();
    server.stop();
    let url = server.url();
    let registry = MemRegistry::new();
    let drt = process(&registry, &[("DYN_EVENT_PLANE", "nats"), ("NATS_SERVER", &url)]);
    // Nothing answers at `url`: publisher and subscriber open anyway.
    let mut events = subscriber(&drt).await;
    let load = publisher(&drt).await;
    server.restart();
    until_connected(&load, &mut events).await;
    exchange(&load, &mut events, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_authentication_settings_are_honoured() {
    let server = NatsServer::start_with_token("s3cret");
    let url = server.url();
    let registry = MemRegistry::new();
    let with_token = process(
        &registry,
        &[
            ("DYN_EVENT_PLANE", "nats"),
            ("NATS_SERVER", &url),
            ("NATS_AUTH_TOKEN", "s3cret"),
        ],
    );
    let mut events = subscriber(&with_token).await;
    let load = publisher(&with_token).await;
    until_connected(&load, &mut events).await;

    let without = process(&registry, &[("DYN_EVENT_PLANE", "nats"), ("NATS_SERVER", &url)]);
    let component = without.namespace("demo").unwrap().component("backend").unwrap();
    let error = component.event_publisher("load").await.unwrap_err();
    let error = Report(&error).to_string();
    assert!(error.contains("NATS_SERVER"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_events_flow_over_mutual_tls_and_a_process_without_a_certificate_is_refused() {
    let mesh = switchyard_test_support::etcd_server::TestCertificates::generate();
    let server = NatsServer::start_with_mutual_tls(&mesh, 1024 * 1024);
    let url = server.url();
    let [ca, cert, key] = [&mesh.ca, &mesh.client_cert, &mesh.client_key].map(|p| p.to_str().unwrap());
    let tls = [
        ("DYN_EVENT_PLANE", "nats"),
        ("NATS_SERVER", url.as_str()),
        ("NATS_AUTH_CA", ca),
        ("NATS_AUTH_CLIENT_CERT", cert),
        ("NATS_AUTH_CLIENT_KEY", key),
    ];
    let registry = MemRegistry::new();
    let listener = process(&registry, &tls);
    let mut events = subscriber(&listener).await;
    let worker = process(&registry, &tls);
    let load = publisher(&worker).await;
    until_connected(&load, &mut events).await;
    exchange(&load, &mut events, 100).await;

    // The CA but no client certificate: the server refuses it.
    let without = process(
        &registry,
        &[("DYN_EVENT_PLANE", "nats"), ("NATS_SERVER", &url), ("NATS_AUTH_CA", ca)],
    );
    let component = without.namespace("demo").unwrap().component("backend").unwrap();
    let error = component.event_publisher("load").await.unwrap_err();
    let error = Report(&error).to_string();
    assert!(error.contains("TLS with NATS"), "{error}");
}

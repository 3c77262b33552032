//! The crate over real sockets on loopback: our publisher to our
//! subscriber, a hand-driven peer for gaps, losses, restarts, malformed and
//! oversized messages, and both directions against a pyzmq peer that speaks
//! vLLM's format (vllm_like_publisher.py).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use switchyard_kv_events::{Delivery, Publisher, PublisherConfig, SubscriberConfig, Subscription, subscribe};
use switchyard_kv_router::events::encode::encode_batch;
use switchyard_kv_router::events::{BlockStored, EngineBlockHash, EventBatch, KvEvent};
use switchyard_kv_router::index::{IndexConfig, KvIndex};
use switchyard_kv_router::worker::WorkerId;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Long enough for a loaded 2-core CI machine; a passing test never waits it.
const PATIENCE: Duration = Duration::from_secs(10);

/// A batch storing one root block named `hash`, so deliveries can be told apart.
fn batch(hash: u64) -> EventBatch {
    EventBatch {
        ts: hash as f64,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: vec![EngineBlockHash(hash)],
            parent_block_hash: None,
            token_ids: (0..4).collect(),
            block_size: 4,
            lora_id: None,
            medium: None,
            lora_name: None,
        })],
        data_parallel_rank: Some(0),
    }
}

fn delivered(seq: u64) -> Delivery {
    Delivery::Batch { seq, batch: batch(seq) }
}

async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a delivery within the patience")
        .expect("the subscription is running")
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start(config: SubscriberConfig) -> (Subscription, mpsc::Receiver<Delivery>) {
    let (tx, rx) = mpsc::channel(64);
    let subscription = subscribe(config, tx, CancellationToken::new()).expect("subscribe");
    (subscription, rx)
}

/// A publisher driven by hand: an XPUB socket (same wire as PUB) so the test
/// can wait until the subscriber is there, and send whatever frames it likes.
struct RawEngine {
    xpub: zmq::Socket,
    endpoint: String,
    _context: zmq::Context,
}

impl RawEngine {
    fn bind() -> RawEngine {
        let context = zmq::Context::new();
        let xpub = context.socket(zmq::XPUB).unwrap();
        // Pass every subscription on, also the one a reconnection repeats.
        xpub.set_xpub_verbose(true).unwrap();
        xpub.set_linger(0).unwrap();
        xpub.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = xpub.get_last_endpoint().unwrap().unwrap();
        RawEngine {
            xpub,
            endpoint,
            _context: context,
        }
    }

    /// Waits for a (re)subscription, so that what is sent next arrives.
    fn wait_subscriber(&self) {
        loop {
            assert!(
                self.xpub.poll(zmq::POLLIN, PATIENCE.as_millis() as i64).unwrap() > 0,
                "no subscriber came"
            );
            let message = self.xpub.recv_bytes(0).unwrap();
            if message.first() == Some(&1) {
                return;
            }
        }
    }

    fn send(&self, seq: u64) {
        self.send_payload(seq, &encode_batch(&batch(seq)));
    }

    fn send_payload(&self, seq: u64, payload: &[u8]) {
        self.send_frames(&[b"kv", &seq.to_be_bytes(), payload]);
    }

    fn send_frames(&self, frames: &[&[u8]]) {
        self.xpub.send_multipart(frames, 0).unwrap();
    }
}

/// A replay ROUTER on its own thread holding `buffer` (the batches of those
/// seqs); when `answers` is false it reads requests and never replies.
struct RawReplay {
    endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RawReplay {
    fn serve(buffer: Vec<u64>, answers: bool) -> RawReplay {
        let context = zmq::Context::new();
        let router = context.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind("tcp://127.0.0.1:0").unwrap();
        let endpoint = router.get_last_endpoint().unwrap().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let _context = context;
            while !stopped.load(Ordering::Relaxed) {
                if router.poll(zmq::POLLIN, 20).unwrap() == 0 {
                    continue;
                }
                let frames = router.recv_multipart(0).unwrap();
                if !answers {
                    continue;
                }
                let start = u64::from_be_bytes(frames[2].clone().try_into().unwrap());
                for seq in buffer.iter().filter(|s| **s >= start) {
                    let payload = encode_batch(&batch(*seq));
                    router
                        .send_multipart([&frames[0][..], b"", &seq.to_be_bytes(), &payload], 0)
                        .unwrap();
                }
                router
                    .send_multipart([&frames[0][..], b"", &[0xff; 8], b""], 0)
                    .unwrap();
            }
        });
        RawReplay {
            endpoint,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RawReplay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().unwrap().join();
    }
}

fn config(engine: &RawEngine, replay: Option<&RawReplay>) -> SubscriberConfig {
    SubscriberConfig {
        replay_endpoint: replay.map(|r| r.endpoint.clone()),
        topic: "kv".to_owned(),
        ..SubscriberConfig::new(engine.endpoint.clone())
    }
}

#[tokio::test]
async fn our_publisher_reaches_our_subscriber_in_order_history_included() {
    let publisher = Publisher::bind(PublisherConfig {
        replay_endpoint: Some("tcp://127.0.0.1:0".to_owned()),
        topic: "kv".to_owned(),
        ..PublisherConfig::new("tcp://127.0.0.1:0")
    })
    .unwrap();
    assert!(publisher.endpoint().starts_with("tcp://127.0.0.1:"));
    assert!(
        !publisher.endpoint().ends_with(":0"),
        "the OS's port: {}",
        publisher.endpoint()
    );
    let (subscription, mut rx) = start(SubscriberConfig {
        replay_endpoint: publisher.replay_endpoint().map(str::to_owned),
        topic: "kv".to_owned(),
        ..SubscriberConfig::new(publisher.endpoint())
    });

    // The subscriber connects in the background: publish until it hears
    // something. What it missed comes from replay.
    let mut seq = 0;
    let first = loop {
        publisher.publish(&batch(seq));
        seq += 1;
        if let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
            break delivery;
        }
        assert!(seq < 500, "nothing arrived");
    };
    while seq < 20 {
        publisher.publish(&batch(seq));
        seq += 1;
    }
    let mut deliveries = vec![first];
    while deliveries.len() < 20 {
        deliveries.push(next(&mut rx).await);
    }
    assert_eq!(deliveries, (0..20).map(delivered).collect::<Vec<_>>());
    assert_eq!(subscription.stats().batches(), 20);
    assert_eq!(subscription.stats().lost_batches(), 0);
    eventually("all 20 sent", || publisher.published() == 20).await;
    assert_eq!(publisher.dropped(), 0);
}

#[tokio::test]
async fn a_gap_is_filled_by_replay_in_order_without_duplicates() {
    let engine = RawEngine::bind();
    // The replay overlaps the hole on both sides: only 2 may come from it.
    let replay = RawReplay::serve(vec![0, 1, 2, 3], true);
    let (subscription, mut rx) = start(config(&engine, Some(&replay)));
    engine.wait_subscriber();
    for seq in [0, 1, 3] {
        engine.send(seq);
    }
    for seq in 0..4 {
        assert_eq!(next(&mut rx).await, delivered(seq));
    }
    engine.send(4);
    assert_eq!(next(&mut rx).await, delivered(4));
    let stats = subscription.stats();
    assert_eq!((stats.gaps(), stats.replays(), stats.replayed_batches()), (1, 1, 1));
    assert_eq!(stats.lost_batches(), 0);
}

#[tokio::test]
async fn without_a_replay_endpoint_missed_batches_are_lost() {
    let engine = RawEngine::bind();
    let (subscription, mut rx) = start(config(&engine, None));
    engine.wait_subscriber();
    for seq in [3, 4, 7] {
        engine.send(seq);
    }
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 0, to: 3 });
    assert_eq!(next(&mut rx).await, delivered(3));
    assert_eq!(next(&mut rx).await, delivered(4));
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 5, to: 7 });
    assert_eq!(next(&mut rx).await, delivered(7));
    assert_eq!(subscription.stats().lost_batches(), 5);
    assert_eq!(subscription.stats().replays(), 0);
}

#[tokio::test]
async fn batches_the_publisher_no_longer_holds_are_lost() {
    let engine = RawEngine::bind();
    let replay = RawReplay::serve(vec![4, 5], true);
    let (subscription, mut rx) = start(config(&engine, Some(&replay)));
    engine.wait_subscriber();
    for seq in [0, 1, 5] {
        engine.send(seq);
    }
    assert_eq!(next(&mut rx).await, delivered(0));
    assert_eq!(next(&mut rx).await, delivered(1));
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 2, to: 4 });
    assert_eq!(next(&mut rx).await, delivered(4));
    assert_eq!(next(&mut rx).await, delivered(5));
    assert_eq!(subscription.stats().lost_batches(), 2);
}

#[tokio::test]
async fn a_replay_that_times_out_is_lost_and_the_next_asks_on_a_fresh_socket() {
    let engine = RawEngine::bind();
    let replay = RawReplay::serve(vec![], false);
    let (subscription, mut rx) = start(SubscriberConfig {
        replay_timeout: Duration::from_millis(300),
        ..config(&engine, Some(&replay))
    });
    engine.wait_subscriber();
    for seq in [0, 3, 5] {
        engine.send(seq);
    }
    assert_eq!(next(&mut rx).await, delivered(0));
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 1, to: 3 });
    assert_eq!(next(&mut rx).await, delivered(3));
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 4, to: 5 });
    assert_eq!(next(&mut rx).await, delivered(5));
    assert_eq!(subscription.stats().replays(), 2);
}

#[tokio::test]
async fn a_sequence_going_back_is_a_restart() {
    let engine = RawEngine::bind();
    let (subscription, mut rx) = start(config(&engine, None));
    engine.wait_subscriber();
    for seq in [0, 1, 2, 0, 1, 1] {
        engine.send(seq);
    }
    for seq in 0..3 {
        assert_eq!(next(&mut rx).await, delivered(seq));
    }
    assert_eq!(next(&mut rx).await, Delivery::Restarted { seq: 0 });
    assert_eq!(next(&mut rx).await, delivered(0));
    assert_eq!(next(&mut rx).await, delivered(1));
    // Back by one, not to zero: a restart whose first batch was missed.
    assert_eq!(next(&mut rx).await, Delivery::Restarted { seq: 1 });
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 0, to: 1 });
    assert_eq!(next(&mut rx).await, delivered(1));
    assert_eq!(subscription.stats().restarts(), 2);
}

#[tokio::test]
async fn malformed_messages_are_counted_and_skipped() {
    let engine = RawEngine::bind();
    let (subscription, mut rx) = start(config(&engine, None));
    engine.wait_subscriber();
    engine.send(0);
    engine.send_frames(&[b"kv", &1u64.to_be_bytes()]);
    engine.send_frames(&[b"kv", &1u64.to_be_bytes(), b"\x90", b"extra"]);
    engine.send_frames(&[b"kv", b"\x01", b"\x90"]);
    engine.send_payload(1, b"\xc1 not msgpack");
    engine.send(2);
    assert_eq!(next(&mut rx).await, delivered(0));
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 1, to: 2 });
    assert_eq!(next(&mut rx).await, delivered(2));
    assert_eq!(subscription.stats().malformed(), 4);
    assert!(!subscription.is_finished());
}

#[tokio::test]
async fn a_frame_over_the_size_cap_cuts_the_peer_and_later_batches_still_arrive() {
    let engine = RawEngine::bind();
    let (subscription, mut rx) = start(SubscriberConfig {
        max_message_size: 4096,
        ..config(&engine, None)
    });
    engine.wait_subscriber();
    engine.send(0);
    assert_eq!(next(&mut rx).await, delivered(0));
    engine.send_payload(1, &vec![0x90; 64 * 1024]);
    eventually("the peer is cut", || subscription.stats().disconnects() >= 1).await;
    engine.wait_subscriber(); // libzmq reconnects by itself
    engine.send(2);
    assert_eq!(next(&mut rx).await, Delivery::Lost { from: 1, to: 2 });
    assert_eq!(next(&mut rx).await, delivered(2));
}

/// The case that made us leave the pure-Rust `zeromq` crate (ADR 0009): a
/// peer that declares a frame of 2^62 bytes. libzmq drops the connection
/// before allocating anything.
#[tokio::test]
async fn a_peer_declaring_a_huge_frame_is_cut_off_and_the_subscriber_lives_on() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
    let (subscription, _rx) = start(SubscriberConfig::new(endpoint));
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(PATIENCE)).unwrap();
    // ZMTP 3.0 greeting (NULL mechanism), then READY as a PUB socket.
    let mut greeting = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0];
    greeting.extend_from_slice(b"NULL");
    greeting.resize(64, 0);
    peer.write_all(&greeting).unwrap();
    let mut theirs = [0u8; 64];
    peer.read_exact(&mut theirs).unwrap();
    let mut ready = vec![5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&3u32.to_be_bytes());
    ready.extend_from_slice(b"PUB");
    peer.write_all(&[0x04, ready.len() as u8]).unwrap();
    peer.write_all(&ready).unwrap();
    // A long data frame of 2^62 bytes: the header is all that is sent.
    peer.write_all(&[0x02]).unwrap();
    peer.write_all(&(1u64 << 62).to_be_bytes()).unwrap();
    // libzmq closes the connection: reads end (after the subscriber's own
    // READY and subscription, which may come first).
    let mut rest = Vec::new();
    let _ = peer.read_to_end(&mut rest);
    eventually("the peer is cut", || subscription.stats().disconnects() >= 1).await;
    assert!(!subscription.is_finished());
}

// --- against a pyzmq peer speaking vLLM's format -------------------------

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test-deps` in the workspace root ({}) to create the test venv with pyzmq and msgpack",
        python.display(),
        root.display()
    );
    python
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vllm_like_publisher.py")
}

async fn first_line(child: &mut tokio::process::Child) -> serde_json::Value {
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, BufReader::new(stdout).read_line(&mut line))
        .await
        .expect("the Python peer printed a line in time")
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("Python printed {line:?}: {e}"))
}

#[tokio::test]
async fn a_vllm_like_publisher_is_indexed_including_what_it_replays() {
    let mut child = tokio::process::Command::new(python())
        .arg(script())
        .arg("publish")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoints = first_line(&mut child).await;
    let (subscription, mut rx) = start(SubscriberConfig {
        replay_endpoint: Some(endpoints["replay_endpoint"].as_str().unwrap().to_owned()),
        topic: "kv-events".to_owned(),
        ..SubscriberConfig::new(endpoints["endpoint"].as_str().unwrap())
    });

    // Its history went out before we listened, and every fifth live batch
    // is kept for replay only: index until a gap was filled and passed.
    let worker = WorkerId::new(1, 0);
    let mut index = KvIndex::new(IndexConfig::new(16));
    let mut seqs = Vec::new();
    while subscription.stats().gaps() == 0 || seqs.len() < 15 {
        match next(&mut rx).await {
            Delivery::Batch { seq, batch } => {
                seqs.push(seq);
                for event in &batch.events {
                    index.apply(worker, event).unwrap();
                }
            }
            other => panic!("only batches were expected, got {other:?}"),
        }
    }
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    // 101..103 stored, 103 removed, all cleared, then 201..203 and 204.
    assert_eq!(index.worker_blocks(worker), 4);
    let stats = subscription.stats();
    assert!(stats.replays() >= 2, "the history and a gap: {stats:?}");
    assert!(stats.replayed_batches() >= 6, "{stats:?}");
    child.stdin.take().unwrap().shutdown().await.unwrap();
    let _ = tokio::time::timeout(PATIENCE, child.wait()).await;
}

#[tokio::test]
async fn our_publisher_is_read_by_a_pyzmq_subscriber_and_replay_client() {
    let publisher = Publisher::bind(PublisherConfig {
        replay_endpoint: Some("tcp://127.0.0.1:0".to_owned()),
        topic: "kv-events".to_owned(),
        ..PublisherConfig::new("tcp://127.0.0.1:0")
    })
    .unwrap();
    for seq in 0..3 {
        publisher.publish(&batch(seq));
    }
    let mut child = tokio::process::Command::new(python())
        .arg(script())
        .arg("subscribe")
        .arg(publisher.endpoint())
        .arg(publisher.replay_endpoint().unwrap())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let heartbeat = EventBatch {
        ts: 0.0,
        events: vec![],
        data_parallel_rank: Some(0),
    };
    let read = first_line(&mut child);
    tokio::pin!(read);
    let report = loop {
        tokio::select! {
            report = &mut read => break report,
            _ = tokio::time::sleep(Duration::from_millis(50)) => publisher.publish(&heartbeat),
        }
    };
    assert_eq!(report["topic"], "kv-events");
    let first_live = report["first_live"].as_u64().unwrap();
    let replay = report["replay"].as_array().unwrap();
    let seqs: Vec<u64> = replay.iter().map(|r| r[0].as_u64().unwrap()).collect();
    assert!(
        seqs.len() as u64 > first_live,
        "the replay reaches the live batch: {seqs:?}"
    );
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    // vLLM's array form, as a vLLM consumer decodes it.
    let first = &replay[0][1];
    assert_eq!(
        first,
        &serde_json::json!([
            0.0,
            [["BlockStored", [0], null, [0, 1, 2, 3], 4, null, null, null, null]],
            0
        ])
    );
    assert_eq!(replay[3][1], serde_json::json!([0.0, [], 0]));
}

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::*;
use crate::timing::{decode_ms, prefill_ms};

fn small_config() -> MockerConfig {
    MockerConfig {
        num_gpu_blocks: 64,
        block_size: 4,
        max_num_seqs: 4,
        max_num_batched_tokens: 32,
        ..Default::default()
    }
}

fn start(config: MockerConfig) -> MockerEngine {
    MockerEngine::start(config, CancellationToken::new()).expect("valid config")
}

fn request(prompt_len: u32, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        prompt_tokens: (1..=prompt_len).collect(),
        max_tokens,
    }
}

fn assert_complete(items: &[EngineOutput], max_tokens: usize) {
    assert_eq!(items.len(), max_tokens + 1, "{items:?}");
    assert!(
        items[..max_tokens]
            .iter()
            .all(|item| matches!(item, EngineOutput::Token(_))),
        "{items:?}"
    );
    assert_eq!(items[max_tokens], EngineOutput::Finished(FinishReason::Length));
}

#[tokio::test(start_paused = true)]
async fn emits_exactly_max_tokens_then_finished_length() {
    let engine = start(small_config());
    let items: Vec<EngineOutput> = engine.submit(request(10, 7)).expect("accepted").collect().await;
    assert_complete(&items, 7);
    let stats = engine.stats();
    assert_eq!((stats.submitted, stats.completed, stats.cancelled), (1, 1, 0));
    assert_eq!((stats.prompt_tokens, stats.generated_tokens), (10, 7));
    assert_eq!(engine.load().active_blocks, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_midway_frees_blocks_and_counts_a_cancel() {
    let engine = start(small_config());
    let mut stream = engine.submit(request(10, 100)).expect("accepted");
    for _ in 0..3 {
        assert!(matches!(stream.next().await, Some(EngineOutput::Token(_))));
    }
    assert!(
        engine.load().active_blocks >= 3,
        "10 prompt + 3 generated tokens in blocks of 4"
    );
    drop(stream);
    // No await in between: the blocks are freed by the drop itself.
    let load = engine.load();
    assert_eq!((load.active_blocks, load.running, load.waiting), (0, 0, 0));
    assert_eq!(engine.stats().cancelled, 1);
    assert_eq!(engine.stats().completed, 0);
}

#[tokio::test(start_paused = true)]
async fn requests_above_max_num_seqs_queue_and_all_complete() {
    let engine = start(small_config());
    let mut streams: Vec<EngineStream> = (0..20)
        .map(|i| engine.submit(request(5 + i % 3, 6)).expect("accepted"))
        .collect();
    let first_item = streams[0].next().await.expect("a first token");
    let load = engine.load();
    assert_eq!((load.running, load.waiting, load.capacity), (4, 16, 4));

    let mut results = futures::future::join_all(streams.drain(..).map(|stream| stream.collect::<Vec<_>>())).await;
    results[0].insert(0, first_item);
    for items in &results {
        assert_complete(items, 6);
    }
    assert_eq!(engine.stats().completed, 20);
    assert_eq!(
        engine.load(),
        EngineLoad {
            capacity: 4,
            total_blocks: 64,
            ..EngineLoad::default()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn speedup_zero_finishes_without_advancing_the_clock() {
    let engine = start(MockerConfig {
        speedup_ratio: 0.0,
        ..small_config()
    });
    let started = Instant::now();
    let items: Vec<EngineOutput> = engine.submit(request(40, 50)).expect("accepted").collect().await;
    assert_complete(&items, 50);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn one_request_takes_one_prefill_plus_max_tokens_decode_steps() {
    // 100x slower than real time so the paused clock's whole-millisecond steps are negligible.
    let engine = start(MockerConfig {
        speedup_ratio: 0.01,
        ..MockerConfig::default()
    });
    let started = Instant::now();
    let items: Vec<EngineOutput> = engine.submit(request(100, 10)).expect("accepted").collect().await;
    assert_complete(&items, 10);
    // 110 tokens occupy 2 of 16384 blocks of 64 throughout.
    let expected_ms = (prefill_ms(100) + 10.0 * decode_ms(2.0 / 16384.0)) / 0.01;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Each of the 10 sleeps may be rounded up to the next millisecond; one decode step more or less
    // would be ~570 ms off.
    assert!(
        elapsed_ms >= expected_ms - 0.001 && elapsed_ms <= expected_ms + 11.0,
        "{elapsed_ms} vs {expected_ms}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_repeated_prompt_is_served_from_the_prefix_cache() {
    let engine = start(small_config());
    for _ in 0..2 {
        let _: Vec<EngineOutput> = engine.submit(request(10, 2)).expect("accepted").collect().await;
    }
    assert_eq!(
        engine.stats().prefix_hit_tokens,
        8,
        "two full blocks of 4 reused the second time"
    );
}

#[tokio::test(start_paused = true)]
async fn memory_pressure_preempts_but_every_request_completes() {
    let config = MockerConfig {
        num_gpu_blocks: 8,
        ..small_config()
    };
    let engine = start(config);
    let streams: Vec<EngineStream> = (0..4)
        .map(|_| engine.submit(request(4, 16)).expect("accepted"))
        .collect();
    let results = futures::future::join_all(streams.into_iter().map(|s| s.collect::<Vec<_>>())).await;
    for items in &results {
        assert_complete(items, 16);
    }
    assert!(engine.stats().preempted > 0);
}

#[tokio::test(start_paused = true)]
async fn submit_rejects_zero_max_tokens() {
    let engine = start(small_config());
    let err = engine.submit(request(3, 0)).unwrap_err();
    assert!(matches!(err, SubmitError::ZeroMaxTokens));
    assert_eq!(err.to_string(), "max_tokens must be at least 1 (got 0)");
}

#[tokio::test(start_paused = true)]
async fn submit_rejects_a_request_larger_than_the_whole_cache() {
    // 64 blocks x 4 tokens = 256 tokens.
    let engine = start(small_config());
    let err = engine.submit(request(250, 10)).unwrap_err();
    assert!(
        matches!(err, SubmitError::PromptTooLong { prompt: 250, max: 246 }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("250 tokens") && message.contains("at most 246"),
        "{message}"
    );
    assert!(message.contains("num_gpu_blocks x block_size"), "{message}");
    // Exactly full is fine.
    assert!(engine.submit(request(246, 10)).is_ok());
    assert_eq!(engine.stats().submitted, 1);
}

#[tokio::test(start_paused = true)]
async fn an_empty_prompt_still_generates() {
    let engine = start(small_config());
    let items: Vec<EngineOutput> = engine
        .submit(EngineRequest {
            prompt_tokens: Vec::new(),
            max_tokens: 3,
        })
        .expect("accepted")
        .collect()
        .await;
    assert_complete(&items, 3);
}

#[tokio::test(start_paused = true)]
async fn start_rejects_an_invalid_config() {
    let err = MockerEngine::start(
        MockerConfig {
            max_num_seqs: 0,
            ..small_config()
        },
        CancellationToken::new(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "max_num_seqs must be at least 1 (got 0)");
}

#[tokio::test(start_paused = true)]
async fn load_changed_fires_when_a_request_arrives() {
    let engine = start(small_config());
    let mut changes = engine.load_changes();
    let changed = tokio::spawn(async move { changes.changed().await.expect("the engine lives") });
    tokio::task::yield_now().await;
    assert!(!changed.is_finished());
    let _stream = engine.submit(request(4, 5)).expect("accepted");
    tokio::time::timeout(Duration::from_secs(1), changed)
        .await
        .expect("fired")
        .expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn stopping_ends_open_streams_and_refuses_new_requests() {
    let stop = CancellationToken::new();
    let engine = MockerEngine::start(small_config(), stop.clone()).expect("valid");
    let mut stream = engine.submit(request(4, 200)).expect("accepted");
    assert!(stream.next().await.is_some());
    stop.cancel();
    let rest: Vec<EngineOutput> = stream.collect().await;
    assert!(
        !rest.contains(&EngineOutput::Finished(FinishReason::Length)),
        "cut off, not finished"
    );
    assert!(matches!(engine.submit(request(4, 1)), Err(SubmitError::Stopped)));
    assert_eq!(engine.load().active_blocks, 0);
    assert_eq!(engine.stats().cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_stops_the_engine() {
    let engine = start(small_config());
    let stream = engine.submit(request(4, 200)).expect("accepted");
    drop(engine);
    let items: Vec<EngineOutput> = tokio::time::timeout(Duration::from_secs(60), stream.collect())
        .await
        .expect("the stream ends once the engine is gone");
    assert!(items.len() < 200);
}

#[test]
fn handles_and_streams_can_move_across_tasks() {
    fn assert_stream<S: futures::Stream<Item = EngineOutput> + Unpin + Send + 'static>() {}
    fn assert_shared<T: Clone + Send + Sync + 'static>() {}
    assert_stream::<EngineStream>();
    assert_shared::<MockerEngine>();
}

// KV events.

/// Every batch already sent (the engine sends a step's batch before its next await).
fn drain(receiver: &mut mpsc::Receiver<EventBatch>) -> Vec<EventBatch> {
    std::iter::from_fn(|| receiver.try_recv().ok()).collect()
}

#[tokio::test(start_paused = true)]
async fn kv_event_batches_let_a_router_index_match_a_shared_prefix() {
    use crate::kv_cache::replay::Replay;

    let (sender, mut receiver) = mpsc::channel(64);
    let engine =
        MockerEngine::start_with_kv_events(small_config(), CancellationToken::new(), sender).expect("valid config");
    let mut replay = Replay::new(4);

    // 20 tokens = 5 full blocks of 4, computed within one step's budget of 32: one batch.
    let first: Vec<u32> = (1..=20).collect();
    let request = |prompt: &Vec<u32>| EngineRequest {
        prompt_tokens: prompt.clone(),
        max_tokens: 3,
    };
    let items: Vec<EngineOutput> = engine.submit(request(&first)).expect("accepted").collect().await;
    assert_complete(&items, 3);
    let batches = drain(&mut receiver);
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].data_parallel_rank, None);
    assert!(batches[0].ts > 1.6e9, "seconds since the epoch: {}", batches[0].ts);
    for batch in &batches {
        replay.apply(&batch.events);
    }
    assert_eq!(replay.stored, 5);

    // A prompt sharing the first 3 blocks: the router finds them where the engine will reuse them.
    let second: Vec<u32> = (1..=12).chain(100..110).collect();
    assert_eq!(replay.matched_blocks(&second), 3);
    let items: Vec<EngineOutput> = engine.submit(request(&second)).expect("accepted").collect().await;
    assert_complete(&items, 3);
    assert_eq!(engine.stats().prefix_hit_tokens, 12);
    for batch in drain(&mut receiver) {
        replay.apply(&batch.events);
    }
    assert_eq!(replay.stored, 7, "only the 2 new full blocks are stored");
    replay.assert_mirrors(engine.shared.lock().scheduler.kv());
    let stats = engine.stats();
    assert_eq!((stats.kv_event_batches_sent, stats.kv_event_batches_dropped), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_full_kv_event_channel_drops_and_counts_batches_without_stalling_the_engine() {
    // Capacity 1 and nobody reading: the first batch fits, the others are dropped.
    let (sender, _receiver) = mpsc::channel(1);
    let engine =
        MockerEngine::start_with_kv_events(small_config(), CancellationToken::new(), sender).expect("valid config");
    for first in [1, 101, 201] {
        let request = EngineRequest {
            prompt_tokens: (first..first + 8).collect(),
            max_tokens: 2,
        };
        let items: Vec<EngineOutput> = engine.submit(request).expect("accepted").collect().await;
        assert_complete(&items, 2);
    }
    let stats = engine.stats();
    assert_eq!((stats.kv_event_batches_sent, stats.kv_event_batches_dropped), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn an_engine_started_without_kv_events_records_and_sends_none() {
    let engine = start(small_config());
    let items: Vec<EngineOutput> = engine.submit(request(20, 3)).expect("accepted").collect().await;
    assert_complete(&items, 3);
    let mut state = engine.shared.lock();
    assert!(
        state.scheduler.kv().registered_blocks() > 0,
        "the prefix cache is in use"
    );
    assert!(state.scheduler.take_kv_events().is_empty());
    assert_eq!(
        state.stats.kv_event_batches_sent + state.stats.kv_event_batches_dropped,
        0
    );
}

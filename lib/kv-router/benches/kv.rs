//! The routing core's costs: one request's hash + match + select against a
//! large index, event ingestion, and memory per indexed block.
//!
//! Block size 64: an 8k-token prompt is 128 blocks. The index holds 64
//! workers × 128 sequences × 128 blocks; each sequence opens with one of 8
//! system prompts of 32 blocks that every worker holds, so 786,688 distinct
//! blocks (tree nodes) and 802,816 (worker, block) pairs. Matching cost
//! depends on the request's path (depth, owners per node), not on the
//! index's size beyond cache misses.
//!
//! Run: `cargo bench -p switchyard-kv-router -- --measurement-time 3 --warm-up-time 1`

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use std::hint::black_box;
use switchyard_kv_router::events::decode::decode_batch;
use switchyard_kv_router::events::encode::encode_batch;
use switchyard_kv_router::events::{BlockStored, EngineBlockHash, EventBatch, KvEvent};
use switchyard_kv_router::hash::BlockHasher;
use switchyard_kv_router::index::{IndexConfig, KvIndex};
use switchyard_kv_router::select::{Candidate, CostConfig, select};
use switchyard_kv_router::worker::WorkerId;

const BLOCK: u32 = 64;
const WORKERS: u64 = 64;
const SEQUENCES: u64 = 128;
const BLOCKS_PER_SEQUENCE: u64 = 128;
const SYSTEM_PROMPTS: u64 = 8;
const SYSTEM_BLOCKS: u64 = 32;
/// Blocks per `BlockStored`, as vLLM publishes a prefill in a few steps.
const EVENT_BLOCKS: u64 = 16;

/// The tokens of block `b` of sequence `seq` of `worker`: the system prompt's
/// blocks are the same everywhere, the rest unique to (worker, seq).
fn block_tokens(worker: u64, seq: u64, b: u64) -> Vec<u32> {
    let base = if b < SYSTEM_BLOCKS {
        (seq % SYSTEM_PROMPTS) << 20 | b << 8
    } else {
        1 << 40 | worker << 30 | seq << 16 | b << 8
    };
    (0..u64::from(BLOCK))
        .map(|t| ((base * 31 + t) % 150_000) as u32 ^ (base >> 12) as u32)
        .collect()
}

/// The `BlockStored` events a worker publishes for one sequence, engine ids
/// unique per (worker, seq, block).
fn sequence_events(worker: u64, seq: u64) -> Vec<KvEvent> {
    let id = |b: u64| EngineBlockHash(worker << 48 | seq << 24 | b);
    (0..BLOCKS_PER_SEQUENCE / EVENT_BLOCKS)
        .map(|e| {
            let blocks = e * EVENT_BLOCKS..(e + 1) * EVENT_BLOCKS;
            KvEvent::BlockStored(BlockStored {
                block_hashes: blocks.clone().map(id).collect(),
                parent_block_hash: (e > 0).then(|| id(blocks.start - 1)),
                token_ids: blocks.flat_map(|b| block_tokens(worker, seq, b)).collect(),
                block_size: BLOCK,
                lora_id: None,
                medium: None,
                lora_name: None,
            })
        })
        .collect()
}

fn prompt(worker: u64, seq: u64) -> Vec<u32> {
    (0..BLOCKS_PER_SEQUENCE)
        .flat_map(|b| block_tokens(worker, seq, b))
        .collect()
}

/// Resident set size of this process in bytes (Linux), 0 elsewhere.
fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn build_index() -> KvIndex {
    let mut index = KvIndex::new(IndexConfig {
        block_size: BLOCK,
        max_blocks: 4_000_000,
    });
    let rss_before = rss_bytes();
    for worker in 0..WORKERS {
        for seq in 0..SEQUENCES {
            for event in sequence_events(worker, seq) {
                index.apply(WorkerId::from(worker), &event).unwrap();
            }
        }
    }
    let rss_after = rss_bytes();
    let stats = index.stats();
    let estimate = index.memory_bytes();
    println!(
        "index: {} blocks (nodes), {} (worker, block) pairs, {} workers; \
         estimated heap {:.1} MB = {:.0} B/node, {:.0} B/pair; RSS grew {:.1} MB = {:.0} B/node, {:.0} B/pair",
        stats.blocks,
        stats.ownerships,
        stats.workers,
        estimate as f64 / 1e6,
        estimate as f64 / stats.blocks as f64,
        estimate as f64 / stats.ownerships as f64,
        rss_after.saturating_sub(rss_before) as f64 / 1e6,
        rss_after.saturating_sub(rss_before) as f64 / stats.blocks as f64,
        rss_after.saturating_sub(rss_before) as f64 / stats.ownerships as f64,
    );
    index
}

fn candidates(index: &KvIndex, overlaps: &switchyard_kv_router::overlap::Overlaps) -> Vec<Candidate> {
    (0..WORKERS)
        .map(|w| {
            let worker = WorkerId::from(w);
            Candidate {
                worker,
                overlap_blocks: overlaps.get(worker),
                active_prefill_blocks: w * 7 % 300,
                active_decode_blocks: w * 13 % 900,
                cached_blocks: index.worker_blocks(worker) as u64,
            }
        })
        .collect()
}

fn route(c: &mut Criterion) {
    let mut index = build_index();
    let hasher = BlockHasher::new(BLOCK, None).unwrap();
    let config = CostConfig::default();
    // Held whole by worker 5; its first 32 blocks by all 64 workers.
    let own = prompt(5, 9);
    // A prompt every worker holds whole: the most owners to merge.
    let everyone = prompt(0, 10_000);
    for worker in 0..WORKERS {
        for event in sequence_events(worker, 10_000) {
            if let KvEvent::BlockStored(mut stored) = event {
                stored.token_ids = stored
                    .block_hashes
                    .iter()
                    .flat_map(|h| block_tokens(0, 10_000, h.0 & 0xff_ffff))
                    .collect();
                index
                    .apply(WorkerId::from(worker), &KvEvent::BlockStored(stored))
                    .unwrap();
            }
        }
    }
    let mut group = c.benchmark_group("route_8k_tokens_128_blocks");
    group.bench_function("hash_prompt", |b| b.iter(|| hasher.local_hashes(black_box(&own))));
    let own_hashes = hasher.local_hashes(&own);
    assert_eq!(index.find_matches(&own_hashes).get(WorkerId::from(5)), 128);
    group.bench_function("find_matches/one_owner_after_32_shared", |b| {
        b.iter(|| index.find_matches(black_box(&own_hashes)))
    });
    let everyone_hashes = hasher.local_hashes(&everyone);
    assert_eq!(index.find_matches(&everyone_hashes).iter().count(), 64);
    group.bench_function("find_matches/64_owners_all_128", |b| {
        b.iter(|| index.find_matches(black_box(&everyone_hashes)))
    });
    for (name, tokens) in [("one_owner_after_32_shared", &own), ("64_owners_all_128", &everyone)] {
        group.bench_function(format!("hash_match_select/{name}"), |b| {
            b.iter(|| {
                let hashes = hasher.local_hashes(black_box(tokens));
                let overlaps = index.find_matches(&hashes);
                select(&config, hashes.len() as u64, &candidates(&index, &overlaps), 0.5)
            })
        });
    }
    group.finish();
}

fn ingest(c: &mut Criterion) {
    // 16 workers × 16 sequences × 128 blocks, 8 events per batch.
    let (workers, sequences) = (16u64, 16u64);
    let mut payloads = Vec::new();
    for worker in 0..workers {
        for seq in 0..sequences {
            let events = sequence_events(worker, seq);
            for chunk in events.chunks(8) {
                let batch = EventBatch {
                    ts: 0.0,
                    events: chunk.to_vec(),
                    data_parallel_rank: None,
                };
                payloads.push((WorkerId::from(worker), encode_batch(&batch)));
            }
        }
    }
    let blocks = workers * sequences * BLOCKS_PER_SEQUENCE;
    let decoded: Vec<(WorkerId, EventBatch)> = payloads.iter().map(|(w, p)| (*w, decode_batch(p).unwrap())).collect();
    let fresh = || {
        KvIndex::new(IndexConfig {
            block_size: BLOCK,
            max_blocks: 4_000_000,
        })
    };
    let mut group = c.benchmark_group("ingest");
    group.sample_size(10).throughput(Throughput::Elements(blocks));
    group.bench_function("decode", |b| {
        b.iter(|| {
            payloads
                .iter()
                .map(|(_, p)| decode_batch(p).unwrap().events.len())
                .sum::<usize>()
        })
    });
    group.bench_function("apply", |b| {
        b.iter_batched(
            fresh,
            |mut index| {
                for (worker, batch) in &decoded {
                    for event in &batch.events {
                        index.apply(*worker, event).unwrap();
                    }
                }
                index
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("decode_and_apply", |b| {
        b.iter_batched(
            fresh,
            |mut index| {
                for (worker, payload) in &payloads {
                    for event in &decode_batch(payload).unwrap().events {
                        index.apply(*worker, event).unwrap();
                    }
                }
                index
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, route, ingest);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}

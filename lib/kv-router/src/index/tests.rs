//! The index against the behaviours the router relies on, fed events the way
//! an engine publishes them.

use super::*;
use crate::events::{BlockRemoved, BlockStored};
use crate::hash::{BlockHasher, SequenceHash, combine};
use proptest::prelude::*;

const BS: u32 = 4;

fn w(id: u64) -> WorkerId {
    WorkerId::from(id)
}

/// A fake engine: its block ids are a per-engine seeded chain over the
/// tokens (so they differ between engines, as with vLLM's random seed).
fn engine_ids(engine_seed: u64, tokens: &[u32]) -> Vec<EngineBlockHash> {
    let hasher = BlockHasher::new(BS, None).unwrap();
    let mut chain = SequenceHash(engine_seed);
    hasher
        .local_hashes(tokens)
        .into_iter()
        .map(|local| {
            chain = combine(chain, local);
            EngineBlockHash(chain.0)
        })
        .collect()
}

/// The `BlockStored` an engine publishes after caching blocks `from..` of `tokens`.
fn stored_from(engine_seed: u64, tokens: &[u32], from: usize) -> KvEvent {
    let ids = engine_ids(engine_seed, tokens);
    let bs = BS as usize;
    KvEvent::BlockStored(BlockStored {
        block_hashes: ids[from..].to_vec(),
        parent_block_hash: from.checked_sub(1).map(|p| ids[p]),
        token_ids: tokens[from * bs..ids.len() * bs].to_vec(),
        block_size: BS,
        lora_id: None,
        medium: None,
        lora_name: None,
    })
}

fn stored(engine_seed: u64, tokens: &[u32]) -> KvEvent {
    stored_from(engine_seed, tokens, 0)
}

fn request(tokens: &[u32]) -> Vec<LocalBlockHash> {
    BlockHasher::new(BS, None).unwrap().local_hashes(tokens)
}

fn index() -> KvIndex {
    KvIndex::new(IndexConfig::new(BS))
}

fn tokens(start: u32, blocks: u32) -> Vec<u32> {
    (start..start + blocks * BS).collect()
}

#[test]
fn a_stored_prefix_matches_a_request_with_the_same_tokens() {
    let mut index = index();
    let prompt = tokens(0, 3);
    index.apply(w(1), &stored(11, &prompt)).unwrap();
    let mut longer = prompt.clone();
    longer.extend(100..110);
    let overlaps = index.find_matches(&request(&longer));
    assert_eq!(overlaps.get(w(1)), 3);
    assert_eq!(index.find_matches(&request(&tokens(1000, 3))), Overlaps::default());
    index.check();
}

#[test]
fn workers_sharing_a_prefix_score_their_own_contiguous_lengths() {
    let mut index = index();
    let shared = tokens(0, 2);
    let a = [shared.clone(), tokens(500, 2)].concat();
    let b = [shared.clone(), tokens(900, 1)].concat();
    index.apply(w(1), &stored(11, &a)).unwrap();
    index.apply(w(2), &stored(22, &b)).unwrap();
    index.apply(w(3), &stored(33, &shared[..4])).unwrap();
    let overlaps = index.find_matches(&request(&a));
    assert_eq!((overlaps.get(w(1)), overlaps.get(w(2)), overlaps.get(w(3))), (4, 2, 1));
    assert_eq!(index.stats().blocks, 5, "shared blocks are one node");
    assert_eq!(index.stats().ownerships, 4 + 3 + 1);
    index.check();
}

#[test]
fn later_blocks_hang_under_the_parent_named_by_the_engine_hash() {
    let mut index = index();
    let prompt = tokens(0, 4);
    index.apply(w(1), &stored(11, &prompt[..8])).unwrap();
    index.apply(w(1), &stored_from(11, &prompt, 2)).unwrap();
    assert_eq!(index.find_matches(&request(&prompt)).get(w(1)), 4);
    index.check();
}

#[test]
fn an_unknown_parent_is_counted_and_stores_nothing() {
    let mut index = index();
    let applied = index.apply(w(1), &stored_from(11, &tokens(0, 3), 1)).unwrap();
    assert!(applied.unknown_parent);
    assert_eq!(index.stats().unknown_parents, 1);
    assert_eq!(index.stats().blocks, 0);
}

#[test]
fn removing_a_middle_block_cuts_the_workers_prefix_there() {
    let mut index = index();
    let prompt = tokens(0, 4);
    index.apply(w(1), &stored(11, &prompt)).unwrap();
    index.apply(w(2), &stored(22, &prompt)).unwrap();
    let ids = engine_ids(11, &prompt);
    let removed = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![ids[1]],
        medium: None,
    });
    assert_eq!(index.apply(w(1), &removed).unwrap().blocks_removed, 1);
    let overlaps = index.find_matches(&request(&prompt));
    assert_eq!((overlaps.get(w(1)), overlaps.get(w(2))), (1, 4));
    index.check();
}

#[test]
fn removing_every_block_frees_the_nodes() {
    let mut index = index();
    let prompt = tokens(0, 3);
    index.apply(w(1), &stored(11, &prompt)).unwrap();
    let removed = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: engine_ids(11, &prompt).into_iter().rev().collect(),
        medium: None,
    });
    index.apply(w(1), &removed).unwrap();
    assert_eq!(index.stats().blocks, 0);
    index.check();
}

#[test]
fn unknown_removals_are_counted() {
    let mut index = index();
    let removed = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![EngineBlockHash(5), EngineBlockHash(6)],
        medium: None,
    });
    assert_eq!(index.apply(w(9), &removed).unwrap().unknown_removals, 2);
    assert_eq!(index.stats().unknown_removals, 2);
}

#[test]
fn clearing_drops_only_that_workers_blocks() {
    let mut index = index();
    let prompt = tokens(0, 3);
    index.apply(w(1), &stored(11, &prompt)).unwrap();
    index.apply(w(2), &stored(22, &prompt)).unwrap();
    index.apply(w(1), &KvEvent::AllBlocksCleared).unwrap();
    let overlaps = index.find_matches(&request(&prompt));
    assert_eq!((overlaps.get(w(1)), overlaps.get(w(2))), (0, 3));
    assert_eq!(index.worker_blocks(w(1)), 0);
    index.remove_worker(w(2));
    assert_eq!(index.stats().blocks, 0);
    assert_eq!(index.stats().workers, 1);
    index.check();
}

#[test]
fn a_worker_with_another_block_size_is_refused_and_excluded() {
    let mut index = index();
    let KvEvent::BlockStored(mut wrong) = stored(11, &tokens(0, 2)) else {
        unreachable!()
    };
    wrong.block_size = 8;
    wrong.token_ids = tokens(0, 2).iter().chain(&tokens(0, 2)).copied().collect();
    let expected = ApplyError::BlockSizeMismatch {
        worker: w(1),
        expected: BS,
        actual: 8,
    };
    assert_eq!(index.apply(w(1), &KvEvent::BlockStored(wrong)), Err(expected.clone()));
    assert!(index.is_excluded(w(1)));
    // Later events, even good ones, are refused the same way.
    assert_eq!(index.apply(w(1), &stored(11, &tokens(0, 2))), Err(expected));
    assert_eq!(index.stats().blocks, 0);
    // Others are unaffected; removing the worker lifts the exclusion.
    index.apply(w(2), &stored(22, &tokens(0, 2))).unwrap();
    index.remove_worker(w(1));
    index.apply(w(1), &stored(11, &tokens(0, 2))).unwrap();
    assert_eq!(index.stats().block_size_mismatches, 1);
}

#[test]
fn a_stored_event_with_the_wrong_token_count_is_an_error() {
    let mut index = index();
    let KvEvent::BlockStored(mut short) = stored(11, &tokens(0, 2)) else {
        unreachable!()
    };
    short.token_ids.pop();
    assert!(matches!(
        index.apply(w(1), &KvEvent::BlockStored(short)),
        Err(ApplyError::TokenCountMismatch { tokens: 7, .. })
    ));
    assert_eq!(index.stats().malformed_events, 1);
}

#[test]
fn lora_blocks_match_only_requests_salted_with_the_same_adapter() {
    let mut index = index();
    let prompt = tokens(0, 2);
    let KvEvent::BlockStored(mut lora) = stored(11, &prompt) else {
        unreachable!()
    };
    lora.lora_name = Some("adapter".into());
    index.apply(w(1), &KvEvent::BlockStored(lora)).unwrap();
    assert_eq!(index.find_matches(&request(&prompt)).get(w(1)), 0);
    let salted = BlockHasher::new(BS, Some("adapter")).unwrap().local_hashes(&prompt);
    assert_eq!(index.find_matches(&salted).get(w(1)), 2);
}

#[test]
fn the_cap_prunes_the_least_recently_stored_or_matched_first() {
    let mut index = KvIndex::new(IndexConfig {
        block_size: BS,
        max_blocks: 4,
    });
    let (a, b, c) = (tokens(0, 2), tokens(100, 2), tokens(200, 2));
    index.apply(w(1), &stored(11, &a)).unwrap();
    index.apply(w(1), &stored(11, &b)).unwrap();
    // a is matched, so b is now the least recently used.
    assert_eq!(index.find_matches(&request(&a)).get(w(1)), 2);
    index.apply(w(1), &stored(11, &c)).unwrap();
    let stats = index.stats();
    assert_eq!((stats.blocks, stats.pruned), (4, 2));
    assert_eq!(index.find_matches(&request(&a)).get(w(1)), 2);
    assert_eq!(index.find_matches(&request(&b)).get(w(1)), 0);
    assert_eq!(index.find_matches(&request(&c)).get(w(1)), 2);
    assert_eq!(index.worker_blocks(w(1)), 4);
    index.check();
}

#[test]
fn an_engine_id_reused_for_other_tokens_moves_the_ownership() {
    let mut index = index();
    let KvEvent::BlockStored(mut first) = stored(11, &tokens(0, 1)) else {
        unreachable!()
    };
    index.apply(w(1), &KvEvent::BlockStored(first.clone())).unwrap();
    first.token_ids = tokens(50, 1);
    index.apply(w(1), &KvEvent::BlockStored(first)).unwrap();
    assert_eq!(index.find_matches(&request(&tokens(0, 1))).get(w(1)), 0);
    assert_eq!(index.find_matches(&request(&tokens(50, 1))).get(w(1)), 1);
    assert_eq!(index.stats().blocks, 1);
    index.check();
}

#[derive(Debug, Clone)]
enum Op {
    Store {
        worker: u64,
        prompt: u8,
        blocks: u8,
    },
    Extend {
        worker: u64,
        prompt: u8,
        from: u8,
        blocks: u8,
    },
    Remove {
        worker: u64,
        prompt: u8,
        block: u8,
    },
    Clear {
        worker: u64,
    },
    Leave {
        worker: u64,
    },
    Match {
        prompt: u8,
        blocks: u8,
    },
}

fn prompt_tokens(prompt: u8, blocks: u8) -> Vec<u32> {
    // Prompts share their first block in pairs, so nodes get several owners.
    (0..u32::from(blocks) * BS)
        .map(|i| {
            if i < BS {
                u32::from(prompt / 2) * 1000 + i
            } else {
                u32::from(prompt) * 1000 + i
            }
        })
        .collect()
}

fn arb_op() -> impl Strategy<Value = Op> {
    let worker = 0u64..4;
    let prompt = 0u8..6;
    prop_oneof![
        4 => (worker.clone(), prompt.clone(), 1u8..6).prop_map(|(worker, prompt, blocks)| Op::Store { worker, prompt, blocks }),
        2 => (worker.clone(), prompt.clone(), 0u8..6, 1u8..4)
            .prop_map(|(worker, prompt, from, blocks)| Op::Extend { worker, prompt, from, blocks }),
        2 => (worker.clone(), prompt.clone(), 0u8..6).prop_map(|(worker, prompt, block)| Op::Remove { worker, prompt, block }),
        1 => worker.clone().prop_map(|worker| Op::Clear { worker }),
        1 => worker.prop_map(|worker| Op::Leave { worker }),
        2 => (prompt, 1u8..8).prop_map(|(prompt, blocks)| Op::Match { prompt, blocks }),
    ]
}

proptest! {
    /// Whatever engines send, in whatever order, the index stays consistent,
    /// within its cap, and never reports more overlap than the request has.
    #[test]
    fn random_event_streams_keep_the_index_consistent(ops in proptest::collection::vec(arb_op(), 1..80), cap in 3usize..30) {
        let mut index = KvIndex::new(IndexConfig { block_size: BS, max_blocks: cap });
        for op in ops {
            match op {
                Op::Store { worker, prompt, blocks } => {
                    index.apply(w(worker), &stored(worker, &prompt_tokens(prompt, blocks))).unwrap();
                }
                Op::Extend { worker, prompt, from, blocks } => {
                    let all = prompt_tokens(prompt, from + blocks);
                    index.apply(w(worker), &stored_from(worker, &all, usize::from(from))).unwrap();
                }
                Op::Remove { worker, prompt, block } => {
                    let ids = engine_ids(worker, &prompt_tokens(prompt, block + 1));
                    let event = KvEvent::BlockRemoved(BlockRemoved { block_hashes: vec![ids[usize::from(block)]], medium: None });
                    index.apply(w(worker), &event).unwrap();
                }
                Op::Clear { worker } => { index.apply(w(worker), &KvEvent::AllBlocksCleared).unwrap(); }
                Op::Leave { worker } => index.remove_worker(w(worker)),
                Op::Match { prompt, blocks } => {
                    let overlaps = index.find_matches(&request(&prompt_tokens(prompt, blocks)));
                    for (worker, n) in overlaps.iter() {
                        prop_assert!(n <= u32::from(blocks));
                        prop_assert!(index.worker_blocks(worker) >= n as usize);
                    }
                }
            }
            index.check();
            prop_assert!(index.stats().blocks <= cap);
        }
    }
}

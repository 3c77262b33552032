use super::*;

/// A cache of `blocks` blocks of 2 tokens with prefix caching on.
fn cache(blocks: usize) -> KvCache {
    KvCache::new(blocks, 2, true)
}

/// Registers the full prompt blocks after the cached ones, as the scheduler does once they are computed.
fn register_computed(kv: &mut KvCache, alloc: &Allocation, hashes: &[BlockHash], tokens: &[u32]) {
    let (first, end) = (alloc.cached_blocks, hashes.len());
    let parent = first.checked_sub(1).map(|i| hashes[i]);
    let size = kv.block_size();
    kv.register(
        &alloc.blocks[first..end],
        &hashes[first..end],
        parent,
        &tokens[first * size..end * size],
    );
}

/// Allocates blocks for `tokens` as a sequence would and registers its full blocks as computed.
fn run_prefill(kv: &mut KvCache, tokens: &[u32]) -> Allocation {
    let hashes = block_hashes(tokens, kv.block_size());
    let alloc = kv
        .allocate(&hashes, blocks_for(tokens.len(), kv.block_size()))
        .expect("fits");
    register_computed(kv, &alloc, &hashes, tokens);
    alloc
}

#[test]
fn block_hashes_cover_full_blocks_and_chain_on_the_prefix() {
    let a = block_hashes(&[1, 2, 3, 4, 5], 2);
    assert_eq!(a.len(), 2, "the partial block [5] has no hash");
    let b = block_hashes(&[1, 2, 3, 4], 2);
    assert_eq!(a, b);
    // Same second block after a different first block: different identity.
    let c = block_hashes(&[9, 9, 3, 4], 2);
    assert_ne!(a[1], c[1]);
}

#[test]
fn second_prompt_with_same_prefix_reuses_blocks_and_counts_references() {
    let mut kv = cache(10);
    let first = run_prefill(&mut kv, &[1, 2, 3, 4, 5]);
    assert_eq!(first.cached_blocks, 0);
    assert_eq!(kv.active_blocks(), 3);

    let second = run_prefill(&mut kv, &[1, 2, 3, 4, 7, 8]);
    assert_eq!(second.cached_blocks, 2);
    assert_eq!(second.blocks[..2], first.blocks[..2]);
    assert_ne!(second.blocks[2], first.blocks[2], "the diverging block is private");
    assert_eq!(kv.ref_count(first.blocks[0]), 2);
    assert_eq!(kv.ref_count(first.blocks[2]), 1);
    assert_eq!(kv.active_blocks(), 4);

    kv.release(&first.blocks);
    assert_eq!(kv.ref_count(first.blocks[0]), 1, "still used by the second sequence");
    assert_eq!(kv.active_blocks(), 3);
    assert_eq!(
        kv.free_blocks(),
        7,
        "the first sequence's partial block is freed, not cached"
    );
}

#[test]
fn released_full_blocks_stay_cached_until_evicted() {
    let mut kv = cache(4);
    let alloc = run_prefill(&mut kv, &[1, 2, 3, 4]);
    kv.release(&alloc.blocks);
    assert_eq!((kv.active_blocks(), kv.inactive_blocks(), kv.free_blocks()), (0, 2, 2));
    let again = run_prefill(&mut kv, &[1, 2, 3, 4, 5]);
    assert_eq!(again.cached_blocks, 2);
    assert_eq!(again.blocks[..2], alloc.blocks[..]);
    assert_eq!((kv.active_blocks(), kv.inactive_blocks(), kv.free_blocks()), (3, 0, 1));
}

#[test]
fn eviction_takes_free_blocks_first_then_least_recently_used() {
    let mut kv = cache(4);
    let older = run_prefill(&mut kv, &[1, 1]);
    kv.release(&older.blocks);
    let newer = run_prefill(&mut kv, &[2, 2]);
    kv.release(&newer.blocks);
    assert_eq!((kv.inactive_blocks(), kv.free_blocks()), (2, 2));

    // Two free blocks are used before anything cached is touched.
    let fill = kv.allocate(&[], 2).expect("two free blocks");
    assert_eq!(kv.cached_prefix(&block_hashes(&[1, 1], 2)), 1);
    assert_eq!(kv.cached_prefix(&block_hashes(&[2, 2], 2)), 1);

    // The next block evicts the older entry and keeps the newer one.
    let evicting = kv.allocate_one().expect("an inactive block can be evicted");
    assert_eq!(evicting, older.blocks[0]);
    assert_eq!(kv.cached_prefix(&block_hashes(&[1, 1], 2)), 0);
    assert_eq!(kv.cached_prefix(&block_hashes(&[2, 2], 2)), 1);
    assert_eq!(fill.blocks.len(), 2);
}

#[test]
fn a_sequence_releases_its_tail_blocks_to_eviction_first() {
    let mut kv = cache(3);
    let alloc = run_prefill(&mut kv, &[1, 2, 3, 4, 5, 6]);
    kv.release(&alloc.blocks);
    let evicted = kv.allocate_one().expect("evictable");
    assert_eq!(evicted, alloc.blocks[2], "the deepest block goes first");
    assert_eq!(kv.cached_prefix(&block_hashes(&[1, 2, 3, 4, 5, 6], 2)), 2);
}

#[test]
fn failed_allocation_leaves_the_cache_unchanged() {
    let mut kv = cache(4);
    let cached = run_prefill(&mut kv, &[1, 2, 3, 4]);
    kv.release(&cached.blocks);
    let _held = kv.allocate(&[], 1).expect("one block");
    let before = kv.clone();

    // 2 cached hits + 3 fresh blocks, but only 1 free block remains besides the hits.
    let hashes = block_hashes(&[1, 2, 3, 4], 2);
    assert_eq!(kv.allocate(&hashes, 5), None);
    assert_eq!(kv, before);
    assert_eq!(kv.allocate(&[], 4), None);
    assert_eq!(kv, before);
    // Exactly what is available still succeeds: 2 hits + 1 free block.
    assert!(kv.allocate(&hashes, 3).is_some());
}

#[test]
fn usage_counts_active_blocks_only() {
    let mut kv = cache(8);
    let alloc = run_prefill(&mut kv, &[1, 2, 3, 4]);
    assert_eq!(kv.usage(), 0.25);
    kv.release(&alloc.blocks);
    assert_eq!(kv.usage(), 0.0);
    assert_eq!(kv.inactive_blocks(), 2);
}

#[test]
fn without_prefix_caching_nothing_is_shared_or_kept() {
    let mut kv = KvCache::new(8, 2, false);
    let first = run_prefill(&mut kv, &[1, 2, 3, 4]);
    let second = run_prefill(&mut kv, &[1, 2, 3, 4]);
    assert_eq!(second.cached_blocks, 0);
    assert_eq!(kv.active_blocks(), 4);
    kv.release(&first.blocks);
    kv.release(&second.blocks);
    assert_eq!((kv.inactive_blocks(), kv.free_blocks()), (0, 8));
}

#[test]
fn identical_prompts_prefilled_side_by_side_keep_one_cache_entry() {
    let mut kv = cache(8);
    let hashes = block_hashes(&[1, 2], 2);
    let a = kv.allocate(&hashes, 1).expect("fits");
    let b = kv.allocate(&hashes, 1).expect("fits");
    assert_eq!(kv.register(&a.blocks, &hashes, None, &[1, 2]), 1);
    assert_eq!(
        kv.register(&b.blocks, &hashes, None, &[1, 2]),
        0,
        "the duplicate stays private"
    );
    kv.release(&b.blocks);
    kv.release(&a.blocks);
    assert_eq!((kv.inactive_blocks(), kv.free_blocks()), (1, 7));
}

// KV events.

use switchyard_kv_router::events::{BlockRemoved, BlockStored, EngineBlockHash, KvEvent};

use super::replay::Replay;

fn engine_hashes(hashes: &[BlockHash]) -> Vec<EngineBlockHash> {
    hashes.iter().map(|h| EngineBlockHash(h.0)).collect()
}

#[test]
fn without_kv_events_nothing_is_recorded() {
    let mut kv = cache(4);
    let first = run_prefill(&mut kv, &[1, 2, 3, 4]);
    kv.release(&first.blocks);
    let second = run_prefill(&mut kv, &[5, 6, 7, 8, 9, 10]);
    kv.release(&second.blocks);
    assert!(kv.take_kv_events().is_empty());
    assert_eq!(kv.events, None, "no buffer is even allocated");
}

#[test]
fn a_registered_run_is_one_block_stored_and_a_shared_prefix_is_not_stored_again() {
    let mut kv = cache(10).with_kv_events();
    run_prefill(&mut kv, &[1, 2, 3, 4, 5]);
    let first = block_hashes(&[1, 2, 3, 4], 2);
    let stored = KvEvent::BlockStored(BlockStored {
        block_hashes: engine_hashes(&first),
        parent_block_hash: None,
        token_ids: vec![1, 2, 3, 4],
        block_size: 2,
        lora_id: None,
        medium: Some("GPU".to_owned()),
        lora_name: None,
    });
    assert_eq!(kv.take_kv_events(), vec![stored]);

    // Same first two blocks: only the new third one is announced, as the child of the second.
    run_prefill(&mut kv, &[1, 2, 3, 4, 7, 8]);
    let second = block_hashes(&[1, 2, 3, 4, 7, 8], 2);
    let events = kv.take_kv_events();
    let [KvEvent::BlockStored(stored)] = events.as_slice() else {
        panic!("one BlockStored expected: {events:?}");
    };
    assert_eq!(stored.block_hashes, engine_hashes(&second[2..]));
    assert_eq!(stored.parent_block_hash, Some(EngineBlockHash(first[1].0)));
    assert_eq!(stored.token_ids, vec![7, 8]);
    assert!(kv.take_kv_events().is_empty(), "taking empties the buffer");
}

#[test]
fn evicting_registered_blocks_removes_them_and_private_blocks_make_no_event() {
    let mut kv = cache(4).with_kv_events();
    let cached = run_prefill(&mut kv, &[1, 2, 3, 4, 5]);
    kv.release(&cached.blocks);
    kv.take_kv_events();
    // 1 free block, then the private partial block [5] (freed, never announced), then LRU evictions
    // of the registered blocks, deepest first.
    let taken = kv.allocate(&[], 4).expect("everything is evictable");
    let hashes = block_hashes(&[1, 2, 3, 4], 2);
    let removed = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![EngineBlockHash(hashes[1].0), EngineBlockHash(hashes[0].0)],
        medium: Some("GPU".to_owned()),
    });
    assert_eq!(
        kv.take_kv_events(),
        vec![removed],
        "one event for the evictions of one call"
    );
    kv.release(&taken.blocks);
    assert!(kv.take_kv_events().is_empty(), "private blocks come and go silently");
}

#[test]
fn identical_prompts_prefilled_side_by_side_are_announced_once() {
    let mut kv = cache(8).with_kv_events();
    let mut replay = Replay::new(2);
    let tokens = [1, 2, 3, 4];
    let hashes = block_hashes(&tokens, 2);
    let a = kv.allocate(&hashes, 2).expect("fits");
    let b = kv.allocate(&hashes, 2).expect("fits");
    assert_eq!(kv.register(&a.blocks, &hashes, None, &tokens), 2);
    assert_eq!(kv.register(&b.blocks, &hashes, None, &tokens), 0);
    replay.apply(&kv.take_kv_events());
    assert_eq!(replay.stored, 2);
    replay.assert_mirrors(&kv);
}

#[test]
fn a_block_whose_parent_was_evicted_meanwhile_stays_private() {
    let mut kv = cache(4).with_kv_events();
    let mut replay = Replay::new(2);
    let (a_tokens, b_tokens) = ([1, 2, 3, 4], [1, 2, 5, 6]);
    let (a_hashes, b_hashes) = (block_hashes(&a_tokens, 2), block_hashes(&b_tokens, 2));
    // Side by side: both miss the cache, `a` registers [1, 2] first and `b`'s copy stays private.
    let a = kv.allocate(&a_hashes, 2).expect("fits");
    let b = kv.allocate(&b_hashes, 2).expect("fits");
    kv.register(&a.blocks, &a_hashes, None, &a_tokens);
    assert_eq!(kv.register(&b.blocks[..1], &b_hashes[..1], None, &b_tokens[..2]), 0);
    // `a` finishes and its blocks are evicted while `b` is still prefilling.
    kv.release(&a.blocks);
    let filler = kv.allocate(&[], 2).expect("evicts a's blocks");
    assert_eq!(kv.cached_prefix(&a_hashes), 0);
    // `b`'s second block names a parent nobody holds any more: registering it would announce an
    // orphan that neither the cache nor a router could ever match.
    let parent = Some(b_hashes[0]);
    assert_eq!(kv.register(&b.blocks[1..], &b_hashes[1..], parent, &b_tokens[2..]), 0);
    replay.apply(&kv.take_kv_events());
    replay.assert_mirrors(&kv);
    assert_eq!((replay.stored, replay.removed), (2, 2));
    kv.release(&filler.blocks);
    kv.release(&b.blocks);
}

/// A deterministic random source (SplitMix64), so every failing case can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = hash::mix(self.0);
        (self.0 % n as u64) as usize
    }
}

/// A live sequence of the random walk: its allocation and how many full blocks it has registered.
struct Live {
    tokens: Vec<u32>,
    hashes: Vec<BlockHash>,
    alloc: Allocation,
    registered: usize,
}

/// Prompts drawn from a few shared prefixes with short random tails over a tiny alphabet, so they
/// share prefixes, collide, and get prefilled side by side.
fn random_prompt(rng: &mut Rng) -> Vec<u32> {
    const PREFIXES: [&[u32]; 3] = [&[], &[1, 2, 3, 4], &[1, 2, 5, 6, 7, 8]];
    let mut tokens = PREFIXES[rng.below(PREFIXES.len())].to_vec();
    let tail = 1 + rng.below(7);
    tokens.extend((0..tail).map(|_| 1 + rng.below(3) as u32));
    tokens
}

#[test]
fn replaying_the_events_into_a_router_index_mirrors_the_cache_under_random_traffic() {
    for seed in 0..300 {
        let mut rng = Rng(seed);
        let mut kv = cache(6).with_kv_events();
        let mut replay = Replay::new(2);
        let mut live: Vec<Live> = Vec::new();
        let mut seen: Vec<Vec<u32>> = Vec::new();
        for _ in 0..200 {
            match rng.below(3) {
                0 => {
                    let tokens = random_prompt(&mut rng);
                    let hashes = block_hashes(&tokens, 2);
                    if let Some(alloc) = kv.allocate(&hashes, blocks_for(tokens.len(), 2)) {
                        let registered = alloc.cached_blocks;
                        seen.push(tokens.clone());
                        live.push(Live {
                            tokens,
                            hashes,
                            alloc,
                            registered,
                        });
                    }
                }
                // Compute a chunk of one sequence: register up to 2 more of its full blocks.
                1 if !live.is_empty() => {
                    let pick = rng.below(live.len());
                    let seq = &mut live[pick];
                    let first = seq.registered;
                    let end = seq.hashes.len().min(first + 1 + rng.below(2));
                    if end > first {
                        let parent = first.checked_sub(1).map(|i| seq.hashes[i]);
                        let tokens = &seq.tokens[first * 2..end * 2];
                        kv.register(&seq.alloc.blocks[first..end], &seq.hashes[first..end], parent, tokens);
                        seq.registered = end;
                    }
                }
                2 if !live.is_empty() => {
                    let seq = live.swap_remove(rng.below(live.len()));
                    kv.release(&seq.alloc.blocks);
                }
                _ => {}
            }
            replay.apply(&kv.take_kv_events());
            replay.assert_mirrors(&kv);
        }
        assert!(replay.removed > 0, "seed {seed}: the walk should evict");
        for tokens in &seen {
            let cached = kv.cached_prefix(&block_hashes(tokens, 2));
            assert_eq!(replay.matched_blocks(tokens), cached, "seed {seed}: {tokens:?}");
        }
    }
}

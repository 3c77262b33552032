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

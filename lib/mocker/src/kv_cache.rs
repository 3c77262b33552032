//! The simulated paged KV cache: which blocks are in use, which hold reusable prefixes, which are free.
//!
//! Pure bookkeeping with no async and no timing. A block is *active* while any sequence references it,
//! *inactive* when no sequence does but it still holds a registered full prompt block (a prefix cache
//! entry, evicted least-recently-used first), and *free* otherwise.
//!
//! When built [`KvCache::with_kv_events`], it also records the changes to its prefix cache as the
//! vLLM KV events a real engine would publish (`BlockStored` when full prompt blocks become reusable,
//! `BlockRemoved` when one is evicted), for the caller to drain with [`KvCache::take_kv_events`]. It
//! only records them: sending is the engine's job.

use std::collections::{BTreeMap, HashMap};

use switchyard_kv_router::events::{BlockRemoved, BlockStored, EngineBlockHash, KvEvent};

use crate::hash;

/// The storage tier named in KV events: the simulated cache is the GPU's, as vLLM labels it.
const MEDIUM: &str = "GPU";

/// Index of one block in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub usize);

/// Identity of a full block's contents *and* everything before it (a chained hash), so equal hashes
/// mean equal prefixes, not merely equal blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Number of blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Chained hashes of the full blocks of `tokens`; a trailing partial block gets none, because its
/// contents are still growing and it is private to its sequence.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = 0x6b76_5f63_6163_6865; // arbitrary root, "kv_cache"
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = block
                .iter()
                .fold(hash::mix(parent), |h, &t| hash::combine(h, u64::from(t)));
            BlockHash(parent)
        })
        .collect()
}

/// The blocks granted to a sequence by [`KvCache::allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// One block per block of the sequence, in order; the first `cached_blocks` were reused.
    pub blocks: Vec<BlockId>,
    /// Leading blocks found in the prefix cache, whose tokens need no prefill.
    pub cached_blocks: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Free,
    /// `hash` is set once the block was registered as a reusable full prompt block.
    Active {
        refs: u32,
        hash: Option<BlockHash>,
    },
    /// `stamp` is the block's key in the LRU map.
    Inactive {
        hash: BlockHash,
        stamp: u64,
    },
}

/// The block manager. Every method either succeeds completely or changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    block_size: usize,
    prefix_caching: bool,
    slots: Vec<Slot>,
    /// Free block ids, popped from the back; starts as 0.. so tests see predictable ids.
    free: Vec<BlockId>,
    /// Inactive blocks by release stamp, oldest first: the eviction order.
    lru: BTreeMap<u64, BlockId>,
    /// Every registered block (active or inactive) by content hash: the prefix cache index.
    registry: HashMap<BlockHash, BlockId>,
    next_stamp: u64,
    active: usize,
    /// Prefix cache changes not yet taken by the caller; `None` when events are off, so a cache
    /// without a listener pays one branch per registration or eviction and never allocates.
    events: Option<Vec<KvEvent>>,
}

impl KvCache {
    /// An empty cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            prefix_caching,
            slots: vec![Slot::Free; num_blocks],
            free: (0..num_blocks).rev().map(BlockId).collect(),
            lru: BTreeMap::new(),
            registry: HashMap::new(),
            next_stamp: 0,
            active: 0,
            events: None,
        }
    }

    /// The same cache, recording KV events from now on. Call it on a new cache: blocks registered
    /// before would never have been announced, so their removal would confuse a listener.
    pub fn with_kv_events(mut self) -> Self {
        debug_assert!(self.registry.is_empty(), "enable KV events on an empty cache");
        self.events = Some(Vec::new());
        self
    }

    /// The KV events recorded since the last call, oldest first; empty when events are off. The
    /// engine takes them every step, which is what bounds the buffer.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.slots.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn active_blocks(&self) -> usize {
        self.active
    }

    /// Blocks registered in the prefix cache (active or inactive): exactly those a listener of the KV
    /// events believes the engine holds.
    pub fn registered_blocks(&self) -> usize {
        self.registry.len()
    }

    /// Unreferenced blocks kept as prefix cache.
    pub fn inactive_blocks(&self) -> usize {
        self.lru.len()
    }

    /// Blocks holding nothing.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Fraction of the cache in active use, 0..=1.
    pub fn usage(&self) -> f64 {
        if self.slots.is_empty() {
            0.0
        } else {
            self.active as f64 / self.slots.len() as f64
        }
    }

    /// How many sequences reference `block` (0 when inactive or free).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        match self.slots[block.0] {
            Slot::Active { refs, .. } => refs,
            _ => 0,
        }
    }

    /// How many leading blocks of `hashes` are in the prefix cache right now.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        self.prefix_hits(hashes, usize::MAX).len()
    }

    /// Grants `total_blocks` blocks to one sequence whose full prompt blocks hash to `hashes`, reusing the
    /// cached leading blocks and taking the rest from the free pool, then from the least recently used
    /// inactive blocks. Returns `None`, changing nothing, when that many blocks cannot be had.
    pub fn allocate(&mut self, hashes: &[BlockHash], total_blocks: usize) -> Option<Allocation> {
        let hits = self.prefix_hits(hashes, total_blocks);
        let fresh = total_blocks - hits.len();
        // Inactive hits are about to become active, so they are not available for eviction.
        let inactive_hits = hits
            .iter()
            .filter(|b| matches!(self.slots[b.0], Slot::Inactive { .. }))
            .count();
        if fresh > self.free.len() + self.lru.len() - inactive_hits {
            return None;
        }
        // Acquire the hits before taking fresh blocks so eviction cannot pick one of them.
        for &block in &hits {
            self.acquire(block);
        }
        let cached_blocks = hits.len();
        let mut blocks = hits;
        blocks.extend((0..fresh).map(|_| self.take_fresh().expect("availability checked above")));
        Some(Allocation { blocks, cached_blocks })
    }

    /// One private block (for a growing sequence), or `None` when every block is active.
    pub fn allocate_one(&mut self) -> Option<BlockId> {
        self.take_fresh()
    }

    /// Marks consecutive active, fully computed prompt blocks of one sequence as reusable: `blocks[i]`
    /// under `hashes[i]`, whose tokens are `tokens[i * block_size..][..block_size]`, the first block being
    /// the child of `parent` (`None` at the start of the prompt). Returns how many were registered.
    ///
    /// A block stays private when prefix caching is off, when another block already holds its content
    /// (two identical prompts prefilled side by side), or when its parent is no longer registered (the
    /// other copy of the parent was evicted meanwhile): such a block could never be found by
    /// [`Self::allocate`], and a `BlockStored` naming an unknown parent would be refused by a router.
    /// Each run of blocks registered together is recorded as one `BlockStored`, as vLLM does.
    pub fn register(
        &mut self,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> usize {
        debug_assert_eq!(blocks.len(), hashes.len());
        debug_assert_eq!(tokens.len(), blocks.len() * self.block_size);
        if !self.prefix_caching {
            return 0;
        }
        let mut registered = 0;
        // The run of blocks registered since the last skipped one: (first index, its parent).
        let mut run: Option<(usize, Option<BlockHash>)> = None;
        let mut parent = parent;
        for (index, (&block, &hash)) in blocks.iter().zip(hashes).enumerate() {
            let parent_known = parent.is_none_or(|p| self.registry.contains_key(&p));
            if parent_known && self.register_one(block, hash) {
                registered += 1;
                run.get_or_insert((index, parent));
            } else if let Some((first, run_parent)) = run.take() {
                self.record_stored(
                    &hashes[first..index],
                    run_parent,
                    &tokens[first * self.block_size..index * self.block_size],
                );
            }
            parent = Some(hash);
        }
        if let Some((first, run_parent)) = run {
            self.record_stored(&hashes[first..], run_parent, &tokens[first * self.block_size..]);
        }
        registered
    }

    fn register_one(&mut self, block: BlockId, hash: BlockHash) -> bool {
        if self.registry.contains_key(&hash) {
            return false;
        }
        match &mut self.slots[block.0] {
            Slot::Active {
                hash: slot_hash @ None, ..
            } => {
                *slot_hash = Some(hash);
                self.registry.insert(hash, block);
                true
            }
            _ => false,
        }
    }

    /// Drops one sequence's reference to each of `blocks`. Registered blocks nobody references go to the
    /// inactive pool, the rest to the free pool. Blocks are released tail first, so a sequence's last
    /// blocks are evicted before its first ones and shared prefixes survive longest.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            let slot = &mut self.slots[block.0];
            let Slot::Active { refs, hash } = slot else {
                debug_assert!(false, "released block {block:?} is not active");
                continue;
            };
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            self.active -= 1;
            match *hash {
                Some(hash) => {
                    let stamp = self.next_stamp;
                    self.next_stamp += 1;
                    *slot = Slot::Inactive { hash, stamp };
                    self.lru.insert(stamp, block);
                }
                None => {
                    *slot = Slot::Free;
                    self.free.push(block);
                }
            }
        }
    }

    fn record_stored(&mut self, hashes: &[BlockHash], parent: Option<BlockHash>, tokens: &[u32]) {
        let Some(events) = &mut self.events else { return };
        events.push(KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|h| EngineBlockHash(h.0)).collect(),
            parent_block_hash: parent.map(|h| EngineBlockHash(h.0)),
            token_ids: tokens.to_vec(),
            // A block of over 4 billion tokens is no real configuration; saturate rather than panic.
            block_size: u32::try_from(self.block_size).unwrap_or(u32::MAX),
            lora_id: None,
            medium: Some(MEDIUM.to_owned()),
            lora_name: None,
        }));
    }

    /// Evictions made by one call land in one `BlockRemoved`, as long as nothing else was recorded in
    /// between, which keeps the order of events and their number small.
    fn record_removed(&mut self, hash: BlockHash) {
        let Some(events) = &mut self.events else { return };
        let engine = EngineBlockHash(hash.0);
        match events.last_mut() {
            Some(KvEvent::BlockRemoved(removed)) => removed.block_hashes.push(engine),
            _ => events.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![engine],
                medium: Some(MEDIUM.to_owned()),
            })),
        }
    }

    fn prefix_hits(&self, hashes: &[BlockHash], limit: usize) -> Vec<BlockId> {
        if !self.prefix_caching {
            return Vec::new();
        }
        hashes
            .iter()
            .take(limit)
            .map_while(|hash| self.registry.get(hash).copied())
            .collect()
    }

    fn acquire(&mut self, block: BlockId) {
        let slot = &mut self.slots[block.0];
        match *slot {
            Slot::Active { ref mut refs, .. } => *refs += 1,
            Slot::Inactive { hash, stamp } => {
                self.lru.remove(&stamp);
                *slot = Slot::Active {
                    refs: 1,
                    hash: Some(hash),
                };
                self.active += 1;
            }
            Slot::Free => unreachable!("registered blocks are never free"),
        }
    }

    fn take_fresh(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.lru.pop_first()?;
                if let Slot::Inactive { hash, .. } = self.slots[block.0] {
                    self.registry.remove(&hash);
                    self.record_removed(hash);
                }
                block
            }
        };
        self.slots[block.0] = Slot::Active { refs: 1, hash: None };
        self.active += 1;
        Some(block)
    }
}

#[cfg(test)]
pub(crate) mod replay;
#[cfg(test)]
mod tests;

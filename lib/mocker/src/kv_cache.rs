//! The simulated paged KV cache: which blocks are in use, which hold reusable prefixes, which are free.
//!
//! Pure bookkeeping with no async and no timing. A block is *active* while any sequence references it,
//! *inactive* when no sequence does but it still holds a registered full prompt block (a prefix cache
//! entry, evicted least-recently-used first), and *free* otherwise.

use std::collections::{BTreeMap, HashMap};

use crate::hash;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
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

    /// Marks an active, fully computed prompt block as reusable under `hash`. Returns false (and leaves
    /// the block private) when prefix caching is off or another block already holds that content,
    /// which happens when two identical prompts were prefilled side by side.
    pub fn register(&mut self, block: BlockId, hash: BlockHash) -> bool {
        if !self.prefix_caching || self.registry.contains_key(&hash) {
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
mod tests;

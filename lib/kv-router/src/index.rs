//! The KV index: which worker holds which prefix, learnt from the engines'
//! KV events, answering "how many leading blocks of this request does each
//! worker already hold?".
//!
//! A prefix tree of router-side block hashes (see [`crate::hash`]); each
//! node lists the workers holding that block with the engine's id for it
//! there, and each worker has a map engine id → node for parent links and
//! removals. Memory is bounded by a cap on nodes with least-recently
//! stored-or-matched leaves pruned first. Must not do I/O or read a clock:
//! the caller applies events in order and reads the counters as metrics.

#[cfg(test)]
mod tests;
mod tree;

use crate::events::{BlockStored, EngineBlockHash, KvEvent};
use crate::hash::{LocalBlockHash, hash_block, seed_for};
use crate::overlap::Overlaps;
use crate::worker::WorkerId;
use std::collections::HashMap;
use tree::{MixState, NodeId, Owner, ROOT, Tree, map_bytes};

/// Default cap on indexed blocks. At about 120 bytes a block (measured,
/// see docs/kv-routing-core.md) this is ~240 MB, and it holds the whole
/// GPU cache of 64 engines with ~30k blocks each (e.g. 500k tokens at 16
/// tokens a block), a large fleet for one router.
pub const DEFAULT_MAX_BLOCKS: usize = 2_000_000;

/// What the index is told once, at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// Tokens per block; must equal every engine's, or no block would match.
    pub block_size: u32,
    /// Cap on indexed blocks (tree nodes); beyond it the oldest leaves go.
    pub max_blocks: usize,
}

impl IndexConfig {
    pub fn new(block_size: u32) -> Self {
        IndexConfig {
            block_size,
            max_blocks: DEFAULT_MAX_BLOCKS,
        }
    }
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The worker's engine uses another block size: its blocks would never
    /// match, so it is excluded (its blocks dropped, its events refused with
    /// this error) until [`KvIndex::remove_worker`]. The caller should stop
    /// routing to it by cache and say so loudly.
    #[error("worker {worker} uses block size {actual}, the router {expected}; its KV events are ignored")]
    BlockSizeMismatch {
        worker: WorkerId,
        expected: u32,
        actual: u32,
    },
    /// A `BlockStored` whose token count is not `blocks × block_size`.
    #[error("worker {worker} stored {blocks} blocks of {block_size} tokens with {tokens} tokens")]
    TokenCountMismatch {
        worker: WorkerId,
        blocks: usize,
        block_size: u32,
        tokens: usize,
    },
}

/// What applying one event changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub blocks_stored: usize,
    pub blocks_removed: usize,
    /// The event's parent was not known for this worker, so nothing was stored.
    pub unknown_parent: bool,
    /// Removed engine hashes this worker was not known to hold.
    pub unknown_removals: usize,
}

/// Counters for the caller to publish as metrics; monotonic ones are totals
/// since construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Blocks (tree nodes) indexed now.
    pub blocks: usize,
    /// (worker, block) pairs indexed now.
    pub ownerships: usize,
    pub workers: usize,
    /// Blocks dropped by the cap.
    pub pruned: u64,
    pub unknown_parents: u64,
    pub unknown_removals: u64,
    pub block_size_mismatches: u64,
    pub malformed_events: u64,
    /// Events of a type the index does not know.
    pub unknown_events: u64,
}

#[derive(Debug)]
struct WorkerState {
    id: WorkerId,
    /// Engine id → node, for this worker's parent links and removals.
    blocks: HashMap<u64, NodeId, MixState>,
    /// Set when the worker's block size is wrong: it is excluded.
    mismatched_block_size: Option<u32>,
}

/// The index. `&mut self` everywhere, matches included: a match refreshes
/// the recency of what it used, and the caller owns the one writer.
#[derive(Debug)]
pub struct KvIndex {
    config: IndexConfig,
    tree: Tree,
    /// Dense slots keep owner entries small and let matching merge sorted lists.
    slots: HashMap<WorkerId, u32>,
    workers: Vec<Option<WorkerState>>,
    free_slots: Vec<u32>,
    /// Logical clock: one tick per event or match, for LRU order.
    tick: u64,
    stats: IndexStats,
    /// Reused by `find_matches`: the slots still matching.
    active: Vec<u32>,
}

impl KvIndex {
    pub fn new(config: IndexConfig) -> Self {
        KvIndex {
            config,
            tree: Tree::default(),
            slots: HashMap::new(),
            workers: Vec::new(),
            free_slots: Vec::new(),
            tick: 0,
            stats: IndexStats::default(),
            active: Vec::new(),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Applies one event of `worker`, in the order the engine published it.
    /// Unknown parents and removals are counted and skipped, never fatal;
    /// only a wrong block size or an inconsistent event is an error.
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) -> Result<Applied, ApplyError> {
        self.tick += 1;
        if let Some(actual) = self
            .slots
            .get(&worker)
            .and_then(|s| self.state(*s).mismatched_block_size)
        {
            return Err(self.mismatch(worker, actual));
        }
        match event {
            KvEvent::BlockStored(stored) => self.store(worker, stored),
            KvEvent::BlockRemoved(removed) => Ok(self.remove(worker, &removed.block_hashes)),
            KvEvent::AllBlocksCleared => {
                if let Some(slot) = self.slots.get(&worker).copied() {
                    self.clear(slot);
                }
                Ok(Applied::default())
            }
            KvEvent::Unknown { .. } => {
                self.stats.unknown_events += 1;
                Ok(Applied::default())
            }
        }
    }

    /// Forgets `worker` and everything it held (it left the fleet).
    pub fn remove_worker(&mut self, worker: WorkerId) {
        if let Some(slot) = self.slots.remove(&worker) {
            self.clear(slot);
            self.workers[slot as usize] = None;
            self.free_slots.push(slot);
        }
    }

    /// For each worker, how many leading blocks of `request` (its local
    /// hashes, in order) it holds contiguously from the first. Workers with
    /// none are absent. Refreshes the recency of the matched path.
    pub fn find_matches(&mut self, request: &[LocalBlockHash]) -> Overlaps {
        self.tick += 1;
        let mut active = std::mem::take(&mut self.active);
        active.clear();
        let mut scores: Vec<(u32, u32)> = Vec::new();
        let mut node = ROOT;
        let mut depth = 0u32;
        for local in request {
            let Some(child) = self.tree.child(node, *local) else {
                break;
            };
            let owners = self.tree.owners(child);
            if depth == 0 {
                active.extend(owners.iter().map(|o| o.slot));
            } else {
                retain_owners(&mut active, owners, |slot| scores.push((slot, depth)));
            }
            if active.is_empty() {
                break;
            }
            self.tree.touch(child, self.tick);
            node = child;
            depth += 1;
        }
        scores.extend(active.iter().map(|slot| (*slot, depth)));
        self.active = active;
        Overlaps::from_pairs(scores.into_iter().map(|(slot, n)| (self.state(slot).id, n)))
    }

    /// Blocks `worker` holds in the index (its cache size as the router sees it).
    pub fn worker_blocks(&self, worker: WorkerId) -> usize {
        self.slots.get(&worker).map_or(0, |s| self.state(*s).blocks.len())
    }

    /// True when `worker` was excluded for a wrong block size.
    pub fn is_excluded(&self, worker: WorkerId) -> bool {
        self.slots
            .get(&worker)
            .is_some_and(|s| self.state(*s).mismatched_block_size.is_some())
    }

    pub fn stats(&self) -> IndexStats {
        let mut stats = self.stats;
        stats.blocks = self.tree.len();
        stats.ownerships = self.live_workers().map(|w| w.blocks.len()).sum();
        stats.workers = self.slots.len();
        stats
    }

    /// Estimated heap bytes held by the index (capacities, not lengths, so
    /// this is what the allocator gave; allocator overhead excluded).
    pub fn memory_bytes(&self) -> usize {
        self.tree.memory_bytes()
            + self
                .live_workers()
                .map(|w| map_bytes(w.blocks.capacity(), 2 * size_of::<u64>()))
                .sum::<usize>()
    }

    fn store(&mut self, worker: WorkerId, stored: &BlockStored) -> Result<Applied, ApplyError> {
        let slot = self.slot_or_insert(worker);
        if stored.block_size != self.config.block_size {
            self.clear(slot);
            self.workers[slot as usize]
                .as_mut()
                .expect("slot is live")
                .mismatched_block_size = Some(stored.block_size);
            self.stats.block_size_mismatches += 1;
            return Err(self.mismatch(worker, stored.block_size));
        }
        let block_size = self.config.block_size as usize;
        if stored.token_ids.len() != stored.block_hashes.len() * block_size {
            self.stats.malformed_events += 1;
            return Err(ApplyError::TokenCountMismatch {
                worker,
                blocks: stored.block_hashes.len(),
                block_size: stored.block_size,
                tokens: stored.token_ids.len(),
            });
        }
        let mut parent = match stored.parent_block_hash {
            None => ROOT,
            Some(engine) => match self.state(slot).blocks.get(&engine.0) {
                Some(node) => *node,
                None => {
                    self.stats.unknown_parents += 1;
                    return Ok(Applied {
                        unknown_parent: true,
                        ..Applied::default()
                    });
                }
            },
        };
        // A LoRA's blocks are salted like its requests' (a lora_id alone
        // gets its own salt, so it never matches the base model).
        let lora_id_salt;
        let salt = match (&stored.lora_name, stored.lora_id) {
            (Some(name), _) => Some(name.as_str()),
            (None, Some(id)) => {
                lora_id_salt = format!("lora_id:{id}");
                Some(lora_id_salt.as_str())
            }
            (None, None) => None,
        };
        let seed = seed_for(salt);
        for (engine, tokens) in stored
            .block_hashes
            .iter()
            .zip(stored.token_ids.chunks_exact(block_size))
        {
            let node = self.tree.child_or_insert(parent, hash_block(tokens, seed), self.tick);
            self.own(slot, node, *engine);
            self.tree.touch(node, self.tick);
            parent = node;
        }
        self.prune();
        Ok(Applied {
            blocks_stored: stored.block_hashes.len(),
            ..Applied::default()
        })
    }

    /// Records that `slot` holds `node` under the engine id `engine`.
    fn own(&mut self, slot: u32, node: NodeId, engine: EngineBlockHash) {
        let replaced = self.tree.set_owner(node, Owner { slot, engine });
        let blocks = &mut self.workers[slot as usize].as_mut().expect("slot is live").blocks;
        if let Some(old) = replaced.filter(|old| *old != engine) {
            // Same tokens stored again under a new engine id: the old id is gone.
            blocks.remove(&old.0);
        }
        if let Some(previous) = blocks.insert(engine.0, node).filter(|n| *n != node) {
            // The engine id moved to other tokens: drop the stale ownership.
            self.tree.remove_owner(previous, slot);
            self.tree.release(previous);
        }
    }

    fn remove(&mut self, worker: WorkerId, hashes: &[EngineBlockHash]) -> Applied {
        let mut applied = Applied::default();
        let slot = self.slots.get(&worker).copied();
        for engine in hashes {
            let node = slot.and_then(|s| {
                let blocks = &mut self.workers[s as usize].as_mut().expect("slot is live").blocks;
                blocks.remove(&engine.0).map(|node| (s, node))
            });
            match node {
                Some((slot, node)) => {
                    self.tree.remove_owner(node, slot);
                    self.tree.release(node);
                    applied.blocks_removed += 1;
                }
                None => applied.unknown_removals += 1,
            }
        }
        self.stats.unknown_removals += applied.unknown_removals as u64;
        applied
    }

    /// Drops every block `slot` holds.
    fn clear(&mut self, slot: u32) {
        let blocks = std::mem::take(&mut self.workers[slot as usize].as_mut().expect("slot is live").blocks);
        for node in blocks.into_values() {
            self.tree.remove_owner(node, slot);
            self.tree.release(node);
        }
    }

    /// Evicts the oldest leaves until the cap holds.
    fn prune(&mut self) {
        while self.tree.len() > self.config.max_blocks {
            let Some(victim) = self.tree.oldest_leaf() else { return };
            for owner in self.tree.take_owners(victim) {
                if let Some(state) = self.workers[owner.slot as usize].as_mut() {
                    state.blocks.remove(&owner.engine.0);
                }
            }
            self.tree.release(victim);
            self.stats.pruned += 1;
        }
    }

    fn slot_or_insert(&mut self, worker: WorkerId) -> u32 {
        if let Some(slot) = self.slots.get(&worker) {
            return *slot;
        }
        let state = WorkerState {
            id: worker,
            blocks: HashMap::default(),
            mismatched_block_size: None,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.workers[slot as usize] = Some(state);
                slot
            }
            None => {
                self.workers.push(Some(state));
                (self.workers.len() - 1) as u32
            }
        };
        self.slots.insert(worker, slot);
        slot
    }

    fn state(&self, slot: u32) -> &WorkerState {
        self.workers[slot as usize].as_ref().expect("slot is live")
    }

    fn live_workers(&self) -> impl Iterator<Item = &WorkerState> {
        self.workers.iter().flatten()
    }

    fn mismatch(&self, worker: WorkerId, actual: u32) -> ApplyError {
        ApplyError::BlockSizeMismatch {
            worker,
            expected: self.config.block_size,
            actual,
        }
    }

    #[cfg(test)]
    fn check(&self) {
        self.tree.check();
        for state in self.live_workers() {
            let slot = self.slots[&state.id];
            for (engine, node) in &state.blocks {
                assert!(
                    self.tree
                        .owners(*node)
                        .iter()
                        .any(|o| o.slot == slot && o.engine.0 == *engine),
                    "worker map and node owners agree"
                );
            }
        }
    }
}

/// Keeps the slots of `active` (sorted) that are among `owners` (sorted by
/// slot); reports each dropped slot. A linear merge: O(active + owners).
fn retain_owners(active: &mut Vec<u32>, owners: &[Owner], mut dropped: impl FnMut(u32)) {
    let mut o = 0;
    active.retain(|slot| {
        while o < owners.len() && owners[o].slot < *slot {
            o += 1;
        }
        let kept = o < owners.len() && owners[o].slot == *slot;
        if !kept {
            dropped(*slot);
        }
        kept
    });
}

//! Test support: a listener that replays a cache's KV events into the router's own index
//! ([`KvIndex`]) and checks that the stream is one a router can trust. Shared by the cache, scheduler
//! and engine tests; compiled only for tests.

use std::collections::HashSet;

use switchyard_kv_router::events::KvEvent;
use switchyard_kv_router::hash::BlockHasher;
use switchyard_kv_router::index::{IndexConfig, KvIndex};
use switchyard_kv_router::worker::WorkerId;

use super::KvCache;

const WORKER: WorkerId = WorkerId {
    instance: 7,
    dp_rank: 0,
};

/// What a router would know after applying every event so far.
#[derive(Debug)]
pub(crate) struct Replay {
    index: KvIndex,
    hasher: BlockHasher,
    /// Engine hashes announced and not removed since: the stream's own claim of what is cached.
    announced: HashSet<u64>,
    /// Events applied, for assertions on the stream's shape.
    pub(crate) stored: usize,
    pub(crate) removed: usize,
}

impl Replay {
    pub(crate) fn new(block_size: usize) -> Self {
        let block_size = u32::try_from(block_size).expect("small block size");
        Self {
            index: KvIndex::new(IndexConfig::new(block_size)),
            hasher: BlockHasher::new(block_size, None).expect("block size > 0"),
            announced: HashSet::new(),
            stored: 0,
            removed: 0,
        }
    }

    /// Applies `events` in order, panicking on anything a router would have to count as drift: a
    /// block stored twice, a removal of a block never stored, a parent it does not know.
    pub(crate) fn apply(&mut self, events: &[KvEvent]) {
        for event in events {
            match event {
                KvEvent::BlockStored(stored) => {
                    for hash in &stored.block_hashes {
                        assert!(self.announced.insert(hash.0), "{hash:?} stored twice: {event:?}");
                    }
                    self.stored += stored.block_hashes.len();
                }
                KvEvent::BlockRemoved(removed) => {
                    for hash in &removed.block_hashes {
                        assert!(self.announced.remove(&hash.0), "{hash:?} removed but never stored");
                    }
                    self.removed += removed.block_hashes.len();
                }
                KvEvent::AllBlocksCleared => self.announced.clear(),
                KvEvent::Unknown { tag } => panic!("the mocker made an unknown event {tag}"),
            }
            let applied = self.index.apply(WORKER, event).expect("a well-formed event");
            assert!(!applied.unknown_parent, "parent unknown to the index: {event:?}");
            assert_eq!(applied.unknown_removals, 0, "removal unknown to the index: {event:?}");
        }
    }

    /// The index and the stream hold exactly the cache's registered blocks.
    pub(crate) fn assert_mirrors(&self, kv: &KvCache) {
        let registered: HashSet<u64> = kv.registry.keys().map(|h| h.0).collect();
        assert_eq!(self.announced, registered, "announced blocks differ from the cache's");
        assert_eq!(self.index.worker_blocks(WORKER), kv.registered_blocks());
    }

    /// How many leading blocks of `tokens` the index says this worker holds.
    pub(crate) fn matched_blocks(&mut self, tokens: &[u32]) -> usize {
        let locals = self.hasher.local_hashes(tokens);
        self.index.find_matches(&locals).get(WORKER) as usize
    }
}

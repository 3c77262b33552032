//! The prefix tree's storage: nodes in an arena, children found through one
//! flat map keyed by (parent, local hash), and an intrusive LRU list of the
//! leaves. Knows owners only as (slot, engine hash) pairs; must not know
//! about events, workers' maps or limits (that is `index.rs`).
//!
//! Why this shape: a node per block must be small (the index holds millions),
//! so there is no per-node map of children and no pointer per child — one
//! shared hash table answers "the child of P with hash H" and a node keeps
//! only a count of its children.

use crate::events::EngineBlockHash;
use crate::hash::LocalBlockHash;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

pub(crate) type NodeId = u32;

/// "No node" in the intrusive links.
const NIL: NodeId = u32::MAX;
/// The root: the empty prefix. Never owned, never evicted.
pub(crate) const ROOT: NodeId = 0;

/// How far [`Tree::enqueue_leaf`] looks from the oldest end for a node's
/// place by age before it gives up and treats the node as the newest.
/// A node that becomes a leaf again is usually cold (its child was just
/// evicted or removed), so its place is near the oldest end.
const LRU_PLACE_SEARCH: usize = 32;

/// One worker holding a block, and the engine's id for it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) slot: u32,
    pub(crate) engine: EngineBlockHash,
}

/// The owners of a node, sorted by slot. Most blocks have one owner, which
/// is stored inline (no allocation).
#[derive(Debug, Default)]
enum Owners {
    #[default]
    None,
    One(Owner),
    Many(Vec<Owner>),
}

impl Owners {
    fn as_slice(&self) -> &[Owner] {
        match self {
            Owners::None => &[],
            Owners::One(owner) => std::slice::from_ref(owner),
            Owners::Many(owners) => owners,
        }
    }

    /// Adds or updates `slot`'s entry; returns the engine hash it replaced.
    fn set(&mut self, owner: Owner) -> Option<EngineBlockHash> {
        match self {
            Owners::None => {
                *self = Owners::One(owner);
                None
            }
            Owners::One(only) if only.slot == owner.slot => Some(std::mem::replace(only, owner).engine),
            Owners::One(only) => {
                let mut owners = vec![*only, owner];
                owners.sort_unstable_by_key(|o| o.slot);
                *self = Owners::Many(owners);
                None
            }
            Owners::Many(owners) => match owners.binary_search_by_key(&owner.slot, |o| o.slot) {
                Ok(i) => Some(std::mem::replace(&mut owners[i], owner).engine),
                Err(i) => {
                    owners.insert(i, owner);
                    None
                }
            },
        }
    }

    fn remove(&mut self, slot: u32) -> Option<Owner> {
        match self {
            Owners::One(only) if only.slot == slot => {
                let removed = *only;
                *self = Owners::None;
                Some(removed)
            }
            Owners::Many(owners) => {
                let i = owners.binary_search_by_key(&slot, |o| o.slot).ok()?;
                let removed = owners.remove(i);
                if owners.len() == 1 {
                    *self = Owners::One(owners[0]);
                }
                Some(removed)
            }
            _ => None,
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Owners::Many(owners) => owners.capacity() * size_of::<Owner>(),
            _ => 0,
        }
    }
}

#[derive(Debug)]
struct Node {
    local: LocalBlockHash,
    /// Logical time of the last store or match through this node.
    last_used: u64,
    parent: NodeId,
    children: u32,
    /// Neighbours in the LRU list; only leaves (no children) are in it.
    lru_prev: NodeId,
    lru_next: NodeId,
    owners: Owners,
}

/// Key of the children map. Three u32 instead of (u32, u64) keep an entry
/// at 16 bytes instead of 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChildKey {
    parent: NodeId,
    local: [u32; 2],
}

impl ChildKey {
    fn new(parent: NodeId, local: LocalBlockHash) -> Self {
        ChildKey {
            parent,
            local: [local.0 as u32, (local.0 >> 32) as u32],
        }
    }
}

impl std::hash::Hash for ChildKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let local = u64::from(self.local[0]) | (u64::from(self.local[1]) << 32);
        state.write_u64(local ^ u64::from(self.parent).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

/// A hasher for keys that are one u64 each: a multiply-xorshift finaliser.
/// SipHash would cost more than the rest of a lookup; keys here are block
/// hashes or engine ids, not attacker-chosen map keys in a shared table.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MixState;

#[derive(Debug, Default)]
pub(crate) struct MixHasher(u64);

impl BuildHasher for MixState {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(0)
    }
}

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        let mut x = (self.0.rotate_left(5) ^ v).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
        self.0 = x.wrapping_mul(0x94d0_49bb_1331_11eb) ^ (x >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The tree. All operations are O(1) except `enqueue_leaf` (bounded) and
/// `release` (the length of the chain of ownerless ancestors it frees).
#[derive(Debug)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
    /// Freed arena slots, reused before the arena grows.
    free: Vec<NodeId>,
    children: HashMap<ChildKey, NodeId, MixState>,
    /// Oldest leaf; eviction starts here.
    lru_head: NodeId,
    /// Newest leaf.
    lru_tail: NodeId,
    live: usize,
}

impl Default for Tree {
    fn default() -> Self {
        let root = Node {
            local: LocalBlockHash(0),
            last_used: 0,
            parent: NIL,
            children: 0,
            lru_prev: NIL,
            lru_next: NIL,
            owners: Owners::None,
        };
        Tree {
            nodes: vec![root],
            free: Vec::new(),
            children: HashMap::default(),
            lru_head: NIL,
            lru_tail: NIL,
            live: 0,
        }
    }
}

impl Tree {
    /// Nodes other than the root: the blocks indexed.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn child(&self, parent: NodeId, local: LocalBlockHash) -> Option<NodeId> {
        self.children.get(&ChildKey::new(parent, local)).copied()
    }

    pub(crate) fn owners(&self, node: NodeId) -> &[Owner] {
        self.nodes[node as usize].owners.as_slice()
    }

    /// The child of `parent` for `local`, created (as the newest leaf) when missing.
    pub(crate) fn child_or_insert(&mut self, parent: NodeId, local: LocalBlockHash, now: u64) -> NodeId {
        let key = ChildKey::new(parent, local);
        if let Some(child) = self.children.get(&key) {
            return *child;
        }
        let node = Node {
            local,
            last_used: now,
            parent,
            children: 0,
            lru_prev: NIL,
            lru_next: NIL,
            owners: Owners::None,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as NodeId
            }
        };
        self.children.insert(key, id);
        if parent != ROOT && self.nodes[parent as usize].children == 0 {
            self.unlink(parent); // no longer a leaf
        }
        self.nodes[parent as usize].children += 1;
        self.live += 1;
        self.push_tail(id);
        id
    }

    /// Records a use of `node` now; a leaf becomes the newest.
    pub(crate) fn touch(&mut self, node: NodeId, now: u64) {
        self.nodes[node as usize].last_used = now;
        if self.in_lru(node) && self.lru_tail != node {
            self.unlink(node);
            self.push_tail(node);
        }
    }

    /// Makes `owner.slot` an owner of `node`; returns the engine hash it had there before.
    pub(crate) fn set_owner(&mut self, node: NodeId, owner: Owner) -> Option<EngineBlockHash> {
        self.nodes[node as usize].owners.set(owner)
    }

    pub(crate) fn remove_owner(&mut self, node: NodeId, slot: u32) -> Option<Owner> {
        self.nodes[node as usize].owners.remove(slot)
    }

    /// Takes every owner off `node` (for eviction).
    pub(crate) fn take_owners(&mut self, node: NodeId) -> Vec<Owner> {
        let owners = std::mem::take(&mut self.nodes[node as usize].owners);
        owners.as_slice().to_vec()
    }

    /// The oldest leaf, the next to evict.
    pub(crate) fn oldest_leaf(&self) -> Option<NodeId> {
        (self.lru_head != NIL).then_some(self.lru_head)
    }

    /// Frees `node` and then its ancestors while they have neither owners
    /// nor children. An owned ancestor that becomes a leaf joins the LRU list.
    pub(crate) fn release(&mut self, mut node: NodeId) {
        while node != ROOT {
            let n = &self.nodes[node as usize];
            if n.children > 0 || !n.owners.as_slice().is_empty() {
                return;
            }
            let (parent, local) = (n.parent, n.local);
            self.unlink(node);
            self.children.remove(&ChildKey::new(parent, local));
            self.nodes[node as usize].owners = Owners::None;
            self.free.push(node);
            self.live -= 1;
            let p = &mut self.nodes[parent as usize];
            p.children -= 1;
            if parent != ROOT && p.children == 0 && !p.owners.as_slice().is_empty() {
                self.enqueue_leaf(parent);
                return;
            }
            node = parent;
        }
    }

    /// Estimated heap bytes: the arena, the children map, owner lists.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node>()
            + self.free.capacity() * size_of::<NodeId>()
            + map_bytes(self.children.capacity(), size_of::<(ChildKey, NodeId)>())
            + self.nodes.iter().map(|n| n.owners.heap_bytes()).sum::<usize>()
    }

    fn in_lru(&self, node: NodeId) -> bool {
        let n = &self.nodes[node as usize];
        n.lru_prev != NIL || self.lru_head == node
    }

    fn unlink(&mut self, node: NodeId) {
        if !self.in_lru(node) {
            return;
        }
        let (prev, next) = {
            let n = &self.nodes[node as usize];
            (n.lru_prev, n.lru_next)
        };
        match prev {
            NIL => self.lru_head = next,
            p => self.nodes[p as usize].lru_next = next,
        }
        match next {
            NIL => self.lru_tail = prev,
            n => self.nodes[n as usize].lru_prev = prev,
        }
        let n = &mut self.nodes[node as usize];
        n.lru_prev = NIL;
        n.lru_next = NIL;
    }

    fn push_tail(&mut self, node: NodeId) {
        let tail = self.lru_tail;
        {
            let n = &mut self.nodes[node as usize];
            n.lru_prev = tail;
            n.lru_next = NIL;
        }
        match tail {
            NIL => self.lru_head = node,
            t => self.nodes[t as usize].lru_next = node,
        }
        self.lru_tail = node;
    }

    /// Puts a node that just became a leaf in its place by age, looking at
    /// most [`LRU_PLACE_SEARCH`] leaves from the oldest end.
    fn enqueue_leaf(&mut self, node: NodeId) {
        let age = self.nodes[node as usize].last_used;
        let mut before = self.lru_head;
        for _ in 0..LRU_PLACE_SEARCH {
            if before == NIL {
                break;
            }
            if self.nodes[before as usize].last_used > age {
                let prev = self.nodes[before as usize].lru_prev;
                {
                    let n = &mut self.nodes[node as usize];
                    n.lru_prev = prev;
                    n.lru_next = before;
                }
                self.nodes[before as usize].lru_prev = node;
                match prev {
                    NIL => self.lru_head = node,
                    p => self.nodes[p as usize].lru_next = node,
                }
                return;
            }
            before = self.nodes[before as usize].lru_next;
        }
        self.push_tail(node);
    }

    /// Checks the links and counts (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut leaves = 0;
        let mut at = self.lru_head;
        let mut prev = NIL;
        while at != NIL {
            let n = &self.nodes[at as usize];
            assert_eq!(n.children, 0, "only leaves are in the LRU list");
            assert_eq!(n.lru_prev, prev);
            leaves += 1;
            prev = at;
            at = n.lru_next;
        }
        assert_eq!(self.lru_tail, prev);
        assert_eq!(self.children.len(), self.live);
        let leaf_count = self
            .children
            .values()
            .filter(|id| self.nodes[**id as usize].children == 0)
            .count();
        assert_eq!(leaves, leaf_count, "every leaf is in the LRU list");
        for (key, id) in &self.children {
            let n = &self.nodes[*id as usize];
            assert_eq!(n.parent, key.parent);
            assert!(n.children > 0 || !n.owners.as_slice().is_empty(), "no dead leaf stays");
        }
    }
}

/// Estimated bytes of a std `HashMap` with `capacity` entries of `entry`
/// bytes: buckets are a power of two at most 7/8 full, plus one control
/// byte per bucket.
pub(crate) fn map_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity * 8 / 7).next_power_of_two();
    buckets * (entry + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(slot: u32, engine: u64) -> Owner {
        Owner {
            slot,
            engine: EngineBlockHash(engine),
        }
    }

    #[test]
    fn a_node_stays_small() {
        // The memory budget per block depends on this; see docs/kv-routing-core.md.
        assert!(size_of::<Node>() <= 56, "Node is {} bytes", size_of::<Node>());
        assert_eq!(size_of::<(ChildKey, NodeId)>(), 16);
    }

    #[test]
    fn owners_stay_sorted_and_report_replaced_engine_hashes() {
        let mut owners = Owners::None;
        assert_eq!(owners.set(owner(5, 1)), None);
        assert_eq!(owners.set(owner(2, 2)), None);
        assert_eq!(owners.set(owner(9, 3)), None);
        assert_eq!(owners.set(owner(5, 4)), Some(EngineBlockHash(1)));
        let slots: Vec<u32> = owners.as_slice().iter().map(|o| o.slot).collect();
        assert_eq!(slots, vec![2, 5, 9]);
        assert_eq!(owners.remove(7), None);
        assert_eq!(owners.remove(2), Some(owner(2, 2)));
        assert_eq!(owners.remove(9), Some(owner(9, 3)));
        assert!(matches!(owners, Owners::One(_)));
    }

    #[test]
    fn eviction_order_is_oldest_leaf_first_and_parents_rejoin_by_age() {
        let mut tree = Tree::default();
        let a = tree.child_or_insert(ROOT, LocalBlockHash(1), 1);
        tree.set_owner(a, owner(0, 1));
        let b = tree.child_or_insert(a, LocalBlockHash(2), 2);
        tree.set_owner(b, owner(0, 2));
        let c = tree.child_or_insert(ROOT, LocalBlockHash(3), 3);
        tree.set_owner(c, owner(0, 3));
        tree.check();
        assert_eq!(tree.oldest_leaf(), Some(b), "a has a child, so b is the oldest leaf");
        tree.take_owners(b);
        tree.release(b);
        tree.check();
        // a (used at 1) is older than c (3), so it goes first, not last.
        assert_eq!(tree.oldest_leaf(), Some(a));
        tree.touch(a, 4);
        assert_eq!(tree.oldest_leaf(), Some(c));
    }

    #[test]
    fn releasing_frees_ownerless_ancestors_only() {
        let mut tree = Tree::default();
        let a = tree.child_or_insert(ROOT, LocalBlockHash(1), 1);
        let b = tree.child_or_insert(a, LocalBlockHash(2), 1);
        tree.set_owner(b, owner(0, 2));
        tree.release(a);
        assert_eq!(tree.len(), 2, "a still has a child");
        tree.remove_owner(b, 0);
        tree.release(b);
        assert_eq!(tree.len(), 0);
        tree.check();
    }
}

//! Router-side block hashing: the ids the router's index is keyed by.
//!
//! The router never trusts the engine's own block hashes for matching (they
//! may be sha256 with a per-process random seed); it recomputes its own from
//! token ids, the same way for a request's prompt and for a stored block.
//! This module only hashes; it must not know about workers or events.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The seed of every block hash without a salt (Dynamo's value, so that both
/// routers agree on the same tokens).
pub const DEFAULT_SEED: u64 = 1337;

/// The router's hash of one full block of tokens, position-independent: the
/// same tokens give the same hash wherever they appear. Position comes from
/// the index (a path in a tree) or from [`SequenceHash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalBlockHash(pub u64);

/// A position-aware hash of a prefix of blocks: `seq[0] = local[0]`,
/// `seq[i] = combine(seq[i-1], local[i])`. Equal sequence hashes mean equal
/// prefixes, so a flat map of them answers prefix questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceHash(pub u64);

/// The seed for a salt (a LoRA name or a cache namespace): `None` keeps
/// [`DEFAULT_SEED`]; `Some(salt)` gives `xxh3_64_with_seed(salt, 1337)`, so
/// blocks of different adapters never match each other.
pub fn seed_for(salt: Option<&str>) -> u64 {
    match salt {
        None => DEFAULT_SEED,
        Some(salt) => xxh3_64_with_seed(salt.as_bytes(), DEFAULT_SEED),
    }
}

/// Hashes one block: `xxh3_64_with_seed(little-endian bytes of the u32 token
/// ids, seed)`. The caller passes exactly one block's tokens.
pub fn hash_block(tokens: &[u32], seed: u64) -> LocalBlockHash {
    // Blocks are small (16–128 tokens), so the bytes go through a stack
    // buffer; the rare larger block falls back to the heap.
    const STACK_TOKENS: usize = 256;
    if tokens.len() <= STACK_TOKENS {
        let mut buf = [0u8; STACK_TOKENS * 4];
        for (chunk, token) in buf.chunks_exact_mut(4).zip(tokens) {
            chunk.copy_from_slice(&token.to_le_bytes());
        }
        LocalBlockHash(xxh3_64_with_seed(&buf[..tokens.len() * 4], seed))
    } else {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        LocalBlockHash(xxh3_64_with_seed(&bytes, seed))
    }
}

/// Chains a block onto a prefix: `xxh3_64_with_seed(le(parent) ‖ le(local), 1337)`.
pub fn combine(parent: SequenceHash, local: LocalBlockHash) -> SequenceHash {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&parent.0.to_le_bytes());
    bytes[8..].copy_from_slice(&local.0.to_le_bytes());
    SequenceHash(xxh3_64_with_seed(&bytes, DEFAULT_SEED))
}

/// The sequence hashes of a run of local hashes (see [`SequenceHash`]).
pub fn sequence_hashes(locals: &[LocalBlockHash]) -> Vec<SequenceHash> {
    let mut out = Vec::with_capacity(locals.len());
    let mut iter = locals.iter();
    if let Some(first) = iter.next() {
        let mut current = SequenceHash(first.0);
        out.push(current);
        for local in iter {
            current = combine(current, *local);
            out.push(current);
        }
    }
    out
}

/// Hashes prompts into blocks for one block size and salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    block_size: usize,
    seed: u64,
}

impl BlockHasher {
    /// A hasher for `block_size` tokens per block (must equal the engines'),
    /// salted by `salt` (see [`seed_for`]). Returns `None` for a block size of 0.
    pub fn new(block_size: u32, salt: Option<&str>) -> Option<Self> {
        (block_size > 0).then(|| Self {
            block_size: block_size as usize,
            seed: seed_for(salt),
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    /// The local hashes of every full block of `tokens`; a trailing partial
    /// block is not hashed (engines cache only full blocks).
    pub fn local_hashes(&self, tokens: &[u32]) -> Vec<LocalBlockHash> {
        tokens
            .chunks_exact(self.block_size)
            .map(|block| hash_block(block, self.seed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_matches_dynamo() {
        let hasher = BlockHasher::new(4, None).unwrap();
        assert_eq!(
            hasher.local_hashes(&[1, 2, 3, 4]),
            vec![LocalBlockHash(14643705804678351452)]
        );
    }

    #[test]
    fn the_known_answer_check_fails_for_other_tokens() {
        let hasher = BlockHasher::new(4, None).unwrap();
        assert_ne!(
            hasher.local_hashes(&[1, 2, 3, 5]),
            vec![LocalBlockHash(14643705804678351452)]
        );
    }

    #[test]
    fn only_full_blocks_are_hashed() {
        let hasher = BlockHasher::new(4, None).unwrap();
        assert_eq!(hasher.local_hashes(&[1, 2, 3]), vec![]);
        let two = hasher.local_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(two.len(), 2);
        assert_eq!(two[0], LocalBlockHash(14643705804678351452));
    }

    #[test]
    fn a_salt_changes_every_hash() {
        let plain = BlockHasher::new(4, None).unwrap();
        let lora = BlockHasher::new(4, Some("adapter-a")).unwrap();
        let other = BlockHasher::new(4, Some("adapter-b")).unwrap();
        let tokens = [1, 2, 3, 4];
        assert_ne!(plain.local_hashes(&tokens), lora.local_hashes(&tokens));
        assert_ne!(lora.local_hashes(&tokens), other.local_hashes(&tokens));
    }

    #[test]
    fn large_blocks_hash_like_small_ones_would() {
        let tokens: Vec<u32> = (0..300).collect();
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(hash_block(&tokens, 7).0, xxh3_64_with_seed(&bytes, 7));
    }

    #[test]
    fn sequence_hashes_depend_on_position() {
        let a = LocalBlockHash(1);
        let b = LocalBlockHash(2);
        let ab = sequence_hashes(&[a, b]);
        let ba = sequence_hashes(&[b, a]);
        assert_eq!(ab[0], SequenceHash(1));
        assert_ne!(ab[1], ba[1]);
        assert_eq!(sequence_hashes(&[]), vec![]);
    }

    #[test]
    fn block_size_zero_is_refused() {
        assert!(BlockHasher::new(0, None).is_none());
    }
}

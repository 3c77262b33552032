//! Small, stable hash functions shared by the fake tokenizer and the KV block hashes.
//!
//! Written out by hand rather than using `std::hash::DefaultHasher`, whose output is allowed to change
//! between Rust releases: token ids and block hashes should stay the same across builds so that logs,
//! traces and test expectations are comparable.

/// FNV-1a over bytes: tiny and good enough to spread words over the token id space.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The SplitMix64 finaliser: turns structured input (counters, small ids) into well-mixed 64 bits.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Folds `value` into the running hash `state`; order matters, so chains of calls hash sequences.
pub(crate) fn combine(state: u64, value: u64) -> u64 {
    mix(state.rotate_left(5) ^ value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vector() {
        // From the FNV reference test suite: FNV-1a 64 of "a".
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn combine_depends_on_order() {
        assert_ne!(combine(combine(0, 1), 2), combine(combine(0, 2), 1));
    }
}

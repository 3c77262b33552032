//! How many leading blocks of a request each worker already holds: the
//! answer of every index, and an input of the selection.

use crate::worker::WorkerId;

/// Per worker, the length in blocks of the longest cached prefix of one
/// request. Workers with no overlap are absent (and read as 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlaps {
    /// Sorted by worker, one entry per worker, every value > 0.
    entries: Vec<(WorkerId, u32)>,
}

impl Overlaps {
    /// Builds from pairs in any order; zero entries are dropped and a worker
    /// listed twice keeps its larger value.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (WorkerId, u32)>) -> Self {
        let mut entries: Vec<(WorkerId, u32)> = pairs.into_iter().filter(|(_, n)| *n > 0).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        entries.dedup_by_key(|(worker, _)| *worker);
        Overlaps { entries }
    }

    /// The overlap of `worker`, 0 when it holds none of the prefix.
    pub fn get(&self, worker: WorkerId) -> u32 {
        self.entries
            .binary_search_by_key(&worker, |(w, _)| *w)
            .map_or(0, |i| self.entries[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (WorkerId, u32)> + '_ {
        self.entries.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Per worker the larger of the two: how predicted routes (a short-lived
    /// side index) top up what the primary index knows.
    pub fn max(&self, other: &Overlaps) -> Overlaps {
        Overlaps::from_pairs(self.iter().chain(other.iter()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_keeps_the_larger_overlap_per_worker() {
        let a = Overlaps::from_pairs([(WorkerId::from(1), 3), (WorkerId::from(2), 1)]);
        let b = Overlaps::from_pairs([(WorkerId::from(2), 5), (WorkerId::from(3), 0)]);
        let both = a.max(&b);
        assert_eq!(both.get(WorkerId::from(1)), 3);
        assert_eq!(both.get(WorkerId::from(2)), 5);
        assert_eq!(both.get(WorkerId::from(3)), 0);
        assert_eq!(both.iter().count(), 2);
    }
}

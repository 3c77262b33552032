//! Who holds a cache: the identity the indexes and the selection key by.

use std::fmt;

/// One cache: an engine instance and, under data parallelism, one of its
/// ranks (each rank has its own KV cache and its own event stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    pub instance: u64,
    pub dp_rank: u32,
}

impl WorkerId {
    pub fn new(instance: u64, dp_rank: u32) -> Self {
        WorkerId { instance, dp_rank }
    }
}

impl From<u64> for WorkerId {
    /// An instance without data parallelism (rank 0).
    fn from(instance: u64) -> Self {
        WorkerId::new(instance, 0)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.instance)?;
        if self.dp_rank != 0 {
            write!(f, "/{}", self.dp_rank)?;
        }
        Ok(())
    }
}

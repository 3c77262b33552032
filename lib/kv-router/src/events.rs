//! The KV events engines publish (vLLM's wire format), as plain data.
//!
//! [`decode`] turns a msgpack payload into an [`EventBatch`]; [`encode`]
//! writes one exactly as vLLM does (for the mocker). Transport (ZMQ frames,
//! sequence numbers, replay) belongs to the caller, not here.

pub mod decode;
pub mod encode;
mod msgpack;
#[cfg(test)]
mod tests;

/// An engine's id for a block: opaque, used only for parent links and
/// removals, never for matching (engines may seed their hash randomly).
///
/// vLLM sends either an int (the low 64 bits of its hash, read big-endian)
/// or the raw hash bytes. Bytes are reduced the same way — the last 8 bytes
/// read big-endian, shorter inputs zero-extended — so one block has one id
/// whichever form the engine chose. Negative ints keep their two's
/// complement bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineBlockHash(pub u64);

impl EngineBlockHash {
    /// The id of a hash sent as raw bytes (see the type's documentation).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        EngineBlockHash(tail.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

/// One msgpack payload: the events an engine published in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// The engine's wall clock, seconds since the epoch.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// The data-parallel rank that produced the batch; `None` when absent.
    pub data_parallel_rank: Option<i64>,
}

/// One change to an engine's prefix cache.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// Every block of the engine (of this rank) is gone.
    AllBlocksCleared,
    /// An event type this decoder does not know (a newer engine); kept so
    /// the caller can count it, ignored by the index.
    Unknown {
        tag: String,
    },
}

/// Full blocks the engine now holds, each the child of the previous; the
/// first is the child of `parent_block_hash` (or a root when `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<EngineBlockHash>,
    pub parent_block_hash: Option<EngineBlockHash>,
    /// Every stored block's tokens, concatenated: `block_hashes.len() × block_size` ids.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    /// The storage tier ("GPU", "CPU", …) when the engine says.
    pub medium: Option<String>,
    pub lora_name: Option<String>,
}

/// Blocks the engine evicted, by engine hash.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<EngineBlockHash>,
    pub medium: Option<String>,
}

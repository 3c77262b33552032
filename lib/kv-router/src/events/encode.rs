//! Encoding [`EventBatch`]es exactly as vLLM publishes them (array form,
//! hashes as ints), so the mocker's events look like a real engine's. Must
//! not invent fields vLLM does not send.

use super::msgpack::Writer;
use super::{EventBatch, KvEvent};

/// The msgpack payload of `batch`:
/// `[ts, [event…], data_parallel_rank|nil]`, each event in the array form
/// `["BlockStored", hashes, parent|nil, token_ids, block_size, lora_id|nil,
/// medium|nil, lora_name|nil, extra_keys(nil)]`, `["BlockRemoved", hashes,
/// medium|nil]`, `["AllBlocksCleared"]`.
pub fn encode_batch(batch: &EventBatch) -> Vec<u8> {
    let mut w = Writer::default();
    w.array_len(3);
    w.f64(batch.ts);
    w.array_len(batch.events.len());
    for event in &batch.events {
        encode_event(&mut w, event);
    }
    optional(&mut w, batch.data_parallel_rank, Writer::int);
    w.buf
}

fn encode_event(w: &mut Writer, event: &KvEvent) {
    match event {
        KvEvent::BlockStored(stored) => {
            w.array_len(9);
            w.str("BlockStored");
            w.array_len(stored.block_hashes.len());
            stored.block_hashes.iter().for_each(|h| w.uint(h.0));
            optional(w, stored.parent_block_hash.map(|h| h.0), Writer::uint);
            w.array_len(stored.token_ids.len());
            stored.token_ids.iter().for_each(|t| w.uint(u64::from(*t)));
            w.uint(u64::from(stored.block_size));
            optional(w, stored.lora_id, Writer::int);
            optional(w, stored.medium.as_deref(), Writer::str);
            optional(w, stored.lora_name.as_deref(), Writer::str);
            w.nil(); // extra_keys: multimodal inputs, which the mocker has none of
        }
        KvEvent::BlockRemoved(removed) => {
            w.array_len(3);
            w.str("BlockRemoved");
            w.array_len(removed.block_hashes.len());
            removed.block_hashes.iter().for_each(|h| w.uint(h.0));
            optional(w, removed.medium.as_deref(), Writer::str);
        }
        KvEvent::AllBlocksCleared => {
            w.array_len(1);
            w.str("AllBlocksCleared");
        }
        KvEvent::Unknown { tag } => {
            w.array_len(1);
            w.str(tag);
        }
    }
}

fn optional<T>(w: &mut Writer, value: Option<T>, write: impl FnOnce(&mut Writer, T)) {
    match value {
        Some(v) => write(w, v),
        None => w.nil(),
    }
}

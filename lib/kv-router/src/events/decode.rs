//! Decoding vLLM's KV event payloads (msgpack) into [`EventBatch`]es.
//!
//! Accepts both encodings vLLM has shipped: the *array* form of released
//! versions (`[ts, [event…], dp_rank?]`, each event `["BlockStored", …]`
//! decoded by position) and the *map* form of recent main
//! (`{"type": "BlockStored", "block_hashes": …}`). Fields are appended over
//! versions, so unknown trailing elements and unknown keys are skipped, and
//! an event type this decoder does not know becomes [`KvEvent::Unknown`]
//! instead of failing the whole batch. Malformed input is a [`DecodeError`],
//! never a panic. Must not interpret the events (that is the index's job).

use super::msgpack::{Int, Kind, Reader};
use super::{BlockRemoved, BlockStored, EngineBlockHash, EventBatch, KvEvent};

/// Why a payload is not a valid event batch; offsets are byte positions in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload ends early at byte {offset}")]
    Truncated { offset: usize },
    #[error("expected {expected} at byte {offset}, found {found}")]
    UnexpectedType {
        offset: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("string at byte {offset} is not UTF-8")]
    InvalidUtf8 {
        offset: usize,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("values nested too deeply at byte {offset}")]
    TooDeep { offset: usize },
    #[error("{event} has no {field}")]
    MissingField { event: &'static str, field: &'static str },
    #[error("{field} at byte {offset} is out of range")]
    OutOfRange { field: &'static str, offset: usize },
    #[error("{count} bytes left after the batch at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },
}

impl DecodeError {
    fn missing(event: &'static str, field: &'static str) -> Self {
        DecodeError::MissingField { event, field }
    }
}

/// Decodes one msgpack payload (the third ZMQ frame) into a batch.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut r = Reader::new(payload);
    let batch = match r.peek_kind()? {
        Kind::Map => batch_from_map(&mut r)?,
        _ => batch_from_array(&mut r)?,
    };
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes {
            offset: r.offset(),
            count: r.remaining(),
        });
    }
    Ok(batch)
}

fn batch_from_array(r: &mut Reader<'_>) -> Result<EventBatch, DecodeError> {
    let len = r.array_len()?;
    if len < 2 {
        return Err(DecodeError::missing("batch", if len == 0 { "ts" } else { "events" }));
    }
    let ts = r.float()?;
    let events = events(r)?;
    let data_parallel_rank = if len > 2 {
        optional_i64(r, "data_parallel_rank")?
    } else {
        None
    };
    skip_n(r, len.saturating_sub(3))?;
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

fn batch_from_map(r: &mut Reader<'_>) -> Result<EventBatch, DecodeError> {
    let (mut ts, mut events_seen, mut data_parallel_rank) = (None, None, None);
    for _ in 0..r.map_len()? {
        match r.str()? {
            "ts" => ts = Some(r.float()?),
            "events" => events_seen = Some(events(r)?),
            "data_parallel_rank" => data_parallel_rank = optional_i64(r, "data_parallel_rank")?,
            _ => r.skip()?,
        }
    }
    Ok(EventBatch {
        ts: ts.ok_or(DecodeError::missing("batch", "ts"))?,
        events: events_seen.ok_or(DecodeError::missing("batch", "events"))?,
        data_parallel_rank,
    })
}

fn events(r: &mut Reader<'_>) -> Result<Vec<KvEvent>, DecodeError> {
    let len = r.array_len()?;
    let mut out = Vec::with_capacity(len.min(r.remaining()));
    for _ in 0..len {
        out.push(match r.peek_kind()? {
            Kind::Map => event_from_map(r)?,
            _ => event_from_array(r)?,
        });
    }
    Ok(out)
}

/// `["BlockStored", hashes, parent, tokens, block_size, lora_id?, medium?, lora_name?, extra_keys?, …]`,
/// `["BlockRemoved", hashes, medium?, …]`, `["AllBlocksCleared", …]`.
fn event_from_array(r: &mut Reader<'_>) -> Result<KvEvent, DecodeError> {
    let len = r.array_len()?;
    if len == 0 {
        return Err(DecodeError::missing("event", "type"));
    }
    let tag = r.str()?;
    let mut left = len - 1;
    // Reads the next positional field when the array still has one.
    macro_rules! next {
        ($read:expr) => {
            if left > 0 {
                left -= 1;
                Some($read)
            } else {
                None
            }
        };
    }
    let event = match tag {
        "BlockStored" => {
            const E: &str = "BlockStored";
            let block_hashes = next!(hashes(r)?).ok_or(DecodeError::missing(E, "block_hashes"))?;
            let parent_block_hash = next!(optional_hash(r)?).ok_or(DecodeError::missing(E, "parent_block_hash"))?;
            let token_ids = next!(tokens(r)?).ok_or(DecodeError::missing(E, "token_ids"))?;
            let block_size = next!(block_size(r)?).ok_or(DecodeError::missing(E, "block_size"))?;
            let lora_id = next!(optional_i64(r, "lora_id")?).flatten();
            let medium = next!(optional_string(r)?).flatten();
            let lora_name = next!(optional_string(r)?).flatten();
            KvEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
            })
        }
        "BlockRemoved" => {
            let block_hashes = next!(hashes(r)?).ok_or(DecodeError::missing("BlockRemoved", "block_hashes"))?;
            let medium = next!(optional_string(r)?).flatten();
            KvEvent::BlockRemoved(BlockRemoved { block_hashes, medium })
        }
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        other => KvEvent::Unknown { tag: other.to_owned() },
    };
    skip_n(r, left)?; // extra_keys and fields of later versions
    Ok(event)
}

/// The same events with named fields; `type` may come anywhere in the map.
fn event_from_map(r: &mut Reader<'_>) -> Result<KvEvent, DecodeError> {
    let mut tag = None;
    let mut block_hashes = None;
    let mut parent_block_hash = None;
    let mut token_ids = None;
    let mut block_size_seen = None;
    let (mut lora_id, mut medium, mut lora_name) = (None, None, None);
    for _ in 0..r.map_len()? {
        match r.str()? {
            "type" => tag = Some(r.str()?),
            "block_hashes" => block_hashes = Some(hashes(r)?),
            "parent_block_hash" => parent_block_hash = optional_hash(r)?,
            "token_ids" => token_ids = Some(tokens(r)?),
            "block_size" => block_size_seen = Some(block_size(r)?),
            "lora_id" => lora_id = optional_i64(r, "lora_id")?,
            "medium" => medium = optional_string(r)?,
            "lora_name" => lora_name = optional_string(r)?,
            _ => r.skip()?,
        }
    }
    Ok(match tag.ok_or(DecodeError::missing("event", "type"))? {
        "BlockStored" => {
            const E: &str = "BlockStored";
            KvEvent::BlockStored(BlockStored {
                block_hashes: block_hashes.ok_or(DecodeError::missing(E, "block_hashes"))?,
                parent_block_hash,
                token_ids: token_ids.ok_or(DecodeError::missing(E, "token_ids"))?,
                block_size: block_size_seen.ok_or(DecodeError::missing(E, "block_size"))?,
                lora_id,
                medium,
                lora_name,
            })
        }
        "BlockRemoved" => KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: block_hashes.ok_or(DecodeError::missing("BlockRemoved", "block_hashes"))?,
            medium,
        }),
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        other => KvEvent::Unknown { tag: other.to_owned() },
    })
}

fn skip_n(r: &mut Reader<'_>, n: usize) -> Result<(), DecodeError> {
    (0..n).try_for_each(|_| r.skip())
}

/// An engine hash: an int (unsigned, or signed kept as its bits) or raw bytes.
fn hash(r: &mut Reader<'_>) -> Result<EngineBlockHash, DecodeError> {
    match r.peek_kind()? {
        Kind::Bin => Ok(EngineBlockHash::from_bytes(r.bin()?)),
        _ => Ok(EngineBlockHash(match r.int()? {
            Int::U(u) => u,
            Int::I(i) => i as u64,
        })),
    }
}

fn optional_hash(r: &mut Reader<'_>) -> Result<Option<EngineBlockHash>, DecodeError> {
    if r.nil()? { Ok(None) } else { hash(r).map(Some) }
}

fn hashes(r: &mut Reader<'_>) -> Result<Vec<EngineBlockHash>, DecodeError> {
    let len = r.array_len()?;
    let mut out = Vec::with_capacity(len.min(r.remaining()));
    for _ in 0..len {
        out.push(hash(r)?);
    }
    Ok(out)
}

fn tokens(r: &mut Reader<'_>) -> Result<Vec<u32>, DecodeError> {
    let len = r.array_len()?;
    let mut out = Vec::with_capacity(len.min(r.remaining()));
    for _ in 0..len {
        let at = r.offset();
        let token = match r.int()? {
            Int::U(u) => u32::try_from(u).ok(),
            Int::I(_) => None,
        };
        out.push(token.ok_or(DecodeError::OutOfRange {
            field: "token_ids",
            offset: at,
        })?);
    }
    Ok(out)
}

fn block_size(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    let at = r.offset();
    match r.int()? {
        Int::U(u) if u > 0 => u32::try_from(u).map_err(|_| DecodeError::OutOfRange {
            field: "block_size",
            offset: at,
        }),
        _ => Err(DecodeError::OutOfRange {
            field: "block_size",
            offset: at,
        }),
    }
}

fn optional_i64(r: &mut Reader<'_>, field: &'static str) -> Result<Option<i64>, DecodeError> {
    if r.nil()? {
        return Ok(None);
    }
    let at = r.offset();
    match r.int()? {
        Int::U(u) => i64::try_from(u)
            .map(Some)
            .map_err(|_| DecodeError::OutOfRange { field, offset: at }),
        Int::I(i) => Ok(Some(i)),
    }
}

fn optional_string(r: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    if r.nil()? {
        Ok(None)
    } else {
        Ok(Some(r.str()?.to_owned()))
    }
}

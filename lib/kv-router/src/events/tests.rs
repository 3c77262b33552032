//! Golden bytes written by hand from vLLM's documented layout (literal hex,
//! or `rmp` encoding calls), malformed inputs, and round trips.

use super::decode::{DecodeError, decode_batch};
use super::encode::encode_batch;
use super::*;
use proptest::prelude::*;

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, block_size: u32) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: hashes.iter().map(|h| EngineBlockHash(*h)).collect(),
        parent_block_hash: parent.map(EngineBlockHash),
        token_ids: tokens,
        block_size,
        lora_id: None,
        medium: None,
        lora_name: None,
    })
}

/// `[1.5, [["BlockStored", [10, 11], nil, [1..8], 4, nil, "GPU", nil, nil, "future"]], 0]`
const ARRAY_FORM_GOLDEN: &str = "93 cb3ff8000000000000 91
    9a ab426c6f636b53746f726564 92 0a 0b c0 98 0102030405060708 04 c0 a3475055 c0 c0 a6667574757265
    00";

#[test]
fn array_form_golden_bytes_decode_by_position_and_ignore_trailing_fields() {
    let batch = decode_batch(&hex(ARRAY_FORM_GOLDEN)).unwrap();
    let KvEvent::BlockStored(mut expected) = stored(&[10, 11], None, (1..=8).collect(), 4) else {
        unreachable!()
    };
    expected.medium = Some("GPU".into());
    assert_eq!(
        batch,
        EventBatch {
            ts: 1.5,
            events: vec![KvEvent::BlockStored(expected)],
            data_parallel_rank: Some(0),
        }
    );
}

#[test]
fn released_vllm_short_events_and_a_batch_without_rank_decode() {
    // [2.0, [["BlockStored", [-1], 7, [9, 9], 2], ["BlockRemoved", [7]], ["AllBlocksCleared"]]]
    let bytes = hex("92 cb4000000000000000 93
         95 ab426c6f636b53746f726564 91 ff 07 92 09 09 02
         92 ac426c6f636b52656d6f766564 91 07
         91 b0416c6c426c6f636b73436c6561726564");
    let batch = decode_batch(&bytes).unwrap();
    assert_eq!(batch.data_parallel_rank, None);
    assert_eq!(
        batch.events,
        vec![
            stored(&[u64::MAX], Some(7), vec![9, 9], 2),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineBlockHash(7)],
                medium: None
            }),
            KvEvent::AllBlocksCleared,
        ]
    );
}

#[test]
fn map_form_built_with_rmp_decodes_with_byte_hashes_and_keys_in_any_order() {
    use rmp::encode::*;
    let mut b = Vec::new();
    write_map_len(&mut b, 3).unwrap();
    write_str(&mut b, "events").unwrap();
    write_array_len(&mut b, 3).unwrap();
    // BlockStored with unknown key and `type` last
    write_map_len(&mut b, 7).unwrap();
    write_str(&mut b, "block_hashes").unwrap();
    write_array_len(&mut b, 1).unwrap();
    write_bin(
        &mut b,
        &[0xaa; 24]
            .iter()
            .chain(&[0, 0, 0, 0, 0, 0, 1, 2])
            .copied()
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    write_str(&mut b, "parent_block_hash").unwrap();
    write_nil(&mut b).unwrap();
    write_str(&mut b, "token_ids").unwrap();
    write_array_len(&mut b, 2).unwrap();
    write_uint(&mut b, 70_000).unwrap();
    write_uint(&mut b, 3).unwrap();
    write_str(&mut b, "block_size").unwrap();
    write_uint(&mut b, 2).unwrap();
    write_str(&mut b, "lora_name").unwrap();
    write_str(&mut b, "adapter").unwrap();
    write_str(&mut b, "group_idx").unwrap();
    write_array_len(&mut b, 1).unwrap();
    write_uint(&mut b, 0).unwrap();
    write_str(&mut b, "type").unwrap();
    write_str(&mut b, "BlockStored").unwrap();
    // BlockRemoved
    write_map_len(&mut b, 3).unwrap();
    write_str(&mut b, "type").unwrap();
    write_str(&mut b, "BlockRemoved").unwrap();
    write_str(&mut b, "block_hashes").unwrap();
    write_array_len(&mut b, 1).unwrap();
    write_sint(&mut b, -2).unwrap();
    write_str(&mut b, "medium").unwrap();
    write_str(&mut b, "CPU").unwrap();
    // AllBlocksCleared
    write_map_len(&mut b, 1).unwrap();
    write_str(&mut b, "type").unwrap();
    write_str(&mut b, "AllBlocksCleared").unwrap();
    write_str(&mut b, "ts").unwrap();
    write_f64(&mut b, 3.25).unwrap();
    write_str(&mut b, "data_parallel_rank").unwrap();
    write_uint(&mut b, 3).unwrap();

    let batch = decode_batch(&b).unwrap();
    assert_eq!(batch.ts, 3.25);
    assert_eq!(batch.data_parallel_rank, Some(3));
    let KvEvent::BlockStored(mut expected) = stored(&[0x0102], None, vec![70_000, 3], 2) else {
        unreachable!()
    };
    expected.lora_name = Some("adapter".into());
    assert_eq!(batch.events[0], KvEvent::BlockStored(expected));
    assert_eq!(
        batch.events[1],
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineBlockHash((-2i64) as u64)],
            medium: Some("CPU".into())
        })
    );
    assert_eq!(batch.events[2], KvEvent::AllBlocksCleared);
}

#[test]
fn unknown_event_types_are_kept_not_fatal() {
    // [0, [["KVCacheUsage", 5]]]
    let batch = decode_batch(&hex("92 00 91 92 ac4b5643616368655573616765 05")).unwrap();
    assert_eq!(
        batch.events,
        vec![KvEvent::Unknown {
            tag: "KVCacheUsage".into()
        }]
    );
}

#[test]
fn malformed_payloads_are_typed_errors() {
    let golden = hex(ARRAY_FORM_GOLDEN);
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (vec![], DecodeError::Truncated { offset: 0 }),
        (
            golden[..golden.len() - 1].to_vec(),
            DecodeError::Truncated {
                offset: golden.len() - 1,
            },
        ),
        (
            [golden.as_slice(), &[0xc0]].concat(),
            DecodeError::TrailingBytes {
                offset: golden.len(),
                count: 1,
            },
        ),
        (
            hex("91 00"),
            DecodeError::MissingField {
                event: "batch",
                field: "events",
            },
        ),
        (
            // a token id that is a string
            hex("92 00 91 95 ab426c6f636b53746f726564 90 c0 91 a161 01"),
            DecodeError::UnexpectedType {
                offset: 19,
                expected: "int",
                found: "str",
            },
        ),
        (
            // a negative token id
            hex("92 00 91 95 ab426c6f636b53746f726564 90 c0 91 ff 01"),
            DecodeError::OutOfRange {
                field: "token_ids",
                offset: 19,
            },
        ),
        (
            // block size 0
            hex("92 00 91 95 ab426c6f636b53746f726564 90 c0 90 00"),
            DecodeError::OutOfRange {
                field: "block_size",
                offset: 19,
            },
        ),
        (
            // BlockStored without block_size
            hex("92 00 91 94 ab426c6f636b53746f726564 90 c0 90"),
            DecodeError::MissingField {
                event: "BlockStored",
                field: "block_size",
            },
        ),
        (
            // map event without type
            hex("92 00 91 80"),
            DecodeError::MissingField {
                event: "event",
                field: "type",
            },
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(decode_batch(&bytes).unwrap_err(), expected, "bytes {bytes:02x?}");
    }
    assert!(matches!(
        decode_batch(&hex("92 00 91 91 a2ff00")),
        Err(DecodeError::InvalidUtf8 { offset: 4, .. })
    ));
}

#[test]
fn the_encoder_writes_the_documented_array_form() {
    let batch = EventBatch {
        ts: 1.5,
        events: vec![stored(&[10], Some(9), vec![1, 2], 2)],
        data_parallel_rank: None,
    };
    let expected = hex("93 cb3ff8000000000000 91 99 ab426c6f636b53746f726564 91 0a 09 92 01 02 02 c0 c0 c0 c0 c0");
    assert_eq!(encode_batch(&batch), expected);
}

fn arb_hash() -> impl Strategy<Value = EngineBlockHash> {
    any::<u64>().prop_map(EngineBlockHash)
}

fn arb_event() -> impl Strategy<Value = KvEvent> {
    let text = proptest::option::of("[a-zA-Z0-9_-]{0,40}");
    prop_oneof![
        (
            proptest::collection::vec(arb_hash(), 0..20),
            proptest::option::of(arb_hash()),
            proptest::collection::vec(any::<u32>(), 0..40),
            1u32..=u32::MAX,
            proptest::option::of(any::<i64>()),
            text.clone(),
            text.clone(),
        )
            .prop_map(
                |(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name)| {
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
            ),
        (proptest::collection::vec(arb_hash(), 0..20), text)
            .prop_map(|(block_hashes, medium)| KvEvent::BlockRemoved(BlockRemoved { block_hashes, medium })),
        Just(KvEvent::AllBlocksCleared),
    ]
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn corrupted_valid_payloads_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut bytes = hex(ARRAY_FORM_GOLDEN);
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let _ = decode_batch(&bytes);
        let _ = decode_batch(&bytes[..cut % bytes.len()]);
    }

    #[test]
    fn encoded_batches_decode_to_themselves(
        ts in -1e12f64..1e12,
        events in proptest::collection::vec(arb_event(), 0..8),
        data_parallel_rank in proptest::option::of(any::<i64>()),
    ) {
        let batch = EventBatch { ts, events, data_parallel_rank };
        prop_assert_eq!(decode_batch(&encode_batch(&batch)).unwrap(), batch);
    }
}

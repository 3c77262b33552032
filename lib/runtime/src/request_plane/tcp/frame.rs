//! The TCP request plane's wire format, with no I/O: frames, their payloads,
//! and a decoder that turns arbitrary bytes into frames or an error (never a
//! panic). The format is specified in `docs/protocol.md`.
//!
//! ```text
//! frame   = length:u32be  type:u8  stream_id:u64be  payload[length]
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before the payload: length (4), type (1), stream id (8).
pub(crate) const HEADER_LEN: usize = 13;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FrameType {
    /// Both ways, first on a connection: the sender's protocol version.
    Hello = 0x00,
    /// Caller → worker: open a stream with a request.
    Request = 0x01,
    /// Caller → worker: stop (graceful) or kill (now) the stream's request.
    Cancel = 0x02,
    /// Caller → worker: the caller consumed items; the worker may send more.
    Credit = 0x03,
    /// Worker → caller: one response item.
    Data = 0x11,
    /// Worker → caller: the stream completed normally.
    End = 0x12,
    /// Worker → caller: the stream failed; payload is the error.
    Error = 0x13,
}

impl FrameType {
    fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0x00 => Self::Hello,
            0x01 => Self::Request,
            0x02 => Self::Cancel,
            0x03 => Self::Credit,
            0x11 => Self::Data,
            0x12 => Self::End,
            0x13 => Self::Error,
            _ => return None,
        })
    }
}

/// One frame, header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) frame_type: FrameType,
    pub(crate) stream_id: u64,
    pub(crate) payload: Bytes,
}

impl Frame {
    pub(crate) fn new(frame_type: FrameType, stream_id: u64, payload: Bytes) -> Self {
        Self {
            frame_type,
            stream_id,
            payload,
        }
    }

    /// Appends the encoded frame to `buf`. The caller has checked the payload
    /// against the size limit.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(HEADER_LEN + self.payload.len());
        buf.put_u32(self.payload.len() as u32);
        buf.put_u8(self.frame_type as u8);
        buf.put_u64(self.stream_id);
        buf.put_slice(&self.payload);
    }
}

/// What the decoder found next in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decoded {
    Frame(Frame),
    /// A well-formed header announcing a payload over the size limit. The
    /// payload is skipped (never buffered); the connection stays usable and
    /// only this stream fails.
    Oversized {
        frame_type: FrameType,
        stream_id: u64,
        length: usize,
    },
}

/// The byte stream cannot be parsed; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {frame_type:?} payload: {reason}")]
    BadPayload {
        frame_type: FrameType,
        reason: &'static str,
    },
}

/// Incremental decoder: feed it the bytes read so far, take frames out.
#[derive(Debug)]
pub(crate) struct FrameDecoder {
    max_payload: usize,
    /// Bytes of an oversized payload still to be thrown away.
    skipping: usize,
}

impl FrameDecoder {
    pub(crate) fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            skipping: 0,
        }
    }

    /// The largest payload accepted (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub(crate) fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Takes the next frame out of `buf`, or `Ok(None)` when more bytes are needed.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        if self.skipping > 0 {
            let n = self.skipping.min(buf.len());
            buf.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let frame_type = FrameType::from_u8(buf[4]).ok_or(FrameError::UnknownType(buf[4]))?;
        let stream_id = u64::from_be_bytes(buf[5..HEADER_LEN].try_into().expect("8 bytes"));
        if length > self.max_payload {
            buf.advance(HEADER_LEN);
            let n = length.min(buf.len());
            buf.advance(n);
            self.skipping = length - n;
            return Ok(Some(Decoded::Oversized {
                frame_type,
                stream_id,
                length,
            }));
        }
        if buf.len() < HEADER_LEN + length {
            buf.reserve(HEADER_LEN + length - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(length).freeze();
        Ok(Some(Decoded::Frame(Frame::new(frame_type, stream_id, payload))))
    }
}

/// The payload of a [`FrameType::Request`] frame.
///
/// ```text
/// instance_id:u64be  window:u32be  endpoint_len:u16be  endpoint  request_id_len:u8  request_id  body
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHead {
    /// The instance the caller means to reach (guards against a reused address).
    pub(crate) instance_id: u64,
    /// Response items the worker may send before waiting for credit.
    pub(crate) window: u32,
    /// `namespace/component/endpoint`.
    pub(crate) endpoint: String,
    pub(crate) request_id: String,
    /// The msgpack-encoded request.
    pub(crate) body: Bytes,
}

impl RequestHead {
    pub(crate) fn encode(&self) -> Bytes {
        let endpoint = self.endpoint.as_bytes();
        let id = self.request_id.as_bytes();
        let mut buf = BytesMut::with_capacity(8 + 4 + 2 + endpoint.len() + 1 + id.len() + self.body.len());
        buf.put_u64(self.instance_id);
        buf.put_u32(self.window);
        buf.put_u16(endpoint.len() as u16);
        buf.put_slice(endpoint);
        buf.put_u8(id.len() as u8);
        buf.put_slice(id);
        buf.put_slice(&self.body);
        buf.freeze()
    }

    /// True when the fields fit their length prefixes.
    pub(crate) fn fits(endpoint: &str, request_id: &str) -> bool {
        endpoint.len() <= u16::MAX as usize && request_id.len() <= u8::MAX as usize
    }

    pub(crate) fn decode(mut payload: Bytes) -> Result<Self, FrameError> {
        let bad = |reason| FrameError::BadPayload {
            frame_type: FrameType::Request,
            reason,
        };
        if payload.len() < 14 {
            return Err(bad("shorter than its fixed fields"));
        }
        let instance_id = payload.get_u64();
        let window = payload.get_u32();
        let endpoint_len = payload.get_u16() as usize;
        if payload.len() < endpoint_len + 1 {
            return Err(bad("endpoint name runs past the end"));
        }
        let endpoint = String::from_utf8(payload.split_to(endpoint_len).to_vec())
            .map_err(|_| bad("endpoint name is not UTF-8"))?;
        let id_len = payload.get_u8() as usize;
        if payload.len() < id_len {
            return Err(bad("request id runs past the end"));
        }
        let request_id =
            String::from_utf8(payload.split_to(id_len).to_vec()).map_err(|_| bad("request id is not UTF-8"))?;
        Ok(Self {
            instance_id,
            window,
            endpoint,
            request_id,
            body: payload,
        })
    }
}

/// The payload of a [`FrameType::Cancel`] frame: one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelMode {
    Stop = 1,
    Kill = 2,
}

impl CancelMode {
    pub(crate) fn encode(self) -> Bytes {
        Bytes::copy_from_slice(&[self as u8])
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        match payload {
            [1] => Ok(Self::Stop),
            [2] => Ok(Self::Kill),
            _ => Err(FrameError::BadPayload {
                frame_type: FrameType::Cancel,
                reason: "expected one byte, 1 (stop) or 2 (kill)",
            }),
        }
    }
}

/// The version of this wire format, carried by each side's Hello frame. A
/// change that an older peer would misread gets a new number.
pub(crate) const PROTOCOL_VERSION: u16 = 1;

/// The first bytes of a Hello payload: marks the peer as a Switchyard request plane.
const HELLO_MAGIC: &[u8; 4] = b"SWYD";

/// The payload of a [`FrameType::Hello`] frame: magic, then the version.
pub(crate) fn encode_hello(version: u16) -> Bytes {
    let mut buf = BytesMut::with_capacity(6);
    buf.put_slice(HELLO_MAGIC);
    buf.put_u16(version);
    buf.freeze()
}

/// The version in a Hello payload. Bytes after the version are ignored, so a
/// later version may add fields.
pub(crate) fn decode_hello(payload: &[u8]) -> Result<u16, FrameError> {
    match payload {
        [m0, m1, m2, m3, hi, lo, ..] if [*m0, *m1, *m2, *m3] == *HELLO_MAGIC => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(FrameError::BadPayload {
            frame_type: FrameType::Hello,
            reason: "expected `SWYD` and a 2-byte version",
        }),
    }
}

/// The payload of a [`FrameType::Credit`] frame: items the caller consumed.
pub(crate) fn encode_credit(items: u32) -> Bytes {
    Bytes::copy_from_slice(&items.to_be_bytes())
}

pub(crate) fn decode_credit(payload: &[u8]) -> Result<u32, FrameError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| FrameError::BadPayload {
        frame_type: FrameType::Credit,
        reason: "expected a 4-byte count",
    })?;
    Ok(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 16;

    fn frame_type() -> impl Strategy<Value = FrameType> {
        prop_oneof![
            Just(FrameType::Hello),
            Just(FrameType::Request),
            Just(FrameType::Cancel),
            Just(FrameType::Credit),
            Just(FrameType::Data),
            Just(FrameType::End),
            Just(FrameType::Error),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        (
            frame_type(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(|(t, id, payload)| Frame::new(t, id, Bytes::from(payload)))
    }

    fn decode_all(decoder: &mut FrameDecoder, buf: &mut BytesMut) -> Result<Vec<Decoded>, FrameError> {
        let mut out = vec![];
        while let Some(decoded) = decoder.decode(buf)? {
            out.push(decoded);
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn frames_round_trip_whatever_the_read_boundaries(
            frames in proptest::collection::vec(frame(), 1..20),
            chunk in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire);
            }
            let mut decoder = FrameDecoder::new(MAX);
            let mut buf = BytesMut::new();
            let mut decoded = vec![];
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                decoded.extend(decode_all(&mut decoder, &mut buf).unwrap());
            }
            let expected: Vec<Decoded> = frames.into_iter().map(Decoded::Frame).collect();
            prop_assert_eq!(decoded, expected);
            prop_assert!(buf.is_empty());
        }

    }

    proptest! {
        // 10,000 random inputs per run (well under a second): the decoder
        // faces whatever a peer sends, so this one runs long.
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn arbitrary_bytes_give_frames_or_an_error_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 0usize..256,
        ) {
            let mut decoder = FrameDecoder::new(max);
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(frames) = decode_all(&mut decoder, &mut buf) {
                for decoded in frames {
                    if let Decoded::Frame(frame) = decoded {
                        // Payload parsers must not panic on anything either.
                        let _ = RequestHead::decode(frame.payload.clone());
                        let _ = CancelMode::decode(&frame.payload);
                        let _ = decode_credit(&frame.payload);
                    }
                }
            }
        }

        #[test]
        fn request_heads_round_trip(
            instance_id in any::<u64>(),
            window in any::<u32>(),
            endpoint in "[a-z0-9_/-]{0,80}",
            request_id in "[a-f0-9]{0,64}",
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let head = RequestHead { instance_id, window, endpoint, request_id, body: Bytes::from(body) };
            prop_assert_eq!(RequestHead::decode(head.encode()).unwrap(), head);
        }
    }

    #[test]
    fn oversized_payload_is_reported_once_and_skipped() {
        let mut wire = BytesMut::new();
        Frame::new(FrameType::Data, 9, Bytes::from(vec![7u8; 100])).encode(&mut wire);
        Frame::new(FrameType::End, 10, Bytes::new()).encode(&mut wire);
        let mut decoder = FrameDecoder::new(50);
        let mut buf = BytesMut::new();
        let mut seen = vec![];
        for piece in wire.chunks(7) {
            buf.extend_from_slice(piece);
            seen.extend(decode_all(&mut decoder, &mut buf).unwrap());
        }
        assert_eq!(
            seen,
            vec![
                Decoded::Oversized {
                    frame_type: FrameType::Data,
                    stream_id: 9,
                    length: 100
                },
                Decoded::Frame(Frame::new(FrameType::End, 10, Bytes::new())),
            ]
        );
    }

    #[test]
    fn unknown_frame_type_is_an_error() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0x7f, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(
            FrameDecoder::new(MAX).decode(&mut buf),
            Err(FrameError::UnknownType(0x7f))
        );
    }

    #[test]
    fn truncated_request_head_is_an_error() {
        let head = RequestHead {
            instance_id: 1,
            window: 8,
            endpoint: "ns/c/e".into(),
            request_id: "abc".into(),
            body: Bytes::new(),
        };
        let encoded = head.encode();
        for cut in 0..encoded.len() - 1 {
            assert!(
                RequestHead::decode(encoded.slice(..cut)).is_err(),
                "cut at {cut} decoded"
            );
        }
    }
}

//! vLLM's KV event framing, with no sockets: the live message
//! `[topic, seq u64 BE, payload]`, the replay request `["", start_seq u64 BE]`
//! and its replies `["", seq i64 BE, payload]` ending with `seq = -1` and an
//! empty payload. The payload itself is `switchyard_kv_router`'s business.

use crate::KvEventsError;

/// The replay terminator's sequence number, as vLLM writes it (-1, signed
/// big-endian: eight 0xff bytes).
pub(crate) const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// Why a message from a peer was skipped (logged, counted as malformed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("{found} frames, expected {expected}")]
    FrameCount { found: usize, expected: usize },
    #[error("sequence frame of {found} bytes, expected 8")]
    SeqLength { found: usize },
    #[error("replay reply without the empty delimiter frame")]
    NoDelimiter,
}

/// A live message: its sequence number and msgpack payload.
pub(crate) fn parse_live(frames: &[Vec<u8>]) -> Result<(u64, &[u8]), FrameError> {
    match frames {
        [_topic, seq, payload] => Ok((parse_seq(seq)?, payload)),
        _ => Err(FrameError::FrameCount {
            found: frames.len(),
            expected: 3,
        }),
    }
}

/// One reply to a replay request, as a DEALER receives it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplayReply<'a> {
    Batch { seq: u64, payload: &'a [u8] },
    End,
}

pub(crate) fn parse_replay_reply(frames: &[Vec<u8>]) -> Result<ReplayReply<'_>, FrameError> {
    match frames {
        [delimiter, seq, payload] => {
            if !delimiter.is_empty() {
                return Err(FrameError::NoDelimiter);
            }
            if seq.as_slice() == END_SEQ {
                return Ok(ReplayReply::End);
            }
            Ok(ReplayReply::Batch {
                seq: parse_seq(seq)?,
                payload,
            })
        }
        _ => Err(FrameError::FrameCount {
            found: frames.len(),
            expected: 3,
        }),
    }
}

/// A replay request as the ROUTER receives it: `[identity, "", start_seq]`.
/// Returns the identity and the start.
pub(crate) fn parse_replay_request(frames: &[Vec<u8>]) -> Result<(&[u8], u64), FrameError> {
    match frames {
        [identity, _delimiter, start] => Ok((identity, parse_seq(start)?)),
        _ => Err(FrameError::FrameCount {
            found: frames.len(),
            expected: 3,
        }),
    }
}

fn parse_seq(frame: &[u8]) -> Result<u64, FrameError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| FrameError::SeqLength { found: frame.len() })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Checks an endpoint's text before libzmq sees it (libzmq's own error,
/// EINVAL, says nothing about what is wrong, and the `zmq` crate panics on
/// a NUL byte).
pub(crate) fn check_endpoint(what: &'static str, endpoint: &str) -> Result<(), KvEventsError> {
    let invalid = |problem| KvEventsError::InvalidEndpoint {
        what,
        endpoint: endpoint.to_owned(),
        problem,
    };
    if endpoint.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    let Some((scheme, address)) = endpoint.split_once("://") else {
        return Err(invalid("no transport (\"tcp://\", \"ipc://\" or \"inproc://\")"));
    };
    if address.is_empty() {
        return Err(invalid("no address after the transport"));
    }
    match scheme {
        "tcp" => match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && (port == "*" || port.parse::<u16>().is_ok()) => Ok(()),
            _ => Err(invalid("no HOST:PORT after tcp://")),
        },
        "ipc" | "inproc" => Ok(()),
        _ => Err(invalid("unknown transport")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn a_live_message_is_topic_seq_payload() {
        let msg = frames(&[b"kv", &7u64.to_be_bytes(), b"\x90"]);
        assert_eq!(parse_live(&msg), Ok((7, &b"\x90"[..])));
        let two = frames(&[b"kv", &7u64.to_be_bytes()]);
        assert_eq!(parse_live(&two), Err(FrameError::FrameCount { found: 2, expected: 3 }));
        let short_seq = frames(&[b"kv", b"\x07", b"\x90"]);
        assert_eq!(parse_live(&short_seq), Err(FrameError::SeqLength { found: 1 }));
    }

    #[test]
    fn a_replay_ends_with_minus_one_and_an_empty_payload() {
        let batch = frames(&[b"", &3u64.to_be_bytes(), b"\x90"]);
        assert_eq!(
            parse_replay_reply(&batch),
            Ok(ReplayReply::Batch {
                seq: 3,
                payload: b"\x90"
            })
        );
        let end = frames(&[b"", &END_SEQ, b""]);
        assert_eq!(parse_replay_reply(&end), Ok(ReplayReply::End));
        assert_eq!(END_SEQ, [0xff; 8]);
        let no_delimiter = frames(&[b"x", &3u64.to_be_bytes(), b""]);
        assert_eq!(parse_replay_reply(&no_delimiter), Err(FrameError::NoDelimiter));
    }

    #[test]
    fn endpoints_are_checked_before_libzmq_sees_them() {
        for good in [
            "tcp://127.0.0.1:0",
            "tcp://*:5557",
            "tcp://[::1]:80",
            "ipc:///tmp/kv",
            "inproc://x",
        ] {
            assert!(check_endpoint("endpoint", good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:5557",
            "tcp://",
            "tcp://host",
            "tcp://:80",
            "tcp://h:99999",
            "udp://h:1",
            "tcp://h:1\0",
        ] {
            let err = check_endpoint("endpoint", bad).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("expected tcp://HOST:PORT"), "{bad}: {text}");
            assert!(text.contains(&format!("{bad:?}")), "{bad}: {text}");
        }
    }
}

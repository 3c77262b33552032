//! Mooncake-format request traces: reading one line, turning its block ids
//! into prompt text the mocker tokenizes to exactly the recorded length, and
//! generating shared-prefix traces (`switchyard trace`).
//!
//! A trace is JSON lines, one request each:
//! `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [..]}`,
//! where each hash id stands for one block of `block_size` prompt tokens and
//! equal ids mean equal text (Mooncake's format; its block size is 512).
//! Nothing here sends requests; `bench.rs` replays what this module reads.

use crate::bench::Length;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TraceRequest {
    /// When it arrives, in milliseconds from an arbitrary origin (Mooncake's start at 0).
    pub(crate) timestamp_ms: f64,
    /// Prompt tokens.
    pub(crate) input_length: u32,
    /// Tokens to generate (`max_tokens`).
    pub(crate) output_length: u32,
    /// One id per block of the prompt; the last block may be partial.
    pub(crate) hash_ids: Vec<u64>,
}

/// A line that is not a valid trace request: which line, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceError {
    /// 1-based, as editors count.
    pub(crate) line: usize,
    /// The JSON field at fault, or `line` when the line itself is not a JSON object.
    pub(crate) field: &'static str,
    pub(crate) problem: String,
}

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trace line {}: {}: {}", self.line, self.field, self.problem)
    }
}

impl std::error::Error for TraceError {}

/// Parses line `line` (1-based) of a trace with blocks of `block_size` tokens.
///
/// Checks what replay relies on: every field present with the right type,
/// lengths positive, and `hash_ids` holding exactly the blocks the prompt
/// needs (`ceil(input_length / block_size)`), so the synthesized prompt has
/// `input_length` tokens. Unknown fields are ignored.
pub(crate) fn parse_line(text: &str, line: usize, block_size: u32) -> Result<TraceRequest, TraceError> {
    let error = |field: &'static str, problem: String| TraceError { line, field, problem };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| error("line", format!("not valid JSON ({e})")))?;
    let object = value
        .as_object()
        .ok_or_else(|| error("line", "not a JSON object".into()))?;
    let field = |name: &'static str| object.get(name).ok_or_else(|| error(name, "missing".into()));
    let positive = |name: &'static str| -> Result<u32, TraceError> {
        let value = field(name)?;
        value
            .as_u64()
            .filter(|n| *n > 0)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| error(name, format!("{value} is not a positive whole number below 2^32")))
    };
    let timestamp = field("timestamp")?;
    let timestamp_ms = timestamp
        .as_f64()
        .filter(|t| *t >= 0.0 && t.is_finite())
        .ok_or_else(|| {
            error(
                "timestamp",
                format!("{timestamp} is not a non-negative number of milliseconds"),
            )
        })?;
    let input_length = positive("input_length")?;
    let output_length = positive("output_length")?;
    let ids = field("hash_ids")?
        .as_array()
        .ok_or_else(|| error("hash_ids", "not an array".into()))?;
    let hash_ids = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            id.as_u64().ok_or_else(|| {
                error(
                    "hash_ids",
                    format!("element {i} ({id}) is not a non-negative whole number"),
                )
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    let needed = input_length.div_ceil(block_size) as usize;
    if hash_ids.len() != needed {
        return Err(error(
            "hash_ids",
            format!(
                "{} ids, but input_length {input_length} needs {needed} blocks of {block_size} tokens \
                 (is --trace-block-size right?)",
                hash_ids.len()
            ),
        ));
    }
    Ok(TraceRequest {
        timestamp_ms,
        input_length,
        output_length,
        hash_ids,
    })
}

/// Appends the first `tokens` words of block `id`'s text to `out`, each
/// followed by a space.
///
/// The mocker's tokenizer makes one token per whitespace-separated word
/// (`switchyard_mocker::text::tokenize`), so `tokens` words are `tokens`
/// tokens. Word `k` of block `id` is `{id:x}.{k:x}`: the same id always gives
/// the same text, and two ids differ at every word, so two blocks share a
/// token only by a 32-bit hash collision.
pub(crate) fn push_block_text(out: &mut String, id: u64, tokens: u32) {
    for k in 0..tokens {
        // Writing into a String cannot fail.
        let _ = write!(out, "{id:x}.{k:x} ");
    }
}

/// The whole prompt of `request`: its blocks in order, the last one cut so
/// the prompt has exactly `input_length` tokens.
pub(crate) fn prompt_text(request: &TraceRequest, block_size: u32) -> String {
    let mut out = String::with_capacity(request.input_length as usize * 8);
    let mut left = request.input_length;
    for &id in &request.hash_ids {
        let tokens = left.min(block_size);
        push_block_text(&mut out, id, tokens);
        left -= tokens;
    }
    out
}

/// Flags of `switchyard trace`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TraceArgs {
    /// Where to write the trace (JSON lines); `-` for standard output.
    #[arg(long, default_value = "-")]
    pub(crate) out: PathBuf,
    /// Requests in the trace.
    #[arg(long, default_value_t = 2400)]
    pub(crate) requests: usize,
    /// Poisson arrivals per second.
    #[arg(long, default_value_t = 48.0)]
    pub(crate) rate: f64,
    /// Prefix groups: each has its own shared prefix (a system prompt or document).
    #[arg(long, default_value_t = 150)]
    pub(crate) groups: u32,
    /// Blocks in each group's shared prefix.
    #[arg(long, default_value_t = 12)]
    pub(crate) prefix_blocks: u32,
    /// Unique blocks after the prefix, per request: `N` or `A-B`.
    #[arg(long, default_value = "2-3")]
    pub(crate) suffix_blocks: Length,
    /// Tokens to generate per request: `N` or `A-B`.
    #[arg(long, default_value = "32-96")]
    pub(crate) output_tokens: Length,
    /// Tokens per block (Mooncake's traces use 512).
    #[arg(long, default_value_t = 512)]
    pub(crate) block_size: u32,
    /// Give every block its own id, prefixes included (same lengths and arrivals as with sharing).
    #[arg(long)]
    pub(crate) no_shared_prefix: bool,
    /// Seed of every draw: the same flags and seed write the same trace.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}

/// The trace `args` describe, one request per item.
///
/// Group `g`'s prefix is ids `g·P … g·P + P − 1`; unique blocks take ids
/// from `groups·P` upwards. Every request's last block is cut by up to half
/// a block, so prompts do not all end on a block boundary. The draws do not
/// depend on `no_shared_prefix`, so the two traces differ in ids only.
pub(crate) fn generate(args: &TraceArgs) -> Result<Vec<TraceRequest>, String> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a positive number of requests per second".into());
    }
    if args.groups == 0 || args.block_size == 0 {
        return Err("--groups and --block-size must be at least 1".into());
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut next_unique = u64::from(args.groups) * u64::from(args.prefix_blocks);
    let mut unique = || {
        next_unique += 1;
        next_unique - 1
    };
    let mut now_ms = 0.0f64;
    let mut trace = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let group = rng.random_range(0..args.groups);
        let suffix = args.suffix_blocks.draw(&mut rng);
        let output_length = args.output_tokens.draw(&mut rng);
        let cut = rng.random_range(0..args.block_size.div_ceil(2));
        let blocks = args.prefix_blocks + suffix;
        let mut hash_ids = Vec::with_capacity(blocks as usize);
        for j in 0..args.prefix_blocks {
            hash_ids.push(if args.no_shared_prefix {
                unique()
            } else {
                u64::from(group) * u64::from(args.prefix_blocks) + u64::from(j)
            });
        }
        hash_ids.extend((0..suffix).map(|_| unique()));
        trace.push(TraceRequest {
            timestamp_ms: now_ms.round(),
            input_length: blocks * args.block_size - cut,
            output_length,
            hash_ids,
        });
        now_ms += -(1.0 - rng.random::<f64>()).ln() / args.rate * 1000.0;
    }
    Ok(trace)
}

/// One trace line (fields in alphabetical order; order does not matter to readers).
pub(crate) fn to_line(request: &TraceRequest) -> String {
    serde_json::json!({
        "timestamp": request.timestamp_ms as u64,
        "input_length": request.input_length,
        "output_length": request.output_length,
        "hash_ids": request.hash_ids,
    })
    .to_string()
}

/// `switchyard trace`: writes the generated trace.
pub(crate) fn main(args: TraceArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let trace = generate(&args)?;
    let mut out: Box<dyn Write> = if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?)
    };
    let mut out = std::io::BufWriter::new(&mut out);
    for request in &trace {
        writeln!(out, "{}", to_line(request))?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_mocker::text::tokenize;

    fn args() -> TraceArgs {
        TraceArgs {
            out: "-".into(),
            requests: 400,
            rate: 10.0,
            groups: 4,
            prefix_blocks: 3,
            suffix_blocks: Length::Uniform(1, 2),
            output_tokens: Length::Uniform(5, 9),
            block_size: 16,
            no_shared_prefix: false,
            seed: 7,
        }
    }

    #[test]
    fn a_good_line_parses_and_extra_fields_are_ignored() {
        let line =
            r#"{"timestamp": 27482, "input_length": 1100, "output_length": 31, "hash_ids": [46, 47, 2], "x": 1}"#;
        assert_eq!(
            parse_line(line, 1, 512),
            Ok(TraceRequest {
                timestamp_ms: 27482.0,
                input_length: 1100,
                output_length: 31,
                hash_ids: vec![46, 47, 2],
            })
        );
    }

    #[test]
    fn each_malformed_line_names_its_line_and_field() {
        let cases = [
            ("not json", "line"),
            ("[1, 2]", "line"),
            (
                r#"{"input_length": 3, "output_length": 1, "hash_ids": [1]}"#,
                "timestamp",
            ),
            (
                r#"{"timestamp": -1, "input_length": 3, "output_length": 1, "hash_ids": [1]}"#,
                "timestamp",
            ),
            (
                r#"{"timestamp": 0, "output_length": 1, "hash_ids": [1]}"#,
                "input_length",
            ),
            (
                r#"{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}"#,
                "input_length",
            ),
            (
                r#"{"timestamp": 0, "input_length": 2.5, "output_length": 1, "hash_ids": [1]}"#,
                "input_length",
            ),
            (
                r#"{"timestamp": 0, "input_length": 3, "hash_ids": [1]}"#,
                "output_length",
            ),
            (
                r#"{"timestamp": 0, "input_length": 3, "output_length": "9", "hash_ids": [1]}"#,
                "output_length",
            ),
            (r#"{"timestamp": 0, "input_length": 3, "output_length": 1}"#, "hash_ids"),
            (
                r#"{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": 1}"#,
                "hash_ids",
            ),
            (
                r#"{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [-1]}"#,
                "hash_ids",
            ),
            // 600 tokens in blocks of 512 need two ids.
            (
                r#"{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}"#,
                "hash_ids",
            ),
            (
                r#"{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [1, 2]}"#,
                "hash_ids",
            ),
        ];
        for (text, field) in cases {
            let error = parse_line(text, 17, 512).expect_err(text);
            assert_eq!((error.line, error.field), (17, field), "{text}: {error}");
            let message = error.to_string();
            assert!(message.starts_with("trace line 17: "), "{message}");
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn block_text_is_exactly_block_size_mocker_tokens_and_equal_ids_give_equal_text() {
        let text = |id, tokens| {
            let mut out = String::new();
            push_block_text(&mut out, id, tokens);
            out
        };
        for id in [0, 1, 46, u64::MAX] {
            assert_eq!(tokenize(&text(id, 512)).len(), 512);
            assert_eq!(text(id, 512), text(id, 512));
        }
        let (a, b) = (tokenize(&text(1, 512)), tokenize(&text(2, 512)));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "different ids share no token position"
        );
    }

    #[test]
    fn a_prompt_has_input_length_tokens_and_shares_exactly_its_common_blocks() {
        let request = |ids: Vec<u64>, input_length| TraceRequest {
            timestamp_ms: 0.0,
            input_length,
            output_length: 1,
            hash_ids: ids,
        };
        let one = tokenize(&prompt_text(&request(vec![5, 6, 7], 40), 16));
        let two = tokenize(&prompt_text(&request(vec![5, 6, 9], 33), 16));
        assert_eq!((one.len(), two.len()), (40, 33));
        assert_eq!(one[..32], two[..32]);
        assert_ne!(one[32], two[32]);
    }

    #[test]
    fn the_generator_is_deterministic_and_has_the_asked_shape() {
        let trace = generate(&args()).unwrap();
        assert_eq!(trace, generate(&args()).unwrap());
        assert_ne!(trace, generate(&TraceArgs { seed: 8, ..args() }).unwrap());
        assert_eq!(trace.len(), 400);
        let prefixes: std::collections::BTreeSet<&[u64]> = trace.iter().map(|r| &r.hash_ids[..3]).collect();
        assert_eq!(prefixes.len(), 4, "one shared prefix per group");
        let mut suffix_ids = std::collections::HashSet::new();
        for (i, r) in trace.iter().enumerate() {
            // Round trip through the file format.
            assert_eq!(parse_line(&to_line(r), i + 1, 16).as_ref(), Ok(r));
            assert!((4..=5).contains(&r.hash_ids.len()));
            assert!((5..=9).contains(&r.output_length));
            assert!(r.hash_ids[..3].iter().all(|id| *id < 12));
            assert!(r.hash_ids[3..].iter().all(|id| *id >= 12 && suffix_ids.insert(*id)));
        }
        assert!(trace.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
        // 400 arrivals at 10/s span about 40 s.
        let span = trace.last().unwrap().timestamp_ms / 1000.0;
        assert!((30.0..50.0).contains(&span), "{span}");
    }

    #[test]
    fn without_shared_prefixes_only_the_ids_change() {
        let shared = generate(&args()).unwrap();
        let alone = generate(&TraceArgs {
            no_shared_prefix: true,
            ..args()
        })
        .unwrap();
        let mut ids = std::collections::HashSet::new();
        for (a, b) in shared.iter().zip(&alone) {
            assert_eq!(
                (a.timestamp_ms, a.input_length, a.output_length, a.hash_ids.len()),
                (b.timestamp_ms, b.input_length, b.output_length, b.hash_ids.len())
            );
            assert!(b.hash_ids.iter().all(|id| ids.insert(*id)), "every block unique");
        }
    }
}

//! Peak memory of parsing one large request body, the way the frontend
//! did before (a `serde_json::Value` of the whole body, then the typed
//! request, then a copy for migration) and the way it does now (straight
//! into the typed request, shared behind an `Arc`).
//!
//! ```text
//! cargo run --release -p switchyard-llm --example body_memory -- before
//! cargo run --release -p switchyard-llm --example body_memory -- after
//! ```
//!
//! Each run parses a 32 MiB completions body whose bulk is numbers (an
//! unknown field of 6.7 million small integers, which the frontend keeps to
//! pass on to the engine) and prints the growth of the process's peak
//! resident set (`VmHWM`) over the parse. Linux only.

use serde_json::Value;
use switchyard_llm::openai::{CompletionRequest, parse_request};

const BODY_BYTES: usize = 32 * 1024 * 1024;

/// The process's peak resident set, in KiB.
fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn body() -> Vec<u8> {
    let mut body = String::with_capacity(BODY_BYTES + 64);
    body.push_str(r#"{"model":"m","prompt":"hi","max_tokens":1,"numbers":["#);
    let mut n = 0u32;
    while body.len() < BODY_BYTES {
        if n > 0 {
            body.push(',');
        }
        body.push_str(&(n % 1000).to_string());
        n += 1;
    }
    body.push_str("]}");
    body.into_bytes()
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let body = body();
    let start = peak_kib();
    match mode.as_str() {
        "before" => {
            // The old path: Value, then the typed request from it, then a
            // clone kept for migration.
            let value: Value = serde_json::from_slice(&body).expect("valid JSON");
            let request: CompletionRequest = serde_path_to_error::deserialize(value).expect("a completion");
            let kept = request.clone();
            std::hint::black_box((&request, &kept));
        }
        "after" => {
            let request: CompletionRequest = parse_request(&body).expect("a completion");
            let kept = std::sync::Arc::new(request);
            let shared = std::sync::Arc::clone(&kept);
            std::hint::black_box((&kept, &shared));
        }
        _ => {
            eprintln!("usage: body_memory before|after");
            std::process::exit(2);
        }
    }
    let grown = peak_kib().saturating_sub(start);
    println!(
        "{mode}: a {} MiB body raised the peak resident set by {} MiB ({:.1}x the body)",
        body.len() / (1024 * 1024),
        grown / 1024,
        grown as f64 * 1024.0 / body.len() as f64
    );
}

//! Frontend cost: CPU time the frontend process spends per streaming
//! request, and requests/s at saturation.
//!
//! Starts `switchyard worker mocker --speedup-ratio 0` (answers as fast as
//! it can) and `switchyard frontend` as separate processes on file
//! discovery, drives streaming chat requests of 100 output tokens at a
//! fixed concurrency from this process, and reads the frontend's CPU time
//! (user + system) from `/proc/{pid}/stat` before and after.
//!
//! Run: `cargo bench -p switchyard --bench frontend` (release build);
//! `-- --output-tokens N` asks for N tokens per answer instead of 100 (1
//! shows the cost of a request apart from its tokens).
//! Output: one Markdown table row per concurrency level.

use futures::StreamExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use switchyard_test_support::free_port;
use tokio::time::Instant;

/// Output tokens per request (the yardstick), unless `--output-tokens` says otherwise.
const OUTPUT_TOKENS: u32 = 100;
/// Requests per concurrency level after a warm-up.
const REQUESTS: usize = 2000;
const WARMUP: usize = 200;
const LEVELS: [usize; 4] = [1, 8, 32, 128];
/// Without `--bench` (`cargo test --bench '*'`, from `make test`): a few
/// requests at two levels, so the bench cannot rot unnoticed.
const QUICK: (usize, usize, [usize; 2]) = (20, 5, [1, 8]);
/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let utime: f64 = fields[11].parse().unwrap();
    let stime: f64 = fields[12].parse().unwrap();
    (utime + stime) / TICKS_PER_SECOND
}

fn spawn(binary: &PathBuf, args: &[&str], dir: &str) -> Process {
    Process(
        Command::new(binary)
            .args(args)
            .env("DYN_DISCOVERY_BACKEND", "file")
            .env("DYN_FILE_KV", dir)
            .env("DYN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The value of `--output-tokens`, or [`OUTPUT_TOKENS`].
fn output_tokens() -> Result<u32, String> {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|arg| arg == "--output-tokens") else {
        return Ok(OUTPUT_TOKENS);
    };
    args.get(at + 1)
        .and_then(|value| value.parse().ok())
        .filter(|&tokens| tokens >= 1)
        .ok_or_else(|| "--output-tokens takes a whole number of tokens, 1 or more".to_string())
}

async fn one_request(http: &reqwest::Client, url: &str, tokens: u32) -> bool {
    let body = serde_json::json!({
        "model": "mock-model", "max_tokens": tokens, "stream": true,
        "messages": [{"role": "user", "content": "Benchmark the frontend please"}],
    });
    let Ok(response) = http.post(url).json(&body).send().await else {
        return false;
    };
    if !response.status().is_success() {
        return false;
    }
    let mut stream = response.bytes_stream();
    let mut tail = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        tail.extend_from_slice(&chunk);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    }
    String::from_utf8_lossy(&tail).contains("[DONE]")
}

/// Runs `count` requests with `concurrency` in flight; returns (elapsed, failures).
async fn drive(http: &reqwest::Client, url: &str, tokens: u32, count: usize, concurrency: usize) -> (Duration, usize) {
    let started = Instant::now();
    let failures = futures::stream::iter(0..count)
        .map(|_| one_request(http, url, tokens))
        .buffer_unordered(concurrency)
        .filter(|ok| std::future::ready(!ok))
        .count()
        .await;
    (started.elapsed(), failures)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tokens = match output_tokens() {
        Ok(tokens) => tokens,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_switchyard"));
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
    let dir = dir.to_str().unwrap().to_string();
    let _worker = spawn(
        &binary,
        &["worker", "mocker", "--speedup-ratio", "0", "--max-num-seqs", "1024"],
        &dir,
    );
    let port = free_port().to_string();
    let frontend = spawn(
        &binary,
        &["frontend", "--http-host", "127.0.0.1", "--http-port", &port],
        &dir,
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "the frontend did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("{base}/v1/chat/completions");
    println!("{tokens} output tokens per request\n");
    println!("| concurrency | requests | requests/s | frontend CPU per request | failures |");
    println!("|---:|---:|---:|---:|---:|");
    let full = std::env::args().any(|arg| arg == "--bench");
    let (requests, warmup, levels) = if full {
        (REQUESTS, WARMUP, &LEVELS[..])
    } else {
        (QUICK.0, QUICK.1, &QUICK.2[..])
    };
    for &concurrency in levels {
        drive(&http, &url, tokens, warmup, concurrency).await;
        let cpu_before = cpu_seconds(frontend.0.id());
        let (elapsed, failures) = drive(&http, &url, tokens, requests, concurrency).await;
        let cpu = cpu_seconds(frontend.0.id()) - cpu_before;
        println!(
            "| {concurrency} | {requests} | {:.0} | {:.3} ms | {failures} |",
            requests as f64 / elapsed.as_secs_f64(),
            cpu / requests as f64 * 1000.0
        );
        // The full run reports failures; the short one is a test of the bench.
        assert!(full || failures == 0, "{failures} requests failed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

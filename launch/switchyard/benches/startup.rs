//! A worker's start-up and idle cost: time from process start until its
//! instance is visible in discovery, and its resident memory when idle.
//!
//! Starts `switchyard worker mocker` (default engine: 16,384 KV blocks) on
//! file discovery five times, polling the discovery directory every
//! millisecond for its registration, then reads `VmRSS` from
//! `/proc/{pid}/status` after a second of idleness.
//!
//! Run: `cargo bench -p switchyard --bench startup`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const RUNS: usize = 5;
/// Without `--bench` (`cargo test --bench '*'`, from `make test`): one run, so
/// the bench cannot rot unnoticed.
const QUICK_RUNS: usize = 1;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_switchyard"));
    let mut registered_ms = Vec::new();
    let mut rss = Vec::new();
    let runs = if std::env::args().any(|arg| arg == "--bench") {
        RUNS
    } else {
        QUICK_RUNS
    };
    for run in 0..runs {
        let dir = std::env::temp_dir().join(format!("switchyard-startup-{}-{run}", std::process::id()));
        let instances = dir.join("instances");
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .args(["worker", "mocker"])
            .env("DYN_DISCOVERY_BACKEND", "file")
            .env("DYN_FILE_KV", &dir)
            .env("DYN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            let found = std::fs::read_dir(&instances)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
                })
                .unwrap_or(false);
            if found {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the worker never registered"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        registered_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(1));
        rss.push(rss_kib(child.id()) as f64 / 1024.0);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("| measure | median of {runs} | all runs |");
    println!("|---|---:|---|");
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
    println!(
        "| process start → instance registered (file discovery) | {:.1} ms | {} |",
        median(registered_ms.clone()),
        list(&registered_ms)
    );
    println!("| idle worker RSS | {:.1} MiB | {} |", median(rss.clone()), list(&rss));
}

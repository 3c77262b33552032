//! 10,000 idle connections against a worker process. In its own test
//! binary so that it runs alone: it holds 10,000 ephemeral ports while it
//! runs, and tests running beside it that pick a free port and bind it a
//! moment later could lose that port to one of these connections.

use serde_json::json;
use std::time::Duration;
use switchyard_test_support::free_port;
use switchyard_test_support::switchyard::{start_frontend, start_mocker};
use tokio::time::Instant;

/// 10,000 idle connections to a worker's request plane, more than twice its
/// connection cap, do not crash or starve it: a request through the
/// frontend still gets its whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_starve_a_worker() {
    const IDLE: usize = 10_000;
    let dir = std::env::temp_dir().join(format!("switchyard-idle-{:016x}", rand::random::<u64>()));
    let dir_text = dir.to_str().unwrap().to_string();
    let rpc_port = free_port();
    let rpc_text = rpc_port.to_string();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LOG", "info"),
    ];
    let mut worker_env = env.to_vec();
    worker_env.push(("DYN_TCP_RPC_PORT", &rpc_text));
    // Opening them takes ~8 s; a worker closes connections that stay silent
    // for DYN_TCP_CONNECT_TIMEOUT (tested in the runtime), so give it longer
    // here: none is closed by its deadline during the test. At the default
    // cap (DYN_TCP_MAX_CONNECTIONS, 4096) the newest silent connections take
    // the places of the oldest, and the frontend's connection the place of
    // one of them.
    worker_env.push(("DYN_TCP_CONNECT_TIMEOUT", "120s"));
    let worker = start_mocker(&["--speedup-ratio", "0"], &worker_env);
    let (frontend_process, frontend) = start_frontend(&[], &env);
    let opening = Instant::now();
    let idle = tokio::task::spawn_blocking(move || {
        (0..IDLE)
            .map(|i| {
                // A pause now and then lets the (debug-build) accept loop keep
                // up; otherwise the listen queue fills and the kernel makes
                // this client wait a second per dropped SYN, which tests
                // nothing but patience.
                if i % 128 == 127 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::net::TcpStream::connect(("127.0.0.1", rpc_port))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .unwrap()
    .expect("the worker accepts 10,000 connections");
    assert_eq!(idle.len(), IDLE);
    println!("opened {IDLE} idle connections in {:?}", opening.elapsed());
    let started = Instant::now();
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{frontend}/v1/completions"))
        .json(&json!({"model": "mock-model", "prompt": "still there?", "max_tokens": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["usage"]["completion_tokens"],
        5,
        "{answer}\nworker:\n{}\nfrontend:\n{}",
        worker.log(),
        frontend_process.log()
    );
    println!(
        "with {IDLE} idle connections open, a request took {:?}",
        started.elapsed()
    );
    assert!(
        std::fs::metadata(format!("/proc/{}", worker.pid())).is_ok(),
        "the worker is alive"
    );
    drop(idle);
    let _ = std::fs::remove_dir_all(&dir);
}

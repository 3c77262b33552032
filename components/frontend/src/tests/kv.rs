//! The KV-aware router (`--router-mode kv`) over real mocker workers in
//! the same process: routing by cached prefix, spreading a hot prefix,
//! following engines' KV events, and tokenizing with a model's own files.

use super::{Stack, chat, drt, eventually, post};
use crate::FrontendArgs;
use crate::http::{FrontendState, router};
use axum::http::StatusCode;
use serde_json::json;
use switchyard_mocker_worker::MockerArgs;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::MemRegistry;
use switchyard_runtime::runtime::Runtime;

/// A KV-mode frontend over `workers` mocker workers (each its own runtime,
/// so its own instance), on a private registry.
pub(super) async fn kv_stack(
    workers: usize,
    speedup_ratio: f64,
    frontend: FrontendArgs,
) -> (Stack, Vec<(Runtime, u64)>) {
    let registry = MemRegistry::new();
    let mut runtimes = Vec::new();
    for _ in 0..workers {
        let runtime = Runtime::new(RuntimeConfig::local());
        let args = MockerArgs {
            speedup_ratio,
            ..MockerArgs::default()
        };
        let worker_drt = drt(&runtime, &registry);
        switchyard_mocker_worker::serve(&worker_drt, &args).await.unwrap();
        runtimes.push((runtime, worker_drt.instance_id()));
    }
    let frontend_runtime = Runtime::new(RuntimeConfig::local());
    let frontend = FrontendArgs {
        router_mode: switchyard_runtime::routing::RouterMode::Kv,
        ..frontend
    };
    let state = FrontendState::new(&drt(&frontend_runtime, &registry), &frontend)
        .await
        .unwrap();
    let stack = Stack {
        app: router(state.clone()),
        state,
        worker: None,
        frontend_runtime,
    };
    eventually("both workers' cards", || {
        stack
            .state
            .models
            .get("mock-model")
            .is_some_and(|m| m.cards.len() == workers)
    })
    .await;
    (stack, runtimes)
}

/// The `x-switchyard-route` header's `key=value` fields.
fn route_fields(headers: &axum::http::HeaderMap) -> std::collections::HashMap<String, String> {
    let text = headers
        .get(crate::http::ROUTE)
        .expect("a KV-routed answer says why")
        .to_str()
        .unwrap();
    text.split(';')
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A prompt of `words` distinct words (one mocker token each).
fn long_prompt(tag: &str, words: usize) -> String {
    (0..words).map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_sends_a_prompt_sharing_a_cached_prefix_to_the_worker_that_holds_it() {
    let frontend = FrontendArgs {
        router_kv_events: false,
        ..FrontendArgs::default()
    };
    let (stack, workers) = kv_stack(2, 0.0, frontend).await;
    let prefix = long_prompt("shared", 400);
    let ask = |suffix: &str| {
        chat(json!({"max_tokens": 2, "messages": [{"role": "user", "content": format!("{prefix} {suffix}")}]}))
    };

    let (status, headers, body) = stack.post("/v1/chat/completions", ask("first")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = route_fields(&headers);
    assert_eq!(first["mode"], "kv");
    assert_eq!(first["index"], "approximate", "events are off");
    assert_eq!(first["overlap"], "0", "nothing is cached yet: {first:?}");
    let blocks: u32 = first["blocks"].parse().unwrap();
    assert!(blocks >= 6, "400 words are several 64-token blocks: {first:?}");

    for suffix in ["second", "third", "fourth"] {
        let (status, headers, body) = stack.post("/v1/chat/completions", ask(suffix)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let next = route_fields(&headers);
        assert_eq!(next["worker"], first["worker"], "the prefix is cached there: {next:?}");
        let overlap: u32 = next["overlap"].parse().unwrap();
        assert!(overlap >= blocks - 1, "all but the last block are shared: {next:?}");
        assert_eq!(next["runner_up_overlap"], "0");
        assert_eq!(
            headers["x-switchyard-worker-id"].to_str().unwrap(),
            first["worker"],
            "the route header names the worker that answered"
        );
    }

    // A different prompt has no cached prefix anywhere. (Costs are not
    // compared: a worker's load report may still count the last request.)
    let (_, headers, _) = stack
        .post(
            "/v1/chat/completions",
            chat(json!({"max_tokens": 2, "messages": [{"role": "user", "content": long_prompt("other", 400)}]})),
        )
        .await;
    let other = route_fields(&headers);
    assert_eq!(other["overlap"], "0");
    assert_eq!(other["runner_up_overlap"], "0", "{other:?}");

    for (runtime, _) in workers {
        runtime.shutdown().await;
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_spreads_one_hot_prefix_over_workers_as_they_fill() {
    let frontend = FrontendArgs {
        router_kv_events: false,
        ..FrontendArgs::default()
    };
    // Real-time workers: answers stay open while the next requests arrive.
    let (stack, workers) = kv_stack(3, 1.0, frontend).await;
    let prompt = long_prompt("hot", 600);
    let mut open = Vec::new();
    let mut chosen = std::collections::HashMap::<String, usize>::new();
    for _ in 0..9 {
        let body = chat(json!({"max_tokens": 400, "stream": true, "messages": [{"role": "user", "content": prompt}]}));
        let response = stack.call(post("/v1/chat/completions", body.to_string())).await;
        assert_eq!(response.status(), StatusCode::OK);
        *chosen
            .entry(route_fields(response.headers())["worker"].clone())
            .or_default() += 1;
        open.push(response); // keep the stream (and its load) open
    }
    assert_eq!(
        chosen.len(),
        3,
        "one hot prefix must not pile onto one worker once it is loaded: {chosen:?}"
    );
    let busiest = chosen.values().max().unwrap();
    assert!(*busiest <= 5, "the load term spreads the prefix: {chosen:?}");
    drop(open);
    for (runtime, _) in workers {
        runtime.shutdown().await;
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_with_events_indexes_what_the_engines_cache_and_forgets_a_worker_that_leaves() {
    let (stack, mut workers) = kv_stack(2, 0.0, FrontendArgs::default()).await;
    let model = stack.state.models.get("mock-model").unwrap();
    let kv = model.kv.clone().expect("KV mode");
    assert!(
        model.cards.values().all(|card| card.kv_events.is_some()),
        "mocker cards name their KV event endpoints"
    );
    let prompt = long_prompt("cached", 500);
    let ask = |suffix: &str| {
        chat(json!({"max_tokens": 2, "messages": [{"role": "user", "content": format!("{prompt} {suffix}")}]}))
    };
    let (status, headers, body) = stack.post("/v1/chat/completions", ask("one")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = route_fields(&headers);
    assert_eq!(first["index"], "events");
    let warm = u64::from_str_radix(&first["worker"], 16).unwrap();
    let blocks: usize = first["blocks"].parse().unwrap();
    // The engine stored the prompt's full blocks and said so on ZMQ.
    eventually("the warm engine's BlockStored events", || {
        kv.worker_blocks(warm) >= blocks - 1
    })
    .await;

    let (_, headers, _) = stack.post("/v1/chat/completions", ask("two")).await;
    let second = route_fields(&headers);
    assert_eq!(second["worker"], first["worker"]);
    assert!(second["overlap"].parse::<usize>().unwrap() >= blocks - 1, "{second:?}");

    // The warm worker leaves: its blocks leave the index at once and the
    // next request goes to the other worker.
    let position = workers.iter().position(|(_, id)| *id == warm).unwrap();
    let (leaving, _) = workers.remove(position);
    leaving.shutdown().await;
    eventually("the warm worker's blocks to leave the index", || {
        kv.worker_blocks(warm) == 0
    })
    .await;
    let (status, headers, body) = stack.post("/v1/chat/completions", ask("three")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let third = route_fields(&headers);
    assert_ne!(third["worker"], first["worker"]);
    assert_eq!(third["overlap"], "0", "nobody holds the prefix now: {third:?}");
    for (runtime, _) in workers {
        runtime.shutdown().await;
    }
    stack.shutdown().await;
}

#[tokio::test]
async fn a_model_whose_cards_name_a_hugging_face_directory_is_tokenized_exactly_with_it() {
    use crate::models::ModelTokenizer;
    use switchyard_llm::model_card::{ModelCard, ModelKind, TokenizerSpec};
    use switchyard_llm::testing::{CHATML_TEMPLATE, token_id, write_model_dir};
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some(CHATML_TEMPLATE)).unwrap();
    let card = |instance_id: u64, tokenizer: Option<TokenizerSpec>| ModelCard {
        name: "m".into(),
        kinds: vec![ModelKind::Chat],
        context_length: 4096,
        capacity: Default::default(),
        namespace: "ns".into(),
        component: "c".into(),
        endpoint: "e".into(),
        instance_id,
        tokenizer,
        kv_events: None,
        engine: None,
    };
    let hf = Some(TokenizerSpec::HfDir {
        path: dir.path().to_str().unwrap().into(),
    });
    let tokenizer = ModelTokenizer::load(&card(1, hf.clone())).await;
    assert!(tokenizer.hf.is_some(), "the directory loads");
    let request = switchyard_llm::protocol::LlmRequest::Chat(
        switchyard_llm::openai::parse_request(br#"{"model":"m","messages":[{"role":"user","content":"hello world"}]}"#)
            .unwrap(),
    );
    let mut cards = std::collections::BTreeMap::from([(1, card(1, hf.clone())), (2, card(2, hf.clone()))]);
    let (tokens, exact) = tokenizer.tokens(&cards, &request);
    assert!(exact);
    let im_start = token_id("<|im_start|>");
    assert_eq!(
        tokens[..4],
        [im_start, token_id("user"), token_id("hello"), token_id("world")]
    );

    // A worker that names another tokenizer: the router can no longer be exact.
    cards.insert(3, card(3, Some(TokenizerSpec::Mocker)));
    assert!(!tokenizer.tokens(&cards, &request).1);

    // A directory that cannot be loaded: approximate, never a failure.
    let missing = Some(TokenizerSpec::HfDir {
        path: "/nonexistent/model".into(),
    });
    let broken = ModelTokenizer::load(&card(4, missing.clone())).await;
    assert!(broken.hf.is_none());
    let cards = std::collections::BTreeMap::from([(4, card(4, missing))]);
    let (tokens, exact) = broken.tokens(&cards, &request);
    assert!(!exact);
    assert!(!tokens.is_empty());
}

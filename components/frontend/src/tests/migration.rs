//! Migration keeps the client's contract: over two workers whose engine is
//! a script (some pieces, then the connection breaks), the frontend either
//! continues the answer in a way the cards say the engines can, or ends it
//! with a clear error — never a spliced answer.

use super::{drt, eventually, post, sse_events};
use crate::FrontendArgs;
use crate::http::{FrontendState, router};
use axum::Router;
use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use switchyard_llm::model_card::{EngineFeatures, Liveness, LoadGauges, ModelCard, ModelKind, TokenizerSpec};
use switchyard_llm::openai::{Prompt, Usage};
use switchyard_llm::protocol::{FinishReason, LlmOutput, LlmRequest};
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::MemRegistry;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};
use switchyard_runtime::runtime::Runtime;
use tower::ServiceExt;

/// An engine shared by both workers: its first `hanging` calls never send
/// anything, the next `dying` calls send `pieces` and then break off; later
/// calls finish with " end".
struct Scripted {
    requests: Mutex<Vec<LlmRequest>>,
    hanging: usize,
    dying: usize,
    /// Calls after the dying ones that hang too (the workers a migration
    /// is sent to stay silent).
    hanging_later: usize,
    pieces: Vec<LlmOutput>,
}

/// The handler each worker serves: the one shared script.
struct Shared(Arc<Scripted>);

#[async_trait::async_trait]
impl AsyncEngine<LlmRequest, LlmOutput> for Shared {
    async fn generate(&self, request: Context<LlmRequest>) -> Result<ResponseStream<LlmOutput>, RequestError> {
        let script = &self.0;
        let (request, _controller) = request.into_parts();
        let call = {
            let mut requests = script.requests.lock().unwrap();
            requests.push(request);
            requests.len()
        };
        let broken_off = script.hanging + script.dying;
        if call <= script.hanging || (call > broken_off && call <= broken_off + script.hanging_later) {
            return Ok(Box::pin(futures::stream::pending()));
        }
        let items: Vec<Result<LlmOutput, RequestError>> = if call <= broken_off {
            let broken = RequestError::new(ErrorKind::Disconnected, "the engine broke off the answer");
            script.pieces.iter().cloned().map(Ok).chain([Err(broken)]).collect()
        } else {
            vec![Ok(LlmOutput {
                text: " end".into(),
                tokens: 1,
                finish_reason: Some(FinishReason::Stop),
                usage: Some(Usage::new(7, 1)),
                token_ids: vec![99],
                ..LlmOutput::default()
            })]
        };
        Ok(Box::pin(futures::stream::iter(items)))
    }
}

impl Scripted {
    fn requests(&self) -> Vec<LlmRequest> {
        self.requests.lock().unwrap().clone()
    }
}

/// " Once upon" in one chunk of two tokens (ids 10, 11) after a prompt of
/// ids 1, 2; then " a" (id 12).
fn three_tokens() -> Vec<LlmOutput> {
    vec![
        LlmOutput {
            text: " Once upon".into(),
            tokens: 2,
            token_ids: vec![10, 11],
            prompt_token_ids: vec![1, 2],
            ..LlmOutput::default()
        },
        LlmOutput {
            text: " a".into(),
            tokens: 1,
            token_ids: vec![12],
            ..LlmOutput::default()
        },
    ]
}

fn features(token_ids: bool, continues_message: bool) -> EngineFeatures {
    EngineFeatures {
        server: "scripted".into(),
        liveness: Liveness::Health,
        one_at_a_time: false,
        load: LoadGauges::InFlight,
        token_ids,
        continues_message,
    }
}

struct Stack {
    app: Router,
    state: FrontendState,
    engine: Arc<Scripted>,
    runtimes: Vec<Runtime>,
}

impl Stack {
    /// Two workers of model `m` over one `engine`, behind a frontend.
    async fn start(engine: Scripted, features: EngineFeatures, migration_limit: u32) -> Self {
        let args = FrontendArgs {
            migration_limit,
            ..FrontendArgs::default()
        };
        Self::start_with(engine, features, args, None).await
    }

    /// Like [`Stack::start`], with the frontend's `args` and the cards
    /// naming `tokenizer`.
    async fn start_with(
        engine: Scripted,
        features: EngineFeatures,
        args: FrontendArgs,
        tokenizer: Option<TokenizerSpec>,
    ) -> Self {
        let engine = Arc::new(engine);
        let registry = MemRegistry::new();
        let mut runtimes = Vec::new();
        for _ in 0..2 {
            let runtime = Runtime::new(RuntimeConfig::local());
            let drt = drt(&runtime, &registry);
            let endpoint = drt
                .namespace("dynamo")
                .unwrap()
                .component("backend")
                .unwrap()
                .endpoint("generate");
            let serving = endpoint
                .endpoint_builder()
                .handler(Shared(engine.clone()))
                .spawn()
                .await
                .unwrap();
            std::mem::forget(serving); // lives as long as its runtime
            let mut card = ModelCard::new("m", &endpoint, vec![ModelKind::Chat, ModelKind::Completions], 1000);
            card.engine = Some(features.clone());
            card.tokenizer = tokenizer.clone();
            card.register(&endpoint).await.unwrap();
            runtimes.push(runtime);
        }
        let frontend_runtime = Runtime::new(RuntimeConfig::local());
        let state = FrontendState::new(&drt(&frontend_runtime, &registry), &args)
            .await
            .unwrap();
        let tokenizer_loaded = |m: &crate::models::Model| tokenizer.is_none() || m.tokenizer.hf.is_some();
        eventually("both workers known", || {
            state
                .models
                .get("m")
                .is_some_and(|m| m.cards.len() == 2 && tokenizer_loaded(&m))
        })
        .await;
        runtimes.push(frontend_runtime);
        Stack {
            app: router(state.clone()),
            state,
            engine,
            runtimes,
        }
    }

    /// A streamed request: the text received, the last event, and whether `[DONE]` came.
    async fn stream(&self, path: &str, body: Value, header: Option<(&'static str, &str)>) -> (String, Value, bool) {
        let mut request = post(path, body.to_string());
        if let Some((name, value)) = header {
            request.headers_mut().insert(name, value.parse().unwrap());
        }
        let response = self.app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let (events, done) = sse_events(std::str::from_utf8(&bytes).unwrap());
        let text = events
            .iter()
            .filter_map(|e| {
                let choice = &e["choices"][0];
                choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str())
            })
            .collect();
        (text, events.last().cloned().unwrap_or_default(), done)
    }

    fn ongoing_migrations(&self) -> u64 {
        self.state
            .metrics
            .migrations
            .with_label_values(&["m", "ongoing_request"])
            .get()
    }

    async fn shutdown(self) {
        for runtime in self.runtimes {
            runtime.shutdown().await;
        }
    }
}

fn scripted(dying: usize) -> Scripted {
    Scripted {
        requests: Mutex::default(),
        hanging: 0,
        dying,
        hanging_later: 0,
        pieces: three_tokens(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_cut_off_mid_answer_continues_from_the_same_token_ids() {
    let stack = Stack::start(scripted(1), features(true, false), 3).await;
    let body = json!({"model": "m", "prompt": "Tell", "max_tokens": 10, "min_tokens": 4, "echo": true, "stream": true});
    let (text, last, done) = stack.stream("/v1/completions", body, None).await;
    assert!(done);
    assert_eq!(text, " Once upon a end", "nothing lost, nothing repeated");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    let requests = stack.engine.requests();
    assert_eq!(requests.len(), 2);
    let LlmRequest::Completion(next) = &requests[1] else {
        panic!("a completion: {:?}", requests[1])
    };
    assert_eq!(next.prompt, Prompt::Tokens(vec![1, 2, 10, 11, 12]));
    assert_eq!(
        next.max_tokens,
        Some(7),
        "three tokens in two chunks: counted as tokens"
    );
    assert_eq!(next.extra["min_tokens"], 1, "min_tokens shrinks like max_tokens");
    assert_eq!(next.extra["echo"], false, "the prompt is not echoed again");
    assert_eq!(stack.ongoing_migrations(), 1);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_request_leaves_a_second_decision_naming_its_new_worker() {
    let stack = Stack::start(scripted(1), features(true, false), 3).await;
    let body = json!({"model": "m", "prompt": "Tell", "max_tokens": 10, "stream": true});
    let (_, _, done) = stack
        .stream("/v1/completions", body, Some(("x-request-id", "moved-1")))
        .await;
    assert!(done);
    let decisions: Vec<_> = stack
        .state
        .mesh
        .decisions
        .all()
        .into_iter()
        .filter(|d| d.request_id == "moved-1")
        .collect();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!((decisions[0].migration, decisions[1].migration), (0, 1));
    assert_ne!(decisions[0].worker, decisions[1].worker, "moved off the failed worker");
    let found = stack.state.mesh.decisions.find("moved-1").unwrap();
    assert_eq!(found, decisions[1], "a lookup gives where the request is now");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_cut_off_mid_answer_continues_as_a_completion_over_token_ids() {
    let stack = Stack::start(scripted(1), features(true, true), 3).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let (text, _, done) = stack.stream("/v1/chat/completions", body, None).await;
    assert!(done);
    assert_eq!(text, " Once upon a end");
    let requests = stack.engine.requests();
    assert!(
        matches!(&requests[1], LlmRequest::Completion(next) if next.prompt == Prompt::Tokens(vec![1, 2, 10, 11, 12])),
        "{:?}",
        requests[1]
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_cannot_continue_ends_the_answer_with_a_clear_error_not_a_splice() {
    let stack = Stack::start(scripted(1), features(false, false), 3).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let (text, last, done) = stack.stream("/v1/chat/completions", body, None).await;
    assert!(!done, "the answer did not end normally");
    assert_eq!(text, " Once upon a", "what was sent stays, nothing is added");
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cut off after 3 tokens"), "{last}");
    assert!(message.contains("start a new answer"), "{last}");
    assert_eq!(stack.engine.requests().len(), 1, "no second engine was asked");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_token_a_request_starts_over_even_where_engines_cannot_continue() {
    let engine = Scripted {
        requests: Mutex::default(),
        hanging: 0,
        dying: 1,
        hanging_later: 0,
        pieces: Vec::new(),
    };
    let stack = Stack::start(engine, features(false, false), 3).await;
    let body = json!({"model": "m", "prompt": "Tell", "stream": true});
    let (text, _, done) = stack.stream("/v1/completions", body, None).await;
    assert!(done);
    assert_eq!(text, " end");
    let requests = stack.engine.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0], requests[1], "the same request, from scratch");
    stack.shutdown().await;
}

/// Both workers stay silent past the first-token deadline (the router
/// tried each): the request is not answered yet, so it tries again from
/// the migration budget instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_worker_answered_in_time_tries_again_within_the_migration_limit() {
    let engine = Scripted {
        requests: Mutex::default(),
        hanging: 2,
        dying: 0,
        hanging_later: 0,
        pieces: Vec::new(),
    };
    let args = FrontendArgs {
        migration_limit: 3,
        first_token_timeout: std::time::Duration::from_millis(200),
        ..FrontendArgs::default()
    };
    let stack = Stack::start_with(engine, features(false, false), args, None).await;
    let body = json!({"model": "m", "prompt": "Tell", "stream": true});
    let (text, _, done) = stack.stream("/v1/completions", body.clone(), None).await;
    assert!(done);
    assert_eq!(text, " end");
    assert_eq!(stack.engine.requests().len(), 3, "two silent workers, then an answer");
    let new_requests = stack
        .state
        .metrics
        .migrations
        .with_label_values(&["m", "new_request"])
        .get();
    assert_eq!(new_requests, 1);

    // With migration off, the same silence is the client's error.
    let engine = Scripted {
        requests: Mutex::default(),
        hanging: 2,
        dying: 0,
        hanging_later: 0,
        pieces: Vec::new(),
    };
    let args = FrontendArgs {
        migration_limit: 0,
        first_token_timeout: std::time::Duration::from_millis(200),
        ..FrontendArgs::default()
    };
    let quiet = Stack::start_with(engine, features(false, false), args, None).await;
    let response = quiet
        .app
        .clone()
        .oneshot(post("/v1/completions", body.to_string()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(quiet.engine.requests().len(), 2);
    stack.shutdown().await;
    quiet.shutdown().await;
}

/// Found by the chaos run: an answer cut off mid-way was migrated to a
/// blackholed worker and a stalled engine, both silent past the
/// first-token deadline, and failed although migrations were left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_no_worker_answered_in_time_tries_again_within_the_migration_limit() {
    let engine = Scripted {
        requests: Mutex::default(),
        hanging: 0,
        dying: 1,
        hanging_later: 2,
        pieces: three_tokens(),
    };
    let args = FrontendArgs {
        migration_limit: 3,
        first_token_timeout: std::time::Duration::from_millis(200),
        ..FrontendArgs::default()
    };
    let stack = Stack::start_with(engine, features(true, false), args, None).await;
    let body = json!({"model": "m", "prompt": "Tell", "max_tokens": 10, "stream": true});
    let (text, last, done) = stack.stream("/v1/completions", body, None).await;
    assert!(done, "{last}");
    assert_eq!(text, " Once upon a end", "nothing lost, nothing repeated");
    assert_eq!(
        stack.engine.requests().len(),
        4,
        "cut off, two silent workers, then the rest of the answer"
    );
    // One migration per try: with two workers and the one that broke
    // avoided, the router has no other worker to retry a silent one on.
    assert_eq!(stack.ongoing_migrations(), 3);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_is_not_spliced_mid_answer() {
    let stack = Stack::start(scripted(1), features(true, true), 3).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "response_format": {"type": "json_object"}});
    let (text, last, done) = stack.stream("/v1/chat/completions", body, None).await;
    assert!(!done);
    assert_eq!(text, " Once upon a");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("response_format"),
        "{last}"
    );
    assert_eq!(stack.engine.requests().len(), 1);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_can_turn_migration_off_with_a_header() {
    let stack = Stack::start(scripted(1), features(true, true), 3).await;
    let body = json!({"model": "m", "prompt": "Tell", "stream": true});
    let (text, last, done) = stack
        .stream("/v1/completions", body, Some(("x-switchyard-migration", "off")))
        .await;
    assert!(!done);
    assert_eq!(text, " Once upon a");
    assert!(last["error"].is_object(), "{last}");
    assert_eq!(stack.engine.requests().len(), 1, "not migrated");
    assert_eq!(stack.ongoing_migrations(), 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_to_at_most_one_plus_the_migration_limit_workers() {
    // Every call dies after its pieces.
    let stack = Stack::start(scripted(usize::MAX), features(true, false), 2).await;
    let body = json!({"model": "m", "prompt": "Tell", "max_tokens": 100, "stream": true});
    let (_, last, done) = stack.stream("/v1/completions", body, None).await;
    assert!(!done);
    assert!(last["error"].is_object(), "{last}");
    assert_eq!(stack.engine.requests().len(), 3, "the first worker and two migrations");
    assert_eq!(stack.ongoing_migrations(), 2);
    stack.shutdown().await;
}

/// "Tokens in": in KV mode with the model's own tokenizer files, a request
/// reaches engines that take token ids as the very ids the router scored.
#[tokio::test]
async fn with_exact_tokens_requests_reach_token_id_engines_as_the_routers_ids() {
    use switchyard_llm::testing::{CHATML_TEMPLATE, token_id, write_model_dir};
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some(CHATML_TEMPLATE)).unwrap();
    let hf = switchyard_llm::tokenizer::HfTokenizer::from_dir(dir.path()).unwrap();
    let spec = TokenizerSpec::HfDir {
        path: dir.path().to_str().unwrap().into(),
    };
    let args = FrontendArgs {
        router_mode: switchyard_runtime::routing::RouterMode::Kv,
        ..FrontendArgs::default()
    };
    let stack = Stack::start_with(scripted(0), features(true, false), args, Some(spec)).await;

    let (text, _, done) = stack
        .stream(
            "/v1/completions",
            json!({"model": "m", "prompt": "hello world", "max_tokens": 5, "stream": true}),
            None,
        )
        .await;
    assert_eq!((text.as_str(), done), (" end", true));
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hello world"}], "stream": true});
    let (text, last, _) = stack.stream("/v1/chat/completions", chat, None).await;
    assert_eq!(text, " end");
    assert_eq!(
        last["object"], "chat.completion.chunk",
        "the client still gets a chat: {last}"
    );
    // A chat with tools cannot become a completion: it goes as it came.
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let with_tools =
        json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "tools": tools, "stream": true});
    stack.stream("/v1/chat/completions", with_tools, None).await;

    let requests = stack.engine.requests();
    let LlmRequest::Completion(completion) = &requests[0] else {
        panic!("{:?}", requests[0])
    };
    assert_eq!(
        completion.prompt,
        Prompt::Tokens(hf.encode("hello world", true).unwrap())
    );
    assert_eq!(completion.max_tokens, Some(5));
    let LlmRequest::Completion(from_chat) = &requests[1] else {
        panic!("{:?}", requests[1])
    };
    let im_start = token_id("<|im_start|>");
    let Prompt::Tokens(ids) = &from_chat.prompt else {
        panic!("{from_chat:?}")
    };
    assert_eq!(
        ids[..4],
        [im_start, token_id("user"), token_id("hello"), token_id("world")]
    );
    assert!(matches!(&requests[2], LlmRequest::Chat(_)), "{:?}", requests[2]);

    // The exact count also checks the context (1000 tokens) before any worker is asked.
    let long = "hello ".repeat(990);
    let request = post(
        "/v1/completions",
        json!({"model": "m", "prompt": long, "max_tokens": 20}).to_string(),
    );
    let response = stack.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("is 991 tokens and max_tokens is 20") && body.contains("context length of 1000"),
        "{body}"
    );
    assert_eq!(stack.engine.requests().len(), 3, "no worker was asked");
    stack.shutdown().await;
}

/// Engines that take only text get text, tokens or not.
#[tokio::test]
async fn engines_without_token_ids_get_the_prompt_as_text() {
    use switchyard_llm::testing::{CHATML_TEMPLATE, write_model_dir};
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some(CHATML_TEMPLATE)).unwrap();
    let spec = TokenizerSpec::HfDir {
        path: dir.path().to_str().unwrap().into(),
    };
    let args = FrontendArgs {
        router_mode: switchyard_runtime::routing::RouterMode::Kv,
        ..FrontendArgs::default()
    };
    let stack = Stack::start_with(scripted(0), features(false, true), args, Some(spec)).await;
    let body = json!({"model": "m", "prompt": "hello world", "max_tokens": 5, "stream": true});
    stack.stream("/v1/completions", body, None).await;
    let requests = stack.engine.requests();
    assert!(
        matches!(&requests[0], LlmRequest::Completion(c) if c.prompt == Prompt::Text("hello world".into())),
        "{:?}",
        requests[0]
    );
    stack.shutdown().await;
}

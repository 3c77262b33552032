use super::*;
use crate::model_card::{EngineFeatures, Liveness, LoadGauges};
use crate::openai::{ChatCompletionRequest, CompletionRequest, parse_request};

fn chat(body: &str) -> LlmRequest {
    LlmRequest::Chat(parse_request::<ChatCompletionRequest>(body.as_bytes()).unwrap())
}

fn completion(body: &str) -> LlmRequest {
    LlmRequest::Completion(parse_request::<CompletionRequest>(body.as_bytes()).unwrap())
}

/// Three tokens generated, " upon a time", with their ids, after a prompt of ids 1, 2.
fn three_tokens() -> Progress {
    Progress {
        text: " upon a time".into(),
        tokens: 3,
        token_ids: vec![10, 11, 12],
        prompt_token_ids: vec![1, 2],
    }
}

#[test]
fn a_completion_continues_from_the_prompt_and_generated_token_ids() {
    let request = completion(r#"{"model":"m","prompt":"Once","max_tokens":10,"min_tokens":5,"echo":true,"top_k":2}"#);
    let Ok(Some(LlmRequest::Completion(next))) = continue_request(&request, &three_tokens(), &[Continuation::TokenIds])
    else {
        panic!("a completion")
    };
    assert_eq!(next.prompt, Prompt::Tokens(vec![1, 2, 10, 11, 12]));
    assert_eq!(next.max_tokens, Some(7), "max_tokens shrinks by tokens, not chunks");
    assert_eq!(next.extra["min_tokens"], 2, "min_tokens shrinks like max_tokens");
    assert_eq!(next.extra["echo"], false, "the prompt was echoed once already");
    assert_eq!(next.extra["top_k"], 2, "pass-through fields survive");
}

#[test]
fn a_chat_continues_as_a_completion_over_its_templated_prompt_ids() {
    let request = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":8,"temperature":0,"top_k":1,"chat_template_kwargs":{"x":1}}"#,
    );
    let Ok(Some(LlmRequest::Completion(next))) = continue_request(&request, &three_tokens(), &[Continuation::TokenIds])
    else {
        panic!("a completion over ids")
    };
    assert_eq!(next.prompt, Prompt::Tokens(vec![1, 2, 10, 11, 12]));
    assert_eq!(next.max_tokens, Some(5));
    assert_eq!(next.temperature, Some(0.0));
    assert_eq!(next.extra["top_k"], 1, "sampling fields are kept");
    assert!(!next.extra.contains_key("chat_template_kwargs"), "chat-only fields go");
}

#[test]
fn without_every_generated_id_token_ids_are_not_used() {
    let request = completion(r#"{"model":"m","prompt":"Once","max_tokens":10}"#);
    let partial = Progress {
        token_ids: vec![10, 11],
        ..three_tokens()
    };
    assert_eq!(
        continue_request(&request, &partial, &[Continuation::TokenIds]),
        Err(CannotContinue::NoTokenIds { kind: "completion" })
    );
    // A chat falls back to the next way its engines offer.
    let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let ways = [Continuation::TokenIds, Continuation::AssistantMessage];
    assert!(matches!(
        continue_request(&request, &partial, &ways),
        Ok(Some(LlmRequest::Chat(_)))
    ));
}

#[test]
fn a_chat_continues_its_partial_assistant_message() {
    let request =
        chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5,"min_tokens":2}"#);
    let done = Progress {
        text: " Hello there".into(),
        tokens: 2,
        ..Progress::default()
    };
    let Ok(Some(LlmRequest::Chat(next))) = continue_request(&request, &done, &[Continuation::AssistantMessage]) else {
        panic!("a chat")
    };
    assert_eq!(next.messages.len(), 2);
    assert_eq!(next.messages[1].role, Role::Assistant);
    assert_eq!(next.messages[1].content.as_ref().unwrap().text(), " Hello there");
    assert_eq!(next.output_limit(), Some(3));
    assert_eq!(next.extra["continue_final_message"], true);
    assert_eq!(next.extra["add_generation_prompt"], false);
    assert_eq!(next.extra["min_tokens"], 0);
}

#[test]
fn switchyard_engines_continue_from_prompt_plus_generated_text() {
    let request = completion(r#"{"model":"m","prompt":"Once","max_tokens":10}"#);
    let Ok(Some(LlmRequest::Completion(next))) = continue_request(&request, &three_tokens(), &[Continuation::Text])
    else {
        panic!("a completion")
    };
    assert_eq!(next.prompt_text(), "Once upon a time");
    assert_eq!(next.max_tokens, Some(7));
}

#[test]
fn nothing_is_left_when_the_limit_was_reached() {
    let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#);
    assert_eq!(
        continue_request(&request, &three_tokens(), &[Continuation::TokenIds]),
        Ok(None)
    );
}

#[test]
fn before_the_first_token_any_request_starts_over_unchanged() {
    let request = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"},"max_tokens":3}"#,
    );
    assert_eq!(
        continue_request(&request, &Progress::default(), &[]),
        Ok(Some(request.clone()))
    );
}

#[test]
fn structured_output_and_tools_are_not_continued_mid_answer() {
    for extra in [
        r#""response_format":{"type":"json_object"}"#,
        r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
        r#""guided_json":{"type":"object"}"#,
    ] {
        let request = chat(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],{extra}}}"#
        ));
        let result = continue_request(&request, &three_tokens(), &[Continuation::TokenIds]);
        assert!(
            matches!(result, Err(CannotContinue::Structured { .. })),
            "{extra}: {result:?}"
        );
    }
    let plain = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"text"},"tools":[]}"#,
    );
    assert_eq!(
        structured_field(&plain),
        None,
        "plain text and no tools constrain nothing"
    );
}

#[test]
fn an_engine_that_cannot_continue_gets_a_clear_error_not_a_new_answer() {
    let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let error = continue_request(&request, &three_tokens(), &[]).unwrap_err();
    assert_eq!(error, CannotContinue::NoWay);
    assert!(error.to_string().contains("start a new answer"), "{error}");
}

fn card(engine: Option<EngineFeatures>) -> ModelCard {
    ModelCard {
        name: "m".into(),
        kinds: vec![ModelKind::Chat, ModelKind::Completions],
        context_length: 100,
        capacity: Default::default(),
        namespace: "n".into(),
        component: "c".into(),
        endpoint: "e".into(),
        instance_id: 1,
        tokenizer: None,
        kv_events: None,
        engine,
    }
}

fn engine(token_ids: bool, continues_message: bool) -> Option<EngineFeatures> {
    Some(EngineFeatures {
        server: "test".into(),
        liveness: Liveness::Health,
        one_at_a_time: false,
        load: LoadGauges::InFlight,
        token_ids,
        continues_message,
    })
}

#[test]
fn the_ways_are_those_every_worker_of_the_model_offers() {
    let vllm = card(engine(true, true));
    let old_vllm = card(engine(false, true));
    let llama = card(engine(false, false));
    let mocker = card(None);
    use Continuation::*;
    assert_eq!(
        Continuation::common([&vllm], ModelKind::Chat),
        vec![TokenIds, AssistantMessage]
    );
    assert_eq!(Continuation::common([&vllm], ModelKind::Completions), vec![TokenIds]);
    assert_eq!(
        Continuation::common([&vllm, &old_vllm], ModelKind::Chat),
        vec![AssistantMessage]
    );
    assert_eq!(Continuation::common([&vllm, &old_vllm], ModelKind::Completions), vec![]);
    assert_eq!(Continuation::common([&vllm, &llama], ModelKind::Chat), vec![]);
    assert_eq!(Continuation::common([&mocker], ModelKind::Completions), vec![Text]);
}

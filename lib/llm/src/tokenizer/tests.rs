use super::*;
use crate::openai::{CompletionRequest, parse_request};
use crate::testing::{CHATML_TEMPLATE, token_id, write_model_dir, write_tokenizer_json};
use std::error::Error as _;
use tempfile::TempDir;

fn model(template: Option<&str>) -> (TempDir, HfTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), template).unwrap();
    let tokenizer = HfTokenizer::from_dir(dir.path()).unwrap();
    (dir, tokenizer)
}

fn chat(body: &str) -> ChatCompletionRequest {
    parse_request(body.as_bytes()).unwrap()
}

fn ids(words: &[&str]) -> Vec<u32> {
    words.iter().map(|w| token_id(w)).collect()
}

/// The error and its causes, one per line, for asserting on what a user reads.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(&format!("\n{c}"));
        cause = c.source();
    }
    text
}

const TWO_TURNS: &str = r#"{"model":"m","messages":[
    {"role":"system","content":"I am fine"},
    {"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"world"}]}]}"#;

#[test]
fn a_tokenizer_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<HfTokenizer>();
}

#[test]
fn known_text_encodes_to_known_ids_with_and_without_bos() {
    let (_dir, tokenizer) = model(Some(CHATML_TEMPLATE));
    let words = ["hello", "world", ",", "how", "are", "you", "?"];
    assert_eq!(
        tokenizer.encode("hello world, how are you?", false).unwrap(),
        ids(&words)
    );
    let mut with_bos = ids(&["<s>"]);
    with_bos.extend(ids(&words));
    assert_eq!(tokenizer.encode("hello world, how are you?", true).unwrap(), with_bos);
    assert_eq!(
        tokenizer.encode("<|im_start|>zebra", false).unwrap(),
        ids(&["<|im_start|>", "<unk>"]),
        "special tokens in text are matched; unknown words are <unk>"
    );
}

#[test]
fn chat_renders_chatml_with_a_generation_prompt_and_newline_joined_text_parts() {
    let (_dir, tokenizer) = model(Some(CHATML_TEMPLATE));
    assert_eq!(
        tokenizer.render_chat(&chat(TWO_TURNS)).unwrap(),
        "<|im_start|>system\nI am fine<|im_end|>\n<|im_start|>user\nhello\nworld<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn add_generation_prompt_false_leaves_no_open_assistant_turn() {
    let (_dir, tokenizer) = model(Some(CHATML_TEMPLATE));
    let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"add_generation_prompt":false}"#);
    assert_eq!(
        tokenizer.render_chat(&request).unwrap(),
        "<|im_start|>user\nhello<|im_end|>\n"
    );
}

#[test]
fn continue_final_message_cuts_right_after_the_partial_assistant_text() {
    let (_dir, tokenizer) = model(Some(CHATML_TEMPLATE));
    let request = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hello"},{"role":"assistant","content":"I am"}],
            "continue_final_message":true,"add_generation_prompt":false}"#,
    );
    assert_eq!(
        tokenizer.render_chat(&request).unwrap(),
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nI am"
    );
    // add_generation_prompt defaults to false when continuing.
    let mut implicit = request.clone();
    implicit.extra.remove("add_generation_prompt");
    assert_eq!(
        tokenizer.render_chat(&implicit).unwrap(),
        tokenizer.render_chat(&request).unwrap()
    );
}

#[test]
fn continue_final_message_keeps_trailing_space_only_when_the_template_kept_it() {
    // Kept verbatim by ChatML: the space is part of the prompt.
    assert_eq!(
        cut_after_final_message("<a>I am <e>\n".into(), "I am ").unwrap(),
        "<a>I am "
    );
    // A template that strips content: cut after the stripped text.
    assert_eq!(
        cut_after_final_message("<a>I am<e>\n".into(), "  I am ").unwrap(),
        "<a>I am"
    );
    assert!(matches!(
        cut_after_final_message("<a>other<e>".into(), "I am"),
        Err(TokenizerError::InvalidRequest(
            InvalidChatRequest::FinalMessageNotRendered
        ))
    ));
}

#[test]
fn a_migrated_chat_request_tokenizes_as_its_open_assistant_message() {
    let (_dir, tokenizer) = model(Some(CHATML_TEMPLATE));
    let first = LlmRequest::Chat(chat(r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#));
    let done = crate::migration::Progress {
        text: "I am".into(),
        tokens: 2,
        ..Default::default()
    };
    let ways = [crate::migration::Continuation::AssistantMessage];
    let migrated = crate::migration::continue_request(&first, &done, &ways)
        .unwrap()
        .unwrap();
    assert_eq!(
        tokenizer.prompt_tokens(&migrated).unwrap(),
        ids(&[
            "<|im_start|>",
            "user",
            "hello",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
            "I",
            "am"
        ])
    );
}

#[test]
fn continue_and_generation_prompt_together_are_refused() {
    let (_dir, tokenizer) = model(Some(CHATML_TEMPLATE));
    let request = chat(
        r#"{"model":"m","messages":[{"role":"assistant","content":"I"}],"continue_final_message":true,"add_generation_prompt":true}"#,
    );
    assert!(matches!(
        tokenizer.render_chat(&request),
        Err(TokenizerError::InvalidRequest(
            InvalidChatRequest::ContinueAndGenerationPrompt
        ))
    ));
}

#[test]
fn chat_prompt_tokens_do_not_get_a_second_bos() {
    let template = format!("{{{{ bos_token }}}}{CHATML_TEMPLATE}");
    let (_dir, tokenizer) = model(Some(&template));
    let request = LlmRequest::Chat(chat(r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#));
    assert_eq!(
        tokenizer.prompt_tokens(&request).unwrap(),
        ids(&[
            "<s>",
            "<|im_start|>",
            "user",
            "hello",
            "<|im_end|>",
            "<|im_start|>",
            "assistant"
        ])
    );
}

#[test]
fn completion_prompt_tokens_get_the_special_tokens() {
    let (_dir, tokenizer) = model(None);
    let request: CompletionRequest = parse_request(br#"{"model":"m","prompt":["the cat sat"]}"#).unwrap();
    assert_eq!(
        tokenizer.prompt_tokens(&LlmRequest::Completion(request)).unwrap(),
        ids(&["<s>", "the", "cat", "sat"])
    );
}

#[test]
fn a_missing_tokenizer_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let error = HfTokenizer::from_dir(dir.path()).unwrap_err();
    let TokenizerError::Read { path, source } = &error else {
        panic!("a read error, got {error:?}")
    };
    assert_eq!(path, &dir.path().join("tokenizer.json"));
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer_json(dir.path()).unwrap();
    let error = HfTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(&error, TokenizerError::Read { path, .. } if path.ends_with("tokenizer_config.json")));
}

#[test]
fn malformed_json_names_the_file_and_keeps_the_parser_error_as_source() {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), None).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"bos_token\": ").unwrap();
    let error = HfTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(error, TokenizerError::InvalidConfig { .. }));
    assert!(error.to_string().contains("tokenizer_config.json"), "{error}");
    assert!(error.source().is_some(), "the cause is kept");

    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": 7}"#).unwrap();
    let error = HfTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        chain(&error).contains("bos_token"),
        "the wrong field is named: {}",
        chain(&error)
    );

    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let error = HfTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(&error, TokenizerError::InvalidTokenizer { path, .. } if path.ends_with("tokenizer.json")));
    assert!(error.source().is_some());
}

#[test]
fn a_chat_request_without_a_template_names_the_config_file() {
    let (dir, tokenizer) = model(None);
    let error = tokenizer.render_chat(&chat(TWO_TURNS)).unwrap_err();
    assert!(
        matches!(&error, TokenizerError::NoChatTemplate { path } if *path == dir.path().join("tokenizer_config.json"))
    );
    let message = error.to_string();
    assert!(
        message.contains("tokenizer_config.json") && message.contains("no chat_template"),
        "{message}"
    );
}

#[test]
fn a_template_that_raises_is_a_refusal_with_its_message() {
    let template = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}";
    let (_dir, tokenizer) = model(Some(template));
    let error = tokenizer.render_chat(&chat(TWO_TURNS)).unwrap_err();
    let TokenizerError::TemplateRaised { message } = &error else {
        panic!("a refusal, got {error:?}")
    };
    assert_eq!(message, "System role not supported");
}

#[test]
fn a_template_syntax_error_fails_the_load_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some("{% for m in messages %}{{ m.content }}")).unwrap();
    let error = HfTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(error, TokenizerError::TemplateSyntax { .. }), "{error:?}");
    assert!(error.to_string().contains("tokenizer_config.json"), "{error}");
    assert!(
        chain(&error).contains("syntax error"),
        "the cause says what is wrong: {}",
        chain(&error)
    );
}

#[test]
fn chat_template_jinja_wins_over_the_config_template() {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some("from the config")).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "{{ messages[0].content }}!\n").unwrap();
    let tokenizer = HfTokenizer::from_dir(dir.path()).unwrap();
    let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#);
    assert_eq!(
        tokenizer.render_chat(&request).unwrap(),
        "hello!",
        "one trailing newline is dropped, as in Jinja2"
    );
}

#[test]
fn named_templates_pick_tool_use_only_when_the_request_has_tools() {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), None).unwrap();
    let config = serde_json::json!({"chat_template": [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "tools: {{ tools | tojson }}"},
    ]});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = HfTokenizer::from_dir(dir.path()).unwrap();
    let plain = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(tokenizer.render_chat(&plain).unwrap(), "plain");
    let tools = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"a<b"}}]}"#,
    );
    assert_eq!(
        tokenizer.render_chat(&tools).unwrap(),
        r#"tools: [{"function": {"name": "a<b"}, "type": "function"}]"#,
        "Python's separators, no HTML escaping"
    );
}

#[test]
fn hf_template_idioms_render() {
    // Loop controls, Python string methods, namespace(), tojson(indent=…),
    // chat_template_kwargs, and whitespace control as transformers sets it.
    let template = "\
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ m.content.strip().upper() }}]
{% endfor %}
{{ ns.n }} {{ {'a': [1, 2]} | tojson(indent=2) }} {{ flavour }}";
    let (_dir, tokenizer) = model(Some(template));
    let request = chat(
        r#"{"model":"m","messages":[{"role":"system","content":"x"},{"role":"user","content":"  hi  "}],"chat_template_kwargs":{"flavour":"mint"}}"#,
    );
    assert_eq!(
        tokenizer.render_chat(&request).unwrap(),
        "    [HI]\n1 {\n  \"a\": [\n    1,\n    2\n  ]\n} mint"
    );
}

#[test]
fn strftime_formats_utc_dates_and_refuses_unknown_directives() {
    // 2024-07-26 13:25:09 UTC, a Friday.
    let secs = 1_722_000_309;
    assert_eq!(template::strftime("%d %b %Y", secs).unwrap(), "26 Jul 2024");
    assert_eq!(
        template::strftime("%A %B %y %H:%M:%S %%", secs).unwrap(),
        "Friday July 24 13:25:09 %"
    );
    assert!(template::strftime("%Q", secs).is_err());
}

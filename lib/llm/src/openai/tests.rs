use super::*;
use crate::protocol::LlmRequest;

fn chat(body: &str) -> Result<ChatCompletionRequest, InvalidRequest> {
    parse_request(body.as_bytes())
}

#[test]
fn a_minimal_chat_request_parses_with_defaults() {
    let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
    assert_eq!(request.model, "m");
    assert!(!request.stream);
    assert_eq!(request.messages[0].content.as_ref().unwrap().text(), "hi");
    assert!(request.extra.is_empty());
}

#[test]
fn unknown_fields_are_kept_for_pass_through() {
    let request = chat(
        r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"ann"}],
            "logit_bias":{"42":1},"user":"u-1","nvext":{"x":true}}"#,
    )
    .unwrap();
    assert_eq!(request.extra["user"], "u-1");
    assert_eq!(request.extra["nvext"]["x"], true);
    assert_eq!(request.messages[0].extra["name"], "ann");
    let again = serde_json::to_value(&request).unwrap();
    assert_eq!(again["logit_bias"]["42"], 1);
}

#[test]
fn unknown_fields_survive_the_msgpack_request_plane() {
    let request =
        chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_k":5,"guided":[1,"a"]}"#).unwrap();
    let wire = rmp_serde::to_vec_named(&LlmRequest::Chat(request.clone())).unwrap();
    let back: LlmRequest = rmp_serde::from_slice(&wire).unwrap();
    assert_eq!(back, LlmRequest::Chat(request));
}

#[test]
fn a_wrong_type_names_the_field_path() {
    let error = chat(r#"{"model":"m","messages":[{"role":"captain","content":"hi"}]}"#).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("messages[0].role"));
    assert!(error.message.contains("captain"), "{}", error.message);

    let error = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":"ten"}"#).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("max_tokens"));
}

#[test]
fn a_missing_field_is_named() {
    let error = chat(r#"{"model":"m"}"#).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("messages"));
    assert!(error.message.contains("missing field"), "{}", error.message);
}

#[test]
fn broken_json_and_non_objects_are_refused() {
    let error = chat(r#"{"model":"m","#).unwrap_err();
    assert!(error.message.contains("not valid JSON"), "{}", error.message);
    let error = chat("[1,2]").unwrap_err();
    assert!(error.message.contains("JSON object"), "{}", error.message);
}

#[test]
fn out_of_range_values_name_the_field_and_the_range() {
    let cases = [
        (r#""max_tokens":0"#, "max_tokens"),
        (r#""temperature":3.5"#, "temperature"),
        (r#""top_p":-0.1"#, "top_p"),
        (r#""n":2"#, "n"),
        (r#""stop":["a","b","c","d","e"]"#, "stop"),
        (r#""stop":"""#, "stop"),
        (r#""max_completion_tokens":0"#, "max_completion_tokens"),
    ];
    for (field, name) in cases {
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{field}}}"#);
        let error = chat(&body).unwrap_err();
        assert_eq!(error.field.as_deref(), Some(name), "{body}");
        assert!(error.message.starts_with(name), "{}", error.message);
    }
    let error = chat(r#"{"model":"m","messages":[]}"#).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("messages"));
}

#[test]
fn completions_take_a_string_or_a_batch_of_one() {
    let one: CompletionRequest = parse_request(br#"{"model":"m","prompt":"once upon"}"#).unwrap();
    assert_eq!(one.prompt_text(), "once upon");
    let batch: CompletionRequest = parse_request(br#"{"model":"m","prompt":["a time"]}"#).unwrap();
    assert_eq!(batch.prompt_text(), "a time");
    let error = parse_request::<CompletionRequest>(br#"{"model":"m","prompt":["a","b"]}"#).unwrap_err();
    assert_eq!(error.field.as_deref(), Some("prompt"));
}

#[test]
fn multi_part_content_joins_its_text_parts() {
    let request = chat(
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a "},
            {"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]}]}"#,
    )
    .unwrap();
    assert_eq!(request.messages[0].content.as_ref().unwrap().text(), "a b");
}

#[test]
fn max_completion_tokens_wins_over_max_tokens() {
    let request =
        chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7}"#)
            .unwrap();
    assert_eq!(request.output_limit(), Some(7));
    assert_eq!(LlmRequest::Chat(request).max_tokens(), Some(7));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

    /// What a worker decodes from the request plane: any bytes give a
    /// request or an error, never a panic (10,000 inputs per run).
    #[test]
    fn any_bytes_decode_to_a_request_or_an_error_never_a_panic(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
    ) {
        let _ = rmp_serde::from_slice::<LlmRequest>(&bytes);
        let _ = rmp_serde::from_slice::<crate::protocol::LlmOutput>(&bytes);
        let _ = parse_request::<ChatCompletionRequest>(&bytes);
        let _ = parse_request::<CompletionRequest>(&bytes);
    }
}

#[test]
fn duplicate_and_missing_fields_and_non_objects_are_named() {
    let twice = chat(r#"{"model":"m","model":"n","messages":[]}"#).unwrap_err();
    assert!(twice.message.contains("duplicate field `model`"), "{}", twice.message);
    let extra_twice = chat(r#"{"model":"m","messages":[],"user":"a","user":"b"}"#).unwrap_err();
    assert!(
        extra_twice.message.contains("duplicate field `user`"),
        "{}",
        extra_twice.message
    );
    let missing = chat(r#"{"messages":[]}"#).unwrap_err();
    assert_eq!(missing.field.as_deref(), Some("model"), "{}", missing.message);
    let array = chat("[1,2]").unwrap_err();
    assert!(array.message.contains("must be a JSON object"), "{}", array.message);
    let trailing = chat(r#"{"model":"m","messages":[]} x"#).unwrap_err();
    assert!(trailing.message.contains("not valid JSON"), "{}", trailing.message);
}

#[test]
fn requests_survive_the_request_plane_s_msgpack_with_their_unknown_fields() {
    let request =
        chat(r#"{"model":"m","messages":[{"role":"user","content":"hi","name":"ann"}],"top_k":3,"stream":true}"#)
            .unwrap();
    let bytes = rmp_serde::to_vec(&request).unwrap();
    let back: ChatCompletionRequest = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, request);
}

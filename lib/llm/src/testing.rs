//! Test helpers for other crates' tests (feature `testing`): they write a
//! small Hugging Face model directory, so a tokenizer can be loaded without
//! downloading a model. Never used outside tests.

use serde_json::json;
use std::path::Path;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// A ChatML template, as Qwen and many others ship it (without a system
/// prompt default).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The vocabulary: a token's id is its index. The first five are special;
/// any other word encodes as `<unk>` (0).
pub const VOCAB: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "tool",
    "hello",
    "world",
    "how",
    "are",
    "you",
    "I",
    "am",
    "fine",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    ".",
    ",",
    "?",
    "!",
];

/// The id of `word` in [`VOCAB`]; panics for a word not in it.
pub fn token_id(word: &str) -> u32 {
    let index = VOCAB.iter().position(|w| *w == word);
    let index = index.unwrap_or_else(|| panic!("{word:?} is not in the test vocabulary"));
    u32::try_from(index).expect("the vocabulary is small")
}

/// Writes `tokenizer.json` (a word-level model over [`VOCAB`] that splits on
/// whitespace and punctuation, and whose post-processor prepends `<s>`) and
/// `tokenizer_config.json` (with `chat_template` when one is given, `<s>` as
/// `bos_token` in the object form, `<|im_end|>` as `eos_token`) into `dir`.
pub fn write_model_dir(dir: &Path, chat_template: Option<&str>) -> std::io::Result<()> {
    write_tokenizer_json(dir)?;
    let mut config = json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": "<|im_end|>",
        "model_max_length": 4096,
    });
    if let Some(template) = chat_template {
        config["chat_template"] = json!(template);
    }
    std::fs::write(
        dir.join(crate::tokenizer::TOKENIZER_CONFIG_FILE),
        serde_json::to_vec_pretty(&config)?,
    )
}

/// Writes only `tokenizer.json` (see [`write_model_dir`]).
pub fn write_tokenizer_json(dir: &Path) -> std::io::Result<()> {
    let vocab = VOCAB.iter().map(|word| (word.to_string(), token_id(word))).collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("<unk>".into())
        .build()
        .expect("the test vocabulary holds its unknown token");
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    let special: Vec<AddedToken> = VOCAB[..5].iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(&special);
    let bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .expect("a valid single template")
        .special_tokens(vec![("<s>", token_id("<s>"))])
        .build()
        .expect("a valid post-processor");
    tokenizer.with_post_processor(Some(bos));
    let text = tokenizer
        .to_string(true)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    std::fs::write(dir.join(crate::tokenizer::TOKENIZER_FILE), text)
}

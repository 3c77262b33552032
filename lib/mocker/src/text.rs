//! A fake tokenizer and fake generated text: cheap, deterministic stand-ins for a real model's
//! vocabulary, good enough for prefix reuse (same text prefix, same token prefix) and readable output.
//! It knows nothing about any real model's token ids.

use crate::hash;
use std::collections::HashMap;
use std::sync::LazyLock;

/// Words the fake model "says". Any token id maps onto one of them, so output is always readable.
#[rustfmt::skip] // one word per line would make the list ten times longer to scroll through
const WORDS: &[&str] = &[
    "the", "river", "runs", "past", "a", "small", "town", "where", "people", "build", "boats", "and",
    "bridges", "every", "morning", "light", "falls", "on", "old", "stone", "walls", "while", "children", "walk", "to",
    "school", "with", "bright", "red", "bags", "in", "autumn", "leaves", "turn", "gold", "wind", "carries", "them",
    "over", "fields", "of", "wheat", "farmers", "gather", "harvest", "before", "rain", "comes", "from", "hills",
    "beyond", "forest", "birds", "sing", "at", "dawn", "evening", "brings", "quiet", "streets", "lamps", "glow",
    "warm", "yellow", "windows", "open", "music", "drifts", "across", "square", "market", "sells", "bread", "cheese",
    "apples", "fresh", "fish", "news", "travels", "fast", "stories", "grow", "longer", "each", "time", "they", "are",
    "told", "sea", "is", "calm", "today", "ships", "wait", "harbour", "for", "tide", "sailors", "mend", "nets",
    "under", "clear", "sky", "mountains", "stand", "far", "away", "snow", "rests", "their", "peaks", "long", "after",
    "spring", "arrives", "valley", "below", "fills", "flowers", "bees", "hum", "garden", "path", "leads", "quietly",
    "through", "trees", "toward", "house", "door", "always",
];

/// Roughly one sentence in this many words ends with a full stop.
const SENTENCE_EVERY: u64 = 11;

/// Splits `text` on whitespace and maps each word to a token id by a stable hash, so identical prompt
/// prefixes give identical token prefixes (what prefix reuse keys on). Empty text gives no tokens.
pub fn tokenize(text: &str) -> Vec<u32> {
    text.split_whitespace().map(word_id).collect()
}

/// The id of one whitespace-free word.
fn word_id(word: &str) -> u32 {
    // Keep the high bits: `fnv1a`'s low bits alone are weaker.
    (hash::mix(hash::fnv1a(word.as_bytes())) >> 32) as u32
}

/// Every piece of text the fake model can generate: each of [`WORDS`] as it is, capitalised,
/// followed by a full stop, or both. A piece's token id is the id [`tokenize`] gives its text, so
/// generated text read back as a prompt gives the very ids that were generated.
struct Vocabulary {
    pieces: HashMap<u32, Piece>,
}

struct Piece {
    text: String,
    ends_sentence: bool,
}

static VOCABULARY: LazyLock<Vocabulary> = LazyLock::new(|| {
    let mut pieces = HashMap::new();
    for word in WORDS {
        for text in [word.to_string(), capitalised(word)] {
            let stop = format!("{text}.");
            pieces.insert(
                word_id(&stop),
                Piece {
                    text: stop,
                    ends_sentence: true,
                },
            );
            pieces.insert(
                word_id(&text),
                Piece {
                    text,
                    ends_sentence: false,
                },
            );
        }
    }
    Vocabulary { pieces }
});

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .into_iter()
        .flat_map(char::to_uppercase)
        .chain(chars)
        .collect()
}

/// Readable text for a generated token: its word with a leading space. An id the fake model never
/// generates (a prompt's word, say) still reads as some word.
pub fn detokenize(token_id: u32) -> String {
    match VOCABULARY.pieces.get(&token_id) {
        Some(piece) => format!(" {}", piece.text),
        None => format!(" {}", WORDS[token_id as usize % WORDS.len()]),
    }
}

/// A greedy fake model: the next token is a pure function of every token before it (the prompt and
/// what was generated), as a real engine's is at temperature 0. So an answer continued on another
/// engine from prompt + generated text goes on exactly as it would have on the first.
///
/// Costs O(1) per token: the context is kept as a running hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greedy {
    context: u64,
    last: Option<u32>,
}

impl Greedy {
    /// The model after reading `tokens`.
    pub fn after(tokens: &[u32]) -> Self {
        let mut model = Greedy { context: 0, last: None };
        for &token in tokens {
            model.push(token);
        }
        model
    }

    /// Reads one more token.
    pub fn push(&mut self, token: u32) {
        self.context = hash::combine(self.context, u64::from(token));
        self.last = Some(token);
    }

    /// The token the model emits next. A sentence starts after a full stop or after anything the model
    /// would not say itself (the end of a prompt); it has at least two words.
    pub fn next(&self) -> u32 {
        let starts_sentence = self
            .last
            .and_then(|token| VOCABULARY.pieces.get(&token))
            .is_none_or(|piece| piece.ends_sentence);
        let ends_sentence = !starts_sentence && hash::mix(self.context ^ 0x5eed).is_multiple_of(SENTENCE_EVERY);
        let word = WORDS[(hash::mix(self.context) % WORDS.len() as u64) as usize];
        let mut text = if starts_sentence {
            capitalised(word)
        } else {
            word.to_string()
        };
        if ends_sentence {
            text.push('.');
        }
        word_id(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_blank_text_has_no_tokens() {
        assert!(tokenize("").is_empty());
        assert!(tokenize(" \n\t ").is_empty());
    }

    #[test]
    fn one_token_per_word_and_shared_prefixes_share_tokens() {
        let a = tokenize("You are a helpful assistant. Tell me a story");
        let b = tokenize("You are a helpful assistant.\nWhat is the time?");
        assert_eq!(a.len(), 9);
        assert_eq!(a[..5], b[..5]);
        assert_ne!(a[5], b[5]);
        assert_eq!(tokenize("same words"), tokenize("  same   words "));
    }

    /// `count` tokens the model generates after `prompt`.
    fn generate(prompt: &str, count: usize) -> Vec<u32> {
        let mut model = Greedy::after(&tokenize(prompt));
        (0..count)
            .map(|_| {
                let token = model.next();
                model.push(token);
                token
            })
            .collect()
    }

    fn text_of(tokens: &[u32]) -> String {
        tokens.iter().map(|&t| detokenize(t)).collect()
    }

    #[test]
    fn every_piece_of_the_vocabulary_has_its_own_id() {
        assert_eq!(VOCABULARY.pieces.len(), WORDS.len() * 4, "two pieces share an id");
    }

    #[test]
    fn generated_text_read_back_gives_the_generated_ids() {
        let tokens = generate("user: tell me a story\nassistant:", 200);
        assert_eq!(tokenize(&text_of(&tokens)), tokens);
    }

    #[test]
    fn the_answer_is_a_function_of_the_prompt_alone() {
        assert_eq!(generate("a prompt", 50), generate("a prompt", 50));
        assert_ne!(generate("a prompt", 50), generate("another prompt", 50));
    }

    #[test]
    fn an_answer_continued_from_prompt_and_text_goes_on_as_the_first_would() {
        let prompt = "user: tell me a story\nassistant:";
        let whole = text_of(&generate(prompt, 120));
        for cut in [1, 7, 60, 119] {
            let first = text_of(&generate(prompt, cut));
            let rest = text_of(&generate(&format!("{prompt}{first}"), 120 - cut));
            assert_eq!(format!("{first}{rest}"), whole, "cut after {cut} tokens");
        }
    }

    #[test]
    fn generated_text_reads_like_sentences() {
        let text = text_of(&generate("user: hello\nassistant:", 80));
        assert!(
            text.starts_with(' ') && text.chars().nth(1).is_some_and(char::is_uppercase),
            "{text}"
        );
        assert!(text.contains(". "), "{text}");
        // After every full stop the next word is capitalised, and no sentence is one word long.
        for (i, _) in text.match_indices(". ") {
            assert!(text[i + 2..].chars().next().is_some_and(char::is_uppercase), "{text}");
        }
        let sentences: Vec<&str> = text.split('.').collect();
        // The last sentence may be cut short by the end of the answer.
        for sentence in &sentences[..sentences.len() - 1] {
            assert!(sentence.split_whitespace().count() >= 2, "{sentence:?} in {text}");
        }
    }

    #[test]
    fn unknown_ids_still_read_as_a_word() {
        let piece = detokenize(tokenize("zebra")[0]);
        assert!(piece.starts_with(' ') && piece.trim().len() > 1, "{piece:?}");
    }
}

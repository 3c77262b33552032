//! A fake tokenizer and fake generated text: cheap, deterministic stand-ins for a real model's
//! vocabulary, good enough for prefix reuse (same text prefix, same token prefix) and readable output.
//! It knows nothing about any real model's token ids.

use crate::hash;

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
    // Keep the high bits: `fnv1a`'s low bits alone are weaker.
    text.split_whitespace()
        .map(|word| (hash::mix(hash::fnv1a(word.as_bytes())) >> 32) as u32)
        .collect()
}

/// Readable text for a generated token at generation position `position`: one word with a leading
/// space, capitalised at the start of a sentence and followed by "." at its end.
///
/// Sentence boundaries depend on the position only, so the function stays pure: whether position
/// `p` starts a sentence does not depend on which token was emitted at `p - 1`.
pub fn detokenize(token_id: u32, position: usize) -> String {
    let word = WORDS[token_id as usize % WORDS.len()];
    let starts_sentence = position == 0 || ends_sentence(position - 1);
    let mut piece = String::with_capacity(word.len() + 2);
    piece.push(' ');
    let mut chars = word.chars();
    if let (true, Some(first)) = (starts_sentence, chars.next()) {
        piece.extend(first.to_uppercase());
        piece.push_str(chars.as_str());
    } else {
        piece.push_str(word);
    }
    if ends_sentence(position) {
        piece.push('.');
    }
    piece
}

/// The token id the engine emits at generation `position` for a request with this `seed`.
pub fn generated_token(seed: u64, position: usize) -> u32 {
    (hash::combine(hash::mix(seed), position as u64) >> 32) as u32
}

fn ends_sentence(position: usize) -> bool {
    // Never end on the very first word: a one-word sentence reads badly.
    position > 0 && hash::mix(position as u64 ^ 0x5eed).is_multiple_of(SENTENCE_EVERY)
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

    #[test]
    fn detokenize_is_pure_and_never_empty() {
        for position in 0..200 {
            let id = generated_token(42, position);
            let piece = detokenize(id, position);
            assert_eq!(piece, detokenize(id, position));
            assert!(piece.starts_with(' ') && piece.trim().len() > 1, "{piece:?}");
        }
    }

    #[test]
    fn generated_text_reads_like_sentences() {
        let text: String = (0..60).map(|p| detokenize(generated_token(7, p), p)).collect();
        assert!(
            text.starts_with(' ') && text.chars().nth(1).is_some_and(char::is_uppercase),
            "{text}"
        );
        assert!(text.contains(". "), "{text}");
        // After every full stop the next word is capitalised.
        for (i, _) in text.match_indices(". ") {
            assert!(text[i + 2..].chars().next().is_some_and(char::is_uppercase), "{text}");
        }
    }

    #[test]
    fn generated_tokens_depend_on_seed_and_position() {
        assert_eq!(generated_token(1, 3), generated_token(1, 3));
        assert_ne!(generated_token(1, 3), generated_token(2, 3));
        let distinct: std::collections::HashSet<u32> = (0..100).map(|p| generated_token(1, p)).collect();
        assert!(distinct.len() > 90);
    }
}

//! Stop sequences over streamed text: finds the first stop sequence in what
//! was generated, and holds back a tail that could still become one, so the
//! client never sees text that a later piece turns into a stop.

/// Feeds generated text in pieces and says what may be sent.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    sequences: Vec<String>,
    /// Text generated but not yet released (a possible start of a stop sequence).
    held: String,
}

/// What to do with the text after a piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStep {
    /// Send this text (may be empty) and go on.
    Continue(String),
    /// A stop sequence matched: send this text (before the sequence) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(sequences: Vec<String>) -> Self {
        Self {
            sequences: sequences.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> StopStep {
        self.held.push_str(piece);
        let first_match = self
            .sequences
            .iter()
            .filter_map(|sequence| self.held.find(sequence.as_str()))
            .min();
        if let Some(at) = first_match {
            let before = self.held[..at].to_string();
            self.held.clear();
            return StopStep::Stopped(before);
        }
        let keep = self.longest_partial_match();
        let release = self.held.len() - keep;
        let released = self.held[..release].to_string();
        self.held.drain(..release);
        StopStep::Continue(released)
    }

    /// Whatever is still held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop sequence.
    fn longest_partial_match(&self) -> usize {
        let mut best = 0;
        for sequence in &self.sequences {
            for (end, _) in sequence.char_indices().skip(1) {
                let prefix = &sequence[..end];
                if end > best && self.held.ends_with(prefix) {
                    best = end;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_without_stop_sequences_passes_straight_through() {
        let mut matcher = StopMatcher::new(vec![]);
        assert_eq!(matcher.push(" hello"), StopStep::Continue(" hello".into()));
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn a_stop_sequence_split_across_pieces_is_found_and_never_sent() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push(" the E"), StopStep::Continue(" the ".into()));
        assert_eq!(matcher.push("N"), StopStep::Continue(String::new()));
        assert_eq!(matcher.push("D and more"), StopStep::Stopped(String::new()));
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_match() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push(" E"), StopStep::Continue(" ".into()));
        assert_eq!(matcher.push("gg"), StopStep::Continue("Egg".into()));
    }

    #[test]
    fn the_earliest_of_several_sequences_wins() {
        let mut matcher = StopMatcher::new(vec!["river".into(), " the".into()]);
        assert_eq!(matcher.push("a river the"), StopStep::Stopped("a ".into()));
    }

    #[test]
    fn held_text_is_returned_at_the_end() {
        let mut matcher = StopMatcher::new(vec!["xyz".into()]);
        assert_eq!(matcher.push("abcx"), StopStep::Continue("abc".into()));
        assert_eq!(matcher.finish(), "x");
    }
}

//! Streaming text out of streaming tokens: an incremental detokenizer that emits only whole
//! UTF-8 characters (a character whose bytes span several tokens waits for its last token), and
//! a stop-string matcher that holds back text which may turn out to begin a stop string.

use yoco_worker::tokenizer::Tokenizer;

/// Turns a growing list of token ids into text deltas. Decodes a small window of recent tokens
/// rather than the whole output, so each token costs O(1) however long the output gets.
#[derive(Debug, Default)]
pub struct IncrementalDetokenizer {
    tokens: Vec<u32>,
    /// The window `tokens[prefix..]` is decoded; `tokens[prefix..read]` is text already given.
    prefix: usize,
    read: usize,
}

impl IncrementalDetokenizer {
    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let before = tok.decode(&self.tokens[self.prefix..self.read]);
        let now = tok.decode(&self.tokens[self.prefix..]);
        // A trailing U+FFFD means the last character is not complete yet: wait for more tokens.
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return String::new();
        }
        let delta = match now.get(before.len()..) {
            Some(d) if now.starts_with(&before) => d.to_string(),
            // A tokenizer whose decoding of the window changed earlier text (rare): give what is
            // new after the common prefix.
            _ => now.chars().skip(before.chars().count()).collect(),
        };
        self.prefix = self.read;
        self.read = self.tokens.len();
        delta
    }

    /// The text of tokens still held back (an incomplete character at the end of the output).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let before = tok.decode(&self.tokens[self.prefix..self.read]);
        let now = tok.decode(&self.tokens[self.prefix..]);
        self.prefix = self.read;
        self.read = self.tokens.len();
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}

/// Where the generated text stands against the request's stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet given to the client: a suffix that may begin a stop string.
    held: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to send.
    Continue(String),
    /// A stop string appeared: send the text before it, then stop.
    Stopped { text: String, stop: String },
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, held: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.held.push_str(delta);
        // The earliest stop string in the text; on a tie, the longest.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, std::cmp::Reverse(s.len()), s)))
            .min();
        if let Some((at, _, stop)) = found {
            let text = self.held[..at].to_string();
            let stop = stop.clone();
            self.held.clear();
            return StopOutcome::Stopped { text, stop };
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let text = self.held[..keep].to_string();
        self.held.drain(..keep);
        StopOutcome::Continue(text)
    }

    /// The held-back text, at the end of generation (it did not become a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token's text, one at a time, joins up to the text of all tokens at once.
    #[test]
    fn deltas_join_to_the_full_decoding_and_are_whole_characters() {
        let tok = Tokenizer::cl100k();
        for text in ["Hello, world!", "Grüße — 你好 🦀🦀 naïve café", "🦀", "a\u{301}b 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
        {
            let ids = tok.encode(text).unwrap();
            let mut d = IncrementalDetokenizer::default();
            let mut out = String::new();
            for &id in &ids {
                let delta = d.push(&tok, id);
                assert!(!delta.contains('\u{FFFD}'), "{text:?}: partial character in {delta:?}");
                out.push_str(&delta);
            }
            out.push_str(&d.flush(&tok));
            assert_eq!(out, text);
        }
    }

    #[test]
    fn a_character_split_across_tokens_waits_for_its_last_byte() {
        let tok = Tokenizer::cl100k();
        // cl100k encodes this rare CJK character as several byte tokens.
        let ids = tok.encode("龘").unwrap();
        assert!(ids.len() > 1, "test needs a multi-token character: {ids:?}");
        let mut d = IncrementalDetokenizer::default();
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(d.push(&tok, id), "");
        }
        assert_eq!(d.push(&tok, ids[ids.len() - 1]), "龘");
    }

    #[test]
    fn an_incomplete_character_at_the_end_is_flushed_as_replacement() {
        let tok = Tokenizer::cl100k();
        let ids = tok.encode("龘").unwrap();
        let mut d = IncrementalDetokenizer::default();
        assert_eq!(d.push(&tok, ids[0]), "");
        assert_eq!(d.flush(&tok), "\u{FFFD}");
    }

    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, stop } => {
                    out.push_str(&text);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_strings_across_deltas() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".into(), Some("END".into())));
        assert_eq!(run(&["END"], &["abc E", "N", "x"]), ("abc ENx".into(), None));
        // A prefix held back at the end is given when generation ends for another reason.
        assert_eq!(run(&["END"], &["abc EN"]), ("abc EN".into(), None));
        // Earliest match wins; at the same place, the longest.
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), Some("b".into())));
        assert_eq!(run(&["ab", "abc"], &["xabcx"]), ("x".into(), Some("abc".into())));
        assert_eq!(run(&["\n\n"], &["line\n", "\nmore"]), ("line".into(), Some("\n\n".into())));
        assert_eq!(run(&["😀"], &["a😀"]), ("a".into(), Some("😀".into())));
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_be_a_stop() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("xS"), StopOutcome::Continue("x".into()));
        assert_eq!(m.push("T"), StopOutcome::Continue("".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("STx".into()));
    }
}

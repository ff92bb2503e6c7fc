//! From tokens to text as a client sees it: incremental decoding that never splits a UTF-8
//! character or a multi-token word, and stop strings (cut before the match, generation ends).

use ferrotune_data::Tokenizer;

/// Text of a growing answer.
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Characters already handed out.
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stops: Vec<String>) -> Detokenizer<'a> {
        Detokenizer {
            tokenizer,
            ids: Vec::new(),
            sent: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: false,
        }
    }

    /// Add a token; returns new text that is safe to send (held back while it could still be
    /// the start of a stop string or an incomplete character).
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(id);
        let text = self.tokenizer.decode_text(&self.ids).unwrap_or_default();
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            return take_from(&text, self.sent, at, &mut self.sent);
        }
        if text.ends_with('\u{FFFD}') {
            return String::new();
        }
        // Hold back a suffix that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&text, s))
            .max()
            .unwrap_or(0);
        let end = text.len() - hold;
        take_from(&text, self.sent, end, &mut self.sent)
    }

    /// Whatever was held back, at the end (unless a stop string cut it).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.tokenizer.decode_text(&self.ids).unwrap_or_default();
        let end = text.len();
        take_from(&text, self.sent, end, &mut self.sent)
    }

    /// A stop string was seen: generation should end.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

fn take_from(text: &str, from: usize, to: usize, sent: &mut usize) -> String {
    if to <= from || !text.is_char_boundary(from) || !text.is_char_boundary(to) {
        return String::new();
    }
    *sent = to;
    text[from..to].to_string()
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| {
            stop.is_char_boundary(n)
                && text.len() >= n
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffix_that_may_start_a_stop_string_is_held_back() {
        assert_eq!(longest_suffix_prefix("hello wor", "world"), 3);
        assert_eq!(longest_suffix_prefix("hello", "world"), 0);
        assert_eq!(
            longest_suffix_prefix("ab", "b"),
            0,
            "a full match is not a prefix"
        );
    }
}

//! Which tokens of a rendered conversation are trained: each assistant turn's content and the
//! closing text the template emits after it (Phi-3: `<|end|>` and its newline), nothing else.
//!
//! The conversation is rendered once and tokenized once, so SentencePiece's leading-space
//! handling and special tokens that swallow whitespace (`rstrip`) behave exactly as in the
//! reference. Spans are found in the text, for any template, by rendering probes:
//! - content of turn i: render again with that turn's content replaced by a sentinel; the two
//!   texts differ exactly where the content sits (this also follows templates that `trim`);
//! - closing of turn i: render the conversation cut after turn i (followed by a probe user turn
//!   when i is last); the text it shares with the full rendering ends where turn i's closing ends.
//! - fast path: see [`assistant_spans`]; tests run both paths on every fixture.
//!
//! A span maps to tokens as transformers' `return_assistant_tokens_mask` maps a `{% generation %}`
//! span: from the token holding the first character to the last token that ends inside it.

use crate::chat_template::ChatTemplate;
use crate::record::{BadRowReason, Message, Role};
use crate::tokenizer::Tokenizer;

/// Private-use characters no real content starts or ends with.
const SENTINEL: &str = "\u{E000}\u{F8FF}";

/// A conversation as tokens, with a flag per token saying whether it is trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedConversation {
    pub ids: Vec<u32>,
    pub trainable: Vec<bool>,
}

impl TokenizedConversation {
    /// Labels in the Hugging Face convention: the token id where trained, -100 elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        labels_from_mask(&self.ids, &self.trainable)
    }
}

/// Labels in the Hugging Face convention from ids and a trained-token mask.
pub fn labels_from_mask(ids: &[u32], trainable: &[bool]) -> Vec<i64> {
    ids.iter()
        .zip(trainable)
        .map(|(&id, &t)| if t { i64::from(id) } else { -100 })
        .collect()
}

/// Byte range `[start, end)` of one assistant turn in the rendered text: content, then closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssistantSpan {
    pub content_start: usize,
    pub content_end: usize,
    pub closing_end: usize,
}

/// Render, tokenize and mask one conversation.
pub fn tokenize_conversation(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
) -> Result<TokenizedConversation, (BadRowReason, String)> {
    let text = template
        .render(messages, false)
        .map_err(|e| (BadRowReason::TemplateError, e))?;
    let spans =
        assistant_spans(template, messages, &text).map_err(|e| (BadRowReason::TemplateError, e))?;
    let enc = tokenizer
        .encode(&text)
        .map_err(|e| (BadRowReason::TemplateError, format!("tokenizer: {e}")))?;
    let trainable = mask_tokens(&enc.offsets, &spans);
    if !trainable.iter().any(|&t| t) {
        return Err((
            BadRowReason::TemplateError,
            "the chat template rendered no assistant text to train on".into(),
        ));
    }
    Ok(TokenizedConversation {
        ids: enc.ids,
        trainable,
    })
}

/// Locate every assistant turn of `messages` in `text` (= the full rendering).
///
/// Fast path (templates that insert contents verbatim, nearly all): one extra render with every
/// content replaced by a numbered sentinel places all turns at once, and the closing of a turn is
/// looked up by the exact text between it and the next turn, learned once per template by the
/// probe below and cached. Anything unusual falls back to probing turn by turn.
pub fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
    text: &str,
) -> Result<Vec<AssistantSpan>, String> {
    let Some(positions) = content_positions(template, messages, text)? else {
        return probed_spans(template, messages, text);
    };
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let (start, end) = positions[i];
        let next = messages.get(i + 1).map(|m| m.role);
        let gap_end = positions.get(i + 1).map_or(text.len(), |p| p.0);
        let gap = &text[end..gap_end];
        let closing_len = match template.cached_closing(next, gap) {
            Some(len) => len,
            None => {
                let closing_end = closing_end(template, messages, i, text, end)?;
                let len = closing_end - end;
                if closing_end <= gap_end {
                    template.cache_closing(next, gap, len);
                }
                len
            }
        };
        spans.push(AssistantSpan {
            content_start: start,
            content_end: end,
            closing_end: end + closing_len,
        });
    }
    Ok(spans)
}

/// Byte range of every message's content in `text`, or `None` when the template does not
/// insert contents verbatim (then turns are probed one by one).
fn content_positions(
    template: &ChatTemplate,
    messages: &[Message],
    text: &str,
) -> Result<Option<Vec<(usize, usize)>>, String> {
    let probe: Vec<Message> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| Message {
            role: m.role,
            content: format!("\u{E000}{i}\u{F8FF}"),
        })
        .collect();
    let probed = template.render(&probe, false)?;
    let mut positions = Vec::with_capacity(messages.len());
    let (mut cursor, mut shift) = (0usize, 0isize);
    for (i, m) in messages.iter().enumerate() {
        let sentinel = &probe[i].content;
        let Some(found) = probed[cursor..].find(sentinel.as_str()) else {
            return Ok(None);
        };
        let at = cursor + found;
        // The text between sentinels must be the real text between contents.
        let real_at = (at as isize + shift) as usize;
        let prev_end = positions.last().map_or(0, |&(_, e)| e);
        if text.get(prev_end..real_at) != probed.get(cursor..at) {
            return Ok(None);
        }
        positions.push((real_at, real_at + m.content.len()));
        if text.get(real_at..real_at + m.content.len()) != Some(m.content.as_str()) {
            return Ok(None);
        }
        cursor = at + sentinel.len();
        shift += m.content.len() as isize - sentinel.len() as isize;
    }
    let prev_end = positions.last().map_or(0, |&(_, e)| e);
    if text.get(prev_end..) != probed.get(cursor..) {
        return Ok(None);
    }
    Ok(Some(positions))
}

/// Turn-by-turn probing, for templates that transform contents (e.g. `trim`); also the
/// reference the fast path is tested against.
pub fn probed_spans(
    template: &ChatTemplate,
    messages: &[Message],
    text: &str,
) -> Result<Vec<AssistantSpan>, String> {
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let mut probe = messages.to_vec();
        probe[i].content = SENTINEL.to_string();
        let probed = template.render(&probe, false)?;
        let start = floor_char_boundary(text, common_prefix(text.as_bytes(), probed.as_bytes()));
        let suffix = common_suffix(&text.as_bytes()[start..], &probed.as_bytes()[start..]);
        let end = ceil_char_boundary(text, text.len() - suffix);
        spans.push(AssistantSpan {
            content_start: start,
            content_end: end,
            closing_end: closing_end(template, messages, i, text, end)?,
        });
    }
    Ok(spans)
}

/// Where turn `i`'s closing ends: the rendering cut after turn `i` (plus a probe user turn when
/// `i` is last) shares `text` up to there.
fn closing_end(
    template: &ChatTemplate,
    messages: &[Message],
    i: usize,
    text: &str,
    content_end: usize,
) -> Result<usize, String> {
    let mut cut = messages[..=i].to_vec();
    if i + 1 == messages.len() {
        cut.push(Message {
            role: Role::User,
            content: SENTINEL.to_string(),
        });
    }
    let after = template.render(&cut, false)?;
    Ok(common_prefix(text.as_bytes(), after.as_bytes()).max(content_end))
}

/// Per token: trained or not, given byte offsets `[start, end)` per token and the turn spans.
pub fn mask_tokens(offsets: &[(usize, usize)], spans: &[AssistantSpan]) -> Vec<bool> {
    let mut mask = vec![false; offsets.len()];
    for span in spans {
        // Offsets' ends never decrease along the sequence, so both bounds are binary searches.
        let first = offsets.partition_point(|&(_, e)| e <= span.content_start);
        let past_last = offsets.partition_point(|&(_, e)| e <= span.closing_end);
        for m in mask.iter_mut().take(past_last).skip(first) {
            *m = true;
        }
    }
    mask
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_covers_from_first_touched_token_to_last_token_ending_in_span() {
        // tokens: [0,9) [9,11) [11,17) [17,25) [25,39) [39,43) [43,52) [52,60) [60,73)
        let offsets = [
            (0, 9),
            (9, 11),
            (11, 17),
            (17, 25),
            (25, 39),
            (39, 43),
            (43, 52),
            (52, 60),
            (60, 73),
        ];
        let span = AssistantSpan {
            content_start: 39,
            content_end: 52,
            closing_end: 62, // shares "<|" with the next token: that token is not trained
        };
        let mask = mask_tokens(&offsets, &[span]);
        assert_eq!(
            mask,
            [false, false, false, false, false, true, true, true, false]
        );
    }

    #[test]
    fn content_inside_a_token_that_swallowed_it_trains_that_token() {
        // `<|assistant|>` with rstrip absorbs "\n   " (content "   " at 30..33).
        let offsets = [(0, 20), (20, 33), (33, 41), (41, 54)];
        let span = AssistantSpan {
            content_start: 30,
            content_end: 33,
            closing_end: 41,
        };
        assert_eq!(mask_tokens(&offsets, &[span]), [false, true, true, false]);
    }

    #[test]
    fn char_boundaries_snap_outward() {
        let s = "aé";
        assert_eq!(floor_char_boundary(s, 2), 1);
        assert_eq!(ceil_char_boundary(s, 2), 3);
    }
}

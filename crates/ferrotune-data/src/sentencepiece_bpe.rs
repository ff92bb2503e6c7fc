//! A fast, exact encoder for SentencePiece-style BPE `tokenizer.json`s (Llama, Phi-3, Mistral).
//!
//! The `tokenizers` crate spends most of an encode allocating: a `String` per token, per-byte
//! alignment tables per segment, a whole-segment BPE word. This encoder does the same steps
//! with none of that, for the one tokenizer shape it recognises, and declines anything else
//! (the caller then uses the `tokenizers` crate):
//!
//! 1. added tokens (all `normalized: false`, not `single_word`) are cut out of the raw text by
//!    leftmost-longest matching, `lstrip`/`rstrip` swallowing neighbouring whitespace;
//! 2. each remaining segment is normalised: `▁` prepended (if the normaliser says so), spaces
//!    replaced by `▁`;
//! 3. the segment is cut before every `▁` that follows another character (exact: see
//!    `tokenizer.rs`) and each word is merged by BPE rank, leftmost first on ties, chars missing
//!    from the vocabulary falling back to `<0xNN>` byte tokens; words are cached per thread.
//!
//! Offsets are byte ranges of the original text, as the `tokenizers` crate reports them; tests
//! compare ids and offsets with it.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

use ahash::AHashMap;
use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;

const METASPACE: char = '\u{2581}';
/// Words cached per thread before the cache is cleared (bounded memory on huge corpora).
const CACHE_WORDS: usize = 200_000;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

struct AddedToken {
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

pub struct SentencePieceBpe {
    /// Single-character tokens, the initial BPE symbols.
    chars: AHashMap<char, u32>,
    /// `<0x00>`..`<0xFF>`.
    bytes: [u32; 256],
    /// (left, right) → (rank, merged id).
    merges: AHashMap<(u32, u32), (u32, u32)>,
    added: Option<AhoCorasick>,
    added_tokens: Vec<AddedToken>,
    prepend: bool,
    instance: u64,
}

/// Tokens of a cached word: id and the span `[start, end)` of the word's chars it covers
/// (byte-fallback tokens of one char all cover that char).
type WordTokens = Box<[(u32, u32, u32)]>;

thread_local! {
    static CACHE: RefCell<(u64, AHashMap<Box<str>, WordTokens>)> =
        RefCell::new((0, AHashMap::new()));
}

impl SentencePieceBpe {
    /// Build from a parsed `tokenizer.json`; `None` if it is not exactly the supported shape.
    pub fn from_json(json: &Value) -> Option<SentencePieceBpe> {
        let model = json.get("model")?;
        let null_or_absent = |k: &str| model.get(k).is_none_or(Value::is_null);
        if model.get("type")?.as_str()? != "BPE"
            || model.get("byte_fallback")?.as_bool() != Some(true)
            || !null_or_absent("dropout")
            || !null_or_absent("continuing_subword_prefix")
            || !null_or_absent("end_of_word_suffix")
            || model.get("ignore_merges").and_then(Value::as_bool) == Some(true)
            || !json.get("pre_tokenizer").is_none_or(Value::is_null)
        {
            return None;
        }
        let prepend = normaliser_prepends(json.get("normalizer")?)?;
        let vocab: AHashMap<&str, u32> = model
            .get("vocab")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.as_str(), u32::try_from(v.as_u64()?).ok()?)))
            .collect::<Option<_>>()?;
        if !vocab.keys().all(|t| no_metaspace_after_other(t)) {
            return None;
        }
        let mut bytes = [0u32; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = *vocab.get(format!("<0x{b:02X}>").as_str())?;
        }
        let chars = vocab
            .iter()
            .filter_map(|(t, &id)| {
                let mut it = t.chars();
                let c = it.next()?;
                it.next().is_none().then_some((c, id))
            })
            .collect();
        let mut merges = AHashMap::new();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(pair) if pair.len() == 2 => (pair[0].as_str()?, pair[1].as_str()?),
                _ => return None,
            };
            let merged = vocab.get(format!("{a}{b}").as_str())?;
            merges.insert((*vocab.get(a)?, *vocab.get(b)?), (rank as u32, *merged));
        }
        let mut patterns = Vec::new();
        let mut added_tokens = Vec::new();
        for t in json.get("added_tokens")?.as_array()? {
            let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            if flag("normalized") || flag("single_word") {
                return None;
            }
            patterns.push(t.get("content")?.as_str()?.to_string());
            added_tokens.push(AddedToken {
                id: u32::try_from(t.get("id")?.as_u64()?).ok()?,
                lstrip: flag("lstrip"),
                rstrip: flag("rstrip"),
            });
        }
        let added = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&patterns)
                    .ok()?,
            )
        };
        Some(SentencePieceBpe {
            chars,
            bytes,
            merges,
            added,
            added_tokens,
            prepend,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Token ids and original-text byte offsets, special tokens in the text recognised.
    pub fn encode(&self, text: &str, ids: &mut Vec<u32>, offsets: &mut Vec<(usize, usize)>) {
        let mut pos = 0;
        if let Some(ac) = &self.added {
            for m in ac.find_iter(text) {
                let token = &self.added_tokens[m.pattern().as_usize()];
                let mut start = m.start();
                let mut stop = m.end();
                if token.lstrip {
                    let ws = text[pos..start]
                        .chars()
                        .rev()
                        .take_while(|c| c.is_whitespace())
                        .map(char::len_utf8)
                        .sum::<usize>();
                    start -= ws;
                }
                if token.rstrip {
                    stop += text[stop..]
                        .chars()
                        .take_while(|c| c.is_whitespace())
                        .map(char::len_utf8)
                        .sum::<usize>();
                }
                if pos < start {
                    self.encode_segment(text, pos, start, ids, offsets);
                }
                ids.push(token.id);
                offsets.push((start, stop));
                pos = stop;
            }
        }
        if pos < text.len() {
            self.encode_segment(text, pos, text.len(), ids, offsets);
        }
    }

    fn encode_segment(
        &self,
        text: &str,
        from: usize,
        to: usize,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
    ) {
        // Normalised chars with the original byte range each came from.
        let mut norm: Vec<(char, usize, usize)> = Vec::with_capacity(to - from + 1);
        for (i, c) in text[from..to].char_indices() {
            let (s, e) = (from + i, from + i + c.len_utf8());
            if self.prepend && norm.is_empty() {
                norm.push((METASPACE, s, e));
            }
            norm.push((if c == ' ' { METASPACE } else { c }, s, e));
        }
        let mut word = String::new();
        let mut start = 0;
        while start < norm.len() {
            let mut end = start + 1;
            while end < norm.len() && !(norm[end].0 == METASPACE && norm[end - 1].0 != METASPACE) {
                end += 1;
            }
            word.clear();
            word.extend(norm[start..end].iter().map(|n| n.0));
            self.with_word_tokens(&word, |tokens| {
                for &(id, cs, ce) in tokens {
                    ids.push(id);
                    offsets.push((norm[start + cs as usize].1, norm[start + ce as usize - 1].2));
                }
            });
            start = end;
        }
    }

    fn with_word_tokens(&self, word: &str, f: impl FnOnce(&[(u32, u32, u32)])) {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != self.instance || cache.1.len() >= CACHE_WORDS {
                cache.1.clear();
                cache.0 = self.instance;
            }
            if let Some(tokens) = cache.1.get(word) {
                f(tokens);
                return;
            }
            let tokens = self.bpe(word);
            f(&tokens);
            cache.1.insert(word.into(), tokens);
        });
    }

    /// Merge one word by rank, leftmost first among equal ranks (as SentencePiece and the
    /// `tokenizers` crate do).
    fn bpe(&self, word: &str) -> WordTokens {
        // Symbols: id, char span [start, end), linked list.
        struct Sym {
            id: u32,
            start: u32,
            end: u32,
            prev: i32,
            next: i32,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        for (ci, c) in word.chars().enumerate() {
            let ci = ci as u32;
            match self.chars.get(&c) {
                Some(&id) => syms.push(Sym {
                    id,
                    start: ci,
                    end: ci + 1,
                    prev: 0,
                    next: 0,
                }),
                None => {
                    let mut buf = [0u8; 4];
                    for &b in c.encode_utf8(&mut buf).as_bytes() {
                        syms.push(Sym {
                            id: self.bytes[b as usize],
                            start: ci,
                            end: ci + 1,
                            prev: 0,
                            next: 0,
                        });
                    }
                }
            }
        }
        let n = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.prev = i as i32 - 1;
            s.next = if i + 1 < n { i as i32 + 1 } else { -1 };
        }
        let mut heap = BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            if let Some(&(rank, new_id)) = self.merges.get(&(syms[i].id, syms[i + 1].id)) {
                heap.push(Reverse((rank, i as u32, new_id)));
            }
        }
        let mut removed = vec![false; n];
        while let Some(Reverse((rank, pos, new_id))) = heap.pop() {
            let pos = pos as usize;
            if removed[pos] || syms[pos].next < 0 {
                continue;
            }
            let right = syms[pos].next as usize;
            // The pair may have changed since this candidate was queued.
            match self.merges.get(&(syms[pos].id, syms[right].id)) {
                Some(&(r, id)) if r == rank && id == new_id => {}
                _ => continue,
            }
            syms[pos].id = new_id;
            syms[pos].end = syms[right].end;
            syms[pos].next = syms[right].next;
            removed[right] = true;
            if syms[pos].next >= 0 {
                let nn = syms[pos].next as usize;
                syms[nn].prev = pos as i32;
                if let Some(&(r, id)) = self.merges.get(&(syms[pos].id, syms[nn].id)) {
                    heap.push(Reverse((r, pos as u32, id)));
                }
            }
            if syms[pos].prev >= 0 {
                let p = syms[pos].prev as usize;
                if let Some(&(r, id)) = self.merges.get(&(syms[p].id, syms[pos].id)) {
                    heap.push(Reverse((r, p as u32, id)));
                }
            }
        }
        syms.iter()
            .zip(&removed)
            .filter(|(_, &gone)| !gone)
            .map(|(s, _)| (s.id, s.start, s.end))
            .collect()
    }
}

fn is_replace_space(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("Replace")
        && v.pointer("/pattern/String").and_then(Value::as_str) == Some(" ")
        && v.get("content").and_then(Value::as_str) == Some("\u{2581}")
}

fn is_prepend_metaspace(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("Prepend")
        && v.get("prepend").and_then(Value::as_str) == Some("\u{2581}")
}

/// `Some(prepends)` for `Sequence[Prepend("▁"), Replace(" " → "▁")]` or a lone `Replace`.
fn normaliser_prepends(n: &Value) -> Option<bool> {
    if is_replace_space(n) {
        return Some(false);
    }
    if n.get("type")?.as_str()? != "Sequence" {
        return None;
    }
    match n.get("normalizers")?.as_array()?.as_slice() {
        [p, r] if is_prepend_metaspace(p) && is_replace_space(r) => Some(true),
        [r] if is_replace_space(r) => Some(false),
        _ => None,
    }
}

fn no_metaspace_after_other(token: &str) -> bool {
    let mut prev_other = false;
    for c in token.chars() {
        if c == METASPACE && prev_other {
            return false;
        }
        prev_other = c != METASPACE;
    }
    true
}

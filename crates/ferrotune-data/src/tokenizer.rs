//! `tokenizer.json` applied as written (the `tokenizers` crate), plus one exact speed-up.
//!
//! SentencePiece-style BPE tokenizers (Llama, Phi-3) have no pre-tokenizer: every stretch of text
//! between special tokens is one "word", merged as a whole, so the BPE word cache never hits and
//! long turns cost O(n log n) each. When no vocabulary entry has a `▁` after another character,
//! no merge can ever join across the boundary before a `▁`, so splitting the normalised text
//! there (as SentencePiece itself does) gives the same tokens; the words then hit the cache.
//! [`Tokenizer::load`] checks that property on the vocabulary before using it, and tests compare
//! both paths token for token.

use std::path::{Path, PathBuf};

use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::error::{DataError, Result};

const METASPACE: char = '\u{2581}';

/// A loaded tokenizer; `encode` gives ids and byte offsets into the text.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    word_split: bool,
}

/// Token ids and, per token, the byte range of the text it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

impl Tokenizer {
    /// Load `DIR/tokenizer.json`, enabling the exact word split where the vocabulary allows it.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let mut tok = Tokenizer::load_as_written(dir)?;
        if split_is_exact(&tok.inner) {
            let split = Split::new(
                SplitPattern::Regex(format!("{METASPACE}*[^{METASPACE}]+|{METASPACE}+")),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .expect("the word-split regex is valid");
            tok.inner
                .with_pre_tokenizer(Some(PreTokenizerWrapper::Split(split)));
            tok.word_split = true;
        }
        Ok(tok)
    }

    /// Load `DIR/tokenizer.json` exactly as written (the reference path for tests).
    pub fn load_as_written(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path,
                message: "not found; --tokenizer must be a folder with the model's tokenizer.json and tokenizer_config.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            message: format!("cannot load: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            path,
            word_split: false,
        })
    }

    /// Whether the exact word split is active (see the module docs).
    pub fn uses_word_split(&self) -> bool {
        self.word_split
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokenize rendered chat text as `apply_chat_template` does: no added BOS/EOS, special
    /// tokens in the text recognised.
    pub fn encode(&self, text: &str) -> std::result::Result<Encoded, String> {
        let enc = self.inner.encode(text, false).map_err(|e| e.to_string())?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Decode ids to text, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> std::result::Result<String, String> {
        self.inner.decode(ids, false).map_err(|e| e.to_string())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// True when splitting before each `▁` run cannot change a BPE tokenization: BPE model without
/// a pre-tokenizer, dropout, word affixes or whole-word shortcuts, and no token in which a `▁`
/// follows another character.
fn split_is_exact(tok: &tokenizers::Tokenizer) -> bool {
    if tok.get_pre_tokenizer().is_some() {
        return false;
    }
    let ModelWrapper::BPE(bpe) = tok.get_model() else {
        return false;
    };
    if bpe.dropout.is_some()
        || bpe.continuing_subword_prefix.is_some()
        || bpe.end_of_word_suffix.is_some()
        || bpe.ignore_merges
        || (bpe.fuse_unk && !bpe.byte_fallback)
    {
        return false;
    }
    bpe.get_vocab().keys().all(|token| {
        let mut prev_other = false;
        for c in token.chars() {
            if c == METASPACE && prev_other {
                return false;
            }
            prev_other = c != METASPACE;
        }
        true
    })
}

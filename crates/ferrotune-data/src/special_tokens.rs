//! The special tokens a chat template refers to (`bos_token`, `eos_token`, ...), read from a
//! tokenizer folder as transformers reads them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Special token strings; `None` where the tokenizer defines none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// From `tokenizer_config.json`, falling back to `special_tokens_map.json` per token.
    /// Values may be plain strings or `{"content": ...}` objects (AddedToken form).
    pub fn from_tokenizer_dir(dir: &Path) -> Result<SpecialTokens> {
        let mut out = SpecialTokens::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
                    path: path.clone(),
                    message: format!("invalid JSON: {e}"),
                })?;
            for (slot, key) in [
                (&mut out.bos, "bos_token"),
                (&mut out.eos, "eos_token"),
                (&mut out.unk, "unk_token"),
                (&mut out.pad, "pad_token"),
            ] {
                if slot.is_none() {
                    *slot = token_string(json.get(key));
                }
            }
        }
        Ok(out)
    }
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

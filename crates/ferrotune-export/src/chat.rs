//! Greedy answers to single-turn chat questions: how `--verify` compares an export with its
//! checkpoint, and how `ferrotune run` shows what fine-tuning changed.

use std::path::Path;

use ferrotune_data::{ChatTemplate, Message, Role, SpecialTokens, Tokenizer};
use ferrotune_model::generate::{generate, Sampling};
use ferrotune_model::Phi3;

use crate::error::{ExportError, Result};

/// New token ids for each question (greedy, one batch).
pub fn greedy_chat(
    model: &Phi3,
    tokenizer_dir: &Path,
    stop_ids: &[u32],
    questions: &[&str],
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let tokenizer = Tokenizer::load(tokenizer_dir)?;
    let template = ChatTemplate::from_tokenizer_dir(
        tokenizer_dir,
        SpecialTokens::from_tokenizer_dir(tokenizer_dir)?,
    )?;
    let mut prompts = Vec::with_capacity(questions.len());
    for q in questions {
        let messages = [Message {
            role: Role::User,
            content: q.to_string(),
        }];
        let text = template
            .render(&messages, true)
            .map_err(|e| ExportError::invalid(tokenizer_dir, format!("chat template: {e}")))?;
        let ids = tokenizer
            .encode(&text)
            .map_err(|e| ExportError::invalid(tokenizer_dir, format!("tokenizing: {e}")))?
            .ids;
        prompts.push(ids);
    }
    let sampling = Sampling {
        max_new_tokens,
        stop_ids: stop_ids.to_vec(),
        ..Default::default()
    };
    Ok(generate(model, &prompts, &sampling)?)
}

/// Decoded, trimmed text of each answer.
pub fn decode_answers(tokenizer_dir: &Path, answers: &[Vec<u32>]) -> Result<Vec<String>> {
    let tokenizer = Tokenizer::load(tokenizer_dir)?;
    answers
        .iter()
        .map(|ids| {
            tokenizer
                .decode_text(ids)
                .map(|t| t.trim().to_string())
                .map_err(|e| ExportError::invalid(tokenizer_dir, format!("decoding: {e}")))
        })
        .collect()
}

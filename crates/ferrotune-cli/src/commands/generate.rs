//! `ferrotune generate`: text from a model (and adapter), for a plain prompt or a conversation.

use std::path::Path;

use ferrotune_data::{ChatTemplate, Message, SpecialTokens, Tokenizer};
use ferrotune_model::generate::{generate, Sampling};
use serde_json::json;

use crate::cli::GenerateArgs;
use crate::commands::model_args;
use crate::failure::Failure;

pub fn run(args: &GenerateArgs, json_out: bool) -> Result<(), Failure> {
    let loaded = model_args::load(&args.model)?;
    let tokenizer = Tokenizer::load(&loaded.tokenizer_dir)?;
    let prompt_ids = match (&args.prompt, &args.messages) {
        (Some(text), _) => tokenizer
            .encode_prompt(text)
            .map_err(|e| Failure::runtime(format!("tokenizing the prompt: {e}")))?,
        (None, Some(file)) => {
            let messages = read_messages(file)?;
            let specials = SpecialTokens::from_tokenizer_dir(&loaded.tokenizer_dir)?;
            let template = ChatTemplate::from_tokenizer_dir(&loaded.tokenizer_dir, specials)?;
            let text = template
                .render(&messages, true)
                .map_err(|e| Failure::usage(format!("{}: chat template: {e}", file.display())))?;
            tokenizer
                .encode(&text)
                .map_err(|e| Failure::runtime(format!("tokenizing the conversation: {e}")))?
                .ids
        }
        (None, None) => unreachable!("clap requires --prompt or --messages"),
    };
    let vocab = loaded.model.config().vocab_size;
    if let Some(bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Failure::usage(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}: the tokenizer in {} does not belong to this model",
            loaded.tokenizer_dir.display()
        )));
    }
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop_ids: loaded.stop_ids.clone(),
    };
    let started = std::time::Instant::now();
    let out = generate(&loaded.model, std::slice::from_ref(&prompt_ids), &sampling)?;
    let seconds = started.elapsed().as_secs_f64();
    let ids = &out[0];
    let text = tokenizer
        .decode_text(ids)
        .map_err(|e| Failure::runtime(format!("decoding: {e}")))?;
    tracing::info!(
        "{} prompt tokens, {} new tokens in {seconds:.2} s ({:.1} tokens/s)",
        prompt_ids.len(),
        ids.len(),
        ids.len() as f64 / seconds.max(1e-9)
    );
    if json_out {
        println!(
            "{}",
            json!({"token_ids": ids, "text": text, "prompt_tokens": prompt_ids.len()})
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

/// A list of `{role, content}`, or an object with `messages` (an ultrachat row).
fn read_messages(file: &Path) -> Result<Vec<Message>, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::usage(format!("--messages {}: {e}", file.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Failure::usage(format!("--messages {}: invalid JSON: {e}", file.display())))?;
    let list = v.get("messages").cloned().unwrap_or(v);
    serde_json::from_value(list).map_err(|e| {
        Failure::usage(format!(
            "--messages {}: expected a list of {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}} ({e})",
            file.display()
        ))
    })
}

/// Greedy answers of `model` (loaded from `dir`) to single-turn chat questions, in one batch.
pub fn chat_answers(
    model: &ferrotune_model::Phi3,
    dir: &Path,
    stop_ids: &[u32],
    questions: &[&str],
    max_new_tokens: usize,
) -> Result<Vec<String>, Failure> {
    let tokenizer = Tokenizer::load(dir)?;
    let template = ChatTemplate::from_tokenizer_dir(dir, SpecialTokens::from_tokenizer_dir(dir)?)?;
    let mut prompts = Vec::new();
    for q in questions {
        let messages = [Message {
            role: ferrotune_data::Role::User,
            content: q.to_string(),
        }];
        let text = template
            .render(&messages, true)
            .map_err(|e| Failure::runtime(format!("chat template: {e}")))?;
        prompts.push(
            tokenizer
                .encode(&text)
                .map_err(|e| Failure::runtime(format!("tokenizing: {e}")))?
                .ids,
        );
    }
    let sampling = Sampling {
        max_new_tokens,
        stop_ids: stop_ids.to_vec(),
        ..Default::default()
    };
    generate(model, &prompts, &sampling)?
        .iter()
        .map(|ids| {
            tokenizer
                .decode_text(ids)
                .map(|t| t.trim().to_string())
                .map_err(|e| Failure::runtime(format!("decoding: {e}")))
        })
        .collect()
}

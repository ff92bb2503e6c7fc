//! `ferrotune eval`: token-weighted mean cross-entropy and perplexity of a model (and adapter)
//! on prepared data, over the trained (assistant) tokens only.

use candle_core::Tensor;
use ferrotune_data::Prepared;
use ferrotune_model::loss::causal_lm_loss_sum;
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::Batch;
use serde_json::json;

use crate::cli::EvalArgs;
use crate::commands::model_args;
use crate::failure::Failure;

pub fn run(args: &EvalArgs, json_out: bool) -> Result<(), Failure> {
    let data = Prepared::open(&args.data)?;
    let loaded = model_args::load(&args.model)?;
    let model = &loaded.model;
    let device = model.device().clone();
    let vocab = model.config().vocab_size;
    let limit = args.max_rows.unwrap_or(u64::MAX);
    let started = std::time::Instant::now();
    let (mut nll, mut tokens, mut rows) = (0f64, 0usize, 0u64);
    // One conversation per forward: packed or not, each is scored on its own, as documents
    // never see each other.
    for doc in data.documents().take(limit as usize) {
        let doc = doc?;
        if let Some(bad) = doc.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Failure::usage(format!(
                "{}: token id {bad} is outside the model's vocabulary of {vocab}; prepare the data with this model's tokenizer",
                args.data.display()
            )));
        }
        let t = doc.ids.len();
        let layout = AttentionLayout {
            padding: None,
            documents: None,
            sliding_window: model.config().sliding_window,
        };
        let batch = Batch {
            input_ids: Tensor::from_vec(doc.ids.clone(), (1, t), &device)?,
            positions: vec![(0..t as u32).collect()],
            attention_bias: layout.bias(1, t, &device)?,
        };
        let logits = model.logits(&batch, false)?;
        let sum = causal_lm_loss_sum(&logits, &[doc.labels()])?;
        nll += f64::from(sum.sum.to_scalar::<f32>()?);
        tokens += sum.tokens;
        rows += 1;
    }
    if tokens == 0 {
        return Err(Failure::usage(format!(
            "{}: no trained tokens to evaluate",
            args.data.display()
        )));
    }
    let loss = nll / tokens as f64;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!("{rows} conversations, {tokens} trained tokens in {seconds:.2} s");
    if json_out {
        println!(
            "{}",
            json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens, "conversations": rows})
        );
    } else {
        println!(
            "loss {loss:.6}  perplexity {:.4}  over {tokens} trained tokens in {rows} conversations",
            loss.exp()
        );
    }
    Ok(())
}

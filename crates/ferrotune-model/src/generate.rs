//! Decoding with a KV cache: greedy or sampled (temperature, top-k, top-p, seed), stop ids,
//! a maximum of new tokens, and a batch of prompts of different lengths (left-padded, as
//! transformers' `generate` does).

use candle_core::{DType, Tensor};

use crate::config::RopeScaling;
use crate::mask::AttentionLayout;
use crate::phi3::{Batch, KvCache, Phi3};

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
    /// Generation of a row ends after it emits one of these (included in the output).
    pub stop_ids: Vec<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// New tokens for each prompt (a stop id, when hit, is the last token).
pub fn generate(model: &Phi3, prompts: &[Vec<u32>], s: &Sampling) -> crate::Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 || prompts.iter().any(Vec::is_empty) {
        return Err(crate::ModelError::Input(
            "every prompt needs at least one token".into(),
        ));
    }
    let device = model.device().clone();
    let width = prompts.iter().map(Vec::len).max().expect("non-empty");
    let pad = model.config().pad_token_id.unwrap_or(0);
    // Left padding: real tokens end at the same column, positions count real tokens only.
    let mut padding: Vec<Vec<u8>> = Vec::with_capacity(b);
    let mut ids = Vec::with_capacity(b * width);
    let mut positions = Vec::with_capacity(b);
    let mut next_pos = Vec::with_capacity(b);
    for p in prompts {
        let n_pad = width - p.len();
        padding.push([vec![0u8; n_pad], vec![1u8; p.len()]].concat());
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        positions.push(
            (0..width)
                .map(|i| i.saturating_sub(n_pad) as u32)
                .collect::<Vec<_>>(),
        );
        next_pos.push(p.len() as u32);
    }
    let mut cache = KvCache::default();
    let mut rng = Rng(s.seed);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    // Every column so far, for the longrope re-prefill below.
    let mut all_ids: Vec<Vec<u32>> = ids.chunks(width).map(<[u32]>::to_vec).collect();
    let mut all_pos = positions.clone();
    let mut step_ids = Tensor::from_vec(ids, (b, width), &device)?;
    let mut step_pos = positions;
    let switch_at = match &model.config().rope_scaling {
        RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } => Some(*original_max_position_embeddings),
        RopeScaling::Default => None,
    };
    for _ in 0..s.max_new_tokens {
        // transformers' Phi-3 drops the cache the first time the sequence outgrows longrope's
        // short factors and re-encodes everything with the long ones; do the same.
        let columns = all_ids[0].len();
        if let Some(original) = switch_at {
            if !cache.is_empty() && columns > original && cache.len() <= original {
                cache = KvCache::default();
                step_ids = Tensor::from_vec(all_ids.concat(), (b, columns), &device)?;
                step_pos = all_pos.clone();
            }
        }
        let t_q = step_ids.dim(1)?;
        let past = cache.len();
        let layout = AttentionLayout {
            padding: Some(&padding),
            documents: None,
            sliding_window: model.config().sliding_window,
        };
        let batch = Batch {
            input_ids: step_ids,
            positions: step_pos,
            attention_bias: layout.bias_for_queries(b, past, t_q, past + t_q, &device)?,
        };
        let logits = model
            .step(&batch, &mut cache)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (row, l) in logits.iter().enumerate() {
            let tok = if done[row] { pad } else { pick(l, s, &mut rng) };
            if !done[row] {
                out[row].push(tok);
                done[row] = s.stop_ids.contains(&tok);
            }
            next.push(tok);
            padding[row].push(1);
            all_ids[row].push(tok);
            all_pos[row].push(next_pos[row]);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        step_ids = Tensor::from_vec(next, (b, 1), &device)?;
        step_pos = next_pos.iter().map(|&p| vec![p]).collect();
        for p in &mut next_pos {
            *p += 1;
        }
    }
    Ok(out)
}

/// Greedy, or temperature → top-k → top-p → sample (transformers' processor order). Only
/// top-p needs the candidates sorted; top-k selects in linear time and plain temperature
/// sampling sorts nothing (a full sort of a 32k vocabulary per token dominated batched
/// decoding of small models).
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    if s.top_k == 0 && s.top_p >= 1.0 {
        return sample_with_temperature(logits, s.temperature, rng);
    }
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, f64::from(l) / s.temperature))
        .collect();
    let by_logit = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if s.top_k > 0 && s.top_k < cand.len() {
        cand.select_nth_unstable_by(s.top_k - 1, by_logit);
        cand.truncate(s.top_k);
    }
    if s.top_p < 1.0 {
        cand.sort_by(by_logit);
    }
    let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= s.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.unit();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return cand[i].0;
        }
        u -= p;
    }
    cand[probs.len() - 1].0
}

/// Plain temperature sampling (OpenAI's default): one `exp` per logit in f32 (as transformers'
/// softmax) and one walk of the cumulative weights in vocabulary order, the order the general
/// path walks when nothing is filtered. Two thirds of a batched decode step of a small model
/// went to the general path's f64 candidates at 32 streams.
fn sample_with_temperature(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv = (1.0 / temperature) as f32;
    let weights: Vec<f32> = logits.iter().map(|&l| ((l - max) * inv).exp()).collect();
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let mut u = rng.unit() * total;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            if u < f64::from(w) {
                return i as u32;
            }
            u -= f64::from(w);
            last = i;
        }
    }
    last as u32
}

/// First index of the maximum, as `torch.argmax` picks it.
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// splitmix64 for reproducible sampling (seed it with the request's seed).
pub struct Rng(pub u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        let mut g = crate::rng::SplitMix(self.0);
        let u = g.unit_f64();
        self.0 = g.0;
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_reproducible() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let s = Sampling {
            temperature: 0.7,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(pick(&logits, &s, &mut Rng(1)), 1);
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 3,
            ..Default::default()
        };
        let a: Vec<u32> = (0..20).map(|i| pick(&logits, &s, &mut Rng(i))).collect();
        let b: Vec<u32> = (0..20).map(|i| pick(&logits, &s, &mut Rng(i))).collect();
        assert_eq!(a, b);
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top-p 0.9 keeps the two likely tokens: {a:?}"
        );
    }

    #[test]
    fn temperature_sampling_follows_the_softmax_and_the_general_path() {
        // Weights 1 : 2 : 4 : 8 at temperature 0.5 (logits halved in log space).
        let logits: Vec<f32> = (0..4).map(|i| 0.5 * (i as f32) * 2f32.ln()).collect();
        let s = Sampling {
            temperature: 0.5,
            ..Default::default()
        };
        let n = 30_000;
        let mut counts = [0usize; 4];
        for i in 0..n {
            counts[pick(&logits, &s, &mut Rng(i)) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let want = f64::from(1u32 << i) / 15.0;
            let got = c as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
        // top_k equal to the vocabulary filters nothing: the general (f64) path, same draws.
        let general = Sampling {
            top_k: logits.len(),
            ..s.clone()
        };
        let same = (0..2000)
            .filter(|&i| pick(&logits, &s, &mut Rng(i)) == pick(&logits, &general, &mut Rng(i)))
            .count();
        assert!(same >= 1990, "{same} of 2000 draws agree");
    }
}

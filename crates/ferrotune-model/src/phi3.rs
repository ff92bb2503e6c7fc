//! ferrotune's differentiable Phi-3 (transformers' `Phi3ForCausalLM`): fused `qkv_proj` and
//! `gate_up_proj` as in the checkpoint, RoPE, RMSNorm, SwiGLU, causal attention with padding,
//! packed documents and sliding window. Base weights are frozen tensors; only LoRA pairs are
//! `Var`s. Every op here records a backward (no fused candle op that cuts the graph).

use candle_core::{DType, Device, Module, Result, Tensor, Var};

use crate::attention::attention;
use crate::config::Phi3Config;
use crate::frozen_linear::FrozenMatmul;
use crate::layer_ops::LayerOps;
use crate::lora::{Linear, LoraConfig, LoraPair};
use crate::rms_norm::add_then_norm;
pub use crate::rms_norm::rms_norm;
use crate::rope::{self, Rope};
use crate::swiglu::swiglu;

/// Weight names follow the checkpoint (`model.layers.{i}.self_attn.qkv_proj.weight`, ...).
pub struct Phi3 {
    cfg: Phi3Config,
    dtype: DType,
    device: Device,
    embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: FrozenMatmul,
    pub(crate) rope: Rope,
}

pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: Tensor,
    pub(crate) qkv_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) post_attention_layernorm: Tensor,
    pub(crate) gate_up_proj: Linear,
    pub(crate) down_proj: Linear,
}

/// One batch as the model sees it. Shapes: `[b, t]`.
pub struct Batch {
    /// Token ids, u32 `[b, t]`.
    pub input_ids: Tensor,
    /// Position per token (restarting at 0 for each packed document).
    pub positions: Vec<Vec<u32>>,
    /// Additive attention bias `[b, 1, t, t]` (f32): 0 where a query may attend a key.
    pub attention_bias: Tensor,
}

/// Keys and values seen so far, per layer: `[b, kv_heads, T, head_dim]` after RoPE, in buffers
/// with room to grow so a decode step writes its column in place instead of copying the cache.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
}

/// One layer's buffers `[b, kv_heads, capacity, head_dim]`, the first `len` columns filled.
pub(crate) struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Columns added past what is needed whenever a buffer grows: a quarter more, at least 32,
    /// so decoding copies the cache once per many tokens.
    fn headroom(len: usize) -> usize {
        (len / 4).max(32)
    }

    /// `k`, `v` `[b, kv_heads, len, head_dim]` with `extra` empty columns after them.
    fn with_room(k: &Tensor, v: &Tensor, extra: usize) -> Result<LayerCache> {
        let grow = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let room = Tensor::zeros((b, h, extra, d), t.dtype(), t.device())?;
            Tensor::cat(&[t, &room], 2)
        };
        Ok(LayerCache {
            len: k.dim(2)?,
            k: grow(k)?,
            v: grow(v)?,
        })
    }

    fn keys(&self) -> Result<Tensor> {
        self.k.narrow(2, 0, self.len)
    }

    fn values(&self) -> Result<Tensor> {
        self.v.narrow(2, 0, self.len)
    }

    /// Whether `t` more columns fit the buffers as they are.
    fn has_room(&self, t: usize) -> Result<bool> {
        Ok(self.len + t <= self.k.dim(2)?)
    }

    /// The new positions of the fused projection `qkv` `[b, t, …]`: their rotated keys and their
    /// values written after the filled columns (which must have room, see
    /// [`LayerCache::has_room`]); returns their rotated query heads.
    fn append_rotated(
        &mut self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cfg: &Phi3Config,
    ) -> Result<Tensor> {
        let heads = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let q = ferrotune_kernels::rope_qkv_into_cache(
            qkv,
            cos,
            sin,
            heads,
            (&self.k, &self.v),
            self.len,
        )?;
        self.len += qkv.dim(1)?;
        Ok(q)
    }

    /// New columns `[b, kv_heads, t, head_dim]` after the filled ones.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(2)?;
        let need = self.len + t;
        if need > self.k.dim(2)? {
            *self =
                LayerCache::with_room(&self.keys()?, &self.values()?, t + Self::headroom(need))?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok(())
    }
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences (rows) held.
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.k.dim(0).unwrap_or(0))
    }

    /// Every layer's filled keys and values through `f`, into buffers with room to grow.
    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(c) => {
                    let (k, v) = (f(&c.keys()?)?, f(&c.values()?)?);
                    let extra = LayerCache::headroom(k.dim(2)?);
                    Ok(Some(LayerCache::with_room(&k, &v, extra)?))
                }
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Only rows `rows`, in that order (sequences leaving a running batch).
    pub fn select_rows(&self, rows: &[usize], device: &Device) -> Result<KvCache> {
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            device,
        )?;
        self.map(|t| t.contiguous()?.index_select(&idx, 0))
    }

    /// `n` zero columns before every row's entries: the caller masks them as padding.
    pub fn pad_left(&self, n: usize) -> Result<KvCache> {
        self.map(|t| zeros_before(t, n))
    }

    /// Without the first `n` columns (padding every row has).
    pub fn trim_left(&self, n: usize) -> Result<KvCache> {
        let len = self.len();
        self.map(|t| t.narrow(2, n, len - n))
    }

    /// The rows of `a` then of `b`, the shorter left-padded to the longer; returns the padding
    /// columns added to `a`'s rows and to `b`'s.
    pub fn stack(a: &KvCache, b: KvCache) -> Result<(KvCache, usize, usize)> {
        if a.is_empty() {
            return Ok((b, 0, 0));
        }
        let (la, lb) = (a.len(), b.len());
        let (pa, pb) = (lb.saturating_sub(la), la.saturating_sub(lb));
        let pad = |c: &KvCache, n: usize| -> Result<Vec<Option<(Tensor, Tensor)>>> {
            c.layers
                .iter()
                .map(|l| match l {
                    Some(c) => Ok(Some((
                        zeros_before(&c.keys()?, n)?,
                        zeros_before(&c.values()?, n)?,
                    ))),
                    None => Ok(None),
                })
                .collect()
        };
        let (a, b) = (pad(a, pa)?, pad(&b, pb)?);
        let layers = a
            .iter()
            .zip(&b)
            .map(|(x, y)| match (x, y) {
                (Some((ka, va)), Some((kb, vb))) => {
                    let (k, v) = (Tensor::cat(&[ka, kb], 0)?, Tensor::cat(&[va, vb], 0)?);
                    let extra = LayerCache::headroom(k.dim(2)?);
                    Ok(Some(LayerCache::with_room(&k, &v, extra)?))
                }
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok((KvCache { layers }, pa, pb))
    }
}

/// `t` `[b, h, len, d]` with `n` zero columns before its entries.
fn zeros_before(t: &Tensor, n: usize) -> Result<Tensor> {
    if n == 0 {
        return Ok(t.clone());
    }
    let (b, h, _, d) = t.dims4()?;
    let zeros = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
    Tensor::cat(&[&zeros, t], 2)
}

/// Fetches one named weight of a given shape (see `weights`).
pub trait WeightSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> crate::Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
}

impl Phi3 {
    /// Build from a weight source; base weights frozen, in `dtype`, on `device`.
    pub fn load(
        cfg: &Phi3Config,
        weights: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Phi3> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let embed_tokens = weights.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings || !weights.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            weights.tensor("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let linear = |name: &str, shape: [usize; 2]| -> crate::Result<Linear> {
                Ok(Linear {
                    base: FrozenMatmul::new(weights.tensor(&format!("{p}.{name}.weight"), &shape)?),
                    lora: None,
                    merged: None,
                })
            };
            layers.push(DecoderLayer {
                input_layernorm: weights.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv_proj: linear("self_attn.qkv_proj", [cfg.qkv_size(), h])?,
                o_proj: linear(
                    "self_attn.o_proj",
                    [h, cfg.num_attention_heads * cfg.head_dim],
                )?,
                post_attention_layernorm: weights
                    .tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up_proj: linear("mlp.gate_up_proj", [2 * i, h])?,
                down_proj: linear("mlp.down_proj", [h, i])?,
            });
        }
        Ok(Phi3 {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            embed_tokens,
            norm: weights.tensor("model.norm.weight", &[h])?,
            lm_head: FrozenMatmul::new(lm_head),
            layers,
            rope: Rope::new(cfg),
        })
    }

    /// Another model on the same frozen weights (the tensors are shared, not copied) with no
    /// adapter, so several adapters can be served on one base in the memory of one. Refused
    /// while an adapter is merged into the weights.
    pub fn share_base(&self) -> Result<Phi3> {
        let frozen = |l: &Linear| -> Result<Linear> {
            if l.merged.is_some() {
                candle_core::bail!(
                    "share_base: an adapter is merged into the weights; unmerge it first"
                );
            }
            Ok(Linear {
                base: FrozenMatmul::new(l.base.weight().clone()),
                lora: None,
                merged: None,
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(DecoderLayer {
                    input_layernorm: l.input_layernorm.clone(),
                    qkv_proj: frozen(&l.qkv_proj)?,
                    o_proj: frozen(&l.o_proj)?,
                    post_attention_layernorm: l.post_attention_layernorm.clone(),
                    gate_up_proj: frozen(&l.gate_up_proj)?,
                    down_proj: frozen(&l.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Phi3 {
            cfg: self.cfg.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: FrozenMatmul::new(self.lm_head.weight().clone()),
            rope: Rope::new(&self.cfg),
        })
    }

    pub fn config(&self) -> &Phi3Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Attach fresh LoRA pairs (PEFT initialisation) to the targeted linears.
    pub fn add_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        let mut rng = crate::rng::SplitMix(seed);
        let mut uniform = move || rng.unit();
        for layer in &mut self.layers {
            for (name, linear) in layer.linears_mut() {
                if lora.targets(name) {
                    let (out, inp) = linear.base.weight().dims2()?;
                    linear.lora = Some(LoraPair::init(
                        lora.r,
                        inp,
                        out,
                        lora,
                        &mut uniform,
                        &self.device,
                    )?);
                }
            }
        }
        Ok(())
    }

    /// Set the dropout probability of every LoRA pair (training-time only).
    pub fn set_lora_dropout(&mut self, p: f64) {
        for layer in &mut self.layers {
            for (_, linear) in layer.linears_mut() {
                if let Some(pair) = linear.lora.as_mut() {
                    pair.dropout = p;
                }
            }
        }
    }

    /// Key the LoRA dropout masks of the next training forwards: every pair derives its own
    /// stream from `key`, and the same key gives the same masks (recompute, resume).
    pub fn set_dropout_key(&self, key: u64) {
        for (i, (_, pair)) in self.lora_pairs().into_iter().enumerate() {
            pair.dropout_key.store(
                crate::rng::derive(key, i as u64),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Fold every adapter into its base weight (inference and export); reversible.
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for (_, linear) in layer.linears_mut() {
                linear.merge()?;
            }
        }
        Ok(())
    }

    /// Round every base weight through `dtype` and back, keeping the compute dtype: the weights
    /// a copy of this model stored in `dtype` holds (what an export's check compares with).
    pub fn round_frozen_weights(&mut self, dtype: DType) -> Result<()> {
        let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(t.dtype());
        self.embed_tokens = round(&self.embed_tokens)?;
        self.norm = round(&self.norm)?;
        self.lm_head = FrozenMatmul::new(round(self.lm_head.weight())?);
        for layer in &mut self.layers {
            layer.input_layernorm = round(&layer.input_layernorm)?;
            layer.post_attention_layernorm = round(&layer.post_attention_layernorm)?;
            for (_, linear) in layer.linears_mut() {
                linear.base = FrozenMatmul::new(round(linear.base.weight())?);
            }
        }
        Ok(())
    }

    /// Undo [`Phi3::merge_lora`].
    pub fn unmerge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for (_, linear) in layer.linears_mut() {
                linear.unmerge()?;
            }
        }
        Ok(())
    }

    /// Cast every adapter to the model's dtype once, for serving and generation: see
    /// [`LoraPair::cache_casts`]. Not for a model that is still trained.
    pub fn cache_adapter_casts(&self) -> Result<()> {
        for (_, pair) in self.lora_pairs() {
            pair.cache_casts(self.dtype)?;
        }
        Ok(())
    }

    /// Every LoRA pair with its PEFT module path
    /// (`model.layers.{i}.self_attn.qkv_proj`, ...), in layer order.
    pub fn lora_pairs(&self) -> Vec<(String, &LoraPair)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, linear) in layer.linears() {
                if let Some(pair) = &linear.lora {
                    out.push((format!("model.layers.{l}.{}", module_path(name)), pair));
                }
            }
        }
        out
    }

    /// Mutable access to a linear by PEFT module path, to load adapter weights into it.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        let rest = path.strip_prefix("model.layers.")?;
        let (l, module) = rest.split_once('.')?;
        let layer = self.layers.get_mut(l.parse::<usize>().ok()?)?;
        layer
            .linears_mut()
            .into_iter()
            .find(|(name, _)| module_path(name) == module)
            .map(|(_, linear)| linear)
    }

    /// The trainable variables (A then B of each pair, in `lora_pairs` order).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora_pairs()
            .into_iter()
            .flat_map(|(_, p)| [p.a.clone(), p.b.clone()])
            .collect()
    }

    /// Every base (frozen) weight: embeddings, norms, projections, the head.
    pub fn frozen_weights(&self) -> Vec<Tensor> {
        let mut out = vec![self.embed_tokens.clone(), self.norm.clone()];
        for layer in &self.layers {
            out.push(layer.input_layernorm.clone());
            out.push(layer.post_attention_layernorm.clone());
            out.extend(layer.linears().map(|(_, l)| l.base.weight().clone()));
        }
        if !self.cfg.tie_word_embeddings {
            out.push(self.lm_head.weight().clone());
        }
        out
    }

    /// Token embeddings `[b, t, hidden]` in the model dtype.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        candle_nn::Embedding::new(self.embed_tokens.clone(), self.cfg.hidden_size)
            .forward(input_ids)
    }

    /// Hidden states after all decoder layers and the final norm, `[b, t, hidden]`.
    pub fn hidden_states(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        self.run(batch, train, None)
    }

    /// Logits of the last position `[b, vocab]` (f32) for new tokens `[b, t]`, extending `cache`.
    /// `batch.attention_bias` is `[b, 1, t, cache.len() + t]`.
    pub fn step(&self, batch: &Batch, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.run(batch, false, Some(cache))?;
        let t = h.dim(1)?;
        self.lm_head
            .forward(&h.narrow(1, t - 1, 1)?.squeeze(1)?)?
            .to_dtype(DType::F32)
    }

    fn run(&self, batch: &Batch, train: bool, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (cos, sin) = self
            .rope
            .cos_sin(&batch.positions, self.dtype, &self.device)?;
        let eps = self.cfg.rms_norm_eps;
        let mut x = self.embed(&batch.input_ids)?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        // Each layer's MLP output joins the residual stream in the same pass as the next norm
        // (one kernel on CUDA outside training; see `add_then_norm`).
        let mut h = rms_norm(
            &x,
            self.layers
                .first()
                .map_or(&self.norm, |l| &l.input_layernorm),
            eps,
        )?;
        for (l, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let (x1, mlp) = layer.forward_from_normed(
                &x,
                &h,
                &cos,
                &sin,
                &batch.attention_bias,
                &self.cfg,
                train,
                slot,
            )?;
            let next = self
                .layers
                .get(l + 1)
                .map_or(&self.norm, |n| &n.input_layernorm);
            (x, h) = add_then_norm(&x1, &mlp, next, eps)?;
        }
        Ok(h)
    }

    /// Loss and LoRA gradients with per-layer recompute: the forward keeps only each decoder
    /// layer's input; the backward re-runs one layer at a time and pushes the incoming gradient
    /// through it, so activation memory is one layer's, not the model's. Where the fused ops run
    /// (the CPU in f32, CUDA with ferrotune's kernels) that layer backward is written out by hand
    /// ([`crate::decoder_backward`]); elsewhere it goes through candle's graph.
    ///
    /// Returns the summed token cross-entropy, the number of trained tokens, and the gradient of
    /// `scale · sum` for each of [`Phi3::trainable_vars`] (same order). Gradients equal the plain
    /// graph's; LoRA dropout masks are keyed (see [`Phi3::set_dropout_key`]), so the re-run draws
    /// the same masks as the first pass.
    pub fn loss_and_grads_recompute(
        &self,
        batch: &Batch,
        labels: &[Vec<i64>],
        scale: f64,
    ) -> Result<(f32, usize, Vec<Tensor>)> {
        self.recompute(batch, labels, scale, true)
    }

    /// [`Phi3::loss_and_grads_recompute`] with every layer's backward through candle's graph
    /// (what `FERROTUNE_LAYER_BACKWARD=graph` runs; the tests' second reference).
    pub fn loss_and_grads_recompute_through_graph(
        &self,
        batch: &Batch,
        labels: &[Vec<i64>],
        scale: f64,
    ) -> Result<(f32, usize, Vec<Tensor>)> {
        self.recompute(batch, labels, scale, false)
    }

    fn recompute(
        &self,
        batch: &Batch,
        labels: &[Vec<i64>],
        scale: f64,
        by_hand: bool,
    ) -> Result<(f32, usize, Vec<Tensor>)> {
        let (cos, sin) = self
            .rope
            .cos_sin(&batch.positions, self.dtype, &self.device)?;
        // A and scale·B cast once for the step's three passes (forward, re-run, backward).
        let pairs = self.lora_pairs().into_iter().map(|(_, p)| p).collect();
        let _casts = crate::lora::StepCasts::new(pairs, self.dtype)?;
        let bias = &batch.attention_bias;
        let at = crate::decoder_backward::Positions {
            cos: &cos,
            sin: &sin,
            bias,
        };
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed(&batch.input_ids)?.detach();
        for layer in &self.layers {
            inputs.push(x.clone());
            x = match layer.hand_written_ops(&x).filter(|_| by_hand) {
                Some(ops) => layer.forward_untracked(ops, &x, &at, &self.cfg)?,
                None => layer
                    .forward(&x, &cos, &sin, bias, &self.cfg, true, None)?
                    .detach(),
            };
        }
        // Head: norm, projection, loss; its gradient w.r.t. the last hidden state starts the chain.
        // Scoped so the logits, their graph and the head's gradients are freed before the
        // layers' backward starts (at 4k tokens they are gigabytes).
        let (loss_value, tokens, mut grad) = {
            let h = Var::from_tensor(&x)?;
            let normed = rms_norm(h.as_tensor(), &self.norm, self.cfg.rms_norm_eps)?;
            let loss = crate::loss::head_loss_sum(&normed, self.lm_head.weight(), labels)?;
            let head_grads = loss.sum.affine(scale, 0.0)?.backward()?;
            let grad = match head_grads.get(h.as_tensor()) {
                Some(g) => g.clone(),
                None => h.as_tensor().zeros_like()?,
            };
            (loss.sum.to_scalar::<f32>()?, loss.tokens, grad)
        };
        let vars = self.trainable_vars();
        let mut out: Vec<Option<Tensor>> = vec![None; vars.len()];
        // Where each layer's pairs start among `vars` (A then B per adapted linear).
        let mut first_var = Vec::with_capacity(self.layers.len());
        let mut n = 0;
        for layer in &self.layers {
            first_var.push(n);
            n += 2 * layer
                .linears()
                .iter()
                .filter(|(_, l)| l.lora.is_some())
                .count();
        }
        for (l, layer) in self.layers.iter().enumerate().rev() {
            if let Some(ops) = layer.hand_written_ops(&inputs[l]).filter(|_| by_hand) {
                let g = layer.grads(ops, &inputs[l], &at, &self.cfg, &grad)?;
                for (i, (da, db)) in g.pairs.into_iter().enumerate() {
                    out[first_var[l] + 2 * i] = Some(da);
                    out[first_var[l] + 2 * i + 1] = Some(db);
                }
                grad = g.input;
                continue;
            }
            let xi = Var::from_tensor(&inputs[l])?;
            let y = layer.forward(xi.as_tensor(), &cos, &sin, bias, &self.cfg, true, None)?;
            let grads = crate::backward_seed::backward_from(&y, &grad)?;
            for (slot, var) in out.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            grad = match grads.get(xi.as_tensor()) {
                Some(g) => g.clone(),
                None => xi.as_tensor().zeros_like()?,
            };
        }
        let grads = out
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss_value, tokens, grads))
    }

    /// Summed token cross-entropy of `batch` against `labels` `[b][t]` (differentiable w.r.t.
    /// the LoRA pairs), without materialising the full logits on the CPU.
    pub fn loss_sum(
        &self,
        batch: &Batch,
        labels: &[Vec<i64>],
        train: bool,
    ) -> Result<crate::loss::LossSum> {
        crate::loss::head_loss_sum(
            &self.hidden_states(batch, train)?,
            self.lm_head.weight(),
            labels,
        )
    }

    /// Logits `[b, t, vocab]` (in f32).
    pub fn logits(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        self.lm_head
            .forward(&self.hidden_states(batch, train)?)?
            .to_dtype(DType::F32)
    }
}

impl DecoderLayer {
    /// The op family of the hand-written backward for input `x`, where it applies.
    fn hand_written_ops(&self, x: &Tensor) -> Option<LayerOps> {
        LayerOps::for_layer(x, [&self.input_layernorm, &self.post_attention_layernorm])
    }

    fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("qkv_proj", &self.qkv_proj),
            ("o_proj", &self.o_proj),
            ("gate_up_proj", &self.gate_up_proj),
            ("down_proj", &self.down_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("qkv_proj", &mut self.qkv_proj),
            ("o_proj", &mut self.o_proj),
            ("gate_up_proj", &mut self.gate_up_proj),
            ("down_proj", &mut self.down_proj),
        ]
    }

    /// `[b, t, hidden]` → `[b, t, hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cfg: &Phi3Config,
        train: bool,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_layernorm, cfg.rms_norm_eps)?;
        let (x1, mlp) = self.forward_from_normed(x, &h, cos, sin, bias, cfg, train, cache)?;
        x1 + mlp
    }

    /// The layer on `x` whose input norm `h` the caller formed: the residual stream after
    /// attention and the MLP's output, not yet added (the caller joins them with the next norm).
    #[allow(clippy::too_many_arguments)]
    fn forward_from_normed(
        &self,
        x: &Tensor,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cfg: &Phi3Config,
        train: bool,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<(Tensor, Tensor)> {
        let attn = self.attention(h, cos, sin, bias, cfg, train, cache)?;
        let (x1, h) = add_then_norm(x, &attn, &self.post_attention_layernorm, cfg.rms_norm_eps)?;
        let gate_up = self.gate_up_proj.forward(&h, train)?;
        let mlp = self.down_proj.forward(&swiglu(&gate_up)?, train)?;
        Ok((x1, mlp))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cfg: &Phi3Config,
        train: bool,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let qkv = self.qkv_proj.forward(x, train)?;
        // A decoding step whose columns fit the cache's buffers: the rotated keys and the values
        // go straight into them (one kernel on CUDA), only q is formed on its own.
        let in_place = match &cache {
            Some(Some(layer)) => {
                layer.has_room(t)? && crate::attention::decode_kernel_applies(&qkv, t, hd)
            }
            _ => false,
        };
        let (q, k, v) = match cache {
            Some(Some(layer)) if in_place => {
                let q = layer.append_rotated(&qkv, cos, sin, cfg)?;
                (q, layer.keys()?, layer.values()?)
            }
            None => rope::heads(&qkv, cos, sin, cfg)?,
            Some(slot) => {
                let (q, k, v) = rope::heads(&qkv, cos, sin, cfg)?;
                let layer = match slot {
                    Some(c) => {
                        c.append(&k, &v)?;
                        c
                    }
                    None => slot.insert(LayerCache::with_room(
                        &k,
                        &v,
                        LayerCache::headroom(k.dim(2)?),
                    )?),
                };
                (q, layer.keys()?, layer.values()?)
            }
        };
        let scale = 1.0 / (hd as f64).sqrt();
        if crate::attention::decode_kernel_applies(&q, t, hd) {
            let out = ferrotune_kernels::decode_attention(&q, &k, &v, bias, scale)?;
            return self.o_proj.forward(&out.reshape((b, t, nh * hd))?, train);
        }
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let out = attention(&q, &k, &v, bias, scale)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out, train)
    }
}

/// `checkpoint name` of a decoder linear.
fn module_path(name: &str) -> &'static str {
    match name {
        "qkv_proj" => "self_attn.qkv_proj",
        "o_proj" => "self_attn.o_proj",
        "gate_up_proj" => "mlp.gate_up_proj",
        _ => "mlp.down_proj",
    }
}

/// The fused projection `[b, t, qkv]` as query, key and value heads `[b, heads, t, head_dim]`
/// (before RoPE).
pub(crate) fn split_heads(qkv: &Tensor, cfg: &Phi3Config) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, _) = qkv.dims3()?;
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    // Viewed as `[b, t, heads, head_dim]` first, so each part is copied once (by the
    // `contiguous` after the transpose), not also by a reshape of a strided narrow.
    let all = qkv.reshape((b, t, nh + 2 * nkv, hd))?;
    let heads = |start: usize, n: usize| -> Result<Tensor> {
        all.narrow(2, start, n)?.transpose(1, 2)?.contiguous()
    };
    Ok((heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?))
}

/// The gradient of [`split_heads`]: per-head gradients `[b, heads, t, d]` of q, k and v back in
/// the fused projection's layout `[b, t, (q + k + v heads)·d]`.
pub(crate) fn join_heads(parts: &[Tensor]) -> Result<Tensor> {
    let rows = parts
        .iter()
        .map(|p| {
            let (b, h, t, d) = p.dims4()?;
            p.transpose(1, 2)?.reshape((b, t, h * d))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 2)
}

/// `[b, kv, t, d]` → `[b, kv·n, t, d]`, each kv head repeated `n` times in place.
pub(crate) fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))
}

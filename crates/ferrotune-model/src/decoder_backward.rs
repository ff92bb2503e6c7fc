//! A decoder layer's backward written out by hand, for the recompute path: re-run the layer's
//! forward from its saved input with no autograd graph, keeping the activations the backward
//! needs, then form every gradient directly from the ops' own backward functions.
//!
//! Through candle's graph, every node's gradient starts as a zero-filled buffer that the real
//! gradient is added into, and the narrows, reshapes and residual adds of a layer each get one
//! (on an H100, 97 such adds in a two-layer step were a quarter of its kernel time). Here the
//! only additions are the two residual joins, and the layer's output (the `down_proj` GEMM and
//! the last residual add) is never formed, since nothing in the backward reads it.

use candle_core::{Result, Tensor};

use crate::attention::{kept_backward, kept_forward, KeptAttention};
use crate::config::Phi3Config;
use crate::layer_ops::LayerOps;
use crate::phi3::{repeat_kv, DecoderLayer};

/// The gradients a layer's backward produces.
pub(crate) struct LayerGrads {
    /// Of the layer's input.
    pub input: Tensor,
    /// `(dA, dB)` of each adapted linear, in [`DecoderLayer::linears`] order.
    pub pairs: Vec<(Tensor, Tensor)>,
}

/// The rotary tables and attention bias one batch shares across layers.
pub(crate) struct Positions<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub bias: &'a Tensor,
}

/// A layer's forward activations that its backward reads, from [`DecoderLayer::forward_kept`].
struct Activations {
    h1: Tensor,
    qkv_mask: Option<Tensor>,
    /// Query, key and value heads after RoPE and (for GQA) repetition, `[b, heads, t, d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention: KeptAttention,
    /// The attention output `[b, t, heads·d]` (`o_proj`'s input).
    attn: Tensor,
    o_mask: Option<Tensor>,
    /// The residual stream after attention.
    x1: Tensor,
    h2: Tensor,
    gate_up: Tensor,
    gate_up_mask: Option<Tensor>,
    /// SwiGLU's output (`down_proj`'s input).
    act: Tensor,
}

impl DecoderLayer {
    /// The layer's training output for `x` without an autograd graph, computed with the same
    /// ops (and dropout masks) as [`DecoderLayer::grads`] recomputes it: recompute's first pass,
    /// which needs only the output. Through the graph, every op of it would be recorded (and on
    /// CUDA the attention node would keep its probabilities) only to be dropped unread.
    pub(crate) fn forward_untracked(
        &self,
        ops: LayerOps,
        x: &Tensor,
        at: &Positions<'_>,
        cfg: &Phi3Config,
    ) -> Result<Tensor> {
        let Activations { x1, act, .. } = self.forward_kept(ops, x, at, cfg)?;
        let (down, _) = self.down_proj.forward_for_grads(&act)?;
        x1 + down
    }

    /// The forward up to `down_proj`'s input, keeping what the backward reads.
    fn forward_kept(
        &self,
        ops: LayerOps,
        x: &Tensor,
        at: &Positions<'_>,
        cfg: &Phi3Config,
    ) -> Result<Activations> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let groups = nh / nkv;
        let eps = cfg.rms_norm_eps;
        let h1 = ops.rms_norm(x, &self.input_layernorm, eps)?;
        let (qkv, qkv_mask) = self.qkv_proj.forward_for_grads(&h1)?;
        let (q, k, v) = ops.rope_qkv(&qkv, at.cos, at.sin, cfg)?;
        drop(qkv);
        let (k, v) = (repeat_kv(&k, groups)?, repeat_kv(&v, groups)?);
        let scale = attention_scale(cfg);
        let flash = crate::attention::flash_applies(&q, &k);
        let (out, attention) = kept_forward(ops, flash, (&q, &k, &v), at.bias, scale)?;
        let attn = out.reshape((b, t, nh * hd))?;
        let (o, o_mask) = self.o_proj.forward_for_grads(&attn)?;
        let (x1, h2) = ops.add_rms_norm(x, &o, &self.post_attention_layernorm, eps)?;
        drop(o);
        let (gate_up, gate_up_mask) = self.gate_up_proj.forward_for_grads(&h2)?;
        let act = ops.swiglu(&gate_up)?;
        Ok(Activations {
            h1,
            qkv_mask,
            q,
            k,
            v,
            attention,
            attn,
            o_mask,
            x1,
            h2,
            gate_up,
            gate_up_mask,
            act,
        })
    }

    /// The gradients of `x` (the layer's input, untracked) and of the LoRA pairs, given `grad`,
    /// the gradient of the layer's training output. Equal to differentiating
    /// [`DecoderLayer::forward`] through candle's graph; dropout masks are drawn again from the
    /// pairs' keys, so they equal the forward's.
    pub(crate) fn grads(
        &self,
        ops: LayerOps,
        x: &Tensor,
        at: &Positions<'_>,
        cfg: &Phi3Config,
        grad: &Tensor,
    ) -> Result<LayerGrads> {
        let (b, t, _) = x.dims3()?;
        let (nh, hd) = (cfg.num_attention_heads, cfg.head_dim);
        let groups = nh / cfg.num_key_value_heads;
        let eps = cfg.rms_norm_eps;
        let scale = attention_scale(cfg);
        let Activations {
            h1,
            qkv_mask,
            q,
            k,
            v,
            attention,
            attn,
            o_mask,
            x1,
            h2,
            gate_up,
            gate_up_mask,
            act,
        } = self.forward_kept(ops, x, at, cfg)?;
        let down_mask = self.down_proj.dropout_mask_for(&act)?;

        // Backward, freeing each activation once read.
        let (dact, down) = self.down_proj.grads(&act, down_mask.as_ref(), grad)?;
        drop((act, down_mask));
        let dgate_up = ops.swiglu_grad(&gate_up, &dact)?;
        drop((gate_up, dact));
        let (dh2, gate_up_pair) = self
            .gate_up_proj
            .grads(&h2, gate_up_mask.as_ref(), &dgate_up)?;
        drop((h2, gate_up_mask, dgate_up));
        let dx1 = ops.rms_norm_grad_add(&x1, &self.post_attention_layernorm, eps, &dh2, grad)?;
        drop((x1, dh2));
        let (dattn, o_pair) = self.o_proj.grads(&attn, o_mask.as_ref(), &dx1)?;
        drop(o_mask);
        let shape = (b, t, nh, hd);
        let (dq, dk, dv) = kept_backward(
            ops,
            attention,
            (&q, &k, &v),
            at.bias,
            (&attn.reshape(shape)?, &dattn.reshape(shape)?),
            scale,
        )?;
        drop((q, k, v, attn, dattn));
        let dqkv = ops.rope_qkv_adjoint(
            &dq,
            &sum_groups(&dk, groups)?,
            &sum_groups(&dv, groups)?,
            at.cos,
            at.sin,
        )?;
        drop((dq, dk, dv));
        let (dh1, qkv_pair) = self.qkv_proj.grads(&h1, qkv_mask.as_ref(), &dqkv)?;
        drop((h1, qkv_mask, dqkv));
        let input = ops.rms_norm_grad_add(x, &self.input_layernorm, eps, &dh1, &dx1)?;
        let pairs = [qkv_pair, o_pair, gate_up_pair, down]
            .into_iter()
            .flatten()
            .collect();
        Ok(LayerGrads { input, pairs })
    }
}

/// `1/√head_dim`, the scores' scale.
fn attention_scale(cfg: &Phi3Config) -> f64 {
    1.0 / (cfg.head_dim as f64).sqrt()
}

/// The gradient of [`repeat_kv`]: `[b, kv·n, t, d]` summed over each kv head's `n` copies.
fn sum_groups(g: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(g.clone());
    }
    let (b, h, t, d) = g.dims4()?;
    g.reshape((b, h / n, n, t, d))?.sum(2)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;

    use super::*;
    use crate::backward_seed::backward_from;
    use crate::lora::LoraConfig;
    use crate::mask::{packed_layout, AttentionLayout};
    use crate::phi3::{Phi3, WeightSource};
    use candle_core::{DType, Device, Var};

    const HIDDEN: usize = 24;

    /// Seeded uniform values of standard deviation `std`, rounded to bf16 values (in f32), so
    /// the test is the same on every run and a bf16 copy holds exactly the f32 values.
    fn draw(dims: &[usize], std: f32, seed: u64) -> Tensor {
        let mut rng = crate::rng::SplitMix(seed);
        let n = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (2.0 * rng.unit_f64() as f32 - 1.0) * std * 3f32.sqrt())
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// Weights drawn once and handed out in `dtype`: models built in f32 and in bf16 from one set
    /// hold the same weights. Norm weights scatter around 1.
    struct Fixed {
        dtype: DType,
        drawn: Rc<RefCell<HashMap<String, Tensor>>>,
    }

    impl WeightSource for Fixed {
        fn tensor(&self, name: &str, shape: &[usize]) -> crate::Result<Tensor> {
            let mut drawn = self.drawn.borrow_mut();
            let seed = drawn.len() as u64 + 100;
            let t = drawn.entry(name.to_string()).or_insert_with(|| {
                let t = draw(shape, 0.2, seed);
                if name.ends_with("norm.weight") {
                    (t + 1.0).unwrap()
                } else {
                    t
                }
            });
            Ok(t.to_dtype(self.dtype)?)
        }

        fn contains(&self, _name: &str) -> bool {
            true
        }
    }

    /// One decoder layer with GQA (4 query heads on 2 kv heads) and every linear adapted, its
    /// `B`s set to `b` (PEFT's zero `B` would leave `dA` zero; small enough that the adapter's
    /// term, scaled by 8, stays the base output's size and bf16 stays well conditioned).
    fn one_layer(weights: &Fixed, b: &[Tensor], dropout: f64) -> Phi3 {
        let cfg = Phi3Config::from_json_str(
            r#"{"model_type": "phi3", "hidden_size": 24, "intermediate_size": 40,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
                "vocab_size": 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap();
        let mut model = Phi3::load(&cfg, weights, weights.dtype, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            r: 4,
            lora_dropout: dropout,
            ..LoraConfig::default()
        };
        model.add_lora(&lora, 7).unwrap();
        for ((_, pair), b) in model.lora_pairs().into_iter().zip(b) {
            pair.b.set(b).unwrap();
        }
        model.set_dropout_key(11);
        model
    }

    /// `‖a − reference‖ / ‖reference‖` (Euclidean).
    fn relative(a: &Tensor, reference: &Tensor) -> f32 {
        let (a, r) = (
            a.to_dtype(DType::F32).unwrap(),
            reference.to_dtype(DType::F32).unwrap(),
        );
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let scale = norm(&r);
        assert!(scale > 1e-4, "the reference gradient is trivially zero");
        norm(&(a - r).unwrap()) / scale
    }

    /// A layer's gradients: the input's, then `dA`, `dB` of each pair.
    type Grads = Vec<Tensor>;

    fn flatten(input: Tensor, pairs: Vec<(Tensor, Tensor)>) -> Grads {
        std::iter::once(input)
            .chain(pairs.into_iter().flat_map(|(a, b)| [a, b]))
            .collect()
    }

    /// The gradients of one layer for input `x` and output gradient `grad` (f32, converted to
    /// the model's dtype): by hand with `ops`, or (`None`) through candle's graph.
    fn layer_grads(
        model: &Phi3,
        ops: Option<LayerOps>,
        x: &Tensor,
        grad: &Tensor,
        positions: &[Vec<u32>],
        bias: &Tensor,
    ) -> Grads {
        let dtype = model.dtype();
        let (x, grad) = (x.to_dtype(dtype).unwrap(), grad.to_dtype(dtype).unwrap());
        let (cfg, layer) = (model.config(), &model.layers[0]);
        let (cos, sin) = model.rope.cos_sin(positions, dtype, &Device::Cpu).unwrap();
        if let Some(ops) = ops {
            let at = Positions {
                cos: &cos,
                sin: &sin,
                bias,
            };
            let hand = layer.grads(ops, &x, &at, cfg, &grad).unwrap();
            for (da, db) in &hand.pairs {
                assert_eq!((da.dtype(), db.dtype()), (DType::F32, DType::F32));
            }
            return flatten(hand.input, hand.pairs);
        }
        let xv = Var::from_tensor(&x).unwrap();
        let y = layer
            .forward(xv.as_tensor(), &cos, &sin, bias, cfg, true, None)
            .unwrap();
        let graph = backward_from(&y, &grad).unwrap();
        let get = |t: &Tensor| graph.get(t).unwrap().clone();
        let pairs = model
            .lora_pairs()
            .iter()
            .map(|(_, p)| (get(p.a.as_tensor()), get(p.b.as_tensor())))
            .collect();
        flatten(get(xv.as_tensor()), pairs)
    }

    /// The hand-written backward gives the gradients candle's graph of the same layer gives:
    /// the input's and every pair's, with and without dropout, over a padded row and a packed
    /// one. In f32, with both op families, equal within 1e-5 (relative, Euclidean). In bf16 (the
    /// kernels' family, whose CPU references stand in for the CUDA kernels) both are rounded
    /// differently, so each is measured against the f32 graph on the same weights and inputs,
    /// and the hand-written one must be as accurate as the graph's, within 50% (plus 2e-3).
    #[test]
    fn hand_written_layer_backward_equals_the_graph_backward() {
        let cpu = &Device::Cpu;
        let (b, t) = (2, 7);
        let (docs, packed_positions) = packed_layout(&[3, 4]);
        let positions = vec![(0..t as u32).collect::<Vec<_>>(), packed_positions];
        let padding = vec![vec![1u8; t], vec![1, 1, 1, 1, 1, 0, 0]];
        let documents = vec![vec![0u32; t], docs];
        let layout = AttentionLayout {
            padding: Some(&padding),
            documents: Some(&documents),
            sliding_window: None,
        };
        let bias = layout.bias(b, t, cpu).unwrap();
        let drawn = Rc::new(RefCell::new(HashMap::new()));
        let source = |dtype| Fixed {
            dtype,
            drawn: drawn.clone(),
        };
        let bs: Vec<Tensor> = [[48, 4], [24, 4], [80, 4], [24, 4]]
            .iter()
            .enumerate()
            .map(|(i, d)| draw(d, 0.05, i as u64))
            .collect();
        for dropout in [0.0, 0.25] {
            let x = draw(&[b, t, HIDDEN], 1.0, 10);
            let grad = draw(&[b, t, HIDDEN], 0.1, 11);
            let f32_model = one_layer(&source(DType::F32), &bs, dropout);
            let bf16_model = one_layer(&source(DType::BF16), &bs, dropout);
            let run = |m: &Phi3, ops| layer_grads(m, ops, &x, &grad, &positions, &bias);
            let truth = run(&f32_model, None);
            assert_eq!(truth.len(), 1 + 2 * 4);
            for ops in [LayerOps::CpuF32, LayerOps::Kernels] {
                let hand = run(&f32_model, Some(ops));
                for (i, (h, g)) in hand.iter().zip(&truth).enumerate() {
                    let d = relative(h, g);
                    assert!(
                        d <= 1e-5,
                        "f32 {ops:?} dropout {dropout}: gradient {i} differs by {d}"
                    );
                }
            }
            let (hand, graph) = (
                run(&bf16_model, Some(LayerOps::Kernels)),
                run(&bf16_model, None),
            );
            for (i, ((h, g), f)) in hand.iter().zip(&graph).zip(&truth).enumerate() {
                let (eh, eg) = (relative(h, f), relative(g, f));
                eprintln!(
                    "bf16 dropout {dropout}: gradient {i} off f32 by {eh:.1e} (graph {eg:.1e})"
                );
                assert!(
                    eh <= 1.5 * eg + 2e-3,
                    "bf16 dropout {dropout}: gradient {i} off f32 by {eh}, the graph's by {eg}"
                );
            }
        }
    }

    /// Recompute's first pass: the untracked forward gives the graph forward's output (the same
    /// dropout masks included) and records nothing.
    #[test]
    fn untracked_forward_equals_the_graph_forward() {
        let cpu = &Device::Cpu;
        let (b, t) = (2, 5);
        let positions = vec![(0..t as u32).collect::<Vec<_>>(); b];
        let bias = AttentionLayout {
            padding: None,
            documents: None,
            sliding_window: None,
        }
        .bias(b, t, cpu)
        .unwrap();
        let drawn = Rc::new(RefCell::new(HashMap::new()));
        let bs: Vec<Tensor> = [[48, 4], [24, 4], [80, 4], [24, 4]]
            .iter()
            .enumerate()
            .map(|(i, d)| draw(d, 0.05, i as u64))
            .collect();
        let model = one_layer(
            &Fixed {
                dtype: DType::F32,
                drawn,
            },
            &bs,
            0.25,
        );
        let (cfg, layer) = (model.config(), &model.layers[0]);
        let (cos, sin) = model.rope.cos_sin(&positions, DType::F32, cpu).unwrap();
        let x = draw(&[b, t, HIDDEN], 1.0, 10);
        let graph = layer
            .forward(&x, &cos, &sin, &bias, cfg, true, None)
            .unwrap();
        assert!(graph.track_op(), "the graph forward is recorded");
        let at = Positions {
            cos: &cos,
            sin: &sin,
            bias: &bias,
        };
        for ops in [LayerOps::CpuF32, LayerOps::Kernels] {
            let untracked = layer.forward_untracked(ops, &x, &at, cfg).unwrap();
            assert!(
                !untracked.track_op(),
                "{ops:?}: the untracked forward is recorded"
            );
            let d = relative(&untracked, &graph);
            assert!(d <= 1e-6, "{ops:?}: output differs by {d}");
        }
    }
}

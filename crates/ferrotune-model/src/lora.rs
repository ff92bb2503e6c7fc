//! LoRA as PEFT defines it: `y = x·Wᵀ + scale · dropout(x)·Aᵀ·Bᵀ` with `A` `[r, in]`
//! (Kaiming-uniform, a=√5, i.e. U(±1/√in)), `B` `[out, r]` (zeros), `scale = alpha / r`
//! (`alpha / √r` with rsLoRA). Only the adapter term is scaled, never the base output.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::frozen_linear::FrozenMatmul;
use crate::lora_linear::PairCasts;

/// PEFT's LoRA hyper-parameters (names as in `adapter_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module names adapted: any of `qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        }
    }
}

/// Every linear of a Phi-3 decoder layer.
pub const ALL_TARGETS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| t == module)
    }
}

/// The trainable pair of one adapted linear.
pub struct LoraPair {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// Stream key of this pair's dropout masks (set through `Phi3::set_dropout_key`).
    pub dropout_key: AtomicU64,
    /// `A` and `B` cast to the activations' dtype once, for an adapter that is only served
    /// (see [`LoraPair::cache_casts`]).
    pub inference_casts: std::sync::OnceLock<(Tensor, Tensor)>,
    /// `A` and `scale·B` cast for the training step under way, which all three of its passes
    /// reuse (see [`StepCasts`]); `None` outside one.
    step_casts: std::sync::Mutex<Option<PairCasts>>,
}

/// The pairs' [`PairCasts`] for one training step: formed when made, dropped with it. The pairs
/// must not change meanwhile (the optimizer runs after the step).
pub(crate) struct StepCasts<'a> {
    pairs: Vec<&'a LoraPair>,
}

impl<'a> StepCasts<'a> {
    pub(crate) fn new(pairs: Vec<&'a LoraPair>, dtype: DType) -> Result<StepCasts<'a>> {
        for p in &pairs {
            let casts = PairCasts::of(p.a.as_tensor(), p.b.as_tensor(), p.scale, dtype)?;
            *p.step_casts.lock().expect("step casts lock") = Some(casts);
        }
        Ok(StepCasts { pairs })
    }
}

impl Drop for StepCasts<'_> {
    fn drop(&mut self) {
        for p in &self.pairs {
            if let Ok(mut c) = p.step_casts.lock() {
                *c = None;
            }
        }
    }
}

impl LoraPair {
    /// PEFT's initialisation; `seed_values` supplies U(0,1) draws so runs are reproducible.
    pub fn init(
        r: usize,
        in_dim: usize,
        out_dim: usize,
        cfg: &LoraConfig,
        uniform: &mut dyn FnMut() -> f32,
        device: &Device,
    ) -> Result<LoraPair> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..r * in_dim)
            .map(|_| (2.0 * uniform() - 1.0) * bound)
            .collect();
        Ok(LoraPair::new(
            Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), device)?)?,
            Var::zeros((out_dim, r), DType::F32, device)?,
            cfg.scale(),
            cfg.lora_dropout,
        ))
    }

    /// `scale · dropout(x)·Aᵀ·Bᵀ` for `x` `[..., in]`, computed in `x`'s dtype. Outside
    /// training the adapter is detached: through its variables every op downstream would
    /// otherwise be recorded, and the output would keep the whole forward's activations alive
    /// (an evaluation pass would hold as much as a training step without recompute).
    pub fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            (x * self.dropout_mask(x)?)?
        } else {
            x.clone()
        };
        let (a, b) = match self.inference_casts.get() {
            Some((a, b)) if !train && a.dtype() == x.dtype() => (a.clone(), b.clone()),
            _ if train => (
                self.a.as_tensor().to_dtype(x.dtype())?,
                self.b.as_tensor().to_dtype(x.dtype())?,
            ),
            _ => (
                self.a.as_tensor().detach().to_dtype(x.dtype())?,
                self.b.as_tensor().detach().to_dtype(x.dtype())?,
            ),
        };
        x.broadcast_matmul(&a.t()?)?
            .broadcast_matmul(&b.t()?)?
            .affine(self.scale, 0.0)
    }
}

impl LoraPair {
    /// The pair as PEFT's adapter weights, with no casts held.
    pub fn new(a: Var, b: Var, scale: f64, dropout: f64) -> LoraPair {
        LoraPair {
            a,
            b,
            scale,
            dropout,
            dropout_key: AtomicU64::new(0),
            inference_casts: Default::default(),
            step_casts: Default::default(),
        }
    }

    /// Whether a training step's casts are held (only while one is under way).
    pub fn holds_step_casts(&self) -> bool {
        self.step_casts.lock().is_ok_and(|c| c.is_some())
    }

    /// The casts of the training step under way for input `x`, if one holds them.
    fn step_casts_for(&self, x: &Tensor) -> Option<PairCasts> {
        let casts = self.step_casts.lock().ok().and_then(|c| c.clone());
        casts.filter(|c| c.a.dtype() == x.dtype() && c.a.device().same_device(x.device()))
    }

    /// Inverted-dropout mask shaped like `x` (0 or `1/(1-p)`), drawn from this pair's key on
    /// `x`'s device: the same key and shape give the same mask on every device.
    fn dropout_mask(&self, x: &Tensor) -> Result<Tensor> {
        let (key, p) = (
            self.dropout_key.load(Ordering::Relaxed),
            self.dropout as f32,
        );
        if x.device().is_cuda() && !ferrotune_kernels::enabled() {
            // FERROTUNE_KERNELS=0 runs no ferrotune kernel: draw on the host and copy.
            let like = Tensor::zeros(x.shape(), x.dtype(), &Device::Cpu)?;
            return ferrotune_kernels::dropout_mask(&like, key, p)?.to_device(x.device());
        }
        ferrotune_kernels::dropout_mask(x, key, p)
    }

    /// Cast `A` and `B` to `dtype` once, so inference stops casting them at every call: two
    /// kernels fewer per adapted linear and decoded token, for an adapter served unmerged on a
    /// shared base. For an adapter that is no longer trained: a later update of `A` or `B` would
    /// not reach the casts.
    pub fn cache_casts(&self, dtype: DType) -> Result<()> {
        if self.inference_casts.get().is_none() {
            let a = self.a.as_tensor().detach().to_dtype(dtype)?;
            let b = self.b.as_tensor().detach().to_dtype(dtype)?;
            let _ = self.inference_casts.set((a, b));
        }
        Ok(())
    }

    /// `scale · B·A` `[out, in]` in `dtype`: what merging adds to the base weight.
    pub fn delta_weight(&self, dtype: DType) -> Result<Tensor> {
        self.b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scale, 0.0)?
            .to_dtype(dtype)
    }
}

fn fused_training(x: &Tensor) -> bool {
    x.device().is_cpu() || (x.device().is_cuda() && ferrotune_kernels::enabled())
}

/// A frozen projection with an optional adapter.
pub struct Linear {
    pub base: FrozenMatmul,
    pub lora: Option<LoraPair>,
    /// An adapter already folded into `base` (see [`Linear::merge`]).
    pub merged: Option<LoraPair>,
}

impl Linear {
    /// Fold the adapter into the base weight (`W + scale·B·A`, summed in f32 and rounded once
    /// to the weight's dtype, as `ferrotune export` merges); the adapter is kept aside so
    /// [`Linear::unmerge`] can restore the base.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(pair) = self.lora.take() {
            let w = self.base.weight();
            // Detached: the sum would otherwise keep its autograd inputs (the old weight and
            // f32 copies, a model's worth of memory) alive through the adapter's variables.
            let merged = (w.to_dtype(DType::F32)? + pair.delta_weight(DType::F32)?)?
                .to_dtype(w.dtype())?
                .detach();
            self.base = FrozenMatmul::new(merged);
            self.merged = Some(pair);
        }
        Ok(())
    }

    /// Undo [`Linear::merge`]: subtract the delta again and re-attach the adapter.
    pub fn unmerge(&mut self) -> Result<()> {
        if let Some(pair) = self.merged.take() {
            let w = self.base.weight();
            let base = (w.to_dtype(DType::F32)? - pair.delta_weight(DType::F32)?)?
                .to_dtype(w.dtype())?
                .detach();
            self.base = FrozenMatmul::new(base);
            self.lora = Some(pair);
        }
        Ok(())
    }

    /// `[..., in]` → `[..., out]`. Training takes the fused node ([`crate::lora_linear`]) on the
    /// CPU, and on CUDA unless `FERROTUNE_KERNELS=0`; inference and other devices compose.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.lora {
            Some(l) if train && fused_training(x) => {
                let mask = self.dropout_mask_for(x)?;
                crate::lora_linear::lora_linear(
                    x,
                    self.base.weight(),
                    (l.a.as_tensor(), l.b.as_tensor()),
                    l.scale,
                    mask,
                    l.step_casts_for(x),
                )
            }
            Some(l) => self.base.forward(x)? + l.delta(x, train)?,
            None => self.base.forward(x),
        }
    }

    /// The training forward of `x` (untracked) without an autograd node, and the dropout mask it
    /// drew, for [`Linear::grads`]. Where the fused node runs (see [`Linear::forward`]).
    pub(crate) fn forward_for_grads(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match &self.lora {
            Some(l) => {
                let mask = self.dropout_mask_for(x)?;
                let y = crate::lora_linear::lora_linear(
                    x,
                    self.base.weight(),
                    (&l.a.as_tensor().detach(), &l.b.as_tensor().detach()),
                    l.scale,
                    mask.clone(),
                    l.step_casts_for(x),
                )?;
                Ok((y, mask))
            }
            None => Ok((self.base.forward(x)?, None)),
        }
    }

    /// The dropout mask the training forward of `x` draws, if the adapter has dropout.
    pub(crate) fn dropout_mask_for(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(l) if l.dropout > 0.0 => Ok(Some(l.dropout_mask(x)?)),
            _ => Ok(None),
        }
    }

    /// The gradient of the input and the pair's `(dA, dB)` (f32) given `g`, the gradient of the
    /// output of [`Linear::forward_for_grads`]`(x)` that drew `mask`.
    pub(crate) fn grads(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        g: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        match &self.lora {
            Some(l) => {
                let (dx, da, db) = crate::lora_linear::lora_linear_grads(
                    x,
                    self.base.weight(),
                    (l.a.as_tensor(), l.b.as_tensor()),
                    l.scale,
                    mask,
                    l.step_casts_for(x).as_ref(),
                    g,
                )?;
                Ok((dx, Some((da, db))))
            }
            None => Ok((g.broadcast_matmul(self.base.weight())?, None)),
        }
    }
}

//! AdamW with decoupled weight decay on the fp32 LoRA master weights, step for step as
//! `torch.optim.AdamW` (single-tensor path): decay, moment updates, bias corrections, update.
//! Also the global gradient-norm clip of `torch.nn.utils.clip_grad_norm_`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Moments for each parameter; `step` counts updates made.
pub struct AdamW {
    pub settings: AdamWSettings,
    pub step: u64,
    /// `(exp_avg, exp_avg_sq)` per parameter, fp32, same order as the parameters.
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(settings: AdamWSettings, params: &[Var]) -> Result<AdamW> {
        let moments = params
            .iter()
            .map(|p| {
                let z = p.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok((z.clone(), z))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            settings,
            step: 0,
            moments,
        })
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn update(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let s = self.settings;
        self.step += 1;
        let bias1 = 1.0 - s.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - s.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        for ((p, g), (m, v)) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            let g = g.to_dtype(DType::F32)?;
            let decayed = p.as_tensor().affine(1.0 - lr * s.weight_decay, 0.0)?;
            // exp_avg.lerp_(grad, 1 - beta1)
            *m = (&*m + ((&g - &*m)? * (1.0 - s.beta1))?)?;
            *v = ((&*v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + s.eps)?;
            let update = ((&*m / denom)? * step_size)?;
            p.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`) on the CPU.
    pub fn state_tensors(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, (m, v)) in names.iter().zip(&self.moments) {
            out.insert(format!("{name}.exp_avg"), m.to_device(&Device::Cpu)?);
            out.insert(format!("{name}.exp_avg_sq"), v.to_device(&Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restore moments saved by [`AdamW::state_tensors`] (from `path`, for messages).
    pub fn load_state(
        &mut self,
        names: &[String],
        tensors: &HashMap<String, Tensor>,
        step: u64,
        path: &Path,
        device: &Device,
    ) -> Result<()> {
        for (name, (m, v)) in names.iter().zip(self.moments.iter_mut()) {
            let get = |k: String, like: &Tensor| -> Result<Tensor> {
                let t = tensors.get(&k).ok_or_else(|| TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!(
                        "optimizer state has no {k}; the checkpoint is from another adapter layout"
                    ),
                })?;
                if t.dims() != like.dims() {
                    return Err(TrainError::Checkpoint {
                        path: path.to_path_buf(),
                        message: format!(
                            "{k} has shape {:?}, expected {:?}",
                            t.dims(),
                            like.dims()
                        ),
                    });
                }
                Ok(t.to_dtype(DType::F32)?.to_device(device)?)
            };
            *m = get(format!("{name}.exp_avg"), m)?;
            *v = get(format!("{name}.exp_avg_sq"), v)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Total L2 norm of all gradients (f64), as `clip_grad_norm_` computes it: the norm of the
/// per-tensor norms.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(combine_norms(&tensor_norms(grads)?))
}

/// Each gradient's own L2 norm (computed in f32, as torch does per tensor).
pub fn tensor_norms(grads: &[Tensor]) -> Result<Vec<f64>> {
    grads
        .iter()
        .map(|g| {
            Ok(f64::from(
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .to_scalar::<f32>()?,
            ))
        })
        .collect()
}

/// The norm of per-tensor norms, summed in tensor order (so ranks holding different tensors
/// get the single-process value once they share their norms).
pub fn combine_norms(norms: &[f64]) -> f64 {
    norms.iter().fold(0f64, |sum, n| sum + n * n).sqrt()
}

/// Scale gradients so their global norm is at most `max_norm` (coefficient
/// `max_norm / (norm + 1e-6)` clamped to 1, as torch does).
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_adamw_step_moves_each_weight_by_about_lr() {
        // With bias correction the first update is lr · g/|g| (± eps), whatever g's size.
        let p =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            AdamWSettings {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            std::slice::from_ref(&p),
        )
        .unwrap();
        let g = Tensor::new(&[0.3f32, -7.0, 1e-3], &Device::Cpu).unwrap();
        opt.update(std::slice::from_ref(&p), &[g], 0.01).unwrap();
        let v = p.as_tensor().to_vec1::<f32>().unwrap();
        for (got, want) in v.iter().zip([0.99f32, -1.99, 0.49]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn clip_scales_to_the_max_norm_only_when_above() {
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let n = global_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        clip(&mut g, n, 10.0).unwrap();
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), [3.0, 4.0]);
        clip(&mut g, n, 1.0).unwrap();
        let c = global_norm(&g).unwrap();
        assert!((c - 1.0).abs() < 1e-5, "{c}");
    }
}

//! AdamW with decoupled weight decay on the fp32 LoRA master weights, step for step as
//! `torch.optim.AdamW` (single-tensor path): decay, moment updates, bias corrections, update.
//! Also the global gradient-norm clip of `torch.nn.utils.clip_grad_norm_`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Moments for each parameter; `step` counts updates made.
///
/// Parameters are updated in buckets of consecutive tensors, each bucket's arithmetic run once
/// over its tensors concatenated, with its moments stored flat. On CUDA one bucket holds them
/// all: LoRA on Phi-3-mini is 256 small tensors, and a dozen kernels per tensor were thousands of
/// launches per optimizer step. On the CPU each tensor is its own bucket: passes over all 25 M
/// values at once left the cache (6× slower), and megabyte buckets still paid 10% for their
/// copies. Each element sees exactly the arithmetic torch's single-tensor AdamW gives it,
/// whatever the buckets.
pub struct AdamW {
    pub settings: AdamWSettings,
    pub step: u64,
    shapes: Vec<Shape>,
    buckets: Vec<Bucket>,
}

/// Parameters `params` (indices) with their `exp_avg` and `exp_avg_sq`, flat and concatenated.
struct Bucket {
    params: Range<usize>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Most values a bucket takes (a larger tensor gets a bucket of its own): on the CPU, one
/// tensor per bucket.
fn bucket_limit(device: &Device) -> usize {
    if device.is_cpu() {
        1
    } else {
        usize::MAX
    }
}

/// Consecutive index ranges of `shapes`, each at most `limit` values unless one tensor is more.
fn bucket_ranges(shapes: &[Shape], limit: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, s) in shapes.iter().enumerate() {
        let n = s.elem_count();
        if i > start && size + n > limit {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < shapes.len() {
        out.push(start..shapes.len());
    }
    out
}

/// Tensors as f32, flattened and concatenated.
fn flat<'a>(ts: impl Iterator<Item = &'a Tensor>) -> Result<Tensor> {
    let parts = ts
        .map(|t| t.to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

impl AdamW {
    pub fn new(settings: AdamWSettings, params: &[Var]) -> Result<AdamW> {
        let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
        AdamW::with_bucket_limit(settings, params, bucket_limit(&device))
    }

    fn with_bucket_limit(settings: AdamWSettings, params: &[Var], limit: usize) -> Result<AdamW> {
        let shapes: Vec<Shape> = params.iter().map(|p| p.shape().clone()).collect();
        let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
        let buckets = bucket_ranges(&shapes, limit)
            .into_iter()
            .map(|params| {
                let n = shapes[params.clone()]
                    .iter()
                    .map(Shape::elem_count)
                    .sum::<usize>();
                let zeros = Tensor::zeros(n, DType::F32, &device)?;
                Ok(Bucket {
                    params,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            settings,
            step: 0,
            shapes,
            buckets,
        })
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn update(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.shapes.len() || grads.len() != params.len() {
            return Err(candle_core::Error::Msg(format!(
                "AdamW: {} parameters and {} gradients for an optimizer of {}",
                params.len(),
                grads.len(),
                self.shapes.len()
            ))
            .into());
        }
        let s = self.settings;
        self.step += 1;
        let bias1 = 1.0 - s.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - s.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        for bucket in &mut self.buckets {
            let range = bucket.params.clone();
            let g = flat(grads[range.clone()].iter())?;
            let decayed = flat(params[range.clone()].iter().map(|v| v.as_tensor()))?
                .affine(1.0 - lr * s.weight_decay, 0.0)?;
            let (m, v) = (&bucket.exp_avg, &bucket.exp_avg_sq);
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = (m + ((&g - m)? * (1.0 - s.beta1))?)?;
            let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            drop(g);
            let denom = ((v.sqrt()? / bias2_sqrt)? + s.eps)?;
            let updated = (decayed - ((&m / denom)? * step_size)?)?;
            let mut at = 0;
            for (param, shape) in params[range.clone()].iter().zip(&self.shapes[range]) {
                let n = shape.elem_count();
                param.set(&updated.narrow(0, at, n)?.reshape(shape)?)?;
                at += n;
            }
            bucket.exp_avg = m;
            bucket.exp_avg_sq = v;
        }
        Ok(())
    }

    /// Each parameter's `(exp_avg, exp_avg_sq)`, in parameter order, each in storage of its own:
    /// a view into the bucket would take the whole bucket along wherever it goes (candle's
    /// `to_device` moves a tensor's entire storage), 256 times for Phi-3-mini's checkpoint.
    fn moments(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let mut out = Vec::with_capacity(self.shapes.len());
        for bucket in &self.buckets {
            let mut at = 0;
            for shape in &self.shapes[bucket.params.clone()] {
                let n = shape.elem_count();
                let part = |t: &Tensor| t.narrow(0, at, n)?.force_contiguous()?.reshape(shape);
                out.push((part(&bucket.exp_avg)?, part(&bucket.exp_avg_sq)?));
                at += n;
            }
        }
        Ok(out)
    }

    /// Moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`) on the CPU.
    pub fn state_tensors(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, (m, v)) in names.iter().zip(self.moments()?) {
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
        let get = |k: String, shape: &candle_core::Shape| -> Result<Tensor> {
            let t = tensors.get(&k).ok_or_else(|| TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "optimizer state has no {k}; the checkpoint is from another adapter layout"
                ),
            })?;
            if t.dims() != shape.dims() {
                return Err(TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("{k} has shape {:?}, expected {:?}", t.dims(), shape.dims()),
                });
            }
            Ok(t.to_dtype(DType::F32)?.to_device(device)?.flatten_all()?)
        };
        let mut loaded = Vec::with_capacity(self.shapes.len());
        for (name, shape) in names.iter().zip(&self.shapes) {
            loaded.push((
                get(format!("{name}.exp_avg"), shape)?,
                get(format!("{name}.exp_avg_sq"), shape)?,
            ));
        }
        if loaded.len() != self.shapes.len() {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "optimizer state for {} parameters, the adapter has {}",
                    loaded.len(),
                    self.shapes.len()
                ),
            });
        }
        for bucket in &mut self.buckets {
            let part = &loaded[bucket.params.clone()];
            bucket.exp_avg = Tensor::cat(&part.iter().map(|(m, _)| m).collect::<Vec<_>>(), 0)?;
            bucket.exp_avg_sq = Tensor::cat(&part.iter().map(|(_, v)| v).collect::<Vec<_>>(), 0)?;
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

/// Each gradient's own L2 norm (computed in f32, as torch does per tensor), read back from the
/// device once for all of them.
pub fn tensor_norms(grads: &[Tensor]) -> Result<Vec<f64>> {
    if grads.is_empty() {
        return Ok(Vec::new());
    }
    let norms = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.reshape(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&norms, 0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
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

    /// torch's single-tensor AdamW, one tensor at a time (what `update` computed before its
    /// moments were flattened).
    fn per_tensor_step(
        s: AdamWSettings,
        step: u64,
        p: &Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        lr: f64,
    ) -> Tensor {
        let bias1 = 1.0 - s.beta1.powi(step as i32);
        let bias2_sqrt = (1.0 - s.beta2.powi(step as i32)).sqrt();
        let decayed = p.affine(1.0 - lr * s.weight_decay, 0.0).unwrap();
        *m = (&*m + ((g - &*m).unwrap() * (1.0 - s.beta1)).unwrap()).unwrap();
        *v = ((&*v * s.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - s.beta2)).unwrap()).unwrap();
        let denom = ((v.sqrt().unwrap() / bias2_sqrt).unwrap() + s.eps).unwrap();
        let update = ((&*m / denom).unwrap() * (lr / bias1)).unwrap();
        (decayed - update).unwrap()
    }

    /// Over several steps with weight decay, tensors of different shapes get bit for bit the
    /// per-tensor update, whatever the buckets (one per tensor, 20 values, all in one), and the
    /// moments saved and loaded into a fresh optimizer continue it exactly.
    #[test]
    fn bucketed_update_equals_the_per_tensor_update_and_resumes_exactly() {
        for limit in [1, 20, usize::MAX] {
            bucketed_update_run(limit);
        }
    }

    fn bucketed_update_run(limit: usize) {
        let cpu = &Device::Cpu;
        let settings = AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let shapes: [&[usize]; 3] = [&[4, 3], &[5], &[2, 7]];
        let params: Vec<Var> = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::randn(0f32, 1.0, *s, cpu).unwrap()).unwrap())
            .collect();
        let mut reference: Vec<(Tensor, Tensor, Tensor)> = params
            .iter()
            .map(|p| {
                let t = p.as_tensor().copy().unwrap();
                (t.clone(), t.zeros_like().unwrap(), t.zeros_like().unwrap())
            })
            .collect();
        let mut opt = AdamW::with_bucket_limit(settings, &params, limit).unwrap();
        let names: Vec<String> = (0..3).map(|i| format!("p{i}")).collect();
        let mut resumed: Option<(Vec<Var>, AdamW)> = None;
        for step in 1..=4u64 {
            let grads: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(0f32, 1.0, *s, cpu).unwrap())
                .collect();
            let lr = 1e-2 / step as f64;
            opt.update(&params, &grads, lr).unwrap();
            for ((p, m, v), g) in reference.iter_mut().zip(&grads) {
                *p = per_tensor_step(settings, step, p, g, m, v, lr);
            }
            if let Some((ps, o)) = resumed.as_mut() {
                o.update(ps, &grads, lr).unwrap();
            }
            for (i, (p, (want, _, _))) in params.iter().zip(&reference).enumerate() {
                let got = p
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, want, "limit {limit}, step {step}: parameter {i}");
                if let Some((ps, _)) = &resumed {
                    let r = ps[i]
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    assert_eq!(r, want, "step {step}: resumed parameter {i}");
                }
            }
            if step == 2 {
                let state = opt.state_tensors(&names).unwrap();
                for (k, t) in &state {
                    // Not a view into the bucket (which would carry all of it to the CPU).
                    assert_eq!(t.layout().start_offset(), 0, "limit {limit}: {k}");
                    assert!(t.is_contiguous());
                }
                let ps: Vec<Var> = params
                    .iter()
                    .map(|p| Var::from_tensor(&p.as_tensor().copy().unwrap()).unwrap())
                    .collect();
                let mut o = AdamW::with_bucket_limit(settings, &ps, limit).unwrap();
                o.load_state(&names, &state, 2, Path::new("ckpt"), cpu)
                    .unwrap();
                resumed = Some((ps, o));
            }
        }
        let wrong = opt.update(&params[..2], &[], 1e-3);
        assert!(
            wrong.is_err(),
            "a parameter list of another length is refused"
        );
    }

    #[test]
    fn buckets_split_at_the_limit_and_keep_large_tensors_whole() {
        let shapes: Vec<Shape> = [12, 5, 14, 100, 3]
            .iter()
            .map(|&n| Shape::from(n))
            .collect();
        assert_eq!(bucket_ranges(&shapes, 20), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(
            bucket_ranges(&shapes, 1),
            vec![0..1, 1..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(bucket_ranges(&shapes, usize::MAX), vec![0..5]);
        assert!(bucket_ranges(&[], 20).is_empty());
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

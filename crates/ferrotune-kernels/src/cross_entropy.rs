//! Token cross-entropy over the vocabulary, one kernel per quantity (`cuda/cross_entropy.cu`):
//! the loss of each row and the gradient `softmax − onehot` of its logits, both computed in f32
//! from logits in their own dtype. candle composes the loss from about ten full passes over the
//! `[rows, vocab]` logits in f32 (1 GB of buffers for 2,048 tokens of Phi-3's 32k vocabulary) and
//! as many backward; these read the logits once or twice and write at most one logits-sized
//! buffer, in the logits' dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::rows;

/// The target of a row that is not trained.
pub const NO_TARGET: u32 = u32::MAX;

/// `-log softmax(logits_r)[target_r]` per row (f32 `[n]`, 0 where the target is [`NO_TARGET`])
/// for `logits` `[n, v]` and u32 `targets` `[n]`. Records no backward (see [`cross_entropy_grad`]).
pub fn cross_entropy_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check(logits, targets)?;
    logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropy { grad: false })
}

/// `softmax(logits_r) − onehot(target_r)` per row, `[n, v]` in the logits' dtype (a zero row
/// where the target is [`NO_TARGET`]): the gradient of [`cross_entropy_nll`]'s sum.
pub fn cross_entropy_grad(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check(logits, targets)?;
    logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropy { grad: true })
}

fn check(logits: &Tensor, targets: &Tensor) -> Result<()> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != candle_core::DType::U32 {
        candle_core::bail!(
            "cross_entropy: targets must be u32 [{n}], got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    Ok(())
}

/// The loss (`grad: false`) or the logits' gradient (`grad: true`).
struct CrossEntropy {
    grad: bool,
}

/// One row's maximum and `Σ exp(x − max)`. The sum runs in f64: summed in order in f32, 32k
/// terms carry a relative error near 1e-5 (more than the kernel's tree of partial sums), which
/// would make the reference the less accurate side of a parity test.
fn row_stats(row: &[f32]) -> (f32, f32) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let z: f64 = row.iter().map(|&x| f64::from((x - m).exp())).sum();
    (m, z as f32)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        if self.grad {
            "cross-entropy-grad"
        } else {
            "cross-entropy-nll"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = l1.dims()[1];
        let x = rows::to_f32(s1, l1)?;
        let CpuStorage::U32(t) = s2 else {
            candle_core::bail!("cross_entropy: targets must be u32");
        };
        let t = &t[l2.start_offset()..l2.start_offset() + l2.shape().elem_count()];
        if self.grad {
            let mut d = vec![0f32; x.len()];
            for ((row, dr), &target) in x.chunks(v).zip(d.chunks_mut(v)).zip(t) {
                if target == NO_TARGET {
                    continue;
                }
                let (m, z) = row_stats(row);
                for (j, (o, &xj)) in dr.iter_mut().zip(row).enumerate() {
                    let p = (xj - m).exp() / z;
                    *o = if j as u32 == target { p - 1.0 } else { p };
                }
            }
            Ok((
                rows::from_f32(d, l1.shape(), s1.dtype())?,
                l1.shape().clone(),
            ))
        } else {
            let nll: Vec<f32> = x
                .chunks(v)
                .zip(t)
                .map(|(row, &target)| {
                    if target == NO_TARGET {
                        return 0.0;
                    }
                    let (m, z) = row_stats(row);
                    z.ln() + m - row[target as usize]
                })
                .collect();
            let n = nll.len();
            Ok((CpuStorage::F32(nll), Shape::from(n)))
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let k = cuda::Rows {
            x: (s1, l1),
            t: (s2, l2),
        };
        if self.grad {
            let out = crate::launch::run(
                &k,
                s1.dtype(),
                s1.device(),
                cuda::MODULE,
                "cross_entropy_grad",
            )?;
            Ok((out, l1.shape().clone()))
        } else {
            let out = k.nll()?;
            Ok((out, Shape::from(l1.dims()[0])))
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DeviceRepr, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

    use crate::launch::{function, i32_of, output, per_row, view, Launch};

    pub const MODULE: (&str, &str) = ("ferrotune_cross_entropy", crate::ptx::CROSS_ENTROPY);

    pub struct Rows<'a> {
        pub x: (&'a CudaStorage, &'a Layout),
        pub t: (&'a CudaStorage, &'a Layout),
    }

    impl Rows<'_> {
        /// The per-row loss (f32 whatever the logits' dtype).
        pub fn nll(&self) -> Result<CudaStorage> {
            let dtype = self.x.0.dtype();
            let dev = self.x.0.device();
            let func = function(dtype, dev, MODULE, "cross_entropy_nll")?;
            let out = match dtype {
                DType::F32 => self.nll_with::<f32>(dev, &func)?,
                DType::BF16 => self.nll_with::<half::bf16>(dev, &func)?,
                _ => self.nll_with::<half::f16>(dev, &func)?,
            };
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        fn nll_with<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<f32>> {
            let n = self.x.1.dims()[0];
            self.launch_into::<T, f32>(dev, func, output::<f32>(dev, n)?)
        }

        /// Launches `func` over the rows with `out` as its output (the kernels differ only in
        /// what they write).
        fn launch_into<T: CudaDType + DeviceRepr, O: DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
            out: CudaSlice<O>,
        ) -> Result<CudaSlice<O>> {
            let (n, v) = self.x.1.shape().dims2()?;
            let x = view::<T>(self.x.0, self.x.1)?;
            let t = view::<u32>(self.t.0, self.t.1)?;
            let v32 = i32_of(v, "vocabulary")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&x);
            b.arg(&t);
            b.arg(&out);
            b.arg(&v32);
            // SAFETY: the arguments match cross_entropy_{nll,grad}_<T>'s signature.
            unsafe { b.launch(per_row(n, v)) }.w()?;
            Ok(out)
        }
    }

    impl Launch for Rows<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let n = self.x.1.shape().elem_count();
            self.launch_into::<T, T>(dev, func, output::<T>(dev, n)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The CPU reference against candle's composed log-softmax: the loss per row and, through
    /// candle's backward of the summed loss, the gradient; untrained rows give 0 and a zero row.
    #[test]
    fn the_cpu_reference_matches_the_composed_loss_and_its_gradient() {
        let cpu = &Device::Cpu;
        let (n, v) = (6, 37);
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (n, v), cpu).unwrap()).unwrap();
        let targets = [3u32, NO_TARGET, 0, 36, 17, NO_TARGET];
        let t = Tensor::new(&targets, cpu).unwrap();
        let nll = cross_entropy_nll(x.as_tensor(), &t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let grad = cross_entropy_grad(x.as_tensor(), &t).unwrap();
        let logp = candle_nn_free_log_softmax(x.as_tensor());
        let mut composed = Vec::new();
        for (r, &target) in targets.iter().enumerate() {
            if target == NO_TARGET {
                assert_eq!(nll[r], 0.0);
                continue;
            }
            let l = logp
                .get(r)
                .unwrap()
                .get(target as usize)
                .unwrap()
                .neg()
                .unwrap();
            let lv = l.to_scalar::<f32>().unwrap();
            assert!(
                (nll[r] - lv).abs() <= 1e-5 * lv.abs().max(1.0),
                "row {r}: {} vs {lv}",
                nll[r]
            );
            composed.push(l);
        }
        let total = Tensor::stack(&composed, 0).unwrap().sum_all().unwrap();
        let expected = total.backward().unwrap();
        let expected = expected.get(x.as_tensor()).unwrap();
        let diff = (&grad - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() <= 1e-6);
        // bf16 logits: the gradient comes back in bf16, the loss in f32.
        let xb = x.as_tensor().to_dtype(DType::BF16).unwrap();
        assert_eq!(cross_entropy_grad(&xb, &t).unwrap().dtype(), DType::BF16);
        assert_eq!(cross_entropy_nll(&xb, &t).unwrap().dtype(), DType::F32);
        assert!(cross_entropy_nll(x.as_tensor(), &t.narrow(0, 0, 5).unwrap()).is_err());
    }

    fn candle_nn_free_log_softmax(x: &Tensor) -> Tensor {
        let m = x.max_keepdim(D::Minus1).unwrap().detach();
        let shifted = x.broadcast_sub(&m).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        shifted.broadcast_sub(&lse).unwrap()
    }
}

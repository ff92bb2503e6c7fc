//! Backpropagation from a tensor with a given gradient (a vector-Jacobian product), which
//! candle's `backward` (from a scalar, seeded with one) does not offer.
//!
//! The recompute backward re-runs one layer and needs the gradients its output's incoming
//! gradient `g` induces. Written as `(y·g).sum().backward()`, candle also forms `y·g`, broadcasts
//! the seed, multiplies it into both factors (the gradient of `g`, a constant, included) and
//! starts each as a zeroed buffer: four `[tokens, hidden]` buffers per layer that carry nothing.
//! Here a node whose backward hands over `g` itself stands in for the product and the sum.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The gradients of everything `y` depends on, for `d loss / d y = grad`.
pub fn backward_from(y: &Tensor, grad: &Tensor) -> Result<GradStore> {
    if y.shape() != grad.shape() {
        candle_core::bail!(
            "backward seed: gradient {:?} for a tensor of {:?}",
            grad.shape(),
            y.shape()
        );
    }
    y.apply_op1(Seed {
        grad: grad.detach(),
    })?
    .backward()
}

struct Seed {
    grad: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "backward-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        use candle_core::DType;
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, DType::F32)?, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same gradients, bit for bit, as `(y·g).sum().backward()`.
    #[test]
    fn seeded_backward_equals_the_product_trick() {
        let cpu = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 4), cpu).unwrap()).unwrap();
        let y = x.matmul(&w).unwrap().tanh().unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 4), cpu).unwrap();
        let seeded = backward_from(&y, &g).unwrap();
        let product = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (a, b) = (
                seeded.get(v.as_tensor()).unwrap(),
                product.get(v.as_tensor()).unwrap(),
            );
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b);
            assert!(a.iter().any(|v| *v != 0.0));
        }
        assert!(backward_from(&y, &g.t().unwrap()).is_err());
    }
}

//! `x · Wᵀ` for a frozen weight, whose backward yields only the input gradient.
//!
//! candle's matmul backward computes the gradient of both operands, so a frozen 3072×9216 base
//! weight would get a full-size gradient, computed (a third more FLOPs) and kept (gigabytes at
//! Phi-3-mini size). This op runs the same backend GEMM forward and, backward, returns
//! `grad · W` for the input and nothing for the weight.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// The frozen weight `[out, in]` of one projection.
pub struct FrozenMatmul {
    weight: Tensor,
}

impl FrozenMatmul {
    pub fn new(weight: Tensor) -> FrozenMatmul {
        FrozenMatmul { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        x.apply_op1(FrozenMatmul {
            weight: self.weight.clone(),
        })
    }

    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize, Shape)> {
        let dims = layout.dims();
        let k = *dims
            .last()
            .expect("matmul input has at least one dimension");
        let (out, inp) = self.weight.dims2()?;
        if k != inp {
            candle_core::bail!("frozen matmul: input width {k}, weight is [{out}, {inp}]");
        }
        let m = dims[..dims.len() - 1].iter().product();
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = out;
        Ok((m, out, k, Shape::from(shape)))
    }
}

/// Below this many rows (decoding: one token per sequence) the product is formed transposed.
const FEW_ROWS: usize = 32;

/// `x·Wᵀ` for a short `x` `[m, k]`, as `(W·xᵀ)ᵀ`: the GEMM's microkernel tiles the long side in
/// registers (16 f32 lanes × 3 with AVX-512), so `m` = 8 rows would leave most of each tile
/// empty, while `W·xᵀ` puts the weight's thousands of rows there. The `[n, m]` result is then
/// transposed into place (n·m values, small next to the weight the GEMM streams).
fn few_rows(
    x: &CpuStorage,
    x_layout: &Layout,
    weight: &Tensor,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CpuStorage> {
    let (w, w_layout) = weight.storage_and_layout();
    let Storage::Cpu(w) = &*w else {
        candle_core::bail!("frozen matmul: weight and input are on different devices");
    };
    let xt = x_layout.transpose(0, 1)?;
    let out_t = w.matmul(x, (1, n, m, k), w_layout, &xt)?;
    let mut out = candle_core::backend::BackendDevice::zeros_impl(
        x.device(),
        &Shape::from((m, n)),
        out_t.dtype(),
    )?;
    out_t.copy_strided_src(&mut out, 0, &Layout::contiguous((n, m)).transpose(0, 1)?)?;
    Ok(out)
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k, shape) = self.dims(layout)?;
        let x_layout = Layout::contiguous_with_offset((m, k), layout.start_offset());
        if m < FEW_ROWS {
            return Ok((few_rows(storage, &x_layout, &self.weight, m, n, k)?, shape));
        }
        let wt = self.weight.t()?;
        let (w, w_layout) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen matmul: weight and input are on different devices");
        };
        let out = storage.matmul(w, (1, m, n, k), &x_layout, w_layout)?;
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, shape) = self.dims(layout)?;
        let wt = self.weight.t()?;
        let (w, w_layout) = wt.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            candle_core::bail!("frozen matmul: weight and input are on different devices");
        };
        let x_layout = Layout::contiguous_with_offset((m, k), layout.start_offset());
        let out = storage.matmul(w, (1, m, n, k), &x_layout, w_layout)?;
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // d(x·Wᵀ)/dx = grad · W; no gradient for W, by design.
        Ok(Some(grad_res.broadcast_matmul(&self.weight)?))
    }
}

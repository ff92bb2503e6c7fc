//! CPU-side helpers of the references: any float storage as f32 rows and back.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape};

/// The elements of `storage` under `layout` as f32, in row-major order.
pub fn to_f32(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    match storage.to_dtype(layout, DType::F32)? {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("to_dtype(f32) did not give f32"),
    }
}

/// f32 values of `shape` stored as `dtype`.
pub fn from_f32(values: Vec<f32>, shape: &Shape, dtype: DType) -> Result<CpuStorage> {
    CpuStorage::F32(values).to_dtype(&Layout::contiguous(shape), dtype)
}

/// Rounding of an f32 to `dtype` and back: where the reference framework stores an intermediate
/// in the model's dtype, the CPU references round the same way the kernels do.
pub fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => |x| half::bf16::from_f32(x).to_f32(),
        DType::F16 => |x| half::f16::from_f32(x).to_f32(),
        _ => |x| x,
    }
}

/// Test helper: `fused` and `composed` give the same output and the same input gradient (under a
/// fixed weighting of the output) on `x`, to `tol` relative to the largest value.
#[cfg(test)]
pub fn check_against_composed(
    x: &candle_core::Var,
    fused: impl Fn(&candle_core::Tensor) -> Result<candle_core::Tensor>,
    composed: impl Fn(&candle_core::Tensor) -> Result<candle_core::Tensor>,
    tol: f32,
) {
    use candle_core::Tensor;
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let a = fused(x.as_tensor()).unwrap();
    let b = composed(x.as_tensor()).unwrap();
    let probe = Tensor::randn(0f32, 1.0, a.shape(), a.device()).unwrap();
    let dy = max_abs(&(&a - &b).unwrap()) / max_abs(&b);
    assert!(dy <= tol, "forward differs by {dy:e}");
    let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let (ga, gb) = (
        ga.get(x.as_tensor()).unwrap(),
        gb.get(x.as_tensor()).unwrap(),
    );
    let dg = max_abs(&(ga - gb).unwrap()) / max_abs(gb);
    assert!(dg <= tol, "gradient differs by {dg:e}");
}

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

//! Running one of the kernels on a candle CUDA storage: pick the instantiation for the dtype
//! (`<name>_f32|bf16|f16`), load it from its PTX module once, allocate the output, launch.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

/// A kernel call, generic over the element type it is launched with.
pub trait Launch {
    /// Launches `func` (already resolved for `T`) and returns its output.
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        func: &CudaFunction,
    ) -> Result<CudaSlice<T>>;
}

/// Runs `kernel` as `<base>_<dtype>` from `module`'s PTX.
pub fn run<K: Launch>(
    kernel: &K,
    dtype: DType,
    dev: &CudaDevice,
    (module, ptx): (&str, &str),
    base: &str,
) -> Result<CudaStorage> {
    let func = function(dtype, dev, (module, ptx), base)?;
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(kernel.launch::<f32>(dev, &func)?, dev.clone()),
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(kernel.launch::<half::bf16>(dev, &func)?, dev.clone())
        }
        _ => CudaStorage::wrap_cuda_slice(kernel.launch::<half::f16>(dev, &func)?, dev.clone()),
    })
}

/// `<base>_<dtype>` from `module`'s PTX, loaded once per device.
pub fn function(
    dtype: DType,
    dev: &CudaDevice,
    (module, ptx): (&str, &str),
    base: &str,
) -> Result<CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("{base}: unsupported dtype {other:?} (f32, bf16 or f16)"),
    };
    Ok(dev
        .get_or_load_custom_func(&format!("{base}_{suffix}"), module, ptx)?
        .into_cuda_function())
}

/// The elements of `storage` from `layout`'s offset (the layout must be contiguous).
pub fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        candle_core::bail!("kernel input must be contiguous");
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
}

/// An output buffer of `n` elements that the kernel fills completely.
pub fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every kernel here writes each element of its output before anything reads it.
    unsafe { dev.alloc::<T>(n) }
}

/// One block per row, 256 threads (128 for short rows).
pub fn per_row(rows: usize, len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (if len >= 1024 { 256 } else { 128 }, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride elementwise launch over `n` elements.
pub fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` as the kernels' `int`.
pub fn i32_of(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} {n} exceeds i32")))
}

/// The storage behind a tensor on the GPU (checked to be a CUDA storage) and its layout.
pub fn storage_of(
    t: &candle_core::Tensor,
) -> Result<(
    impl std::ops::Deref<Target = candle_core::Storage> + '_,
    Layout,
)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, candle_core::Storage::Cuda(_)) {
        candle_core::bail!("kernel operands must all be on the GPU");
    }
    let l = l.clone();
    Ok((s, l))
}

/// Runs `f` with the CUDA storages of `tensors` and their layouts' offsets (read guards held for
/// the launch): for kernels that also write into tensors allocated for them beforehand (several
/// outputs, or a buffer updated in place).
pub fn with_storages<R>(
    tensors: &[&candle_core::Tensor],
    f: impl FnOnce(&[(&CudaStorage, usize)]) -> Result<R>,
) -> Result<R> {
    let guards = tensors
        .iter()
        .map(|t| storage_of(t))
        .collect::<Result<Vec<_>>>()?;
    let storages: Vec<(&CudaStorage, usize)> = guards
        .iter()
        .map(|(s, l)| match &**s {
            candle_core::Storage::Cuda(s) => (s, l.start_offset()),
            _ => unreachable!("storage_of checked the device"),
        })
        .collect();
    f(&storages)
}

/// Storage `i` of [`with_storages`]' list as elements of `T` from its layout's offset.
pub fn typed<'a, T: CudaDType>(
    s: &[(&'a CudaStorage, usize)],
    i: usize,
) -> Result<CudaView<'a, T>> {
    Ok(s[i].0.as_cuda_slice::<T>()?.slice(s[i].1..))
}

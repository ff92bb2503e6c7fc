//! A tensor computed outside candle's graph, handed over as the output of a custom op so the
//! op's own backward can follow it: the op's forward takes it once (and so releases it) and
//! returns its storage for the device it runs on.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Result, Shape, Tensor};

pub(crate) struct Handover {
    what: &'static str,
    value: Mutex<Option<Tensor>>,
}

impl Handover {
    /// `what` names the value in errors.
    pub fn new(what: &'static str, value: Tensor) -> Handover {
        Handover {
            what,
            value: Mutex::new(Some(value)),
        }
    }

    fn take(&self) -> Result<Tensor> {
        match self.value.lock().expect("handover lock").take() {
            Some(t) => Ok(t),
            None => candle_core::bail!("{}: already handed over", self.what),
        }
    }

    /// The value as a CPU storage (in its own dtype).
    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.take()?.to_device(&candle_core::Device::Cpu)?;
        let shape = t.shape().clone();
        let flat = t.flatten_all()?;
        Ok((
            match t.dtype() {
                DType::F32 => CpuStorage::F32(flat.to_vec1()?),
                DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
                DType::F16 => CpuStorage::F16(flat.to_vec1()?),
                other => candle_core::bail!("{}: unexpected dtype {other:?}", self.what),
            },
            shape,
        ))
    }

    /// The value as a CUDA storage: one device copy, since a graph node cannot adopt another
    /// tensor's storage.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let t = self.take()?.contiguous()?;
        let shape = t.shape().clone();
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
            _ => candle_core::bail!("{}: computed off the GPU", self.what),
        }
    }
}

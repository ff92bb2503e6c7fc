//! The GPU backend: gradient reductions with NCCL on the devices' own memory; the few scalars,
//! barriers and the rare ZeRO weight and optimizer-state exchanges go through the TCP
//! communicator the job was admitted with (which also handed out the NCCL id).
//!
//! NCCL sums in its ring's order, not the single process's: results equal one process's to
//! fp32 rounding rather than bit for bit (the TCP backend is the exact one).

use std::sync::Arc;
use std::time::Duration;

use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::tcp::TcpComm;
use super::{fold_all, Communicator};
use crate::error::{Result, TrainError};

/// A fresh NCCL id for rank 0 to hand out at rendezvous.
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| {
        TrainError::Distributed(format!(
            "NCCL: no unique id ({e:?}); is libnccl.so.2 on LD_LIBRARY_PATH?"
        ))
    })?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

pub struct NcclComm {
    comm: Comm,
    device: Device,
    tcp: TcpComm,
}

impl NcclComm {
    /// NCCL over `device` for the job `tcp` admitted (its NCCL id came with the admission).
    pub fn join(tcp: TcpComm, device: &Device) -> Result<NcclComm> {
        let Device::Cuda(cuda) = device else {
            return Err(TrainError::Distributed("NCCL needs a CUDA device".into()));
        };
        let bytes = tcp
            .nccl_id
            .clone()
            .ok_or_else(|| TrainError::Distributed("rank 0 handed out no NCCL id".into()))?;
        if bytes.len() != 128 {
            return Err(TrainError::Distributed(format!(
                "an NCCL id of {} bytes (128 expected)",
                bytes.len()
            )));
        }
        let mut internal = [0 as core::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as core::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            tcp.rank(),
            tcp.world(),
            Id::uninit(internal),
        )
        .map_err(|e| {
            TrainError::Distributed(format!(
                "NCCL init of rank {} of {}: {e:?}",
                tcp.rank(),
                tcp.world()
            ))
        })?;
        Ok(NcclComm {
            comm,
            device: device.clone(),
            tcp,
        })
    }

    /// All tensors as one contiguous f32 buffer on the device, summed over ranks, split back.
    fn reduce_flat(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let flat: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let joined = Tensor::cat(&flat, 0)?.contiguous()?;
        let n = joined.elem_count();
        let Device::Cuda(cuda) = &self.device else {
            unreachable!("checked at join")
        };
        let stream: Arc<cudarc::driver::CudaStream> = cuda.cuda_stream();
        let mut out = stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| TrainError::Distributed(format!("NCCL buffer of {n} floats: {e:?}")))?;
        {
            let (storage, layout) = joined.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(TrainError::Distributed(
                    "NCCL reduction of a tensor not on the GPU".into(),
                ));
            };
            let src = cs.as_cuda_slice::<f32>()?;
            let src = src.slice(layout.start_offset()..layout.start_offset() + n);
            self.comm
                .all_reduce(&src, &mut out, &ReduceOp::Sum)
                .map_err(|e| TrainError::Distributed(format!("NCCL all-reduce: {e:?}")))?;
        }
        let summed = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, cuda.clone())),
            n,
            BackpropOp::none(),
            false,
        );
        let mut at = 0;
        tensors
            .iter()
            .map(|t| {
                let k = t.elem_count();
                let part = summed
                    .narrow(0, at, k)?
                    .reshape(t.shape())?
                    .to_dtype(t.dtype())?;
                at += k;
                Ok(part)
            })
            .collect()
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world(&self) -> usize {
        self.tcp.world()
    }

    fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        let summed = self.reduce_flat(tensors)?;
        for (t, s) in tensors.iter_mut().zip(summed) {
            *t = s;
        }
        Ok(())
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<()> {
        self.tcp.all_reduce_scalars(values)
    }

    fn ordered_sum(
        &mut self,
        acc: Option<Vec<Tensor>>,
        parts: Vec<Vec<Tensor>>,
        like: &[Tensor],
        _owners: Option<&[usize]>,
    ) -> Result<Vec<Tensor>> {
        // Each rank folds its own parts, then one all-reduce (every rank gets every tensor,
        // which covers ZeRO-2's "owners only").
        let local = match fold_all(acc, parts)? {
            Some(l) => l,
            None => like
                .iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        };
        self.reduce_flat(&local)
    }

    fn broadcast_from_owners(&mut self, tensors: &mut [Tensor], owners: &[usize]) -> Result<()> {
        self.tcp.broadcast_from_owners(tensors, owners)
    }

    fn gather_to_root(&mut self, tensors: &mut [Tensor], owners: &[usize]) -> Result<()> {
        self.tcp.gather_to_root(tensors, owners)
    }

    fn barrier(&mut self, timeout: Duration) -> Result<()> {
        self.tcp.barrier(timeout)
    }
}

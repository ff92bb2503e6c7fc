//! Data parallelism: the [`Communicator`] the trainer reduces gradients through, the rank's
//! place in the job (from torchrun's, Azure ML's or Open MPI's variables), and the backends: a
//! CPU one over TCP (`tcp`, also what CI tests all distributed logic with) and NCCL on CUDA.

pub mod env;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use std::time::Duration;

use candle_core::{DType, Tensor};

use crate::error::Result;

pub use env::RankEnv;

/// Collective operations over the ranks of a job. Every rank calls the same operations in the
/// same order with tensors of the same shapes; results are bit-identical on every rank.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over ranks, written back into every rank's tensors.
    fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<()>;
    /// Sum of a few numbers (losses, token counts, flags) over ranks, in f64.
    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<()>;
    /// The sum of every rank's gradient parts, added exactly as one process accumulating the
    /// same micro-batches would: rank 0's running sum `acc`, then each part of rank 1 in order,
    /// then rank 2's, … (so a job's result has the single-process bits). With `owners`, tensor
    /// `i` of the result is valid only on rank `owners[i]` (ZeRO-2's reduce-scatter); without,
    /// on every rank. `like` gives shapes and dtypes.
    fn ordered_sum(
        &mut self,
        acc: Option<Vec<Tensor>>,
        parts: Vec<Vec<Tensor>>,
        like: &[Tensor],
        owners: Option<&[usize]>,
    ) -> Result<Vec<Tensor>>;
    /// Tensor `i` of rank `owners[i]` copied to every rank (ZeRO's all-gather of updated weights).
    fn broadcast_from_owners(&mut self, tensors: &mut [Tensor], owners: &[usize]) -> Result<()>;
    /// Tensor `i` of rank `owners[i]` copied to rank 0 only (gathering sharded optimizer state
    /// for a checkpoint).
    fn gather_to_root(&mut self, tensors: &mut [Tensor], owners: &[usize]) -> Result<()>;
    /// Every rank has arrived (waits up to `timeout`, longer than collectives wait: a rank may
    /// be preparing data).
    fn barrier(&mut self, timeout: Duration) -> Result<()>;
}

/// One process: every collective is the identity.
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_scalars(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn ordered_sum(
        &mut self,
        acc: Option<Vec<Tensor>>,
        parts: Vec<Vec<Tensor>>,
        like: &[Tensor],
        _: Option<&[usize]>,
    ) -> Result<Vec<Tensor>> {
        match fold_all(acc, parts)? {
            Some(a) => Ok(a),
            None => like.iter().map(|t| Ok(t.zeros_like()?)).collect(),
        }
    }
    fn broadcast_from_owners(&mut self, _: &mut [Tensor], _: &[usize]) -> Result<()> {
        Ok(())
    }
    fn gather_to_root(&mut self, _: &mut [Tensor], _: &[usize]) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self, _: Duration) -> Result<()> {
        Ok(())
    }
}

/// `acc + part`, tensor by tensor (`part` alone when nothing was accumulated yet): the one way
/// gradients are accumulated, in a process and across ranks.
pub fn fold(acc: Option<Vec<Tensor>>, part: Vec<Tensor>) -> Result<Vec<Tensor>> {
    match acc {
        None => Ok(part),
        Some(a) => Ok(a
            .iter()
            .zip(&part)
            .map(|(x, y)| x + y)
            .collect::<candle_core::Result<Vec<_>>>()?),
    }
}

/// `acc` with every part folded in, in order.
pub fn fold_all(acc: Option<Vec<Tensor>>, parts: Vec<Vec<Tensor>>) -> Result<Option<Vec<Tensor>>> {
    parts
        .into_iter()
        .try_fold(acc, |acc, p| Ok(Some(fold(acc, p)?)))
}

/// Which rank owns each tensor under ZeRO-1/2: greedy by size, largest first, so shards are
/// balanced; ties go to the lower rank. Every rank computes the same answer.
pub fn owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world.max(1)];
    let mut owner = vec![0usize; sizes.len()];
    for i in order {
        let r = (0..load.len())
            .min_by_key(|&r| (load[r], r))
            .expect("world >= 1");
        owner[i] = r;
        load[r] += sizes[i];
    }
    owner
}

/// Tensors as one f32 buffer (the unit a backend moves), with what is needed to rebuild them.
pub(crate) fn flatten(tensors: &[Tensor]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
    for t in tensors {
        out.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Writes `flat` back into tensors shaped, typed and placed like `like`.
pub(crate) fn unflatten(flat: &[f32], like: &mut [Tensor]) -> Result<()> {
    let mut at = 0;
    for t in like.iter_mut() {
        let n = t.elem_count();
        let rebuilt = Tensor::from_slice(&flat[at..at + n], t.shape(), &candle_core::Device::Cpu)?
            .to_dtype(t.dtype())?
            .to_device(t.device())?;
        *t = rebuilt;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_balance_bytes_and_agree_everywhere() {
        let sizes = [10, 1000, 10, 1000, 500, 500, 20];
        let o = owners(&sizes, 2);
        let load = |r| {
            sizes
                .iter()
                .zip(&o)
                .filter(|(_, &x)| x == r)
                .map(|(s, _)| s)
                .sum::<usize>()
        };
        assert_eq!(load(0) + load(1), sizes.iter().sum::<usize>());
        assert!(load(0).abs_diff(load(1)) <= 20, "{o:?}");
        assert_eq!(o, owners(&sizes, 2));
        assert!(owners(&sizes, 1).iter().all(|&r| r == 0));
    }
}

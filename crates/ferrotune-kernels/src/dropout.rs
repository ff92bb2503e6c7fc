//! Inverted-dropout masks drawn where the tensor lives. Element `e` of the mask keyed `key` is 0
//! when the `e`-th SplitMix64 draw from `key` (24-bit uniform) is below `p`, else `1/(1-p)`; the
//! CPU reference draws the stream in order, the CUDA kernel (`cuda/dropout.cu`) each element from
//! its index, with identical results. Drawn on the host, a mask for a 2,048-token
//! `down_proj` input is 16.8 M draws and a 67 MB copy per adapted linear, forward and recompute.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// SplitMix64's increment (the golden ratio in 64 bits); ferrotune-model's `rng` uses the same.
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a good 64-bit hash.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A mask shaped like `like`, in its dtype and on its device (its values are not read), that
/// zeroes each element with probability `p` (in `[0, 1)`) and scales the rest by `1/(1-p)`.
/// No gradient flows through it.
pub fn dropout_mask(like: &Tensor, key: u64, p: f32) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout_mask: p {p} is outside [0, 1)");
    }
    like.apply_op1_no_bwd(&DropoutMask { key, p })
}

struct DropoutMask {
    key: u64,
    p: f32,
}

impl DropoutMask {
    fn keep(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let keep = self.keep();
        let mut state = self.key;
        let mask: Vec<f32> = (0..l.shape().elem_count())
            .map(|_| {
                state = state.wrapping_add(GAMMA);
                let u = (mix(state) >> 40) as f32 / (1u64 << 24) as f32;
                if u < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let dtype = candle_core::backend::BackendStorage::dtype(s);
        Ok((
            crate::rows::from_f32(mask, l.shape(), dtype)?,
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let k = cuda::Mask {
            n: l.shape().elem_count(),
            key: self.key,
            p: self.p,
            keep: self.keep(),
        };
        let out = crate::launch::run(
            &k,
            s.dtype(),
            s.device(),
            ("ferrotune_dropout", crate::ptx::DROPOUT),
            "dropout_mask",
        )?;
        Ok((out, l.shape().clone()))
    }
}

/// The mask as the CPU reference draws it, in f32 (for tests on any device).
pub fn reference_mask(n: usize, key: u64, p: f32) -> Result<Tensor> {
    let like = Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu)?;
    dropout_mask(&like, key, p)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DeviceRepr, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, Result};

    use crate::launch::{elementwise, output, Launch};

    pub struct Mask {
        pub n: usize,
        pub key: u64,
        pub p: f32,
        pub keep: f32,
    }

    impl Launch for Mask {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let out = output::<T>(dev, self.n)?;
            let n = self.n as i64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&out);
            b.arg(&n);
            b.arg(&self.key);
            b.arg(&self.p);
            b.arg(&self.keep);
            // SAFETY: the arguments match dropout_mask_<T>'s signature.
            unsafe { b.launch(elementwise(self.n)) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The mask is SplitMix64's stream in order (the same numbers `ferrotune-model` drew on the
    /// host before this op), drops about `p` of the elements and scales the rest.
    #[test]
    fn the_mask_is_splitmix_in_order_and_drops_about_p() {
        let (key, p, n) = (0xDEAD_BEEF_u64, 0.3f32, 20_001);
        let mask = reference_mask(n, key, p).unwrap().to_vec1::<f32>().unwrap();
        let mut state = key;
        let mut draw = || {
            state = state.wrapping_add(GAMMA);
            (mix(state) >> 40) as f32 / (1u64 << 24) as f32
        };
        let keep = 1.0 / (1.0 - p);
        for (e, &m) in mask.iter().enumerate() {
            let expected = if draw() < p { 0.0 } else { keep };
            assert_eq!(m, expected, "element {e}");
        }
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f32 / n as f32;
        assert!((dropped - p).abs() < 0.02, "dropped {dropped}");
        // Another key, another mask; bf16 holds the same mask rounded.
        let other = reference_mask(n, key + 1, p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(mask, other);
        let like = Tensor::zeros((3, 7), DType::BF16, &Device::Cpu).unwrap();
        let bf = dropout_mask(&like, key, p).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        let bf = bf
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let f = reference_mask(21, key, p)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(
            bf,
            f.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(dropout_mask(&like, key, 1.0).is_err());
    }
}

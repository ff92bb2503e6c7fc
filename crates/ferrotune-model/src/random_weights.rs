//! Random weights of any Phi-3 shape, for benchmarks (throughput does not depend on the values).

use candle_core::{DType, Device, Tensor};

use crate::phi3::WeightSource;

/// N(0, 0.02²) for projections and embeddings, 1 for norm weights (as transformers initialises).
pub struct RandomWeights {
    pub dtype: DType,
    pub device: Device,
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> crate::Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}

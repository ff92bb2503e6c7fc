//! Turning `--model/--adapter/--device/--dtype` into a loaded model.

use candle_core::{DType, Device};
use ferrotune_model::loaded::{load_model, parse_dtype, LoadedModel};

use crate::cli::ModelArgs;
use crate::failure::Failure;

/// `cpu`, `cuda`, `cuda:N`; without a value, CUDA when this build has it and a GPU answers.
pub fn device(spec: Option<&str>) -> Result<Device, Failure> {
    match spec {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| Failure::usage(format!("--device {s}: expected cuda:N")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Failure::usage(format!(
                    "--device {s}: this ferrotune was built without CUDA (build with --features cuda)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| {
                Failure::runtime(format!(
                    "--device {s}: cannot open the GPU ({e}); is the NVIDIA driver (libcuda.so.1) installed?"
                ))
            })
        }
        Some(s) => Err(Failure::usage(format!(
            "--device {s}: expected cpu, cuda or cuda:N"
        ))),
    }
}

/// Load the model (and adapter) the flags name.
pub fn load(args: &ModelArgs) -> Result<LoadedModel, Failure> {
    let device = device(args.device.as_deref())?;
    let dtype = match args.dtype.as_deref() {
        Some(name) => parse_dtype(name)
            .ok_or_else(|| Failure::usage(format!("--dtype {name}: expected f32, bf16 or f16")))?,
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
    };
    let mut loaded = load_model(&args.model, dtype, &device)?;
    if let Some(adapter) = &args.adapter {
        ferrotune_model::peft::load_adapter(&mut loaded.model, adapter)?;
        // Everything that loads through here only runs the model (generate, eval, bench).
        loaded.model.cache_adapter_casts()?;
    }
    Ok(loaded)
}

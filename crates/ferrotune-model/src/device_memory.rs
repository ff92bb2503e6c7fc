//! Peak device memory of a stretch of work, as `nvidia-smi` would show it: a sampler thread reads
//! the device's used bytes (total − free) every couple of milliseconds. candle allocates through
//! CUDA's stream-ordered pools with no caching allocator of its own to ask, so sampling is the
//! honest measure, and it is the same one the PyTorch reference is given in the benchmarks.

use candle_core::Device;

/// Samples the used memory of one CUDA device until [`PeakSampler::finish`].
pub struct PeakSampler {
    #[cfg(feature = "cuda")]
    inner: Option<cuda::Sampler>,
}

/// What a sampler saw, in bytes of device memory in use (all processes, as `nvidia-smi`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// In use when sampling started (context, weights already loaded, other processes).
    pub at_start: u64,
    /// The most in use at any sample.
    pub peak: u64,
    /// The device's capacity.
    pub total: u64,
}

impl PeakSampler {
    /// Starts sampling `device`; on a CPU device (or a build without CUDA) it samples nothing and
    /// [`PeakSampler::finish`] returns `None`.
    pub fn start(device: &Device) -> PeakSampler {
        #[cfg(feature = "cuda")]
        {
            PeakSampler {
                inner: cuda::Sampler::start(device),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            PeakSampler {}
        }
    }

    pub fn finish(self) -> Option<DeviceMemory> {
        #[cfg(feature = "cuda")]
        {
            self.inner.map(cuda::Sampler::finish)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::Device;

    use super::DeviceMemory;

    pub struct Sampler {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<DeviceMemory>,
    }

    impl Sampler {
        pub fn start(device: &Device) -> Option<Sampler> {
            let Device::Cuda(dev) = device else {
                return None;
            };
            let ctx = dev.cuda_stream().context().clone();
            let (free, total) = ctx.mem_get_info().ok()?;
            let at_start = (total - free) as u64;
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut peak = at_start;
                loop {
                    if let Ok((free, total)) = ctx.mem_get_info() {
                        peak = peak.max((total - free) as u64);
                    }
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                DeviceMemory {
                    at_start,
                    peak,
                    total: total as u64,
                }
            });
            Some(Sampler { stop, thread })
        }

        pub fn finish(self) -> DeviceMemory {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_device_has_no_device_memory_to_report() {
        assert_eq!(PeakSampler::start(&Device::Cpu).finish(), None);
    }
}

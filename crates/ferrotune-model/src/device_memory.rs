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

/// Memory a run could use on a device, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Free now: on a GPU as the driver reports it, on the CPU Linux's `MemAvailable`.
    pub free: u64,
    /// The device's (or the machine's) memory.
    pub total: u64,
}

/// What `device` has, before anything is loaded: `None` where it cannot be asked (not Linux,
/// a GPU in a build without CUDA).
pub fn capacity(device: &Device) -> Option<Capacity> {
    match device {
        Device::Cpu => host_capacity(&std::fs::read_to_string("/proc/meminfo").ok()?),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
            Some(Capacity {
                free: free as u64,
                total: total as u64,
            })
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// `MemAvailable` and `MemTotal` of a `/proc/meminfo` text.
fn host_capacity(meminfo: &str) -> Option<Capacity> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some(Capacity {
        free: field("MemAvailable:")?,
        total: field("MemTotal:")?,
    })
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
    fn host_capacity_reads_meminfo() {
        let meminfo =
            "MemTotal:       24684000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(
            host_capacity(meminfo),
            Some(Capacity {
                free: 20_000_000 * 1024,
                total: 24_684_000 * 1024
            })
        );
        assert_eq!(host_capacity("MemTotal: 5 kB\n"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            let c = capacity(&Device::Cpu).expect("this machine's memory");
            assert!(c.free > 0 && c.free <= c.total);
        }
    }

    #[test]
    fn a_cpu_device_has_no_device_memory_to_report() {
        assert_eq!(PeakSampler::start(&Device::Cpu).finish(), None);
    }
}

//! Device selection: `auto` tries CUDA, then Metal, then falls back to the CPU and says why.

use candle_core::Device;
use std::fmt;

/// What the user asked for on the command line or in code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA if it works, else Metal if it works, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => Err(format!(
                "unknown device '{other}' (expected auto, cpu, cuda or metal)"
            )),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        };
        f.write_str(s)
    }
}

/// Opens the requested device. Returns the device and a one-line human description of the
/// choice (which device, and for `auto` why the faster ones were not used).
///
/// An explicit `cuda` or `metal` that cannot be opened is an error; `auto` never fails.
pub fn select_device(choice: DeviceChoice) -> candle_core::Result<(Device, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "cpu".to_string())),
        DeviceChoice::Cuda => {
            let d = Device::new_cuda(0)?;
            Ok((d, "cuda:0".to_string()))
        }
        DeviceChoice::Metal => {
            let d = Device::new_metal(0)?;
            Ok((d, "metal:0".to_string()))
        }
        DeviceChoice::Auto => {
            let mut why = Vec::new();
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok((d, "cuda:0 (auto)".to_string())),
                    Err(e) => why.push(format!("cuda failed: {e}")),
                }
            } else {
                why.push("built without cuda".to_string());
            }
            if candle_core::utils::metal_is_available() {
                match Device::new_metal(0) {
                    Ok(d) => return Ok((d, "metal:0 (auto)".to_string())),
                    Err(e) => why.push(format!("metal failed: {e}")),
                }
            } else {
                why.push("built without metal".to_string());
            }
            Ok((Device::Cpu, format!("cpu (auto: {})", why.join("; "))))
        }
    }
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel after
/// every op (glibc on Linux; a no-op elsewhere). Returns whether the setting took.
///
/// glibc serves blocks above a threshold (128 KiB at first) with `mmap` and gives them back with
/// `munmap`; a training step allocates and frees many such buffers, so every step page-faults
/// them in again and, with two or more threads, every `munmap` interrupts the other cores to
/// flush their TLBs. Measured on a 2-core machine (`gm bench`, conv VAE train step) this costs
/// 15–40% of the step. gm's binary calls this at start-up; programs using gm as a library may
/// call it once, before their first tensor.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The largest threshold glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit), and no trimming of
        // the heap top below 1 GiB.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        #[allow(unsafe_code)]
        // SAFETY: mallopt only changes allocator parameters; it is thread-safe in glibc.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

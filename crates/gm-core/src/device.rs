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
/// glibc serves blocks above a threshold (128 KiB at first, 32 MiB at most) with `mmap` and gives
/// them back with `munmap`; a training step allocates and frees many such buffers, so every step
/// page-faults them in again and, with two or more threads, every `munmap` interrupts the other
/// cores to flush their TLBs. Measured on a 2-core machine (`gm bench`, conv VAE train step) this
/// costs 15–40% of the step; and since the threshold cannot go above 32 MiB, a sampling batch
/// (the DCGAN generator's 1,000 images are 50 MB per layer) paid it on every call. So no block is
/// mmapped at all: every buffer comes from the heap (1.4–1.7× the DCGAN's sampling throughput,
/// train steps unchanged within the noise). Freed memory goes back to the kernel only when 1 GiB
/// is free at the top of the heap, so after a large transient batch the resident size stays near
/// its peak. gm's binary calls this at start-up; programs using gm as a library may call it once,
/// before their first tensor.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // No mmapped blocks (which makes the mmap threshold moot), and no trimming of the heap
        // top below 1 GiB.
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        #[allow(unsafe_code)]
        // SAFETY: mallopt only changes allocator parameters; it is thread-safe in glibc.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Which implementation gm's fused ops take on the CPU.
///
/// On CUDA and Metal every op gm has a CPU kernel for (convolutions, fused bias + activation,
/// GroupNorm, the gated tanh, channel sums and broadcasts, the fused Adam) runs as a composition
/// of candle's own ops: the *portable path*. On the CPU gm's kernels run unless the portable mode
/// is on, in which case the CPU runs exactly the code a GPU runs (with candle's CPU kernels
/// underneath). That makes the device path testable on any machine: `GM_KERNELS=portable cargo
/// test` runs the model tests through it, and `gm doctor` compares both paths.
///
/// The mode is read from the environment variable `GM_KERNELS` (`native`, the default, or
/// `portable`) at the first dispatch, and [`set_portable_kernels`] changes it at run time.
pub fn portable_kernels() -> bool {
    use std::sync::atomic::Ordering;
    match PORTABLE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("GM_KERNELS").is_ok_and(|v| v == "portable");
            // A concurrent set_portable_kernels wins over the environment.
            let _ = PORTABLE.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            PORTABLE.load(Ordering::Relaxed) == 2
        }
        v => v == 2,
    }
}

/// Turns the portable mode of [`portable_kernels`] on or off for the whole process.
pub fn set_portable_kernels(on: bool) {
    PORTABLE.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

/// 0: not read yet, 1: native, 2: portable.
static PORTABLE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether gm's own CPU kernels serve a tensor on `device`: on the CPU unless the portable mode
/// is on ([`portable_kernels`]); never on CUDA or Metal.
pub fn native_kernels(device: &Device) -> bool {
    device.is_cpu() && !portable_kernels()
}

/// A deliberate error planted in the portable path for testing the checks that must catch it
/// (`gm doctor` exits non-zero when it is planted): `GM_PLANT_FAULT=conv` scales the output of
/// the portable convolution by `1 + 1e-2`. Read once; never set it outside such a test.
pub fn planted_fault(what: &str) -> bool {
    static FAULT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| std::env::var("GM_PLANT_FAULT").unwrap_or_default()) == what
}

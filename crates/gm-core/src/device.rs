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

//! The `gm` commands, one file each; shared argument types and helpers here.

pub mod bench;
pub mod compare;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod import;
pub mod sample;
pub mod score;
pub mod train;

use anyhow::{anyhow, bail, Result};
use candle_core::Device;
use gm_core::{select_device, DeviceChoice};
use gm_train::RunConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArg {
    /// auto (CUDA, then Metal, then CPU), cpu, cuda or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn device(d: &DeviceArg) -> Result<Device> {
    let (dev, desc) = select_device(d.device)?;
    eprintln!("gm: device {desc}");
    Ok(dev)
}

/// `0,3,7` or `0-9` (ranges and lists mix: `0-2,7`).
pub fn parse_labels(spec: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow!("--labels: cannot read '{part}' (expected e.g. 0,1,2 or 0-9)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        bail!("--labels: no labels in '{spec}'");
    }
    Ok(out)
}

/// WGAN-GP differentiates a gradient: candle must keep gradients' graphs, which it reads from the
/// environment at a thread's first backward pass — set it before training starts.
pub fn enable_second_order_if_needed(cfg: &RunConfig) {
    if cfg.model.second_order() {
        gm_models::gan::enable_second_order_gradients();
    }
}

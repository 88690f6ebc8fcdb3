//! `gm import`.

use anyhow::{bail, Result};
use gm_train::checkpoint::{atomic_write, to_safetensors, FORMAT};
use std::collections::HashMap;
use std::path::PathBuf;

/// Convert a diffusers model folder into a gm checkpoint.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// A diffusers `UNet2DModel` folder (config.json + diffusion_pytorch_model.safetensors, with
    /// scheduler_config.json beside it) or a pipeline folder (unet/, scheduler/)
    #[arg(long)]
    pub diffusers: PathBuf,
    /// The gm checkpoint to write (a .safetensors file; never overwritten)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ImportArgs) -> Result<()> {
    let ImportArgs { diffusers, out } = args;
    if out.exists() {
        bail!("{} exists: gm import does not overwrite", out.display());
    }
    let im = gm_train::diffusers::import(&diffusers)?;
    for n in &im.notes {
        eprintln!("gm: read {n}");
    }
    let text = im.config.to_toml();
    let meta = HashMap::from([
        ("gm.format".to_string(), FORMAT.to_string()),
        ("gm.kind".to_string(), im.config.model.kind().to_string()),
        ("gm.config".to_string(), text),
        ("gm.step".to_string(), "0".to_string()),
        (
            "gm.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("gm.source".to_string(), im.notes.join("; ")),
    ]);
    atomic_write(&out, &to_safetensors(&im.tensors, &meta)?)?;
    eprintln!(
        "gm: wrote {} ({} tensors); e.g. gm sample --checkpoint {}",
        out.display(),
        im.tensors.len(),
        out.display()
    );
    Ok(())
}

//! `gm export`.

use super::*;
use anyhow::Result;
use gm_train::export::{export, ExportOptions};
use std::path::PathBuf;

/// Write a trained run as a model folder a hub can host: model.safetensors (EMA weights where
/// used), config.json, a README.md model card with the evaluation and samples.png.
/// `gm sample/eval/score --checkpoint DIR` read the folder.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The run directory (or a .safetensors checkpoint of it).
    pub run: PathBuf,
    /// The folder to write (must not exist, or be empty).
    pub dir: PathBuf,
    /// A folder of MNIST-style IDX files for the card's evaluation (default: the run's data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Test images evaluated for the card (the first N; 0 = all).
    #[arg(long, default_value_t = 500)]
    pub max_images: usize,
    /// Write the card without evaluating (no data needed).
    #[arg(long)]
    pub no_eval: bool,
    /// Samples in samples.png (0 = none).
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let dev = device(&args.device)?;
    let e = export(
        &args.run,
        &args.dir,
        &ExportOptions {
            data_dir: args.data_dir,
            eval_images: (!args.no_eval).then_some(args.max_images),
            samples: args.samples,
            device: dev,
        },
    )?;
    if let Some(m) = &e.eval {
        println!("{}", serde_json::to_string(m)?);
    }
    eprintln!("gm: wrote {} in {}", e.files.join(", "), e.dir.display());
    Ok(())
}

//! `gm train`.

use super::*;
use anyhow::{bail, Result};
use gm_train::{RunConfig, TrainOptions};
use std::path::PathBuf;

/// Train a model from a TOML preset (or resume a run).
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A preset such as models/vae-mnist.toml.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// A folder of MNIST-style IDX files; default: download MNIST into the cache.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The run directory (default runs/PRESET_NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a config value, e.g. --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Seed of the run (same as --set train.seed=N).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Start from another run's weights (run directory or .safetensors; same parameter
    /// shapes) with a fresh optimiser and step count, e.g. to fine-tune by likelihood.
    #[arg(long, value_name = "CHECKPOINT", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Also write TensorBoard event files in the run directory (same as --set
    /// train.tensorboard=true); view with `tensorboard --logdir runs`.
    #[arg(long)]
    pub tensorboard: bool,
    /// Data-parallel ranks: on CUDA one process per GPU with NCCL (a build with
    /// `--features nccl`); on the CPU threads of this process (a check of the logic, no
    /// faster). A torchrun-style launch sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    /// MASTER_PORT instead.
    #[arg(long)]
    pub ranks: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let TrainArgs {
        config,
        data_dir,
        out,
        mut overrides,
        seed,
        resume,
        init_from,
        quiet,
        tensorboard,
        ranks,
        device: d,
    } = args;
    if tensorboard {
        overrides.push("train.tensorboard=true".into());
    }
    if let Some(s) = seed {
        overrides.push(format!("train.seed={s}"));
    }
    let (cfg, out) = match (&resume, config) {
        (Some(run), _) => {
            let cfg = RunConfig::load(&run.join("config.toml"), &overrides)?;
            (cfg, run.clone())
        }
        (None, Some(path)) => {
            let cfg = RunConfig::load(&path, &overrides)?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or("run".into());
            let out = match out {
                Some(o) => o,
                None => {
                    // The preset's default directory, or a fresh sibling when an
                    // earlier run holds it: runs are never mixed.
                    let base = PathBuf::from("runs").join(stem);
                    let free = gm_train::checkpoint::free_run_dir(&base);
                    if free != base {
                        eprintln!(
                                "gm: {} holds an earlier run; this one goes to {} (--out chooses, --resume {} continues the earlier one)",
                                base.display(),
                                free.display(),
                                base.display()
                            );
                    }
                    free
                }
            };
            (cfg, out)
        }
        (None, None) => bail!("give --config PRESET or --resume RUN_DIR"),
    };
    enable_second_order_if_needed(&cfg);
    let is_text = cfg.model.image_shape().is_none();
    if let (Some(d), false) = (&data_dir, is_text) {
        if !d.is_dir() {
            bail!("--data-dir {} is not a directory", d.display());
        }
    }
    let dev = device(&d)?;
    let opts = TrainOptions {
        out: out.clone(),
        device: dev,
        data_dir,
        resume: resume.is_some(),
        progress: !quiet,
        init_from,
    };
    let s = match gm_train::launch::train(&cfg, &opts, ranks)? {
        Some(s) => s,
        // Rank 0 (another process) reported the run.
        None => return Ok(()),
    };
    let first = s.losses.first().map(|l| l.1).unwrap_or(f64::NAN);
    let last = s.losses.last().map(|l| l.1).unwrap_or(f64::NAN);
    eprintln!(
        "gm: done: {} steps, loss {first:.3} -> {last:.3}; checkpoint {}",
        s.steps,
        s.checkpoint.display()
    );
    eprintln!("gm: data used: {}", s.data_source);
    let run_steps = s.losses.len().max(1) as f64;
    let tr = &s.step_traffic;
    eprintln!(
            "gm: host<->device traffic per train step: {:.0} bytes up in {:.1} uploads, {:.0} bytes read back in {:.1} reads",
            tr.upload_bytes as f64 / run_steps,
            tr.uploads as f64 / run_steps,
            tr.readback_bytes as f64 / run_steps,
            tr.readbacks as f64 / run_steps
        );
    if let Some(m) = s.last_eval {
        println!("{}", serde_json::to_string(&m)?);
    }
    if is_text {
        eprintln!("gm: run directory {} (metrics.jsonl)", out.display());
    } else {
        eprintln!(
            "gm: run directory {} (metrics.jsonl, samples/, loss_curve.png)",
            out.display()
        );
    }
    Ok(())
}

//! `gm compare`.

use super::*;
use anyhow::{bail, Context, Result};
use gm_train::checkpoint::atomic_write;
use gm_train::compare::{csv, markdown, montage, report_run, CompareOptions};
use std::path::PathBuf;

/// One table over trained runs: kind, budget, likelihood (exact or bound, in nats and bits/dim),
/// sample quality (fid_mnist, KID, precision/recall, mode coverage) and sampling speed; runs that
/// differ only in seed grouped as mean ± sd. Prints Markdown; writes compare.md, compare.csv,
/// compare.json and a labelled montage.png of their samples to --out.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Run directories (or .safetensors checkpoints) to compare.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// A folder of MNIST-style IDX files for the test split (default: each run's own data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Test images the likelihood is averaged over (the first N; 0 = all).
    #[arg(long, default_value_t = 100)]
    pub max_images: usize,
    /// Samples per run for sample quality and speed.
    #[arg(long, default_value_t = 500)]
    pub fid_n: usize,
    /// gm's classifier for sample quality (train it with models/classifier-mnist.toml).
    #[arg(long, default_value = "runs/classifier-mnist")]
    pub classifier: PathBuf,
    /// Leave sample quality out (likelihood and budget only; no classifier needed).
    #[arg(long)]
    pub no_quality: bool,
    /// A setting that leaves the weights alone, applied to every run whose configuration has the
    /// key, e.g. --set 'model.likelihood_solver={method="rk4",steps=80}' (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where the table, CSV, JSON and montage go.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: CompareArgs) -> Result<()> {
    let dev = device(&args.device)?;
    if let Some(d) = &args.data_dir {
        if !d.is_dir() {
            bail!("--data-dir {} is not a directory", d.display());
        }
    }
    let cls = if args.no_quality {
        None
    } else {
        Some(
            gm_train::eval::load_classifier(&args.classifier, &dev)
                .context("--classifier (or --no-quality to leave sample quality out)")?,
        )
    };
    let opts = CompareOptions {
        data_dir: args.data_dir.clone(),
        max_images: args.max_images,
        fid_n: args.fid_n,
        device: dev,
        overrides: args.overrides.clone(),
        feature_space: cls
            .as_ref()
            .map_or_else(|| "mnist".into(), gm_train::eval::feature_space),
    };
    let mut reports = Vec::new();
    for r in &args.runs {
        eprintln!("gm: compare: {}", r.display());
        reports.push(report_run(r, cls.as_ref(), &opts)?);
    }
    let md = markdown(&reports, &opts);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    atomic_write(&args.out.join("compare.md"), md.as_bytes())?;
    atomic_write(
        &args.out.join("compare.csv"),
        csv(&reports, &opts.feature_space).as_bytes(),
    )?;
    atomic_write(
        &args.out.join("compare.json"),
        serde_json::to_string_pretty(&reports)?.as_bytes(),
    )?;
    let mut written = vec!["compare.md", "compare.csv", "compare.json"];
    if let Some(m) = montage(&reports)? {
        let path = args.out.join("montage.png");
        m.save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push("montage.png");
    }
    println!("{md}");
    eprintln!("gm: wrote {} in {}", written.join(", "), args.out.display());
    Ok(())
}

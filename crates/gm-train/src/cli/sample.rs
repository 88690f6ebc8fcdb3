//! `gm sample`.

use super::*;
use anyhow::{anyhow, bail, Context, Result};
use gm_core::GmRng;
use gm_train::data::Split;
use gm_train::images::save_grid;
use gm_train::trainer::{load_checkpoint_with, load_data};
use std::path::PathBuf;

/// Write a PNG grid of samples.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// A run directory, a .safetensors checkpoint, or a diffusers model folder (UNet2DModel).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// The PNG to write (`.txt` for text models); default: the run's `samples/` folder as
    /// `sample-step-STEP-seed-SEED.png`, or beside a checkpoint file outside a run.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Class-conditional models: one grid row per label, `--n` samples each (e.g. 0,1,2 or 0-9).
    #[arg(long)]
    pub labels: Option<String>,
    /// Text models: the text to continue.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Text models: new tokens per sample.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Text models: softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Text models: sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Override a stored setting that leaves the weights alone, e.g.
    /// --set model.sampler.steps=10 or --set model.solver.method=rk4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: SampleArgs) -> Result<()> {
    let SampleArgs {
        checkpoint,
        n,
        out,
        seed,
        labels,
        prompt,
        tokens,
        temperature,
        top_k,
        overrides,
        device: d,
    } = args;
    if n == 0 {
        bail!("--n must be > 0");
    }
    let rows = labels.as_deref().map(parse_labels).transpose()?;
    let total = n.saturating_mul(rows.as_ref().map_or(1, Vec::len));
    gm_train::eval::check_sample_count(
        if rows.is_some() {
            "--n × --labels"
        } else {
            "--n"
        },
        total,
    )?;
    let dev = device(&d)?;
    if gm_train::text::is_text_checkpoint(&checkpoint)? {
        if tokens > 1_000_000 {
            bail!("--tokens {tokens}: gm's limit is 1,000,000 new tokens per sample");
        }
        let ck = gm_train::text::load_text_checkpoint(&checkpoint, &dev)?;
        let t0 = std::time::Instant::now();
        let texts = gm_train::text::generate(
            &ck,
            &prompt,
            n,
            tokens,
            temperature,
            top_k,
            &mut GmRng::new(seed),
        )?;
        let dt = t0.elapsed().as_secs_f64();
        let joined = texts.join("\n----\n");
        if let Some(out) = out.filter(|o| o.extension().is_some_and(|e| e == "txt")) {
            std::fs::write(&out, &joined)
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        println!("{joined}");
        eprintln!(
                "gm: {n} samples of {tokens} tokens in {dt:.2}s ({:.0} tokens/s, temperature {temperature}, top-k {top_k}) from {}",
                (n * tokens) as f64 / dt,
                ck.path.display()
            );
        return Ok(());
    }
    let ck = load_checkpoint_with(&checkpoint, &dev, &overrides)?;
    let model = ck.built.model.as_ref();
    let k = ck.built.cfg.model.num_classes();
    if let Some(bad) = rows.iter().flatten().find(|&&l| k > 0 && l as usize >= k) {
        bail!(
                "--labels: label {bad} is out of range for the model's {k} classes (model.num_classes = {k}: labels 0-{})",
                k - 1
            );
    }
    let out = match out {
        Some(o) => o,
        None => default_out(&ck.path, ck.step, seed)?,
    };
    let mut rng = GmRng::new(seed);
    let t0 = std::time::Instant::now();
    if gm_train::data::toy_name(&ck.built.cfg.data.dataset).is_some() {
        let (data, _) = load_data(&ck.built.cfg, None, Split::Test)?;
        gm_train::trainer::toy_density_plot(model, &data, n, &mut rng, &dev, &out)?;
        eprintln!(
            "gm: data | density | {n} samples in {:.2}s from {} -> {}",
            t0.elapsed().as_secs_f64(),
            ck.path.display(),
            out.display()
        );
        return Ok(());
    }
    let (s, ncol) = match &rows {
        None => (
            gm_train::eval::sample_chunked(model, n, gm_train::eval::SAMPLE_CHUNK, &mut rng)?
                .ok_or_else(|| anyhow!("a '{}' model does not sample", model.kind()))?,
            (n as f64).sqrt().ceil() as usize,
        ),
        Some(rows) => {
            let all: Vec<u32> = rows
                .iter()
                .flat_map(|&l| std::iter::repeat_n(l, n))
                .collect();
            let mut parts = Vec::new();
            for c in all.chunks(gm_train::eval::SAMPLE_CHUNK) {
                parts.push(model.sample_labels(c, &mut rng)?.ok_or_else(|| {
                    anyhow!(
                        "--labels: a '{}' model is not class-conditional",
                        model.kind()
                    )
                })?);
            }
            (candle_core::Tensor::cat(&parts, 0)?, n)
        }
    };
    let total = s.dim(0)?;
    let dt = t0.elapsed().as_secs_f64();
    save_grid(&s, ncol, &out)?;
    eprintln!(
        "gm: {total} samples in {dt:.2}s ({:.1} images/s) from {} -> {}",
        total as f64 / dt,
        ck.path.display(),
        out.display()
    );
    Ok(())
}

/// Where a grid goes without `--out`: `RUN/samples/sample-step-STEP-seed-SEED.png` for a checkpoint
/// in a run's `checkpoints/` folder, else beside the checkpoint file (inside a model folder) —
/// never into the current directory.
fn default_out(ck: &std::path::Path, step: usize, seed: u64) -> Result<PathBuf> {
    let name = format!("sample-step-{step}-seed-{seed}.png");
    let dir = ck.parent().unwrap_or(std::path::Path::new("."));
    let dir = match (dir.file_name(), dir.parent()) {
        (Some(n), Some(run)) if n == "checkpoints" => run.join("samples"),
        _ => dir.to_path_buf(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.join(name))
}

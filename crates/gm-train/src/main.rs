//! `gm`: train, sample, evaluate and fetch data from the command line.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use gm_core::{select_device, DeviceChoice, GmRng};
use gm_models::EvalOptions;
use gm_train::data::Split;
use gm_train::eval::{evaluate, sample_quality};
use gm_train::images::save_grid;
use gm_train::trainer::{load_checkpoint, load_checkpoint_with, load_data};
use gm_train::{RunConfig, TrainOptions};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "gm", version, about = "Deep generative models on Candle")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct DeviceArg {
    /// auto (CUDA, then Metal, then CPU), cpu, cuda or metal.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train a model from a TOML preset (or resume a run).
    Train {
        /// A preset such as models/vae-mnist.toml.
        #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
        config: Option<PathBuf>,
        /// A folder of MNIST-style IDX files; default: download MNIST into the cache.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The run directory (default runs/PRESET_NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config value, e.g. --set train.lr=3e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Seed of the run (same as --set train.seed=N).
        #[arg(long)]
        seed: Option<u64>,
        /// Continue the run in this directory from its latest checkpoint.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Start from another run's weights (run directory or .safetensors; same parameter
        /// shapes) with a fresh optimiser and step count, e.g. to fine-tune by likelihood.
        #[arg(long, value_name = "CHECKPOINT", conflicts_with = "resume")]
        init_from: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Data-parallel ranks: on CUDA one process per GPU with NCCL (a build with
        /// `--features nccl`); on the CPU threads of this process (a check of the logic, no
        /// faster). A torchrun-style launch sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
        /// MASTER_PORT instead.
        #[arg(long)]
        ranks: Option<usize>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Write a PNG grid of samples.
    Sample {
        /// A run directory or a .safetensors checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 64)]
        n: usize,
        #[arg(long, default_value = "samples.png")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Class-conditional models: one grid row per label, `--n` samples each (e.g. 0,1,2 or 0-9).
        #[arg(long)]
        labels: Option<String>,
        /// Text models: the text to continue.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Text models: new tokens per sample.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Text models: softmax temperature.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Text models: sample among the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Override a stored setting that leaves the weights alone, e.g.
        /// --set model.sampler.steps=10 or --set model.solver.method=rk4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Evaluate a checkpoint on a split; prints one JSON object.
    Eval {
        /// A run directory or a .safetensors checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "test")]
        split: Split,
        /// Importance samples per image (default: the config's eval.iwae_k).
        #[arg(long)]
        iwae_k: Option<usize>,
        /// Evaluate only the first N images (0 = all).
        #[arg(long, default_value_t = 0)]
        max_images: usize,
        /// Also report sample quality (fid_mnist, class histogram) through gm's classifier.
        #[arg(long)]
        fid: bool,
        /// Number of generated images for --fid.
        #[arg(long, default_value_t = 1000)]
        fid_n: usize,
        /// The classifier checkpoint for --fid (train it with models/classifier-mnist.toml).
        #[arg(long, default_value = "runs/classifier-mnist")]
        classifier: PathBuf,
        /// Override a stored setting that leaves the weights alone, e.g.
        /// --set model.bound_timesteps=0 or --set model.likelihood_solver.steps=20 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Per-image −log p(x) of a density model to a CSV; with --ood-data-dir, the AUROC of telling
    /// a second data set from the first by likelihood and by two corrected scores (JSON).
    Score {
        /// A run directory or a .safetensors checkpoint of a density model.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The in-distribution data (default: the checkpoint's data set).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "test")]
        split: Split,
        /// A second folder of IDX files (same split) to tell apart from the first.
        #[arg(long)]
        ood_data_dir: Option<PathBuf>,
        /// Images scored per set (0 = all).
        #[arg(long, default_value_t = 1000)]
        max_images: usize,
        /// Importance samples per image for the VAE (default: the config's eval.iwae_k).
        #[arg(long)]
        iwae_k: Option<usize>,
        /// Where the per-image CSV goes.
        #[arg(long, default_value = "scores.csv")]
        out: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Time the train step (forward, backward, Adam) of a preset on random data; prints JSON.
    Bench {
        /// Preset or config file whose train step is timed.
        #[arg(long, required_unless_present = "ops")]
        config: Option<PathBuf>,
        /// Time the convolution shapes of gm's models instead, with gm's and candle's kernels.
        #[arg(long, conflicts_with = "config")]
        ops: bool,
        /// Batch size of `--ops`.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Only these `--ops` cases (names as printed); all when empty.
        #[arg(long = "case")]
        cases: Vec<String>,
        /// Backends of `--ops`: gm, candle, or both.
        #[arg(long, default_value = "both", value_parser = ["gm", "candle", "both"])]
        backend: String,
        /// Gradients of the `--ops` fwd+bwd cases, one line each: both (as named), input (the data
        /// gradient only), weight (the filter gradient only), none (the forward alone).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "both")]
        grads: Vec<gm_train::opbench::Grads>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long, default_value_t = 30)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Check that a device computes what gm's CPU kernels compute, for every model family: one
    /// training step (loss, gradients, Adam) and one sampling pass from the same weights, batch
    /// and noise, plus a checkpoint round trip; prints a table, exits non-zero on any failure.
    /// `--device cpu` compares gm's kernels with the portable path (what CUDA and Metal run).
    Doctor {
        /// Only these families (repeatable); all when absent.
        #[arg(long = "only", value_name = "FAMILY")]
        only: Vec<String>,
        /// Also write the reports as JSON lines to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run one family in this process and print its JSON report (what each child does).
        #[arg(long, hide = true)]
        family: Option<String>,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Download a data set into gm's cache and print its folder.
    Fetch {
        #[arg(long, default_value = "mnist")]
        dataset: String,
    },
}

fn device(d: &DeviceArg) -> Result<Device> {
    let (dev, desc) = select_device(d.device)?;
    eprintln!("gm: device {desc}");
    Ok(dev)
}

/// `0,3,7` or `0-9` (ranges and lists mix: `0-2,7`).
fn parse_labels(spec: &str) -> Result<Vec<u32>> {
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

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train {
            config,
            data_dir,
            out,
            mut overrides,
            seed,
            resume,
            init_from,
            quiet,
            ranks,
            device: d,
        } => {
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
            let is_text = matches!(cfg.model, gm_models::ModelConfig::TextAr(_));
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
            let s = if is_text {
                if ranks.is_some() {
                    bail!("--ranks: the text model trains on one device");
                }
                gm_train::text::train_text(&cfg, &opts)?
            } else {
                match gm_train::launch::train(&cfg, &opts, ranks)? {
                    Some(s) => s,
                    // Rank 0 (another process) reported the run.
                    None => return Ok(()),
                }
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
        }
        Cmd::Sample {
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
        } => {
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
            if gm_train::text::checkpoint_kind(&checkpoint)? == "text-ar" {
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
                if out.extension().is_some_and(|e| e == "txt") {
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
                    gm_train::eval::sample_chunked(
                        model,
                        n,
                        gm_train::eval::SAMPLE_CHUNK,
                        &mut rng,
                    )?
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
        }
        Cmd::Eval {
            checkpoint,
            data_dir,
            split,
            iwae_k,
            max_images,
            fid,
            fid_n,
            classifier,
            overrides,
            device: d,
        } => {
            if fid {
                gm_train::eval::check_sample_count(&format!("--fid-n {fid_n}"), fid_n)?;
            }
            let dev = device(&d)?;
            if gm_train::text::checkpoint_kind(&checkpoint)? == "text-ar" {
                use gm_train::text;
                let ck = text::load_text_checkpoint(&checkpoint, &dev)?;
                let dir = text::corpus_dir(&ck.cfg, data_dir.as_deref());
                let corpus = text::load_corpus(&dir)?;
                let docs = match split {
                    Split::Test => &corpus.test,
                    Split::Train => &corpus.train,
                };
                let (ids, bytes) = text::encode(&ck.tokenizer, docs)?;
                let mut m = text::evaluate_text(&ck.model, &ids, bytes, 64, &dev)?
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::json!(v)))
                    .collect::<serde_json::Map<_, _>>();
                m.insert("split".into(), format!("{split:?}").to_lowercase().into());
                m.insert("step".into(), ck.step.into());
                m.insert("checkpoint".into(), ck.path.display().to_string().into());
                m.insert("data".into(), corpus.source.into());
                println!("{}", serde_json::Value::Object(m));
                return Ok(());
            }
            let ck = load_checkpoint_with(&checkpoint, &dev, &overrides)?;
            let cfg = &ck.built.cfg;
            let (ds, source) = load_data(cfg, data_dir.as_deref(), split)?;
            let opts = EvalOptions {
                iwae_k: iwae_k.unwrap_or(cfg.eval.iwae_k),
                max_pairs: cfg.eval.max_pairs,
                full: true,
            };
            gm_train::config::check_iwae_k(opts.iwae_k)?;
            let model = ck.built.model.as_ref();
            let mut m = serde_json::Map::new();
            for (k, v) in evaluate(
                model,
                &ds,
                &cfg.data,
                &opts,
                cfg.eval.batch_size,
                max_images,
                cfg.eval.seed,
                &dev,
            )? {
                m.insert(k, serde_json::json!(v));
            }
            if model.likelihood_metric().is_some() {
                if model.kind() == "vae" {
                    m.insert("iwae_k".into(), serde_json::json!(opts.iwae_k));
                }
                m.insert(
                    "binarization".into(),
                    serde_json::to_value(cfg.data.binarize)?,
                );
            }
            if fid {
                if fid_n < 2 {
                    bail!(
                        "--fid-n must be at least 2 (a covariance needs two samples), got {fid_n}"
                    );
                }
                let cls = load_checkpoint(&classifier, &dev).with_context(|| {
                    format!("--fid needs gm's classifier at {} (gm train --config models/classifier-mnist.toml)", classifier.display())
                })?;
                if cls.built.model.kind() != "classifier" {
                    bail!(
                        "--classifier {}: a '{}' checkpoint; --fid needs gm's classifier (gm train --config models/classifier-mnist.toml)",
                        cls.path.display(),
                        cls.built.model.kind()
                    );
                }
                let samples = gm_train::eval::sample_chunked(
                    model,
                    fid_n,
                    gm_train::eval::SAMPLE_CHUNK,
                    &mut GmRng::new(cfg.eval.seed),
                )
                .with_context(|| format!("--fid-n {fid_n}"))?
                .ok_or_else(|| anyhow!("--fid: a '{}' model does not sample", model.kind()))?;
                let n_real = fid_n.min(ds.len());
                let (raw, _) = ds.gather(&(0..n_real).collect::<Vec<_>>())?;
                let real = (raw / 255.0)?.to_device(&dev)?;
                let q = sample_quality(cls.built.model.as_ref(), &samples, &real)?;
                for (k, v) in serde_json::to_value(&q)?
                    .as_object()
                    .expect("struct")
                    .iter()
                {
                    m.insert(k.clone(), v.clone());
                }
                m.insert("fid_n".into(), serde_json::json!(fid_n));
            }
            m.insert(
                "split".into(),
                serde_json::json!(format!("{split:?}").to_lowercase()),
            );
            m.insert("step".into(), serde_json::json!(ck.step));
            m.insert(
                "checkpoint".into(),
                serde_json::json!(ck.path.display().to_string()),
            );
            m.insert("data".into(), serde_json::json!(source));
            println!("{}", serde_json::Value::Object(m));
        }
        Cmd::Bench {
            config,
            ops,
            batch,
            cases,
            backend,
            grads,
            overrides,
            steps,
            warmup,
            device: d,
        } => {
            let dev = device(&d)?;
            if ops {
                use gm_train::opbench::{run_case, Backend, CASES};
                for name in &cases {
                    if !CASES.iter().any(|c| c.name == name) {
                        let known: Vec<_> = CASES.iter().map(|c| c.name).collect();
                        bail!("unknown --case {name}; known: {}", known.join(", "));
                    }
                }
                let backends: &[Backend] = match backend.as_str() {
                    "gm" => &[Backend::Gm],
                    "candle" => &[Backend::Candle],
                    _ => &[Backend::Gm, Backend::Candle],
                };
                for c in CASES
                    .iter()
                    .filter(|c| cases.is_empty() || cases.iter().any(|n| n == c.name))
                {
                    for &b in backends {
                        // Cases other than fwd+bwd have one form.
                        let n = if c.mode == "fwdbwd" { grads.len() } else { 1 };
                        for &gr in &grads[..n] {
                            let r = run_case(c, b, gr, batch, warmup, steps.max(1), &dev)?;
                            println!("{}", serde_json::to_string(&r)?);
                        }
                    }
                }
                return Ok(());
            }
            let config = config.expect("clap requires --config without --ops");
            let cfg = RunConfig::load(&config, &overrides)?;
            enable_second_order_if_needed(&cfg);
            let r = gm_train::trainer::bench_train_step(&cfg, &dev, warmup, steps.max(1))?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Score {
            checkpoint,
            data_dir,
            split,
            ood_data_dir,
            max_images,
            iwae_k,
            out,
            overrides,
            device: d,
        } => {
            let dev = device(&d)?;
            let ck = load_checkpoint_with(&checkpoint, &dev, &overrides)?;
            let cfg = &ck.built.cfg;
            let model = ck.built.model.as_ref();
            let opts = EvalOptions {
                iwae_k: iwae_k.unwrap_or(cfg.eval.iwae_k),
                max_pairs: cfg.eval.max_pairs,
                full: true,
            };
            gm_train::config::check_iwae_k(opts.iwae_k)?;
            let score = |ds: &gm_train::data::ImageDataset| {
                gm_train::score::score_images(
                    model,
                    ds,
                    &cfg.data,
                    &opts,
                    cfg.eval.batch_size,
                    max_images,
                    cfg.eval.seed,
                    &dev,
                )
            };
            let (ds, source) = load_data(cfg, data_dir.as_deref(), split)?;
            let t0 = std::time::Instant::now();
            let in_scores = score(&ds)?;
            let mean = |v: &[gm_train::score::ImageScore]| {
                v.iter().map(|r| r.bits_per_dim).sum::<f64>() / v.len().max(1) as f64
            };
            let mut m = serde_json::Map::new();
            m.insert("checkpoint".into(), ck.path.display().to_string().into());
            m.insert("data".into(), source.into());
            m.insert("n_in".into(), in_scores.len().into());
            m.insert("bits_per_dim_in".into(), mean(&in_scores).into());
            let mut sets = vec![("in", in_scores.as_slice())];
            let (train_scores, ood_scores);
            if let Some(ood_dir) = &ood_data_dir {
                let ood_ds = gm_train::data::load_split(ood_dir, split)?;
                if ood_ds.shape != ds.shape {
                    bail!(
                        "{}: images of shape {:?}, the model's data has {:?}",
                        ood_dir.display(),
                        ood_ds.shape,
                        ds.shape
                    );
                }
                ood_scores = score(&ood_ds)?;
                // The typical set of the training data: its mean bits/dim.
                let (train_ds, _) = load_data(cfg, data_dir.as_deref(), Split::Train)?;
                train_scores = score(&train_ds)?;
                let train_mean = mean(&train_scores);
                m.insert("ood_data".into(), ood_dir.display().to_string().into());
                m.insert("n_ood".into(), ood_scores.len().into());
                m.insert("bits_per_dim_ood".into(), mean(&ood_scores).into());
                m.insert("bits_per_dim_train".into(), train_mean.into());
                for (k, v) in gm_train::score::ood_aurocs(&in_scores, &ood_scores, train_mean) {
                    m.insert(k.into(), v.into());
                }
                sets.push(("ood", ood_scores.as_slice()));
                sets.push(("train", train_scores.as_slice()));
            }
            gm_train::score::write_csv(&out, &sets)?;
            m.insert("csv".into(), out.display().to_string().into());
            m.insert("seconds".into(), t0.elapsed().as_secs_f64().into());
            println!("{}", serde_json::Value::Object(m));
        }
        Cmd::Doctor {
            only,
            json,
            family,
            device: d,
        } => return doctor(only, json, family, d.device),
        Cmd::Fetch { dataset } => {
            let (dir, src) = gm_train::fetch::ensure_dataset(&dataset)?;
            eprintln!("gm: {src}");
            println!("{}", dir.display());
        }
    }
    Ok(())
}

/// `gm doctor`: the parent runs each family in a child process and prints the table.
fn doctor(
    only: Vec<String>,
    json: Option<PathBuf>,
    family: Option<String>,
    choice: DeviceChoice,
) -> Result<()> {
    use gm_train::doctor as dr;
    let open = || -> Result<Device> {
        match choice {
            DeviceChoice::Cuda => {
                Device::new_cuda(0).map_err(|e| anyhow!(dr::explain_cuda_error(&e)))
            }
            c => Ok(select_device(c)?.0),
        }
    };
    if let Some(name) = family {
        let f = dr::family(&name)?;
        let dev = open()?;
        let r = dr::check_family(f, &dev).unwrap_or_else(|e| {
            dr::failed(
                &name,
                &gm_train::trainer::device_name(&dev),
                format!("{e:#}"),
            )
        });
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    for name in &only {
        dr::family(name)?;
    }
    if choice == DeviceChoice::Cuda {
        for line in dr::cuda_environment() {
            eprintln!("gm doctor: {line}");
        }
    }
    // The parent opens the device once, to report a broken setup before any child runs.
    let dev_name = {
        let dev = open()?;
        let dev_name = gm_train::trainer::device_name(&dev);
        eprintln!(
            "gm doctor: {} against gm's CPU kernels{}",
            dev_name,
            if dev.is_cpu() {
                " (the device path run on the CPU: GM_KERNELS=portable)"
            } else {
                ""
            }
        );
        dev_name
    };
    let exe = std::env::current_exe().context("cannot find the gm executable")?;
    let mut reports = Vec::new();
    for f in gm_train::doctor::FAMILIES
        .iter()
        .filter(|f| only.is_empty() || only.iter().any(|o| o == f.name))
    {
        let out = std::process::Command::new(&exe)
            .args([
                "doctor",
                "--family",
                f.name,
                "--device",
                &choice.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<dr::FamilyReport>(l).ok())
            .unwrap_or_else(|| {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(3).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                dr::failed(
                    f.name,
                    &dev_name,
                    format!(
                        "the check exited with {} and no report: {}",
                        out.status,
                        tail.join(" / ")
                    ),
                )
            });
        eprintln!(
            "gm doctor: {:<15} {}",
            f.name,
            if report.pass { "pass" } else { "FAIL" }
        );
        reports.push(report);
    }
    println!("{}", dr::table(&reports));
    if let Some(path) = json {
        let lines: Vec<String> = reports
            .iter()
            .map(serde_json::to_string)
            .collect::<std::result::Result<_, _>>()?;
        std::fs::write(&path, lines.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.family.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} families failed on {dev_name}: {}",
            failed.len(),
            reports.len(),
            failed.join(", ")
        );
    }
    eprintln!(
        "gm doctor: all {} families pass on {dev_name}",
        reports.len()
    );
    Ok(())
}

/// WGAN-GP differentiates a gradient: candle must keep gradients' graphs, which it reads from the
/// environment at a thread's first backward pass — set it before training starts.
fn enable_second_order_if_needed(cfg: &RunConfig) {
    if let gm_models::ModelConfig::Gan(g) = &cfg.model {
        if g.loss == gm_models::gan::GanLoss::WganGp && g.gp_weight > 0.0 {
            gm_models::gan::enable_second_order_gradients();
        }
    }
}

fn main() {
    gm_core::keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("gm: error: {e:#}");
        std::process::exit(1);
    }
}

//! `gm export RUN DIR`: a trained run as a self-describing model folder that a model hub can host
//! and anyone can load — `model.safetensors` (the weights evaluation uses, the EMA's where the run
//! keeps one, under the PyTorch names gm stores), `config.json` (the resolved configuration), a
//! `README.md` model card (kind, data and preprocessing, training budget, the evaluation in its
//! units, the samples, how to load it) and `samples.png`.
//!
//! The folder is what `huggingface_hub` uploads as it is (`hf upload USER/NAME DIR .`; the card's
//! YAML header carries `library_name: gm`), and `gm sample/eval/score --checkpoint DIR` read it:
//! `model.safetensors` keeps gm's metadata (config, step, checksums), so the file alone loads.
//! It is written beside `DIR` and renamed into place, so a stopped export leaves no half-folder.

use crate::checkpoint::{load_checkpoint, read_safetensors, to_safetensors};
use crate::data::{load_data, Split};
use crate::eval::{evaluate_full, sample_chunked, SAMPLE_CHUNK};
use crate::images::save_grid;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use gm_core::GmRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The weights file of an exported folder.
pub const WEIGHTS: &str = "model.safetensors";
/// The configuration file of an exported folder.
pub const CONFIG: &str = "config.json";

/// The weights file of a folder `gm export` wrote, if `dir` is one.
pub fn exported_weights(dir: &Path) -> Option<PathBuf> {
    let w = dir.join(WEIGHTS);
    (dir.join(CONFIG).is_file() && w.is_file()).then_some(w)
}

pub struct ExportOptions {
    /// The test data for the card's evaluation (default: the run's own data).
    pub data_dir: Option<PathBuf>,
    /// Test images evaluated for the card (the first N; 0 = all); `None` skips the evaluation.
    pub eval_images: Option<usize>,
    /// Samples in `samples.png` (0 = none).
    pub samples: usize,
    pub device: Device,
}

/// What the export wrote.
pub struct Exported {
    pub dir: PathBuf,
    pub files: Vec<String>,
    pub eval: Option<BTreeMap<String, f64>>,
}

fn describe_data(cfg: &crate::RunConfig, source: &str) -> String {
    if let Some(name) = crate::data::toy_name(&cfg.data.dataset) {
        return format!("2-D toy density '{name}' (points drawn from train.seed)");
    }
    let pre = match (cfg.data.binarize, cfg.data.dequantize) {
        (crate::config::Binarize::None, true) => {
            "8-bit pixels, uniformly dequantised ((k + u) / 256); likelihoods on the 8-bit scale"
                .to_string()
        }
        (crate::config::Binarize::None, false) => "pixels scaled to [0, 1]".to_string(),
        (b, _) => format!(
            "pixels binarised ({}); likelihoods of binary images",
            serde_json::to_value(b)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ),
    };
    format!("{} ({source}); {pre}", cfg.data.dataset)
}

/// Writes the folder (see the module docs). `dir` must not exist, or be empty.
pub fn export(run: &Path, dir: &Path, opts: &ExportOptions) -> Result<Exported> {
    if crate::text::is_text_checkpoint(run)? {
        bail!(
            "{}: a text model; gm export writes image and 2-D models (a text run's directory already holds its tokenizer and weights)",
            run.display()
        );
    }
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: gm export writes a new folder (choose another name, or remove it)",
            dir.display()
        );
    }
    let ck = load_checkpoint(run, &opts.device)?;
    let cfg = &ck.built.cfg;
    let model = ck.built.model.as_ref();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a folder name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.export-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    type Written = (Vec<String>, Option<BTreeMap<String, f64>>);
    let result = (|| -> Result<Written> {
        let mut files = Vec::new();
        // Weights: the checkpoint's tensors and metadata, plus the `format` key that PyTorch
        // loaders of the hub read.
        let w = read_safetensors(&ck.path, &Device::Cpu)?;
        let mut meta = w.meta.clone();
        meta.insert("format".into(), "pt".into());
        std::fs::write(tmp.join(WEIGHTS), to_safetensors(&w.tensors, &meta)?)?;
        files.push(WEIGHTS.to_string());
        let config = serde_json::json!({
            "gm": {
                "version": env!("CARGO_PKG_VERSION"),
                "kind": model.kind(),
                "step": ck.step,
                "source_checkpoint": ck.path.display().to_string(),
            },
            "model": cfg.model,
            "data": cfg.data,
            "train": cfg.train,
            "eval": cfg.eval,
        });
        std::fs::write(
            tmp.join(CONFIG),
            serde_json::to_string_pretty(&config)? + "\n",
        )?;
        files.push(CONFIG.to_string());
        let has_samples = if opts.samples > 0 {
            match sample_chunked(
                model,
                opts.samples,
                SAMPLE_CHUNK,
                &mut GmRng::new(cfg.eval.seed),
            )? {
                Some(s) if crate::data::toy_name(&cfg.data.dataset).is_none() => {
                    let ncols = (opts.samples as f64).sqrt().ceil() as usize;
                    save_grid(&s, ncols, &tmp.join("samples.png"))?;
                    files.push("samples.png".into());
                    true
                }
                _ => false,
            }
        } else {
            false
        };
        let mut eval = None;
        let mut data_line = describe_data(cfg, "data set of the run");
        if let Some(max_images) = opts.eval_images {
            let (ds, source) = load_data(cfg, opts.data_dir.as_deref(), Split::Test)?;
            data_line = describe_data(cfg, &source);
            eval = Some(evaluate_full(
                model,
                cfg,
                &ds,
                None,
                max_images,
                &opts.device,
            )?);
        }
        let params: usize = ck
            .built
            .varmap
            .all_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum();
        let card = model_card(&CardInput {
            name: &name,
            kind: model.kind(),
            params,
            step: ck.step,
            cfg,
            data_line: &data_line,
            eval: eval.as_ref(),
            likelihood: model.likelihood_metric(),
            estimate: crate::eval::likelihood_estimate_label(model, cfg.eval.iwae_k),
            has_samples,
        });
        std::fs::write(tmp.join("README.md"), card)?;
        files.push("README.md".into());
        Ok((files, eval))
    })();
    let (files, eval) = match result {
        Ok(r) => r,
        Err(e) => {
            std::fs::remove_dir_all(&tmp).ok();
            return Err(e);
        }
    };
    if dir.exists() {
        // Checked empty above.
        std::fs::remove_dir(dir).ok();
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))?;
    Ok(Exported {
        dir: dir.to_path_buf(),
        files,
        eval,
    })
}

struct CardInput<'a> {
    name: &'a str,
    kind: &'a str,
    params: usize,
    step: usize,
    cfg: &'a crate::RunConfig,
    data_line: &'a str,
    eval: Option<&'a BTreeMap<String, f64>>,
    likelihood: Option<&'a str>,
    estimate: String,
    has_samples: bool,
}

fn model_card(c: &CardInput) -> String {
    let t = &c.cfg.train;
    let shape = c
        .cfg
        .model
        .image_shape()
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|| "—".into());
    let mut s = format!(
        "---\nlibrary_name: gm\ntags:\n- gm\n- generative-model\n- {kind}\ndatasets:\n- {data}\n---\n\n# {name}\n\nA `{kind}` model trained with gm (deep generative models in Rust on Candle), version {ver}.\n\n| | |\n|---|---|\n| kind | `{kind}` |\n| parameters | {params} |\n| input shape | {shape} |\n| data | {dl} |\n| training | {step} steps × batch {batch}{acc} (lr {lr}, {sched} schedule, {ema}, seed {seed}) |\n",
        kind = c.kind,
        data = c.cfg.data.dataset.replace(':', "-"),
        name = c.name,
        ver = env!("CARGO_PKG_VERSION"),
        params = c.params,
        dl = c.data_line,
        step = c.step,
        batch = t.batch_size,
        acc = if t.accumulate > 1 {
            format!(" × {} accumulated", t.accumulate)
        } else {
            String::new()
        },
        lr = t.lr,
        sched = t.schedule,
        ema = if t.ema_decay > 0.0 {
            format!("EMA {} of the weights, which this folder holds", t.ema_decay)
        } else {
            "no EMA".to_string()
        },
        seed = t.seed,
    );
    s.push_str("\n## Evaluation\n\n");
    match c.eval {
        Some(m) => {
            let n = m.get("n_images").copied().unwrap_or(0.0);
            if let (Some(metric), Some(v)) = (c.likelihood, c.likelihood.and_then(|k| m.get(k))) {
                let bpd = m
                    .get("bits_per_dim")
                    .map_or(String::new(), |b| format!(" = **{b:.4} bits/dim**"));
                s.push_str(&format!(
                    "Test likelihood (`{metric}`, {}): {v:.3} nats per image{bpd}, on the first {n} test images.\n\n",
                    c.estimate
                ));
            }
            s.push_str("`gm eval` of these weights (its units: nats per image, bits per dimension):\n\n```json\n");
            s.push_str(&serde_json::to_string_pretty(m).unwrap_or_default());
            s.push_str("\n```\n");
        }
        None => s.push_str("Not evaluated at export (`gm export --no-eval`).\n"),
    }
    if c.has_samples {
        s.push_str(&format!(
            "\n## Samples\n\n![samples](samples.png)\n\nDrawn with the eval seed ({}).\n",
            c.cfg.eval.seed
        ));
    }
    s.push_str(&format!(
        "\n## Use\n\n```bash\ngm sample --checkpoint {name} --n 64 --out samples.png\ngm eval --checkpoint {name} --max-images 1000\n```\n\n`model.safetensors` holds the tensors under PyTorch-style names, with gm's configuration in its\nmetadata; `config.json` holds the same configuration as JSON (`model` is what gm's PyTorch twins in\n`scripts/` read, e.g. `python scripts/vae_torch.py elbo --model {name} ...`). To publish the folder\non the Hugging Face Hub: `hf upload USER/{name} {name} .`\n",
        name = c.name
    ));
    s
}

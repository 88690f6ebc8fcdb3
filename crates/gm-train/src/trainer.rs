//! One model-agnostic training loop. Nothing here knows what a VAE is: it asks the model for a
//! loss, steps the optimizer, and evaluates, samples and checkpoints on a schedule.

use crate::checkpoint::{self, atomic_write, read_safetensors, to_safetensors};
use crate::config::{lr_at, RunConfig};
use crate::data::{load_split, make_batch, Batcher, ImageDataset, Split};
use crate::eval::evaluate;
use crate::images::{density_grid, save_curve, save_density_2d, save_grid};
use crate::optim::{clip_grad_norm, named_vars, Adam, AdamConfig};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gm_core::{GmRng, RngState};
use gm_models::{EvalOptions, Model};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the data is: an explicit folder, `data.dir`, or the named data set fetched into the cache.
pub fn resolve_data(cfg: &RunConfig, data_dir: Option<&Path>) -> Result<(PathBuf, String)> {
    if let Some(d) = data_dir {
        return Ok((d.to_path_buf(), format!("IDX folder {}", d.display())));
    }
    if let Some(d) = &cfg.data.dir {
        return Ok((PathBuf::from(d), format!("IDX folder {d}")));
    }
    crate::fetch::ensure_dataset(&cfg.data.dataset)
}

/// Points drawn for the train and test splits of a toy density (`data.max_train` caps the first).
pub const TOY_POINTS: [usize; 2] = [50_000, 10_000];

/// One split of the run's data: a toy density (`data.dataset = "toy:NAME"`, drawn from
/// `train.seed`) or an IDX folder (`--data-dir`, `data.dir`, or the named data set fetched into
/// the cache). Returns the data set and a description of its source.
pub fn load_data(
    cfg: &RunConfig,
    data_dir: Option<&Path>,
    split: Split,
) -> Result<(ImageDataset, String)> {
    if let Some(name) = crate::data::toy_name(&cfg.data.dataset) {
        let n = match split {
            Split::Train => TOY_POINTS[0],
            Split::Test => TOY_POINTS[1],
        };
        let ds = crate::data::toy_dataset(name, n, cfg.train.seed, split)?;
        let src = ds.source.clone();
        return Ok((ds, src));
    }
    let (dir, source) = resolve_data(cfg, data_dir)?;
    Ok((load_split(&dir, split)?, source))
}

/// Writes the FFJORD-style picture of a 2-D model ([`save_density_2d`]): the data (`data`, up
/// to 20 000 points), the model's density on a 200 × 200 grid (density models only), and
/// `n_samples` of the model's samples.
pub fn toy_density_plot(
    model: &dyn Model,
    data: &ImageDataset,
    n_samples: usize,
    rng: &mut GmRng,
    device: &Device,
    path: &Path,
) -> Result<()> {
    const RES: usize = 200;
    let to_points = |v: &[f32]| v.chunks_exact(2).map(|p| [p[0], p[1]]).collect::<Vec<_>>();
    let data_pts = match &data.values {
        Some(v) => to_points(&v[..v.len().min(2 * 20_000)]),
        None => bail!("{}: not a 2-D toy data set", data.source),
    };
    let logd = match model.likelihood_metric() {
        Some(metric) => {
            let grid: Vec<f32> = density_grid(RES)
                .into_iter()
                .flat_map(|p| [p[0] as f32, p[1] as f32])
                .collect();
            let opts = EvalOptions {
                iwae_k: 1,
                max_pairs: 20_000,
                full: false,
            };
            let mut logd = Vec::with_capacity(RES * RES);
            for chunk in grid.chunks(2 * 4000) {
                let x = Tensor::from_slice(chunk, (chunk.len() / 2, 2, 1, 1), device)?;
                let m = model.eval_metrics(&gm_models::Batch { x, labels: None }, rng, &opts)?;
                let nll = m
                    .into_iter()
                    .find(|(k, _)| k == metric)
                    .ok_or_else(|| anyhow!("the model reported no '{metric}'"))?
                    .1;
                logd.extend(
                    nll.to_dtype(DType::F64)?
                        .to_vec1::<f64>()?
                        .iter()
                        .map(|v| -v),
                );
            }
            Some(logd)
        }
        None => None,
    };
    let samples = match model.sample(n_samples, rng)? {
        Some(s) => to_points(&s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => Vec::new(),
    };
    save_density_2d(&data_pts, logd.as_deref(), &samples, RES, path)
}

/// A phase and the parameters its optimiser updates.
pub type OptimizerGroup = (gm_models::Phase, Vec<(String, Var)>);

/// The optimiser groups of a model: one over every parameter, or one per [`gm_models::Phase`]
/// over the parameters under its prefix (a single group has the empty name).
pub fn optimizer_groups(model: &dyn Model, vars: &[(String, Var)]) -> Result<Vec<OptimizerGroup>> {
    let phases = model.phases();
    if phases.is_empty() {
        let all = gm_models::Phase {
            name: "",
            prefix: "",
            lr_scale: 1.0,
            repeats: 1,
        };
        return Ok(vec![(all, vars.to_vec())]);
    }
    phases
        .into_iter()
        .map(|p| {
            let v: Vec<(String, Var)> = vars
                .iter()
                .filter(|(n, _)| n.starts_with(p.prefix))
                .cloned()
                .collect();
            if v.is_empty() {
                bail!("phase '{}': no parameters under '{}'", p.name, p.prefix)
            }
            Ok((p, v))
        })
        .collect()
}

/// The optimiser groups of a model and one Adam for each.
pub(crate) fn optimizers(
    model: &dyn Model,
    vars: &[(String, Var)],
    t: &crate::config::TrainConfig,
) -> Result<(Vec<OptimizerGroup>, Vec<Adam>)> {
    let groups = optimizer_groups(model, vars)?;
    let adams = groups
        .iter()
        .map(|(_, v)| Adam::new(v.clone(), AdamConfig::from(t)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((groups, adams))
}

/// The loss of optimiser group `i`: the model's loss for the single group, its phase loss else.
pub(crate) fn group_loss(
    model: &dyn Model,
    phase: &gm_models::Phase,
    i: usize,
    batch: &gm_models::Batch,
    rng: &mut GmRng,
) -> candle_core::Result<gm_models::Loss> {
    match phase.name {
        "" => model.loss(batch, rng),
        _ => model.phase_loss(i, batch, rng),
    }
}

/// A model with its variables and configuration.
pub struct Built {
    pub model: Box<dyn Model>,
    pub varmap: VarMap,
    pub cfg: RunConfig,
}

pub fn build(cfg: &RunConfig, device: &Device) -> Result<Built> {
    let varmap = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&varmap, cfg.train.seed, DType::F32, device);
    let model = cfg
        .model
        .build(vb)
        .with_context(|| format!("building model '{}'", cfg.model.kind()))?;
    Ok(Built {
        model,
        varmap,
        cfg: cfg.clone(),
    })
}

/// Copies `tensors[prefix + name]` into every variable; errors name the file and the tensor.
pub fn set_vars(
    vm: &VarMap,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    origin: &Path,
    strict: bool,
) -> Result<()> {
    let vars = named_vars(vm);
    for (name, var) in &vars {
        let key = format!("{prefix}{name}");
        let t = tensors
            .get(&key)
            .ok_or_else(|| anyhow!("{}: missing tensor '{key}'", origin.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor '{key}' has shape {:?}, the model expects {:?}",
                origin.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    if strict {
        let known: std::collections::HashSet<&String> = vars.iter().map(|(n, _)| n).collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k)).collect();
        if !extra.is_empty() {
            bail!(
                "{}: unexpected tensors {:?} for this model",
                origin.display(),
                extra
            );
        }
    }
    Ok(())
}

/// A model loaded from a checkpoint file, with the metadata it carried.
pub struct LoadedCheckpoint {
    pub built: Built,
    pub step: usize,
    pub meta: HashMap<String, String>,
    pub path: PathBuf,
}

/// Rebuilds a model from a weights file or run directory: the file's metadata holds the config.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    load_checkpoint_with(path, device, &[])
}

/// [`load_checkpoint`] with `key=value` overrides applied to the stored config first — settings
/// that leave the parameters alone, such as `model.sampler.steps=10` or `model.solver.method=rk4`
/// (an override that changes a parameter's shape fails to load, naming the tensor).
pub fn load_checkpoint_with(
    path: &Path,
    device: &Device,
    overrides: &[String],
) -> Result<LoadedCheckpoint> {
    let path = checkpoint::resolve(path)?;
    let l = read_safetensors(&path, device)?;
    let text = l.meta.get("gm.config").ok_or_else(|| {
        anyhow!(
            "{}: no gm.config metadata (not a gm checkpoint?)",
            path.display()
        )
    })?;
    let cfg =
        RunConfig::from_toml_str(text, overrides, &format!("{} (gm.config)", path.display()))?;
    check_checkpoint_meta(&path, &l.meta, &cfg)?;
    for (name, t) in &l.tensors {
        if t.dtype() != DType::F32 {
            bail!(
                "{}: tensor '{name}' is {:?}; gm checkpoints hold f32 weights",
                path.display(),
                t.dtype()
            );
        }
        // A sum propagates NaN and ±inf from any element (candle's max skips a NaN that is not
        // first), and f32 values cannot overflow it in f64.
        let finite = t
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
            .is_finite();
        if !finite {
            bail!(
                "{}: tensor '{name}' holds NaN or infinite values: these weights cannot be evaluated or sampled (use an earlier checkpoint of the run)",
                path.display()
            );
        }
    }
    let built = build(&cfg, device)?;
    set_vars(&built.varmap, &l.tensors, "", &path, true)?;
    let step = l
        .meta
        .get("gm.step")
        .map(|s| s.parse::<usize>())
        .transpose()
        .map_err(|_| {
            anyhow!(
                "{}: gm.step = '{}' is not a step number",
                path.display(),
                l.meta["gm.step"]
            )
        })?
        .unwrap_or(0);
    Ok(LoadedCheckpoint {
        built,
        step,
        meta: l.meta,
        path,
    })
}

/// Checks a gm checkpoint's metadata: the format version this gm reads, and a kind that agrees
/// with the stored config. Errors name the file, the key and what was found.
fn check_checkpoint_meta(
    path: &Path,
    meta: &HashMap<String, String>,
    cfg: &RunConfig,
) -> Result<()> {
    if let Some(f) = meta.get("gm.format") {
        if f != checkpoint::FORMAT {
            bail!(
                "{}: gm.format = '{f}', this gm (version {}) reads '{}': use the gm version that wrote it ({})",
                path.display(),
                env!("CARGO_PKG_VERSION"),
                checkpoint::FORMAT,
                meta.get("gm.version").map(String::as_str).unwrap_or("unknown")
            );
        }
    }
    if let Some(kind) = meta.get("gm.kind") {
        if kind != cfg.model.kind() {
            bail!(
                "{}: gm.kind = '{kind}' but its gm.config describes a '{}' model",
                path.display(),
                cfg.model.kind()
            );
        }
    }
    Ok(())
}

/// How to run [`train`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out: PathBuf,
    pub device: Device,
    pub data_dir: Option<PathBuf>,
    /// Continue from the latest complete checkpoint in `out`.
    pub resume: bool,
    pub progress: bool,
    /// Start a fresh run (new optimiser, step 0) from this checkpoint's weights — a run
    /// directory or a `.safetensors` file whose parameters match the config's, e.g. likelihood
    /// fine-tuning of a CNF trained by flow matching.
    pub init_from: Option<PathBuf>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub steps: usize,
    /// `(step, loss)` of every step run in this call.
    pub losses: Vec<(usize, f64)>,
    pub last_eval: Option<BTreeMap<String, f64>>,
    pub checkpoint: PathBuf,
    pub data_source: String,
    /// Host↔device traffic of the training steps run in this call (batches, noise, loss
    /// read-backs; evaluations and checkpoints excluded), summed.
    pub step_traffic: gm_core::traffic::Traffic,
}

struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

fn swap_in(vars: &[(String, Var)], values: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut old = Vec::with_capacity(vars.len());
    for ((_, v), t) in vars.iter().zip(values) {
        old.push(v.as_tensor().copy()?);
        v.set(t)?;
    }
    Ok(old)
}

fn jsonl(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{v}")?;
    Ok(())
}

/// Drops the lines of `metrics.jsonl` logged after `step` (by a run that went on past its last
/// checkpoint before it was stopped), so a resumed run's log has each step once.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    atomic_write(path, out.as_bytes())
}

/// Images a fresh run shows [`Model::data_init`].
const DATA_INIT_IMAGES: usize = 4096;

/// Sets the model's data-dependent initial values from the first [`DATA_INIT_IMAGES`] training
/// images (pre-processed as in training, with their own noise stream: the run's is untouched).
/// The statistics are computed on the CPU (in f64 where a model wants it, which Metal lacks) and
/// moved to each variable's device.
fn data_init(
    model: &dyn Model,
    vm: &VarMap,
    train_ds: &ImageDataset,
    cfg: &RunConfig,
) -> Result<()> {
    let idx: Vec<usize> = (0..train_ds.len().min(DATA_INIT_IMAGES)).collect();
    if idx.is_empty() {
        return Ok(());
    }
    let mut rng = GmRng::new(cfg.train.seed.wrapping_add(2));
    let batch = make_batch(train_ds, &idx, &cfg.data, &mut rng, &Device::Cpu)?;
    set_data_init(vm, model.data_init(&batch)?)
}

/// Sets the values a model's [`Model::data_init`] returned, by variable name, on each variable's
/// device; errors name an unknown variable or a shape that does not fit.
pub(crate) fn set_data_init(vm: &VarMap, init: Vec<(String, Tensor)>) -> Result<()> {
    if init.is_empty() {
        return Ok(());
    }
    let vars = named_vars(vm);
    for (name, value) in init {
        let Some((_, var)) = vars.iter().find(|(n, _)| *n == name) else {
            bail!("data_init: the model has no variable '{name}'");
        };
        if value.dims() != var.dims() {
            bail!(
                "data_init: '{name}' has shape {:?}, the variable {:?}",
                value.dims(),
                var.dims()
            );
        }
        var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Checks a split against the model before any step: image size, and labels within
/// `num_classes` for class-conditional models. Errors name the data and the key.
fn check_split(ds: &ImageDataset, cfg: &RunConfig, split: &str) -> Result<()> {
    if ds.values.is_none() && ds.shape != cfg.model.image_shape() {
        let [c, h, w] = ds.shape;
        bail!(
            "{}: the {split} images are {c}×{h}×{w} (C×H×W), the model's model.image_shape is {:?}",
            ds.source,
            cfg.model.image_shape()
        );
    }
    let k = cfg.model.num_classes();
    if let (Some(labels), true) = (&ds.labels, k > 0) {
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            bail!(
                "{}: {split} image {i} has label {l}, outside model.num_classes = {k}",
                ds.source
            );
        }
    }
    Ok(())
}

/// Trains `cfg` into `opts.out`.
pub fn train(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    let t = &cfg.train;
    let dev = &opts.device;
    let run = &opts.out;
    if !opts.resume {
        checkpoint::ensure_fresh_run_dir(run)?;
    }
    let (mut train_ds, data_source) = load_data(cfg, opts.data_dir.as_deref(), Split::Train)?;
    train_ds.truncate(cfg.data.max_train);
    check_split(&train_ds, cfg, "training")?;
    if cfg.model.needs_labels() && train_ds.labels.is_none() {
        bail!(
            "a '{}' model needs class labels, but {} has no train-labels file",
            cfg.model.kind(),
            train_ds.source
        );
    }
    let test_ds: Option<ImageDataset> = match load_data(cfg, opts.data_dir.as_deref(), Split::Test)
    {
        Ok((d, _)) => {
            // A test split the periodic evaluations cannot read must stop the run now, not
            // after the steps before the first evaluation.
            check_split(&d, cfg, "test")?;
            Some(d)
        }
        Err(e) => {
            eprintln!("gm: no test split ({e:#}); periodic evaluation is off");
            None
        }
    };
    eprintln!(
        "gm: data: {data_source} — {} training images",
        train_ds.len()
    );

    std::fs::create_dir_all(run)
        .with_context(|| format!("cannot create run directory {}", run.display()))?;
    let cfg_text = cfg.to_toml();
    let built = build(cfg, dev)?;
    let model = built.model.as_ref();
    let vars = named_vars(&built.varmap);
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    // --init-from replaces every variable, so a data-dependent start would be discarded.
    if !opts.resume && opts.init_from.is_none() {
        data_init(model, &built.varmap, &train_ds, cfg)?;
    }
    if let Some(src) = &opts.init_from {
        if opts.resume {
            bail!("--init-from starts a fresh run; it cannot be combined with --resume");
        }
        let path = checkpoint::resolve(src)?;
        let w = read_safetensors(&path, dev)?;
        if let Some(kind) = w.meta.get("gm.kind") {
            if kind != cfg.model.kind() {
                bail!(
                    "--init-from {}: a '{kind}' checkpoint cannot start a '{}' model",
                    path.display(),
                    cfg.model.kind()
                );
            }
        }
        set_vars(&built.varmap, &w.tensors, "", &path, true)?;
        eprintln!("gm: weights from {}", path.display());
    }
    let (groups, mut adams) = optimizers(model, &vars, t)?;
    let mut ema = if t.ema_decay > 0.0 {
        Some(Ema {
            decay: t.ema_decay,
            shadow: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    } else {
        None
    };
    let mut rng = GmRng::new(t.seed);
    let mut start = 0usize;
    let mut best = f64::INFINITY;
    if opts.resume {
        let Some(&step) = checkpoint::complete_steps(run).last() else {
            bail!("--resume: {} has no complete checkpoint", run.display());
        };
        let stale = checkpoint::remove_stale_temps(run);
        if stale > 0 {
            eprintln!(
                "gm: removed {stale} temporary file(s) an interrupted write left in {}",
                run.display()
            );
        }
        if t.steps <= step {
            bail!(
                "--resume: {} has run {step} steps and train.steps = {} leaves none to run; give more with --set train.steps=N (N > {step})",
                run.display(),
                t.steps
            );
        }
        let saved_cfg = std::fs::read_to_string(run.join("config.toml")).unwrap_or_default();
        let saved = RunConfig::from_toml_str(&saved_cfg, &[], "config.toml").ok();
        if saved.as_ref().map(|s| &s.model) != Some(&cfg.model) {
            bail!(
                "--resume: the model config differs from {}/config.toml",
                run.display()
            );
        }
        let wp = checkpoint::weights_path(run, step);
        let sp = checkpoint::state_path(run, step);
        let w = read_safetensors(&wp, dev)?;
        let s = read_safetensors(&sp, dev)?;
        match &mut ema {
            Some(e) => {
                set_vars(&built.varmap, &w.tensors, "", &wp, true)?;
                e.shadow = vars
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?;
                set_vars(&built.varmap, &s.tensors, "param.", &sp, false)?;
            }
            None => set_vars(&built.varmap, &w.tensors, "", &wp, true)?,
        }
        let adam_t = s
            .meta
            .get("gm.adam_t")
            .and_then(|v| v.parse().ok())
            .unwrap_or(step);
        for (i, opt) in adams.iter_mut().enumerate() {
            let t_i = match i {
                0 => adam_t,
                i => s
                    .meta
                    .get(&format!("gm.adam_t.{i}"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(adam_t),
            };
            opt.load_state(&s.tensors, t_i).with_context(|| {
                format!(
                    "{}: this optimizer state does not belong to the run's model",
                    sp.display()
                )
            })?;
        }
        let rs: RngState =
            serde_json::from_str(s.meta.get("gm.rng").map(String::as_str).unwrap_or(""))
                .with_context(|| format!("{}: bad gm.rng metadata", sp.display()))?;
        rng = GmRng::from_state(rs);
        best = s
            .meta
            .get("gm.best")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::INFINITY);
        start = step;
        truncate_metrics(&run.join("metrics.jsonl"), step)?;
        eprintln!("gm: resuming {} at step {step}", run.display());
    }
    atomic_write(&run.join("config.toml"), cfg_text.as_bytes())?;
    eprintln!(
        "gm: model {} with {n_params} parameters; {} steps of batch {}",
        cfg.model.kind(),
        t.steps,
        t.batch_size
    );

    let mut batcher = Batcher::new(t.seed, train_ds.len(), t.batch_size)?;
    let metrics_path = run.join("metrics.jsonl");
    let eval_opts = EvalOptions {
        iwae_k: cfg.eval.train_iwae_k,
        max_pairs: cfg.eval.max_pairs,
        full: false,
    };
    let pb = if opts.progress {
        indicatif::ProgressBar::new(t.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        )
        .expect("valid template"),
    );
    pb.set_position(start as u64);
    let clock = Instant::now();
    let mut losses = Vec::new();
    let mut last_eval = None;
    let mut last_ckpt = checkpoint::complete_steps(run)
        .last()
        .map(|s| checkpoint::weights_path(run, *s));

    // Everything a checkpoint needs, as a closure over the current state.
    let save = |step: usize,
                opts: &[Adam],
                ema: &Option<Ema>,
                rng: &GmRng,
                best: f64|
     -> Result<(PathBuf, Vec<u8>)> {
        let mut meta = HashMap::from([
            ("gm.format".to_string(), checkpoint::FORMAT.to_string()),
            ("gm.kind".to_string(), cfg.model.kind().to_string()),
            ("gm.config".to_string(), cfg_text.clone()),
            ("gm.step".to_string(), step.to_string()),
            (
                "gm.version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
            ("gm.data".to_string(), data_source.clone()),
            ("gm.ema".to_string(), ema.is_some().to_string()),
        ]);
        let mut weights = HashMap::new();
        // Parameter names are disjoint between the phases' optimisers: one map holds all.
        let mut state: HashMap<String, Tensor> = opts.iter().flat_map(|o| o.state()).collect();
        for (i, (name, v)) in vars.iter().enumerate() {
            match ema {
                Some(e) => {
                    weights.insert(name.clone(), e.shadow[i].clone());
                    state.insert(format!("param.{name}"), v.as_tensor().clone());
                }
                None => {
                    weights.insert(name.clone(), v.as_tensor().clone());
                }
            }
        }
        let mut smeta = HashMap::from([
            ("gm.step".to_string(), step.to_string()),
            ("gm.adam_t".to_string(), opts[0].steps().to_string()),
            ("gm.rng".to_string(), serde_json::to_string(&rng.state())?),
            ("gm.best".to_string(), best.to_string()),
        ]);
        for (i, o) in opts.iter().enumerate().skip(1) {
            smeta.insert(format!("gm.adam_t.{i}"), o.steps().to_string());
        }
        // State first: a weights file is only "complete" once its state exists beside it.
        atomic_write(
            &checkpoint::state_path(run, step),
            &to_safetensors(&state, &smeta)?,
        )?;
        let wp = checkpoint::weights_path(run, step);
        meta.insert("gm.best".to_string(), best.to_string());
        let bytes = to_safetensors(&weights, &meta)?;
        atomic_write(&wp, &bytes)?;
        checkpoint::prune(run, t.keep_last)?;
        // The weights' bytes too: best.safetensors is the same file under another name.
        Ok((wp, bytes))
    };
    let eval_now = |ema: &Option<Ema>| -> Result<Option<BTreeMap<String, f64>>> {
        let Some(test) = &test_ds else {
            return Ok(None);
        };
        let old = match ema {
            Some(e) => Some(swap_in(&vars, &e.shadow)?),
            None => None,
        };
        let m = evaluate(
            model,
            test,
            &cfg.data,
            &eval_opts,
            cfg.eval.batch_size,
            t.eval_images,
            cfg.eval.seed,
            dev,
        );
        if let Some(old) = old {
            swap_in(&vars, &old)?;
        }
        m.map(Some)
    };
    let toy = crate::data::toy_name(&cfg.data.dataset).is_some();
    let sample_now = |step: usize, ema: &Option<Ema>| -> Result<()> {
        let old = match ema {
            Some(e) => Some(swap_in(&vars, &e.shadow)?),
            None => None,
        };
        let s = match t.sample_n {
            0 => Ok(None),
            _ if toy => toy_density_plot(
                model,
                test_ds.as_ref().unwrap_or(&train_ds),
                20_000,
                &mut GmRng::new(t.seed.wrapping_add(1)),
                dev,
                &run.join(format!("samples/density-step-{step:08}.png")),
            )
            .map(|_| None),
            n => crate::eval::sample_chunked(
                model,
                n,
                crate::eval::SAMPLE_CHUNK,
                &mut GmRng::new(t.seed.wrapping_add(1)),
            ),
        };
        // Reconstructions of the first 32 test images: originals on top, reconstructions below.
        let recon = match &test_ds {
            Some(test) if test.len() >= 32 => {
                let idx: Vec<usize> = (0..32).collect();
                let mut r = GmRng::new(cfg.eval.seed);
                let batch = make_batch(test, &idx, &cfg.data, &mut r, dev)?;
                model
                    .reconstruct(&batch, &mut r)
                    .and_then(|rec| rec.map(|rec| Tensor::cat(&[&batch.x, &rec], 0)).transpose())
            }
            _ => Ok(None),
        };
        if let Some(old) = old {
            swap_in(&vars, &old)?;
        }
        if let Some(s) = s? {
            save_grid(&s, 8, &run.join(format!("samples/step-{step:08}.png")))?;
        }
        if let Some(r) = recon? {
            save_grid(
                &r,
                8,
                &run.join(format!("samples/recon-step-{step:08}.png")),
            )?;
        }
        Ok(())
    };

    let mut step_traffic = gm_core::traffic::Traffic::default();
    for step in start..t.steps {
        let done = step + 1;
        let traffic0 = gm_core::traffic::snapshot();
        let lr = lr_at(t, step);
        let idx = batcher.indices(step);
        let batch = make_batch(&train_ds, &idx, &cfg.data, &mut rng, dev)?;
        let mut total = 0.0;
        let mut gnorm = 0.0;
        let mut parts: Vec<(&'static str, f64)> = Vec::new();
        for (pi, (phase, pvars)) in groups.iter().enumerate() {
            for _ in 0..phase.repeats {
                let loss = group_loss(model, phase, pi, &batch, &mut rng)?;
                total = gm_core::traffic::read_f64(&loss.total)?;
                for (name, p) in &loss.parts {
                    let v = gm_core::traffic::read_f64(p)?;
                    match parts.iter_mut().find(|q| q.0 == *name) {
                        Some(q) => q.1 = v,
                        None => parts.push((name, v)),
                    }
                }
                if !total.is_finite() {
                    let bad: Vec<String> = parts
                        .iter()
                        .filter(|p| !p.1.is_finite())
                        .map(|p| format!("'{}' = {}", p.0, p.1))
                        .collect();
                    let keep = last_ckpt
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none yet".into());
                    bail!(
                        "non-finite loss at step {done}: total = {total}; parts {}; training stopped, last good checkpoint: {keep}",
                        if bad.is_empty() { "all finite".into() } else { bad.join(", ") }
                    );
                }
                let mut grads = loss.total.backward()?;
                gnorm = clip_grad_norm(&mut grads, pvars, t.grad_clip)?;
                if !gnorm.is_finite() {
                    let keep = last_ckpt
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none yet".into());
                    bail!("non-finite gradient norm at step {done} (loss {total}); training stopped, last good checkpoint: {keep}");
                }
                adams[pi].step(&grads, lr * phase.lr_scale)?;
            }
        }
        if let Some(e) = &mut ema {
            for (i, (_, v)) in vars.iter().enumerate() {
                // Detached: otherwise every shadow keeps the previous one (and the parameter
                // snapshot) alive through candle's graph, and memory grows with every step.
                e.shadow[i] =
                    ((&e.shadow[i] * e.decay)? + (v.as_tensor() * (1.0 - e.decay))?)?.detach();
            }
        }
        let dt = gm_core::traffic::snapshot().since(&traffic0);
        step_traffic = step_traffic.plus(&dt);
        losses.push((done, total));
        pb.inc(1);
        let part_msg: Vec<String> = parts.iter().map(|(n, v)| format!("{n} {v:.2}")).collect();
        pb.set_message(format!("loss {total:.3} ({})", part_msg.join(", ")));
        if t.log_every > 0 && (done % t.log_every == 0 || done == t.steps) {
            let mut rec = serde_json::json!({"step": done, "loss": total, "lr": lr, "grad_norm": gnorm,
                "elapsed_s": clock.elapsed().as_secs_f64()});
            for (n, v) in &parts {
                rec[*n] = serde_json::json!(v);
            }
            jsonl(&metrics_path, &rec)?;
        }
        let eval_due = t.eval_every > 0 && done % t.eval_every == 0;
        let ckpt_due =
            (t.checkpoint_every > 0 && done % t.checkpoint_every == 0) || done == t.steps;
        if eval_due || done == t.steps {
            if let Some(m) = eval_now(&ema)? {
                let mut rec = serde_json::json!({"step": done, "split": "test"});
                for (k, v) in &m {
                    rec[k] = serde_json::json!(v);
                }
                jsonl(&metrics_path, &rec)?;
                let shown: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
                pb.println(format!("step {done}: test {}", shown.join(" ")));
                if let Some(&p) = m.get(model.primary_metric()) {
                    if p < best {
                        best = p;
                        let (wp, bytes) = save(done, &adams, &ema, &rng, best)?;
                        // Atomically, like every checkpoint file: a plain copy killed
                        // half-way would leave a torn best.safetensors.
                        atomic_write(
                            &checkpoint::checkpoint_dir(run).join("best.safetensors"),
                            &bytes,
                        )?;
                        last_ckpt = Some(wp);
                    }
                }
                last_eval = Some(m);
            }
        }
        if ckpt_due && last_ckpt.as_ref() != Some(&checkpoint::weights_path(run, done)) {
            last_ckpt = Some(save(done, &adams, &ema, &rng, best)?.0);
        }
        if (t.sample_every > 0 && done % t.sample_every == 0) || done == t.steps {
            sample_now(done, &ema)?;
        }
    }
    pb.finish_and_clear();
    if losses.len() >= 2 {
        save_curve(
            &losses
                .iter()
                .map(|&(s, l)| (s as f64, l))
                .collect::<Vec<_>>(),
            &run.join("loss_curve.png"),
        )?;
    }
    let checkpoint = last_ckpt.ok_or_else(|| anyhow!("no checkpoint was written"))?;
    Ok(TrainSummary {
        steps: t.steps,
        losses,
        last_eval,
        checkpoint,
        data_source,
        step_traffic,
    })
}

/// Timing of the train step, as `gm bench` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    /// The device the step ran on (`cpu`, `cuda:0`, …).
    pub device: String,
    pub batch_size: usize,
    pub threads: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    /// Training images per second at the median step time.
    pub images_per_s: f64,
    pub steps: usize,
    /// Host↔device traffic of one timed step (host-drawn noise, read-backs), averaged.
    pub upload_bytes_per_step: f64,
    pub readbacks_per_step: f64,
    /// Bytes of the batch a training step uploads on top (the benchmark reuses one batch).
    pub batch_upload_bytes: usize,
    /// Peak resident memory of the process (Linux `VmHWM`), MiB.
    pub peak_rss_mb: Option<f64>,
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A device's name in reports: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Times `steps` train steps (loss, backward, Adam update) on random binary images of the
/// configured batch size after `warmup` untimed ones. Each step ends by waiting for the device
/// (after the optimizer's update, so its kernels are inside the time).
pub fn bench_train_step(
    cfg: &RunConfig,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> Result<BenchReport> {
    let built = build(cfg, device)?;
    let vars = named_vars(&built.varmap);
    let t = &cfg.train;
    let (groups, mut adams) = optimizers(built.model.as_ref(), &vars, t)?;
    let mut rng = GmRng::new(0);
    let [c, h, w] = cfg.model.image_shape();
    let p = rng.uniform((t.batch_size, c, h, w), 0.0, 1.0, device)?;
    let labels = Tensor::from_vec(
        (0..t.batch_size as u32).map(|i| i % 10).collect::<Vec<_>>(),
        t.batch_size,
        device,
    )?;
    let batch = gm_models::Batch {
        x: rng.bernoulli(&p)?,
        labels: Some(labels),
    };
    let batch_upload_bytes = gm_core::traffic::bytes_of(&batch.x) + 4 * t.batch_size;
    let mut times = Vec::with_capacity(steps);
    let mut traffic = gm_core::traffic::Traffic::default();
    for i in 0..warmup + steps {
        device.synchronize()?;
        let t0 = Instant::now();
        let tr0 = gm_core::traffic::snapshot();
        for (pi, (phase, _)) in groups.iter().enumerate() {
            for _ in 0..phase.repeats {
                let loss = group_loss(built.model.as_ref(), phase, pi, &batch, &mut rng)?;
                let grads = loss.total.backward()?;
                adams[pi].step(&grads, t.lr * phase.lr_scale)?;
            }
        }
        // Wait for the device so the time covers the whole step, the update included.
        device.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            traffic = traffic.plus(&gm_core::traffic::snapshot().since(&tr0));
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median_ms = times[times.len() / 2];
    Ok(BenchReport {
        model: cfg.model.kind().to_string(),
        device: device_name(device),
        batch_size: t.batch_size,
        threads: gm_core::par::threads(),
        median_ms,
        min_ms: times[0],
        images_per_s: t.batch_size as f64 / (median_ms / 1e3),
        steps,
        upload_bytes_per_step: traffic.upload_bytes as f64 / steps as f64,
        readbacks_per_step: traffic.readbacks as f64 / steps as f64,
        batch_upload_bytes,
        peak_rss_mb: peak_rss_mb(),
    })
}

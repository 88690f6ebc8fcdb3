//! One model-agnostic training loop. Nothing here knows what a VAE is: it asks the model for a
//! loss, steps the optimizer, and evaluates, samples and checkpoints on a schedule.

pub use crate::bench::{bench_train_step, device_name, BenchReport};
use crate::checkpoint::{self, atomic_write, read_safetensors};
pub use crate::checkpoint::{load_checkpoint, load_checkpoint_with, set_vars, LoadedCheckpoint};
use crate::config::{lr_at, RunConfig};
pub use crate::data::{check_split, load_data, resolve_data, TOY_POINTS};
use crate::data::{make_batch, Batcher, ImageDataset};
use crate::hooks::{
    Ema, GradAction, Hook, LossScaler, LossValues, NanStop, SavedState, StepContext,
};
pub use crate::images::toy_density_plot;
use crate::images::{save_curve, save_grid, save_reconstructions, Series};
use crate::optim::{clip_grad_norm, named_vars, Adam, AdamConfig};
use crate::parallel::{Collective, DataParallel};
use crate::source::{load_run_data, TrainData};
use crate::tensorboard::{EventWriter, Value as TbValue};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gm_core::{grad_checkpoint, GmRng};
use gm_models::{EvalOptions, Model};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// Trains `cfg` into `opts.out`: [`Trainer::new`] then [`Trainer::run`].
pub fn train(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    Trainer::new(cfg, opts)?.run()
}

/// What one training step reports.
pub struct StepReport {
    pub loss: f64,
    pub parts: Vec<(&'static str, f64)>,
    pub grad_norm: f64,
    pub lr: f64,
}

/// A training run whose parts can be read and replaced one at a time: [`Trainer::step`],
/// [`Trainer::evaluate`], [`Trainer::sample`], [`Trainer::save`], [`Trainer::resume`], and the
/// [`Hook`]s called at fixed points of every step (see [`crate::hooks`]).
pub struct Trainer {
    pub cfg: RunConfig,
    cfg_text: String,
    run: PathBuf,
    device: Device,
    model: Box<dyn Model>,
    varmap: VarMap,
    vars: Vec<(String, Var)>,
    groups: Vec<OptimizerGroup>,
    adams: Vec<Adam>,
    rng: GmRng,
    batcher: Batcher,
    data: Box<dyn TrainData>,
    hooks: Vec<Box<dyn Hook>>,
    /// Steps already run (the resume point).
    start: usize,
    best: f64,
    last_checkpoint: Option<PathBuf>,
    progress: bool,
    /// The low precision of matrix products and convolutions (`train.precision`), if any.
    precision: Option<DType>,
    /// This process's rank among `world` data-parallel ranks (0 of 1 without).
    rank: usize,
    world: usize,
    /// The data folder given at the start (`--data-dir`), kept in checkpoints for resume.
    data_dir: Option<PathBuf>,
    /// The run's TensorBoard event file while [`Trainer::run`] runs (`train.tensorboard`).
    tensorboard: RefCell<Option<EventWriter>>,
}

impl Trainer {
    /// Loads the data, builds the model (data-dependent initialisation or `--init-from`
    /// weights), its optimisers and the hooks the config asks for, and resumes when asked.
    pub fn new(cfg: &RunConfig, opts: &TrainOptions) -> Result<Self> {
        Self::new_ranked(cfg, opts, None)
    }

    /// One rank of a data-parallel run ([`crate::parallel`]): parameters broadcast from rank 0,
    /// gradients all-reduced by the [`DataParallel`] hook (first among the hooks), this rank's
    /// part of every global batch, per-sample random draws; rank 0 alone writes the run
    /// directory.
    pub fn new_parallel(
        cfg: &RunConfig,
        opts: &TrainOptions,
        comm: Box<dyn Collective>,
    ) -> Result<Self> {
        Self::new_ranked(cfg, opts, Some(comm))
    }

    fn new_ranked(
        cfg: &RunConfig,
        opts: &TrainOptions,
        comm: Option<Box<dyn Collective>>,
    ) -> Result<Self> {
        let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
        let lead = rank == 0;
        let mut cfg = cfg.clone();
        if world > 1 && cfg.train.rng == "stream" {
            // A rank's noise must not depend on its place in a stream: draws keyed per sample.
            cfg.train.rng = "per-sample".into();
            if lead {
                eprintln!("gm: {world} ranks: train.rng = \"per-sample\" (draws keyed by each sample's index in the global batch)");
            }
        }
        let cfg = &cfg;
        let t = &cfg.train;
        let run = opts.out.clone();
        if !opts.resume && lead {
            checkpoint::ensure_fresh_run_dir(&run)?;
        }
        // A resumed run reads the folder it was started on unless told otherwise.
        let data_dir = match (&opts.data_dir, opts.resume) {
            (None, true) => checkpoint::saved_data_dir(&run),
            (d, _) => d.clone(),
        };
        let saved = match opts.resume {
            true => checkpoint::complete_steps(&run)
                .last()
                .and_then(|s| checkpoint::read_meta(&checkpoint::weights_path(&run, *s)).ok()),
            false => None,
        };
        let data = load_run_data(cfg, data_dir.as_deref(), saved.as_ref())?;
        if lead {
            eprintln!("gm: data: {}", data.describe());
            std::fs::create_dir_all(&run)
                .with_context(|| format!("cannot create run directory {}", run.display()))?;
        }
        let Built { model, varmap, .. } = build(cfg, &opts.device)?;
        check_gradient_checkpointing(cfg, model.as_ref())?;
        let vars = named_vars(&varmap);
        // --init-from replaces every variable, so a data-dependent start would be discarded.
        if let (false, None, Some(images)) = (opts.resume, &opts.init_from, data.images()) {
            data_init(model.as_ref(), &varmap, &images.train, cfg)?;
        }
        if let Some(src) = &opts.init_from {
            if opts.resume {
                bail!("--init-from starts a fresh run; it cannot be combined with --resume");
            }
            init_from(cfg, &varmap, src, &opts.device)?;
        } else if let (false, Some(e)) = (opts.resume, cfg.model.embeds()) {
            bail!(
                "a '{}' model with [{}] holds a trained '{}' model: start it from that model's run with --init-from RUN",
                cfg.model.kind(),
                e.key,
                e.config.kind()
            );
        }
        let (groups, adams) = optimizers(model.as_ref(), &vars, t)?;
        let mut hooks: Vec<Box<dyn Hook>> = vec![Box::new(NanStop)];
        if t.ema_decay > 0.0 {
            hooks.push(Box::new(Ema::new(t.ema_decay, &vars)?));
        }
        let precision = gm_core::precision::parse(&t.precision).map_err(|e| anyhow!(e))?;
        if precision == Some(DType::F16) {
            hooks.push(Box::new(LossScaler::new(t.loss_scale)));
        }
        if let Some(mut comm) = comm {
            // Every rank starts from rank 0's parameters.
            for (_, v) in &vars {
                v.set(&comm.broadcast(v.as_tensor(), 0)?)?;
            }
            hooks.insert(0, Box::new(DataParallel::new(comm)));
        }
        let mut trainer = Self {
            cfg: cfg.clone(),
            cfg_text: cfg.to_toml(),
            batcher: Batcher::new(t.seed, data.len(), t.batch_size * t.accumulate * world)?,
            rank,
            world,
            data_dir,
            last_checkpoint: checkpoint::complete_steps(&run)
                .last()
                .map(|s| checkpoint::weights_path(&run, *s)),
            run,
            device: opts.device.clone(),
            model,
            varmap,
            vars,
            groups,
            adams,
            rng: GmRng::new(t.seed),
            data,
            hooks,
            start: 0,
            best: f64::INFINITY,
            progress: opts.progress,
            precision,
            tensorboard: RefCell::new(None),
        };
        if opts.resume {
            trainer.resume()?;
        }
        if !lead {
            return Ok(trainer);
        }
        atomic_write(
            &trainer.run.join("config.toml"),
            trainer.cfg_text.as_bytes(),
        )?;
        let n_params: usize = trainer.vars.iter().map(|(_, v)| v.elem_count()).sum();
        let frozen = match cfg.model.embeds() {
            Some(e) => {
                let n: usize = trainer
                    .vars
                    .iter()
                    .filter(|(name, _)| name.starts_with(e.prefix))
                    .map(|(_, v)| v.elem_count())
                    .sum();
                format!(" ({n} of them the frozen '{}' model)", e.config.kind())
            }
            None => String::new(),
        };
        let micro = match t.accumulate {
            1 => String::new(),
            k => format!(" ({k} accumulated micro-batches of {})", t.batch_size),
        };
        let ranks = match world {
            1 => String::new(),
            n => format!(" over {n} ranks ({})", trainer.hooks[0].name()),
        };
        eprintln!(
            "gm: model {} with {n_params} parameters{frozen}; {} steps of batch {}{micro}{ranks}",
            cfg.model.kind(),
            t.steps,
            t.batch_size * t.accumulate * world
        );
        Ok(trainer)
    }

    /// Adds a hook after gm's own (the NaN stop, the EMA).
    pub fn add_hook(&mut self, hook: Box<dyn Hook>) {
        self.hooks.push(hook);
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The run's parameters, by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// This trainer's data-parallel rank and the number of ranks (0 and 1 without).
    pub fn rank(&self) -> (usize, usize) {
        (self.rank, self.world)
    }

    /// Continues from the run directory's latest complete checkpoint: weights, optimiser
    /// moments, the random generator, the best metric and every hook's state.
    pub fn resume(&mut self) -> Result<()> {
        let r = checkpoint::open_resume(&self.run, &self.cfg, &self.device)?;
        set_vars(&self.varmap, &r.weights.tensors, "", &r.weights_path, true)?;
        let saved = SavedState {
            weights: &r.weights.tensors,
            state: &r.state.tensors,
            state_meta: &r.state.meta,
            file: &r.state_path,
        };
        for h in &mut self.hooks {
            h.load(&saved, &self.vars)?;
        }
        if self.hooks.iter().any(|h| h.eval_weights().is_some()) {
            set_vars(
                &self.varmap,
                &r.state.tensors,
                "param.",
                &r.state_path,
                false,
            )?;
        }
        r.restore_optimizers(&mut self.adams)?;
        self.rng = r.rng()?;
        self.best = r.best();
        self.start = r.step;
        if self.rank == 0 {
            truncate_metrics(&self.run.join("metrics.jsonl"), r.step)?;
            eprintln!("gm: resuming {} at step {}", self.run.display(), r.step);
        }
        Ok(())
    }

    /// The context of [`Hook::after_step`]: every parameter.
    fn step_end_ctx(&self, done: usize, lr: f64) -> StepContext<'_> {
        StepContext {
            step: done,
            group: 0,
            vars: &self.vars,
            lr,
            last_checkpoint: self.last_checkpoint.as_deref(),
        }
    }

    /// One training step (0-based `step`): a batch, each optimiser group's loss (repeated as its
    /// phase asks), backward, the hooks, clipping and the update.
    pub fn step(&mut self, step: usize) -> Result<StepReport> {
        // The hooks are taken out for the step so that they can be called mutably with a
        // context that borrows the trainer.
        let mut hooks = std::mem::take(&mut self.hooks);
        let r = self.step_with(&mut hooks, step);
        self.hooks = hooks;
        r
    }

    fn step_with(&mut self, hooks: &mut [Box<dyn Hook>], step: usize) -> Result<StepReport> {
        let done = step + 1;
        let t = &self.cfg.train;
        let lr = lr_at(t, step);
        // One batch of `accumulate × batch_size` indices, cut into the micro-batches; with
        // per-sample draws each micro-batch has its generator, keyed by its samples' indices.
        // With several ranks this rank takes its contiguous part of the global batch.
        let idx = self.batcher.indices(step);
        let share = t.batch_size * t.accumulate;
        let first = (self.rank * share).min(idx.len());
        let mine = &idx[first..(first + share).min(idx.len())];
        let per_sample = t.rng == "per-sample";
        let mut keyed: Vec<GmRng> = Vec::new();
        let mut batches = Vec::new();
        for (m, part) in mine.chunks(t.batch_size).enumerate() {
            let rng = match per_sample {
                true => {
                    let offset = (first + m * t.batch_size) as u64;
                    keyed.push(GmRng::per_sample(t.seed, step as u64, offset, part.len()));
                    keyed.last_mut().expect("just pushed")
                }
                false => &mut self.rng,
            };
            batches.push(self.data.batch(part, rng, &self.device)?);
        }
        let _autocast = gm_core::precision::Autocast::enter(self.precision);
        let _recompute = grad_checkpoint::Enabled::enter(self.cfg.train.gradient_checkpointing);
        let mut report = StepReport {
            loss: 0.0,
            parts: Vec::new(),
            grad_norm: 0.0,
            lr,
        };
        if let Some(update) = self.model.closed_form_update(&batches[0])? {
            if batches.len() > 1 || self.world > 1 {
                bail!("a '{}' model sets its parameters from each batch in closed form (EM): train.accumulate must be 1, on one rank", self.cfg.model.kind());
            }
            let rng = keyed.first_mut().unwrap_or(&mut self.rng);
            let ctx = StepContext {
                step: done,
                group: 0,
                vars: &self.vars,
                lr,
                last_checkpoint: self.last_checkpoint.as_deref(),
            };
            // The loss at the parameters the update starts from, for the log and the hooks.
            let values = read_loss(&self.model.loss(&batches[0], rng)?)?;
            for h in hooks.iter_mut() {
                h.after_loss(
                    &ctx,
                    &LossValues {
                        total: values.0,
                        parts: &values.1,
                    },
                )?;
            }
            mean_loss(&[values], &mut report);
            set_data_init(&self.varmap, update)
                .with_context(|| format!("the closed-form update of step {done}"))?;
            let ctx = self.step_end_ctx(done, lr);
            for h in hooks.iter_mut() {
                h.after_step(&ctx)?;
            }
            return Ok(report);
        }
        for (pi, (phase, pvars)) in self.groups.iter().enumerate() {
            for _ in 0..phase.repeats {
                let ctx = StepContext {
                    step: done,
                    group: pi,
                    vars: pvars,
                    lr,
                    last_checkpoint: self.last_checkpoint.as_deref(),
                };
                let mut grads = None;
                let mut losses = Vec::with_capacity(batches.len());
                for (m, batch) in batches.iter().enumerate() {
                    let rng = match keyed.get_mut(m) {
                        Some(r) => r,
                        None => &mut self.rng,
                    };
                    let loss = group_loss(self.model.as_ref(), phase, pi, batch, rng)?;
                    let values = read_loss(&loss)?;
                    let mut total = loss.total;
                    for h in hooks.iter_mut() {
                        h.after_loss(
                            &ctx,
                            &LossValues {
                                total: values.0,
                                parts: &values.1,
                            },
                        )?;
                        total = h.scale_loss(&ctx, total)?;
                    }
                    let g = grad_checkpoint::backward(&total)?;
                    grads = Some(match grads {
                        None => g,
                        Some(acc) => add_grads(acc, g, pvars)?,
                    });
                    losses.push(values);
                }
                let mut grads = grads.expect("at least one micro-batch");
                if losses.len() > 1 {
                    scale_grads(&mut grads, pvars, 1.0 / losses.len() as f64)?;
                }
                mean_loss(&losses, &mut report);
                let mut action = GradAction::Step;
                for h in hooks.iter_mut() {
                    if h.after_backward(&ctx, &mut grads)? == GradAction::Skip {
                        action = GradAction::Skip;
                    }
                }
                if action == GradAction::Skip {
                    continue;
                }
                report.grad_norm = clip_grad_norm(&mut grads, pvars, t.grad_clip)?;
                for h in hooks.iter_mut() {
                    h.after_clip(&ctx, report.grad_norm, report.loss)?;
                }
                self.adams[pi].step(&grads, lr * phase.lr_scale)?;
            }
        }
        drop(_autocast);
        // Updates beside the gradient step (a codebook's moving averages), one per micro-batch.
        for batch in &batches {
            if let Some(update) = self.model.after_step_update(batch)? {
                if self.world > 1 {
                    bail!("a '{}' model updates state from each batch after the step (a codebook's moving averages): it trains on one rank", self.cfg.model.kind());
                }
                set_data_init(&self.varmap, update)
                    .with_context(|| format!("the after-step update of step {done}"))?;
            }
        }
        let ctx = self.step_end_ctx(done, lr);
        for h in hooks.iter_mut() {
            h.after_step(&ctx)?;
        }
        Ok(report)
    }

    /// The weights evaluation and sampling use: a hook's (the EMA's) or the live parameters.
    fn eval_weights(&self) -> Option<&[Tensor]> {
        self.hooks.iter().find_map(|h| h.eval_weights())
    }

    /// Runs `f` with the evaluation weights swapped in, and the live ones back afterwards.
    fn with_eval_weights<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let old = match self.eval_weights() {
            Some(w) => Some(swap_in(&self.vars, w)?),
            None => None,
        };
        let r = f(self);
        if let Some(old) = old {
            swap_in(&self.vars, &old)?;
        }
        r
    }

    /// The test split's metrics (`train.eval_images` of them, the evaluation weights), or
    /// `None` without a test split.
    pub fn evaluate(&self) -> Result<Option<BTreeMap<String, f64>>> {
        let opts = EvalOptions {
            iwae_k: self.cfg.eval.train_iwae_k,
            max_pairs: self.cfg.eval.max_pairs,
            full: false,
        };
        self.with_eval_weights(|me| {
            me.data
                .evaluate(me.model.as_ref(), &me.cfg, &opts, &me.device)
        })
    }

    /// Writes `samples/step-N.png` (or the density picture of a 2-D model), a mixture's
    /// components (`samples/components-step-N.png`) and the reconstructions of the first 32 test
    /// images (`samples/recon-step-N.png`).
    pub fn sample(&self, step: usize) -> Result<()> {
        let t = &self.cfg.train;
        let run = &self.run;
        let images = self.data.images();
        let toy = images.filter(|_| crate::data::toy_name(&self.cfg.data.dataset).is_some());
        let (s, components, recon) = self.with_eval_weights(|me| {
            let model = me.model.as_ref();
            let s = match (t.sample_n, toy) {
                (0, _) => Ok(None),
                (_, Some(toy)) => toy_density_plot(
                    model,
                    toy.test.as_ref().unwrap_or(&toy.train),
                    20_000,
                    &mut GmRng::new(t.seed.wrapping_add(1)),
                    &me.device,
                    &run.join(format!("samples/density-step-{step:08}.png")),
                )
                .map(|_| None),
                (n, None) => crate::eval::sample_chunked(
                    model,
                    n,
                    crate::eval::SAMPLE_CHUNK,
                    &mut GmRng::new(t.seed.wrapping_add(1)),
                ),
            };
            // Reconstructions of the first 32 test images, below the images.
            let recon = match images.and_then(|i| i.test.as_ref()) {
                Some(test) if test.len() >= 32 => {
                    let idx: Vec<usize> = (0..32).collect();
                    let mut r = GmRng::new(me.cfg.eval.seed);
                    let batch = make_batch(test, &idx, &me.cfg.data, &mut r, &me.device)?;
                    model
                        .reconstruct(&batch, &mut r)
                        .map(|rec| rec.map(|rec| (batch.x, rec)))
                }
                _ => Ok(None),
            };
            Ok((s, model.components(), recon))
        })?;
        if let Some(s) = s? {
            let path = run.join(format!("samples/step-{step:08}.png"));
            save_grid(&s, 8, &path)?;
            self.log_image(step, "samples", &path)?;
        } else if toy.is_some() && t.sample_n > 0 {
            let path = run.join(format!("samples/density-step-{step:08}.png"));
            self.log_image(step, "density", &path)?;
        }
        if let Some(c) = components? {
            let path = run.join(format!("samples/components-step-{step:08}.png"));
            save_grid(&c, 10, &path)?;
            self.log_image(step, "components", &path)?;
        }
        if let Some((x, r)) = recon? {
            let path = run.join(format!("samples/recon-step-{step:08}.png"));
            save_reconstructions(&x, &r, 8, &path)?;
            self.log_image(step, "reconstructions", &path)?;
        }
        Ok(())
    }

    /// Logs the PNG at `path` as a TensorBoard image, when the run writes event files.
    fn log_image(&self, step: usize, tag: &str, path: &Path) -> Result<()> {
        let mut tb = self.tensorboard.borrow_mut();
        let Some(tb) = tb.as_mut() else {
            return Ok(());
        };
        let png = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let img = image::load_from_memory(&png)
            .with_context(|| format!("cannot decode {}", path.display()))?;
        let channels = img.color().channel_count() as u32;
        tb.summary(
            step,
            &[(
                tag.to_string(),
                TbValue::Png {
                    png: &png,
                    height: img.height(),
                    width: img.width(),
                    channels,
                },
            )],
        )
    }

    /// Writes the checkpoint of `step` (weights, optimiser state, the generator, hooks' state)
    /// and returns the weights' path and bytes.
    pub fn save(&self, step: usize) -> Result<(PathBuf, Vec<u8>)> {
        let mut extra_tensors = HashMap::new();
        let mut extra_meta = HashMap::new();
        for h in &self.hooks {
            h.save(&mut extra_tensors, &mut extra_meta)?;
        }
        if let Some(d) = &self.data_dir {
            extra_meta.insert(
                checkpoint::DATA_DIR_KEY.to_string(),
                d.display().to_string(),
            );
        }
        checkpoint::write_run_checkpoint(checkpoint::RunCheckpoint {
            run: &self.run,
            step,
            cfg: &self.cfg,
            cfg_text: &self.cfg_text,
            data_source: self.data.source(),
            weights_meta: self.data.checkpoint_meta()?,
            vars: &self.vars,
            eval_weights: self.eval_weights(),
            adams: &self.adams,
            rng: &self.rng,
            best: self.best,
            extra_tensors,
            extra_meta,
        })
    }

    /// `loss_curve.png`: the logged training loss of the whole run (`metrics.jsonl`, so a
    /// resumed run's curve starts at step 1; this process's per-step losses when nothing was
    /// logged) and, when it is on the same scale, the test split's primary metric.
    fn plot_losses(&self, losses: &[(usize, f64)]) -> Result<()> {
        let metric = self.model.primary_metric();
        let (mut train, mut test) = (Vec::new(), Vec::new());
        if let Ok(text) = std::fs::read_to_string(self.run.join("metrics.jsonl")) {
            for l in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                    continue;
                };
                let Some(step) = v["step"].as_f64() else {
                    continue;
                };
                match v["split"].as_str() {
                    Some("test") => test.extend(v[metric].as_f64().map(|m| (step, m))),
                    _ => train.extend(v["loss"].as_f64().map(|m| (step, m))),
                }
            }
        }
        if train.len() < 2 {
            train = losses.iter().map(|&(s, l)| (s as f64, l)).collect();
        }
        if train.len() < 2 {
            return Ok(());
        }
        // The test metric shares the axis only when it lies within the training loss's span
        // widened by that span on each side (another quantity would flatten the curve).
        let (lo, hi) = train
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
                (a.0.min(p.1), a.1.max(p.1))
            });
        let span = (hi - lo).max(1e-12);
        let same_scale =
            !test.is_empty() && test.iter().all(|p| p.1 >= lo - span && p.1 <= hi + span);
        let test_label = format!("test {metric}");
        let mut series = vec![Series {
            label: "train loss",
            points: &train,
            color: [31, 119, 180],
        }];
        if same_scale {
            series.push(Series {
                label: &test_label,
                points: &test,
                color: [214, 39, 40],
            });
        }
        let toy = crate::data::toy_name(&self.cfg.data.dataset).is_some();
        let units = self.model.loss_units();
        let units = if toy {
            units.replace("per image", "per point")
        } else {
            units.to_string()
        };
        save_curve(
            &series,
            &format!("{} training loss", self.model.kind()),
            &units,
            &self.run.join("loss_curve.png"),
        )
    }

    /// Evaluates, and keeps `best.safetensors` when the primary metric improved.
    fn evaluate_and_keep_best(
        &mut self,
        done: usize,
        log: &mut RunLog,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        let Some(m) = self.evaluate()? else {
            return Ok(None);
        };
        log.eval(done, &m, &self.tensorboard)?;
        if let Some(&p) = m.get(self.model.primary_metric()) {
            if p < self.best {
                self.best = p;
                let (wp, bytes) = self.save(done)?;
                // Atomically, like every checkpoint file: a plain copy killed half-way would
                // leave a torn best.safetensors.
                atomic_write(
                    &checkpoint::checkpoint_dir(&self.run).join("best.safetensors"),
                    &bytes,
                )?;
                self.last_checkpoint = Some(wp);
            }
        }
        Ok(Some(m))
    }

    /// Runs the remaining steps with evaluation, checkpoints and samples on their schedules,
    /// then draws the loss curve.
    pub fn run(mut self) -> Result<TrainSummary> {
        let steps = self.cfg.train.steps;
        let lead = self.rank == 0;
        let mut log = RunLog::new(&self.run, self.progress && lead, self.start, steps, lead);
        if self.cfg.train.tensorboard && lead {
            let resumed = (self.start > 0).then_some(self.start + 1);
            let w = EventWriter::create(&self.run, resumed)?;
            eprintln!("gm: TensorBoard events in {}", w.path().display());
            *self.tensorboard.borrow_mut() = Some(w);
        }
        let mut losses = Vec::new();
        let mut last_eval = None;
        let mut step_traffic = gm_core::traffic::Traffic::default();
        for step in self.start..steps {
            let done = step + 1;
            let traffic0 = gm_core::traffic::snapshot();
            if step == self.start {
                gm_core::precision::reset_counts();
                grad_checkpoint::reset_recomputed();
            }
            let r = self.step(step)?;
            if step == self.start && self.precision.is_some() && lead {
                eprintln!(
                    "gm: {} mixed precision, one step's ops: {}",
                    self.cfg.train.precision,
                    precision_report()
                );
            }
            if step == self.start && self.cfg.train.gradient_checkpointing && lead {
                eprintln!(
                    "gm: gradient checkpointing: {} blocks recomputed in one step's backward",
                    grad_checkpoint::recomputed()
                );
            }
            step_traffic = step_traffic.plus(&gm_core::traffic::snapshot().since(&traffic0));
            losses.push((done, r.loss));
            log.step(done, &r, &self.cfg.train, &self.hooks, &self.tensorboard)?;
            let t = &self.cfg.train;
            let eval_due = (t.eval_every > 0 && done % t.eval_every == 0) || done == steps;
            let ckpt_due =
                (t.checkpoint_every > 0 && done % t.checkpoint_every == 0) || done == steps;
            let sample_due = (t.sample_every > 0 && done % t.sample_every == 0) || done == steps;
            let wp = checkpoint::weights_path(&self.run, done);
            if !lead {
                // Rank 0 evaluates, samples and writes; this rank goes on to the next step's
                // all-reduce, where it waits for rank 0.
                if ckpt_due {
                    self.last_checkpoint = Some(wp);
                }
                continue;
            }
            if eval_due {
                if let Some(m) = self.evaluate_and_keep_best(done, &mut log)? {
                    last_eval = Some(m);
                }
            }
            if ckpt_due && self.last_checkpoint.as_ref() != Some(&wp) {
                self.last_checkpoint = Some(self.save(done)?.0);
            }
            if sample_due {
                self.sample(done)?;
            }
        }
        log.finish();
        self.tensorboard.borrow_mut().take();
        if lead {
            self.plot_losses(&losses)?;
        }
        let checkpoint = self
            .last_checkpoint
            .ok_or_else(|| anyhow!("no checkpoint was written"))?;
        Ok(TrainSummary {
            steps,
            losses,
            last_eval,
            checkpoint,
            data_source: self.data.source().to_string(),
            step_traffic,
        })
    }
}

/// The run's progress bar and `metrics.jsonl`.
struct RunLog {
    path: PathBuf,
    pb: indicatif::ProgressBar,
    clock: Instant,
    /// The step and time of the last logged line (for steps per second).
    last: (usize, Instant),
    /// Whether this rank writes the log (rank 0).
    write: bool,
}

impl RunLog {
    fn new(run: &Path, progress: bool, start: usize, steps: usize, write: bool) -> Self {
        let pb = if progress {
            indicatif::ProgressBar::new(steps as u64)
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
        Self {
            path: run.join("metrics.jsonl"),
            pb,
            clock: Instant::now(),
            last: (start, Instant::now()),
            write,
        }
    }

    fn step(
        &mut self,
        done: usize,
        r: &StepReport,
        t: &crate::config::TrainConfig,
        hooks: &[Box<dyn Hook>],
        tb: &RefCell<Option<EventWriter>>,
    ) -> Result<()> {
        self.pb.inc(1);
        let part_msg: Vec<String> = r.parts.iter().map(|(n, v)| format!("{n} {v:.2}")).collect();
        self.pb
            .set_message(format!("loss {:.3} ({})", r.loss, part_msg.join(", ")));
        if self.write && t.log_every > 0 && (done % t.log_every == 0 || done == t.steps) {
            let mut rec = serde_json::json!({"step": done, "loss": r.loss, "lr": r.lr,
                "grad_norm": r.grad_norm, "elapsed_s": self.clock.elapsed().as_secs_f64()});
            for (n, v) in &r.parts {
                rec[*n] = serde_json::json!(v);
            }
            for h in hooks {
                h.log(&mut rec);
            }
            jsonl(&self.path, &rec)?;
            if let Some(tb) = tb.borrow_mut().as_mut() {
                // Every number of the log line, and the speed since the last one.
                let mut v: Vec<(String, f64)> = rec
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| *k != "step" && *k != "elapsed_s")
                    .filter_map(|(k, x)| Some((format!("train/{k}"), x.as_f64()?)))
                    .collect();
                let dt = self.last.1.elapsed().as_secs_f64();
                if done > self.last.0 && dt > 0.0 {
                    v.push(("train/it_per_s".into(), (done - self.last.0) as f64 / dt));
                }
                tb.scalars(done, &v)?;
            }
            self.last = (done, Instant::now());
        }
        Ok(())
    }

    fn eval(
        &mut self,
        done: usize,
        m: &BTreeMap<String, f64>,
        tb: &RefCell<Option<EventWriter>>,
    ) -> Result<()> {
        let mut rec = serde_json::json!({"step": done, "split": "test"});
        for (k, v) in m {
            rec[k] = serde_json::json!(v);
        }
        jsonl(&self.path, &rec)?;
        if let Some(tb) = tb.borrow_mut().as_mut() {
            let v: Vec<(String, f64)> = m.iter().map(|(k, x)| (format!("test/{k}"), *x)).collect();
            tb.scalars(done, &v)?;
        }
        let shown: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
        self.pb
            .println(format!("step {done}: test {}", shown.join(" ")));
        Ok(())
    }

    fn finish(&self) {
        self.pb.finish_and_clear();
    }
}

/// `--init-from`: every variable from another run's weights (same kind, same shapes).
fn init_from(cfg: &RunConfig, vm: &VarMap, src: &Path, device: &Device) -> Result<()> {
    let path = checkpoint::resolve(src)?;
    let w = read_safetensors(&path, device)?;
    if let Some(kind) = w.meta.get("gm.kind") {
        if let Some(e) = cfg.model.embeds().filter(|e| e.config.kind() == kind) {
            return init_embedded(vm, &e, &w, &path);
        }
        if kind != cfg.model.kind() {
            bail!(
                "--init-from {}: a '{kind}' checkpoint cannot start a '{}' model",
                path.display(),
                cfg.model.kind()
            );
        }
    }
    set_vars(vm, &w.tensors, "", &path, true)?;
    eprintln!("gm: weights from {}", path.display());
    Ok(())
}

/// `--init-from` a run of the family a model embeds: that model's variables, after checking its
/// config against the embedded one (sampling temperature aside).
fn init_embedded(
    vm: &VarMap,
    e: &gm_models::Embedded,
    w: &checkpoint::Loaded,
    path: &Path,
) -> Result<()> {
    let text = w
        .meta
        .get("gm.config")
        .ok_or_else(|| anyhow!("{}: no gm.config metadata", path.display()))?;
    let src = RunConfig::from_toml_str(text, &[], &format!("{} (gm.config)", path.display()))?;
    let table = |m: &gm_models::ModelConfig| -> Result<toml::Table> {
        let mut t = toml::Table::try_from(m).context("model config to TOML")?;
        // Sampling only: the density is the same at any temperature.
        t.remove("temperature");
        Ok(t)
    };
    let (want, have) = (table(&e.config)?, table(&src.model)?);
    let mut keys: Vec<&String> = want.keys().chain(have.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if want.get(k) != have.get(k) {
            let show =
                |v: Option<&toml::Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
            bail!(
                "--init-from {}: {}.{k} = {} here, but that run's model has {k} = {}",
                path.display(),
                e.key,
                show(want.get(k)),
                show(have.get(k))
            );
        }
    }
    let n = checkpoint::set_vars_under(vm, &w.tensors, e.prefix, path)?;
    eprintln!(
        "gm: {n} tensors of the '{}' model under {} from {}",
        e.config.kind(),
        e.prefix,
        path.display()
    );
    Ok(())
}

/// A loss's total and parts, read back to the host.
type LossRead = (f64, Vec<(&'static str, f64)>);

fn read_loss(loss: &gm_models::Loss) -> Result<LossRead> {
    let total = gm_core::traffic::read_f64(&loss.total)?;
    let mut parts: Vec<(&'static str, f64)> = Vec::with_capacity(loss.parts.len());
    for (name, p) in &loss.parts {
        let v = gm_core::traffic::read_f64(p)?;
        match parts.iter_mut().find(|q| q.0 == *name) {
            Some(q) => q.1 = v,
            None => parts.push((name, v)),
        }
    }
    Ok((total, parts))
}

/// The step's loss and parts: the micro-batches' mean (the one loss without accumulation),
/// each part in the order it first appeared over the step.
fn mean_loss(losses: &[LossRead], report: &mut StepReport) {
    let n = losses.len() as f64;
    report.loss = losses.iter().map(|l| l.0).sum::<f64>() / n;
    for (name, _) in &losses[0].1 {
        let v = losses
            .iter()
            .filter_map(|l| l.1.iter().find(|q| q.0 == *name))
            .map(|q| q.1)
            .sum::<f64>()
            / n;
        match report.parts.iter_mut().find(|q| q.0 == *name) {
            Some(q) => q.1 = v,
            None => report.parts.push((name, v)),
        }
    }
}

/// `acc + g` for every parameter in `vars` (a parameter with a gradient in either).
fn add_grads(
    mut acc: candle_core::backprop::GradStore,
    g: candle_core::backprop::GradStore,
    vars: &[(String, Var)],
) -> Result<candle_core::backprop::GradStore> {
    for (_, v) in vars {
        let sum = match (acc.get(v.as_tensor()), g.get(v.as_tensor())) {
            (Some(a), Some(b)) => (a + b)?,
            (None, Some(b)) => b.clone(),
            _ => continue,
        };
        acc.insert(v.as_tensor(), sum);
    }
    Ok(acc)
}

fn scale_grads(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[(String, Var)],
    s: f64,
) -> Result<()> {
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let scaled = (g * s)?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// Refuses `train.gradient_checkpointing` for a model without checkpointed blocks.
pub(crate) fn check_gradient_checkpointing(cfg: &RunConfig, model: &dyn Model) -> Result<()> {
    if cfg.train.gradient_checkpointing && !model.gradient_checkpointing() {
        bail!(
            "train.gradient_checkpointing: a '{}' model has no blocks to recompute (the UNet models ddpm, flow-matching and score on images, the PixelCNNs and the VQ-VAE's prior have)",
            cfg.model.kind()
        );
    }
    Ok(())
}

/// Which ops ran in which dtype under autocast on this thread, e.g. `matmul bf16 ×12, conv2d
/// f32 ×8 (gm's CPU convolution kernels take f32)`.
pub fn precision_report() -> String {
    let counts = gm_core::precision::counts();
    if counts.is_empty() {
        return "none of the autocast ops (matmul, conv2d, conv_transpose2d) ran".into();
    }
    let mut parts: Vec<String> = counts
        .iter()
        .map(|((op, d), n)| format!("{op} {d} ×{n}"))
        .collect();
    if counts
        .keys()
        .any(|(op, d)| op.starts_with("conv") && *d == "f32")
    {
        parts.push("(convolutions stay f32 on gm's CPU kernels)".into());
    }
    parts.join(", ")
}

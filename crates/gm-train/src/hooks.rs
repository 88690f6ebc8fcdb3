//! The points of a training step where behaviour plugs in, and the hooks gm ships.
//!
//! [`crate::trainer::Trainer`] runs every step the same way, and calls each [`Hook`] in order at
//! fixed points:
//!
//! | point | when | gm's users |
//! | --- | --- | --- |
//! | [`Hook::after_loss`] | each loss, before its backward | [`NanStop`] |
//! | [`Hook::scale_loss`] | the tensor backward starts from | loss scaling (f16) |
//! | [`Hook::after_backward`] | gradients of a whole step (all micro-batches), before clipping | loss scaling's unscale and overflow skip, data-parallel all-reduce |
//! | [`Hook::after_clip`] | the gradient norm, before the optimizer | [`NanStop`] |
//! | [`Hook::after_step`] | after every optimizer of the step has run | [`Ema`] |
//! | [`Hook::eval_weights`] | evaluation, sampling and the weights file | [`Ema`] |
//! | [`Hook::save`] / [`Hook::load`] | checkpoint state, so resume is exact | [`Ema`], loss scaling |
//!
//! Research code adds its own through [`crate::trainer::Trainer::add_hook`].

use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// What a hook is told about the step being run.
pub struct StepContext<'a> {
    /// Steps completed once this one is done (1-based).
    pub step: usize,
    /// The optimiser group (a GAN phase) this call is about; 0 for single-group models.
    pub group: usize,
    /// The group's parameters (all parameters in [`Hook::after_step`]).
    pub vars: &'a [(String, Var)],
    pub lr: f64,
    /// The run's latest complete checkpoint, for messages.
    pub last_checkpoint: Option<&'a Path>,
}

/// A loss as the step read it back: the total and its named parts, on the host.
pub struct LossValues<'a> {
    pub total: f64,
    pub parts: &'a [(&'static str, f64)],
}

/// What to do with a step's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradAction {
    Step,
    /// Skip this group's optimizer step (an f16 overflow).
    Skip,
}

/// The checkpoint files of a run step, as a hook reads them on resume.
pub struct SavedState<'a> {
    /// The weights file's tensors (the EMA's weights where one runs).
    pub weights: &'a HashMap<String, Tensor>,
    pub state: &'a HashMap<String, Tensor>,
    pub state_meta: &'a HashMap<String, String>,
    pub file: &'a Path,
}

/// One piece of training behaviour at the points of a step (see the module's table).
/// Every method has a default that does nothing.
pub trait Hook {
    fn name(&self) -> &'static str;
    fn after_loss(&mut self, _ctx: &StepContext, _loss: &LossValues) -> Result<()> {
        Ok(())
    }
    fn scale_loss(&mut self, _ctx: &StepContext, loss: Tensor) -> Result<Tensor> {
        Ok(loss)
    }
    fn after_backward(&mut self, _ctx: &StepContext, _grads: &mut GradStore) -> Result<GradAction> {
        Ok(GradAction::Step)
    }
    fn after_clip(&mut self, _ctx: &StepContext, _grad_norm: f64, _loss: f64) -> Result<()> {
        Ok(())
    }
    fn after_step(&mut self, _ctx: &StepContext) -> Result<()> {
        Ok(())
    }
    /// Weights that evaluation, sampling and the weights file use instead of the live
    /// parameters, in the order of the run's variables.
    fn eval_weights(&self) -> Option<&[Tensor]> {
        None
    }
    /// Adds what resume needs to the checkpoint's state file.
    fn save(
        &self,
        _tensors: &mut HashMap<String, Tensor>,
        _meta: &mut HashMap<String, String>,
    ) -> Result<()> {
        Ok(())
    }
    fn load(&mut self, _saved: &SavedState, _vars: &[(String, Var)]) -> Result<()> {
        Ok(())
    }
    /// Figures for the step's log line (`metrics.jsonl`), e.g. the loss scale.
    fn log(&self, _rec: &mut serde_json::Value) {}
}

/// Stops the run at a non-finite loss or gradient norm, naming the parts and the last good
/// checkpoint (nothing is written after the bad step).
pub struct NanStop;

impl Hook for NanStop {
    fn name(&self) -> &'static str {
        "nan-stop"
    }
    fn after_loss(&mut self, ctx: &StepContext, loss: &LossValues) -> Result<()> {
        if loss.total.is_finite() {
            return Ok(());
        }
        let bad: Vec<String> = loss
            .parts
            .iter()
            .filter(|p| !p.1.is_finite())
            .map(|p| format!("'{}' = {}", p.0, p.1))
            .collect();
        bail!(
            "non-finite loss at step {}: total = {}; parts {}; training stopped, last good checkpoint: {}",
            ctx.step,
            loss.total,
            if bad.is_empty() { "all finite".into() } else { bad.join(", ") },
            keep(ctx)
        )
    }
    fn after_clip(&mut self, ctx: &StepContext, grad_norm: f64, loss: f64) -> Result<()> {
        if !grad_norm.is_finite() {
            bail!(
                "non-finite gradient norm at step {} (loss {loss}); training stopped, last good checkpoint: {}",
                ctx.step,
                keep(ctx)
            );
        }
        Ok(())
    }
}

fn keep(ctx: &StepContext) -> String {
    ctx.last_checkpoint
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "none yet".into())
}

/// An exponential moving average of the parameters (`train.ema_decay`): updated after every
/// step, used for evaluation, sampling and the weights file; the live parameters go to the
/// state file as `param.NAME`.
pub struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts from the current parameters.
    pub fn new(decay: f64, vars: &[(String, Var)]) -> Result<Self> {
        Ok(Self {
            decay,
            shadow: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    }
}

impl Hook for Ema {
    fn name(&self) -> &'static str {
        "ema"
    }
    fn after_step(&mut self, ctx: &StepContext) -> Result<()> {
        for (i, (_, v)) in ctx.vars.iter().enumerate() {
            // Detached: otherwise every shadow keeps the previous one (and the parameter
            // snapshot) alive through candle's graph, and memory grows with every step.
            self.shadow[i] =
                ((&self.shadow[i] * self.decay)? + (v.as_tensor() * (1.0 - self.decay))?)?.detach();
        }
        Ok(())
    }
    fn eval_weights(&self) -> Option<&[Tensor]> {
        Some(&self.shadow)
    }
    fn load(&mut self, saved: &SavedState, vars: &[(String, Var)]) -> Result<()> {
        for (i, (name, v)) in vars.iter().enumerate() {
            let Some(t) = saved.weights.get(name) else {
                bail!("{}: missing tensor '{name}'", saved.file.display());
            };
            self.shadow[i] = t.to_dtype(v.dtype())?.to_device(v.device())?;
        }
        Ok(())
    }
}

/// Dynamic loss scaling for `f16` training (`train.precision = "f16"`), as PyTorch's
/// `GradScaler`: the loss is multiplied by the scale before backward so that small gradients
/// survive f16; the gradients are divided by it before clipping and the update. A step whose
/// gradients overflowed (inf or NaN) is skipped and the scale halved; after
/// [`LossScaler::GROWTH_INTERVAL`] good steps in a row it doubles. The scale, the good-step
/// count and the skipped steps are saved with each checkpoint, so resume is exact.
pub struct LossScaler {
    scale: f64,
    good: usize,
    skipped: usize,
}

impl LossScaler {
    pub const GROWTH_INTERVAL: usize = 2000;
    /// Below this the gradients are non-finite at every scale f16 can use: the run stops.
    pub const MIN_SCALE: f64 = 1.0 / 16_777_216.0;

    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            good: 0,
            skipped: 0,
        }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped for overflow so far in the run.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

impl Hook for LossScaler {
    fn name(&self) -> &'static str {
        "loss-scale"
    }
    fn scale_loss(&mut self, _ctx: &StepContext, loss: Tensor) -> Result<Tensor> {
        Ok((loss * self.scale)?)
    }
    fn after_backward(&mut self, ctx: &StepContext, grads: &mut GradStore) -> Result<GradAction> {
        let inv = 1.0 / self.scale;
        let mut sq = Vec::new();
        for (_, v) in ctx.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let u = (g * inv)?;
                sq.push(u.sqr()?.sum_all()?);
                grads.insert(v.as_tensor(), u);
            }
        }
        if sq.is_empty() {
            return Ok(GradAction::Step);
        }
        let total = gm_core::traffic::read_f64(&Tensor::stack(&sq, 0)?.sum_all()?)?;
        if !total.is_finite() {
            self.scale *= 0.5;
            self.good = 0;
            self.skipped += 1;
            if self.scale < Self::MIN_SCALE {
                bail!(
                    "step {}: the f16 gradients overflow at every loss scale down to {:e}; training stopped, last good checkpoint: {}",
                    ctx.step,
                    Self::MIN_SCALE,
                    keep(ctx)
                );
            }
            return Ok(GradAction::Skip);
        }
        self.good += 1;
        if self.good == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good = 0;
        }
        Ok(GradAction::Step)
    }
    fn save(
        &self,
        _tensors: &mut HashMap<String, Tensor>,
        meta: &mut HashMap<String, String>,
    ) -> Result<()> {
        meta.insert("gm.loss_scale".into(), self.scale.to_string());
        meta.insert("gm.loss_scale_good".into(), self.good.to_string());
        meta.insert("gm.loss_scale_skipped".into(), self.skipped.to_string());
        Ok(())
    }
    fn load(&mut self, saved: &SavedState, _vars: &[(String, Var)]) -> Result<()> {
        let get = |k: &str| saved.state_meta.get(k);
        // A run that did not train in f16 before has no scale yet: keep the initial one.
        let Some(scale) = get("gm.loss_scale") else {
            return Ok(());
        };
        let bad = |k: &str| anyhow::anyhow!("{}: bad {k} metadata", saved.file.display());
        self.scale = scale.parse().map_err(|_| bad("gm.loss_scale"))?;
        self.good = get("gm.loss_scale_good")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("gm.loss_scale_good"))?;
        self.skipped = get("gm.loss_scale_skipped")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("gm.loss_scale_skipped"))?;
        Ok(())
    }
    fn log(&self, rec: &mut serde_json::Value) {
        rec["loss_scale"] = serde_json::json!(self.scale);
        rec["skipped_steps"] = serde_json::json!(self.skipped);
    }
}

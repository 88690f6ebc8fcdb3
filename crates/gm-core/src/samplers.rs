//! Samplers of the reverse diffusion process behind one stateful interface in the shape of
//! diffusers' schedulers: the network is evaluated at `timesteps()[i]` on
//! `scale_model_input(x, i)`, and `step(output, i, x)` consumes that output. One call of the
//! network per `step`, so `timesteps().len()` is the number of function evaluations (NFE).
//!
//! - `ddpm`: ancestral sampling (Ho et al.), respaced; `ddim`: DDIM with `η` (Song et al.);
//! - `dpmpp-2m`: multistep DPM-Solver++ of order 2 in data prediction (Lu et al., 2022), first
//!   order at the first and the last step;
//! - `unipc`: UniPC, the `B(h) = e^h − 1` ("bh2") predictor–corrector of order 2 in data
//!   prediction (Zhao et al., 2023);
//! - `euler-karras`, `heun-karras`: the probability-flow ODE in `σ = √((1−ᾱ)/ᾱ)` on Karras et
//!   al.'s ladder (ρ = 7, `σ_min`/`σ_max` from the spaced schedule), Euler or Heun's second order
//!   (two calls per step, Euler into `σ = 0`).
//!
//! Each step equals diffusers' scheduler of the same name with its default options (tested
//! against diffusers itself: `tests/diffusers_schedulers.rs`), with two deliberate differences:
//! `clip_sample` clips `x̂_0` for every kind (diffusers' DPM-Solver++, UniPC and Euler have no
//! static clipping), and DDIM and DDPM step to the next listed timestep, where diffusers' DDIM
//! steps to `t − T/n` (the same list for "leading" and "trailing" spacing, not for "linspace").
//! With clipping, gm's DDIM re-derives `ε̂` from the clipped `x̂_0` (diffusers'
//! `use_clipped_model_output=True`).
//!
//! Times are on the training scale `0..T` (0-based, `t = 0` the first noising step); the Karras
//! ladders visit fractional times, which the network's sinusoidal embedding takes as they are.

use crate::diffusion::{split_prediction, NoiseSchedule, Prediction};
use crate::rng::GmRng;
use candle_core::{bail, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Sampler settings: which sampler, how many steps on which timestep spacing, the DDIM `η`,
/// clipping, and classifier-free guidance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    pub kind: SamplerKind,
    /// Denoising steps (more than `T` run each of the `T` once). NFE = `steps`, except
    /// `heun-karras`: `2·steps − 1`.
    pub steps: usize,
    /// How the steps are laid out over `0..T`, as diffusers names it.
    #[serde(skip_serializing_if = "Spacing::is_linspace")]
    pub spacing: Spacing,
    /// Added to every timestep of the "leading" spacing (diffusers' `steps_offset`).
    #[serde(skip_serializing_if = "is_zero")]
    pub steps_offset: usize,
    /// DDIM's `η`: 0 is deterministic, 1 is DDPM-like ancestral noise.
    pub eta: f64,
    /// Clip `x̂_0` to `[-1, 1]` before each step.
    pub clip_sample: bool,
    /// The ancestral variance: `false` = posterior `β̃_t` ("fixed small"), `true` = `β_t`.
    pub large_variance: bool,
    /// Classifier-free guidance scale `w`: output = `uncond + w·(cond − uncond)`; 1 = no guidance.
    pub guidance_scale: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddim,
            steps: 50,
            spacing: Spacing::Linspace,
            steps_offset: 0,
            eta: 0.0,
            clip_sample: true,
            large_variance: false,
            guidance_scale: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Ancestral sampling from `p(x_{t-1} | x_t)` (Ho et al.), respaced when `steps < T`.
    Ddpm,
    /// DDIM (Song et al.) with `η`.
    Ddim,
    /// Multistep DPM-Solver++(2M).
    #[serde(rename = "dpmpp-2m")]
    Dpmpp2m,
    /// UniPC (bh2, order 2).
    Unipc,
    /// Euler on the Karras σ ladder.
    EulerKarras,
    /// Heun on the Karras σ ladder.
    HeunKarras,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 6] = [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::Dpmpp2m,
        SamplerKind::Unipc,
        SamplerKind::EulerKarras,
        SamplerKind::HeunKarras,
    ];

    /// The name in configs.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::Dpmpp2m => "dpmpp-2m",
            SamplerKind::Unipc => "unipc",
            SamplerKind::EulerKarras => "euler-karras",
            SamplerKind::HeunKarras => "heun-karras",
        }
    }

    /// Network evaluations of a run of `steps` steps.
    pub fn nfe(self, steps: usize) -> usize {
        match self {
            SamplerKind::HeunKarras => 2 * steps - 1,
            _ => steps,
        }
    }
}

/// Timestep spacing, as in diffusers (Lin et al., 2023, table 2).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Spacing {
    /// Evenly from `T − 1` down to 0, rounded (gm's list; diffusers' default for the
    /// multistep and Karras samplers).
    #[default]
    Linspace,
    /// Multiples of `T / n` from 0, plus `steps_offset` (diffusers' default for DDIM and DDPM).
    Leading,
    /// `T/n − 1, 2T/n − 1, …, T − 1`: always includes the last step.
    Trailing,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Spacing {
    fn is_linspace(&self) -> bool {
        *self == Spacing::Linspace
    }
}

impl SamplerConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.steps == 0 {
            return Err("sampler.steps must be > 0".into());
        }
        if self.eta.is_nan() || self.eta < 0.0 {
            return Err(format!("sampler.eta must be >= 0, got {}", self.eta));
        }
        if !self.guidance_scale.is_finite() {
            return Err("sampler.guidance_scale must be finite".into());
        }
        if self.eta > 0.0 && self.kind != SamplerKind::Ddim {
            return Err(format!(
                "sampler.eta applies to kind = \"ddim\" only (kind = \"{}\")",
                self.kind.name()
            ));
        }
        Ok(())
    }

    /// Builds the sampler for a schedule and the network's prediction type.
    pub fn build(
        &self,
        schedule: &NoiseSchedule,
        prediction: Prediction,
    ) -> Result<Box<dyn DiffusionSampler>> {
        if let Err(e) = self.validate() {
            bail!("{e}")
        }
        let t = schedule.len();
        // More steps than the schedule has run every step once (configs written before the
        // multistep samplers rely on it).
        let n = self.steps.min(t);
        Ok(match self.kind {
            SamplerKind::Ddpm | SamplerKind::Ddim => Box::new(self.discrete(schedule, prediction)?),
            SamplerKind::Dpmpp2m | SamplerKind::Unipc => {
                let ts = integer_timesteps(t, n, self.spacing, self.steps_offset, true)?;
                let all = schedule_sigmas(schedule);
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| all[t]).collect();
                sigmas.push(0.0);
                let solver = if self.kind == SamplerKind::Dpmpp2m {
                    Solver::DpmPp
                } else {
                    Solver::UniPc
                };
                Box::new(Multistep::new(
                    solver,
                    sigmas,
                    ts.iter().map(|&t| t as f64).collect(),
                    prediction,
                    self.clip_sample,
                ))
            }
            SamplerKind::EulerKarras | SamplerKind::HeunKarras => Box::new(Karras::new(
                schedule,
                n,
                self.spacing,
                self.steps_offset,
                self.kind == SamplerKind::HeunKarras,
                prediction,
                self.clip_sample,
            )?),
        })
    }
}

impl SamplerConfig {
    /// The DDPM or DDIM sampler as its concrete type (for [`Discrete::mean_std`]).
    pub fn discrete(&self, schedule: &NoiseSchedule, prediction: Prediction) -> Result<Discrete> {
        let rule = match self.kind {
            SamplerKind::Ddpm => Rule::Ddpm {
                large: self.large_variance,
            },
            SamplerKind::Ddim => Rule::Ddim { eta: self.eta },
            k => bail!("sampler kind {} is not ddpm or ddim", k.name()),
        };
        if let Err(e) = self.validate() {
            bail!("{e}")
        }
        let ts = integer_timesteps(
            schedule.len(),
            self.steps.min(schedule.len()),
            self.spacing,
            self.steps_offset,
            false,
        )?;
        Ok(Discrete::new(
            schedule.clone(),
            ts,
            prediction,
            self.clip_sample,
            rule,
        ))
    }
}

/// numpy's `linspace(start, stop, num)`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// numpy's `arange(start, stop, step)` for a negative step.
fn arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// diffusers' layout of `n` steps over `0..T`, descending and not yet rounded ("linspace" is
/// fractional). `drop_last`: diffusers' multistep lists, which lay out `n + 1` points and drop the
/// final one (the last step then goes to `σ = 0`).
fn spaced_points(t: usize, n: usize, spacing: Spacing, offset: usize, drop_last: bool) -> Vec<f64> {
    let tf = t as f64;
    let m = if drop_last { n + 1 } else { n };
    let mut v: Vec<f64> = match spacing {
        Spacing::Linspace => linspace(0.0, tf - 1.0, m).into_iter().rev().collect(),
        Spacing::Leading => {
            let ratio = t / m;
            (0..m).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        Spacing::Trailing => arange_down(tf, 0.0, -tf / n as f64)
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    };
    if drop_last && spacing != Spacing::Trailing {
        v.pop();
    }
    v
}

/// The descending integer timesteps of `n` steps over `0..T` ([`spaced_points`], rounded).
fn integer_timesteps(
    t: usize,
    n: usize,
    spacing: Spacing,
    offset: usize,
    drop_last: bool,
) -> Result<Vec<usize>> {
    let v: Vec<f64> = if spacing == Spacing::Linspace && n == 1 && !drop_last {
        vec![t as f64 - 1.0]
    } else {
        spaced_points(t, n, spacing, offset, drop_last)
            .into_iter()
            .map(f64::round_ties_even)
            .collect()
    };
    let out: Vec<usize> = v
        .into_iter()
        .filter(|&x| x >= 0.0)
        .map(|x| x as usize)
        .collect();
    if let Some(&bad) = out.iter().find(|&&x| x >= t) {
        bail!("sampler: timestep {bad} (steps_offset {offset}) is outside the schedule's 0..{t}")
    }
    let mut dedup = out.clone();
    dedup.dedup();
    if dedup.len() != out.len() || out.is_empty() {
        bail!("sampler: {n} steps give repeated timesteps on {t} ({spacing:?} spacing)")
    }
    Ok(out)
}

/// `steps` timesteps spread evenly over `0..T`, descending, starting at `T − 1` and ending at 0
/// (the "linspace" spacing).
pub fn spaced_timesteps(t: usize, steps: usize) -> Vec<usize> {
    integer_timesteps(t, steps.clamp(1, t), Spacing::Linspace, 0, false)
        .expect("linspace spacing never repeats a step")
}

/// `σ_t = √((1 − ᾱ_t)/ᾱ_t)` for every step.
pub fn schedule_sigmas(s: &NoiseSchedule) -> Vec<f64> {
    s.alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// numpy's `interp(x, arange(len(fp)), fp)`.
fn interp_index(x: f64, fp: &[f64]) -> f64 {
    if x <= 0.0 {
        return fp[0];
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    (fp[j + 1] - fp[j]) * (x - j as f64) + fp[j]
}

/// The (fractional) time of a σ, interpolating `ln σ` between steps (diffusers' `_sigma_to_t`).
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas
        .iter()
        .rposition(|&l| ls - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al.'s ladder: `n` σ from `σ_max` to `σ_min`, evenly in `σ^{1/ρ}`, ρ = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (hi + r * (lo - hi)).powf(rho))
        .collect()
}

/// A reverse-process sampler. Run it with [`sample_loop`], or by hand: start from
/// `init_noise_sigma() · z`; for each `i`, evaluate the network at `timesteps()[i]` on
/// `scale_model_input(x, i)` and pass its output to `step`.
pub trait DiffusionSampler {
    /// The network's evaluation times, one per `step` call, on the training scale `0..T`.
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the starting noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The network's input at call `i` (the Karras samplers keep `x / √ᾱ`; the network sees
    /// `x / √(σ² + 1)`).
    fn scale_model_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    /// `x` after call `i`'s network output.
    fn step(&mut self, output: &Tensor, i: usize, x: &Tensor, rng: &mut GmRng) -> Result<Tensor>;
}

/// Runs a sampler from `x_T ~ N(0, I)` to `x_0` with a denoiser `net(input, t) -> output`.
pub fn sample_loop(
    sampler: &mut dyn DiffusionSampler,
    x_t: Tensor,
    rng: &mut GmRng,
    mut net: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    let s0 = sampler.init_noise_sigma();
    let mut x = if s0 == 1.0 { x_t } else { (x_t * s0)? };
    for i in 0..sampler.timesteps().len() {
        let t = sampler.timesteps()[i];
        // Detached: a chain of steps must not keep every network's activations alive.
        let out = net(&sampler.scale_model_input(&x, i)?, t)?.detach();
        x = sampler.step(&out, i, &x, rng)?.detach();
    }
    Ok(x)
}

/// `x̂_0` from a network output on the variance-preserving `x` with `x = α·x_0 + s·ε`.
fn vp_x0(prediction: Prediction, out: &Tensor, x: &Tensor, alpha: f64, s: f64) -> Result<Tensor> {
    match prediction {
        Prediction::Epsilon => (x - (out * s)?)? / alpha,
        Prediction::Sample => Ok(out.clone()),
        Prediction::V => (x * alpha)? - (out * s)?,
    }
}

fn clip(x0: Tensor, on: bool) -> Result<Tensor> {
    if on {
        x0.clamp(-1.0, 1.0)
    } else {
        Ok(x0)
    }
}

/// DDPM and DDIM on a (respaced) list of integer timesteps.
pub struct Discrete {
    schedule: NoiseSchedule,
    steps: Vec<usize>,
    times: Vec<f64>,
    prediction: Prediction,
    clip: bool,
    rule: Rule,
}

#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// Ancestral DDPM; `large` = variance `β_t` instead of the posterior `β̃_t`.
    Ddpm { large: bool },
    /// DDIM with `η` (Song et al., eq. 12).
    Ddim { eta: f64 },
}

impl Discrete {
    pub fn new(
        schedule: NoiseSchedule,
        steps: Vec<usize>,
        prediction: Prediction,
        clip: bool,
        rule: Rule,
    ) -> Self {
        let times = steps.iter().map(|&t| t as f64).collect();
        Self {
            schedule,
            steps,
            times,
            prediction,
            clip,
            rule,
        }
    }

    /// The integer timesteps.
    pub fn steps(&self) -> &[usize] {
        &self.steps
    }

    /// The step's Gaussian: mean and standard deviation of `x` at the next listed timestep.
    pub fn mean_std(&self, output: &Tensor, i: usize, x: &Tensor) -> Result<(Tensor, f64)> {
        let t = self.steps[i];
        let ts = vec![t; x.dim(0)?];
        let (mut x0, mut eps) = split_prediction(&self.schedule, self.prediction, output, x, &ts)?;
        if self.clip {
            x0 = x0.clamp(-1.0, 1.0)?;
            // Keep ε consistent with the clipped x̂_0.
            let a = self.schedule.alphas_cumprod[t];
            eps = ((x - (&x0 * a.sqrt())?)? / (1.0 - a).sqrt())?;
        }
        let prev = self.steps.get(i + 1).copied();
        let a_t = self.schedule.alphas_cumprod[t];
        let a_p = self.schedule.alpha_bar(prev);
        let (mean, std) = match self.rule {
            Rule::Ddpm { large } => {
                let (cx0, cxt, var) = self.schedule.posterior(t, prev);
                let var = if large { 1.0 - a_t / a_p } else { var };
                (((&x0 * cx0)? + (x * cxt)?)?, var.sqrt())
            }
            Rule::Ddim { eta } => {
                let sigma = eta
                    * ((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
                        .max(0.0)
                        .sqrt();
                let dir = (1.0 - a_p - sigma * sigma).max(0.0).sqrt();
                (((&x0 * a_p.sqrt())? + (&eps * dir)?)?, sigma)
            }
        };
        Ok((mean, if prev.is_some() { std } else { 0.0 }))
    }
}

impl DiffusionSampler for Discrete {
    fn timesteps(&self) -> &[f64] {
        &self.times
    }

    fn step(&mut self, output: &Tensor, i: usize, x: &Tensor, rng: &mut GmRng) -> Result<Tensor> {
        let (mean, std) = self.mean_std(output, i, x)?;
        if std > 0.0 {
            let z = rng.randn(x.shape(), x.device())?.to_dtype(x.dtype())?;
            mean + (z * std)?
        } else {
            Ok(mean)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Solver {
    DpmPp,
    UniPc,
}

/// `(α_t, σ_t, λ_t)` of the variance-preserving process at VE noise level `σ`:
/// `α = 1/√(σ²+1)`, `σ_t = σ·α`, `λ = ln α − ln σ_t` (`+∞` at `σ = 0`).
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * a;
    (a, s, a.ln() - s.ln())
}

/// Solves the small dense system `R ρ = b` (Gaussian elimination with partial pivoting).
fn solve(mut r: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| r[i][c].abs().total_cmp(&r[j][c].abs()))
            .unwrap_or(c);
        r.swap(c, p);
        b.swap(c, p);
        let pivot = r[c].clone();
        for i in c + 1..n {
            let f = r[i][c] / pivot[c];
            for (rij, pj) in r[i].iter_mut().zip(&pivot).skip(c) {
                *rij -= f * pj;
            }
            b[i] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|j| r[i][j] * x[j]).sum();
        x[i] = (b[i] - s) / r[i][i];
    }
    x
}

/// UniPC's `B(h)`, `h·φ₁(h)` and the matrix and right-hand side of its order-`p` system, for
/// data prediction (`hh = −h`) and the bh2 variant.
fn unipc_system(h: f64, rks: &[f64]) -> (f64, f64, Vec<Vec<f64>>, Vec<f64>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut fact = 1.0;
    let (mut r, mut b) = (vec![], vec![]);
    for k in 1..=rks.len() {
        r.push(rks.iter().map(|&x| x.powi(k as i32 - 1)).collect());
        b.push(h_phi_k * fact / b_h);
        fact *= (k + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / fact;
    }
    (b_h, h_phi_1, r, b)
}

/// The multistep solvers in data prediction: DPM-Solver++(2M) and UniPC-bh2 of order 2. Both
/// keep the last two `x̂_0`; UniPC also corrects `x` with each new output before predicting.
pub struct Multistep {
    solver: Solver,
    /// VE noise levels of the visited steps, then the final `σ = 0`.
    sigmas: Vec<f64>,
    times: Vec<f64>,
    prediction: Prediction,
    clip: bool,
    /// The last two `x̂_0`, oldest first.
    history: Vec<Tensor>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl Multistep {
    fn new(
        solver: Solver,
        sigmas: Vec<f64>,
        times: Vec<f64>,
        prediction: Prediction,
        clip: bool,
    ) -> Self {
        Self {
            solver,
            sigmas,
            times,
            prediction,
            clip,
            history: vec![],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        }
    }

    fn x0(&self, output: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (a, s, _) = alpha_sigma_lambda(self.sigmas[i]);
        clip(vp_x0(self.prediction, output, x, a, s)?, self.clip)
    }

    fn dpm_first(&self, m0: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, s_s, l_s) = alpha_sigma_lambda(self.sigmas[i]);
        let h = l_t - l_s;
        (x * (s_t / s_s))? - (m0 * (a_t * ((-h).exp() - 1.0)))?
    }

    fn dpm_second(&self, m0: &Tensor, m1: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, s_0, l_0) = alpha_sigma_lambda(self.sigmas[i]);
        let (_, _, l_1) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let (h, h0) = (l_t - l_0, l_0 - l_1);
        let r0 = h0 / h;
        let d1 = ((m0 - m1)? * (1.0 / r0))?;
        let c = a_t * ((-h).exp() - 1.0);
        ((x * (s_t / s_0))? - (m0 * c)?)? - (d1 * (0.5 * c))?
    }

    /// UniPC's predictor from step `i` to `i + 1` (history's last entry is step `i`'s).
    fn unipc_predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, s_0, l_0) = alpha_sigma_lambda(self.sigmas[i]);
        let h = l_t - l_0;
        let m0 = &self.history[self.history.len() - 1];
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let x_t = ((x * (s_t / s_0))? - (m0 * (a_t * h_phi_1))?)?;
        if order < 2 {
            return Ok(x_t);
        }
        let (_, _, l_1) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let rk = (l_1 - l_0) / h;
        let m1 = &self.history[self.history.len() - 2];
        let d1 = ((m1 - m0)? / rk)?;
        let b_h = hh.exp_m1();
        // Order 2: ρ_p = 1/2.
        x_t - (d1 * (a_t * b_h * 0.5))?
    }

    /// UniPC's corrector of `x` at step `i` with that step's `x̂_0` (history's last entry is
    /// step `i − 1`'s).
    fn unipc_correct(
        &self,
        model_t: &Tensor,
        last: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[i]);
        let (_, s_0, l_0) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let h = l_t - l_0;
        let m0 = &self.history[self.history.len() - 1];
        let mut rks = vec![];
        let mut d1s = vec![];
        for k in 1..order {
            let (_, _, l_k) = alpha_sigma_lambda(self.sigmas[i - (k + 1)]);
            let rk = (l_k - l_0) / h;
            rks.push(rk);
            let mk = &self.history[self.history.len() - (k + 1)];
            d1s.push(((mk - m0)? / rk)?);
        }
        rks.push(1.0);
        let (b_h, h_phi_1, r, b) = unipc_system(h, &rks);
        let rhos = if order == 1 { vec![0.5] } else { solve(r, b) };
        let x_t = ((last * (s_t / s_0))? - (m0 * (a_t * h_phi_1))?)?;
        let mut res = ((model_t - m0)? * rhos[rhos.len() - 1])?;
        for (d, rho) in d1s.iter().zip(&rhos) {
            res = (res + (d * *rho)?)?;
        }
        x_t - (res * (a_t * b_h))?
    }
}

impl DiffusionSampler for Multistep {
    fn timesteps(&self) -> &[f64] {
        &self.times
    }

    fn step(&mut self, output: &Tensor, i: usize, x: &Tensor, _: &mut GmRng) -> Result<Tensor> {
        let n = self.times.len();
        // Kept across steps: detached, or each would hold its network's activations alive.
        let (output, x) = (&output.detach(), &x.detach());
        let m = self.x0(output, x, i)?;
        match self.solver {
            Solver::DpmPp => {
                if self.history.len() == 2 {
                    self.history.remove(0);
                }
                self.history.push(m);
                let last_step = i == n - 1;
                let k = self.history.len();
                let out = if self.lower_order_nums < 1 || last_step {
                    self.dpm_first(&self.history[k - 1], x, i)?
                } else {
                    self.dpm_second(&self.history[k - 1], &self.history[k - 2], x, i)?
                };
                self.lower_order_nums = (self.lower_order_nums + 1).min(2);
                Ok(out)
            }
            Solver::UniPc => {
                let mut x = x.clone();
                if i > 0 {
                    if let Some(last) = &self.last_sample {
                        x = self.unipc_correct(&m, last, i, self.this_order)?;
                    }
                }
                if self.history.len() == 2 {
                    self.history.remove(0);
                }
                self.history.push(m);
                self.this_order = 2.min(n - i).min(self.lower_order_nums + 1);
                let out = self.unipc_predict(&x, i, self.this_order)?;
                self.last_sample = Some(x);
                self.lower_order_nums = (self.lower_order_nums + 1).min(2);
                Ok(out)
            }
        }
    }
}

/// DPM-Solver++(2M) or UniPC over explicit VE noise levels `sigmas` (one per call, then the
/// final one, 0 for a diffusion) at network times `times`.
pub fn multistep(
    kind: SamplerKind,
    sigmas: Vec<f64>,
    times: Vec<f64>,
    prediction: Prediction,
    clip: bool,
) -> Result<Box<dyn DiffusionSampler>> {
    let solver = match kind {
        SamplerKind::Dpmpp2m => Solver::DpmPp,
        SamplerKind::Unipc => Solver::UniPc,
        k => bail!("{} is not a multistep sampler", k.name()),
    };
    if sigmas.len() != times.len() + 1 {
        bail!(
            "multistep: {} noise levels for {} calls",
            sigmas.len(),
            times.len()
        )
    }
    Ok(Box::new(Multistep::new(
        solver, sigmas, times, prediction, clip,
    )))
}

/// Samples flow matching's path `x_t = t·x₁ + (1 − (1 − σ_min)·t)·z` (data at `t = 1`) from
/// `z` with DPM-Solver++(2M) or UniPC in `steps` network calls of the velocity `v(x, t)`.
///
/// The path is Gaussian with `α_t = t`, `σ_t = 1 − (1 − σ_min)t`, so `x₁ = σ_t·v + (1 − σ_min)·x`
/// is the data prediction and the multistep solvers run unchanged on `x/α_t` scaled to unit
/// variance. As in diffusers' flow sigmas, the chain starts at `t = 1/1000` (`z` taken as the
/// sample there) and steps evenly in `t` to 1.
pub fn flow_multistep(
    kind: SamplerKind,
    steps: usize,
    sigma_min: f64,
    z: Tensor,
    rng: &mut GmRng,
    mut velocity: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    if steps == 0 {
        bail!("solver.steps must be > 0")
    }
    let c = 1.0 - sigma_min;
    let t0 = 1e-3;
    let ts: Vec<f64> = (0..=steps)
        .map(|i| t0 + (1.0 - t0) * i as f64 / steps as f64)
        .collect();
    let ve: Vec<f64> = ts.iter().map(|&t| (1.0 - c * t) / t).collect();
    // x_vp = x_flow · α'/α with α' = 1/√(1 + σ_ve²).
    let to_vp: Vec<f64> = ts
        .iter()
        .zip(&ve)
        .map(|(&t, &s)| 1.0 / (1.0 + s * s).sqrt() / t)
        .collect();
    let mut sm = multistep(kind, ve, ts[..steps].to_vec(), Prediction::Sample, false)?;
    let mut x = (z * to_vp[0])?;
    for i in 0..steps {
        let t = ts[i];
        let xf = (&x / to_vp[i])?;
        let v = velocity(&xf, t)?;
        let x1 = ((v * (1.0 - c * t))? + (xf * c)?)?;
        x = sm.step(&x1, i, &x, rng)?.detach();
    }
    x / to_vp[steps]
}

/// Euler and Heun on the probability-flow ODE `dx/dσ = (x − x̂_0)/σ` in the variable
/// `x = x_t/√ᾱ_t`, on a Karras ladder ending at `σ = 0`.
pub struct Karras {
    /// The σ of every call (Heun: interior σ twice), then 0.
    sigmas: Vec<f64>,
    times: Vec<f64>,
    init_sigma: f64,
    heun: bool,
    prediction: Prediction,
    clip: bool,
    /// Heun's first stage: `(derivative, dt, x)`.
    stage: Option<(Tensor, f64, Tensor)>,
}

impl Karras {
    fn new(
        schedule: &NoiseSchedule,
        n: usize,
        spacing: Spacing,
        offset: usize,
        heun: bool,
        prediction: Prediction,
        clip: bool,
    ) -> Result<Self> {
        let t = schedule.len();
        let tf = t as f64;
        // diffusers keeps these times in f32.
        let times: Vec<f64> = spaced_points(t, n, spacing, offset, false)
            .into_iter()
            .map(|x| x as f32 as f64)
            .collect();
        if let Some(&bad) = times.iter().find(|&&x| !(0.0..tf).contains(&x)) {
            bail!(
                "sampler: timestep {bad} (steps_offset {offset}) is outside the schedule's 0..{t}"
            )
        }
        let all = schedule_sigmas(schedule);
        let log_sigmas: Vec<f64> = all.iter().map(|s| s.ln()).collect();
        let spaced: Vec<f64> = times.iter().map(|&x| interp_index(x, &all)).collect();
        let ladder = karras_sigmas(spaced[spaced.len() - 1], spaced[0], n);
        let ts: Vec<f64> = ladder.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        let sigma_max = ladder[0];
        // diffusers' starting noise: σ_max for the linspace and trailing spacings.
        let init_sigma = match spacing {
            Spacing::Leading => (sigma_max * sigma_max + 1.0).sqrt(),
            _ => sigma_max,
        };
        let (sigmas, times) = if heun {
            let mut sg = vec![ladder[0]];
            let mut tt = vec![ts[0]];
            for k in 1..n {
                sg.extend([ladder[k], ladder[k]]);
                tt.extend([ts[k], ts[k]]);
            }
            sg.push(0.0);
            (sg, tt)
        } else {
            let mut sg = ladder;
            sg.push(0.0);
            (sg, ts)
        };
        Ok(Self {
            sigmas,
            times,
            init_sigma,
            heun,
            prediction,
            clip,
            stage: None,
        })
    }

    /// `x̂_0` from the output at noise level `sigma` (`x` in the VE variable).
    fn x0(&self, out: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let x0 = match self.prediction {
            Prediction::Epsilon => (x - (out * sigma)?)?,
            Prediction::Sample => out.clone(),
            Prediction::V => {
                ((out * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (x / (sigma * sigma + 1.0))?)?
            }
        };
        clip(x0, self.clip)
    }
}

impl DiffusionSampler for Karras {
    fn timesteps(&self) -> &[f64] {
        &self.times
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        x / (s * s + 1.0).sqrt()
    }

    fn step(&mut self, output: &Tensor, i: usize, x: &Tensor, _: &mut GmRng) -> Result<Tensor> {
        // Heun's first stage is kept for the next call: detached (see `Multistep::step`).
        let (output, x) = (&output.detach(), &x.detach());
        match self.stage.take() {
            Some((d0, dt, x_prev)) => {
                // Heun's correction at the step's end, σ_next = sigmas[i].
                let s_next = self.sigmas[i];
                let x0 = self.x0(output, x, s_next)?;
                let d1 = ((x - x0)? / s_next)?;
                let d = ((d0 + d1)? * 0.5)?;
                x_prev + (d * dt)?
            }
            None => {
                let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.x0(output, x, s)?;
                let d = ((x - x0)? / s)?;
                let dt = s_next - s;
                let out = (x + (&d * dt)?)?;
                if self.heun && s_next > 0.0 {
                    self.stage = Some((d, dt, x.clone()));
                }
                Ok(out)
            }
        }
    }
}

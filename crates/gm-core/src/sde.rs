//! Score-based generative modelling through stochastic differential equations (Song et al., 2021;
//! Song & Ermon, 2019): the maths shared by gm's score models, its DDPM (an ε-model is a score
//! model) and the tests.
//!
//! A forward SDE `dx = f(t)·x dt + g(t) dw` on `t ∈ [0, 1]` noises data into a prior; its marginal
//! given `x₀` is `N(a(t)·x₀, s(t)² I)`. Two are provided:
//!
//! - **VE** (NCSN's ladder in the continuous limit): `σ(t) = σ_min (σ_max/σ_min)^t`, `f = 0`,
//!   `g² = dσ²/dt = 2σ² ln(σ_max/σ_min)`; `a = 1`, `s = σ(t)`; prior `N(0, σ_max² I)`.
//! - **VP** (DDPM's chain in the continuous limit): `β(t) = β_min + t(β_max − β_min)`,
//!   `f = −β/2`, `g² = β`; `a = exp(−¼t²(β_max − β_min) − ½tβ_min)`, `s = √(1 − a²)`; prior
//!   `N(0, I)`. A DDPM with `T` linear betas `β_start … β_end` is this SDE with
//!   `β_min = T·β_start`, `β_max = T·β_end`, stepped by `Δt = 1/T`.
//!
//! The score `∇ log p_t(x)` is written through a noise prediction, `score = −ε̂/s(t)`, which is
//! what the networks output (denoising score matching with the weighting `λ(t) = s(t)²` is then
//! `‖ε̂ − z‖²`). Sampling: annealed Langevin dynamics (NCSN), the reverse SDE by Euler–Maruyama,
//! predictor–corrector with a Langevin corrector, and the probability-flow ODE
//! `dx/dt = f x − ½ g² score` (through [`crate::ode`]); its log-likelihood comes from
//! [`crate::cnf::log_likelihood_with_prior`].

use crate::diffusion::per_sample_values;
use crate::ode::{solve, OdeStats, SolverConfig};
use crate::rng::GmRng;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// A forward noising SDE (TOML: `[model.sde] kind = "ve"`, `sigma_min`, `sigma_max`, or
/// `kind = "vp"`, `beta_min`, `beta_max`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Sde {
    /// Variance exploding: `x_t = x₀ + σ(t) z`, `σ` geometric from `sigma_min` to `sigma_max`.
    Ve { sigma_min: f64, sigma_max: f64 },
    /// Variance preserving: DDPM's chain in the continuous limit.
    Vp { beta_min: f64, beta_max: f64 },
}

impl Default for Sde {
    fn default() -> Self {
        Sde::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        }
    }
}

impl Sde {
    /// Checks the parameters; errors name the key under `sde.`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match *self {
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => {
                if !(sigma_min > 0.0 && sigma_min.is_finite()) {
                    return Err(format!("sde.sigma_min must be > 0, got {sigma_min}"));
                }
                if !(sigma_max > sigma_min && sigma_max.is_finite()) {
                    return Err(format!(
                        "sde.sigma_max must be finite and > sde.sigma_min = {sigma_min}, got {sigma_max}"
                    ));
                }
            }
            Sde::Vp { beta_min, beta_max } => {
                if !(beta_min > 0.0 && beta_min.is_finite()) {
                    return Err(format!("sde.beta_min must be > 0, got {beta_min}"));
                }
                if !(beta_max >= beta_min && beta_max.is_finite()) {
                    return Err(format!(
                        "sde.beta_max must be finite and >= sde.beta_min = {beta_min}, got {beta_max}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `(a(t), s(t))`: the marginal `x_t | x₀ ~ N(a x₀, s² I)`.
    pub fn marginal(&self, t: f64) -> (f64, f64) {
        match *self {
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => (1.0, sigma_min * (sigma_max / sigma_min).powf(t)),
            Sde::Vp { beta_min, beta_max } => {
                let lmc = -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min;
                (lmc.exp(), (-(2.0 * lmc).exp_m1()).sqrt())
            }
        }
    }

    /// The drift coefficient `f(t)` (the drift is `f(t)·x`).
    pub fn drift(&self, t: f64) -> f64 {
        match *self {
            Sde::Ve { .. } => 0.0,
            Sde::Vp { beta_min, beta_max } => -0.5 * (beta_min + t * (beta_max - beta_min)),
        }
    }

    /// The squared diffusion coefficient `g(t)²`.
    pub fn g2(&self, t: f64) -> f64 {
        match *self {
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => {
                let s = self.marginal(t).1;
                2.0 * s * s * (sigma_max / sigma_min).ln()
            }
            Sde::Vp { beta_min, beta_max } => beta_min + t * (beta_max - beta_min),
        }
    }

    /// The standard deviation of the prior `N(0, σ² I)` at `t = 1`.
    pub fn prior_std(&self) -> f64 {
        match *self {
            Sde::Ve { sigma_max, .. } => sigma_max,
            Sde::Vp { .. } => 1.0,
        }
    }

    /// A draw from the prior, shaped `shape`, in `dtype`.
    pub fn prior_sample(
        &self,
        shape: &[usize],
        dtype: DType,
        device: &candle_core::Device,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        rng.randn(shape, device)?.to_dtype(dtype)? * self.prior_std()
    }

    /// The noise-to-signal ratio `σ̄(t) = s(t)/a(t)` (increasing in `t`): `x_t/a = x₀ + σ̄ z`.
    pub fn sigma_bar(&self, t: f64) -> f64 {
        let (a, s) = self.marginal(t);
        s / a
    }

    /// The time `t` at which `σ̄(t) = sigma_bar` (the inverse of [`Sde::sigma_bar`]).
    pub fn time_of_sigma_bar(&self, sigma_bar: f64) -> f64 {
        match *self {
            Sde::Ve {
                sigma_min,
                sigma_max,
            } => (sigma_bar / sigma_min).ln() / (sigma_max / sigma_min).ln(),
            Sde::Vp { beta_min, beta_max } => {
                // ln a = −½ ln(1 + σ̄²) = −¼ t² Δ − ½ t β_min.
                let lmc = -0.5 * sigma_bar.powi(2).ln_1p();
                let d = beta_max - beta_min;
                if d.abs() < 1e-12 {
                    -2.0 * lmc / beta_min
                } else {
                    (-0.5 * beta_min + (0.25 * beta_min * beta_min - d * lmc).sqrt()) / (0.5 * d)
                }
            }
        }
    }

    /// The standard deviation of `x_1/a(1)` under the prior (`σ_max` for VE, `√(1 + σ̄(1)²)`
    /// for VP).
    fn prior_std_bar(&self) -> f64 {
        self.prior_std() / self.marginal(1.0).0
    }
}

/// The exponent of the Karras et al. (2022) noise spacing the probability-flow ODE is stepped in.
pub const KARRAS_RHO: f64 = 7.0;

/// The probability-flow ODE in the variables that make its trajectories nearly straight
/// (DDIM, Karras et al.): the state `x̄ = x_t/a(t)`, the noise level `σ̄`, `dx̄/dσ̄ = ε̂ = −s·score`,
/// and `σ̄` itself spaced over `u ∈ [0, 1]` as `σ̄(u) = (lo^{1/ρ} + u (hi^{1/ρ} − lo^{1/ρ}))^ρ`,
/// so that equal steps in `u` put fixed-step solvers where the path bends (small noise).
struct PfOde<'a> {
    sde: &'a Sde,
    t_min: f64,
    lo: f64,
    hi: f64,
}

impl PfOde<'_> {
    fn new(sde: &Sde, t_min: f64) -> PfOde<'_> {
        PfOde {
            sde,
            t_min,
            lo: sde.sigma_bar(t_min),
            hi: sde.sigma_bar(1.0),
        }
    }

    /// `(dσ̄/du, t)` at `u`; the ends map to `t_min` and 1 exactly (no round trip through the
    /// inverse).
    fn at(&self, u: f64) -> (f64, f64) {
        let (a, b) = (
            self.lo.powf(1.0 / KARRAS_RHO),
            self.hi.powf(1.0 / KARRAS_RHO),
        );
        let base = a + u * (b - a);
        let dsb = KARRAS_RHO * base.powf(KARRAS_RHO - 1.0) * (b - a);
        let t = if u <= 0.0 {
            self.t_min
        } else if u >= 1.0 {
            1.0
        } else {
            self.sde.time_of_sigma_bar(base.powf(KARRAS_RHO))
        };
        (dsb, t)
    }

    /// `dx̄/du` at `u` for the state `x̄`.
    fn velocity(
        &self,
        u: f64,
        xbar: &Tensor,
        score: &mut impl FnMut(&Tensor, f64) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (dsb, t) = self.at(u);
        let (a, s) = self.sde.marginal(t);
        let g = score(&(xbar * a)?, t)?;
        g * (-s * dsb)
    }
}

/// The denoising-score-matching pair at per-sample times `t`: `(x_t, s(t))` with
/// `x_t = a(t) x₀ + s(t) z`. The target of an ε-network is `z`; that of a score is `−z/s(t)`.
pub fn perturb(sde: &Sde, x0: &Tensor, t: &[f64], z: &Tensor) -> Result<(Tensor, Vec<f64>)> {
    let (a, s): (Vec<f64>, Vec<f64>) = t.iter().map(|&t| sde.marginal(t)).unzip();
    let xt = (x0.broadcast_mul(&per_sample_values(a, x0)?)?
        + z.broadcast_mul(&per_sample_values(s.clone(), z)?)?)?;
    Ok((xt, s))
}

/// The probability-flow velocity `dx/dt = f(t) x − ½ g(t)² score` at one time shared by the batch.
pub fn pf_velocity(sde: &Sde, t: f64, x: &Tensor, score: &Tensor) -> Result<Tensor> {
    (x * sde.drift(t))? - (score * (0.5 * sde.g2(t)))?
}

/// One Euler–Maruyama step of the reverse SDE from `t` to `t − dt`:
/// `x − (f x − g² score) dt + g √dt z`. Returns `(x_new, mean)`; `z = None` gives the mean.
pub fn reverse_em_step(
    sde: &Sde,
    t: f64,
    dt: f64,
    x: &Tensor,
    score: &Tensor,
    z: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let g2 = sde.g2(t);
    let mean = ((x * (1.0 - sde.drift(t) * dt))? + (score * (g2 * dt))?)?;
    let out = match z {
        Some(z) => (&mean + (z * (g2 * dt).sqrt())?)?,
        None => mean.clone(),
    };
    Ok((out, mean))
}

/// One unadjusted Langevin step `x + δ·score + √(2δ) z` with a per-sample step `δ` `(B,)`.
pub fn langevin_step(x: &Tensor, score: &Tensor, step: &[f64], z: &Tensor) -> Result<Tensor> {
    let d = per_sample_values(step.to_vec(), x)?;
    let noise: Vec<f64> = step.iter().map(|s| (2.0 * s).sqrt()).collect();
    x + score.broadcast_mul(&d)? + z.broadcast_mul(&per_sample_values(noise, z)?)?
}

/// The Langevin corrector's step for a target signal-to-noise ratio `r` (Song et al., 2021,
/// Algorithm 5): `δ = 2 α (r ‖z‖ / ‖score‖)²` with the norms averaged over the batch (as the
/// reference implementation does: per-sample norms of low-dimensional data vary too much) and
/// `α = a(t)²` (1 for VE). The same `δ` for every sample.
pub fn corrector_step_size(score: &Tensor, z: &Tensor, snr: f64, alpha: f64) -> Result<Vec<f64>> {
    let mean_norm = |t: &Tensor| -> Result<f64> {
        t.to_dtype(DType::F64)?
            .sqr()?
            .flatten_from(1)?
            .sum(1)?
            .sqrt()?
            .mean_all()?
            .to_scalar::<f64>()
    };
    let (g, zn) = (mean_norm(score)?, mean_norm(z)?);
    let delta = 2.0 * alpha * (snr * zn / g.max(1e-30)).powi(2);
    Ok(vec![delta; score.dim(0)?])
}

/// How samples are drawn from a score model.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SdeMethod {
    /// NCSN's annealed Langevin dynamics: `steps` noise levels from `t = 1` down to `t_min`,
    /// `corrector_steps` Langevin steps at each, step `δ_i = step_lr · (s_i / s_min)²`.
    AnnealedLangevin,
    /// The reverse SDE by Euler–Maruyama, `steps` steps.
    EulerMaruyama,
    /// Predictor–corrector: a reverse-SDE step, then `corrector_steps` Langevin steps at the
    /// target signal-to-noise ratio `snr`.
    Pc,
    /// The probability-flow ODE with `solver` (deterministic).
    Ode,
}

/// A score model's sampler (TOML: `[model.sampler]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SdeSamplerConfig {
    pub method: SdeMethod,
    /// Noise levels (annealed Langevin) or reverse-SDE steps (Euler–Maruyama, PC).
    pub steps: usize,
    /// Langevin steps per level (annealed Langevin) or per predictor step (PC).
    pub corrector_steps: usize,
    /// The corrector's signal-to-noise ratio (PC).
    pub snr: f64,
    /// Annealed Langevin's step at the smallest level.
    pub step_lr: f64,
    /// The last time reached (`t_min > 0`: the score is singular at `t = 0`).
    pub t_min: f64,
    /// A final denoising step (Tweedie: `x₀ = (x + s² score)/a`) without noise.
    pub denoise: bool,
    /// The probability-flow ODE's solver (`method = "ode"`).
    pub solver: SolverConfig,
}

impl Default for SdeSamplerConfig {
    fn default() -> Self {
        Self {
            method: SdeMethod::Pc,
            steps: 500,
            corrector_steps: 1,
            snr: 0.16,
            step_lr: 2e-5,
            t_min: 1e-3,
            denoise: true,
            solver: SolverConfig::rk4(50),
        }
    }
}

impl SdeSamplerConfig {
    /// Checks the values; errors name the key under `sampler.`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.method != SdeMethod::Ode && self.steps == 0 {
            return Err("sampler.steps must be >= 1".into());
        }
        if self.method == SdeMethod::AnnealedLangevin && self.corrector_steps == 0 {
            return Err("sampler.corrector_steps must be >= 1 for annealed-langevin".into());
        }
        if !(self.snr > 0.0 && self.snr.is_finite()) {
            return Err(format!("sampler.snr must be > 0, got {}", self.snr));
        }
        if !(self.step_lr > 0.0 && self.step_lr.is_finite()) {
            return Err(format!("sampler.step_lr must be > 0, got {}", self.step_lr));
        }
        if !(self.t_min > 0.0 && self.t_min < 1.0) {
            return Err(format!(
                "sampler.t_min must be in (0, 1), got {}",
                self.t_min
            ));
        }
        self.solver.validate_general("sampler.")?;
        Ok(())
    }
}

/// `steps + 1` times from 1 down to `t_min`, evenly spaced (the reverse-SDE grid).
pub fn time_grid(steps: usize, t_min: f64) -> Vec<f64> {
    (0..=steps)
        .map(|i| 1.0 - (1.0 - t_min) * i as f64 / steps as f64)
        .collect()
}

/// Draws samples from the prior to `t_min` with `cfg`, for a score `score(x, t)`; `x_init` is
/// a prior draw (see [`Sde::prior_sample`]). Returns the samples and the network evaluations.
pub fn sample(
    sde: &Sde,
    cfg: &SdeSamplerConfig,
    x_init: Tensor,
    rng: &mut GmRng,
    mut score: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<(Tensor, OdeStats)> {
    let mut stats = OdeStats::default();
    let mut x = x_init;
    let b = x.dim(0)?;
    let noise = |rng: &mut GmRng, like: &Tensor| -> Result<Tensor> {
        rng.randn(like.shape(), like.device())?
            .to_dtype(like.dtype())
    };
    match cfg.method {
        SdeMethod::AnnealedLangevin => {
            // Levels from t = 1 to t_min; the step scales with the level's variance (NCSN).
            let levels = if cfg.steps == 1 {
                vec![cfg.t_min]
            } else {
                time_grid(cfg.steps - 1, cfg.t_min)
            };
            let s_min = sde.marginal(cfg.t_min).1;
            for &t in &levels {
                let s = sde.marginal(t).1;
                let delta = vec![cfg.step_lr * (s / s_min).powi(2); b];
                for _ in 0..cfg.corrector_steps {
                    let g = score(&x, t)?;
                    stats.nfe += 1;
                    let z = noise(rng, &x)?;
                    x = langevin_step(&x, &g, &delta, &z)?;
                }
            }
        }
        SdeMethod::EulerMaruyama | SdeMethod::Pc => {
            let grid = time_grid(cfg.steps, cfg.t_min);
            for w in grid.windows(2) {
                let (t, dt) = (w[0], w[0] - w[1]);
                if cfg.method == SdeMethod::Pc {
                    let alpha = sde.marginal(t).0.powi(2);
                    for _ in 0..cfg.corrector_steps {
                        let g = score(&x, t)?;
                        stats.nfe += 1;
                        let z = noise(rng, &x)?;
                        let delta = corrector_step_size(&g, &z, cfg.snr, alpha)?;
                        x = langevin_step(&x, &g, &delta, &z)?;
                    }
                }
                let g = score(&x, t)?;
                stats.nfe += 1;
                let z = noise(rng, &x)?;
                x = reverse_em_step(sde, t, dt, &x, &g, Some(&z))?.0;
            }
        }
        SdeMethod::Ode => {
            let ode = PfOde::new(sde, cfg.t_min);
            let xbar = (x / sde.marginal(1.0).0)?;
            let (out, st) = solve(
                |u, x: &Tensor| ode.velocity(u, x, &mut score).map(|v| v.detach()),
                xbar,
                1.0,
                0.0,
                &cfg.solver,
            )?;
            stats.nfe += st.nfe;
            stats.accepted = st.accepted;
            stats.rejected = st.rejected;
            x = (out * sde.marginal(cfg.t_min).0)?;
        }
    }
    if cfg.denoise {
        let (a, s) = sde.marginal(cfg.t_min);
        let g = score(&x, cfg.t_min)?;
        stats.nfe += 1;
        x = ((x + (g * (s * s))?)? / a)?;
    }
    Ok((x, stats))
}

/// `log p(x)` of data `x` at `t_min` under the probability-flow ODE of `score`, with the SDE's
/// prior at `t = 1`: `(log p (B,) in nats, the solver's statistics)`. The ODE is solved in the
/// noise level `σ̄` on Karras' spacing (state `x̄ = x/a`, `dx̄/dσ̄ = ε̂`): `log p_x(x) = log p_x̄(x/a) − D ln a`.
pub fn pf_ode_log_likelihood(
    sde: &Sde,
    x: &Tensor,
    t_min: f64,
    solver: &SolverConfig,
    divergence: crate::cnf::Divergence,
    rng: &mut GmRng,
    mut score: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<(Tensor, OdeStats)> {
    let ode = PfOde::new(sde, t_min);
    let a_min = sde.marginal(t_min).0;
    let d = x.elem_count() / x.dim(0)?.max(1);
    let std_bar = sde.prior_std_bar();
    let (logp, stats) = crate::cnf::log_likelihood_with_prior(
        |u, xb: &Tensor| ode.velocity(u, xb, &mut score),
        &(x / a_min)?,
        0.0,
        1.0,
        solver,
        divergence,
        rng,
        |z| crate::cnf::normal_log_prob(z, std_bar),
    )?;
    Ok(((logp - d as f64 * a_min.ln())?, stats))
}

/// The sliced score-matching objective by central finite differences (Pang et al., 2020):
/// for a score `s` and a probe `v`, `vᵀ∇s v ≈ vᵀ(s(x + h v) − s(x − h v)) / 2h` and
/// `s(x) ≈ (s(x + h v) + s(x − h v)) / 2`, so the loss `vᵀ∇s v + ½ (vᵀ s)²` per sample `(B,)`
/// needs two first-order evaluations and no second derivative. Exact for a linear score.
pub fn fd_sliced_score_matching(
    x: &Tensor,
    v: &Tensor,
    h: &[f64],
    mut score: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let hv = v.broadcast_mul(&per_sample_values(h.to_vec(), v)?)?;
    let sp = score(&(x + &hv)?)?;
    let sm = score(&(x - &hv)?)?;
    let inv2h: Vec<f64> = h.iter().map(|h| 0.5 / h).collect();
    let jvp = (&sp - &sm)?.broadcast_mul(&per_sample_values(inv2h, &sp)?)?;
    let s = ((sp + sm)? * 0.5)?;
    let quad = crate::sum_per_sample(&(jvp * v)?)?;
    let proj = crate::sum_per_sample(&(s * v)?)?;
    quad + (proj.sqr()? * 0.5)?
}

/// How a probability-flow ODE likelihood is computed (TOML: e.g. DDPM's
/// `[model.ode_likelihood]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PfOdeConfig {
    pub solver: SolverConfig,
    pub divergence: crate::cnf::Divergence,
    /// The time the data sits at (the score is singular at 0).
    pub t_min: f64,
}

impl Default for PfOdeConfig {
    fn default() -> Self {
        Self {
            solver: SolverConfig::rk4(10),
            divergence: crate::cnf::Divergence::Rademacher,
            t_min: 1e-5,
        }
    }
}

impl PfOdeConfig {
    /// Checks the values; errors name the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> std::result::Result<(), String> {
        self.solver.validate_general(&format!("{prefix}."))?;
        if !(self.t_min > 0.0 && self.t_min < 1.0) {
            return Err(format!(
                "{prefix}.t_min must be in (0, 1), got {}",
                self.t_min
            ));
        }
        Ok(())
    }
}

/// The VP SDE of a DDPM with `T` linear betas `β_start … β_end`: `β_min = T β_start`,
/// `β_max = T β_end`, and network step `t·(T − 1)` for time `t` (the discrete chain's `β_i` is
/// `β(i/(T − 1))/T`).
pub fn vp_of_linear_ddpm(timesteps: usize, beta_start: f64, beta_end: f64) -> Sde {
    let t = timesteps as f64;
    Sde::Vp {
        beta_min: t * beta_start,
        beta_max: t * beta_end,
    }
}

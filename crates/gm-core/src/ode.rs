//! ODE solvers for `dy/dt = f(t, y)`, independent of any model: what flow-matching samplers,
//! probability-flow likelihoods and continuous normalizing flows integrate.
//!
//! - Fixed steps: [`Method::Euler`] (order 1), [`Method::Midpoint`] and [`Method::Heun`]
//!   (order 2), [`Method::Rk4`] (order 4).
//! - Adaptive: [`Method::Dopri5`], the Dormand–Prince 5(4) pair with local extrapolation, FSAL,
//!   and step-size control on the mixed error norm `‖err / (atol + rtol·max(|y₀|, |y₁|))‖_RMS`
//!   (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4), as torchdiffeq's `dopri5` does.
//!
//! The state is anything that implements [`OdeState`] — a [`Tensor`] or a `Vec<Tensor>` (an image
//! and its log-density change, say). Time may run backwards (`t1 < t0`). Every solve returns
//! [`OdeStats`]: function evaluations, accepted and rejected steps.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gm_core::ode::{solve, SolverConfig};
//! // y' = -y from y(0) = 1: y(1) = e^{-1}.
//! let y0 = Tensor::new(&[1f64], &Device::Cpu).unwrap();
//! let (y1, stats) = solve(|_t, y: &Tensor| y.neg(), y0, 0.0, 1.0, &SolverConfig::rk4(20)).unwrap();
//! let v = y1.to_vec1::<f64>().unwrap()[0];
//! assert!((v - (-1f64).exp()).abs() < 1e-7);
//! assert_eq!(stats.nfe, 80);
//! ```

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// A state an ODE solver can advance: linear combinations and an error norm.
pub trait OdeState: Clone {
    /// `self + Σ cᵢ·kᵢ`.
    fn add_scaled(&self, terms: &[(f64, &Self)]) -> Result<Self>;

    /// `(Σ ((err / (atol + rtol·max(|a|, |b|)))²), number of elements)`: the pieces of the RMS
    /// error norm.
    fn error_sums(err: &Self, a: &Self, b: &Self, rtol: f64, atol: f64) -> Result<(f64, usize)>;
}

impl OdeState for Tensor {
    fn add_scaled(&self, terms: &[(f64, &Self)]) -> Result<Self> {
        let mut acc = self.clone();
        for &(c, k) in terms {
            if c != 0.0 {
                acc = (acc + k.affine(c, 0.0)?)?;
            }
        }
        Ok(acc)
    }

    fn error_sums(err: &Self, a: &Self, b: &Self, rtol: f64, atol: f64) -> Result<(f64, usize)> {
        let scale = a.abs()?.maximum(&b.abs()?)?.affine(rtol, atol)?;
        let r = (err / scale)?.sqr()?.sum_all()?;
        Ok((
            r.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            err.elem_count(),
        ))
    }
}

impl OdeState for Vec<Tensor> {
    fn add_scaled(&self, terms: &[(f64, &Self)]) -> Result<Self> {
        self.iter()
            .enumerate()
            .map(|(i, y)| {
                let parts: Vec<(f64, &Tensor)> = terms.iter().map(|&(c, k)| (c, &k[i])).collect();
                y.add_scaled(&parts)
            })
            .collect()
    }

    fn error_sums(err: &Self, a: &Self, b: &Self, rtol: f64, atol: f64) -> Result<(f64, usize)> {
        let mut sum = 0.0;
        let mut n = 0;
        for i in 0..err.len() {
            let (s, k) = Tensor::error_sums(&err[i], &a[i], &b[i], rtol, atol)?;
            sum += s;
            n += k;
        }
        Ok((sum, n))
    }
}

fn rms_norm<S: OdeState>(err: &S, a: &S, b: &S, rtol: f64, atol: f64) -> Result<f64> {
    let (s, n) = S::error_sums(err, a, b, rtol, atol)?;
    Ok((s / n.max(1) as f64).sqrt())
}

/// The integration scheme.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Explicit Euler, order 1, one evaluation per step.
    Euler,
    /// Explicit midpoint, order 2, two evaluations per step.
    Midpoint,
    /// Heun's method (explicit trapezoid), order 2, two evaluations per step.
    Heun,
    /// Classical Runge–Kutta, order 4, four evaluations per step.
    Rk4,
    /// Dormand–Prince 5(4), adaptive steps.
    Dopri5,
    /// Multistep DPM-Solver++(2M) on flow matching's Gaussian path (one evaluation per step;
    /// [`crate::samplers::flow_multistep`]); not a general ODE solver: `solve` rejects it.
    #[serde(rename = "dpmpp-2m")]
    DpmPp2m,
    /// UniPC (bh2, order 2) on flow matching's Gaussian path, like `dpmpp-2m`.
    Unipc,
}

impl Method {
    /// Whether this is one of the Gaussian-path multistep samplers, which need the path's
    /// structure (flow matching's sampling) rather than any right-hand side.
    pub fn is_path_solver(self) -> bool {
        matches!(self, Method::DpmPp2m | Method::Unipc)
    }

    /// Function evaluations per step of a fixed-step method (Dopri5: 6 per attempted step).
    pub fn evals_per_step(self) -> usize {
        match self {
            Method::Euler | Method::DpmPp2m | Method::Unipc => 1,
            Method::Midpoint | Method::Heun => 2,
            Method::Rk4 => 4,
            Method::Dopri5 => 6,
        }
    }

    /// The convergence order.
    pub fn order(self) -> usize {
        match self {
            Method::Euler => 1,
            Method::Midpoint | Method::Heun | Method::DpmPp2m | Method::Unipc => 2,
            Method::Rk4 => 4,
            Method::Dopri5 => 5,
        }
    }
}

/// Which solver to run and how (TOML: `method = "rk4"`, `steps = 20`; or `method = "dopri5"`,
/// `rtol`, `atol`, `max_steps`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SolverConfig {
    pub method: Method,
    /// Steps of a fixed-step method.
    pub steps: usize,
    /// Relative tolerance of the adaptive method.
    pub rtol: f64,
    /// Absolute tolerance of the adaptive method.
    pub atol: f64,
    /// Most attempted steps of the adaptive method before it gives up with an error.
    pub max_steps: usize,
}

impl Default for SolverConfig {
    fn default() -> Self {
        Self {
            method: Method::Heun,
            steps: 25,
            rtol: 1e-5,
            atol: 1e-5,
            max_steps: 10_000,
        }
    }
}

impl SolverConfig {
    pub fn fixed(method: Method, steps: usize) -> Self {
        Self {
            method,
            steps,
            ..Default::default()
        }
    }

    pub fn euler(steps: usize) -> Self {
        Self::fixed(Method::Euler, steps)
    }

    pub fn heun(steps: usize) -> Self {
        Self::fixed(Method::Heun, steps)
    }

    pub fn rk4(steps: usize) -> Self {
        Self::fixed(Method::Rk4, steps)
    }

    pub fn dopri5(rtol: f64, atol: f64) -> Self {
        Self {
            method: Method::Dopri5,
            rtol,
            atol,
            ..Default::default()
        }
    }

    /// A fixed-step solver spending about `nfe` function evaluations: Euler for 1, Heun for
    /// larger even budgets (`nfe / 2` steps), Euler for odd ones.
    pub fn with_nfe(nfe: usize) -> Self {
        if nfe >= 2 && nfe % 2 == 0 {
            Self::heun(nfe / 2)
        } else {
            Self::euler(nfe.max(1))
        }
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.method != Method::Dopri5 && self.steps == 0 {
            return Err("solver.steps must be > 0".into());
        }
        if self.method == Method::Dopri5 {
            for (k, v) in [("solver.rtol", self.rtol), ("solver.atol", self.atol)] {
                if !v.is_finite() || v <= 0.0 {
                    return Err(format!("{k} must be > 0, got {v}"));
                }
            }
            if self.max_steps == 0 {
                return Err("solver.max_steps must be > 0".into());
            }
        }
        Ok(())
    }
}

/// What a solve cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OdeStats {
    /// Function evaluations.
    pub nfe: usize,
    /// Accepted steps.
    pub accepted: usize,
    /// Rejected steps (adaptive methods only).
    pub rejected: usize,
}

impl OdeStats {
    /// The largest of each count over two solves (chunks of one sampling call: a sample's cost
    /// is that of the costliest chunk).
    pub fn max(self, other: OdeStats) -> OdeStats {
        OdeStats {
            nfe: self.nfe.max(other.nfe),
            accepted: self.accepted.max(other.accepted),
            rejected: self.rejected.max(other.rejected),
        }
    }
}

/// Integrates `dy/dt = f(t, y)` from `t0` to `t1` (either direction) and returns `y(t1)`.
pub fn solve<S, F>(f: F, y0: S, t0: f64, t1: f64, cfg: &SolverConfig) -> Result<(S, OdeStats)>
where
    S: OdeState,
    F: FnMut(f64, &S) -> Result<S>,
{
    if let Err(e) = cfg.validate() {
        bail!("{e}")
    }
    match cfg.method {
        Method::Dopri5 => dopri5(f, y0, t0, t1, cfg.rtol, cfg.atol, cfg.max_steps),
        m if m.is_path_solver() => bail!("{}", path_solver_only(m)),
        m => fixed_steps(f, y0, t0, t1, cfg.steps, m),
    }
}

impl SolverConfig {
    /// [`SolverConfig::validate`] for a general ODE (a likelihood, a score model's flow), which
    /// the Gaussian-path samplers cannot solve; messages start with `prefix` (`"model.likelihood_"`
    /// gives `model.likelihood_solver.steps …`).
    pub fn validate_general(&self, prefix: &str) -> std::result::Result<(), String> {
        self.validate().map_err(|e| format!("{prefix}{e}"))?;
        if self.method.is_path_solver() {
            return Err(format!("{prefix}{}", path_solver_only(self.method)));
        }
        Ok(())
    }
}

/// The error of a Gaussian-path sampler asked to solve a general ODE.
pub fn path_solver_only(m: Method) -> String {
    let name = if m == Method::Unipc {
        "unipc"
    } else {
        "dpmpp-2m"
    };
    format!(
        "solver.method = \"{name}\" samples flow matching's Gaussian path only (model.solver of a flow-matching model); this ODE needs euler, midpoint, heun, rk4 or dopri5"
    )
}

/// `steps` equal steps of a fixed-step method.
pub fn fixed_steps<S, F>(
    mut f: F,
    y0: S,
    t0: f64,
    t1: f64,
    steps: usize,
    method: Method,
) -> Result<(S, OdeStats)>
where
    S: OdeState,
    F: FnMut(f64, &S) -> Result<S>,
{
    if steps == 0 {
        bail!("a fixed-step solve needs at least one step")
    }
    let h = (t1 - t0) / steps as f64;
    let mut y = y0;
    let mut stats = OdeStats::default();
    for i in 0..steps {
        let t = t0 + i as f64 * h;
        y = match method {
            Method::Euler => {
                let k1 = f(t, &y)?;
                y.add_scaled(&[(h, &k1)])?
            }
            Method::Midpoint => {
                let k1 = f(t, &y)?;
                let k2 = f(t + 0.5 * h, &y.add_scaled(&[(0.5 * h, &k1)])?)?;
                y.add_scaled(&[(h, &k2)])?
            }
            Method::Heun => {
                let k1 = f(t, &y)?;
                let k2 = f(t + h, &y.add_scaled(&[(h, &k1)])?)?;
                y.add_scaled(&[(0.5 * h, &k1), (0.5 * h, &k2)])?
            }
            Method::Rk4 => {
                let k1 = f(t, &y)?;
                let k2 = f(t + 0.5 * h, &y.add_scaled(&[(0.5 * h, &k1)])?)?;
                let k3 = f(t + 0.5 * h, &y.add_scaled(&[(0.5 * h, &k2)])?)?;
                let k4 = f(t + h, &y.add_scaled(&[(h, &k3)])?)?;
                y.add_scaled(&[
                    (h / 6.0, &k1),
                    (h / 3.0, &k2),
                    (h / 3.0, &k3),
                    (h / 6.0, &k4),
                ])?
            }
            Method::Dopri5 => bail!("dopri5 is adaptive: use solve or dopri5"),
            m @ (Method::DpmPp2m | Method::Unipc) => bail!("{}", path_solver_only(m)),
        };
        stats.nfe += method.evals_per_step();
        stats.accepted += 1;
    }
    Ok((y, stats))
}

// Dormand–Prince 5(4) tableau.
const C: [f64; 6] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0];
const A: [&[f64]; 6] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
];
/// 5th-order weights (also the last stage's row: first same as last).
const B: [f64; 7] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
    0.0,
];
/// 5th- minus 4th-order weights: the local error estimate.
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

/// The Dormand–Prince 5(4) adaptive solver. Steps are accepted when the RMS mixed error norm is
/// ≤ 1; the next step is `h · clamp(0.9 · err^{-1/5}, 0.2, 10)` (no growth right after a
/// rejection). The first step is chosen by Hairer's heuristic (one extra evaluation).
pub fn dopri5<S, F>(
    mut f: F,
    y0: S,
    t0: f64,
    t1: f64,
    rtol: f64,
    atol: f64,
    max_steps: usize,
) -> Result<(S, OdeStats)>
where
    S: OdeState,
    F: FnMut(f64, &S) -> Result<S>,
{
    let mut stats = OdeStats::default();
    if t0 == t1 {
        return Ok((y0, stats));
    }
    let dir = (t1 - t0).signum();
    let span = (t1 - t0).abs();
    let mut y = y0;
    let mut k1 = f(t0, &y)?;
    stats.nfe += 1;

    // Initial step (Hairer, Nørsett & Wanner, II.4).
    let d0 = rms_norm(&y, &y, &y, rtol, atol)?;
    let d1 = rms_norm(&k1, &y, &y, rtol, atol)?;
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    }
    .min(span);
    let y_probe = y.add_scaled(&[(dir * h0, &k1)])?;
    let k_probe = f(t0 + dir * h0, &y_probe)?;
    stats.nfe += 1;
    let diff = k_probe.add_scaled(&[(-1.0, &k1)])?;
    let d2 = rms_norm(&diff, &y, &y, rtol, atol)? / h0;
    let h1 = if d1.max(d2) <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / d1.max(d2)).powf(1.0 / 5.0)
    };
    let mut h = (100.0 * h0).min(h1).min(span);

    let mut t = t0;
    let mut last_rejected = false;
    while (t1 - t) * dir > 1e-12 * span.max(1.0) {
        if stats.accepted + stats.rejected >= max_steps {
            bail!(
                "dopri5 gave up after {max_steps} steps at t = {t} (rtol {rtol}, atol {atol}): \
                 the dynamics may be stiff or diverging"
            )
        }
        if h < 1e-14 * span.max(1.0) {
            bail!("dopri5 step size underflow at t = {t}")
        }
        let remaining = (t1 - t) * dir;
        let step = h.min(remaining);
        let hs = dir * step;
        let mut ks: Vec<S> = Vec::with_capacity(7);
        ks.push(k1.clone());
        for s in 1..6 {
            let terms: Vec<(f64, &S)> = A[s].iter().zip(&ks).map(|(&a, k)| (hs * a, k)).collect();
            let ys = y.add_scaled(&terms)?;
            ks.push(f(t + C[s] * hs, &ys)?);
        }
        let terms: Vec<(f64, &S)> = B[..6].iter().zip(&ks).map(|(&b, k)| (hs * b, k)).collect();
        let y_new = y.add_scaled(&terms)?;
        let k7 = f(t + hs, &y_new)?;
        stats.nfe += 6;
        ks.push(k7);
        let terms: Vec<(f64, &S)> = E.iter().zip(&ks).map(|(&e, k)| (hs * e, k)).collect();
        let err = zero_like(&y)?.add_scaled(&terms)?;
        let err_norm = rms_norm(&err, &y, &y_new, rtol, atol)?;
        if !err_norm.is_finite() {
            bail!("dopri5: non-finite error estimate at t = {t} (the dynamics produced NaN/inf)")
        }
        if err_norm <= 1.0 {
            t += hs;
            y = y_new;
            k1 = ks.pop().expect("seven stages");
            stats.accepted += 1;
            let grow = if err_norm == 0.0 {
                10.0
            } else {
                (0.9 * err_norm.powf(-0.2)).clamp(0.2, 10.0)
            };
            h = step * if last_rejected { grow.min(1.0) } else { grow };
            last_rejected = false;
        } else {
            stats.rejected += 1;
            h = step * (0.9 * err_norm.powf(-0.2)).clamp(0.2, 1.0);
            last_rejected = true;
        }
    }
    Ok((y, stats))
}

fn zero_like<S: OdeState>(y: &S) -> Result<S> {
    y.add_scaled(&[(-1.0, y)])
}

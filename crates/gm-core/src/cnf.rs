//! Log-likelihoods of continuous flows through the instantaneous change of variables
//! (Chen et al., 2018): for `dx/dt = v(x, t)`, `d log p(x_t)/dt = −div v(x_t, t)`, so
//!
//! `log p_data(x) = log N(x_base; 0, I) − ∫_{t_base}^{t_data} div v(x_t, t) dt`,
//!
//! integrated backwards from the data to the base alongside the state. The divergence is exact
//! (one vector–Jacobian product per dimension; for small dimension) or Hutchinson's unbiased
//! estimate `E_ε[εᵀ (∂v/∂x) ε]` with one probe per sample held fixed through the solve (Grathwohl
//! et al., 2019). The vector–Jacobian products are ordinary first-order candle backward passes,
//! so nothing here needs higher-order gradients. Any velocity field fits — a network, a closed
//! form, a test dummy.

use crate::ode::{solve, OdeStats, SolverConfig};
use crate::rng::GmRng;
use candle_core::{bail, DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// How `div v` is computed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Divergence {
    /// The trace of the Jacobian, one backward pass per dimension.
    Exact,
    /// Hutchinson with a Rademacher (±1) probe.
    #[default]
    Rademacher,
    /// Hutchinson with a standard Gaussian probe.
    Gaussian,
}

/// `(v(x), div v(x))`: `v` shaped like `x` (`(B, …)`), the divergence `(B,)`. `probe` is the
/// Hutchinson probe (ignored by [`Divergence::Exact`]). Both results are detached.
pub fn velocity_and_divergence(
    field: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    mode: Divergence,
    probe: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let xv = Var::from_tensor(&x.detach())?;
    let v = field(xv.as_tensor())?;
    if v.shape() != x.shape() {
        bail!(
            "velocity field returned {:?} for a state of {:?}",
            v.shape(),
            x.shape()
        )
    }
    let b = x.dim(0)?;
    let flat = v.flatten_from(1)?;
    let d = flat.dim(1)?;
    let div = match mode {
        Divergence::Exact => {
            let mut cols = Vec::with_capacity(d);
            for i in 0..d {
                let g = flat.narrow(1, i, 1)?.sum_all()?.backward()?;
                let gx = g.get(xv.as_tensor()).ok_or_else(|| {
                    candle_core::Error::Msg("velocity does not depend on x".into())
                })?;
                cols.push(gx.flatten_from(1)?.narrow(1, i, 1)?);
            }
            Tensor::cat(&cols, 1)?.sum(1)?
        }
        Divergence::Rademacher | Divergence::Gaussian => {
            let eps = match probe {
                Some(p) => p.to_dtype(v.dtype())?,
                None => bail!("Hutchinson's estimator needs a probe"),
            };
            let g = (&v * &eps)?.sum_all()?.backward()?;
            let gx = g
                .get(xv.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("velocity does not depend on x".into()))?;
            (gx * eps)?.reshape((b, d))?.sum(1)?
        }
    };
    Ok((v.detach(), div.detach()))
}

/// A probe shaped like `x` for the given estimator (`None` for the exact trace).
pub fn draw_probe(mode: Divergence, like: &Tensor, rng: &mut GmRng) -> Result<Option<Tensor>> {
    Ok(match mode {
        Divergence::Exact => None,
        Divergence::Gaussian => Some(
            rng.randn(like.shape(), like.device())?
                .to_dtype(like.dtype())?,
        ),
        Divergence::Rademacher => {
            let half = Tensor::full(0.5f32, like.shape(), like.device())?;
            let b = rng.bernoulli(&half)?;
            Some(b.affine(2.0, -1.0)?.to_dtype(like.dtype())?)
        }
    })
}

/// `log N(z; 0, I)` per sample, `(B,)`.
pub fn std_normal_log_prob(z: &Tensor) -> Result<Tensor> {
    let d = z.elem_count() / z.dim(0)?.max(1);
    let sq = z.to_dtype(DType::F64)?.sqr()?.flatten_from(1)?.sum(1)?;
    let c = -0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln();
    ((sq * -0.5)? + c)?.to_dtype(z.dtype())
}

/// `log N(z; 0, σ² I)` per sample, `(B,)`.
pub fn normal_log_prob(z: &Tensor, std: f64) -> Result<Tensor> {
    let d = z.elem_count() / z.dim(0)?.max(1);
    std_normal_log_prob(&(z / std)?)? - d as f64 * std.ln()
}

/// `log p(x)` of data `x` at time `t_data` under the flow `dx/dt = field(t, x)` whose density at
/// `t_base` is `N(0, I)`: `(log p (B,) in nats, the solver's statistics)`. One probe per sample is
/// drawn from `rng` and kept for the whole solve.
pub fn log_likelihood(
    field: impl FnMut(f64, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    t_data: f64,
    t_base: f64,
    solver: &SolverConfig,
    mode: Divergence,
    rng: &mut GmRng,
) -> Result<(Tensor, OdeStats)> {
    log_likelihood_with_prior(
        field,
        x,
        t_data,
        t_base,
        solver,
        mode,
        rng,
        std_normal_log_prob,
    )
}

/// [`log_likelihood`] with another density at `t_base`: `prior(z)` is its log-density per sample
/// `(B,)` (a variance-exploding SDE's `N(0, σ_max² I)`, or an exact marginal in tests).
#[allow(clippy::too_many_arguments)]
pub fn log_likelihood_with_prior(
    mut field: impl FnMut(f64, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    t_data: f64,
    t_base: f64,
    solver: &SolverConfig,
    mode: Divergence,
    rng: &mut GmRng,
    prior: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, OdeStats)> {
    let probe = draw_probe(mode, x, rng)?;
    let b = x.dim(0)?;
    let l0 = Tensor::zeros(b, x.dtype(), x.device())?;
    let dynamics = |t: f64, s: &Vec<Tensor>| -> Result<Vec<Tensor>> {
        let mut f = |y: &Tensor| field(t, y);
        let (v, div) = velocity_and_divergence(&mut f, &s[0], mode, probe.as_ref())?;
        Ok(vec![v, div])
    };
    // l(t) = ∫_{t_data}^{t} div dt', so l(t_base) = −∫_{t_base}^{t_data} div.
    let (out, stats) = solve(dynamics, vec![x.detach(), l0], t_data, t_base, solver)?;
    let logp = (prior(&out[0])? + &out[1])?;
    Ok((logp, stats))
}

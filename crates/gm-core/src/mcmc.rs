//! Markov chain Monte Carlo on unnormalised log-densities: the Metropolis-adjusted Langevin
//! algorithm (MALA) and annealed importance sampling (AIS, Neal 2001) for log-normalisers.
//!
//! A log-density is any `f(x) -> (B,)` built from candle ops (an energy network's `−E(x)`); its
//! gradient comes from one first-order backward pass.

use crate::rng::GmRng;
use candle_core::{DType, Result, Tensor, Var};

/// `(f(x), ∇ₓ f(x))` per sample, both detached: `f(x)` is `(B,)`, the gradient shaped like `x`.
pub fn value_and_grad(
    f: &mut impl FnMut(&Tensor) -> Result<Tensor>,
    x: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let xv = Var::from_tensor(&x.detach())?;
    let v = f(xv.as_tensor())?;
    let g = v.sum_all()?.backward()?;
    let gx = g
        .get(xv.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("the log-density does not depend on x".into()))?
        .clone();
    Ok((v.detach(), gx.detach()))
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// One MALA step targeting `exp(f)`: the Langevin proposal `x' = x + δ∇f(x) + √(2δ) z`, accepted
/// with probability `min(1, exp(f(x') − f(x)) q(x | x') / q(x' | x))` per sample, so that `exp(f)`
/// stays invariant. Returns the new state and the fraction of samples accepted.
pub fn mala_step(
    f: &mut impl FnMut(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    step: f64,
    rng: &mut GmRng,
) -> Result<(Tensor, f64)> {
    let b = x.dim(0)?;
    let (fx, gx) = value_and_grad(f, x)?;
    let z = rng.randn(x.shape(), x.device())?.to_dtype(x.dtype())?;
    let mean_x = (x + (&gx * step)?)?;
    let y = (&mean_x + (z * (2.0 * step).sqrt())?)?;
    let (fy, gy) = value_and_grad(f, &y)?;
    let mean_y = (&y + (&gy * step)?)?;
    // log q(a | b) = −‖a − b − δ∇f(b)‖² / 4δ + const.
    let lq = |a: &Tensor, mean_b: &Tensor| -> Result<Vec<f64>> {
        to_f64(&((a - mean_b)?.sqr()?.flatten_from(1)?.sum(1)? * (-0.25 / step))?)
    };
    let (q_xy, q_yx) = (lq(x, &mean_y)?, lq(&y, &mean_x)?);
    let (fx, fy) = (to_f64(&fx)?, to_f64(&fy)?);
    let u = rng.per_sample_f64(b);
    let accept: Vec<f64> = (0..b)
        .map(|i| {
            let log_a = fy[i] - fx[i] + q_xy[i] - q_yx[i];
            f64::from(u[i].ln() < log_a)
        })
        .collect();
    let rate = accept.iter().sum::<f64>() / b as f64;
    let m = crate::diffusion::per_sample_values(accept, x)?;
    let out = (y.broadcast_mul(&m)? + x.broadcast_mul(&(1.0 - &m)?)?)?;
    Ok((out, rate))
}

/// `log mean exp(v)` and its delta-method standard error `sd(w)/(√n · mean(w))`, `w = exp(v)`.
pub fn log_mean_exp_with_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let mean = w.iter().sum::<f64>() / n;
    let var = w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m + mean.ln(), (var / n).sqrt() / mean)
}

/// What annealed importance sampling found.
#[derive(Clone, Debug)]
pub struct AisResult {
    /// `log Z` of the target, relative to the normalised start density.
    pub log_z: f64,
    /// Its delta-method standard error over chains.
    pub se: f64,
    /// Per-chain log importance weights.
    pub log_weights: Vec<f64>,
    /// The mean MALA acceptance rate.
    pub acceptance: f64,
    /// The chains' final states (approximate draws from the target).
    pub samples: Tensor,
}

/// Annealed importance sampling from a normalised density `log_q` (with draws `x0`) to an
/// unnormalised `log_f`, through `levels` geometric bridges `(1 − β) log q + β log f` with β
/// spaced evenly, `mala_steps` MALA steps of size `step` at each: `E[w] = Z_f`, so the estimate
/// `log mean w` is unbiased in `Z` (and a stochastic lower bound on `log Z` by Jensen).
#[allow(clippy::too_many_arguments)]
pub fn ais(
    mut log_q: impl FnMut(&Tensor) -> Result<Tensor>,
    mut log_f: impl FnMut(&Tensor) -> Result<Tensor>,
    x0: Tensor,
    levels: usize,
    mala_steps: usize,
    step: f64,
    rng: &mut GmRng,
) -> Result<AisResult> {
    if levels == 0 {
        candle_core::bail!("ais needs at least one bridge level")
    }
    let b = x0.dim(0)?;
    let mut logw = vec![0.0f64; b];
    let mut x = x0;
    let mut acc = 0.0;
    let mut moves = 0usize;
    for k in 1..=levels {
        let (b0, b1) = ((k - 1) as f64 / levels as f64, k as f64 / levels as f64);
        let diff = (log_f(&x)? - log_q(&x)?)?;
        for (w, d) in logw.iter_mut().zip(to_f64(&diff)?) {
            *w += (b1 - b0) * d;
        }
        let mut bridge =
            |y: &Tensor| -> Result<Tensor> { (log_q(y)? * (1.0 - b1))? + (log_f(y)? * b1)? };
        for _ in 0..mala_steps {
            let (nx, rate) = mala_step(&mut bridge, &x, step, rng)?;
            x = nx;
            acc += rate;
            moves += 1;
        }
    }
    let (log_z, se) = log_mean_exp_with_se(&logw);
    Ok(AisResult {
        log_z,
        se,
        log_weights: logw,
        acceptance: acc / moves.max(1) as f64,
        samples: x,
    })
}

//! Seed 001's ladder from EM to the VAE, as algorithms over one model interface.
//!
//! EM maximises the evidence lower bound
//! `ELBO(q, θ) = Σ_n Σ_k q_n(k) [log p(x_n, z = k | θ) − log q_n(k)] ≤ log p(x | θ)`
//! by coordinate ascent. Each rung relaxes one step:
//! - [`exact_em`]: the E-step sets `q` to the exact posterior (the bound becomes tight:
//!   ELBO = log-likelihood), the M-step maximises over `θ` in closed form;
//! - [`monte_carlo_em`]: the E-step's expectation is estimated from samples of the posterior
//!   (with a growing number of samples per iteration), the M-step uses the estimate;
//! - [`generalized_em`]: the M-step only improves `θ` — gradient steps on
//!   `Q(θ) = Σ_n Σ_k q_n(k) log p(x_n, k | θ)`, each accepted only if `Q` does not fall;
//! - mean field, where the posterior itself is intractable, is the variational
//!   Bayesian Gaussian mixture; the VAE (gm-models) is all of them at once, with an amortised
//!   encoder in place of per-point `q`.
//!
//! The models here have a discrete latent `z ∈ {1..K}` ([`LatentMixture`]):
//! [`BernoulliMixture`] (K prototypes of binary pixels, the classic EM-on-digits model) and
//! [`crate::em::GaussianMixture`]. Everything is f64 on the host (nalgebra), exact to round-off.

use crate::em::GaussianMixture;
use crate::GmRng;
use nalgebra::{DMatrix, DVector};

/// A mixture model `p(x, z = k | θ) = π_k p(x | k, θ)` with a closed-form M-step and a gradient
/// of its expected complete-data log-likelihood.
pub trait LatentMixture {
    /// The number of components `K`.
    fn components(&self) -> usize;

    /// `log π_k + log p(x_n | k)` for every point (row of `x`) and component: `(N, K)`.
    fn joint_log_prob(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>, String>;

    /// The closed-form maximiser of `Q(θ) + log p(θ)` given responsibilities `resp` `(N, K)`.
    fn m_step(&mut self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<(), String>;

    /// The parameters in an unconstrained form (logits), for [`generalized_em`].
    fn unconstrained(&self) -> Vec<f64>;

    /// Sets the parameters from [`LatentMixture::unconstrained`]'s form.
    fn set_unconstrained(&mut self, theta: &[f64]) -> Result<(), String>;

    /// The gradient of `(Q(θ) + log p(θ)) / N` with respect to the unconstrained parameters.
    fn q_gradient(&self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<Vec<f64>, String>;

    /// The log prior density of the parameters up to a constant (0 for maximum likelihood):
    /// EM then maximises `log p(x | θ) + log p(θ)`.
    fn log_prior(&self) -> f64 {
        0.0
    }
}

/// Row-wise log-sum-exp and the normalised log responsibilities `log p(k | x_n)`.
pub fn posterior(joint: &DMatrix<f64>) -> (DVector<f64>, DMatrix<f64>) {
    let mut log_resp = joint.clone();
    let mut ll = DVector::zeros(joint.nrows());
    for i in 0..joint.nrows() {
        let row = joint.row(i);
        let m = row.max();
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        ll[i] = lse;
        for v in log_resp.row_mut(i).iter_mut() {
            *v -= lse;
        }
    }
    (ll, log_resp)
}

/// `Σ_n Σ_k q_nk [joint_nk − log q_nk]` (terms with `q_nk = 0` contribute 0).
pub fn elbo(joint: &DMatrix<f64>, q: &DMatrix<f64>) -> f64 {
    joint
        .iter()
        .zip(q.iter())
        .filter(|(_, &q)| q > 0.0)
        .map(|(j, &q)| q * (j - q.ln()))
        .sum()
}

/// `Σ_n Σ_k q_nk joint_nk`: the expected complete-data log-likelihood `Q`.
fn expected_complete(joint: &DMatrix<f64>, q: &DMatrix<f64>) -> f64 {
    joint.iter().zip(q.iter()).map(|(j, q)| q * j).sum()
}

/// One iteration of a ladder algorithm, per point (nats): the log-likelihood `log p(x | θ_t)`
/// at the start of the iteration, the ELBO after the E-step `(q_t, θ_t)` and after the M-step
/// `(q_t, θ_{t+1})`, each plus `log p(θ)` / N where the model has a prior.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LadderStep {
    pub log_likelihood: f64,
    pub elbo_after_e: f64,
    pub elbo_after_m: f64,
}

/// The trace of a run, one entry per iteration.
pub type LadderTrace = Vec<LadderStep>;

/// One coordinate-ascent iteration with `q` from `e_step` and `θ` from `m_step`.
fn iterate<M: LatentMixture>(
    model: &mut M,
    x: &DMatrix<f64>,
    e_step: impl FnOnce(&DMatrix<f64>) -> DMatrix<f64>,
    m_step: impl FnOnce(&mut M, &DMatrix<f64>) -> Result<(), String>,
) -> Result<LadderStep, String> {
    let n = x.nrows() as f64;
    let joint = model.joint_log_prob(x)?;
    let (ll, log_resp) = posterior(&joint);
    let q = e_step(&log_resp);
    let prior = model.log_prior();
    let elbo_after_e = (elbo(&joint, &q) + prior) / n;
    m_step(model, &q)?;
    let elbo_after_m = (elbo(&model.joint_log_prob(x)?, &q) + model.log_prior()) / n;
    Ok(LadderStep {
        log_likelihood: (ll.sum() + prior) / n,
        elbo_after_e,
        elbo_after_m,
    })
}

/// Exact EM for `iters` iterations: `q` = the posterior, then the closed-form M-step.
pub fn exact_em<M: LatentMixture>(
    model: &mut M,
    x: &DMatrix<f64>,
    iters: usize,
) -> Result<LadderTrace, String> {
    (0..iters)
        .map(|_| {
            iterate(
                model,
                x,
                |log_resp| log_resp.map(f64::exp),
                |m, q| m.m_step(x, q),
            )
        })
        .collect()
}

/// Monte Carlo EM: the E-step draws `samples(t)` latents per point from the posterior at
/// iteration `t` and uses their frequencies as `q`; the M-step is exact. With `samples` growing,
/// the iterates approach exact EM's.
pub fn monte_carlo_em<M: LatentMixture>(
    model: &mut M,
    x: &DMatrix<f64>,
    iters: usize,
    samples: impl Fn(usize) -> usize,
    rng: &mut GmRng,
) -> Result<LadderTrace, String> {
    (0..iters)
        .map(|t| {
            let s = samples(t).max(1);
            iterate(
                model,
                x,
                |log_resp| {
                    let (n, k) = log_resp.shape();
                    let mut q = DMatrix::zeros(n, k);
                    for i in 0..n {
                        let u: Vec<f64> = (0..s).map(|_| rng.uniform_f64()).collect();
                        for u in u {
                            // Inverse-CDF draw of z from p(z | x_i).
                            let mut acc = 0.0;
                            let mut z = k - 1;
                            for j in 0..k {
                                acc += log_resp[(i, j)].exp();
                                if u < acc {
                                    z = j;
                                    break;
                                }
                            }
                            q[(i, z)] += 1.0 / s as f64;
                        }
                    }
                    q
                },
                |m, q| m.m_step(x, q),
            )
        })
        .collect()
}

/// Generalized EM: exact E-step, then `steps` gradient-ascent steps on `Q(θ) + log p(θ)` in the
/// unconstrained parameters, starting at rate `lr`; a step that would lower `Q` is retried at
/// half the rate (up to 30 times), so `Q` — and with it the ELBO — never decreases.
pub fn generalized_em<M: LatentMixture>(
    model: &mut M,
    x: &DMatrix<f64>,
    iters: usize,
    steps: usize,
    lr: f64,
) -> Result<LadderTrace, String> {
    (0..iters)
        .map(|_| {
            iterate(
                model,
                x,
                |log_resp| log_resp.map(f64::exp),
                |m, q| gradient_m_step(m, x, q, steps, lr),
            )
        })
        .collect()
}

fn gradient_m_step<M: LatentMixture>(
    model: &mut M,
    x: &DMatrix<f64>,
    q: &DMatrix<f64>,
    steps: usize,
    lr: f64,
) -> Result<(), String> {
    let objective = |m: &M| -> Result<f64, String> {
        Ok(expected_complete(&m.joint_log_prob(x)?, q) + m.log_prior())
    };
    let mut current = objective(model)?;
    for _ in 0..steps {
        let theta = model.unconstrained();
        let g = model.q_gradient(x, q)?;
        let mut rate = lr;
        let mut accepted = false;
        for _ in 0..30 {
            let next: Vec<f64> = theta.iter().zip(&g).map(|(t, g)| t + rate * g).collect();
            model.set_unconstrained(&next)?;
            let value = objective(model)?;
            if value >= current {
                current = value;
                accepted = true;
                break;
            }
            rate *= 0.5;
        }
        if !accepted {
            model.set_unconstrained(&theta)?;
            break;
        }
    }
    Ok(())
}

/// Mean log-likelihood `log p(x_n | θ)` per point under the model, in nats (no prior term: the
/// score of held-out data).
pub fn score(model: &impl LatentMixture, x: &DMatrix<f64>) -> Result<f64, String> {
    let (ll, _) = posterior(&model.joint_log_prob(x)?);
    Ok(ll.mean())
}

/// A mixture of `K` products of Bernoullis over `D` binary pixels: `p(x) = Σ_k π_k Π_d
/// μ_kd^x_d (1 − μ_kd)^(1 − x_d)`.
///
/// `pseudo_count` `c ≥ 0` puts a `Beta(1 + c, 1 + c)` prior on every `μ_kd` (EM is then MAP-EM,
/// keeping `μ` away from 0 and 1 so unseen pixels do not cost infinitely many nats); `c = 0` is
/// maximum likelihood.
#[derive(Clone, Debug, PartialEq)]
pub struct BernoulliMixture {
    pub weights: Vec<f64>,
    /// `(K, D)` pixel probabilities.
    pub probs: DMatrix<f64>,
    pub pseudo_count: f64,
}

impl BernoulliMixture {
    pub fn new(weights: Vec<f64>, probs: DMatrix<f64>, pseudo_count: f64) -> Result<Self, String> {
        if weights.len() != probs.nrows() || weights.is_empty() {
            return Err(format!(
                "BernoulliMixture: {} weights for {} components",
                weights.len(),
                probs.nrows()
            ));
        }
        if probs.iter().any(|p| !(*p > 0.0 && *p < 1.0)) {
            return Err("BernoulliMixture: probabilities must be in (0, 1)".into());
        }
        if pseudo_count.is_nan() || pseudo_count < 0.0 {
            return Err(format!(
                "BernoulliMixture: pseudo_count must be >= 0, got {pseudo_count}"
            ));
        }
        Ok(Self {
            weights,
            probs,
            pseudo_count,
        })
    }

    /// Equal weights and probabilities drawn uniformly from `[0.25, 0.75]` (the classic start).
    pub fn random(k: usize, d: usize, pseudo_count: f64, rng: &mut GmRng) -> Self {
        let u: Vec<f64> = (0..k * d).map(|_| rng.uniform_f64()).collect();
        Self {
            weights: vec![1.0 / k as f64; k],
            probs: DMatrix::from_row_slice(k, d, &u).map(|u| 0.25 + 0.5 * u),
            pseudo_count,
        }
    }
}

impl LatentMixture for BernoulliMixture {
    fn components(&self) -> usize {
        self.weights.len()
    }

    fn joint_log_prob(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>, String> {
        if x.ncols() != self.probs.ncols() {
            return Err(format!(
                "BernoulliMixture: data has {} columns, the mixture {} pixels",
                x.ncols(),
                self.probs.ncols()
            ));
        }
        // x log μ + (1 − x) log(1 − μ) = x (log μ − log(1 − μ)) + log(1 − μ).
        let log1m = self.probs.map(|p| (1.0 - p).ln());
        let logit = self.probs.map(|p| p.ln()) - &log1m;
        let mut j = x * logit.transpose();
        let base: Vec<f64> = (0..self.components())
            .map(|k| log1m.row(k).sum() + self.weights[k].ln())
            .collect();
        for mut row in j.row_iter_mut() {
            for (v, b) in row.iter_mut().zip(&base) {
                *v += b;
            }
        }
        Ok(j)
    }

    fn m_step(&mut self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<(), String> {
        let n = x.nrows() as f64;
        let c = self.pseudo_count;
        let nk: Vec<f64> = resp.column_iter().map(|col| col.sum()).collect();
        let sums = resp.transpose() * x; // (K, D)
        for k in 0..self.components() {
            for d in 0..self.probs.ncols() {
                // MAP under Beta(1 + c, 1 + c); an empty component keeps its probabilities.
                let den = nk[k] + 2.0 * c;
                if den > 0.0 {
                    self.probs[(k, d)] = (sums[(k, d)] + c) / den;
                }
            }
            self.weights[k] = nk[k] / n;
        }
        if self.probs.iter().any(|p| *p <= 0.0 || *p >= 1.0) {
            return Err(
                "BernoulliMixture: a pixel probability reached 0 or 1 (give pseudo_count > 0)"
                    .into(),
            );
        }
        Ok(())
    }

    fn unconstrained(&self) -> Vec<f64> {
        let mut t: Vec<f64> = self.weights.iter().map(|w| w.ln()).collect();
        t.extend(self.probs.iter().map(|p| (p / (1.0 - p)).ln()));
        t
    }

    fn set_unconstrained(&mut self, theta: &[f64]) -> Result<(), String> {
        let k = self.components();
        if theta.len() != k + self.probs.len() {
            return Err("BernoulliMixture: wrong number of parameters".into());
        }
        let m = theta[..k].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = theta[..k].iter().map(|t| (t - m).exp()).sum();
        self.weights = theta[..k].iter().map(|t| (t - m).exp() / z).collect();
        for (p, t) in self.probs.iter_mut().zip(&theta[k..]) {
            *p = 1.0 / (1.0 + (-t).exp());
        }
        Ok(())
    }

    /// With `π = softmax(a)`, `μ = σ(b)`: `∂/∂a_k = (N_k − N π_k) / N` and
    /// `∂/∂b_kd = (Σ_n r_nk x_nd − N_k μ_kd + c (1 − 2μ_kd)) / N`.
    fn q_gradient(&self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<Vec<f64>, String> {
        let n = x.nrows() as f64;
        let c = self.pseudo_count;
        let nk: Vec<f64> = resp.column_iter().map(|col| col.sum()).collect();
        let total: f64 = nk.iter().sum();
        let mut g: Vec<f64> = (0..self.components())
            .map(|k| (nk[k] - total * self.weights[k]) / n)
            .collect();
        let sums = resp.transpose() * x;
        // Column-major, like `probs.iter()`.
        for d in 0..self.probs.ncols() {
            for k in 0..self.components() {
                let mu = self.probs[(k, d)];
                g.push((sums[(k, d)] - nk[k] * mu + c * (1.0 - 2.0 * mu)) / n);
            }
        }
        Ok(g)
    }

    fn log_prior(&self) -> f64 {
        let c = self.pseudo_count;
        match c > 0.0 {
            true => self
                .probs
                .iter()
                .map(|p| c * (p.ln() + (1.0 - p).ln()))
                .sum(),
            false => 0.0,
        }
    }
}

/// The Gaussian mixture on the ladder: its exact M-step is [`GaussianMixture`]'s own (with
/// `reg_covar` on the diagonal); [`generalized_em`] moves only the weights and the means
/// (the covariances stay), which is still an increase of `Q`.
pub struct GaussianLadder {
    pub gmm: GaussianMixture,
    pub reg_covar: f64,
}

impl LatentMixture for GaussianLadder {
    fn components(&self) -> usize {
        self.gmm.weights.len()
    }

    fn joint_log_prob(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>, String> {
        self.gmm.weighted_log_prob(x)
    }

    fn m_step(&mut self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<(), String> {
        self.gmm.m_step(x, resp, self.reg_covar);
        Ok(())
    }

    fn unconstrained(&self) -> Vec<f64> {
        let mut t: Vec<f64> = self.gmm.weights.iter().map(|w| w.ln()).collect();
        for m in &self.gmm.means {
            t.extend(m.iter());
        }
        t
    }

    fn set_unconstrained(&mut self, theta: &[f64]) -> Result<(), String> {
        let k = self.components();
        let d = self.gmm.means[0].len();
        if theta.len() != k + k * d {
            return Err("GaussianLadder: wrong number of parameters".into());
        }
        let m = theta[..k].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = theta[..k].iter().map(|t| (t - m).exp()).sum();
        self.gmm.weights = theta[..k].iter().map(|t| (t - m).exp() / z).collect();
        for (j, mean) in self.gmm.means.iter_mut().enumerate() {
            *mean = DVector::from_column_slice(&theta[k + j * d..k + (j + 1) * d]);
        }
        Ok(())
    }

    /// `∂/∂a_k = (N_k − N π_k) / N`, `∂/∂μ_k = Σ_k⁻¹ Σ_n r_nk (x_n − μ_k) / N`.
    fn q_gradient(&self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<Vec<f64>, String> {
        let n = x.nrows() as f64;
        let nk: Vec<f64> = resp.column_iter().map(|col| col.sum()).collect();
        let total: f64 = nk.iter().sum();
        let mut g: Vec<f64> = (0..self.components())
            .map(|k| (nk[k] - total * self.gmm.weights[k]) / n)
            .collect();
        for (k, mean) in self.gmm.means.iter().enumerate() {
            let mut s = DVector::zeros(mean.len());
            for i in 0..x.nrows() {
                s += (x.row(i).transpose() - mean) * resp[(i, k)];
            }
            let chol = self.gmm.covariances[k]
                .clone()
                .cholesky()
                .ok_or_else(|| format!("component {k}: covariance is not positive definite"))?;
            g.extend(chol.solve(&s).iter().map(|v| v / n));
        }
        Ok(g)
    }
}

/// Variational EM on the mixture of Bernoullis with its parameters integrated out: priors
/// `π ~ Dir(α₀)`, `μ_kd ~ Beta(a₀, b₀)`, and the mean-field posterior
/// `q(z) q(π) Π_kd q(μ_kd)` with `q(π) = Dir(α)`, `q(μ_kd) = Beta(a_kd, b_kd)`. The posterior
/// over `(z, π, μ)` is intractable; each coordinate update of the factorised one is closed-form
/// (conjugacy), and the ELBO lower-bounds the evidence `log p(x) = log ∫ p(x | θ) p(θ) dθ`.
#[derive(Clone, Debug)]
pub struct VbBernoulliMixture {
    pub alpha0: f64,
    pub a0: f64,
    pub b0: f64,
    /// `α_k` of `q(π)`.
    pub alpha: Vec<f64>,
    /// `(K, D)` Beta parameters of `q(μ_kd)`.
    pub a: DMatrix<f64>,
    pub b: DMatrix<f64>,
}

impl VbBernoulliMixture {
    /// `q(θ)` centred on a point estimate: `a = s μ`, `b = s (1 − μ)`, `α = s π` (strength `s`).
    pub fn around(m: &BernoulliMixture, strength: f64, alpha0: f64, a0: f64, b0: f64) -> Self {
        Self {
            alpha0,
            a0,
            b0,
            alpha: m.weights.iter().map(|w| strength * w).collect(),
            a: m.probs.map(|p| strength * p),
            b: m.probs.map(|p| strength * (1.0 - p)),
        }
    }

    /// `E_q[log π_k + log p(x_n | μ_k)]`, `(N, K)`.
    fn expected_log_joint(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        use crate::vbgmm::digamma;
        let ab = (&self.a + &self.b).map(digamma);
        let log_mu = self.a.map(digamma) - &ab;
        let log_1m = self.b.map(digamma) - &ab;
        let sum_alpha = digamma(self.alpha.iter().sum());
        let mut j = x * (&log_mu - &log_1m).transpose();
        for (k, mut col) in j.column_iter_mut().enumerate() {
            let base = log_1m.row(k).sum() + digamma(self.alpha[k]) - sum_alpha;
            col.add_scalar_mut(base);
        }
        j
    }

    /// `Σ_n E_q[log p(x_n, z_n | θ)] + H[q(z)] − KL(q(π) ‖ p(π)) − Σ_kd KL(q(μ_kd) ‖ p(μ_kd))`.
    fn elbo(&self, x: &DMatrix<f64>, q: &DMatrix<f64>) -> f64 {
        use crate::vbgmm::{digamma, ln_gamma};
        let data = elbo(&self.expected_log_joint(x), q);
        let k = self.alpha.len() as f64;
        let s: f64 = self.alpha.iter().sum();
        let kl_pi = ln_gamma(s)
            - self.alpha.iter().map(|&a| ln_gamma(a)).sum::<f64>()
            - ln_gamma(k * self.alpha0)
            + k * ln_gamma(self.alpha0)
            + self
                .alpha
                .iter()
                .map(|&a| (a - self.alpha0) * (digamma(a) - digamma(s)))
                .sum::<f64>();
        let ln_beta = |a: f64, b: f64| ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b);
        let kl_mu: f64 = self
            .a
            .iter()
            .zip(self.b.iter())
            .map(|(&a, &b)| {
                ln_beta(self.a0, self.b0) - ln_beta(a, b)
                    + (a - self.a0) * digamma(a)
                    + (b - self.b0) * digamma(b)
                    + (self.a0 - a + self.b0 - b) * digamma(a + b)
            })
            .sum();
        data - kl_pi - kl_mu
    }

    /// `iters` sweeps: `q(z)` from the expected log-parameters, then `q(π)` and `q(μ)` from the
    /// responsibilities. `log_likelihood` is NaN (the evidence is intractable); the ELBOs are
    /// per point.
    pub fn fit(&mut self, x: &DMatrix<f64>, iters: usize) -> Result<LadderTrace, String> {
        if x.ncols() != self.a.ncols() {
            return Err(format!(
                "VbBernoulliMixture: data has {} columns, the mixture {} pixels",
                x.ncols(),
                self.a.ncols()
            ));
        }
        let n = x.nrows() as f64;
        let mut trace = Vec::with_capacity(iters);
        for _ in 0..iters {
            let (_, log_resp) = posterior(&self.expected_log_joint(x));
            let q = log_resp.map(f64::exp);
            let elbo_after_e = self.elbo(x, &q) / n;
            let nk: Vec<f64> = q.column_iter().map(|c| c.sum()).collect();
            let on = q.transpose() * x; // (K, D)
            for k in 0..self.alpha.len() {
                self.alpha[k] = self.alpha0 + nk[k];
                for d in 0..self.a.ncols() {
                    self.a[(k, d)] = self.a0 + on[(k, d)];
                    self.b[(k, d)] = self.b0 + nk[k] - on[(k, d)];
                }
            }
            trace.push(LadderStep {
                log_likelihood: f64::NAN,
                elbo_after_e,
                elbo_after_m: self.elbo(x, &q) / n,
            });
        }
        Ok(trace)
    }
}

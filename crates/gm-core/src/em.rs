//! The seeds' first maximum-likelihood examples, as library code.
//!
//! - [`coin_mle`] / [`coin_mle_gradient_ascent`]: a biased coin, where the MLE has a closed form
//!   `θ* = #H / (#H + #T)` and gradient ascent on the log-likelihood finds the same point.
//! - [`GaussianMixture`]: a mixture of full-covariance Gaussians fitted by
//!   expectation–maximisation (seed 001: EM is coordinate ascent on the ELBO, with the E-step
//!   making the bound tight by setting q(z) to the exact posterior). Its updates follow
//!   scikit-learn's `GaussianMixture` exactly (including `reg_covar` on the diagonal and the
//!   stopping rule on the change of the mean log-likelihood), so the two agree to round-off.

use candle_core::{DType, Device, Tensor, Var};
use nalgebra::{DMatrix, DVector};

/// Closed-form MLE of a coin's heads probability.
///
/// ```
/// let theta = gm_core::em::coin_mle(7, 3).unwrap();
/// assert!((theta - 0.7).abs() < 1e-12);
/// let by_gradient = gm_core::em::coin_mle_gradient_ascent(7, 3, 2000, 0.5).unwrap();
/// assert!((by_gradient - theta).abs() < 1e-6);
/// ```
pub fn coin_mle(heads: u64, tails: u64) -> Result<f64, String> {
    if heads + tails == 0 {
        return Err("coin_mle: no tosses".into());
    }
    Ok(heads as f64 / (heads + tails) as f64)
}

/// Maximises `H log θ + T log(1 − θ)` by gradient ascent with candle's autograd, θ = σ(φ) so it
/// stays in (0, 1). The gradient is averaged per toss so `lr` does not depend on the count.
pub fn coin_mle_gradient_ascent(
    heads: u64,
    tails: u64,
    steps: usize,
    lr: f64,
) -> candle_core::Result<f64> {
    let n = (heads + tails) as f64;
    if n == 0.0 {
        candle_core::bail!("coin_mle_gradient_ascent: no tosses")
    }
    let phi = Var::from_tensor(&Tensor::zeros((), DType::F64, &Device::Cpu)?)?;
    for _ in 0..steps {
        let theta = candle_nn::ops::sigmoid(phi.as_tensor())?;
        let ll = ((theta.log()? * heads as f64)? + ((1.0 - &theta)?.log()? * tails as f64)?)?;
        let g = (ll / n)?.backward()?;
        let g = g.get(phi.as_tensor()).expect("phi is in the graph");
        phi.set(&(phi.as_tensor() + (g * lr)?)?)?;
    }
    candle_nn::ops::sigmoid(phi.as_tensor())?.to_scalar::<f64>()
}

/// A mixture of `K` full-covariance Gaussians in `D` dimensions.
///
/// ```
/// use gm_core::em::{EmOptions, GaussianMixture};
/// use nalgebra::{DMatrix, DVector};
/// // Two well-separated 1-D clusters.
/// let pts = [-2.1, -1.9, -2.0, -2.2, 3.0, 3.1, 2.9, 3.2];
/// let x = DMatrix::from_column_slice(8, 1, &pts);
/// let mut gmm = GaussianMixture::new(
///     vec![0.5, 0.5],
///     vec![DVector::from_vec(vec![-1.0]), DVector::from_vec(vec![1.0])],
///     vec![DMatrix::identity(1, 1), DMatrix::identity(1, 1)],
/// )
/// .unwrap();
/// let before = gmm.score(&x).unwrap();
/// let report = gmm.fit_em(&x, &EmOptions { tol: 1e-10, ..Default::default() }).unwrap();
/// assert!(report.converged && gmm.score(&x).unwrap() > before);
/// assert!((gmm.means[0][0] + 2.05).abs() < 1e-6 && (gmm.means[1][0] - 3.05).abs() < 1e-6);
/// ```
#[derive(Clone, Debug)]
pub struct GaussianMixture {
    pub weights: Vec<f64>,
    pub means: Vec<DVector<f64>>,
    pub covariances: Vec<DMatrix<f64>>,
}

/// Stopping rule and regularisation of [`GaussianMixture::fit_em`] (scikit-learn's names).
#[derive(Clone, Debug)]
pub struct EmOptions {
    pub max_iter: usize,
    /// Stop when the mean log-likelihood changes by less than this.
    pub tol: f64,
    /// Added to every covariance diagonal after each M-step.
    pub reg_covar: f64,
}

impl Default for EmOptions {
    fn default() -> Self {
        Self {
            max_iter: 100,
            tol: 1e-3,
            reg_covar: 1e-6,
        }
    }
}

/// What a fit did.
#[derive(Clone, Debug)]
pub struct EmReport {
    pub n_iter: usize,
    pub converged: bool,
    /// Mean log-likelihood per point (nats) before each M-step; never decreases.
    pub trace: Vec<f64>,
}

impl GaussianMixture {
    pub fn new(
        weights: Vec<f64>,
        means: Vec<DVector<f64>>,
        covariances: Vec<DMatrix<f64>>,
    ) -> Result<Self, String> {
        let k = weights.len();
        if k == 0 || means.len() != k || covariances.len() != k {
            return Err(format!(
                "GaussianMixture: {} weights, {} means, {} covariances",
                k,
                means.len(),
                covariances.len()
            ));
        }
        let d = means[0].len();
        for (i, (m, c)) in means.iter().zip(&covariances).enumerate() {
            if m.len() != d || c.nrows() != d || c.ncols() != d {
                return Err(format!(
                    "GaussianMixture: component {i} has inconsistent dimensions"
                ));
            }
        }
        Ok(Self {
            weights,
            means,
            covariances,
        })
    }

    /// `log π_k + log N(x_n | μ_k, Σ_k)` for every point and component, `(N, K)`.
    pub(crate) fn weighted_log_prob(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>, String> {
        let (n, d) = x.shape();
        let k = self.weights.len();
        let mut out = DMatrix::zeros(n, k);
        let c0 = -0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln();
        for j in 0..k {
            let chol = self.covariances[j]
                .clone()
                .cholesky()
                .ok_or_else(|| format!("component {j}: covariance is not positive definite"))?;
            let log_det: f64 = chol.l().diagonal().iter().map(|v| v.ln()).sum::<f64>() * 2.0;
            let lw = self.weights[j].ln();
            for i in 0..n {
                let diff = x.row(i).transpose() - &self.means[j];
                let sol = chol.l().solve_lower_triangular(&diff).expect("triangular");
                out[(i, j)] = lw + c0 - 0.5 * log_det - 0.5 * sol.norm_squared();
            }
        }
        Ok(out)
    }

    /// Per-point log-likelihood and the log responsibilities `log p(z = k | x_n)`.
    fn e_step(&self, x: &DMatrix<f64>) -> Result<(DVector<f64>, DMatrix<f64>), String> {
        Ok(crate::ladder::posterior(&self.weighted_log_prob(x)?))
    }

    /// The closed-form M-step from responsibilities `resp` `(N, K)`.
    pub(crate) fn m_step(&mut self, x: &DMatrix<f64>, resp: &DMatrix<f64>, reg_covar: f64) {
        let (n, d) = x.shape();
        let k = self.weights.len();
        let eps10 = 10.0 * f64::EPSILON;
        let nk: Vec<f64> = (0..k).map(|j| resp.column(j).sum() + eps10).collect();
        for j in 0..k {
            let mut mean = DVector::zeros(d);
            for i in 0..n {
                mean += x.row(i).transpose() * resp[(i, j)];
            }
            mean /= nk[j];
            let mut cov = DMatrix::zeros(d, d);
            for i in 0..n {
                let diff = x.row(i).transpose() - &mean;
                cov += &diff * diff.transpose() * resp[(i, j)];
            }
            cov /= nk[j];
            for a in 0..d {
                cov[(a, a)] += reg_covar;
            }
            self.means[j] = mean;
            self.covariances[j] = cov;
        }
        let total: f64 = nk.iter().sum();
        self.weights = nk.iter().map(|v| v / total).collect();
    }

    /// Mean log-likelihood per point, in nats.
    pub fn score(&self, x: &DMatrix<f64>) -> Result<f64, String> {
        let (ll, _) = self.e_step(x)?;
        Ok(ll.mean())
    }

    /// Runs EM from the current parameters. `x` is `(N, D)`, one point per row.
    pub fn fit_em(&mut self, x: &DMatrix<f64>, opts: &EmOptions) -> Result<EmReport, String> {
        if x.ncols() != self.means[0].len() {
            return Err(format!(
                "fit_em: data has {} columns, the mixture {} dimensions",
                x.ncols(),
                self.means[0].len()
            ));
        }
        let mut lower = f64::NEG_INFINITY;
        let mut trace = Vec::new();
        for it in 1..=opts.max_iter {
            let prev = lower;
            let (ll, log_resp) = self.e_step(x)?;
            self.m_step(x, &log_resp.map(f64::exp), opts.reg_covar);
            lower = ll.mean();
            trace.push(lower);
            if (lower - prev).abs() < opts.tol {
                return Ok(EmReport {
                    n_iter: it,
                    converged: true,
                    trace,
                });
            }
        }
        Ok(EmReport {
            n_iter: opts.max_iter,
            converged: false,
            trace,
        })
    }
}

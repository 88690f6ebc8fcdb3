//! Variational EM on the ladder's intractable rung: the variational Bayesian Gaussian mixture
//! (Bishop, PRML §10.2), whose posterior over the assignments *and* the parameters has no closed
//! form. Mean field `q(z) q(π) Π_k q(μ_k, Λ_k)` with a Dirichlet prior on the weights and a
//! Gaussian–Wishart prior on each component makes every coordinate update closed-form: the E-step
//! updates `q(z)` (responsibilities from expected log-parameters), the M-step updates the
//! Dirichlet and Gaussian–Wishart factors. Each sweep raises the ELBO.
//!
//! The updates, priors and defaults are scikit-learn's `BayesianGaussianMixture` with
//! `covariance_type = "full"` and `weight_concentration_prior_type = "dirichlet_distribution"`,
//! so the two agree to round-off from the same responsibilities (`scripts/vbgmm_sklearn.py`
//! and the test). Like scikit-learn's, [`VbGmm::lower_bound`] leaves out terms that do not
//! change across iterations.

use nalgebra::{DMatrix, DVector};

/// `ψ(x)`, the digamma function, for `x > 0` (recurrence to `x ≥ 10`, then the asymptotic series;
/// ~1e-14 relative).
pub fn digamma(mut x: f64) -> f64 {
    let mut r = 0.0;
    while x < 10.0 {
        r -= 1.0 / x;
        x += 1.0;
    }
    let f = 1.0 / (x * x);
    r + x.ln()
        - 0.5 / x
        - f * (1.0 / 12.0
            - f * (1.0 / 120.0
                - f * (1.0 / 252.0 - f * (1.0 / 240.0 - f * (1.0 / 132.0 - f * 691.0 / 32760.0)))))
}

/// `log Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; ~1e-15 relative).
pub fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let a = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |a, (i, g)| a + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Priors of [`VbGmm`] (scikit-learn's names); [`VbGmmPriors::defaults`] gives its defaults.
#[derive(Clone, Debug)]
pub struct VbGmmPriors {
    /// Dirichlet concentration of every weight (scikit-learn: `1 / K`).
    pub weight_concentration: f64,
    /// Precision scale `β₀` of the means' prior (1).
    pub mean_precision: f64,
    /// Mean `m₀` of the means' prior (the data mean).
    pub mean: DVector<f64>,
    /// Wishart degrees of freedom `ν₀` (D).
    pub degrees_of_freedom: f64,
    /// Wishart scale as a covariance `W₀⁻¹` (the data covariance, `np.cov`).
    pub covariance: DMatrix<f64>,
}

impl VbGmmPriors {
    /// scikit-learn's defaults for `k` components on data `x` `(N, D)`.
    pub fn defaults(x: &DMatrix<f64>, k: usize) -> Self {
        let (n, d) = x.shape();
        let mean = x.row_mean().transpose();
        let mut cov = DMatrix::zeros(d, d);
        for i in 0..n {
            let diff = x.row(i).transpose() - &mean;
            cov += &diff * diff.transpose();
        }
        cov /= (n - 1) as f64;
        Self {
            weight_concentration: 1.0 / k as f64,
            mean_precision: 1.0,
            mean,
            degrees_of_freedom: d as f64,
            covariance: cov,
        }
    }
}

/// The variational posterior of a Bayesian Gaussian mixture with full covariances.
#[derive(Clone, Debug)]
pub struct VbGmm {
    pub priors: VbGmmPriors,
    /// Added to the diagonal of each component's data covariance.
    pub reg_covar: f64,
    /// Dirichlet parameters `α_k` of `q(π)`.
    pub weight_concentration: Vec<f64>,
    /// `β_k`, `m_k`, `ν_k` and the Wishart scale as a covariance `W_k⁻¹ / ν_k` of `q(μ_k, Λ_k)`.
    pub mean_precision: Vec<f64>,
    pub means: Vec<DVector<f64>>,
    pub degrees_of_freedom: Vec<f64>,
    pub covariances: Vec<DMatrix<f64>>,
}

/// One sweep of [`VbGmm::fit`]: the ELBO (up to a constant) after it.
#[derive(Clone, Debug)]
pub struct VbTrace {
    pub lower_bound: Vec<f64>,
}

impl VbGmm {
    /// The posterior after one M-step from responsibilities `resp` `(N, K)` (scikit-learn's
    /// `_initialize`).
    pub fn from_responsibilities(
        x: &DMatrix<f64>,
        resp: &DMatrix<f64>,
        priors: VbGmmPriors,
        reg_covar: f64,
    ) -> Result<Self, String> {
        let k = resp.ncols();
        if resp.nrows() != x.nrows() || priors.mean.len() != x.ncols() {
            return Err("VbGmm: responsibilities, data and priors disagree in shape".into());
        }
        let d = x.ncols();
        let mut m = Self {
            priors,
            reg_covar,
            weight_concentration: vec![0.0; k],
            mean_precision: vec![0.0; k],
            means: vec![DVector::zeros(d); k],
            degrees_of_freedom: vec![0.0; k],
            covariances: vec![DMatrix::zeros(d, d); k],
        };
        m.m_step(x, resp)?;
        Ok(m)
    }

    /// Updates `q(π)` and `q(μ_k, Λ_k)` from responsibilities.
    pub fn m_step(&mut self, x: &DMatrix<f64>, resp: &DMatrix<f64>) -> Result<(), String> {
        let (n, d) = x.shape();
        let p = &self.priors;
        for k in 0..resp.ncols() {
            let nk = resp.column(k).sum() + 10.0 * f64::EPSILON;
            let mut xk = DVector::zeros(d);
            for i in 0..n {
                xk += x.row(i).transpose() * resp[(i, k)];
            }
            xk /= nk;
            let mut sk = DMatrix::zeros(d, d);
            for i in 0..n {
                let diff = x.row(i).transpose() - &xk;
                sk += &diff * diff.transpose() * resp[(i, k)];
            }
            sk /= nk;
            for a in 0..d {
                sk[(a, a)] += self.reg_covar;
            }
            self.weight_concentration[k] = p.weight_concentration + nk;
            let beta = p.mean_precision + nk;
            self.mean_precision[k] = beta;
            self.means[k] = (&p.mean * p.mean_precision + &xk * nk) / beta;
            let nu = p.degrees_of_freedom + nk;
            self.degrees_of_freedom[k] = nu;
            let diff = &xk - &p.mean;
            let cov = &p.covariance
                + &sk * nk
                + &diff * diff.transpose() * (nk * p.mean_precision / beta);
            self.covariances[k] = cov / nu;
        }
        Ok(())
    }

    /// The precision Cholesky factor `U_k` with `U_k U_kᵀ = Σ_k⁻¹` (scikit-learn's
    /// `precisions_cholesky_`), and `log det U_k`.
    fn precision_cholesky(&self, k: usize) -> Result<(DMatrix<f64>, f64), String> {
        let d = self.means[k].len();
        let chol = self.covariances[k]
            .clone()
            .cholesky()
            .ok_or_else(|| format!("component {k}: covariance is not positive definite"))?;
        let u = chol
            .l()
            .solve_lower_triangular(&DMatrix::identity(d, d))
            .ok_or("singular Cholesky factor")?
            .transpose();
        let log_det = u.diagonal().iter().map(|v| v.ln()).sum();
        Ok((u, log_det))
    }

    /// `E_q[log π_k + log N(x_n | μ_k, Λ_k⁻¹)]` for every point and component `(N, K)`.
    pub fn expected_log_joint(&self, x: &DMatrix<f64>) -> Result<DMatrix<f64>, String> {
        let (n, d) = x.shape();
        let k = self.means.len();
        let df = d as f64;
        let alpha_sum: f64 = self.weight_concentration.iter().sum();
        let mut out = DMatrix::zeros(n, k);
        for j in 0..k {
            let (u, log_det) = self.precision_cholesky(j)?;
            let nu = self.degrees_of_freedom[j];
            let log_lambda =
                df * 2f64.ln() + (0..d).map(|i| digamma(0.5 * (nu - i as f64))).sum::<f64>();
            let log_w = digamma(self.weight_concentration[j]) - digamma(alpha_sum);
            let mu_u = self.means[j].transpose() * &u;
            let y = x * &u;
            for i in 0..n {
                let sq = (y.row(i) - &mu_u).norm_squared();
                let log_gauss = -0.5 * (df * (2.0 * std::f64::consts::PI).ln() + sq) + log_det
                    - 0.5 * df * nu.ln();
                out[(i, j)] = log_gauss + 0.5 * (log_lambda - df / self.mean_precision[j]) + log_w;
            }
        }
        Ok(out)
    }

    /// The ELBO up to terms constant across iterations (scikit-learn's `_compute_lower_bound`)
    /// for log responsibilities `log_resp` and the current factors.
    pub fn lower_bound(&self, log_resp: &DMatrix<f64>) -> Result<f64, String> {
        let d = self.means[0].len();
        let df = d as f64;
        let mut log_wishart = 0.0;
        for k in 0..self.means.len() {
            let (_, log_det) = self.precision_cholesky(k)?;
            let nu = self.degrees_of_freedom[k];
            let log_det = log_det - 0.5 * df * nu.ln();
            log_wishart += -(nu * log_det
                + nu * df * 0.5 * 2f64.ln()
                + (0..d).map(|i| ln_gamma(0.5 * (nu - i as f64))).sum::<f64>());
        }
        let a = &self.weight_concentration;
        let log_dirichlet = ln_gamma(a.iter().sum()) - a.iter().map(|&v| ln_gamma(v)).sum::<f64>();
        let entropy: f64 = log_resp.iter().map(|l| -l.exp() * l).sum();
        let log_beta: f64 = self.mean_precision.iter().map(|b| b.ln()).sum();
        Ok(entropy - log_wishart - log_dirichlet - 0.5 * df * log_beta)
    }

    /// `iters` sweeps of coordinate ascent (E-step on `q(z)`, then the factors), returning the
    /// lower bound after each (scikit-learn's order: E-step, M-step, bound).
    pub fn fit(&mut self, x: &DMatrix<f64>, iters: usize) -> Result<VbTrace, String> {
        let mut lower_bound = Vec::with_capacity(iters);
        for _ in 0..iters {
            let (_, log_resp) = crate::ladder::posterior(&self.expected_log_joint(x)?);
            self.m_step(x, &log_resp.map(f64::exp))?;
            lower_bound.push(self.lower_bound(&log_resp)?);
        }
        Ok(VbTrace { lower_bound })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_functions_match_known_values() {
        // ψ(1) = −γ, ψ(1/2) = −γ − 2 ln 2, ψ(10) = H_9 − γ.
        let gamma = 0.577_215_664_901_532_9;
        assert!((digamma(1.0) + gamma).abs() < 1e-13);
        assert!((digamma(0.5) + gamma + 2.0 * 2f64.ln()).abs() < 1e-13);
        let h9: f64 = (1..10).map(|i| 1.0 / i as f64).sum();
        assert!((digamma(10.0) - (h9 - gamma)).abs() < 1e-13);
        // log Γ(n) = log (n − 1)!, Γ(1/2) = √π.
        assert!((ln_gamma(10.0) - 362_880f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        assert!((ln_gamma(0.1) - 2.252_712_651_734_206).abs() < 1e-12);
        // ψ is the derivative of log Γ.
        for x in [0.3, 1.7, 4.2, 12.5] {
            let h = 1e-5;
            let fd = (ln_gamma(x + h) - ln_gamma(x - h)) / (2.0 * h);
            assert!(
                (fd - digamma(x)).abs() < 1e-8,
                "{x}: {fd} vs {}",
                digamma(x)
            );
        }
    }
}

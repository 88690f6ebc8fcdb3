//! Likelihood losses, all per sample (`[B]`, nats) — reduce over the batch separately.
//!
//! The thread running through them (seed 000): maximum likelihood is the objective, and each of
//! these is a negative log-likelihood or a bound on one.
//! - [`bernoulli_nll`], [`categorical_nll`], [`gaussian_nll`] are exact NLLs;
//! - [`mse`] is the Gaussian NLL with unit variance up to a constant and a factor: the two have the
//!   same minimiser and proportional gradients (`∇ NLL = (D/2) ∇ MSE` for `D` dims per sample);
//! - [`elbo`] is the evidence lower bound `E_q[log p(x|z)] − β KL(q(z|x) ‖ p(z))`;
//! - [`iwae_bound`] is the importance-weighted bound `log (1/K) Σ_k w_k`, which is ≥ the ELBO and
//!   increases towards `log p(x)` as `K` grows (Burda et al., 2016).

use crate::dist::{log_mean_exp, Bernoulli, Categorical, DiagonalGaussian};
use crate::sum_per_sample;
use candle_core::{Result, Tensor};

/// `−log p(x)` under independent Bernoullis with the given logits. `(B, ...) -> (B,)`.
pub fn bernoulli_nll(logits: &Tensor, x: &Tensor) -> Result<Tensor> {
    Bernoulli::new(logits.clone()).log_prob(x)?.neg()
}

/// `−log p(x)` for integer targets under a categorical over `class_dim` of `logits`.
pub fn categorical_nll(logits: &Tensor, target: &Tensor, class_dim: usize) -> Result<Tensor> {
    Categorical::new(logits.clone(), class_dim)?
        .log_prob(target)?
        .neg()
}

/// The variance of a Gaussian likelihood.
#[derive(Clone, Debug)]
pub enum Variance<'a> {
    /// A fixed standard deviation σ shared by every dimension.
    FixedStd(f64),
    /// A learned log-variance, broadcastable to the mean.
    LogVar(&'a Tensor),
}

/// `−log N(x | mean, σ²)` summed over the event dimensions, `(B,)`.
pub fn gaussian_nll(mean: &Tensor, x: &Tensor, var: Variance<'_>) -> Result<Tensor> {
    let log_var = match var {
        Variance::FixedStd(s) => {
            if s <= 0.0 {
                candle_core::bail!("gaussian_nll: fixed std must be positive, got {s}")
            }
            mean.ones_like()?.affine(0.0, 2.0 * s.ln())?
        }
        Variance::LogVar(lv) => lv.broadcast_as(mean.shape())?.clone(),
    };
    DiagonalGaussian::new(mean.clone(), log_var)
        .log_prob(x)?
        .neg()
}

/// Mean squared error per sample: `mean_d (x_d − pred_d)²`, `(B,)`.
///
/// With unit variance, `gaussian_nll = (D/2)·mse + (D/2)·log 2π`: same minimiser, gradients in
/// the ratio `D/2`. This is why "train with MSE" is maximum likelihood under a Gaussian.
pub fn mse(pred: &Tensor, x: &Tensor) -> Result<Tensor> {
    let d = pred.elem_count() / pred.dim(0)?.max(1);
    sum_per_sample(&(pred - x)?.sqr()?)? / d as f64
}

/// Monte Carlo `KL(q ‖ p) ≈ (1/S) Σ_s [log q(z_s) − log p(z_s)]` with `z_s = q.rsample(eps_s)`.
///
/// # Shapes
/// - `eps`: `(S, B, ...)` noise, one slice per sample; returns `(B,)`.
pub fn kl_monte_carlo(q: &DiagonalGaussian, p: &DiagonalGaussian, eps: &Tensor) -> Result<Tensor> {
    let s = eps.dim(0)?;
    let mut acc: Option<Tensor> = None;
    for i in 0..s {
        let z = q.rsample(&eps.get(i)?)?;
        let d = (q.log_prob(&z)? - p.log_prob(&z)?)?;
        acc = Some(match acc {
            None => d,
            Some(a) => (a + d)?,
        });
    }
    match acc {
        Some(a) => a / s as f64,
        None => candle_core::bail!("kl_monte_carlo: eps has no samples"),
    }
}

/// The evidence lower bound `log p(x|z) − β·KL`, per sample `(B,)`; `β = 1` is the plain ELBO,
/// `β > 1` the β-VAE objective (seed 001).
pub fn elbo(log_px_given_z: &Tensor, kl: &Tensor, beta: f64) -> Result<Tensor> {
    log_px_given_z - (kl * beta)?
}

/// The IWAE-K bound from log importance weights `log w_k = log p(x, z_k) − log q(z_k | x)`.
///
/// # Shapes
/// - `log_w`: `(K, B)`; returns `(B,)`.
pub fn iwae_bound(log_w: &Tensor) -> Result<Tensor> {
    log_mean_exp(log_w, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GmRng;
    use candle_core::{DType, Device, Var};

    /// Checks autograd against central finite differences in f64 for a scalar function of one
    /// input tensor.
    fn check_grad(x0: &[f64], shape: &[usize], f: impl Fn(&Tensor) -> Result<Tensor>) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(x0.to_vec(), shape, &dev).unwrap()).unwrap();
        let y = f(x.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        let g = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for i in 0..x0.len() {
            let mut xp = x0.to_vec();
            let mut xm = x0.to_vec();
            xp[i] += h;
            xm[i] -= h;
            let value = |v: Vec<f64>| {
                f(&Tensor::from_vec(v, shape, &dev).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (value(xp) - value(xm)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "grad[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }

    fn cpu(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    const X6: [f64; 6] = [0.3, -1.7, 2.2, 0.0, 5.0, -4.0];

    #[test]
    fn grad_bernoulli_nll() {
        let x = cpu(&[1.0, 0.0, 1.0, 1.0, 0.0, 0.0], &[2, 3]);
        check_grad(&X6, &[2, 3], |l| bernoulli_nll(l, &x));
    }

    #[test]
    fn grad_categorical_nll() {
        let y = Tensor::from_vec(vec![2u32, 0], 2, &Device::Cpu).unwrap();
        check_grad(&X6, &[2, 3], |l| categorical_nll(l, &y, 1));
    }

    #[test]
    fn grad_gaussian_nll_mean_and_learned_log_var() {
        let x = cpu(&[0.1, 0.2, -0.3, 0.4, 1.5, -2.0], &[2, 3]);
        check_grad(&X6, &[2, 3], |m| {
            gaussian_nll(m, &x, Variance::FixedStd(0.7))
        });
        let mean = cpu(&[0.0, 0.5, -0.5, 1.0, 1.0, -1.0], &[2, 3]);
        check_grad(&[0.2, -0.4, 1.1], &[1, 3], |lv| {
            gaussian_nll(&mean, &x, Variance::LogVar(lv))
        });
    }

    #[test]
    fn grad_kl_closed_form_and_iwae() {
        let lv = cpu(&[0.1, -0.2, 0.3, 0.0, 0.5, -1.0], &[2, 3]);
        check_grad(&X6, &[2, 3], |m| {
            DiagonalGaussian::new(m.clone(), lv.clone()).kl_std_normal()
        });
        let m = cpu(&X6, &[2, 3]);
        check_grad(&[0.1, -0.2, 0.3, 0.0, 0.5, -1.0], &[2, 3], |lv| {
            let p = DiagonalGaussian::new(m.affine(0.5, 0.1).unwrap(), m.affine(0.0, 0.3).unwrap());
            DiagonalGaussian::new(m.clone(), lv.clone()).kl(&p)
        });
        check_grad(&X6, &[3, 2], iwae_bound);
        check_grad(&X6, &[2, 3], |p| mse(p, &m.affine(0.3, 0.2).unwrap()));
    }

    #[test]
    fn grad_rsample_elbo() {
        // d/d(mean, log_var) of a full single-sample ELBO with pinned noise.
        let eps = cpu(&[0.5, -1.0, 0.25], &[1, 3]);
        let x = cpu(&[1.0, 0.0, 1.0], &[1, 3]);
        check_grad(&[0.1, -0.3, 0.8, 0.2, -0.1, 0.4], &[2, 3], |p| {
            let q = DiagonalGaussian::new(p.get(0)?.unsqueeze(0)?, p.get(1)?.unsqueeze(0)?);
            let z = q.rsample(&eps)?;
            elbo(
                &bernoulli_nll(&(z * 2.0)?, &x)?.neg()?,
                &q.kl_std_normal()?,
                1.0,
            )
        });
    }

    /// MSE is the Gaussian MLE with unit variance: the same minimiser and gradients in ratio D/2.
    #[test]
    fn mse_is_gaussian_mle_with_unit_variance() {
        let dev = Device::Cpu;
        let x = cpu(&[0.3, -0.2, 0.9, 1.4, 0.0, -0.7, 0.2, 0.5], &[2, 4]);
        let p0 = cpu(&[0.0, 0.1, 0.5, 1.0, -0.3, -0.1, 0.6, 0.2], &[2, 4]);
        let grad = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let v = Var::from_tensor(&p0).unwrap();
            let g = f(v.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let g_nll = grad(&|p| gaussian_nll(p, &x, Variance::FixedStd(1.0)));
        let g_mse = grad(&|p| mse(p, &x));
        for (a, b) in g_nll.iter().zip(g_mse.iter()) {
            assert!((a - 2.0 * b).abs() < 1e-12, "{a} vs (D/2)·{b}"); // D = 4
        }
        // Same minimiser: gradient descent on each objective lands on x.
        for f in [
            &(|p: &Tensor| gaussian_nll(p, &x, Variance::FixedStd(1.0)))
                as &dyn Fn(&Tensor) -> Result<Tensor>,
            &|p: &Tensor| mse(p, &x),
        ] {
            let v = Var::from_tensor(&p0).unwrap();
            for _ in 0..500 {
                let g = f(v.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g = g.get(v.as_tensor()).unwrap();
                v.set(&(v.as_tensor() - (g * 0.2).unwrap()).unwrap())
                    .unwrap();
            }
            let d = (v.as_tensor() - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-8, "minimiser off by {d}");
        }
        let _ = dev;
    }

    #[test]
    fn kl_closed_form_agrees_with_monte_carlo() {
        let dev = Device::Cpu;
        let q = DiagonalGaussian::new(
            cpu(&[0.5, -1.0, 0.2], &[1, 3]),
            cpu(&[-0.5, 0.3, 0.0], &[1, 3]),
        );
        let p = DiagonalGaussian::new(
            cpu(&[0.0, 0.5, -0.2], &[1, 3]),
            cpu(&[0.2, -0.1, 0.4], &[1, 3]),
        );
        let closed = q.kl(&p).unwrap().to_vec1::<f64>().unwrap()[0];
        let mut rng = GmRng::new(11);
        let s = 200_000;
        let eps = rng
            .randn((s, 1, 3), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let mc = kl_monte_carlo(&q, &p, &eps)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        // MC standard error here is about 0.003.
        assert!((closed - mc).abs() < 0.015, "closed {closed} vs MC {mc}");
    }

    #[test]
    fn iwae_is_at_least_the_mean_and_at_most_the_max() {
        let lw = cpu(&[-3.0, -1.0, -2.0, -10.0, 0.5, -0.5], &[3, 2]);
        let b = iwae_bound(&lw).unwrap().to_vec1::<f64>().unwrap();
        let want0 = ((-3f64).exp() + (-2f64).exp() + 0.5f64.exp()).ln() - 3f64.ln();
        assert!((b[0] - want0).abs() < 1e-12);
        assert!(b[1] >= (-1.0 - 10.0 - 0.5) / 3.0 && b[1] <= -0.5);
    }
}

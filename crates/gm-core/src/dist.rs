//! Distributions as values.
//!
//! Every `log_prob` returns one number per sample, shape `[B]`, in nats: the event dimensions
//! (everything after the batch dimension) are summed. Reduce over the batch yourself.

use crate::{sum_per_sample, GmRng};
use candle_core::{DType, Result, Tensor};
use std::f64::consts::PI;

/// `log(1 + exp(x))`, stable for large |x|: `relu(x) + log(1 + exp(-|x|))`, one fused pass each
/// way on the CPU ([`crate::kernels::ops::softplus`]).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    crate::kernels::ops::softplus(x)
}

/// Independent Bernoulli variables parameterised by logits.
#[derive(Clone, Debug)]
pub struct Bernoulli {
    logits: Tensor,
}

impl Bernoulli {
    /// # Shapes
    /// - `logits`: `(B, ...)`, any event shape.
    pub fn new(logits: Tensor) -> Self {
        Self { logits }
    }

    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    pub fn probs(&self) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.logits)
    }

    /// Elementwise `log p(x)` = `x·l − softplus(l)`; `x` in {0, 1} (or in [0, 1] for the
    /// continuous relaxation used by some VAEs).
    pub fn log_prob_elementwise(&self, x: &Tensor) -> Result<Tensor> {
        (x * &self.logits)? - softplus(&self.logits)?
    }

    /// # Shapes
    /// - `x`: same as the logits; returns `(B,)`.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        sum_per_sample(&self.log_prob_elementwise(x)?)
    }

    /// Entropy per sample, `[B]`.
    pub fn entropy(&self) -> Result<Tensor> {
        let p = self.probs()?;
        // H = softplus(l) − p·l
        sum_per_sample(&(softplus(&self.logits)? - (p * &self.logits)?)?)
    }

    /// The most likely value (1 where p ≥ 0.5).
    pub fn mode(&self) -> Result<Tensor> {
        self.logits.ge(0.0)?.to_dtype(self.logits.dtype())
    }

    pub fn sample(&self, rng: &mut GmRng) -> Result<Tensor> {
        rng.bernoulli(&self.probs()?.detach())
    }
}

/// Categorical variables parameterised by unnormalised logits along `class_dim`.
#[derive(Clone, Debug)]
pub struct Categorical {
    logits: Tensor,
    class_dim: usize,
}

impl Categorical {
    /// # Shapes
    /// - `logits`: `(B, ..., K, ...)` with the K classes along `class_dim` (PyTorch puts them at
    ///   dimension 1, e.g. `(B, 256, C, H, W)`).
    pub fn new(logits: Tensor, class_dim: usize) -> Result<Self> {
        if class_dim >= logits.rank() || class_dim == 0 {
            candle_core::bail!(
                "Categorical: class_dim {class_dim} invalid for logits of shape {:?}",
                logits.shape()
            )
        }
        Ok(Self { logits, class_dim })
    }

    pub fn log_probs(&self) -> Result<Tensor> {
        candle_nn::ops::log_softmax(&self.logits, self.class_dim)
    }

    /// Elementwise log-probability of integer targets.
    ///
    /// # Shapes
    /// - `x`: the logits' shape without the class dimension, integer dtype (u32/u8/i64).
    pub fn log_prob_elementwise(&self, x: &Tensor) -> Result<Tensor> {
        let idx = x.to_dtype(DType::U32)?.unsqueeze(self.class_dim)?;
        self.log_probs()?
            .contiguous()?
            .gather(&idx.contiguous()?, self.class_dim)?
            .squeeze(self.class_dim)
    }

    /// Returns `(B,)`.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        sum_per_sample(&self.log_prob_elementwise(x)?)
    }

    pub fn entropy(&self) -> Result<Tensor> {
        let lp = self.log_probs()?;
        let h = (lp.exp()? * &lp)?.sum(self.class_dim)?.neg()?;
        sum_per_sample(&h)
    }

    pub fn mode(&self) -> Result<Tensor> {
        self.logits.argmax(self.class_dim)
    }

    /// Gumbel-max sampling; returns u32 class indices.
    pub fn sample(&self, rng: &mut GmRng) -> Result<Tensor> {
        let u = rng.uniform(self.logits.shape(), 1e-10, 1.0, self.logits.device())?;
        let gumbel = u.log()?.neg()?.log()?.neg()?;
        (self.logits.detach().to_dtype(DType::F32)? + gumbel)?.argmax(self.class_dim)
    }
}

/// A Gaussian with diagonal covariance, parameterised by mean and log-variance.
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub log_var: Tensor,
}

impl DiagonalGaussian {
    /// # Shapes
    /// - `mean`, `log_var`: `(B, ...)`, broadcastable to one another.
    pub fn new(mean: Tensor, log_var: Tensor) -> Self {
        Self { mean, log_var }
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.log_var * 0.5)?.exp()
    }

    /// The reparameterised sample `mean + exp(log_var / 2) ⊙ eps`. Pass the noise in, so a test
    /// (or a resumed run) can pin it.
    pub fn rsample(&self, eps: &Tensor) -> Result<Tensor> {
        self.mean.broadcast_add(&self.std()?.broadcast_mul(eps)?)
    }

    pub fn sample(&self, rng: &mut GmRng) -> Result<Tensor> {
        let eps = rng.randn(self.mean.shape(), self.mean.device())?;
        self.rsample(&eps)?.detach().to_dtype(self.mean.dtype())
    }

    /// Elementwise `log N(x | mean, exp(log_var))`.
    pub fn log_prob_elementwise(&self, x: &Tensor) -> Result<Tensor> {
        let diff = x.broadcast_sub(&self.mean)?;
        let maha = diff.sqr()?.broadcast_mul(&self.log_var.neg()?.exp()?)?;
        let lv = self.log_var.broadcast_as(maha.shape())?;
        ((maha + lv)? + (2.0 * PI).ln())? * -0.5
    }

    /// Returns `(B,)`.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        sum_per_sample(&self.log_prob_elementwise(x)?)
    }

    /// Closed-form `KL(self ‖ other)`, `(B,)`.
    pub fn kl(&self, other: &DiagonalGaussian) -> Result<Tensor> {
        let var_ratio = (&self.log_var - &other.log_var)?.exp()?;
        let maha = (&self.mean - &other.mean)?
            .sqr()?
            .broadcast_mul(&other.log_var.neg()?.exp()?)?;
        let t = (((var_ratio + maha)? - 1.0)? - (&self.log_var - &other.log_var)?)?;
        sum_per_sample(&(t * 0.5)?)
    }

    /// Closed-form `KL(self ‖ N(0, I))`, `(B,)`.
    pub fn kl_std_normal(&self) -> Result<Tensor> {
        let t = (((self.log_var.exp()? + self.mean.sqr()?)? - 1.0)? - &self.log_var)?;
        sum_per_sample(&(t * 0.5)?)
    }

    /// Differential entropy, `(B,)`.
    pub fn entropy(&self) -> Result<Tensor> {
        let c = (2.0 * PI * std::f64::consts::E).ln();
        sum_per_sample(&((&self.log_var + c)? * 0.5)?)
    }

    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// The standard normal `N(0, I)` over events of a given shape.
#[derive(Clone, Copy, Debug, Default)]
pub struct StandardNormal;

impl StandardNormal {
    /// Returns `(B,)`.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let t = ((x.sqr()? + (2.0 * PI).ln())? * -0.5)?;
        sum_per_sample(&t)
    }

    /// # Shapes
    /// - returns `(n, event...)`.
    pub fn sample(
        &self,
        n: usize,
        event: &[usize],
        rng: &mut GmRng,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let mut shape = vec![n];
        shape.extend_from_slice(event);
        rng.randn(shape, device)
    }
}

/// `log Σ_k exp(x_k) − log K` along `dim`: the log of the mean of exponentials.
pub fn log_mean_exp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let k = x.dim(dim)? as f64;
    x.log_sum_exp(dim)? - k.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn gaussian_log_prob_matches_closed_form() {
        // N(x=1 | 0.5, var=2): -0.5 (log 2π + log 2 + 0.25/2)
        let g = DiagonalGaussian::new(t(&[0.5], &[1, 1]), t(&[2f64.ln()], &[1, 1]));
        let lp = g
            .log_prob(&t(&[1.0], &[1, 1]))
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        let want = -0.5 * ((2.0 * PI).ln() + 2f64.ln() + 0.125);
        assert!((lp - want).abs() < 1e-12, "{lp} vs {want}");
    }

    #[test]
    fn kl_to_self_is_zero_and_kl_std_normal_agrees_with_kl() {
        let m = t(&[0.3, -1.2, 0.7, 2.0], &[2, 2]);
        let lv = t(&[0.1, -0.5, 1.0, 0.0], &[2, 2]);
        let q = DiagonalGaussian::new(m.clone(), lv.clone());
        let z = q.kl(&q).unwrap().to_vec1::<f64>().unwrap();
        assert!(z.iter().all(|v| v.abs() < 1e-12));
        let p = DiagonalGaussian::new(m.zeros_like().unwrap(), lv.zeros_like().unwrap());
        let a = q.kl(&p).unwrap().to_vec1::<f64>().unwrap();
        let b = q.kl_std_normal().unwrap().to_vec1::<f64>().unwrap();
        for (x, y) in a.iter().zip(b.iter()) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn bernoulli_log_prob_and_entropy() {
        let l = t(&[0.0, 2.0, -3.0], &[1, 3]);
        let b = Bernoulli::new(l);
        let x = t(&[1.0, 0.0, 0.0], &[1, 3]);
        let lp = b.log_prob(&x).unwrap().to_vec1::<f64>().unwrap()[0];
        let s = |v: f64| 1.0 / (1.0 + (-v).exp());
        let want = 0.5f64.ln() + (1.0 - s(2.0)).ln() + (1.0 - s(-3.0)).ln();
        assert!((lp - want).abs() < 1e-12);
        let h = b.entropy().unwrap().to_vec1::<f64>().unwrap()[0];
        let hb = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        let want_h = hb(0.5) + hb(s(2.0)) + hb(s(-3.0));
        assert!((h - want_h).abs() < 1e-12);
    }

    #[test]
    fn softplus_is_stable() {
        let x = t(&[-1000.0, 0.0, 1000.0], &[3]);
        let v = softplus(&x).unwrap().to_vec1::<f64>().unwrap();
        assert!(
            v[0].abs() < 1e-300 && (v[1] - 2f64.ln()).abs() < 1e-15 && (v[2] - 1000.0).abs() < 1e-9
        );
    }

    #[test]
    fn categorical_log_prob_entropy_and_sampling() {
        // (B=1, K=3, 2 positions)
        let logits = t(&[1.0, 0.0, 2.0, 0.0, -1.0, 0.0], &[1, 3, 2]);
        let c = Categorical::new(logits, 1).unwrap();
        let x = Tensor::from_vec(vec![0u32, 2], (1, 2), &Device::Cpu).unwrap();
        let lp = c.log_prob(&x).unwrap().to_vec1::<f64>().unwrap()[0];
        let lse0 = (1f64.exp() + 2f64.exp() + (-1f64).exp()).ln();
        let lse1 = (0f64.exp() + 0f64.exp() + 0f64.exp()).ln();
        let want = (1.0 - lse0) + (0.0 - lse1);
        assert!((lp - want).abs() < 1e-12);
        let h = c.entropy().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!(h > 3f64.ln() && h < 2.0 * 3f64.ln());
        // Sampling frequencies follow softmax.
        let c1 = Categorical::new(
            t(&[0.0, 1.0, 2.0], &[1, 3]).to_dtype(DType::F32).unwrap(),
            1,
        )
        .unwrap();
        let mut rng = GmRng::new(0);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            let s = c1.sample(&mut rng).unwrap().to_vec1::<u32>().unwrap()[0];
            counts[s as usize] += 1;
        }
        let z = 1.0 + 1f64.exp() + 2f64.exp();
        for (k, &n) in counts.iter().enumerate() {
            let p = (k as f64).exp() / z;
            assert!((n as f64 / 20000.0 - p).abs() < 0.015, "class {k}: {n}");
        }
    }
}

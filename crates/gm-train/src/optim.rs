//! Adam / AdamW whose state belongs to gm, so it can be saved and a resumed run is exact
//! (candle's `AdamW` keeps its moments private), plus global gradient-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter); 0 is plain Adam.
    pub weight_decay: f64,
}

impl From<&crate::config::TrainConfig> for AdamConfig {
    fn from(t: &crate::config::TrainConfig) -> Self {
        Self {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

/// Adam over named parameters (sorted by name, so the order is stable).
pub struct Adam {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    cfg: AdamConfig,
}

/// The named trainable variables of a `VarMap`, sorted by name.
pub fn named_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            m,
            v,
            t: 0,
            cfg,
        })
    }

    /// Number of updates taken.
    pub fn steps(&self) -> usize {
        self.t
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    ///
    /// On the CPU the update runs in place, three passes per parameter and no allocation
    /// (`m`, `v`, then the parameter); elsewhere it is written with tensor ops.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            // A gradient may carry the graph it was computed from; the optimizer state must not.
            let g = g.detach();
            let fused = gm_core::native_kernels(p.device())
                && matches!(p.dtype(), DType::F32 | DType::F64)
                && g.dtype() == p.dtype()
                && p.is_contiguous();
            if fused {
                use gm_core::kernels::adam;
                let g = g.contiguous()?;
                adam::update_moment(&self.m[i], &g, c.beta1, false)?;
                adam::update_moment(&self.v[i], &g, c.beta2, true)?;
                let step = adam::AdamStep {
                    lr,
                    bc1,
                    bc2,
                    eps: c.eps,
                    weight_decay: c.weight_decay,
                };
                adam::apply(p.as_tensor(), &self.m[i], &self.v[i], step)?;
                continue;
            }
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let mut next = (p.as_tensor() - (update * lr)?)?;
            if c.weight_decay > 0.0 {
                next = (next - (p.as_tensor() * (lr * c.weight_decay))?)?;
            }
            p.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`adam.m.<param>`, `adam.v.<param>`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            // Copies: the moments are updated in place by later steps.
            out.insert(
                format!("adam.m.{name}"),
                self.m[i].copy().expect("copy of adam.m"),
            );
            out.insert(
                format!("adam.v.{name}"),
                self.v[i].copy().expect("copy of adam.v"),
            );
        }
        out
    }

    /// Restores moments saved by [`Adam::state`] and the update count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adam.{kind}.{name}");
                let s = state.get(&key).ok_or_else(|| {
                    candle_core::Error::msg(format!("optimizer state lacks {key}"))
                })?;
                if s.dims() != p.dims() {
                    candle_core::bail!(
                        "optimizer state {key}: shape {:?}, parameter {:?}",
                        s.dims(),
                        p.dims()
                    )
                }
                *slot = s.to_device(p.device())?.to_dtype(p.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (if `max_norm > 0`).
/// Returns the norm before clipping.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<f64> {
    let mut sq = Vec::new();
    for (_, p) in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            sq.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if sq.is_empty() {
        return Ok(0.0);
    }
    let norm = gm_core::traffic::read_f64(&Tensor::stack(&sq, 0)?.sum_all()?)?.sqrt();
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for (_, p) in params {
            if let Some(g) = grads.get(p.as_tensor()) {
                let scaled = (g * s)?;
                grads.insert(p.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One Adam step against the update written out by hand.
    #[test]
    fn first_steps_match_the_formula() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = Adam::new(vec![("w".into(), p.clone())], cfg).unwrap();
        // loss = Σ w²  → g = 2w
        let (mut m, mut v, mut w) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
        for t in 1..=3 {
            let g = p
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&g, 0.1).unwrap();
            for i in 0..2 {
                let gi = 2.0 * w[i];
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.99 * v[i] + 0.01 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                w[i] = w[i] - 0.1 * mh / (vh.sqrt() + 1e-8) - 0.1 * 0.1 * w[i];
            }
            let got = p.as_tensor().to_vec1::<f64>().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] - w[i]).abs() < 1e-12,
                    "t={t}: {} vs {}",
                    got[i],
                    w[i]
                );
            }
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let p = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        let params = vec![("w".to_string(), p.clone())];
        let mut g = (p.as_tensor() * 1.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // gradient is (1, 1), norm √2
        let n = clip_grad_norm(&mut g, &params, 0.5).unwrap();
        assert!((n - 2f64.sqrt()).abs() < 1e-6);
        let after = g
            .get(p.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((after - 0.5).abs() < 1e-5, "{after}");
    }

    /// Gradients candle computes from tracked operands (`d(x² · w)/dw = x²`) carry the graph
    /// they were computed from; the optimizer must not keep it (it did once: memory grew by the
    /// whole graph every step).
    #[test]
    fn optimizer_state_keeps_no_graph() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::ones((3, 3), DType::F32, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::ones((3, 3), DType::F32, &dev).unwrap()).unwrap();
        let y = (x.as_tensor().sqr().unwrap() * w.as_tensor()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(&w).unwrap().track_op(),
            "the test needs a gradient with a graph"
        );
        let cfg = AdamConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = Adam::new(vec![("w".into(), w.clone())], cfg).unwrap();
        for _ in 0..2 {
            opt.step(&grads, 1e-3).unwrap();
        }
        for (name, t) in opt.state() {
            assert!(!t.track_op(), "{name} keeps a graph");
        }
    }
}

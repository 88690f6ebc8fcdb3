//! A continuous normalizing flow (Chen et al., 2018; FFJORD, Grathwohl et al., 2019): data `x` at
//! `t = 0` flows along `dz/dt = f(z, t)` to `z(T) ~ N(0, I)`, and the instantaneous change of
//! variables gives the exact likelihood
//!
//! `log p(x) = log N(z(T); 0, I) + ∫_0^T tr(∂f/∂z)(z(t), t) dt`,
//!
//! integrated alongside the state by any [`gm_core::ode`] solver. Training maximises it through
//! the solver (discretise-then-optimise: the solver's steps are ordinary candle ops, so the
//! backward pass revisits every function evaluation once — the backward NFE equals the forward's).
//!
//! The trace. `tr(∂f/∂z)` is exact in low dimension (one Jacobian–vector product per dimension)
//! and Hutchinson's `εᵀ(∂f/∂z)ε` with a Rademacher or Gaussian probe for images. The products
//! `(∂f/∂z)·v` are computed in **forward mode** with ordinary first-order ops — a linear layer maps a
//! tangent by its weight, an activation multiplies it by its derivative — so the trace is a
//! first-order graph of the parameters and training needs no gradient-of-a-gradient (candle
//! detaches those unless `CANDLE_GRAD_DO_NOT_DETACH` is set process-wide, which a library should
//! not impose on its users; the forward-mode product also costs one extra pass instead of a
//! backward pass through a retained graph).
//!
//! Regularisation (RNODE, Finlay et al., 2020): the kinetic energy `∫‖f‖² dt` and the Jacobian
//! Frobenius norm `∫‖∂f/∂z‖²_F dt` (estimated by `‖(∂f/∂z)ε‖²`) are integrated alongside and added
//! with weights `kinetic_weight` and `jacobian_weight`, which straightens the dynamics and cuts the
//! adaptive solver's NFE.
//!
//! The dynamics network stacks concat-squash layers (FFJORD): `h = L(z) ⊙ σ(W_g t + b_g) + W_b t`,
//! where `L` is a linear layer for vectors and a 3×3 convolution for images. Images are
//! logit-pre-processed ([`crate::flow::Logit`]) and squeezed `squeeze` times (volume-preserving)
//! before the ODE, which makes the convolutions cheaper.

use crate::flow::{eight_bit_offset, ot_path, squeeze, std_normal_log_prob, unsqueeze, Logit};
use crate::nn::Conv2d;
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use gm_core::cnf::{draw_probe, Divergence};
use gm_core::kernels::conv::{conv2d, Conv2dParams};
use gm_core::kernels::ops;
use gm_core::ode::{solve, OdeStats, SolverConfig};
use gm_core::{sum_per_sample, GmRng};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// The non-linearity between concat-squash layers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    #[default]
    Tanh,
    Softplus,
}

impl Activation {
    /// `a(h)`.
    fn value(self, h: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Tanh => h.tanh(),
            Activation::Softplus => ops::softplus(h),
        }
    }

    /// `(a(h), a'(h))`.
    fn value_and_slope(self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Activation::Tanh => {
                let a = h.tanh()?;
                let d = a.sqr()?.affine(-1.0, 1.0)?;
                Ok((a, d))
            }
            // One fused pass each (and one each backward) on the CPU.
            Activation::Softplus => Ok((ops::softplus(h)?, ops::sigmoid(h)?)),
        }
    }
}

/// How the vector field is trained.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Maximum likelihood through the ODE solve (FFJORD), with the RNODE terms.
    #[default]
    Likelihood,
    /// Conditional flow matching (Lipman et al., 2023) on the straight path
    /// `z_t = (1 − t/T)·z₀ + (t/T)·ε` from the data's state `z₀` to `ε ~ N(0, I)`: `f(z_t, t)` is
    /// regressed on `(ε − z₀)/T`, one network evaluation per image and no solve. The field is
    /// the same CNF's, so likelihood, sampling and a later likelihood fine-tuning
    /// (`gm train --init-from`) all apply to it.
    FlowMatching,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CnfConfig {
    /// `[C, H, W]` of images, or `[D, 1, 1]` for vectors (the 2-D toy densities).
    pub image_shape: [usize; 3],
    /// Hidden widths of the dynamics network (features for vectors, channels for images).
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// Squeezes of an image before the ODE (each: `(C, H, W) → (4C, H/2, W/2)`).
    pub squeeze: usize,
    /// The integration time `T`.
    pub time_length: f64,
    /// The solver used in training (gradients flow through its steps).
    pub solver: SolverConfig,
    /// Trace estimator in training: `exact` (vectors) or `rademacher` / `gaussian`.
    pub divergence: Divergence,
    /// The solver of evaluation and sampling.
    pub eval_solver: SolverConfig,
    /// Trace estimator at evaluation.
    pub eval_divergence: Divergence,
    /// Hutchinson probes per image at evaluation (each a full solve); their spread gives the
    /// Monte-Carlo standard error of the likelihood.
    pub eval_probes: usize,
    /// RNODE weight of `∫‖f‖² dt`.
    pub kinetic_weight: f64,
    /// RNODE weight of `∫‖∂f/∂z‖²_F dt`.
    pub jacobian_weight: f64,
    /// α of the logit pre-processing of images.
    pub logit_alpha: f64,
    /// Standard deviation of the base density at sampling.
    pub temperature: f64,
    /// A per-element affine `(y − μ) ⊙ e^{−s}` between the pre-processing and the ODE, with its
    /// log-determinant `−Σ s`: Glow's data-dependent ActNorm with one `(μ, s)` per element of the
    /// state, initialised from the first training images' mean and standard deviation
    /// ([`Model::data_init`]). A convolutional field cannot tell where in the image it is; this
    /// layer gives every pixel its own marginal from step 0, so the ODE learns only the structure.
    pub element_norm: bool,
    /// The training objective.
    pub objective: Objective,
    /// Residual hidden layers: every hidden layer whose input and output widths agree computes
    /// `h + a(L(h, t))` instead of `a(L(h, t))` (a ResNet-style field; the first and last layers
    /// stay plain). Off: FFJORD's plain stack.
    pub residual: bool,
}

impl Default for CnfConfig {
    fn default() -> Self {
        Self {
            image_shape: [2, 1, 1],
            hidden: vec![64, 64, 64],
            activation: Activation::Tanh,
            squeeze: 0,
            time_length: 1.0,
            solver: SolverConfig::rk4(8),
            divergence: Divergence::Exact,
            eval_solver: SolverConfig::dopri5(1e-5, 1e-5),
            eval_divergence: Divergence::Exact,
            eval_probes: 1,
            kinetic_weight: 0.0,
            jacobian_weight: 0.0,
            logit_alpha: 0.05,
            temperature: 1.0,
            element_norm: false,
            objective: Objective::Likelihood,
            residual: false,
        }
    }
}

impl CnfConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [c, h, w] = self.image_shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.image_shape must be positive, got {:?}",
                self.image_shape
            ));
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(format!(
                "model.hidden must be non-empty and positive, got {:?}",
                self.hidden
            ));
        }
        let f = 1usize << self.squeeze.min(16);
        if self.is_vector() && self.squeeze > 0 {
            return Err("model.squeeze applies to images only".into());
        }
        if h % f != 0 || w % f != 0 {
            return Err(format!(
                "model.squeeze = {} needs H and W divisible by {f}, got {h}×{w}",
                self.squeeze
            ));
        }
        if !(self.time_length > 0.0 && self.time_length.is_finite()) {
            return Err("model.time_length must be positive".into());
        }
        self.solver.validate_general("model.")?;
        self.eval_solver.validate_general("model.eval_")?;
        if self.eval_probes == 0 {
            return Err("model.eval_probes must be at least 1".into());
        }
        for (k, v) in [
            ("kinetic_weight", self.kinetic_weight),
            ("jacobian_weight", self.jacobian_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("model.{k} must be ≥ 0, got {v}"));
            }
        }
        if !self.is_vector() {
            Logit {
                alpha: self.logit_alpha,
            }
            .validate()?;
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err("model.temperature must be positive".into());
        }
        Ok(())
    }

    /// `[D, 1, 1]`: a density on `R^D`, no pixel pre-processing.
    pub fn is_vector(&self) -> bool {
        self.image_shape[1] == 1 && self.image_shape[2] == 1
    }

    /// `[C, H, W]` of the ODE state.
    pub fn state_shape(&self) -> [usize; 3] {
        let [c, h, w] = self.image_shape;
        let f = 1usize << self.squeeze;
        [c * f * f, h / f, w / f]
    }
}

impl crate::Family for CnfConfig {
    const KIND: &'static str = "cnf";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        CnfConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        match self.is_vector() {
            true => crate::PixelData::Any,
            false => crate::PixelData::Dequantized,
        }
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Cnf::new(self.clone(), vb)?))
    }
}

/// `h = L(z) ⊙ σ(W_g t + b_g) + W_b t`; its tangent map is `dh = L₀(dz) ⊙ σ(W_g t + b_g)` with
/// `L₀` the linear part of `L`.
#[derive(Clone, Debug)]
struct ConcatSquash {
    layer: Conv2d,
    params: Conv2dParams,
    gate_w: Tensor,
    gate_b: Tensor,
    time_w: Tensor,
}

impl ConcatSquash {
    fn new(c_in: usize, c_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let params = Conv2dParams::default().padding(k / 2);
        let layer = Conv2d::new(c_in, c_out, [k, k], params, true, vb.pp("layer"))?;
        let u = Init::Uniform { lo: -1.0, up: 1.0 };
        Ok(Self {
            layer,
            params,
            gate_w: vb.get_with_hints((1, c_out, 1, 1), "gate.weight", u)?,
            gate_b: vb.get_with_hints((1, c_out, 1, 1), "gate.bias", u)?,
            time_w: vb.get_with_hints((1, c_out, 1, 1), "time.weight", u)?,
        })
    }

    /// `(h, gate)` at time `t`.
    fn forward(&self, z: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        let gate = candle_nn::ops::sigmoid(&(self.gate_w.affine(t, 0.0)? + &self.gate_b)?)?;
        // (W z + b) ⊙ g + s = (W z) ⊙ g + (b ⊙ g + s): one per-channel affine pass after the
        // convolution, its gradients contiguous channel reductions.
        let mut shift = self.time_w.affine(t, 0.0)?;
        if let Some(b) = self.layer.bias() {
            shift = (shift + (b.reshape(gate.shape())? * &gate)?)?;
        }
        let lin = conv2d(z, self.layer.weight(), self.params)?;
        Ok((ops::channel_affine(&lin, &gate, Some(&shift))?, gate))
    }

    fn tangent(&self, dz: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let lin = conv2d(dz, self.layer.weight(), self.params)?;
        ops::channel_affine(&lin, gate, None)
    }
}

/// The dynamics network `f(z, t)` with its forward-mode Jacobian–vector products.
#[derive(Clone, Debug)]
pub struct OdeNet {
    layers: Vec<ConcatSquash>,
    act: Activation,
    /// Per layer: whether its activated output is added to its input.
    skip: Vec<bool>,
}

/// `k` copies of `x` stacked along the batch axis.
fn repeat_batch(x: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        return Ok(x.clone());
    }
    Tensor::cat(&vec![x; k], 0)
}

impl OdeNet {
    pub fn new(cfg: &CnfConfig, vb: VarBuilder) -> Result<Self> {
        let [c, _, _] = cfg.state_shape();
        let k = if cfg.is_vector() { 1 } else { 3 };
        let mut dims = vec![c];
        dims.extend(&cfg.hidden);
        dims.push(c);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| ConcatSquash::new(w[0], w[1], k, vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        let n = dims.len() - 1;
        let skip = (0..n)
            .map(|i| cfg.residual && i > 0 && i + 1 < n && dims[i] == dims[i + 1])
            .collect();
        Ok(Self {
            layers,
            act: cfg.activation,
            skip,
        })
    }

    /// `f(z, t)`.
    pub fn forward(&self, z: &Tensor, t: f64) -> Result<Tensor> {
        let mut h = z.clone();
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            let mut nh = l.forward(&h, t)?.0;
            if i + 1 < n {
                nh = self.act.value(&nh)?;
            }
            h = if self.skip[i] { (h + nh)? } else { nh };
        }
        Ok(h)
    }

    /// `(f(z, t), (∂f/∂z)·v)` for `k` tangents per sample stacked along the batch axis:
    /// `v` is `(k·B, …)`, tangent `j` of sample `b` at row `j·B + b`.
    pub fn forward_jvp(&self, z: &Tensor, v: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        let b = z.dim(0)?;
        let k = v.dim(0)? / b.max(1);
        if k * b != v.dim(0)? {
            candle_core::bail!("forward_jvp: {} tangent rows for a batch of {b}", v.dim(0)?)
        }
        let (mut h, mut dh) = (z.clone(), v.clone());
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            let (mut nh, gate) = l.forward(&h, t)?;
            let mut ndh = l.tangent(&dh, &gate)?;
            if i + 1 < n {
                let (a, slope) = self.act.value_and_slope(&nh)?;
                ndh = ndh.mul(&repeat_batch(&slope, k)?)?;
                nh = a;
            }
            if self.skip[i] {
                h = (h + nh)?;
                dh = (dh + ndh)?;
            } else {
                (h, dh) = (nh, ndh);
            }
        }
        Ok((h, dh))
    }
}

/// A vector field `f(z, t)` with forward-mode Jacobian–vector products: what the likelihood
/// solve needs. [`OdeNet`] is one; tests use closed-form fields.
pub trait Dynamics {
    /// `(f(z, t), (∂f/∂z)·v)` for `k` tangents per sample stacked along the batch axis: `v` is
    /// `(k·B, …)`, tangent `j` of sample `b` at row `j·B + b`.
    fn forward_jvp(&self, z: &Tensor, v: &Tensor, t: f64) -> Result<(Tensor, Tensor)>;
}

impl Dynamics for OdeNet {
    fn forward_jvp(&self, z: &Tensor, v: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        OdeNet::forward_jvp(self, z, v, t)
    }
}

/// `(f, tr(∂f/∂z), ‖∂f/∂z‖²_F estimate)` per sample: exact through the `D` basis tangents, or
/// Hutchinson's estimate with `probe`.
pub fn dynamics_with_trace(
    net: &dyn Dynamics,
    z: &Tensor,
    t: f64,
    mode: Divergence,
    probe: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = z.dim(0)?;
    let d = z.elem_count() / b.max(1);
    match mode {
        Divergence::Exact => {
            // Tangent j of every sample is the basis vector e_j: an identity stacked per sample.
            let eye = Tensor::eye(d, z.dtype(), z.device())?;
            let basis = eye.unsqueeze(1)?.broadcast_as((d, b, d))?.reshape(
                z.dims().iter().enumerate().fold(vec![], |mut s, (i, &n)| {
                    s.push(if i == 0 { d * b } else { n });
                    s
                }),
            )?;
            let (f, jv) = net.forward_jvp(z, &basis, t)?;
            let jv = jv.reshape((d, b, d))?;
            let tr = jv.broadcast_mul(&eye.unsqueeze(1)?)?.sum(2)?.sum(0)?;
            let frob = jv.sqr()?.sum(2)?.sum(0)?;
            Ok((f, tr, frob))
        }
        Divergence::Rademacher | Divergence::Gaussian => {
            let eps = probe.ok_or_else(|| {
                candle_core::Error::Msg("Hutchinson's estimator needs a probe".into())
            })?;
            let (f, jv) = net.forward_jvp(z, eps, t)?;
            let tr = sum_per_sample(&(eps * &jv)?)?;
            let frob = sum_per_sample(&jv.sqr()?)?;
            Ok((f, tr, frob))
        }
    }
}

/// What one likelihood solve gives, per sample `(B,)`.
pub struct Solved {
    /// `log p(z₀)` in nats, on the ODE state (before the pre-processing Jacobian).
    pub log_prob: Tensor,
    /// `∫‖f‖² dt`.
    pub kinetic: Tensor,
    /// `∫‖∂f/∂z‖²_F dt` (estimated with Hutchinson's probe).
    pub jacobian: Tensor,
    pub stats: OdeStats,
}

/// Integrates the state, the trace, and the RNODE terms from `t = 0` to `T`. With `keep_graph`
/// false every evaluation is detached (evaluation: memory stays flat).
pub fn solve_log_prob(
    net: &dyn Dynamics,
    z0: &Tensor,
    time_length: f64,
    solver: &SolverConfig,
    mode: Divergence,
    probe: Option<&Tensor>,
    keep_graph: bool,
) -> Result<Solved> {
    let b = z0.dim(0)?;
    let zeros = Tensor::zeros(b, z0.dtype(), z0.device())?;
    let state = vec![z0.clone(), zeros.clone(), zeros.clone(), zeros];
    let f = |t: f64, s: &Vec<Tensor>| -> Result<Vec<Tensor>> {
        let z = if keep_graph {
            s[0].clone()
        } else {
            s[0].detach()
        };
        let (v, tr, frob) = dynamics_with_trace(net, &z, t, mode, probe)?;
        let kin = sum_per_sample(&v.sqr()?)?;
        let out = vec![v, tr, kin, frob];
        Ok(if keep_graph {
            out
        } else {
            out.iter().map(|x| x.detach()).collect()
        })
    };
    let (s, stats) = solve(f, state, 0.0, time_length, solver)?;
    let log_prob = (std_normal_log_prob(&s[0])? + &s[1])?;
    Ok(Solved {
        log_prob,
        kinetic: s[2].clone(),
        jacobian: s[3].clone(),
        stats,
    })
}

/// The variable prefix of the element-wise affine.
const NORM: &str = "norm";

/// The CNF model.
pub struct Cnf {
    cfg: CnfConfig,
    net: OdeNet,
    logit: Option<Logit>,
    /// `(μ, s)` of the element-wise affine, each `(1, C, H, W)` of the state.
    norm: Option<(Tensor, Tensor)>,
    device: Device,
    dtype: DType,
    last_train: Cell<OdeStats>,
    last_eval: Cell<OdeStats>,
}

impl Cnf {
    pub fn new(cfg: CnfConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let net = OdeNet::new(&cfg, vb.pp("odenet"))?;
        let logit = (!cfg.is_vector()).then_some(Logit {
            alpha: cfg.logit_alpha,
        });
        let norm = if cfg.element_norm {
            let [c, h, w] = cfg.state_shape();
            let zero = Init::Const(0.0);
            let vbn = vb.pp(NORM);
            Some((
                vbn.get_with_hints((1, c, h, w), "shift", zero)?,
                vbn.get_with_hints((1, c, h, w), "log_scale", zero)?,
            ))
        } else {
            None
        };
        Ok(Self {
            net,
            logit,
            norm,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            cfg,
            last_train: Cell::new(OdeStats::default()),
            last_eval: Cell::new(OdeStats::default()),
        })
    }

    pub fn config(&self) -> &CnfConfig {
        &self.cfg
    }

    pub fn net(&self) -> &OdeNet {
        &self.net
    }

    /// Solver statistics of the last training and evaluation solves.
    pub fn last_stats(&self) -> (OdeStats, OdeStats) {
        (self.last_train.get(), self.last_eval.get())
    }

    /// Data → pre-processed and squeezed state, before the element-wise affine:
    /// `(y, log|det| (B,))`.
    fn pre(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mut y, ld) = match &self.logit {
            Some(l) => l.forward(x)?,
            None => (x.clone(), Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?),
        };
        for _ in 0..self.cfg.squeeze {
            y = squeeze(&y)?;
        }
        Ok((y, ld))
    }

    /// Data → ODE state: `(z₀, log|det| of everything before the ODE (B,))` — the logit
    /// pre-processing, the squeezes and the element-wise affine.
    pub fn to_state(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (y, ld) = self.pre(x)?;
        match &self.norm {
            Some((shift, log_scale)) => {
                let z = y
                    .broadcast_sub(shift)?
                    .broadcast_mul(&log_scale.neg()?.exp()?)?;
                let ld = ld.broadcast_sub(&log_scale.sum_all()?)?;
                Ok((z, ld))
            }
            None => Ok((y, ld)),
        }
    }

    /// ODE state → data.
    fn state_to_data(&self, z: &Tensor) -> Result<Tensor> {
        let mut y = match &self.norm {
            Some((shift, log_scale)) => z.broadcast_mul(&log_scale.exp()?)?.broadcast_add(shift)?,
            None => z.clone(),
        };
        for _ in 0..self.cfg.squeeze {
            y = unsqueeze(&y)?;
        }
        match &self.logit {
            Some(l) => l.inverse(&y),
            None => Ok(y),
        }
    }

    fn eight_bit(&self) -> f64 {
        if self.logit.is_some() {
            eight_bit_offset(self.cfg.image_shape.iter().product())
        } else {
            0.0
        }
    }

    /// One solve of `−log p(x)` per image (8-bit scale for images), with the RNODE terms.
    pub fn nll(
        &self,
        x: &Tensor,
        solver: &SolverConfig,
        mode: Divergence,
        rng: &mut GmRng,
        keep_graph: bool,
    ) -> Result<Solved> {
        let (z0, ld) = self.to_state(x)?;
        let probe = draw_probe(mode, &z0, rng)?;
        let mut s = solve_log_prob(
            &self.net,
            &z0,
            self.cfg.time_length,
            solver,
            mode,
            probe.as_ref(),
            keep_graph,
        )?;
        s.log_prob = (s.log_prob + ld)?.affine(-1.0, self.eight_bit())?;
        Ok(s)
    }

    /// The flow-matching loss `‖f(z_t, t) − (ε − z₀)/T‖²` per image `(B,)`. The batch is split
    /// into up to eight groups with stratified times `t = T·(g + u)/G` (the network takes one
    /// time per call).
    pub fn flow_matching_loss(&self, x: &Tensor, rng: &mut GmRng) -> Result<Tensor> {
        let (z0, _) = self.to_state(x)?;
        let b = z0.dim(0)?;
        let groups = b.clamp(1, 8);
        let tl = self.cfg.time_length;
        let eps = rng.randn(z0.dims(), z0.device())?.to_dtype(z0.dtype())?;
        let u: Vec<f64> = (0..groups).map(|_| rng.uniform_f64()).collect();
        let mut out = Vec::with_capacity(groups);
        let mut start = 0;
        for (g, ug) in u.iter().enumerate() {
            let len = b / groups + usize::from(g < b % groups);
            let (zg, eg) = (z0.narrow(0, start, len)?, eps.narrow(0, start, len)?);
            start += len;
            let s = (g as f64 + ug) / groups as f64;
            // The OT path from the data's state (t = 0) to the Gaussian draw (t = T).
            let times = Tensor::full(s, len, zg.device())?;
            let (zt, u) = ot_path(&zg, &eg, &times, 0.0)?;
            let v = self.net.forward(&zt, s * tl)?;
            out.push(sum_per_sample(&(v - (u / tl)?)?.sqr()?)?);
        }
        Tensor::cat(&out, 0)
    }

    /// `n` samples: `z(T) ~ N(0, T²·I)` integrated back to `t = 0` with `solver`.
    pub fn sample_with(
        &self,
        n: usize,
        temperature: f64,
        solver: &SolverConfig,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let [c, h, w] = self.cfg.state_shape();
        let z = rng
            .randn((n, c, h, w), &self.device)?
            .affine(temperature, 0.0)?
            .to_dtype(self.dtype)?;
        let f = |t: f64, z: &Tensor| self.net.forward(&z.detach(), t).map(|v| v.detach());
        let (y, stats) = solve(f, z, self.cfg.time_length, 0.0, solver)?;
        self.last_eval.set(stats);
        self.state_to_data(&y)
    }
}

impl Model for Cnf {
    fn kind(&self) -> &'static str {
        "cnf"
    }

    /// `nll + λ_K·∫‖f‖² + λ_J·∫‖∂f/∂z‖²_F`; parts also carry the forward and backward NFE. With
    /// [`Objective::FlowMatching`], the flow-matching regression instead.
    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        if self.cfg.objective == Objective::FlowMatching {
            let l = self.flow_matching_loss(&batch.x, rng)?.mean(0)?;
            return Ok(Loss {
                total: l.clone(),
                parts: vec![("flow_matching", l)],
            });
        }
        let s = self.nll(&batch.x, &self.cfg.solver, self.cfg.divergence, rng, true)?;
        self.last_train.set(s.stats);
        let nll = s.log_prob.mean(0)?;
        let kin = s.kinetic.mean(0)?;
        let jac = s.jacobian.mean(0)?;
        let total =
            ((&nll + (&kin * self.cfg.kinetic_weight)?)? + (&jac * self.cfg.jacobian_weight)?)?;
        let nfe = Tensor::new(s.stats.nfe as f32, nll.device())?.to_dtype(nll.dtype())?;
        Ok(Loss {
            total,
            parts: vec![
                ("nll", nll),
                ("kinetic", kin),
                ("jacobian", jac),
                ("nfe_forward", nfe.clone()),
                // Discretise-then-optimise: backpropagation visits each evaluation's graph once.
                ("nfe_backward", nfe),
            ],
        })
    }

    /// `nll_nats` (the mean over `eval_probes` solves), its Monte-Carlo standard error per image
    /// (`nll_mc_se_nats`, zero for the exact trace) and `likelihood_nfe` per solve.
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let (solver, mode, probes) = if opts.full {
            let p = match self.cfg.eval_divergence {
                Divergence::Exact => 1,
                _ => self.cfg.eval_probes,
            };
            (&self.cfg.eval_solver, self.cfg.eval_divergence, p)
        } else {
            (&self.cfg.solver, self.cfg.divergence, 1)
        };
        let mut runs = Vec::with_capacity(probes);
        let mut nfe = 0;
        for _ in 0..probes {
            let s = self.nll(&batch.x, solver, mode, rng, false)?;
            nfe += s.stats.nfe;
            self.last_eval.set(s.stats);
            runs.push(s.log_prob.to_dtype(DType::F64)?);
        }
        let all = Tensor::stack(&runs, 0)?;
        let mean = all.mean(0)?;
        let se = if probes > 1 {
            let var = all.broadcast_sub(&mean)?.sqr()?.sum(0)? / ((probes - 1) as f64);
            (var? / probes as f64)?.sqrt()?
        } else {
            mean.zeros_like()?
        };
        let b = mean.dim(0)?;
        let dt = batch.x.dtype();
        Ok(vec![
            ("nll_nats".into(), mean.to_dtype(dt)?),
            ("nll_mc_se_nats".into(), se.to_dtype(dt)?),
            (
                "likelihood_nfe".into(),
                Tensor::full((nfe / probes) as f32, b, batch.x.device())?.to_dtype(dt)?,
            ),
        ])
    }

    /// With `element_norm`: μ and `s = log σ` of each state element over `batch` (σ floored at
    /// 1e-3), so the state enters the ODE standardised.
    fn data_init(&self, batch: &Batch) -> Result<Vec<(String, Tensor)>> {
        if self.norm.is_none() || batch.x.dim(0)? < 2 {
            return Ok(Vec::new());
        }
        let (y, _) = self.pre(&batch.x.to_dtype(DType::F64)?)?;
        let mean = y.mean_keepdim(0)?;
        let std = y.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?.sqrt()?;
        let log_scale = std.clamp(1e-3, f64::INFINITY)?.log()?;
        Ok(vec![
            (format!("{NORM}.shift"), mean.to_dtype(self.dtype)?),
            (format!("{NORM}.log_scale"), log_scale.to_dtype(self.dtype)?),
        ])
    }

    fn likelihood_estimate(&self) -> &'static str {
        "ODE"
    }

    fn loss_units(&self) -> &'static str {
        if self.cfg.objective == Objective::FlowMatching {
            "squared error of the velocity (per element)"
        } else {
            "negative log-likelihood (+ regularisers), nats per image"
        }
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let mut out = Vec::new();
        let mut left = n;
        while left > 0 {
            let k = left.min(256);
            out.push(self.sample_with(k, self.cfg.temperature, &self.cfg.eval_solver, rng)?);
            left -= k;
        }
        if out.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&out, 0)?))
    }
}

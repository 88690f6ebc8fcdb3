//! Normalizing flows: RealNVP invertibility and log-determinants against brute-force Jacobians,
//! densities that integrate to one, the 8-bit units; the CNF's forward-mode Jacobian–vector
//! products, exact and Hutchinson traces, the instantaneous change of variables on a linear ODE,
//! gradients through the solver against finite differences, and the reverse solve.
#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;
use gm_core::cnf::Divergence;
use gm_core::ode::SolverConfig;
use gm_core::GmRng;
use gm_models::ffjord::{dynamics_with_trace, solve_log_prob, Cnf, CnfConfig, Dynamics};
use gm_models::flow::{eight_bit_offset, Logit};
use gm_models::realnvp::{RealNvp, RealNvpConfig};
use gm_models::{Batch, EvalOptions, Model};

const DEV: Device = Device::Cpu;

/// A model built in `dtype` whose parameters are all redrawn as `N(0, scale²)` (so no coupling
/// is the identity and no ActNorm is trivial).
fn perturbed<M>(
    dtype: DType,
    seed: u64,
    scale: f64,
    build: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<(M, VarMap)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &DEV);
    let m = build(vb)?;
    let mut rng = GmRng::new(seed);
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for n in names {
        let v = &data[&n];
        let r = (rng.randn(v.shape(), &DEV)? * scale)?.to_dtype(dtype)?;
        v.set(&r)?;
    }
    drop(data);
    Ok((m, vm))
}

fn small_image_cfg(num_scales: usize, actnorm: bool) -> RealNvpConfig {
    RealNvpConfig {
        image_shape: [1, 4, 4],
        num_scales,
        hidden: 6,
        num_blocks: 1,
        actnorm,
        ..Default::default()
    }
}

/// A 3-channel (RGB) 4×4 multi-scale flow.
fn rgb_cfg() -> RealNvpConfig {
    RealNvpConfig {
        image_shape: [3, 4, 4],
        ..small_image_cfg(2, true)
    }
}

fn vector_cfg(d: usize, actnorm: bool) -> RealNvpConfig {
    RealNvpConfig {
        image_shape: [d, 1, 1],
        num_couplings: 4,
        hidden: 8,
        num_blocks: 1,
        actnorm,
        ..Default::default()
    }
}

/// `log|det A|` by Gaussian elimination with partial pivoting.
fn log_abs_det(mut a: Vec<Vec<f64>>) -> f64 {
    let n = a.len();
    let mut ld = 0.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        let piv = a[c][c];
        assert!(piv.abs() > 1e-300, "singular Jacobian");
        ld += piv.abs().ln();
        for r in c + 1..n {
            let f = a[r][c] / piv;
            for k in c..n {
                a[r][k] -= f * a[c][k];
            }
        }
    }
    ld
}

/// `log|det ∂latents/∂y|` at one sample `y` from the full Jacobian, built row by row by reverse-
/// mode autodiff through the flow's forward pass (f64) — independent of the flow's own log-det
/// bookkeeping. (Not by finite differences: the coupling nets are ReLU networks, and with
/// 48 inputs a step of 1e-5 often crosses a kink.)
fn brute_force_log_det(flow: &RealNvp, y: &Tensor) -> f64 {
    let y = candle_core::Var::from_tensor(y).unwrap();
    let (zs, _) = flow.forward(y.as_tensor()).unwrap();
    let flat: Vec<Tensor> = zs.iter().map(|z| z.flatten_all().unwrap()).collect();
    let z = Tensor::cat(&flat, 0).unwrap();
    let d = z.dim(0).unwrap();
    let jac: Vec<Vec<f64>> = (0..d)
        .map(|i| {
            let g = z.get(i).unwrap().backward().unwrap();
            g.get(y.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect();
    log_abs_det(jac)
}

#[test]
fn realnvp_inverse_of_forward_is_the_identity() -> Result<()> {
    for (cfg, dtype, tol) in [
        (small_image_cfg(2, true), DType::F32, 1e-5),
        (small_image_cfg(2, true), DType::F64, 1e-10),
        (rgb_cfg(), DType::F64, 1e-10),
        (vector_cfg(3, true), DType::F32, 1e-5),
        (
            RealNvpConfig {
                image_shape: [1, 28, 28],
                num_scales: 3,
                hidden: 4,
                num_blocks: 1,
                ..Default::default()
            },
            DType::F32,
            1e-5,
        ),
    ] {
        let shape = cfg.image_shape;
        let (flow, _vm) = perturbed(dtype, 3, 0.1, |vb| RealNvp::new(cfg.clone(), vb))?;
        let y = GmRng::new(5)
            .randn((3, shape[0], shape[1], shape[2]), &DEV)?
            .to_dtype(dtype)?;
        let (zs, _) = flow.forward(&y)?;
        assert_eq!(zs.len(), flow.latent_shapes().len());
        for (z, s) in zs.iter().zip(flow.latent_shapes()) {
            assert_eq!(&z.dims()[1..], s.as_slice());
        }
        let back = flow.inverse(&zs)?;
        let err = max_abs_diff(&back, &y);
        assert!(err < tol, "{shape:?} {dtype:?}: |f⁻¹(f(y)) − y| = {err}");
    }
    Ok(())
}

#[test]
fn realnvp_log_det_equals_the_brute_force_jacobian() -> Result<()> {
    // Checkerboard couplings only (one scale), channel couplings only (vectors), ActNorm on and
    // off, and the full multi-scale stack with squeeze and factor-out, grey and RGB.
    for cfg in [
        small_image_cfg(1, false),
        vector_cfg(4, false),
        vector_cfg(4, true),
        small_image_cfg(2, true),
        RealNvpConfig {
            image_shape: [3, 4, 4],
            ..small_image_cfg(1, false)
        },
        rgb_cfg(),
    ] {
        let shape = cfg.image_shape;
        let (flow, _vm) = perturbed(DType::F64, 11, 0.3, |vb| RealNvp::new(cfg.clone(), vb))?;
        let y = GmRng::new(9)
            .randn((2, shape[0], shape[1], shape[2]), &DEV)?
            .to_dtype(DType::F64)?;
        let (_, ld) = flow.forward(&y)?;
        let ld = ld.to_vec1::<f64>()?;
        for (b, &l) in ld.iter().enumerate() {
            let bf = brute_force_log_det(&flow, &y.narrow(0, b, 1)?);
            assert!(
                (l - bf).abs() < 1e-6,
                "{shape:?} sample {b}: flow log|det| {l} vs the autodiff Jacobian's {bf}"
            );
            assert!(
                l.abs() > 1e-3,
                "the perturbed flow should not be volume-preserving"
            );
        }
    }
    Ok(())
}

#[test]
fn logit_preprocessing_jacobian_is_its_derivative() -> Result<()> {
    let logit = Logit { alpha: 0.05 };
    let x = Tensor::new(&[[0.0f64, 0.3, 0.999], [0.5, 0.01, 1.0]], &DEV)?;
    let (y, ld) = logit.forward(&x)?;
    let h = 1e-5;
    let (yp, _) = logit.forward(&(&x + h)?)?;
    let (ym, _) = logit.forward(&(&x - h)?)?;
    let fd = ((yp - ym)? / (2.0 * h))?.log()?.sum(D::Minus1)?;
    assert!(max_abs_diff(&ld, &fd) < 1e-6);
    assert!(max_abs_diff(&logit.inverse(&y)?, &x) < 1e-12);
    Ok(())
}

/// The `n × n` cell centres of `[-lim, lim]²` as `(n², 2, 1, 1)` points, and the cell width.
fn grid_2d(lim: f64, n: usize) -> Result<(Tensor, f64)> {
    let step = 2.0 * lim / n as f64;
    let mut pts = Vec::with_capacity(2 * n * n);
    for i in 0..n {
        for j in 0..n {
            pts.push(-lim + (i as f64 + 0.5) * step);
            pts.push(-lim + (j as f64 + 0.5) * step);
        }
    }
    Ok((Tensor::from_vec(pts, (n * n, 2, 1, 1), &DEV)?, step))
}

#[test]
fn a_2d_realnvp_density_integrates_to_one() -> Result<()> {
    let (flow, _vm) = perturbed(DType::F64, 21, 0.25, |vb| {
        RealNvp::new(vector_cfg(2, true), vb)
    })?;
    let (x, step) = grid_2d(12.0, 480)?;
    let mass = flow.log_prob(&x)?.exp()?.sum_all()?.to_scalar::<f64>()? * step * step;
    assert!((mass - 1.0).abs() < 5e-3, "∫ p = {mass}");
    Ok(())
}

#[test]
fn bits_per_dim_of_the_uniform_density_is_eight_and_realnvp_units_are_8_bit() -> Result<()> {
    // A density uniform on [0, 1]^D has log p = 0: −log p + D·ln 256 is exactly 8 bits per dim.
    let d = 784;
    assert!((gm_core::bits_per_dim(0.0 + eight_bit_offset(d), d) - 8.0).abs() < 1e-12);
    // A freshly built RealNVP is the identity after the logit (zero-initialised couplings, ActNorm
    // at identity): its nll_nats must be the standard normal of the logit plus every Jacobian term.
    let cfg = small_image_cfg(2, true);
    let vm = VarMap::new();
    let flow = RealNvp::new(cfg, VarBuilder::from_varmap(&vm, DType::F64, &DEV))?;
    let x = GmRng::new(2)
        .uniform((3, 1, 4, 4), 0.0, 1.0, &DEV)?
        .to_dtype(DType::F64)?;
    let xs = x.flatten_all()?.to_vec1::<f64>()?;
    let mut want = [0.0f64; 3];
    for (k, &v) in xs.iter().enumerate() {
        let s = 0.05 + 0.9 * v;
        let y = (s / (1.0 - s)).ln();
        let log_n = -0.5 * y * y - 0.5 * (2.0 * std::f64::consts::PI).ln();
        let log_jac = 0.9f64.ln() - s.ln() - (1.0 - s).ln();
        want[k / 16] -= log_n + log_jac;
    }
    let got = flow.nll_nats(&x)?.to_vec1::<f64>()?;
    for b in 0..3 {
        let w = want[b] + 16.0 * 256f64.ln();
        assert!((got[b] - w).abs() < 1e-9, "{} vs {w}", got[b]);
    }
    Ok(())
}

#[test]
fn realnvp_samples_are_images_and_training_lowers_the_nll() -> Result<()> {
    let cfg = small_image_cfg(2, true);
    let vm = VarMap::new();
    let flow = RealNvp::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &DEV))?;
    let mut rng = GmRng::new(0);
    let s = flow.sample(5, &mut rng)?.unwrap();
    assert_eq!(s.dims(), &[5, 1, 4, 4]);
    let (lo, hi) = (
        s.flatten_all()?.min(0)?.to_scalar::<f32>()?,
        s.flatten_all()?.max(0)?.to_scalar::<f32>()?,
    );
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
    // Every parameter gets a gradient (zero-initialised last layers included, through the chain).
    let x = (rng.uniform((8, 1, 4, 4), 0.0, 1.0, &DEV)? * 0.5)?;
    let batch = Batch { x, labels: None };
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-2)?;
    let first = flow.loss(&batch, &mut rng)?.total.to_scalar::<f32>()?;
    for _ in 0..30 {
        let l = flow.loss(&batch, &mut rng)?.total;
        candle_nn::Optimizer::backward_step(&mut opt, &l)?;
    }
    let last = flow.loss(&batch, &mut rng)?.total.to_scalar::<f32>()?;
    assert!(last < first - 1.0, "nll {first} → {last}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CNF

fn toy_cnf(dtype: DType, seed: u64, hidden: Vec<usize>) -> Result<(Cnf, VarMap)> {
    let cfg = CnfConfig {
        image_shape: [2, 1, 1],
        hidden,
        ..Default::default()
    };
    perturbed(dtype, seed, 0.5, |vb| Cnf::new(cfg, vb))
}

/// The Jacobian `∂f/∂z` of one sample by central differences, `(d, d)`.
fn fd_jacobian(f: &dyn Fn(&Tensor) -> Tensor, z: &Tensor) -> Vec<Vec<f64>> {
    let shape = z.shape().clone();
    let z0 = z.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let d = z0.len();
    let h = 1e-5;
    let mut jac = vec![vec![0.0; d]; d];
    for j in 0..d {
        let (mut zp, mut zm) = (z0.clone(), z0.clone());
        zp[j] += h;
        zm[j] -= h;
        let fp = f(&Tensor::from_vec(zp, &shape, &DEV).unwrap())
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let fm = f(&Tensor::from_vec(zm, &shape, &DEV).unwrap())
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in 0..d {
            jac[i][j] = (fp[i] - fm[i]) / (2.0 * h);
        }
    }
    jac
}

#[test]
fn forward_mode_jvp_and_exact_trace_match_finite_differences() -> Result<()> {
    // A vector net and three convolutional ones (squeezed 1×4×4 image, softplus; plain and with
    // residual hidden layers; a squeezed RGB 3×4×4 image).
    let (cnf, _vm) = toy_cnf(DType::F64, 1, vec![7, 5])?;
    let img_cfg = CnfConfig {
        image_shape: [1, 4, 4],
        hidden: vec![3],
        activation: gm_models::ffjord::Activation::Softplus,
        squeeze: 1,
        divergence: Divergence::Rademacher,
        ..Default::default()
    };
    let res_cfg = CnfConfig {
        hidden: vec![3, 3, 3],
        residual: true,
        ..img_cfg.clone()
    };
    let rgb_cfg = CnfConfig {
        image_shape: [3, 4, 4],
        ..img_cfg.clone()
    };
    let (img, _vm2) = perturbed(DType::F64, 2, 0.5, |vb| Cnf::new(img_cfg, vb))?;
    let (res, _vm3) = perturbed(DType::F64, 3, 0.5, |vb| Cnf::new(res_cfg, vb))?;
    let (rgb, _vm4) = perturbed(DType::F64, 4, 0.5, |vb| Cnf::new(rgb_cfg, vb))?;
    for (model, shape) in [
        (&cnf, vec![1, 2, 1, 1]),
        (&img, vec![1, 4, 2, 2]),
        (&res, vec![1, 4, 2, 2]),
        (&rgb, vec![1, 12, 2, 2]),
    ] {
        let net = model.net();
        let d: usize = shape.iter().product();
        let z = GmRng::new(4)
            .randn(shape.as_slice(), &DEV)?
            .to_dtype(DType::F64)?;
        let t = 0.37;
        let jac = fd_jacobian(&|z| net.forward(z, t).unwrap(), &z);
        // J·v for a random tangent.
        let v = GmRng::new(6)
            .randn(shape.as_slice(), &DEV)?
            .to_dtype(DType::F64)?;
        let (_, jv) = net.forward_jvp(&z, &v, t)?;
        let vv = v.flatten_all()?.to_vec1::<f64>()?;
        let jv = jv.flatten_all()?.to_vec1::<f64>()?;
        for i in 0..d {
            let want: f64 = (0..d).map(|j| jac[i][j] * vv[j]).sum();
            assert!((jv[i] - want).abs() < 1e-7, "Jv[{i}] {} vs {want}", jv[i]);
        }
        // The exact trace and Frobenius norm through the basis tangents.
        let (_, tr, frob) = dynamics_with_trace(net, &z, t, Divergence::Exact, None)?;
        let want_tr: f64 = (0..d).map(|i| jac[i][i]).sum();
        let want_fr: f64 = jac.iter().flatten().map(|x| x * x).sum();
        assert!((tr.to_vec1::<f64>()?[0] - want_tr).abs() < 1e-7);
        assert!((frob.to_vec1::<f64>()?[0] - want_fr).abs() < 1e-6);
    }
    Ok(())
}

#[test]
fn hutchinson_trace_is_unbiased() -> Result<()> {
    let (cnf, _vm) = toy_cnf(DType::F64, 3, vec![16, 16])?;
    let z = GmRng::new(1)
        .randn((1, 2, 1, 1), &DEV)?
        .to_dtype(DType::F64)?;
    let (_, exact, _) = dynamics_with_trace(cnf.net(), &z, 0.5, Divergence::Exact, None)?;
    let exact = exact.to_vec1::<f64>()?[0];
    let n = 20_000;
    let zs = z.broadcast_as((n, 2, 1, 1))?.contiguous()?;
    for mode in [Divergence::Rademacher, Divergence::Gaussian] {
        let probe = gm_core::cnf::draw_probe(mode, &zs, &mut GmRng::new(8))?;
        let (_, est, _) = dynamics_with_trace(cnf.net(), &zs, 0.5, mode, probe.as_ref())?;
        let est = est.to_vec1::<f64>()?;
        let mean = est.iter().sum::<f64>() / n as f64;
        let sd = (est.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let se = sd / (n as f64).sqrt();
        assert!(
            (mean - exact).abs() < 4.0 * se + 1e-9,
            "{mode:?}: mean {mean} ± {se} vs exact {exact}"
        );
    }
    Ok(())
}

/// `f(z) = A z`: the flow is `z(t) = e^{At} z₀`, so `log p(z₀) = log N(e^{AT} z₀) + T·tr A`.
struct Linear(Tensor);

impl Dynamics for Linear {
    fn forward_jvp(&self, z: &Tensor, v: &Tensor, _t: f64) -> Result<(Tensor, Tensor)> {
        let a = &self.0;
        let lin = |x: &Tensor| -> Result<Tensor> {
            let b = x.dim(0)?;
            x.reshape((b, 2))?.matmul(&a.t()?)?.reshape((b, 2, 1, 1))
        };
        Ok((lin(z)?, lin(v)?))
    }
}

#[test]
fn instantaneous_change_of_variables_on_a_linear_ode() -> Result<()> {
    // A = [[-0.5, 1.0], [-0.3, 0.2]], T = 1.5: e^{AT} in closed form by the Taylor series.
    let a = [[-0.5f64, 1.0], [-0.3, 0.2]];
    let t1 = 1.5;
    let mut expm = [[1.0, 0.0], [0.0, 1.0]];
    let mut term = [[1.0, 0.0], [0.0, 1.0]];
    for k in 1..40 {
        let mut next = [[0.0; 2]; 2];
        for i in 0..2 {
            for j in 0..2 {
                next[i][j] = (0..2).map(|m| term[i][m] * a[m][j]).sum::<f64>() * t1 / k as f64;
            }
        }
        term = next;
        for i in 0..2 {
            for j in 0..2 {
                expm[i][j] += term[i][j];
            }
        }
    }
    let dynamics = Linear(Tensor::new(&a, &DEV)?);
    let z0 = Tensor::new(&[[0.3f64, -1.2], [2.0, 0.5]], &DEV)?.reshape((2, 2, 1, 1))?;
    let zz = z0.flatten_all()?.to_vec1::<f64>()?;
    for (mode, solver) in [
        (Divergence::Exact, SolverConfig::dopri5(1e-9, 1e-9)),
        (Divergence::Exact, SolverConfig::rk4(200)),
    ] {
        let s = solve_log_prob(&dynamics, &z0, t1, &solver, mode, None, false)?;
        let lp = s.log_prob.to_vec1::<f64>()?;
        for b in 0..2 {
            let x = [zz[2 * b], zz[2 * b + 1]];
            let zt = [
                expm[0][0] * x[0] + expm[0][1] * x[1],
                expm[1][0] * x[0] + expm[1][1] * x[1],
            ];
            let want = -0.5 * (zt[0] * zt[0] + zt[1] * zt[1]) - (2.0 * std::f64::consts::PI).ln()
                + t1 * (a[0][0] + a[1][1]);
            assert!((lp[b] - want).abs() < 1e-7, "{} vs {want}", lp[b]);
        }
    }
    Ok(())
}

#[test]
fn gradients_through_the_solver_match_finite_differences() -> Result<()> {
    let (cnf, vm) = toy_cnf(DType::F64, 5, vec![6])?;
    let x = GmRng::new(3)
        .randn((4, 2, 1, 1), &DEV)?
        .to_dtype(DType::F64)?;
    let solver = SolverConfig::rk4(3);
    let loss = |cnf: &Cnf| -> Result<Tensor> {
        let s = cnf.nll(&x, &solver, Divergence::Exact, &mut GmRng::new(0), true)?;
        // The RNODE terms ride along: check their gradients too.
        s.log_prob.mean(0)? + (s.kinetic.mean(0)? * 0.3)? + (s.jacobian.mean(0)? * 0.2)?
    };
    let grads = loss(&cnf)?.backward()?;
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    let mut checked = 0;
    for n in &names {
        let v = &data[n];
        let g = grads
            .get(v.as_tensor())
            .expect("every parameter has a gradient");
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for k in [0, base.len() - 1] {
            let h = 1e-5;
            let mut p = base.clone();
            p[k] += h;
            v.set(&Tensor::from_vec(p.clone(), v.shape(), &DEV)?)?;
            let lp = loss(&cnf)?.to_scalar::<f64>()?;
            p[k] -= 2.0 * h;
            v.set(&Tensor::from_vec(p, v.shape(), &DEV)?)?;
            let lm = loss(&cnf)?.to_scalar::<f64>()?;
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &DEV)?)?;
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (g[k] - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                "{n}[{k}]: backprop {} vs finite difference {fd}",
                g[k]
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
    Ok(())
}

#[test]
fn a_cnf_and_its_reverse_solve_return_the_input() -> Result<()> {
    // A 2-D vector field, and the convolutional field of an RGB 3×4×4 image (squeezed to
    // 12×2×2).
    let (cnf, _vm) = toy_cnf(DType::F64, 7, vec![16, 16])?;
    let rgb_cfg = CnfConfig {
        image_shape: [3, 4, 4],
        hidden: vec![8],
        activation: gm_models::ffjord::Activation::Softplus,
        squeeze: 1,
        ..Default::default()
    };
    let (rgb, _vm2) = perturbed(DType::F64, 5, 0.5, |vb| Cnf::new(rgb_cfg, vb))?;
    for (model, shape) in [(&cnf, (5, 2, 1, 1)), (&rgb, (3, 12, 2, 2))] {
        let net = model.net();
        let x = GmRng::new(2).randn(shape, &DEV)?.to_dtype(DType::F64)?;
        let solver = SolverConfig::dopri5(1e-10, 1e-10);
        let fwd = |t: f64, z: &Tensor| net.forward(z, t);
        let (z1, _) = gm_core::ode::solve(fwd, x.clone(), 0.0, 1.0, &solver)?;
        let back = |t: f64, z: &Tensor| net.forward(z, t);
        let (x0, _) = gm_core::ode::solve(back, z1.clone(), 1.0, 0.0, &solver)?;
        assert!(
            max_abs_diff(&z1, &x) > 1e-2,
            "{shape:?}: the flow should move the points"
        );
        let err = max_abs_diff(&x0, &x);
        assert!(err < 1e-7, "{shape:?}: round trip error {err}");
    }
    Ok(())
}

#[test]
fn a_2d_cnf_density_integrates_to_one_and_eval_reports_nfe() -> Result<()> {
    let (cnf, _vm) = toy_cnf(DType::F64, 9, vec![16, 16])?;
    let (x, step) = grid_2d(8.0, 120)?;
    let m = cnf.eval_metrics(
        &Batch { x, labels: None },
        &mut GmRng::new(0),
        &EvalOptions::default(),
    )?;
    let nll = &m.iter().find(|(k, _)| k == "nll_nats").unwrap().1;
    let mass = nll.neg()?.exp()?.sum_all()?.to_scalar::<f64>()? * step * step;
    assert!((mass - 1.0).abs() < 1e-2, "∫ p = {mass}");
    let nfe = &m.iter().find(|(k, _)| k == "likelihood_nfe").unwrap().1;
    assert!(nfe.to_vec1::<f64>()?[0] >= 6.0);
    Ok(())
}

#[test]
fn image_cnf_trains_samples_and_reports_probe_error() -> Result<()> {
    let cfg = CnfConfig {
        image_shape: [1, 4, 4],
        hidden: vec![4],
        activation: gm_models::ffjord::Activation::Softplus,
        squeeze: 1,
        solver: SolverConfig::rk4(2),
        divergence: Divergence::Rademacher,
        eval_solver: SolverConfig::rk4(2),
        eval_divergence: Divergence::Rademacher,
        eval_probes: 3,
        kinetic_weight: 0.01,
        jacobian_weight: 0.01,
        ..Default::default()
    };
    let vm = VarMap::new();
    let cnf = Cnf::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &DEV))?;
    let mut rng = GmRng::new(0);
    let x = (rng.uniform((8, 1, 4, 4), 0.0, 1.0, &DEV)? * 0.5)?;
    let batch = Batch { x, labels: None };
    let loss = cnf.loss(&batch, &mut rng)?;
    let names: Vec<_> = loss.parts.iter().map(|p| p.0).collect();
    assert_eq!(
        names,
        ["nll", "kinetic", "jacobian", "nfe_forward", "nfe_backward"]
    );
    assert_eq!(loss.parts[3].1.to_scalar::<f32>()?, 8.0);
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 2e-2)?;
    let first = loss.total.to_scalar::<f32>()?;
    for _ in 0..30 {
        let l = cnf.loss(&batch, &mut rng)?.total;
        candle_nn::Optimizer::backward_step(&mut opt, &l)?;
    }
    let last = cnf.loss(&batch, &mut rng)?.total.to_scalar::<f32>()?;
    assert!(last < first - 1.0, "loss {first} → {last}");
    let m = cnf.eval_metrics(&batch, &mut rng, &EvalOptions::default())?;
    let se = &m.iter().find(|(k, _)| k == "nll_mc_se_nats").unwrap().1;
    assert!(se.min(0)?.to_scalar::<f32>()? > 0.0);
    let s = cnf.sample(3, &mut rng)?.unwrap();
    assert_eq!(s.dims(), &[3, 1, 4, 4]);
    Ok(())
}

#[test]
fn element_norm_is_initialised_from_data_and_keeps_the_density_normalised() -> Result<()> {
    let cfg = CnfConfig {
        image_shape: [2, 1, 1],
        hidden: vec![16, 16],
        element_norm: true,
        ..Default::default()
    };
    let (cnf, vm) = perturbed(DType::F64, 11, 0.5, |vb| Cnf::new(cfg, vb))?;
    // Data with mean (1, −1) and standard deviations (0.7, 1.5).
    let mut rng = GmRng::new(4);
    let z = rng.randn((4000, 2, 1, 1), &DEV)?.to_dtype(DType::F64)?;
    let scale = Tensor::new(&[0.7f64, 1.5], &DEV)?.reshape((1, 2, 1, 1))?;
    let shift = Tensor::new(&[1.0f64, -1.0], &DEV)?.reshape((1, 2, 1, 1))?;
    let x = z.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    let init = cnf.data_init(&Batch {
        x: x.clone(),
        labels: None,
    })?;
    let names: Vec<_> = init.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["norm.shift", "norm.log_scale"]);
    let mean = x.mean_keepdim(0)?.flatten_all()?.to_vec1::<f64>()?;
    let sd = x
        .broadcast_sub(&x.mean_keepdim(0)?)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let got_mean = init[0].1.flatten_all()?.to_vec1::<f64>()?;
    let got_log = init[1].1.flatten_all()?.to_vec1::<f64>()?;
    for i in 0..2 {
        assert!((got_mean[i] - mean[i]).abs() < 1e-12);
        assert!((got_log[i] - sd[i].ln()).abs() < 1e-12);
    }
    assert!((got_mean[0] - 1.0).abs() < 0.1 && (got_log[1] - 1.5f64.ln()).abs() < 0.1);
    {
        let data = vm.data().lock().unwrap();
        for (n, v) in &init {
            data[n].set(v)?;
        }
    }
    // The element-wise affine's log-determinant keeps ∫ p = 1.
    let (g, step) = grid_2d(9.0, 150)?;
    let m = cnf.eval_metrics(
        &Batch { x: g, labels: None },
        &mut rng,
        &EvalOptions::default(),
    )?;
    let nll = &m.iter().find(|(k, _)| k == "nll_nats").unwrap().1;
    let mass = nll.neg()?.exp()?.sum_all()?.to_scalar::<f64>()? * step * step;
    assert!((mass - 1.0).abs() < 1e-2, "∫ p = {mass}");
    // Sampling ends with the inverse affine: the same draws with (μ, s) and with the identity
    // differ by exactly x ↦ μ + e^s·x.
    let with = cnf.sample(50, &mut GmRng::new(5))?.unwrap();
    {
        let data = vm.data().lock().unwrap();
        for (n, v) in &init {
            data[n].set(&v.zeros_like()?)?;
        }
    }
    let without = cnf.sample(50, &mut GmRng::new(5))?.unwrap();
    let expect = without
        .broadcast_mul(&init[1].1.exp()?)?
        .broadcast_add(&init[0].1)?;
    let err = max_abs_diff(&with, &expect);
    assert!(err < 1e-9, "inverse affine error {err}");
    Ok(())
}

#[test]
fn flow_matching_trains_the_cnf_field_to_the_data_density() -> Result<()> {
    // Data N((1.5, −1), 0.5²·I): differential entropy ln(2πe·0.25) nats.
    let entropy = (2.0 * std::f64::consts::PI * std::f64::consts::E * 0.25).ln();
    let cfg = CnfConfig {
        image_shape: [2, 1, 1],
        hidden: vec![32, 32],
        objective: gm_models::ffjord::Objective::FlowMatching,
        eval_solver: SolverConfig::dopri5(1e-6, 1e-6),
        ..Default::default()
    };
    let vm = VarMap::new();
    let cnf = Cnf::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &DEV))?;
    let mut rng = GmRng::new(3);
    let mean = Tensor::new(&[1.5f32, -1.0], &DEV)?.reshape((1, 2, 1, 1))?;
    let draw = |n: usize, rng: &mut GmRng| -> Result<Tensor> {
        (rng.randn((n, 2, 1, 1), &DEV)? * 0.5)?.broadcast_add(&mean)
    };
    let test = Batch {
        x: draw(2000, &mut rng)?,
        labels: None,
    };
    let nll = |rng: &mut GmRng| -> Result<f64> {
        let m = cnf.eval_metrics(
            &test,
            rng,
            &EvalOptions {
                full: true,
                ..Default::default()
            },
        )?;
        let v = &m.iter().find(|(k, _)| k == "nll_nats").unwrap().1;
        v.mean_all()?.to_scalar::<f32>().map(f64::from)
    };
    let before = nll(&mut rng)?;
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-2)?;
    for _ in 0..400 {
        let batch = Batch {
            x: draw(256, &mut rng)?,
            labels: None,
        };
        let l = cnf.loss(&batch, &mut rng)?;
        assert_eq!(l.parts[0].0, "flow_matching");
        candle_nn::Optimizer::backward_step(&mut opt, &l.total)?;
    }
    let after = nll(&mut rng)?;
    assert!(before > entropy + 1.0, "before {before}, entropy {entropy}");
    assert!(
        (after - entropy).abs() < 0.1,
        "after {after}, entropy {entropy}"
    );
    Ok(())
}

//! The instantaneous change of variables on flows with known densities, and Hutchinson's
//! estimator against the exact trace.

use candle_core::{DType, Device, Result, Tensor};
use gm_core::cnf::{draw_probe, log_likelihood, velocity_and_divergence, Divergence};
use gm_core::ode::SolverConfig;
use gm_core::GmRng;

fn dev() -> Device {
    Device::Cpu
}

/// `v(x) = x·Aᵀ` for row-vector states `(B, D)`.
fn linear_field(a: &Tensor) -> impl FnMut(f64, &Tensor) -> Result<Tensor> + '_ {
    move |_t, x: &Tensor| x.matmul(&a.t()?)
}

#[test]
fn linear_flow_has_the_exact_gaussian_density() {
    // x(1) = e^{A}·x(0) with A = αI + βJ: e^{A} = e^{α}·R(β), so p_1 = N(0, e^{2α} I).
    let (alpha, beta) = (-0.3f64, 2.0f64);
    let a = Tensor::new(&[[alpha, beta], [-beta, alpha]], &dev()).unwrap();
    let x = Tensor::new(&[[0.3f64, -0.7], [1.5, 0.2], [0.0, 0.0]], &dev()).unwrap();
    for mode in [
        Divergence::Exact,
        Divergence::Rademacher,
        Divergence::Gaussian,
    ] {
        let mut rng = GmRng::new(1);
        let (logp, stats) = log_likelihood(
            linear_field(&a),
            &x,
            1.0,
            0.0,
            &SolverConfig::dopri5(1e-9, 1e-9),
            mode,
            &mut rng,
        )
        .unwrap();
        let v: Vec<f64> = logp.to_vec1().unwrap();
        let var = (2.0 * alpha).exp();
        for (row, got) in x.to_vec2::<f64>().unwrap().iter().zip(v) {
            let r2 = row[0] * row[0] + row[1] * row[1];
            let want = -(2.0 * std::f64::consts::PI * var).ln() - r2 / (2.0 * var);
            // A rotation-plus-scaling has εᵀAε = α‖ε‖²: exact for Rademacher probes, not for
            // Gaussian ones (whose estimate is unbiased only on average).
            let tol = if mode == Divergence::Gaussian {
                1.0
            } else {
                1e-6
            };
            assert!((got - want).abs() < tol, "{mode:?}: {got} vs {want}");
        }
        assert!(stats.nfe > 0 && stats.accepted > 0);
    }
}

#[test]
fn hutchinson_is_unbiased_for_the_trace() {
    let a = Tensor::new(
        &[[0.5f64, -1.0, 2.0], [0.3, -0.2, 0.7], [1.1, 0.4, 0.9]],
        &dev(),
    )
    .unwrap();
    let trace = 0.5 - 0.2 + 0.9;
    let n = 20_000;
    let mut rng = GmRng::new(2);
    let x = rng
        .randn((n, 3), &dev())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let mut field = |y: &Tensor| y.matmul(&a.t()?);
    let (_, exact) = velocity_and_divergence(
        &mut field,
        &x.narrow(0, 0, 4).unwrap(),
        Divergence::Exact,
        None,
    )
    .unwrap();
    for v in exact.to_vec1::<f64>().unwrap() {
        assert!((v - trace).abs() < 1e-12, "exact trace {v}");
    }
    for mode in [Divergence::Rademacher, Divergence::Gaussian] {
        let probe = draw_probe(mode, &x, &mut rng).unwrap();
        let (_, est) = velocity_and_divergence(&mut field, &x, mode, probe.as_ref()).unwrap();
        let e: Vec<f64> = est.to_vec1().unwrap();
        let mean = e.iter().sum::<f64>() / n as f64;
        let sd = (e.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let se = sd / (n as f64).sqrt();
        assert!(
            (mean - trace).abs() < 4.0 * se,
            "{mode:?}: {mean} ± {se} vs {trace}"
        );
        assert!(
            sd > 0.1,
            "{mode:?}: the estimate should be noisy for a non-diagonal A"
        );
    }
}

#[test]
fn a_field_that_ignores_x_is_an_error() {
    let x = Tensor::zeros((2, 2), DType::F64, &dev()).unwrap();
    let c = Tensor::ones((2, 2), DType::F64, &dev()).unwrap();
    let mut field = |_y: &Tensor| Ok(c.clone());
    let e = velocity_and_divergence(&mut field, &x, Divergence::Exact, None).unwrap_err();
    assert!(e.to_string().contains("depend"), "{e}");
}

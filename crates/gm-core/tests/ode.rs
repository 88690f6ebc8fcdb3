//! ODE solvers against closed forms: the linear system `y' = A·y`, whose solution is the matrix
//! exponential `e^{At}·y₀`, written out for `A = αI + βJ` (a damped rotation).

use candle_core::{Device, Result, Tensor};
use gm_core::ode::{dopri5, fixed_steps, solve, Method, SolverConfig};

const ALPHA: f64 = -0.3;
const BETA: f64 = 2.0;
const T1: f64 = 2.0;

fn a_matrix() -> Tensor {
    Tensor::new(&[[ALPHA, BETA], [-BETA, ALPHA]], &Device::Cpu).unwrap()
}

fn f(_t: f64, y: &Tensor) -> Result<Tensor> {
    a_matrix().matmul(y)
}

/// `e^{At}·[1, 0]ᵀ = e^{αt}·[cos βt, −sin βt]ᵀ`.
fn exact(t: f64) -> [f64; 2] {
    let s = (ALPHA * t).exp();
    [s * (BETA * t).cos(), -s * (BETA * t).sin()]
}

fn y0() -> Tensor {
    Tensor::new(&[[1f64], [0.0]], &Device::Cpu).unwrap()
}

fn error(y: &Tensor, t: f64) -> f64 {
    let v = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let e = exact(t);
    ((v[0] - e[0]).powi(2) + (v[1] - e[1]).powi(2)).sqrt()
}

#[test]
fn fixed_step_methods_converge_at_their_order() {
    for m in [Method::Euler, Method::Midpoint, Method::Heun, Method::Rk4] {
        let errs: Vec<f64> = [40, 80, 160]
            .iter()
            .map(|&n| {
                let (y, stats) = fixed_steps(f, y0(), 0.0, T1, n, m).unwrap();
                assert_eq!(stats.nfe, n * m.evals_per_step());
                assert_eq!(stats.accepted, n);
                error(&y, T1)
            })
            .collect();
        for w in errs.windows(2) {
            let order = (w[0] / w[1]).log2();
            assert!(
                (order - m.order() as f64).abs() < 0.15,
                "{m:?}: empirical order {order:.3}, errors {errs:?}"
            );
        }
    }
}

#[test]
fn dopri5_meets_its_tolerance_and_counts_its_work() {
    let mut last_nfe = 0;
    for tol in [1e-4, 1e-6, 1e-8, 1e-10] {
        let (y, s) = dopri5(f, y0(), 0.0, T1, tol, tol, 10_000).unwrap();
        let err = error(&y, T1);
        assert!(err < 10.0 * tol, "tol {tol}: error {err}");
        // One evaluation at t0, one for the initial step size, six per attempted step (FSAL).
        assert_eq!(s.nfe, 2 + 6 * (s.accepted + s.rejected), "{s:?}");
        assert!(s.nfe > last_nfe, "tighter tolerance, more work: {s:?}");
        last_nfe = s.nfe;
    }
    // Many fewer evaluations than a fixed-step method of the same accuracy.
    let (y, s) = dopri5(f, y0(), 0.0, T1, 1e-8, 1e-8, 10_000).unwrap();
    assert!(error(&y, T1) < 1e-7);
    assert!(s.nfe < 400, "{s:?}");
}

#[test]
fn dopri5_rejects_steps_on_a_sharp_transient_and_still_lands() {
    // y' = -k (y - cos t): fast relaxation onto a slow curve.
    let k = 50.0;
    let g = |t: f64, y: &Tensor| (y - t.cos())?.affine(-k, 0.0);
    let y0 = Tensor::new(&[5f64], &Device::Cpu).unwrap();
    let (y, s) = dopri5(g, y0, 0.0, 1.0, 1e-7, 1e-7, 10_000).unwrap();
    // Exact: y = c(t) + (5 - c(0)) e^{-kt}, c(t) = k(k cos t + sin t)/(k² + 1).
    let c = |t: f64| k * (k * t.cos() + t.sin()) / (k * k + 1.0);
    let want = c(1.0) + (5.0 - c(0.0)) * (-k).exp();
    let got = y.to_vec1::<f64>().unwrap()[0];
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert!(s.rejected > 0 || s.accepted > 10, "{s:?}");
}

#[test]
fn time_runs_backwards_and_solves_invert() {
    for cfg in [SolverConfig::rk4(50), SolverConfig::dopri5(1e-9, 1e-9)] {
        let (y1, _) = solve(f, y0(), 0.0, T1, &cfg).unwrap();
        let (back, _) = solve(f, y1, T1, 0.0, &cfg).unwrap();
        let v = back.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(
            (v[0] - 1.0).abs() < 1e-6 && v[1].abs() < 1e-6,
            "{cfg:?}: {v:?}"
        );
    }
}

#[test]
fn a_state_of_several_tensors_carries_the_log_density_change() {
    // The instantaneous change of variables for a linear ODE: d log p / dt = −tr(A), exact.
    let g = |t: f64, s: &Vec<Tensor>| -> Result<Vec<Tensor>> {
        let dl = Tensor::new(&[-2.0 * ALPHA], &Device::Cpu)?;
        Ok(vec![f(t, &s[0])?, dl])
    };
    let state = vec![y0(), Tensor::new(&[0f64], &Device::Cpu).unwrap()];
    let (out, _) = solve(g, state, 0.0, T1, &SolverConfig::dopri5(1e-8, 1e-8)).unwrap();
    assert!(error(&out[0], T1) < 1e-6);
    let l = out[1].to_vec1::<f64>().unwrap()[0];
    assert!((l + 2.0 * ALPHA * T1).abs() < 1e-9, "{l}");
}

#[test]
fn bad_settings_fail_with_their_name() {
    let e = solve(f, y0(), 0.0, 1.0, &SolverConfig::rk4(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("steps"), "{e}");
    let e = solve(f, y0(), 0.0, 1.0, &SolverConfig::dopri5(0.0, 1e-6))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rtol"), "{e}");
    let e = dopri5(f, y0(), 0.0, 100.0, 1e-12, 1e-12, 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gave up"), "{e}");
    // A config round-trips through TOML-like serialisation.
    let cfg = SolverConfig::dopri5(1e-3, 1e-4);
    let back: SolverConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(cfg, back);
}

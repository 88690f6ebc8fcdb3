//! MALA and annealed importance sampling against closed forms.

use candle_core::{DType, Device, Tensor};
use gm_core::mcmc::{ais, log_mean_exp_with_se, mala_step};
use gm_core::GmRng;

/// `log N(x; 0, s² I)` per row.
fn log_normal(x: &Tensor, s: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(1)? as f64;
    (x.sqr()?.sum(1)? * (-0.5 / (s * s)))? - d * (s.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln())
}

/// An unnormalised two-component mixture in 2-D: `0.3·exp(−‖x − m₁‖²/2v) + 0.7·exp(−‖x − m₂‖²/2v)`
/// with `Z = 2πv`.
fn log_mixture(x: &Tensor) -> candle_core::Result<Tensor> {
    let v = 0.25;
    let m1 = Tensor::new(&[[-1.5f64, 0.5]], x.device())?;
    let m2 = Tensor::new(&[[1.5f64, -0.5]], x.device())?;
    let a = ((x.broadcast_sub(&m1)?.sqr()?.sum(1)? * (-0.5 / v))? + 0.3f64.ln())?;
    let b = ((x.broadcast_sub(&m2)?.sqr()?.sum(1)? * (-0.5 / v))? + 0.7f64.ln())?;
    let m = a.maximum(&b)?;
    let s = ((a - &m)?.exp()? + (b - &m)?.exp()?)?;
    m + s.log()?
}

/// AIS from `N(0, 2²)` to the unnormalised mixture finds `log Z = ln(2π·0.25)` within 3 of its
/// standard errors (plus 0.01 for the anneal's bias); its chains, weighted by their importance
/// weights, carry the mixture's component weights (the chains alone need not: MALA does not cross
/// between the modes once they separate).
#[test]
fn ais_finds_the_log_normaliser_of_a_mixture() {
    let mut rng = GmRng::new(1);
    let x0 = (rng
        .randn((2000, 2), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        * 2.0)
        .unwrap();
    let r = ais(
        |x| log_normal(x, 2.0),
        log_mixture,
        x0,
        500,
        2,
        0.05,
        &mut rng,
    )
    .unwrap();
    let truth = (2.0 * std::f64::consts::PI * 0.25).ln();
    println!(
        "AIS log Z {:.4} ± {:.4} vs {truth:.4}; acceptance {:.3}",
        r.log_z, r.se, r.acceptance
    );
    assert!((r.log_z - truth).abs() < 3.0 * r.se + 0.01);
    assert!(r.se < 0.05);
    let xs: Vec<Vec<f64>> = r.samples.to_vec2().unwrap();
    let lw = &r.log_weights;
    let top = lw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = lw.iter().map(|l| (l - top).exp()).collect();
    let total: f64 = w.iter().sum();
    let right: f64 = xs
        .iter()
        .zip(&w)
        .filter(|(p, _)| p[0] > 0.0)
        .map(|(_, w)| w)
        .sum::<f64>()
        / total;
    // Effective sample size of the weights sets the error of the weighted fraction.
    let ess = total * total / w.iter().map(|w| w * w).sum::<f64>();
    let se = (0.7f64 * 0.3 / ess).sqrt();
    println!("weighted mass right of 0: {right:.4} vs 0.7 (ESS {ess:.0}, se {se:.4})");
    assert!((right - 0.7).abs() < 3.0 * se);
}

/// MALA keeps its target: chains started from `N(0, 2²)` reach `N((1, −1), 0.5²)`.
#[test]
fn mala_reaches_a_gaussian() {
    let mut rng = GmRng::new(2);
    let m = Tensor::new(&[[1.0f64, -1.0]], &Device::Cpu).unwrap();
    let mut f = |x: &Tensor| x.broadcast_sub(&m)?.sqr()?.sum(1)? * (-0.5 / 0.25);
    let mut x = (rng
        .randn((4000, 2), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        * 2.0)
        .unwrap();
    let mut acc = 0.0;
    for _ in 0..300 {
        let (nx, r) = mala_step(&mut f, &x, 0.05, &mut rng).unwrap();
        x = nx;
        acc += r / 300.0;
    }
    let v: Vec<Vec<f64>> = x.to_vec2().unwrap();
    for (d, want) in [1.0, -1.0].into_iter().enumerate() {
        let col: Vec<f64> = v.iter().map(|r| r[d]).collect();
        let n = col.len() as f64;
        let mean = col.iter().sum::<f64>() / n;
        let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        println!("dim {d}: mean {mean:.4} var {var:.4} (acceptance {acc:.3})");
        assert!((mean - want).abs() < 3.0 * (0.25 / n).sqrt());
        assert!((var - 0.25).abs() < 3.0 * 0.25 * (2.0 / n).sqrt());
    }
    assert!(acc > 0.5, "acceptance {acc}");
}

#[test]
fn log_mean_exp_is_stable_and_exact() {
    let (m, se) = log_mean_exp_with_se(&[1000.0, 1000.0 + 2f64.ln()]);
    assert!((m - (1000.0 + 1.5f64.ln())).abs() < 1e-12);
    assert!(se > 0.0);
}

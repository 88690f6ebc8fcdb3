//! The NCE energy model: the loss's gradient against finite differences, and on 2-D Gaussian data
//! the learned log-normaliser `c` against the energy's own integral over a grid.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{entropy, gaussian_data, train_on_gaussian};
use gm_core::GmRng;
use gm_models::ebm::{Ebm, EbmConfig};
use gm_models::{Batch, EvalOptions, Model};

fn small() -> EbmConfig {
    EbmConfig {
        hidden: vec![16, 16],
        noise_std: 1.5,
        noise_ratio: 3,
        ..Default::default()
    }
}

/// The NCE loss's gradient with respect to `c` and to every weight equals central finite
/// differences in f64.
#[test]
fn nce_gradient_matches_finite_differences() {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 3, DType::F64, &Device::Cpu);
    let m = Ebm::new(small(), vb).unwrap();
    let mut rng = GmRng::new(4);
    let x = rng
        .randn((8, 2, 1, 1), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let y = (rng
        .randn((24, 2, 1, 1), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        * 1.5)
        .unwrap();
    let loss = |m: &Ebm| m.nce_loss(&x, &y).unwrap().mean_all().unwrap();
    let grads = loss(&m).backward().unwrap();
    let vars = vm.data().lock().unwrap().clone();
    let mut checked = 0;
    for (name, var) in vars.iter() {
        let g = grads.get(var.as_tensor()).unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let gv = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in [0, base.len() / 2, base.len() - 1] {
            let h = 1e-6;
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&m).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (fd - gv[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "{name}[{i}]: {fd} vs {}",
                gv[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 7, "checked {checked}");
}

/// Trained by NCE on `N((1, −0.5), diag(0.5, 0.2))` with Gaussian noise, the learned `c` equals
/// `log ∫exp(−E)` of the learned energy (a 300 × 300 grid over ±6) within 0.05 nats — NCE
/// normalises the model itself — the held-out `E + c` is within 0.1 nats of the data's entropy,
/// and AIS from the noise agrees with the grid within 3 standard errors (+0.02).
#[test]
fn nce_learns_a_normalised_gaussian() {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let cfg = EbmConfig {
        hidden: vec![64, 64],
        noise_std: 1.5,
        noise_ratio: 4,
        ais_levels: 100,
        ais_chains: 1000,
        mcmc_step: 0.02,
        ..Default::default()
    };
    let m = Ebm::new(cfg, vb).unwrap();
    let (first, last, mut rng) = train_on_gaussian(&vm, &m, 1200);
    // The energy's integral over a grid.
    let n = 300;
    let lim = 6.0;
    let step = 2.0 * lim / n as f64;
    let mut pts = Vec::with_capacity(2 * n * n);
    for r in 0..n {
        for c in 0..n {
            pts.push((-lim + (c as f64 + 0.5) * step) as f32);
            pts.push((-lim + (r as f64 + 0.5) * step) as f32);
        }
    }
    let grid = Tensor::from_vec(pts, (n * n, 2, 1, 1), &Device::Cpu).unwrap();
    let e: Vec<f64> = m
        .energy(&grid)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let lo = e.iter().copied().fold(f64::INFINITY, f64::min);
    let log_z_grid = -lo + (e.iter().map(|v| (lo - v).exp()).sum::<f64>() * step * step).ln();
    let c = m.log_z().unwrap();
    let h = entropy();
    let test = Batch {
        x: gaussian_data(2000, &mut rng),
        labels: None,
    };
    let metrics = m
        .eval_metrics(&test, &mut rng, &EvalOptions::default())
        .unwrap();
    let mean = |k: &str| {
        metrics
            .iter()
            .find(|(n, _)| n == k)
            .unwrap()
            .1
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let (nll, lz_ais, se) = (mean("nll_nats"), mean("log_z_ais"), mean("log_z_ais_se"));
    println!(
        "nce_loss {first:.4} -> {last:.4}; c {c:.4}, grid log Z {log_z_grid:.4}, AIS {lz_ais:.4} ± {se:.4}; nll {nll:.4} vs entropy {h:.4}"
    );
    assert!(last < first, "the loss did not fall");
    assert!((c - log_z_grid).abs() < 0.05, "c {c} vs {log_z_grid}");
    assert!((nll - h).abs() < 0.1, "nll {nll} vs {h}");
    assert!(
        (lz_ais - log_z_grid).abs() < 3.0 * se + 0.02,
        "AIS {lz_ais} vs {log_z_grid}"
    );
}

/// With a RealNVP as the noise on 2×2 "images", AIS from the flow — chains in the flow's latent
/// space — agrees with plain Monte Carlo `log ∫exp(−E) dx` over uniform pixels in the flow's
/// support, the box of its logit pre-processing around `[0, 1]^4` (an estimate that never touches
/// the flow's inverse) within 4 standard errors, for a full
/// energy and for a residual one `E = −log q + g`; the flow's weights are perturbed away from the
/// identity they start at (by 0.1: much further and AIS's chains from the noise no longer reach
/// the model's mass, AIS's known failure), the energy's last layer by 1.
#[test]
fn ais_through_the_noise_flow_matches_uniform_monte_carlo() {
    const PERTURB: f64 = 0.1;
    use gm_models::realnvp::RealNvpConfig;
    let dev = Device::Cpu;
    for residual in [false, true] {
        let vm = VarMap::new();
        let vb = gm_core::rng::seeded_var_builder(&vm, 5, DType::F32, &dev);
        let shape = [1, 2, 2];
        let cfg = EbmConfig {
            image_shape: shape,
            channels: vec![4],
            hidden: vec![8],
            noise: "flow".into(),
            flow: Some(RealNvpConfig {
                image_shape: shape,
                num_scales: 1,
                hidden: 4,
                num_blocks: 1,
                ..Default::default()
            }),
            residual,
            ais_levels: 100,
            ais_chains: 1000,
            mcmc_step: 0.1,
            ..Default::default()
        };
        let m = Ebm::new(cfg, vb).unwrap();
        let mut rng = GmRng::new(6);
        let mut vars: Vec<_> = vm.data().lock().unwrap().clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars.iter() {
            if name.starts_with("noise_flow.") || name.starts_with("energy.2.") {
                let scale = if name.starts_with("energy.") {
                    1.0
                } else {
                    PERTURB
                };
                let noise = (rng.randn(var.shape(), &dev).unwrap() * scale).unwrap();
                var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
            }
        }
        // Uniform Monte Carlo over the flow's support, the box (lo, hi)^4 that holds [0, 1]^4:
        // Z = (hi − lo)^4 · E_U[exp(−E(x))].
        let (lo, hi) = m.noise_flow().unwrap().logit().unwrap().support();
        let (mut s, mut s2, mut n) = (0f64, 0f64, 0usize);
        for _ in 0..20 {
            let x = rng
                .uniform((10_000, 1, 2, 2), lo as f32, hi as f32, &dev)
                .unwrap();
            let e: Vec<f32> = m.energy(&x).unwrap().to_vec1().unwrap();
            for v in e {
                let w = (-(v as f64)).exp();
                s += w;
                s2 += w * w;
                n += 1;
            }
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        let lz_mc = mean.ln() + 4.0 * (hi - lo).ln();
        let se_mc = (var / n as f64).sqrt() / mean;
        let (lz, se, acc) = m.ais_log_z(&mut rng).unwrap();
        println!(
            "residual {residual}: AIS log Z {lz:.4} ± {se:.4} (acceptance {acc:.3}), uniform MC {lz_mc:.4} ± {se_mc:.4}"
        );
        let tol = 4.0 * (se * se + se_mc * se_mc).sqrt();
        assert!(
            (lz - lz_mc).abs() < tol,
            "residual {residual}: AIS {lz} vs MC {lz_mc} (tolerance {tol})"
        );
        assert!(
            se_mc < 0.05 && se < 0.05,
            "too noisy to tell: {se_mc}, {se}"
        );
    }
}

//! The score-SDE maths against closed forms: denoising score matching's optimum on Gaussian data,
//! annealed Langevin dynamics on a two-component mixture, the probability-flow ODE's exact
//! log-density on Gaussian data, the reverse samplers' moments, the VP reverse step against DDPM's
//! posterior mean, and the finite-difference sliced score matching loss on a linear score.

use candle_core::{DType, Device, Tensor};
use gm_core::cnf::{log_likelihood_with_prior, Divergence};
use gm_core::diffusion::NoiseSchedule;
use gm_core::ode::SolverConfig;
use gm_core::sde::{
    fd_sliced_score_matching, perturb, pf_ode_log_likelihood, pf_velocity, reverse_em_step, sample,
    Sde, SdeMethod, SdeSamplerConfig,
};
use gm_core::GmRng;

/// σ_max well above the data's spread (Song & Ermon's rule), so the prior `N(0, σ_max²)` fits.
const VE: Sde = Sde::Ve {
    sigma_min: 0.01,
    sigma_max: 50.0,
};
const VP: Sde = Sde::Vp {
    beta_min: 0.1,
    beta_max: 20.0,
};

fn vec_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn randn64(rng: &mut GmRng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// `N(μ, v)` data with a diagonal covariance: the noised marginal at `t` is
/// `N(a μ, a² v + s²)` and its score is `−(x − a μ)/(a² v + s²)`.
struct Gauss {
    mu: Vec<f64>,
    var: Vec<f64>,
}

impl Gauss {
    fn marginal(&self, sde: &Sde, t: f64) -> (Vec<f64>, Vec<f64>) {
        let (a, s) = sde.marginal(t);
        (
            self.mu.iter().map(|m| a * m).collect(),
            self.var.iter().map(|v| a * a * v + s * s).collect(),
        )
    }

    /// The exact score as tensor operations (the likelihood differentiates it).
    fn score(&self, sde: &Sde, x: &Tensor, t: f64) -> Tensor {
        let (m, v) = self.marginal(sde, t);
        let m = Tensor::new(m.as_slice(), x.device()).unwrap();
        let v = Tensor::new(v.as_slice(), x.device()).unwrap();
        x.broadcast_sub(&m)
            .unwrap()
            .broadcast_div(&v)
            .unwrap()
            .neg()
            .unwrap()
    }

    fn log_prob(&self, sde: &Sde, x: &Tensor, t: f64) -> Vec<f64> {
        let (m, v) = self.marginal(sde, t);
        diag_log_prob(&m, &v, x)
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Tensor {
        let d = self.mu.len();
        let z = randn64(rng, &[n, d]);
        let m = Tensor::new(self.mu.as_slice(), &Device::Cpu).unwrap();
        let s = Tensor::new(
            self.var
                .iter()
                .map(|v| v.sqrt())
                .collect::<Vec<_>>()
                .as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        z.broadcast_mul(&s).unwrap().broadcast_add(&m).unwrap()
    }
}

/// `log N(x; m, diag v)` per row of `x` `(B, D)`.
fn diag_log_prob(m: &[f64], v: &[f64], x: &Tensor) -> Vec<f64> {
    vec_of(x)
        .chunks(m.len())
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(i, x)| {
                    -0.5 * ((x - m[i]).powi(2) / v[i] + (2.0 * std::f64::consts::PI * v[i]).ln())
                })
                .sum()
        })
        .collect()
}

fn gauss() -> Gauss {
    Gauss {
        mu: vec![0.5, -1.0],
        var: vec![0.3, 2.0],
    }
}

/// Denoising score matching regresses `z` on `x_t = a x₀ + s z`; on Gaussian data its optimum
/// (least squares over 400 000 pairs) is `E[z | x_t] = s (x_t − a μ)/(a² v + s²)`, i.e. the
/// closed-form noised score times `−s`.
#[test]
fn dsm_optimum_on_gaussian_data_is_the_noised_score() {
    let (mu, var) = (0.7f64, 0.25f64);
    for (name, sde) in [("ve", VE), ("vp", VP)] {
        for t in [0.1, 0.3, 0.6] {
            let mut rng = GmRng::new(1);
            let n = 400_000;
            let x0 = (randn64(&mut rng, &[n, 1]) * var.sqrt()).unwrap() + mu;
            let x0 = x0.unwrap();
            let z = randn64(&mut rng, &[n, 1]);
            let (xt, s) = perturb(&sde, &x0, &vec![t; n], &z).unwrap();
            assert!(s.iter().all(|&v| v == sde.marginal(t).1));
            // Least squares z ≈ w x_t + b.
            let (xv, zv) = (vec_of(&xt), vec_of(&z));
            let nf = n as f64;
            let mx = xv.iter().sum::<f64>() / nf;
            let mz = zv.iter().sum::<f64>() / nf;
            let sxz: f64 = xv.iter().zip(&zv).map(|(x, z)| (x - mx) * (z - mz)).sum();
            let sxx: f64 = xv.iter().map(|x| (x - mx).powi(2)).sum();
            let w = sxz / sxx;
            let b = mz - w * mx;
            let (a, s) = sde.marginal(t);
            let v_t = a * a * var + s * s;
            let (w_star, b_star) = (s / v_t, -s * a * mu / v_t);
            // Standard error of the slope: sqrt(resid var / sxx).
            let resid = 1.0 - s * s / v_t;
            let se_w = (resid / sxx).sqrt();
            println!(
                "{name} t={t}: w {w:.5} vs {w_star:.5} (se {se_w:.1e}), b {b:.5} vs {b_star:.5}"
            );
            assert!(
                (w - w_star).abs() < 4.0 * se_w + 1e-9,
                "{name} t={t}: slope"
            );
            assert!(
                (b - b_star).abs() < 4.0 * (resid / nf).sqrt() * (1.0 + mx.abs() * 2.0),
                "{name} t={t}: intercept"
            );
        }
    }
}

/// NCSN's annealed Langevin dynamics with the exact noised score of
/// `0.3·N(−2, 0.5²) + 0.7·N(2, 1)` under the VE SDE: 20 000 chains reach the mixture's mean,
/// variance and the mass left of 0 (the mode weight) within 3 Monte Carlo standard errors.
#[test]
fn annealed_langevin_reaches_a_two_component_mixture() {
    let w = [0.3, 0.7];
    let m = [-2.0, 2.0];
    let v = [0.25, 1.0];
    let score = |x: &Tensor, t: f64| -> candle_core::Result<Tensor> {
        let s2 = VE.marginal(t).1.powi(2);
        let out: Vec<f64> = vec_of(x)
            .iter()
            .map(|&x| {
                let (mut num, mut den) = (0.0, 0.0);
                for k in 0..2 {
                    let vk = v[k] + s2;
                    let p = w[k] * (-(x - m[k]).powi(2) / (2.0 * vk)).exp() / vk.sqrt();
                    num += p * -(x - m[k]) / vk;
                    den += p;
                }
                num / den.max(1e-300)
            })
            .collect();
        Tensor::from_vec(out, x.shape(), x.device())
    };
    let cfg = SdeSamplerConfig {
        method: SdeMethod::AnnealedLangevin,
        steps: 40,
        corrector_steps: 400,
        step_lr: 3e-6,
        t_min: 1e-6,
        denoise: true,
        ..Default::default()
    };
    let n = 20_000;
    let mut rng = GmRng::new(3);
    let x0 = VE
        .prior_sample(&[n, 1], DType::F64, &Device::Cpu, &mut rng)
        .unwrap();
    let (x, stats) = sample(&VE, &cfg, x0, &mut rng, score).unwrap();
    assert_eq!(stats.nfe, 40 * 400 + 1);
    let xs = vec_of(&x);
    let nf = n as f64;
    let mean = xs.iter().sum::<f64>() / nf;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0);
    let m4 = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / nf;
    let left = xs.iter().filter(|&&x| x < 0.0).count() as f64 / nf;
    let true_mean = w[0] * m[0] + w[1] * m[1];
    let true_var = (0..2).map(|k| w[k] * (v[k] + m[k] * m[k])).sum::<f64>() - true_mean * true_mean;
    let phi = |z: f64| 0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2));
    let true_left = (0..2)
        .map(|k| w[k] * phi((0.0 - m[k]) / v[k].sqrt()))
        .sum::<f64>();
    let se_mean = (var / nf).sqrt();
    let se_var = ((m4 - var * var) / nf).sqrt();
    let se_left = (true_left * (1.0 - true_left) / nf).sqrt();
    println!(
        "mean {mean:.4} vs {true_mean:.4} (se {se_mean:.4}); var {var:.4} vs {true_var:.4} (se {se_var:.4}); P(x<0) {left:.4} vs {true_left:.4} (se {se_left:.4})"
    );
    assert!((mean - true_mean).abs() < 3.0 * se_mean, "mean");
    assert!((var - true_var).abs() < 3.0 * se_var, "variance");
    assert!((left - true_left).abs() < 3.0 * se_left, "mode weight");
}

/// Abramowitz–Stegun 7.1.26 is not precise enough for a 3-SE test at n = 20 000 near the tails;
/// this is erf by its series / continued fraction to ~1e-15.
fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x < 3.0 {
        // Maclaurin series.
        let mut sum = x;
        let mut term = x;
        let mut k = 0.0;
        loop {
            k += 1.0;
            term *= -x * x / k;
            let add = term / (2.0 * k + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc continued fraction (Lentz).
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (x + f);
        }
        1.0 - (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
    }
}

/// The probability-flow ODE maps the Gaussian data's marginal at `t_min` onto the one at 1: with
/// the exact score and the exact prior at `t = 1`, the likelihood integral gives the exact
/// log-density at `t_min` (Dopri5, exact divergence, f64); with the SDE's own prior `N(0, σ_max²)`
/// or `N(0, I)` it is off only by that prior's mismatch.
#[test]
fn probability_flow_ode_gives_the_exact_gaussian_log_density() {
    let g = gauss();
    let t_min = 1e-3;
    let solver = SolverConfig::dopri5(1e-9, 1e-9);
    for (name, sde) in [("ve", VE), ("vp", VP)] {
        let mut rng = GmRng::new(5);
        let x = g.sample(64, &mut rng);
        let exact = g.log_prob(&sde, &x, t_min);
        let (m1, v1) = g.marginal(&sde, 1.0);
        let prior1 = |z: &Tensor| -> candle_core::Result<Tensor> {
            let out = diag_log_prob(&m1, &v1, z);
            Tensor::from_vec(out, z.dim(0)?, z.device())
        };
        let (lp, stats) = log_likelihood_with_prior(
            |t, x: &Tensor| pf_velocity(&sde, t, x, &g.score(&sde, x, t)),
            &x,
            t_min,
            1.0,
            &solver,
            Divergence::Exact,
            &mut rng,
            prior1,
        )
        .unwrap();
        let worst = vec_of(&lp)
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!(
            "{name}: exact prior, worst |Δ log p| = {worst:.2e} ({} NFE)",
            stats.nfe
        );
        assert!(worst < 1e-5, "{name}: {worst}");
        let (lp, _) = pf_ode_log_likelihood(
            &sde,
            &x,
            t_min,
            &solver,
            Divergence::Exact,
            &mut rng,
            |x, t| Ok(g.score(&sde, x, t)),
        )
        .unwrap();
        let mean_gap = vec_of(&lp)
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / 64.0;
        println!("{name}: SDE prior, mean |Δ log p| = {mean_gap:.2e}");
        assert!(mean_gap < 0.02, "{name}: {mean_gap}");
        // Stepped in σ̄ on Karras' spacing, fixed-step RK4 converges on the adaptive answer at
        // its order: 12 steps (48 NFE) are within 0.05 nats, 24 steps ≥ 8× closer.
        let mut errs = Vec::new();
        for steps in [12, 24] {
            let (lp_k, st) = pf_ode_log_likelihood(
                &sde,
                &x,
                t_min,
                &SolverConfig::rk4(steps),
                Divergence::Exact,
                &mut rng,
                |x, t| Ok(g.score(&sde, x, t)),
            )
            .unwrap();
            let worst = vec_of(&lp_k)
                .iter()
                .zip(vec_of(&lp))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            println!(
                "{name}: RK4 × {steps} ({} NFE) vs Dopri5: worst |Δ log p| = {worst:.2e}",
                st.nfe
            );
            errs.push(worst);
        }
        assert!(errs[0] < 0.05, "{name}: {errs:?}");
        assert!(errs[1] < errs[0] / 8.0, "{name}: {errs:?}");
    }
}

/// The reverse samplers (Euler–Maruyama, predictor–corrector, the probability-flow ODE) driven by
/// the exact score of Gaussian data reach its mean and variance (20 000 samples, 3 standard
/// errors plus the samplers' discretisation allowance of 2% in variance).
#[test]
fn reverse_samplers_reach_gaussian_moments() {
    let g = gauss();
    for (name, sde) in [("ve", VE), ("vp", VP)] {
        for method in [SdeMethod::EulerMaruyama, SdeMethod::Pc, SdeMethod::Ode] {
            let cfg = SdeSamplerConfig {
                method,
                steps: 500,
                corrector_steps: 1,
                t_min: 1e-4,
                solver: SolverConfig::rk4(100),
                ..Default::default()
            };
            let n = 20_000;
            let mut rng = GmRng::new(7);
            let x0 = sde
                .prior_sample(&[n, 2], DType::F64, &Device::Cpu, &mut rng)
                .unwrap();
            let (x, _) = sample(&sde, &cfg, x0, &mut rng, |x, t| Ok(g.score(&sde, x, t))).unwrap();
            let xs = vec_of(&x);
            for d in 0..2 {
                let col: Vec<f64> = xs.iter().skip(d).step_by(2).copied().collect();
                let nf = n as f64;
                let mean = col.iter().sum::<f64>() / nf;
                let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0);
                let se_m = (g.var[d] / nf).sqrt();
                let se_v = g.var[d] * (2.0 / nf).sqrt();
                println!(
                    "{name} {method:?} dim {d}: mean {mean:.4} vs {} (se {se_m:.4}), var {var:.4} vs {}",
                    g.mu[d], g.var[d]
                );
                assert!((mean - g.mu[d]).abs() < 3.0 * se_m + 0.01 * g.var[d].sqrt());
                assert!((var - g.var[d]).abs() < 3.0 * se_v + 0.02 * g.var[d]);
            }
        }
    }
}

/// The VP SDE's reverse Euler–Maruyama mean equals DDPM's posterior mean
/// `(x − β/√(1−ᾱ) ε̂)/√(1−β)` to first order in `β`: with `T` steps (`β_t = β(t)/T`) the gap at
/// `t = ½` falls by 4 when `T` doubles (second order per step), and vanishes relative to `β`.
#[test]
fn vp_reverse_step_matches_the_ddpm_posterior_mean_to_first_order() {
    let mut rng = GmRng::new(9);
    let x = randn64(&mut rng, &[256]);
    let eps = randn64(&mut rng, &[256]);
    let mut gaps = Vec::new();
    for big_t in [100usize, 200, 400, 800, 1600] {
        let betas: Vec<f64> = (0..big_t)
            .map(|i| VP.g2((i + 1) as f64 / big_t as f64) / big_t as f64)
            .collect();
        let schedule = NoiseSchedule::from_betas(betas.clone());
        let i = big_t / 2 - 1;
        let t = (i + 1) as f64 / big_t as f64;
        let a_bar = schedule.alpha_bar(Some(i));
        let sd = (1.0 - a_bar).sqrt();
        // DDPM: x̂₀ from ε̂, then the posterior mean.
        let (c0, ct, _) = schedule.posterior(i, i.checked_sub(1));
        let x0_hat = ((&x - (&eps * sd).unwrap()).unwrap() / a_bar.sqrt()).unwrap();
        let ddpm = ((x0_hat * c0).unwrap() + (&x * ct).unwrap()).unwrap();
        let score = (&eps * (-1.0 / sd)).unwrap();
        let (_, em) = reverse_em_step(&VP, t, 1.0 / big_t as f64, &x, &score, None).unwrap();
        let gap = vec_of(&(em - ddpm).unwrap())
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        println!(
            "T = {big_t}: β = {:.2e}, max gap {gap:.3e}, gap/β = {:.3e}",
            betas[i],
            gap / betas[i]
        );
        gaps.push((betas[i], gap));
    }
    for w in gaps.windows(2) {
        let ratio = w[0].1 / w[1].1;
        println!("ratio {ratio:.3}");
        assert!(
            (3.6..4.4).contains(&ratio),
            "gap ratio {ratio}: not second order per step"
        );
    }
    let (b_last, g_last) = gaps[gaps.len() - 1];
    let (b_first, g_first) = gaps[0];
    assert!(
        g_last / b_last < 0.1 * g_first / b_first,
        "gap/β does not vanish"
    );
}

/// The finite-difference sliced score-matching loss is exact for a linear score `s = A x + c`:
/// `vᵀ A v + ½ (vᵀ(A x + c))²`.
#[test]
fn fd_sliced_score_matching_is_exact_for_a_linear_score() {
    let mut rng = GmRng::new(11);
    let a = randn64(&mut rng, &[3, 3]);
    let c = randn64(&mut rng, &[3]);
    let x = randn64(&mut rng, &[8, 3]);
    let v = randn64(&mut rng, &[8, 3]);
    let lin = |x: &Tensor| x.matmul(&a.t()?)?.broadcast_add(&c);
    let loss = fd_sliced_score_matching(&x, &v, &[0.01; 8], lin).unwrap();
    let (av, xv, vv, cv) = (
        a.to_vec2::<f64>().unwrap(),
        x.to_vec2::<f64>().unwrap(),
        v.to_vec2::<f64>().unwrap(),
        c.to_vec1::<f64>().unwrap(),
    );
    for (i, l) in loss.to_vec1::<f64>().unwrap().iter().enumerate() {
        let mut quad = 0.0;
        let mut proj = 0.0;
        for r in 0..3 {
            let mut s = cv[r];
            for k in 0..3 {
                quad += vv[i][r] * av[r][k] * vv[i][k];
                s += av[r][k] * xv[i][k];
            }
            proj += vv[i][r] * s;
        }
        let want = quad + 0.5 * proj * proj;
        assert!(
            (l - want).abs() < 1e-9 * (1.0 + want.abs()),
            "{l} vs {want}"
        );
    }
}

/// The VE and VP SDEs' coefficients: `g² = ds²/dt` for VE and `g² = β` with `a² + s² = 1` for VP,
/// checked by finite differences of the marginal.
#[test]
fn sde_coefficients_match_their_marginals() {
    for t in [0.05, 0.4, 0.9] {
        let h = 1e-6;
        let ds2 = (VE.marginal(t + h).1.powi(2) - VE.marginal(t - h).1.powi(2)) / (2.0 * h);
        assert!((VE.g2(t) - ds2).abs() < 1e-5 * ds2, "ve g2");
        let (a, s) = VP.marginal(t);
        assert!((a * a + s * s - 1.0).abs() < 1e-12);
        // d ln a/dt = f(t)
        let dla = (VP.marginal(t + h).0.ln() - VP.marginal(t - h).0.ln()) / (2.0 * h);
        assert!((dla - VP.drift(t)).abs() < 1e-6, "vp drift");
    }
    assert!(VE.validate().is_ok() && VP.validate().is_ok());
    let bad = Sde::Ve {
        sigma_min: 1.0,
        sigma_max: 0.5,
    };
    assert!(bad.validate().unwrap_err().contains("sde.sigma_max"));
}

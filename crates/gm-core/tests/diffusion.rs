//! Gaussian diffusion against closed forms: schedules, the forward process' moments, the posterior
//! by Bayes' rule, exact denoisers whose samplers must land on known distributions.

use candle_core::{DType, Device, Tensor};
use gm_core::diffusion::{
    discretized_gaussian_log_likelihood, normal_kl, q_sample, sample_loop, spaced_timesteps,
    split_prediction, target, BetaSchedule, NoiseSchedule, Prediction, SamplerConfig, SamplerKind,
    ScheduleConfig, Spacing,
};
use gm_core::samplers::{flow_multistep, schedule_sigmas};
use gm_core::GmRng;

fn linear(t: usize) -> NoiseSchedule {
    NoiseSchedule::new(&ScheduleConfig {
        timesteps: t,
        ..Default::default()
    })
    .unwrap()
}

fn cosine(t: usize) -> NoiseSchedule {
    NoiseSchedule::new(&ScheduleConfig {
        schedule: BetaSchedule::Cosine,
        timesteps: t,
        ..Default::default()
    })
    .unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn alpha_bar_matches_closed_forms() {
    // Linear 1e-4 … 0.02 over 1000 steps; reference values from numpy's cumprod in f64.
    let s = linear(1000);
    assert!((s.alphas_cumprod[999] - 4.035829765375676e-05).abs() < 1e-15);
    assert!((s.alphas_cumprod[499] - 0.07858724288177824).abs() < 1e-14);
    // Cosine: the product telescopes to f(t+1)/f(0) wherever β is not clipped.
    let s = cosine(1000);
    let f = |i: f64| {
        (((i / 1000.0 + 0.008) / 1.008) * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    for t in [0, 10, 500, 900] {
        let want = f(t as f64 + 1.0) / f(0.0);
        assert!((s.alphas_cumprod[t] - want).abs() < 1e-12, "t = {t}");
    }
    assert!(s.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
}

#[test]
fn forward_process_has_the_closed_form_moments() {
    let s = linear(1000);
    let n = 20_000;
    let mut rng = GmRng::new(1);
    for t in [0usize, 100, 500, 999] {
        let x0 = Tensor::full(0.7f64, n, &Device::Cpu).unwrap();
        let eps = rng
            .randn(n, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let xt = vals(&q_sample(&s, &x0, &vec![t; n], &eps).unwrap());
        let mean = xt.iter().sum::<f64>() / n as f64;
        let var = xt.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let a = s.alphas_cumprod[t];
        let (m, v) = (0.7 * a.sqrt(), 1.0 - a);
        assert!(
            (mean - m).abs() < 5.0 * (v / n as f64).sqrt(),
            "t {t}: mean {mean} vs {m}"
        );
        assert!(
            (var / v - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
            "t {t}: var {var} vs {v}"
        );
    }
}

#[test]
fn posterior_is_bayes_rule() {
    let s = cosine(200);
    for t in [1usize, 50, 199] {
        let (cx0, cxt, var) = s.posterior(t, Some(t - 1));
        let (ab, ab_prev, beta) = (s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]);
        // q(x_{t-1}|x_0) = N(√ᾱ' x0, 1−ᾱ'), q(x_t|x_{t-1}) = N(√α x_{t-1}, β): multiply.
        let precision = 1.0 / (1.0 - ab_prev) + (1.0 - beta) / beta;
        assert!((var - 1.0 / precision).abs() < 1e-12);
        assert!((cx0 - ab_prev.sqrt() / (1.0 - ab_prev) / precision).abs() < 1e-10);
        assert!((cxt - (1.0 - beta).sqrt() / beta / precision).abs() < 1e-10);
        let _ = ab;
    }
    // The step into the data is the identity on x̂_0.
    let (cx0, cxt, var) = s.posterior(0, None);
    assert!((cx0 - 1.0).abs() < 1e-12 && cxt.abs() < 1e-12 && var.abs() < 1e-12);
}

#[test]
fn each_prediction_type_inverts() {
    let s = linear(100);
    let mut rng = GmRng::new(2);
    let dev = Device::Cpu;
    let x0 = rng
        .randn((3, 1, 2, 2), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let eps = rng
        .randn((3, 1, 2, 2), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let t = [0usize, 40, 99];
    let xt = q_sample(&s, &x0, &t, &eps).unwrap();
    for p in [Prediction::Epsilon, Prediction::Sample, Prediction::V] {
        let out = target(&s, p, &x0, &eps, &t).unwrap();
        let (x0h, epsh) = split_prediction(&s, p, &out, &xt, &t).unwrap();
        for (a, b) in vals(&x0h).iter().zip(vals(&x0)) {
            assert!((a - b).abs() < 1e-9, "{p:?} x0");
        }
        for (a, b) in vals(&epsh).iter().zip(vals(&eps)) {
            assert!((a - b).abs() < 1e-6, "{p:?} eps");
        }
    }
}

/// The exact ε-denoiser for data `N(0, s²)` per coordinate: `ε̂ = E[ε | x_t]`.
/// `ᾱ` at a (possibly fractional) time: `ln σ` interpolated between steps, as the Karras
/// samplers place their times.
fn alpha_bar_at(s: &NoiseSchedule, t: f64) -> f64 {
    if t.fract() == 0.0 {
        return s.alphas_cumprod[t as usize];
    }
    let ls: Vec<f64> = schedule_sigmas(s).iter().map(|v| v.ln()).collect();
    let j = t.floor() as usize;
    let sigma = (ls[j] + (t - j as f64) * (ls[j + 1] - ls[j])).exp();
    1.0 / (1.0 + sigma * sigma)
}

fn gaussian_eps(s: &NoiseSchedule, var0: f64, x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let a = alpha_bar_at(s, t);
    // x_t = √a x0 + √(1−a) ε, Cov(ε, x_t) = √(1−a), Var(x_t) = a var0 + 1 − a.
    x * ((1.0 - a).sqrt() / (a * var0 + 1.0 - a))
}

/// (Ancestral steps with the posterior variance under-disperse when respaced — the reverse
/// kernel's true variance adds `Var(x_0 | x_t)` — so the respaced DDPM run uses `β_t`.)
#[test]
fn samplers_with_the_exact_denoiser_reach_the_data_distribution() {
    let s = linear(1000);
    let dev = Device::Cpu;
    let n = 20_000;
    let var0 = 0.25;
    for cfg in [
        SamplerConfig {
            kind: SamplerKind::Ddpm,
            steps: 1000,
            clip_sample: false,
            ..Default::default()
        },
        SamplerConfig {
            kind: SamplerKind::Ddpm,
            steps: 250,
            clip_sample: false,
            large_variance: true,
            ..Default::default()
        },
    ] {
        let mut sampler = cfg.build(&s, Prediction::Epsilon).unwrap();
        let mut rng = GmRng::new(3);
        let xt = rng.randn(n, &dev).unwrap().to_dtype(DType::F64).unwrap();
        let x = sample_loop(sampler.as_mut(), xt, &mut rng, |x, t| {
            gaussian_eps(&s, var0, x, t)
        })
        .unwrap();
        let v = vals(&x);
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "{cfg:?}: mean {mean}");
        assert!(
            (var / var0 - 1.0).abs() < 0.05,
            "{cfg:?}: var {var} vs {var0}"
        );
    }
}

/// DDIM with `η = 0` and the exact Gaussian denoiser is a linear map `x_T ↦ g·x_T`; `g` computed
/// here by the scalar recurrence of Song et al.'s eq. 12 (the 50-step chain under-disperses:
/// `g² ≈ 0.2227` for data variance 0.25 — discretisation error, which 1000 steps remove).
#[test]
fn ddim_matches_its_scalar_recurrence_on_gaussian_data() {
    let s = linear(1000);
    let var0 = 0.25;
    for steps in [10usize, 50, 1000] {
        let ts = spaced_timesteps(1000, steps);
        let mut g = 1.0;
        for (i, &t) in ts.iter().enumerate() {
            let at = s.alphas_cumprod[t];
            let ap = ts.get(i + 1).map_or(1.0, |&p| s.alphas_cumprod[p]);
            let e = (1.0 - at).sqrt() / (at * var0 + 1.0 - at);
            let x0 = (1.0 - (1.0 - at).sqrt() * e) / at.sqrt();
            g *= ap.sqrt() * x0 + (1.0 - ap).sqrt() * e;
        }
        let cfg = SamplerConfig {
            steps,
            eta: 0.0,
            clip_sample: false,
            ..Default::default()
        };
        let mut sampler = cfg.build(&s, Prediction::Epsilon).unwrap();
        let xt = Tensor::new(&[1f64, -2.0, 0.5], &Device::Cpu).unwrap();
        let x = sample_loop(sampler.as_mut(), xt, &mut GmRng::new(0), |x, t| {
            gaussian_eps(&s, var0, x, t)
        })
        .unwrap();
        for (a, b) in vals(&x).iter().zip([g, -2.0 * g, 0.5 * g]) {
            assert!((a - b).abs() < 1e-12, "{steps} steps: {a} vs {b}");
        }
        if steps == 1000 {
            assert!((g * g / var0 - 1.0).abs() < 0.01, "g² = {}", g * g);
        }
    }
}

#[test]
fn a_point_mass_is_recovered_exactly_by_every_sampler() {
    // Data = the single image x*: the exact denoiser's x̂_0 is x* at every step.
    let s = cosine(100);
    let dev = Device::Cpu;
    let star = Tensor::new(&[[0.5f64, -0.25], [1.0, -1.0]], &dev).unwrap();
    for kind in SamplerKind::ALL {
        for p in [Prediction::Epsilon, Prediction::Sample, Prediction::V] {
            let cfg = SamplerConfig {
                kind,
                steps: 17,
                eta: if kind == SamplerKind::Ddim { 0.5 } else { 0.0 },
                ..Default::default()
            };
            let mut sampler = cfg.build(&s, p).unwrap();
            let mut rng = GmRng::new(4);
            let xt = rng
                .randn((2, 2), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let x = sample_loop(sampler.as_mut(), xt, &mut rng, |x, t| {
                let a = alpha_bar_at(&s, t);
                let eps = ((x - (&star * a.sqrt())?)? / (1.0 - a).sqrt())?;
                Ok(match p {
                    Prediction::Epsilon => eps,
                    Prediction::Sample => star.clone(),
                    Prediction::V => ((eps * a.sqrt())? - (&star * (1.0 - a).sqrt())?)?,
                })
            })
            .unwrap();
            for (a, b) in vals(&x).iter().zip(vals(&star)) {
                assert!((a - b).abs() < 1e-9, "{kind:?} {p:?}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn ddim_with_eta_zero_is_deterministic_and_eta_one_is_not() {
    let s = linear(1000);
    let dev = Device::Cpu;
    let xt = GmRng::new(5)
        .randn(64, &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let run = |eta: f64, seed: u64| {
        let cfg = SamplerConfig {
            eta,
            steps: 10,
            ..Default::default()
        };
        let mut sampler = cfg.build(&s, Prediction::Epsilon).unwrap();
        let mut rng = GmRng::new(seed);
        vals(
            &sample_loop(sampler.as_mut(), xt.clone(), &mut rng, |x, t| {
                gaussian_eps(&s, 0.3, x, t)
            })
            .unwrap(),
        )
    };
    assert_eq!(run(0.0, 1), run(0.0, 2));
    assert_ne!(run(1.0, 1), run(1.0, 2));
    assert_eq!(run(1.0, 7), run(1.0, 7));
}

#[test]
fn a_saved_sampler_config_reproduces_a_step() {
    let s = cosine(1000);
    let cfg = SamplerConfig {
        kind: SamplerKind::Ddim,
        steps: 25,
        spacing: Spacing::Trailing,
        steps_offset: 0,
        eta: 0.3,
        clip_sample: true,
        large_variance: false,
        guidance_scale: 2.0,
    };
    let text = serde_json::to_string(&cfg).unwrap();
    let back: SamplerConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg, back);
    let dev = Device::Cpu;
    let x = GmRng::new(6).randn((2, 1, 3, 3), &dev).unwrap();
    let out = GmRng::new(7).randn((2, 1, 3, 3), &dev).unwrap();
    let step = |c: &SamplerConfig| {
        let mut sm = c.build(&s, Prediction::V).unwrap();
        vals(&sm.step(&out, 3, &x, &mut GmRng::new(8)).unwrap())
    };
    assert_eq!(step(&cfg), step(&back));
    assert_eq!(spaced_timesteps(1000, 25).len(), 25);
    assert_eq!(spaced_timesteps(1000, 25)[0], 999);
    assert_eq!(*spaced_timesteps(1000, 25).last().unwrap(), 0);
}

#[test]
fn the_discretised_decoder_is_a_distribution_over_256_levels() {
    let dev = Device::Cpu;
    let levels: Vec<f64> = (0..256).map(|k| k as f64 / 127.5 - 1.0).collect();
    let x = Tensor::new(levels.as_slice(), &dev).unwrap();
    for (mu, ls) in [(0.0, -1.0), (0.9, -4.0), (-1.2, 0.5), (0.3, -6.0)] {
        let m = Tensor::full(mu, 256, &dev).unwrap();
        let l = Tensor::full(ls, 256, &dev).unwrap();
        let lp = vals(&discretized_gaussian_log_likelihood(&x, &m, &l).unwrap());
        let total: f64 = lp.iter().map(|v| v.exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-6,
            "mu {mu} log σ {ls}: Σp = {total}"
        );
    }
}

#[test]
fn normal_kl_matches_the_closed_form() {
    let dev = Device::Cpu;
    let t = |v: f64| Tensor::new(&[v], &dev).unwrap();
    let kl = vals(&normal_kl(&t(1.0), &t(0.0), &t(0.0), &t(4f64.ln())).unwrap())[0];
    // ½(ln 4 + 1/4 + 1/4 − 1)
    assert!((kl - 0.5 * (4f64.ln() - 0.5)).abs() < 1e-12, "{kl}");
    let z = vals(&normal_kl(&t(0.3), &t(-1.0), &t(0.3), &t(-1.0)).unwrap())[0];
    assert!(z.abs() < 1e-15);
}

/// On Gaussian data the probability-flow ODE is solved in closed form: in `x/√ᾱ` the marginal
/// is `N(0, var0 + σ²)` and the flow scales by `√(var0 + σ²)`, so `x_0 = x_start·√(var0 /
/// (var0 + σ_start²))`. Each deterministic sampler's error against it falls at the rate of its
/// order as the steps double: ≈2× for DDIM and Euler, ≈4× or more for DPM-Solver++(2M), UniPC
/// and Heun.
#[test]
fn deterministic_samplers_converge_at_their_order_on_gaussian_data() {
    let s = linear(1000);
    let var0 = 0.25;
    let sig = schedule_sigmas(&s);
    let xt = Tensor::new(&[1.5f64], &Device::Cpu).unwrap();
    let mut report = vec![];
    for (kind, lo, hi) in [
        (SamplerKind::Ddim, 1.6, 2.6),
        (SamplerKind::EulerKarras, 1.6, 2.6),
        (SamplerKind::Dpmpp2m, 3.3, 100.0),
        (SamplerKind::Unipc, 3.3, 100.0),
        (SamplerKind::HeunKarras, 3.3, 100.0),
    ] {
        let err = |steps: usize| {
            let cfg = SamplerConfig {
                kind,
                steps,
                clip_sample: false,
                ..Default::default()
            };
            let mut sm = cfg.build(&s, Prediction::Epsilon).unwrap();
            // Where the chain starts, as σ of x/√ᾱ, and that variable's starting value.
            let t0 = sm.timesteps()[0];
            let (sigma0, start) = match kind {
                SamplerKind::EulerKarras | SamplerKind::HeunKarras => {
                    let s0 = sm.init_noise_sigma();
                    let sigma = ((1.0 - alpha_bar_at(&s, t0)) / alpha_bar_at(&s, t0)).sqrt();
                    (sigma, 1.5 * s0)
                }
                _ => (sig[t0 as usize], 1.5 / alpha_bar_at(&s, t0).sqrt()),
            };
            let exact = start * (var0 / (var0 + sigma0 * sigma0)).sqrt();
            let x = sample_loop(sm.as_mut(), xt.clone(), &mut GmRng::new(0), |x, t| {
                gaussian_eps(&s, var0, x, t)
            })
            .unwrap();
            (vals(&x)[0] - exact).abs()
        };
        let (e1, e2, e3) = (err(10), err(20), err(40));
        let (r1, r2) = (e1 / e2, e2 / e3);
        report.push(format!(
            "{kind:?}: {e1:.2e} {e2:.2e} {e3:.2e} ratios {r1:.2} {r2:.2}"
        ));
        assert!(
            r2 > lo && r2 < hi,
            "{kind:?}: errors {e1:e} {e2:e} {e3:e}, ratio {r2} not in ({lo}, {hi})"
        );
    }
    eprintln!("{}", report.join("\n"));
}

/// Flow matching's path on Gaussian data `x₁ ~ N(0, var0)`: the exact velocity is linear in `x`
/// and the flow scales `x` by `√(Var_1 / Var_t)`, `Var_t = t²·var0 + (1 − c·t)²`. DPM-Solver++
/// and UniPC on the path (evenly spaced in `t`, first order into `t = 1`, as diffusers' flow
/// sigmas) converge to it, at second order once the steps are small (measured errors: DPM-Solver++
/// 1.4e-3 at 10 steps, 3.5e-3 at 40, 9.7e-5 at 320).
#[test]
fn flow_multistep_solvers_converge_on_gaussian_data() {
    let (var0, sigma_min) = (0.3, 1e-4);
    let c = 1.0 - sigma_min;
    let var = |t: f64| t * t * var0 + (1.0 - c * t).powi(2);
    let z = Tensor::new(&[1.5f64, -0.7], &Device::Cpu).unwrap();
    let exact = |x0: f64| x0 * (var(1.0) / var(1e-3)).sqrt();
    for kind in [SamplerKind::Dpmpp2m, SamplerKind::Unipc] {
        let err = |steps: usize| {
            let x = flow_multistep(
                kind,
                steps,
                sigma_min,
                z.clone(),
                &mut GmRng::new(0),
                |x, t| x * ((t * var0 - c * (1.0 - c * t)) / var(t)),
            )
            .unwrap();
            let v = vals(&x);
            (v[0] - exact(1.5)).abs().max((v[1] - exact(-0.7)).abs())
        };
        let e = [5, 10, 20, 40, 80, 160, 320].map(err);
        eprintln!("{kind:?} on the flow path, 5..320 steps: {e:?}");
        assert!(e[1] < 2e-2 && e[3] < 1e-2, "{kind:?}: {e:?}");
        assert!(e[5] / e[6] > 3.0, "{kind:?}: not second order: {e:?}");
    }
    let bad = flow_multistep(
        SamplerKind::Ddim,
        5,
        sigma_min,
        z,
        &mut GmRng::new(0),
        |x, _| Ok(x.clone()),
    );
    assert!(bad.is_err());
}

/// Samplers that keep outputs across steps (multistep history, Heun's first stage) keep them
/// without the network's graph: a sampled chain must not hold every step's activations (a
/// 20-step UniPC run of 500 digits once needed 24 GB for it).
#[test]
fn stateful_samplers_keep_no_graph() {
    let s = linear(100);
    let w = candle_core::Var::new(&[0.5f64, -0.3], &Device::Cpu).unwrap();
    for kind in [
        SamplerKind::Dpmpp2m,
        SamplerKind::Unipc,
        SamplerKind::HeunKarras,
    ] {
        let cfg = SamplerConfig {
            kind,
            steps: 4,
            ..Default::default()
        };
        let mut sm = cfg.build(&s, Prediction::Epsilon).unwrap();
        let mut x = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        for i in 0..sm.timesteps().len() {
            // An output that carries a graph back to a parameter, as a network's does.
            let out = (w.as_tensor() * &x).unwrap();
            assert!(out.track_op());
            x = sm.step(&out, i, &x, &mut GmRng::new(0)).unwrap();
            assert!(!x.track_op(), "{kind:?} step {i} keeps the graph");
        }
    }
}

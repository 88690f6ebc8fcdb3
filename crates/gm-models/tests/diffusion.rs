//! Diffusion and flow matching on the shared UNet: gradients reach every parameter, the
//! upsampling works around candle's gradient bug, guidance combines outputs as documented, the
//! DDPM bound's stratified estimate is unbiased, flow matching's path and likelihood agree with
//! the closed forms of a Gaussian-to-Gaussian flow.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gm_core::cnf::{log_likelihood, Divergence};
use gm_core::diffusion::ScheduleConfig;
use gm_core::ode::{solve, Method, SolverConfig};
use gm_core::samplers::{SamplerConfig, SamplerKind, Spacing};
use gm_core::GmRng;
use gm_models::ddpm::{Ddpm, DdpmConfig};
use gm_models::flow::{gaussian_ot_velocity, ot_path};
use gm_models::flow_matching::{FlowMatching, FlowMatchingConfig};
use gm_models::unet::{upsample_nearest2x, UNetConfig};
use gm_models::{Batch, EvalOptions, Model, ModelConfig};

fn tiny_unet() -> UNetConfig {
    UNetConfig {
        base_channels: 8,
        channel_mult: vec![1, 2],
        num_res_blocks: 1,
        attention_levels: vec![1],
        mid_attention: true,
        groups: 4,
        time_embed_dim: 0,
        ..Default::default()
    }
}

fn build(cfg: &ModelConfig, seed: u64) -> (VarMap, Box<dyn Model>) {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let m = cfg.build(vb).unwrap();
    (vm, m)
}

fn batch(n: usize, shape: [usize; 3], labels: bool, seed: u64) -> Batch {
    let mut rng = GmRng::new(seed);
    let x = rng
        .uniform((n, shape[0], shape[1], shape[2]), 0.0, 1.0, &Device::Cpu)
        .unwrap();
    // On the 256-level grid, as the data pipeline gives it.
    let x = ((x * 255.0).unwrap().round().unwrap() / 255.0).unwrap();
    let y = labels.then(|| {
        Tensor::from_vec(
            (0..n as u32).map(|i| i % 3).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )
        .unwrap()
    });
    Batch { x, labels: y }
}

/// One loss evaluation's gradient is non-zero for every parameter tensor (a parameter the loss
/// never reaches would never train).
#[test]
fn gradients_reach_every_parameter() {
    let shape = [1, 8, 8];
    let cfgs = [
        ModelConfig::new(DdpmConfig {
            image_shape: shape,
            unet: tiny_unet(),
            num_classes: 3,
            label_dropout: 0.5,
            ..Default::default()
        }),
        ModelConfig::new(FlowMatchingConfig {
            image_shape: shape,
            unet: UNetConfig {
                num_res_blocks: 2,
                ..tiny_unet()
            },
            ..Default::default()
        }),
    ];
    for cfg in cfgs {
        let (vm, m) = build(&cfg, 1);
        let b = batch(16, shape, cfg.needs_labels(), 2);
        let loss = m.loss(&b, &mut GmRng::new(3)).unwrap();
        let grads = loss.total.backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert!(data.len() > 20, "{} tensors", data.len());
        for (name, v) in data.iter() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", cfg.kind()));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{}: zero gradient for {name}", cfg.kind());
        }
    }
}

#[test]
fn nearest_upsampling_matches_candle_and_its_gradient_sums_each_block() {
    let mut rng = GmRng::new(4);
    let x = Var::from_tensor(&rng.randn((2, 3, 4, 5), &Device::Cpu).unwrap()).unwrap();
    let ours = upsample_nearest2x(&x).unwrap();
    let theirs = x.upsample_nearest2d(8, 10).unwrap();
    let d = (&ours - &theirs)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    // The input also feeds a second consumer: candle's own op would drop this gradient.
    let r = rng.randn((2, 3, 8, 10), &Device::Cpu).unwrap();
    let loss = ((ours * &r).unwrap().sum_all().unwrap() + x.sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    let gx = g.get(&x).unwrap();
    let want = (r.avg_pool2d(2).unwrap() * 4.0)
        .unwrap()
        .affine(1.0, 1.0)
        .unwrap();
    let d = (gx - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn guidance_interpolates_conditional_and_unconditional_outputs() {
    let shape = [1, 8, 8];
    let cfg = DdpmConfig {
        image_shape: shape,
        unet: tiny_unet(),
        num_classes: 3,
        ..Default::default()
    };
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 5, DType::F32, &Device::Cpu);
    let m = Ddpm::new(cfg, vb).unwrap();
    let x = GmRng::new(6).randn((3, 1, 8, 8), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    let null = Tensor::new(&[3u32, 3, 3], &Device::Cpu).unwrap();
    let t = [10usize, 500, 999];
    let cond = m.predict(&x, &t, Some(&y), 1.0).unwrap();
    let unc = m.predict(&x, &t, Some(&null), 1.0).unwrap();
    let g = m.predict(&x, &t, Some(&y), 3.0).unwrap();
    let want = (&unc + ((&cond - &unc).unwrap() * 3.0).unwrap()).unwrap();
    let d = (g - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    assert!(
        (cond - unc)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

/// The stratified estimate of `Σ_t L_{t-1}` averages to the exact sum.
#[test]
fn the_stratified_bound_is_unbiased() {
    let shape = [1, 4, 4];
    let mk = |k: usize| DdpmConfig {
        image_shape: shape,
        unet: UNetConfig {
            channel_mult: vec![1],
            attention_levels: vec![],
            ..tiny_unet()
        },
        schedule: ScheduleConfig {
            timesteps: 12,
            beta_start: 0.01,
            beta_end: 0.3,
            ..Default::default()
        },
        bound_timesteps: k,
        ..Default::default()
    };
    let one = batch(1, shape, false, 7).x;
    let xs = Tensor::cat(&vec![&one; 400], 0).unwrap();
    let x0 = xs.affine(2.0, -1.0).unwrap();
    let mut means = vec![];
    for k in [0usize, 3] {
        let vm = VarMap::new();
        let vb = gm_core::rng::seeded_var_builder(&vm, 8, DType::F32, &Device::Cpu);
        let m = Ddpm::new(mk(k), vb).unwrap();
        let v: Vec<f32> = m
            .vlb(&x0, None, &mut GmRng::new(9 + k as u64))
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
        let sd = (v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        means.push((mean, sd / n.sqrt()));
    }
    let ((m0, s0), (m1, s1)) = (means[0], means[1]);
    assert!(
        (m0 - m1).abs() < 4.0 * (s0 * s0 + s1 * s1).sqrt(),
        "exact {m0} ± {s0}, stratified {m1} ± {s1}"
    );
    assert!(s1 > s0, "fewer terms, more variance: {s0} vs {s1}");
}

/// For data `N(μ, s²)`, regressing gm's OT-path targets on `x_t` recovers the closed-form field.
#[test]
fn the_ot_path_regresses_onto_the_closed_form_field() {
    let (mu, s, sigma) = (1.5, 0.5, 1e-2);
    let n = 40_000;
    let mut rng = GmRng::new(10);
    let dev = Device::Cpu;
    for t in [0.1, 0.5, 0.9] {
        let x0 = rng.randn(n, &dev).unwrap().to_dtype(DType::F64).unwrap();
        let x1 = rng
            .randn(n, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .affine(s, mu)
            .unwrap();
        let tt = Tensor::full(t, n, &dev).unwrap();
        let (xt, u) = ot_path(&x0, &x1, &tt, sigma).unwrap();
        let xs: Vec<f64> = xt.to_vec1().unwrap();
        let us: Vec<f64> = u.to_vec1().unwrap();
        let (mx, mu_) = (
            xs.iter().sum::<f64>() / n as f64,
            us.iter().sum::<f64>() / n as f64,
        );
        let cov: f64 = xs
            .iter()
            .zip(&us)
            .map(|(a, b)| (a - mx) * (b - mu_))
            .sum::<f64>();
        let var: f64 = xs.iter().map(|a| (a - mx).powi(2)).sum::<f64>();
        let slope = cov / var;
        let intercept = mu_ - slope * mx;
        // Closed form at two points gives its slope and intercept.
        let at = |x: f64| {
            gaussian_ot_velocity(&Tensor::new(&[x], &dev).unwrap(), t, mu, s, sigma)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        let (c0, c1) = (at(0.0), at(1.0));
        assert!(
            (slope - (c1 - c0)).abs() < 0.03,
            "t {t}: slope {slope} vs {}",
            c1 - c0
        );
        assert!(
            (intercept - c0).abs() < 0.03,
            "t {t}: intercept {intercept} vs {c0}"
        );
    }
}

/// Integrating the closed-form field carries N(0, 1) onto N(μ, s² + σ²), and the change of
/// variables gives that Gaussian's exact log-density.
#[test]
fn the_closed_form_flow_transports_and_its_likelihood_is_exact() {
    let (mu, s, sigma) = (1.5f64, 0.5f64, 1e-2f64);
    let dev = Device::Cpu;
    let n = 20_000;
    let x0 = GmRng::new(11)
        .randn((n, 1), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let field = |t: f64, x: &Tensor| gaussian_ot_velocity(x, t, mu, s, sigma);
    let (x1, _) = solve(field, x0, 0.0, 1.0, &SolverConfig::rk4(50)).unwrap();
    let v: Vec<f64> = x1.flatten_all().unwrap().to_vec1().unwrap();
    let m = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n as f64;
    let var_want = s * s + sigma * sigma;
    assert!((m - mu).abs() < 0.02, "mean {m}");
    assert!(
        (var / var_want - 1.0).abs() < 0.05,
        "var {var} vs {var_want}"
    );

    let pts = Tensor::new(&[[0.9f64], [1.5], [2.3]], &dev).unwrap();
    let (logp, _) = log_likelihood(
        field,
        &pts,
        1.0,
        0.0,
        &SolverConfig::dopri5(1e-9, 1e-9),
        Divergence::Exact,
        &mut GmRng::new(12),
    )
    .unwrap();
    for (x, got) in [0.9f64, 1.5, 2.3]
        .iter()
        .zip(logp.to_vec1::<f64>().unwrap())
    {
        let want = -0.5 * (2.0 * std::f64::consts::PI * var_want).ln()
            - (x - mu).powi(2) / (2.0 * var_want);
        assert!((got - want).abs() < 1e-5, "x {x}: {got} vs {want}");
    }
}

/// The model's likelihood with Hutchinson probes averages to the exact-trace likelihood.
#[test]
fn flow_matching_likelihood_hutchinson_agrees_with_the_exact_trace() {
    let shape = [1, 2, 2];
    let mk = |div| {
        ModelConfig::new(FlowMatchingConfig {
            image_shape: shape,
            unet: UNetConfig {
                channel_mult: vec![1],
                attention_levels: vec![],
                mid_attention: false,
                ..tiny_unet()
            },
            likelihood_solver: SolverConfig::rk4(4),
            divergence: div,
            ..Default::default()
        })
    };
    let one = batch(1, shape, false, 13).x;
    let xs = Tensor::cat(&vec![&one; 300], 0).unwrap();
    let b = Batch {
        x: xs,
        labels: None,
    };
    let get = |div| -> Vec<f64> {
        let (_vm, m) = build(&mk(div), 14);
        let out = m
            .eval_metrics(&b, &mut GmRng::new(15), &EvalOptions::default())
            .unwrap();
        let t = &out.iter().find(|(k, _)| k == "nll_nats").unwrap().1;
        t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    };
    let exact = get(Divergence::Exact);
    assert!(
        exact.iter().all(|v| (v - exact[0]).abs() < 1e-3),
        "exact is deterministic"
    );
    let h = get(Divergence::Rademacher);
    let n = h.len() as f64;
    let mean = h.iter().sum::<f64>() / n;
    let se = (h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt();
    assert!(
        (mean - exact[0]).abs() < 4.0 * se + 1e-3,
        "Hutchinson {mean} ± {se} vs exact {}",
        exact[0]
    );
}

#[test]
fn samplers_return_images_in_range() {
    let shape = [1, 8, 8];
    let mut cfgs = vec![];
    for kind in SamplerKind::ALL {
        cfgs.push(ModelConfig::new(DdpmConfig {
            image_shape: shape,
            unet: tiny_unet(),
            num_classes: 3,
            sampler: SamplerConfig {
                kind,
                steps: 4,
                spacing: Spacing::Trailing,
                ..Default::default()
            },
            ..Default::default()
        }));
    }
    for method in [Method::Heun, Method::DpmPp2m, Method::Unipc] {
        cfgs.push(ModelConfig::new(FlowMatchingConfig {
            image_shape: shape,
            unet: tiny_unet(),
            solver: SolverConfig::fixed(method, 3),
            ..Default::default()
        }));
    }
    for cfg in cfgs {
        let (_vm, m) = build(&cfg, 16);
        let s = m.sample(5, &mut GmRng::new(17)).unwrap().unwrap();
        assert_eq!(s.dims(), &[5, 1, 8, 8]);
        let v: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|p| (0.0..=1.0).contains(p)));
        let by_label = m.sample_labels(&[0, 2], &mut GmRng::new(18)).unwrap();
        assert_eq!(by_label.is_some(), cfg.needs_labels());
        if cfg.needs_labels() {
            let e = m
                .sample_labels(&[3], &mut GmRng::new(18))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("label 3"), "{e}");
        }
    }
}

#[test]
fn impossible_shapes_are_refused_with_the_key() {
    let cfg = DdpmConfig {
        image_shape: [1, 28, 28],
        unet: UNetConfig {
            channel_mult: vec![1, 2, 2, 2],
            ..tiny_unet()
        },
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err();
    assert!(e.contains("image_shape"), "{e}");
    let cfg = DdpmConfig {
        unet: UNetConfig {
            groups: 5,
            ..tiny_unet()
        },
        ..Default::default()
    };
    assert!(cfg.validate().unwrap_err().contains("groups"));
    // A step list the schedule cannot hold is refused before training, naming the key.
    let cfg = DdpmConfig {
        unet: tiny_unet(),
        sampler: SamplerConfig {
            kind: SamplerKind::EulerKarras,
            spacing: Spacing::Leading,
            steps_offset: 50,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err();
    assert!(
        e.contains("model.sampler") && e.contains("steps_offset 50"),
        "{e}"
    );
    // The Gaussian-path samplers are not likelihood solvers.
    let cfg = FlowMatchingConfig {
        unet: tiny_unet(),
        likelihood_solver: SolverConfig::fixed(Method::DpmPp2m, 10),
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err();
    assert!(e.contains("model.likelihood_solver.method"), "{e}");
    // 32×32 colour images (CIFAR's shape) build and run through three levels.
    let cfg = FlowMatchingConfig {
        image_shape: [3, 32, 32],
        unet: UNetConfig {
            channel_mult: vec![1, 2, 2],
            ..tiny_unet()
        },
        ..Default::default()
    };
    cfg.validate().unwrap();
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 19, DType::F32, &Device::Cpu);
    let fm = FlowMatching::new(cfg, vb).unwrap();
    let x = GmRng::new(20).randn((2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(
        fm.velocity(&x, 0.3, None, 1.0).unwrap().dims(),
        &[2, 3, 32, 32]
    );
}

/// The ResBlock's `conv(x) + bias + temb[n, c]` in one pass equals the convolution followed by a
/// broadcast add, forward and in the gradients of the input, weight, bias and embedding.
#[test]
fn conv_plus_per_sample_shift_matches_a_broadcast_add() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 5, DType::F32, &dev);
    let p = gm_core::kernels::conv::Conv2dParams {
        padding: [1, 1],
        ..Default::default()
    };
    let conv = gm_models::nn::Conv2d::new(3, 4, [3, 3], p, true, vb.pp("c"))?;
    let mut rng = GmRng::new(2);
    let x = Var::from_tensor(&rng.randn((2, 3, 5, 6), &dev)?)?;
    let t = Var::from_tensor(&rng.randn((2, 4), &dev)?)?;
    let r = rng.randn((2, 4, 5, 6), &dev)?;
    let ours = conv.forward_add(&x, &t)?;
    let theirs = conv
        .forward_act(&x, gm_core::kernels::ops::Act::Identity)?
        .broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
    let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    assert!(diff(&ours, &theirs)? < 1e-5);
    let g1 = (ours * &r)?.sum_all()?.backward()?;
    let g2 = (theirs * &r)?.sum_all()?.backward()?;
    let bias = conv.bias().expect("bias").clone();
    for (name, v) in [
        ("x", x.as_tensor()),
        ("temb", t.as_tensor()),
        ("weight", conv.weight()),
        ("bias", &bias),
    ] {
        let d = diff(g1.get(v).expect(name), g2.get(v).expect(name))?;
        assert!(d < 1e-4, "d{name} differs by {d}");
    }
    Ok(())
}

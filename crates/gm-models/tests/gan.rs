//! GANs: the minimax objective at the optimal discriminator is 2·JSD − log 4; the WGAN-GP
//! penalty's parameter gradient (a gradient of a gradient) against finite differences; spectral
//! normalisation bounds the weight's largest singular value; shapes, phases and conditioning.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use gm_core::GmRng;
use gm_models::gan::{Gan, GanConfig, GanLoss};
use gm_models::{Batch, Model};

const DEV: Device = Device::Cpu;

#[test]
fn minimax_value_at_the_optimal_discriminator_is_two_jsd_minus_log_4() -> Result<()> {
    // Two distributions on 5 points; D*(x) = p(x) / (p(x) + q(x)), logit = log p − log q.
    let p = [0.1f64, 0.4, 0.2, 0.25, 0.05];
    let q = [0.3f64, 0.1, 0.2, 0.1, 0.3];
    let logits: Vec<f64> = p.iter().zip(&q).map(|(a, b)| (a / b).ln()).collect();
    let l = Tensor::new(logits.as_slice(), &DEV)?;
    for loss in [GanLoss::Minimax, GanLoss::NonSaturating] {
        let (on_real, on_fake) = loss.discriminator(&l, &l)?;
        let (r, f) = (on_real.to_vec1::<f64>()?, on_fake.to_vec1::<f64>()?);
        // V(D*, G) = E_p log D* + E_q log(1 − D*) = −(E_p loss_real + E_q loss_fake).
        let v: f64 = -(0..5).map(|i| p[i] * r[i] + q[i] * f[i]).sum::<f64>();
        let m: Vec<f64> = p.iter().zip(&q).map(|(a, b)| 0.5 * (a + b)).collect();
        let kl = |a: &[f64]| -> f64 { (0..5).map(|i| a[i] * (a[i] / m[i]).ln()).sum() };
        let jsd = 0.5 * kl(&p) + 0.5 * kl(&q);
        assert!(
            (v - (2.0 * jsd - 4f64.ln())).abs() < 1e-12,
            "{loss:?}: V = {v}, 2·JSD − log 4 = {}",
            2.0 * jsd - 4f64.ln()
        );
        // Any other discriminator does worse (V is maximised at D*).
        let worse = Tensor::new(&[0.3f64, -0.2, 0.5, 0.1, 0.0], &DEV)?;
        let (r2, f2) = loss.discriminator(&worse, &worse)?;
        let (r2, f2) = (r2.to_vec1::<f64>()?, f2.to_vec1::<f64>()?);
        let v2: f64 = -(0..5).map(|i| p[i] * r2[i] + q[i] * f2[i]).sum::<f64>();
        assert!(v2 < v);
    }
    // The generator losses: minimax's is log(1 − D), the non-saturating one −log D.
    let x = Tensor::new(&[-2.0f64, 0.0, 3.0], &DEV)?;
    let d = [-2.0f64, 0.0, 3.0].map(|v| 1.0 / (1.0 + (-v).exp()));
    let mm = GanLoss::Minimax.generator(&x)?.to_vec1::<f64>()?;
    let ns = GanLoss::NonSaturating.generator(&x)?.to_vec1::<f64>()?;
    for i in 0..3 {
        assert!((mm[i] - (1.0 - d[i]).ln()).abs() < 1e-12);
        assert!((ns[i] + d[i].ln()).abs() < 1e-12);
    }
    Ok(())
}

fn build(cfg: GanConfig, dtype: DType) -> Result<(Gan, VarMap)> {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 3, dtype, &DEV);
    Ok((Gan::new(cfg, vb)?, vm))
}

#[test]
fn gradient_penalty_gradient_matches_finite_differences() -> Result<()> {
    gm_models::gan::enable_second_order_gradients();
    for cfg in [
        GanConfig {
            image_shape: [2, 1, 1],
            latent_dim: 2,
            width: 6,
            depth: 2,
            loss: GanLoss::WganGp,
            ..Default::default()
        },
        GanConfig {
            image_shape: [1, 8, 8],
            latent_dim: 3,
            width: 2,
            loss: GanLoss::WganGp,
            ..Default::default()
        },
    ] {
        let (gan, vm) = build(cfg.clone(), DType::F64)?;
        let [c, h, w] = cfg.image_shape;
        let mut rng = GmRng::new(1);
        let real = rng.randn((3, c, h, w), &DEV)?.to_dtype(DType::F64)?;
        let fake = rng.randn((3, c, h, w), &DEV)?.to_dtype(DType::F64)?;
        let penalty = |gan: &Gan| -> Result<Tensor> {
            gan.gradient_penalty(&real, &fake, None, &mut GmRng::new(7))?
                .mean(0)
        };
        let grads = penalty(&gan)?.backward()?;
        let vars = gm_train_free_named_vars(&vm);
        let mut checked = 0;
        for (name, v) in vars.iter().filter(|(n, _)| n.starts_with("discriminator.")) {
            let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            // The output bias does not move ∇ₓD: no gradient is the right answer there.
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
                None => vec![0.0; base.len()],
            };
            for k in [0, base.len() / 2, base.len() - 1] {
                let h = 1e-6;
                let mut p = base.clone();
                p[k] += h;
                v.set(&Tensor::from_vec(p.clone(), v.shape(), &DEV)?)?;
                let lp = penalty(&gan)?.to_scalar::<f64>()?;
                p[k] -= 2.0 * h;
                v.set(&Tensor::from_vec(p, v.shape(), &DEV)?)?;
                let lm = penalty(&gan)?.to_scalar::<f64>()?;
                v.set(&Tensor::from_vec(base.clone(), v.shape(), &DEV)?)?;
                let fd = (lp - lm) / (2.0 * h);
                assert!(
                    (g[k] - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{:?} {name}[{k}]: backprop {} vs finite difference {fd}",
                    cfg.image_shape,
                    g[k]
                );
                checked += 1;
            }
        }
        assert!(checked >= 9);
    }
    Ok(())
}

fn gm_train_free_named_vars(vm: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn phases_split_the_parameters_and_samples_have_the_data_shape() -> Result<()> {
    let cfg = GanConfig {
        latent_dim: 8,
        width: 8,
        num_classes: 10,
        spectral_norm: true,
        d_steps: 2,
        lr_d_scale: 2.0,
        ..Default::default()
    };
    let (gan, vm) = build(cfg, DType::F32)?;
    let phases = gan.phases();
    assert_eq!(phases.len(), 2);
    assert_eq!(
        (phases[0].name, phases[0].repeats, phases[0].lr_scale),
        ("d", 2, 2.0)
    );
    let names: Vec<String> = gm_train_free_named_vars(&vm)
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("discriminator.") || n.starts_with("generator.")));
    let mut rng = GmRng::new(0);
    let x = rng.uniform((4, 1, 28, 28), 0.0, 1.0, &DEV)?;
    let labels = Tensor::new(&[0u32, 3, 7, 9], &DEV)?;
    let batch = Batch {
        x,
        labels: Some(labels),
    };
    // The discriminator phase gives gradients to the discriminator only, and vice versa.
    for (phase, own) in [(0, "discriminator."), (1, "generator.")] {
        let loss = gan.phase_loss(phase, &batch, &mut rng)?;
        let grads = loss.total.backward()?;
        for (n, v) in gm_train_free_named_vars(&vm) {
            if n.starts_with(own) && !n.contains("running_") {
                assert!(
                    grads.get(v.as_tensor()).is_some(),
                    "phase {phase}: {n} has no gradient"
                );
            }
            if !n.starts_with(own) && phase == 0 {
                assert!(
                    grads.get(v.as_tensor()).is_none(),
                    "{n} leaks into the d phase"
                );
            }
        }
    }
    let s = gan.sample_labels(&[1, 2, 3], &mut rng)?.unwrap();
    assert_eq!(s.dims(), &[3, 1, 28, 28]);
    let (lo, hi) = (
        s.flatten_all()?.min(0)?.to_scalar::<f32>()?,
        s.flatten_all()?.max(0)?.to_scalar::<f32>()?,
    );
    assert!(lo >= 0.0 && hi <= 1.0);
    Ok(())
}

#[test]
fn spectral_norm_bounds_the_discriminator_lipschitz_constant() -> Result<()> {
    // With spectral normalisation every layer has σ_max ≈ 1 after a few power iterations, so a
    // 2-D critic of LeakyReLU layers has ‖∇D‖ ≤ 1 (up to the iteration's accuracy).
    let cfg = GanConfig {
        image_shape: [2, 1, 1],
        latent_dim: 2,
        width: 16,
        depth: 2,
        spectral_norm: true,
        ..Default::default()
    };
    let (gan, vm) = build(cfg, DType::F64)?;
    // Blow the weights up: without the normalisation the critic would be steep.
    for (_, v) in gm_train_free_named_vars(&vm) {
        v.set(&(v.as_tensor() * 10.0)?)?;
    }
    let x = GmRng::new(3)
        .randn((64, 2, 1, 1), &DEV)?
        .to_dtype(DType::F64)?;
    for _ in 0..30 {
        gan.discriminate(&x, None, true)?;
    }
    let xv = candle_core::Var::from_tensor(&x)?;
    let out = gan.discriminate(xv.as_tensor(), None, false)?;
    let g = out
        .sum_all()?
        .backward()?
        .get(xv.as_tensor())
        .unwrap()
        .clone();
    let norms = g.reshape((64, 2))?.sqr()?.sum(1)?.sqrt()?;
    let max = norms.max(0)?.to_scalar::<f64>()?;
    assert!(max <= 1.0 + 1e-3, "max ‖∇D‖ = {max}");
    assert!(max > 0.05, "the critic should not be flat: {max}");
    Ok(())
}

/// gm's BatchNorm layer against candle-nn's over a few training steps (outputs and the running
/// statistics it moves, read back from the VarMap a checkpoint saves), then in evaluation.
#[test]
fn batch_norm_layer_matches_candle_nn_and_moves_the_saved_running_statistics() -> Result<()> {
    let (c, shape) = (3, (6, 3, 4, 5));
    let mut rng = GmRng::new(11);
    let (vm, vm_ref) = (VarMap::new(), VarMap::new());
    let ours = gm_models::nn::BatchNorm::new(
        c,
        candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &DEV).pp("bn"),
    )?;
    let theirs = candle_nn::batch_norm(
        c,
        1e-5,
        candle_nn::VarBuilder::from_varmap(&vm_ref, DType::F32, &DEV).pp("bn"),
    )?;
    // The same non-trivial affine parameters in both.
    for name in ["bn.weight", "bn.bias"] {
        let v = rng.randn(c, &DEV)?;
        vm.data().lock().unwrap()[name].set(&v)?;
        vm_ref.data().lock().unwrap()[name].set(&v)?;
    }
    let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    for step in 0..3 {
        let x = rng.randn(shape, &DEV)?.affine(2.0, 0.7 * step as f64)?;
        let want = candle_nn::ModuleT::forward_t(&theirs, &x, true)?;
        let got = ours.forward(&x, true, step == 1)?;
        let want = if step == 1 { want.relu()? } else { want };
        assert!(max_diff(&got, &want)? < 1e-5, "step {step}: outputs differ");
        let saved = vm.data().lock().unwrap()["bn.running_var"]
            .as_tensor()
            .clone();
        assert!(
            max_diff(&saved, theirs.running_var())? < 1e-5,
            "step {step}: running var"
        );
        let saved = vm.data().lock().unwrap()["bn.running_mean"]
            .as_tensor()
            .clone();
        assert!(
            max_diff(&saved, theirs.running_mean())? < 1e-5,
            "step {step}: running mean"
        );
    }
    let x = rng.randn(shape, &DEV)?;
    let want = candle_nn::ModuleT::forward_t(&theirs, &x, false)?;
    assert!(max_diff(&ours.forward(&x, false, false)?, &want)? < 1e-5);
    assert!(max_diff(&ours.forward(&x, false, true)?, &want.relu()?)? < 1e-5);
    // Errors name the layer's size and the shape.
    let e = ours
        .forward(&rng.randn((1, 3), &DEV)?, true, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("more than one value per channel") && e.contains("[1, 3]"),
        "{e}"
    );
    let e = ours
        .forward(&rng.randn((2, 4), &DEV)?, false, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 channels") && e.contains("[2, 4]"), "{e}");
    Ok(())
}

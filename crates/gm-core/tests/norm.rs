//! gm's fused GroupNorm (+ SiLU) and training-mode BatchNorm (+ ReLU) against candle's composed
//! ops (candle-nn's `GroupNorm` and `BatchNorm`) and f64 finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::norm::{batch_norm, group_norm};
use gm_core::GmRng;

fn composed(x: &Tensor, g: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Result<Tensor> {
    let gn = candle_nn::GroupNorm::new(g.clone(), b.clone(), x.dim(1)?, groups, 1e-5)?;
    let y = candle_core::Module::forward(&gn, x)?;
    Ok(if silu { y.silu()? } else { y })
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

#[test]
fn forward_and_backward_match_candle() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(1);
    for (shape, groups) in [
        (vec![3, 8, 5, 7], 4),
        (vec![2, 6, 9], 3),
        (vec![1, 4, 3, 3], 1),
        (vec![2, 4, 2, 2], 4),
    ] {
        let c = shape[1];
        let x = Var::from_tensor(&rng.randn(shape.as_slice(), &dev)?.affine(3.0, 1.0)?)?;
        let g = Var::from_tensor(&rng.randn(c, &dev)?)?;
        let b = Var::from_tensor(&rng.randn(c, &dev)?)?;
        let r = rng.randn(shape.as_slice(), &dev)?;
        for silu in [false, true] {
            let ours = group_norm(&x, &g, &b, groups, 1e-5, silu)?;
            let theirs = composed(&x, &g, &b, groups, silu)?;
            let d = max_abs(&(&ours - &theirs)?)?;
            assert!(d < 1e-5, "{shape:?} silu {silu}: forward differs by {d}");
            let g1 = (ours * &r)?.sum_all()?.backward()?;
            let g2 = (theirs * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                let d = max_abs(&(g1.get(v).unwrap() - g2.get(v).unwrap())?)?;
                assert!(d < 2e-4, "{shape:?} silu {silu}: d{name} differs by {d}");
            }
        }
    }
    Ok(())
}

/// Every element of the gradients of `f(x, γ, β)` (a norm of `x` contracted with a fixed random
/// tensor) against central differences in f64, to 1e-6 relative.
fn check_finite_differences(
    label: &str,
    args: [&Tensor; 3],
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let vars = args.map(|a| Var::from_tensor(a).unwrap());
    let grads = f(&vars[0], &vars[1], &vars[2])?.sum_all()?.backward()?;
    let value = |a: &[Tensor; 3]| -> Result<f64> {
        Ok(f(&a[0], &a[1], &a[2])?.sum_all()?.to_scalar::<f64>()?)
    };
    let h = 1e-6;
    for which in 0..3 {
        let analytic: Vec<f64> = grads
            .get(vars[which].as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        let base = args[which];
        let flat: Vec<f64> = base.flatten_all()?.to_vec1()?;
        for i in 0..flat.len() {
            let bumped = |s: f64| -> Result<[Tensor; 3]> {
                let mut v = flat.clone();
                v[i] += s;
                let mut a = args.map(|t| t.clone());
                a[which] = Tensor::from_vec(v, base.shape(), base.device())?;
                Ok(a)
            };
            let fd = (value(&bumped(h)?)? - value(&bumped(-h)?)?) / (2.0 * h);
            assert!(
                (fd - analytic[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{label} arg {which} [{i}]: fd {fd} vs {}",
                analytic[i]
            );
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences_in_f64() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(2);
    let shape = (2, 4, 2, 3);
    let x0 = rng.randn(shape, &dev)?.to_dtype(DType::F64)?;
    let g0 = rng.randn(4, &dev)?.to_dtype(DType::F64)?;
    let b0 = rng.randn(4, &dev)?.to_dtype(DType::F64)?;
    let r = rng.randn(shape, &dev)?.to_dtype(DType::F64)?;
    for silu in [false, true] {
        check_finite_differences(&format!("silu {silu}"), [&x0, &g0, &b0], |x, g, b| {
            Ok((group_norm(x, g, b, 2, 1e-5, silu)? * &r)?)
        })?;
    }
    Ok(())
}

#[test]
fn bad_shapes_are_refused() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 6, 3, 3), DType::F32, &dev).unwrap();
    let g = Tensor::ones(6, DType::F32, &dev).unwrap();
    let e = group_norm(&x, &g, &g, 4, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("groups"), "{e}");
    let e = group_norm(&x, &g.narrow(0, 0, 5).unwrap(), &g, 3, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("channels"), "{e}");
}

/// candle-nn's `BatchNorm` in training mode with the given affine parameters, then ReLU; and the
/// running statistics it leaves after one step from (0, 1) with momentum 1 — the batch's mean and
/// unbiased variance.
fn candle_batch_norm(
    x: &Tensor,
    g: &Tensor,
    b: &Tensor,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let dev = x.device();
    let bn = candle_nn::BatchNorm::new_with_momentum(
        c,
        Tensor::zeros(c, x.dtype(), dev)?,
        Tensor::ones(c, x.dtype(), dev)?,
        g.clone(),
        b.clone(),
        1e-5,
        1.0,
    )?;
    let y = candle_nn::ModuleT::forward_t(&bn, x, true)?;
    let y = if relu { y.relu()? } else { y };
    Ok((y, bn.running_mean().clone(), bn.running_var().clone()))
}

#[test]
fn batch_norm_matches_candle_forward_backward_and_statistics() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(3);
    // (N, C, H, W) with rows longer and shorter than a vector; (N, C); (N, C, L); and 70 000
    // elements per channel pair, more than one parallel task.
    for shape in [
        vec![8, 6, 5, 7],
        vec![3, 4, 1, 2],
        vec![16, 5],
        vec![3, 4, 9],
        vec![50, 2, 35, 20],
    ] {
        let c = shape[1];
        let m = (shape.iter().product::<usize>() / c) as f64;
        let x = Var::from_tensor(&rng.randn(shape.as_slice(), &dev)?.affine(3.0, 1.5)?)?;
        let g = Var::from_tensor(&rng.randn(c, &dev)?)?;
        let b = Var::from_tensor(&rng.randn(c, &dev)?)?;
        let r = rng.randn(shape.as_slice(), &dev)?;
        for relu in [false, true] {
            let (ours, mean, var) = batch_norm(&x, &g, &b, 1e-5, relu)?;
            assert!(ours.is_contiguous(), "{shape:?}: output is not contiguous");
            let (theirs, rmean, rvar) = candle_batch_norm(&x, &g, &b, relu)?;
            let d = max_abs(&(&ours - &theirs)?)?;
            assert!(d < 2e-5, "{shape:?} relu {relu}: forward differs by {d}");
            let d = max_abs(&(&mean - &rmean)?)?;
            assert!(d < 1e-5, "{shape:?}: batch mean differs by {d}");
            // candle's running variance is the unbiased one.
            let d = max_abs(&((&var * (m / (m - 1.0)))? - &rvar)?)?;
            assert!(d < 1e-4, "{shape:?}: batch variance differs by {d}");
            let g1 = (ours * &r)?.sum_all()?.backward()?;
            let g2 = (theirs * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                let d = max_abs(&(a - e)?)? / max_abs(e)?.max(1.0);
                assert!(d < 1e-4, "{shape:?} relu {relu}: d{name} differs by {d}");
            }
        }
    }
    Ok(())
}

#[test]
fn batch_norm_gradients_match_finite_differences_in_f64() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(4);
    let shape = (3, 4, 2, 3);
    let x0 = rng
        .randn(shape, &dev)?
        .to_dtype(DType::F64)?
        .affine(2.0, 0.5)?;
    let g0 = rng.randn(4, &dev)?.to_dtype(DType::F64)?;
    let b0 = rng.randn(4, &dev)?.to_dtype(DType::F64)?;
    let r = rng.randn(shape, &dev)?.to_dtype(DType::F64)?;
    for relu in [false, true] {
        check_finite_differences(&format!("relu {relu}"), [&x0, &g0, &b0], |x, g, b| {
            Ok((batch_norm(x, g, b, 1e-5, relu)?.0 * &r)?)
        })?;
    }
    Ok(())
}

#[test]
fn batch_norm_refuses_bad_shapes_by_name() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 6, 3, 3), DType::F32, &dev).unwrap();
    let g = Tensor::ones(6, DType::F32, &dev).unwrap();
    let e = batch_norm(&x, &g.narrow(0, 0, 5).unwrap(), &g, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_norm") && e.contains("6 channels"), "{e}");
    let e = batch_norm(&g, &g, &g, 1e-5, false).unwrap_err().to_string();
    assert!(
        e.contains("batch_norm") && e.contains("channel axis"),
        "{e}"
    );
}

//! gm's fused GroupNorm (+ SiLU) against candle's composed ops and f64 finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::norm::group_norm;
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
        let f = |x: &Tensor, g: &Tensor, b: &Tensor| -> Result<f64> {
            Ok((group_norm(x, g, b, 2, 1e-5, silu)? * &r)?
                .sum_all()?
                .to_scalar::<f64>()?)
        };
        let (x, g, b) = (
            Var::from_tensor(&x0)?,
            Var::from_tensor(&g0)?,
            Var::from_tensor(&b0)?,
        );
        let grads = (group_norm(&x, &g, &b, 2, 1e-5, silu)? * &r)?
            .sum_all()?
            .backward()?;
        let h = 1e-6;
        for (which, base) in [(0, &x0), (1, &g0), (2, &b0)] {
            let analytic: Vec<f64> = grads
                .get([x.as_tensor(), g.as_tensor(), b.as_tensor()][which])
                .unwrap()
                .flatten_all()?
                .to_vec1()?;
            let flat: Vec<f64> = base.flatten_all()?.to_vec1()?;
            for i in 0..flat.len() {
                let bump = |s: f64| -> Result<Tensor> {
                    let mut v = flat.clone();
                    v[i] += s;
                    Ok(Tensor::from_vec(v, base.shape(), &dev)?)
                };
                let args = |t: Tensor| match which {
                    0 => (t, g0.clone(), b0.clone()),
                    1 => (x0.clone(), t, b0.clone()),
                    _ => (x0.clone(), g0.clone(), t),
                };
                let (a1, a2, a3) = args(bump(h)?);
                let (m1, m2, m3) = args(bump(-h)?);
                let fd = (f(&a1, &a2, &a3)? - f(&m1, &m2, &m3)?) / (2.0 * h);
                assert!(
                    (fd - analytic[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "silu {silu} arg {which} [{i}]: fd {fd} vs {}",
                    analytic[i]
                );
            }
        }
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

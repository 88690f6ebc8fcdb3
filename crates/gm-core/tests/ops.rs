//! gm's fused bias + activation against candle's unfused ops and f64 finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::ops::{bias_act, channel_sum, Act};
use gm_core::GmRng;

const ACTS: [Act; 3] = [Act::Identity, Act::Relu, Act::LeakyRelu(0.2)];

fn unfused(x: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1] = b.dim(0)?;
    let z = x.broadcast_add(&b.reshape(shape)?)?;
    Ok(match act {
        Act::Identity => z,
        Act::Relu => z.relu()?,
        Act::LeakyRelu(a) => (z.maximum(0.0)? + (z.minimum(0.0)? * a)?)?,
    })
}

#[test]
fn forward_and_backward_match_candle() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(1);
    // (N, C) rows spread over several parallel tasks too: 5,000 × 9.
    for shape in [
        vec![3, 5, 4, 7],
        vec![6, 9],
        vec![5000, 9],
        vec![2, 3, 40, 50],
    ] {
        let c = shape[1];
        let x = Var::from_tensor(&rng.randn(shape.as_slice(), &dev)?)?;
        let b = Var::from_tensor(&rng.randn(c, &dev)?)?;
        let r = rng.randn(shape.as_slice(), &dev)?;
        for act in ACTS {
            let ours = bias_act(&x, &b, act)?;
            let theirs = unfused(&x, &b, act)?;
            let d = (&ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "{act:?} {shape:?}: forward differs by {d}");
            let g1 = (ours * &r)?.sum_all()?.backward()?;
            let g2 = (theirs * &r)?.sum_all()?.backward()?;
            for v in [&x, &b] {
                let d = (g1.get(v).unwrap() - g2.get(v).unwrap())?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-3, "{act:?} {shape:?}: gradient differs by {d}");
            }
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences_in_f64() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(2);
    let x0 = rng.randn((2, 3, 2, 3), &dev)?.to_dtype(DType::F64)?;
    let b0 = rng.randn(3, &dev)?.to_dtype(DType::F64)?;
    let r = rng.randn((2, 3, 2, 3), &dev)?.to_dtype(DType::F64)?;
    for act in ACTS {
        let f = |x: &Tensor, b: &Tensor| -> Result<f64> {
            Ok((bias_act(x, b, act)? * &r)?.sum_all()?.to_scalar::<f64>()?)
        };
        let (x, b) = (Var::from_tensor(&x0)?, Var::from_tensor(&b0)?);
        let grads = (bias_act(&x, &b, act)? * &r)?.sum_all()?.backward()?;
        for (which, base) in [(0, &x0), (1, &b0)] {
            let g = grads
                .get(if which == 0 {
                    x.as_tensor()
                } else {
                    b.as_tensor()
                })
                .unwrap()
                .flatten_all()?
                .to_vec1::<f64>()?;
            let flat = base.flatten_all()?.to_vec1::<f64>()?;
            for j in 0..flat.len() {
                let at = |d: f64| -> Result<f64> {
                    let mut p = flat.clone();
                    p[j] += d;
                    let p = Tensor::from_vec(p, base.shape(), &dev)?;
                    if which == 0 {
                        f(&p, &b0)
                    } else {
                        f(&x0, &p)
                    }
                };
                let fd = (at(1e-6)? - at(-1e-6)?) / 2e-6;
                assert!(
                    (fd - g[j]).abs() < 1e-6,
                    "{act:?} arg {which}[{j}]: fd {fd} vs {}",
                    g[j]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn channel_sum_matches_a_plain_sum() -> Result<()> {
    let dev = Device::Cpu;
    let x = GmRng::new(4).randn((4, 3, 5, 6), &dev)?;
    let ours = channel_sum(&x)?.to_vec1::<f32>()?;
    let theirs = x
        .sum_keepdim(0)?
        .sum_keepdim(2)?
        .sum_keepdim(3)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert!(
        bias_act(&x, &Tensor::zeros(4, DType::F32, &dev)?, Act::Relu)
            .unwrap_err()
            .to_string()
            .contains("bias of shape [4] for 3 channels")
    );
    Ok(())
}

/// `gated_tanh` = `tanh(a)·σ(b)`: forward against candle's ops, gradient against central
/// differences in f64 (every element of x), and a (C = 1, inner = 1) case.
#[test]
fn gated_tanh_matches_candle_and_finite_differences() -> Result<()> {
    use gm_core::kernels::ops::gated_tanh;
    let dev = Device::Cpu;
    let mut rng = GmRng::new(5);
    for shape in [
        vec![2, 6, 3, 5],
        vec![3, 2],
        vec![1, 10, 40, 41],
        vec![700, 64],
    ] {
        let x = rng.randn(shape.as_slice(), &dev)?;
        let c = shape[1] / 2;
        let want = (x.narrow(1, 0, c)?.tanh()? * candle_nn::ops::sigmoid(&x.narrow(1, c, c)?)?)?;
        let d = (gated_tanh(&x)? - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{shape:?}: forward differs by {d}");
    }
    // Rows `(N, 2C)` (one pass over each image's contiguous halves) give the bits of the same
    // values laid out as `(1, 2C, N)`.
    let x = rng.randn((700, 64), &dev)?;
    let rows = gated_tanh(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let planes = gated_tanh(&x.t()?.contiguous()?.unsqueeze(0)?)?
        .squeeze(0)?
        .t()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(rows, planes);
    let x0 = rng.randn((2, 4, 2, 3), &dev)?.to_dtype(DType::F64)?;
    let r = rng.randn((2, 2, 2, 3), &dev)?.to_dtype(DType::F64)?;
    let f = |x: &Tensor| -> Result<f64> { Ok((gated_tanh(x)? * &r)?.sum_all()?.to_scalar()?) };
    let x = Var::from_tensor(&x0)?;
    let g = (gated_tanh(&x)? * &r)?.sum_all()?.backward()?;
    let g = g.get(&x).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let base = x0.flatten_all()?.to_vec1::<f64>()?;
    let h = 1e-6;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        let fd = (f(&Tensor::from_vec(p, x0.shape(), &dev)?)?
            - f(&Tensor::from_vec(m, x0.shape(), &dev)?)?)
            / (2.0 * h);
        assert!((fd - g[i]).abs() < 1e-7, "element {i}: fd {fd} vs {}", g[i]);
    }
    assert!(gated_tanh(&rng.randn((2, 3), &dev)?).is_err());
    Ok(())
}

#[test]
fn channel_broadcast_matches_candle_forward_and_backward() -> Result<()> {
    use gm_core::kernels::ops::channel_broadcast;
    let dev = Device::Cpu;
    let mut rng = gm_core::GmRng::new(3);
    for shape in [vec![3usize, 5, 4, 2], vec![2, 7], vec![1, 3, 5]] {
        let c = shape[1];
        let v = candle_core::Var::from_tensor(&rng.randn(c, &dev)?.to_dtype(DType::F64)?)?;
        let x = rng.randn(shape.as_slice(), &dev)?.to_dtype(DType::F64)?;
        let mut pc = vec![1; shape.len()];
        pc[1] = c;
        let ours = channel_broadcast(&v, shape.as_slice())?;
        let theirs = v.reshape(pc.as_slice())?.broadcast_as(shape.as_slice())?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f64>()?,
            theirs.flatten_all()?.to_vec1::<f64>()?
        );
        let g1 = (ours * &x)?.sqr()?.sum_all()?.backward()?;
        let g2 = (theirs * &x)?.sqr()?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(&v).unwrap().to_vec1::<f64>()?,
            g2.get(&v).unwrap().to_vec1::<f64>()?,
        );
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-9 * (1.0 + q.abs()), "{a:?} vs {b:?}");
        }
    }
    assert!(channel_broadcast(&Tensor::zeros(3, DType::F32, &dev)?, (2, 4, 1)).is_err());
    Ok(())
}

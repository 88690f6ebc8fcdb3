//! gm's fused bias + activation (and the activation alone) against candle's unfused ops and f64
//! finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::ops::{self, bias_act, channel_sum, Act};
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
            // The activation alone.
            let ours = ops::act(&x, act)?;
            let theirs = unfused(&x, &Tensor::zeros(c, DType::F32, &dev)?, act)?;
            let d = (&ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d == 0.0, "{act:?} {shape:?}: act's forward differs by {d}");
            let g1 = (ours * &r)?.sum_all()?.backward()?;
            let g2 = (theirs * &r)?.sum_all()?.backward()?;
            let d = (g1.get(&x).unwrap() - g2.get(&x).unwrap())?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d == 0.0, "{act:?} {shape:?}: act's gradient differs by {d}");
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

/// gm's matmul (gemm on row blocks over candle's pool) agrees with the f64 product, forward and
/// both gradients, for contiguous and transposed operands, small (one call) and large (row
/// blocks) products, f32 and f64; its rows do not depend on the rows around them (so neither on
/// the thread count: every 64-row tile alone gives the same bits as inside the whole); and its
/// gradient matches central differences in f64. `matmul_nt` (`a · bᵀ` from `b` stored `(n, k)`)
/// gives the same bits and `b`'s gradient contiguous in `b`'s layout.
#[test]
fn matmul_matches_f64_and_its_rows_stand_alone() -> Result<()> {
    use gm_core::kernels::matmul::{matmul, matmul_nt};
    let dev = Device::Cpu;
    let mut rng = GmRng::new(11);
    let f64v = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    // Largest |x − y| relative to the largest |y|.
    let rel = |x: &Tensor, y: &Tensor| -> Result<f64> {
        let (x, y) = (f64v(x)?, f64v(y)?);
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        Ok(x.iter()
            .zip(&y)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
            / scale)
    };
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-13 };
        for (m, k, n) in [
            (1, 5, 3),
            (7, 13, 9),
            (130, 784, 512),
            (512, 128, 784),
            (33, 300, 2000),
            (250, 64, 1000),
        ] {
            for (ta, tb) in [(false, false), (false, true), (true, false)] {
                let a0 = rng
                    .randn(if ta { (k, m) } else { (m, k) }, &dev)?
                    .to_dtype(dtype)?;
                let b0 = rng
                    .randn(if tb { (n, k) } else { (k, n) }, &dev)?
                    .to_dtype(dtype)?;
                let (av, bv) = (Var::from_tensor(&a0)?, Var::from_tensor(&b0)?);
                let a = if ta { av.t()? } else { av.as_tensor().clone() };
                let b = if tb { bv.t()? } else { bv.as_tensor().clone() };
                let what = format!("{dtype:?} ({m}, {k}) · ({k}, {n}), transposed {ta} {tb}");
                let r = rng.randn((m, n), &dev)?.to_dtype(dtype)?;
                let ours = matmul(&a, &b)?;
                let (a64, b64, r64) = (
                    a.to_dtype(DType::F64)?,
                    b.to_dtype(DType::F64)?,
                    r.to_dtype(DType::F64)?,
                );
                let d = rel(&ours, &a64.matmul(&b64)?)?;
                assert!(d < tol, "{what}: forward off by {d:e}");
                // Each 64-row tile alone (one gemm call) has the bits it has in the whole.
                for r0 in (0..m).step_by(64) {
                    let rows = 64.min(m - r0);
                    let alone = matmul(&a.narrow(0, r0, rows)?, &b)?;
                    assert_eq!(
                        f64v(&alone)?,
                        f64v(&ours.narrow(0, r0, rows)?)?,
                        "{what}: rows {r0}.."
                    );
                }
                let g = (ours * &r)?.sum_all()?.backward()?;
                let want_a = r64.matmul(&b64.t()?)?;
                let want_b = a64.t()?.matmul(&r64)?;
                let got_a = g.get(&av).unwrap();
                let got_a = if ta { got_a.t()? } else { got_a.clone() };
                let got_b = g.get(&bv).unwrap();
                let got_b = if tb { got_b.t()? } else { got_b.clone() };
                let (da, db) = (rel(&got_a, &want_a)?, rel(&got_b, &want_b)?);
                assert!(
                    da < tol && db < tol,
                    "{what}: gradients off by {da:e}, {db:e}"
                );
                if tb {
                    // a · bᵀ from b stored (n, k): the same bits forward, and b's gradient in
                    // b's layout, contiguous.
                    let (av, bv) = (Var::from_tensor(&a0)?, Var::from_tensor(&b0)?);
                    let a = if ta { av.t()? } else { av.as_tensor().clone() };
                    let nt = matmul_nt(&a, &bv)?;
                    assert_eq!(
                        f64v(&nt)?,
                        f64v(&matmul(&a, &bv.t()?)?)?,
                        "{what}: matmul_nt"
                    );
                    let g = (nt * &r)?.sum_all()?.backward()?;
                    let got_a = g.get(&av).unwrap();
                    let got_a = if ta { got_a.t()? } else { got_a.clone() };
                    let got_b = g.get(&bv).unwrap();
                    assert!(got_b.is_contiguous(), "{what}: matmul_nt's db is strided");
                    let (da, db) = (rel(&got_a, &want_a)?, rel(&got_b.t()?, &want_b)?);
                    assert!(
                        da < tol && db < tol,
                        "{what}: matmul_nt's gradients off by {da:e}, {db:e}"
                    );
                }
            }
        }
    }
    // Gradient against central differences in f64.
    let a0 = rng.randn((4, 6), &dev)?.to_dtype(DType::F64)?;
    let b = rng.randn((6, 5), &dev)?.to_dtype(DType::F64)?;
    let f = |a: &Tensor| -> Result<f64> { Ok(matmul(a, &b)?.sqr()?.sum_all()?.to_scalar()?) };
    let av = Var::from_tensor(&a0)?;
    let g = matmul(&av, &b)?.sqr()?.sum_all()?.backward()?;
    let g = g.get(&av).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let base = a0.flatten_all()?.to_vec1::<f64>()?;
    for i in 0..base.len() {
        let (mut p, mut q) = (base.clone(), base.clone());
        p[i] += 1e-6;
        q[i] -= 1e-6;
        let fd = (f(&Tensor::from_vec(p, (4, 6), &dev)?)?
            - f(&Tensor::from_vec(q, (4, 6), &dev)?)?)
            / 2e-6;
        assert!(
            (fd - g[i]).abs() < 1e-6 * fd.abs().max(1.0),
            "element {i}: fd {fd} vs {}",
            g[i]
        );
    }
    assert!(matmul(&rng.randn((2, 3), &dev)?, &rng.randn((4, 5), &dev)?).is_err());
    eprintln!(
        "matmul: checked {} on {} thread(s) of candle's pool (row blocks need 2 or more)",
        if gm_core::native_kernels(&dev) {
            "gm's kernel"
        } else {
            "candle's matmul (the portable path)"
        },
        gm_core::kernels::par::threads()
    );
    Ok(())
}

/// `softplus` and `sigmoid`: forward against closed forms in f64 (and f32 within its
/// polynomials' error), far tails included; gradients against central differences in f64 and
/// against candle's composite ops in f32.
#[test]
fn softplus_and_sigmoid_match_closed_forms_and_finite_differences() -> Result<()> {
    use gm_core::kernels::ops::{sigmoid, softplus};
    let dev = Device::Cpu;
    let xs: Vec<f64> = (-400..=400)
        .map(|i| i as f64 * 0.11)
        .chain([-85.0, -60.0, -30.0, 30.0, 60.0, 85.0])
        .collect();
    let sp = |v: f64| v.max(0.0) + (-v.abs()).exp().ln_1p();
    let sg = |v: f64| 1.0 / (1.0 + (-v).exp());
    // gm's kernels keep the relative precision of the far tail (e^{−85} included); candle's
    // composite (the portable path) rounds 1 + e^{−|x|} and is accurate relative to max(y, 1).
    let native = gm_core::native_kernels(&dev);
    let floor = |y: f64, tiny: f64| if native { y.max(tiny) } else { y.max(1.0) };
    let x64 = Tensor::new(xs.as_slice(), &dev)?;
    for (got, f) in [
        (
            softplus(&x64)?.to_vec1::<f64>()?,
            &sp as &dyn Fn(f64) -> f64,
        ),
        (sigmoid(&x64)?.to_vec1::<f64>()?, &sg),
    ] {
        for (&v, g) in xs.iter().zip(&got) {
            let err = (g - f(v)).abs() / floor(f(v), 1e-300);
            assert!(err <= 1e-15, "{v}: {g} vs {} (relative {err})", f(v));
        }
    }
    let x32 = x64.to_dtype(DType::F32)?;
    for (got, f) in [
        (
            softplus(&x32)?.to_vec1::<f32>()?,
            &sp as &dyn Fn(f64) -> f64,
        ),
        (sigmoid(&x32)?.to_vec1::<f32>()?, &sg),
    ] {
        for (&v, &g) in xs.iter().zip(&got) {
            let want = f(v as f32 as f64);
            let err = (g as f64 - want).abs() / floor(want, 1e-37);
            assert!(err < 3e-7, "{v}: {g} vs {want} (relative {err})");
        }
    }
    // Gradients in f64 against central differences, through a weighted sum.
    let mut rng = GmRng::new(9);
    let x0 = (rng.randn((3, 5, 7), &dev)?.to_dtype(DType::F64)? * 4.0)?;
    let r = rng.randn((3, 5, 7), &dev)?.to_dtype(DType::F64)?;
    type F = fn(&Tensor) -> candle_core::Result<Tensor>;
    for op in [softplus as F, sigmoid as F] {
        let f = |x: &Tensor| -> Result<f64> { Ok((op(x)? * &r)?.sum_all()?.to_scalar()?) };
        let x = Var::from_tensor(&x0)?;
        let g = (op(&x)? * &r)?.sum_all()?.backward()?;
        let g = g.get(&x).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let base = x0.flatten_all()?.to_vec1::<f64>()?;
        let h = 1e-6;
        for i in 0..base.len() {
            let at = |d: f64| -> Result<f64> {
                let mut p = base.clone();
                p[i] += d;
                f(&Tensor::from_vec(p, x0.shape(), &dev)?)
            };
            let fd = (at(h)? - at(-h)?) / (2.0 * h);
            assert!((fd - g[i]).abs() < 1e-8, "element {i}: fd {fd} vs {}", g[i]);
        }
    }
    // f32 gradients against candle's composite ops, on a tensor larger than one parallel task.
    let x0 = (rng.randn((70_000,), &dev)? * 5.0)?;
    let r = rng.randn((70_000,), &dev)?;
    let composite_sp = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
    };
    for (op, plain) in [
        (
            softplus as F,
            &composite_sp as &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
        ),
        (sigmoid as F, &candle_nn::ops::sigmoid),
    ] {
        let x = Var::from_tensor(&x0)?;
        let g = (op(&x)? * &r)?.sum_all()?.backward()?;
        let g = g.get(&x).unwrap().clone();
        let p = (plain(&x)? * &r)?.sum_all()?.backward()?;
        let want = p.get(&x).unwrap();
        let d = (g - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
        let scale = want.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(
            d <= 1e-6 * scale,
            "gradient differs by {d} (largest {scale})"
        );
    }
    Ok(())
}

/// `channel_affine` = `x ⊙ scale[c] + shift[c]`: forward equal to candle's broadcast ops, its
/// three gradients against candle's (f32, several layouts, one larger than a parallel task) and
/// against central differences in f64; without a shift; wrong sizes are refused.
#[test]
fn channel_affine_matches_candle_and_finite_differences() -> Result<()> {
    use gm_core::kernels::ops::channel_affine;
    let dev = Device::Cpu;
    let mut rng = GmRng::new(11);
    for shape in [vec![2, 3, 4, 5], vec![6, 4], vec![2, 5, 70, 70]] {
        let c = shape[1];
        let x = Var::from_tensor(&rng.randn(shape.as_slice(), &dev)?)?;
        let s = Var::from_tensor(&rng.randn((1, c, 1, 1), &dev)?)?;
        let b = Var::from_tensor(&rng.randn((c,), &dev)?)?;
        let r = rng.randn(shape.as_slice(), &dev)?;
        let mut per_channel = vec![1; shape.len()];
        per_channel[1] = c;
        let plain = (x.broadcast_mul(&s.reshape(per_channel.as_slice())?)?)
            .broadcast_add(&b.reshape(per_channel.as_slice())?)?;
        let fused = channel_affine(&x, &s, Some(&b))?;
        let d = (&fused - &plain)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d <= 1e-6, "{shape:?}: forward differs by {d}");
        let gp = (plain * &r)?.sum_all()?.backward()?;
        let gf = (fused * &r)?.sum_all()?.backward()?;
        for (what, v) in [("x", &x), ("scale", &s), ("shift", &b)] {
            let (p, f) = (gp.get(v).unwrap(), gf.get(v).expect("gradient missing"));
            assert_eq!(p.dims(), f.dims(), "{what}");
            let d = (p - f)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = p.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                d <= 2e-6 * scale,
                "{shape:?} {what}: gradient differs by {d} of {scale}"
            );
        }
        let no_shift = channel_affine(&x, &s, None)?;
        let want = x.broadcast_mul(&s.reshape(per_channel.as_slice())?)?;
        let d = (no_shift - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d <= 1e-6, "{shape:?}: forward without shift differs by {d}");
    }
    // f64 central differences for every element of the three arguments.
    let x0 = rng.randn((2, 3, 2, 3), &dev)?.to_dtype(DType::F64)?;
    let s0 = rng.randn((3,), &dev)?.to_dtype(DType::F64)?;
    let b0 = rng.randn((3,), &dev)?.to_dtype(DType::F64)?;
    let r = rng.randn((2, 3, 2, 3), &dev)?.to_dtype(DType::F64)?;
    let f = |x: &Tensor, s: &Tensor, b: &Tensor| -> Result<f64> {
        Ok((channel_affine(x, s, Some(b))? * &r)?
            .sum_all()?
            .to_scalar()?)
    };
    let (x, s, b) = (
        Var::from_tensor(&x0)?,
        Var::from_tensor(&s0)?,
        Var::from_tensor(&b0)?,
    );
    let g = (channel_affine(&x, &s, Some(&b))? * &r)?
        .sum_all()?
        .backward()?;
    let h = 1e-6;
    for which in 0..3 {
        let base = [&x0, &s0, &b0][which];
        let got = g
            .get([&x, &s, &b][which])
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let flat = base.flatten_all()?.to_vec1::<f64>()?;
        for i in 0..flat.len() {
            let at = |d: f64| -> Result<f64> {
                let mut p = flat.clone();
                p[i] += d;
                let p = Tensor::from_vec(p, base.shape(), &dev)?;
                let mut args = [x0.clone(), s0.clone(), b0.clone()];
                args[which] = p;
                f(&args[0], &args[1], &args[2])
            };
            let fd = (at(h)? - at(-h)?) / (2.0 * h);
            assert!(
                (fd - got[i]).abs() < 1e-8,
                "arg {which} [{i}]: fd {fd} vs {}",
                got[i]
            );
        }
    }
    let err = channel_affine(&x0, &rng.randn((4,), &dev)?.to_dtype(DType::F64)?, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 scale values for 3 channels"), "{err}");
    Ok(())
}

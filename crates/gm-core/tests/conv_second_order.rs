//! Gradients of gradients through gm's convolutions (the WGAN-GP penalty and Hutchinson traces
//! need them). candle keeps the graph of a gradient only with `CANDLE_GRAD_DO_NOT_DETACH`, read once
//! per thread, so this file sets it before any backward pass and is its own test binary.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::conv::{conv2d, conv_transpose2d, Conv2dParams};
use gm_core::GmRng;

type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;

/// `h(x, w) = Σ v ⊙ ∂/∂x Σ tanh(op(x, w))²`, computed with one backward pass.
fn h(op: Op, x: &Tensor, w: &Tensor, v: &Tensor, keep: bool) -> Result<(Tensor, Var, Var)> {
    let xv = Var::from_tensor(x)?;
    let wv = Var::from_tensor(w)?;
    let y = op(&xv, &wv)?.tanh()?.sqr()?.sum_all()?;
    let gx = y.backward()?.get(&xv).unwrap().clone();
    let gx = if keep { gx } else { gx.detach() };
    Ok(((gx * v)?.sum_all()?, xv, wv))
}

fn check(op: Op, xs: (usize, usize, usize, usize), ws: (usize, usize, usize, usize)) -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(5);
    let x = (rng.randn(xs, &dev)?.to_dtype(DType::F64)? * 0.5)?;
    let w = (rng.randn(ws, &dev)?.to_dtype(DType::F64)? * 0.5)?;
    let v = rng.randn(xs, &dev)?.to_dtype(DType::F64)?;
    let (hv, xv, wv) = h(op, &x, &w, &v, true)?;
    let grads = hv.backward()?;
    let eps = 1e-5;
    for (which, base) in [(0, &x), (1, &w)] {
        let g = grads
            .get(if which == 0 { &xv } else { &wv })
            .expect("second-order gradient missing");
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        let flat = base.flatten_all()?.to_vec1::<f64>()?;
        for j in (0..flat.len()).step_by(3) {
            let at = |d: f64| -> Result<f64> {
                let mut p = flat.clone();
                p[j] += d;
                let p = Tensor::from_vec(p, base.shape(), &dev)?;
                let (hv, _, _) = if which == 0 {
                    h(op, &p, &w, &v, false)?
                } else {
                    h(op, &x, &p, &v, false)?
                };
                Ok(hv.to_scalar::<f64>()?)
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            assert!(
                (fd - g[j]).abs() < 1e-5 * (1.0 + fd.abs()),
                "arg {which} [{j}]: fd {fd} vs {}",
                g[j]
            );
        }
    }
    Ok(())
}

#[test]
fn second_order_gradients_match_finite_differences() -> Result<()> {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    check(
        |x, w| conv2d(x, w, Conv2dParams::default().stride(2).padding(1)),
        (2, 2, 5, 6),
        (3, 2, 3, 3),
    )?;
    check(
        |x, w| conv2d(x, w, Conv2dParams::default().padding(1).groups(2)),
        (1, 4, 4, 4),
        (2, 2, 3, 3),
    )?;
    check(
        |x, w| conv_transpose2d(x, w, Conv2dParams::default().stride(2).padding(1), [0, 0]),
        (2, 3, 3, 4),
        (3, 2, 4, 4),
    )?;
    Ok(())
}

#[test]
fn second_order_through_conv_and_fused_leaky_relu() -> Result<()> {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    use gm_core::kernels::ops::{bias_act, Act};
    // A two-layer discriminator-like map: conv → bias + LeakyReLU → conv, with a fixed bias.
    fn net(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let c = w.dim(0)?;
        let b = Tensor::arange(0u32, c as u32, x.device())?
            .to_dtype(x.dtype())?
            .affine(0.1, -0.1)?;
        let h = bias_act(
            &conv2d(x, w, Conv2dParams::default().padding(1))?,
            &b,
            Act::LeakyRelu(0.2),
        )?;
        conv2d(
            &h,
            &w.narrow(1, 0, c.min(w.dim(1)?))?
                .transpose(0, 1)?
                .contiguous()?,
            Conv2dParams::default(),
        )
    }
    check(net, (2, 2, 4, 5), (2, 2, 3, 3))
}

/// The fused softplus and sigmoid keep gradients of their gradients: `Σ v ⊙ ∂/∂x Σ r ⊙
/// softplus(x) ⊙ σ(x)` against central differences in f64.
#[test]
fn second_order_through_softplus_and_sigmoid() -> Result<()> {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    use gm_core::kernels::ops::{sigmoid, softplus};
    let dev = Device::Cpu;
    let mut rng = GmRng::new(3);
    let x0 = (rng.randn((4, 6), &dev)?.to_dtype(DType::F64)? * 3.0)?;
    let r = rng.randn((4, 6), &dev)?.to_dtype(DType::F64)?;
    let v = rng.randn((4, 6), &dev)?.to_dtype(DType::F64)?;
    let h = |x: &Tensor, keep: bool| -> Result<(Tensor, Var)> {
        let xv = Var::from_tensor(x)?;
        let y = ((softplus(&xv)? * sigmoid(&xv)?)? * &r)?.sum_all()?;
        let gx = y.backward()?.get(&xv).unwrap().clone();
        let gx = if keep { gx } else { gx.detach() };
        Ok(((gx * &v)?.sum_all()?, xv))
    };
    let (hv, xv) = h(&x0, true)?;
    let g = hv.backward()?;
    let g = g
        .get(&xv)
        .expect("second-order gradient missing")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let flat = x0.flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-5;
    for j in 0..flat.len() {
        let at = |d: f64| -> Result<f64> {
            let mut p = flat.clone();
            p[j] += d;
            Ok(h(&Tensor::from_vec(p, x0.shape(), &dev)?, false)?
                .0
                .to_scalar::<f64>()?)
        };
        let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
        assert!(
            (fd - g[j]).abs() < 1e-6 * (1.0 + fd.abs()),
            "[{j}]: fd {fd} vs {}",
            g[j]
        );
    }
    Ok(())
}

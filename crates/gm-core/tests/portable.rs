//! The portable convolution (candle's ops: what CUDA and Metal run) against gm's CPU kernels in
//! f64, for the parameters candle's kernels cannot take directly — different strides, paddings,
//! dilations and output paddings along H and W — in values and in both gradients.
//!
//! One test in its own binary: the kernel mode is process-wide.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::conv::{conv2d, conv2d_cropped, conv_transpose2d, Conv2dParams};
use gm_core::GmRng;

struct Case {
    transpose: bool,
    x: (usize, usize, usize, usize),
    w: (usize, usize, usize, usize),
    p: Conv2dParams,
    op: [usize; 2],
    crop: Option<[usize; 2]>,
}

/// Output, input gradient and weight gradient of `Σ y ⊙ r` for a fixed random `r`.
fn run(c: &Case, x: &Var, w: &Var) -> Result<Vec<Tensor>> {
    let y = match (c.transpose, c.crop) {
        (true, _) => conv_transpose2d(x, w, c.p, c.op)?,
        (false, Some(out)) => conv2d_cropped(x, w, c.p, out)?,
        (false, None) => conv2d(x, w, c.p)?,
    };
    let r = GmRng::new(9)
        .randn(y.shape(), &Device::Cpu)?
        .to_dtype(DType::F64)?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    Ok(vec![
        y,
        g.get(x.as_tensor()).expect("dx").clone(),
        g.get(w.as_tensor()).expect("dw").clone(),
    ])
}

#[test]
fn portable_path_equals_gm_kernels_for_unequal_parameters() -> Result<()> {
    let p = |s: [usize; 2], pad: [usize; 2], d: [usize; 2], g: usize| Conv2dParams {
        stride: s,
        padding: pad,
        dilation: d,
        groups: g,
    };
    let cases = [
        // The text model's causal convolution: one row, dilation along W only.
        Case {
            transpose: false,
            x: (2, 3, 1, 12),
            w: (4, 3, 1, 3),
            p: p([1, 1], [0, 4], [1, 2], 1),
            op: [0, 0],
            crop: Some([1, 12]),
        },
        // Dilation differing along both axes with taps on both.
        Case {
            transpose: false,
            x: (2, 2, 9, 10),
            w: (3, 2, 3, 2),
            p: p([1, 1], [1, 2], [2, 3], 1),
            op: [0, 0],
            crop: None,
        },
        // Strides differing, with groups.
        Case {
            transpose: false,
            x: (1, 4, 8, 9),
            w: (6, 2, 3, 3),
            p: p([2, 1], [1, 1], [1, 1], 2),
            op: [0, 0],
            crop: None,
        },
        Case {
            transpose: false,
            x: (2, 1, 7, 11),
            w: (2, 1, 2, 3),
            p: p([1, 3], [0, 1], [1, 1], 1),
            op: [0, 0],
            crop: None,
        },
        // Small images, as in RealNVP's coupling nets.
        Case {
            transpose: false,
            x: (1, 1, 4, 4),
            w: (6, 1, 3, 3),
            p: p([1, 1], [1, 1], [1, 1], 1),
            op: [0, 0],
            crop: None,
        },
        Case {
            transpose: false,
            x: (2, 6, 4, 4),
            w: (6, 6, 3, 3),
            p: p([1, 1], [1, 1], [1, 1], 1),
            op: [0, 0],
            crop: None,
        },
        Case {
            transpose: false,
            x: (1, 6, 4, 4),
            w: (2, 6, 1, 1),
            p: p([1, 1], [0, 0], [1, 1], 1),
            op: [0, 0],
            crop: None,
        },
        // Transposed: strides, paddings, output paddings and dilations differing.
        Case {
            transpose: true,
            x: (2, 3, 4, 5),
            w: (3, 2, 3, 2),
            p: p([2, 3], [1, 0], [1, 1], 1),
            op: [1, 2],
            crop: None,
        },
        Case {
            transpose: true,
            x: (1, 4, 5, 4),
            w: (4, 1, 2, 3),
            p: p([1, 2], [0, 1], [2, 1], 2),
            op: [0, 1],
            crop: None,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut rng = GmRng::new(i as u64);
        let x = Var::from_tensor(&rng.randn(c.x, &Device::Cpu)?.to_dtype(DType::F64)?)?;
        let w = Var::from_tensor(&rng.randn(c.w, &Device::Cpu)?.to_dtype(DType::F64)?)?;
        gm_core::set_portable_kernels(false);
        let native = run(c, &x, &w)?;
        gm_core::set_portable_kernels(true);
        let portable = run(c, &x, &w);
        gm_core::set_portable_kernels(false);
        let portable = portable?;
        for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(native.iter().zip(&portable)) {
            assert_eq!(a.dims(), b.dims(), "case {i} {what}");
            let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(scale > 0.0, "case {i} {what}: all zero");
            assert!(
                d <= 1e-12 * scale.max(1.0),
                "case {i} {what}: portable differs by {d:e}"
            );
        }
    }
    autocast_convolutions()?;
    resampling()?;
    Ok(())
}

/// ×2 nearest upsampling and its adjoint, the 2×2 block sum: candle's composition (what CUDA and
/// Metal run) gives the bits of gm's one-pass kernels, values and gradients.
fn resampling() -> Result<()> {
    use gm_core::kernels::resample::{block_sum2x, upsample_nearest2x};
    let mut rng = GmRng::new(11);
    let x = Var::from_tensor(
        &rng.randn((2, 3, 5, 6), &Device::Cpu)?
            .to_dtype(DType::F64)?,
    )?;
    let r = rng
        .randn((2, 3, 10, 12), &Device::Cpu)?
        .to_dtype(DType::F64)?;
    let run = |portable: bool| -> Result<Vec<Vec<f64>>> {
        gm_core::set_portable_kernels(portable);
        let up = upsample_nearest2x(&x);
        let sum = block_sum2x(&r);
        gm_core::set_portable_kernels(false);
        let (up, sum) = (up?, sum?);
        let g = (&up * &r)?.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).expect("dx");
        [&up, &sum, dx]
            .iter()
            .map(|t| Ok(t.flatten_all()?.to_vec1::<f64>()?))
            .collect()
    };
    let (native, portable) = (run(false)?, run(true)?);
    for (what, (a, b)) in ["up", "block sum", "dx"]
        .iter()
        .zip(native.iter().zip(&portable))
    {
        assert!(a.iter().any(|v| *v != 0.0), "{what}: all zero");
        assert_eq!(a, b, "{what}: portable differs");
    }
    Ok(())
}

/// Under autocast the portable path (what CUDA runs) convolves in the low precision and hands f32
/// on, with f32 gradients, close to the f32 result; gm's CPU kernels stay f32 and say so, as does
/// bf16 on the CPU (candle's CPU convolution has no bf16 matrix product; CUDA's has).
fn autocast_convolutions() -> Result<()> {
    use gm_core::precision::{counts, reset_counts, Autocast};
    let mut rng = GmRng::new(5);
    let x = Var::from_tensor(&rng.randn((2, 3, 9, 9), &Device::Cpu)?)?;
    let w = Var::from_tensor(&rng.randn((4, 3, 3, 3), &Device::Cpu)?)?;
    let wt = Var::from_tensor(&rng.randn((3, 4, 3, 3), &Device::Cpu)?)?;
    let p = Conv2dParams::default().stride(2).padding(1);
    let exact = conv2d(&x, &w, p)?;
    let exact_t = conv_transpose2d(&x, &wt, p, [0, 0])?;
    for (portable, dtype) in [(true, DType::F16), (true, DType::BF16), (false, DType::F16)] {
        gm_core::set_portable_kernels(portable);
        reset_counts();
        let (y, yt) = {
            let _g = Autocast::enter(Some(dtype));
            (conv2d(&x, &w, p), conv_transpose2d(&x, &wt, p, [0, 0]))
        };
        gm_core::set_portable_kernels(false);
        let (y, yt) = (y?, yt?);
        let low_ran = portable && dtype == DType::F16;
        let low = if low_ran { "f16" } else { "f32" };
        assert_eq!(counts()[&("conv2d", low)], 1, "{:?}", counts());
        assert_eq!(counts()[&("conv_transpose2d", low)], 1, "{:?}", counts());
        for (a, b) in [(&y, &exact), (&yt, &exact_t)] {
            assert_eq!(a.dtype(), DType::F32);
            let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            // f16 keeps 11 significant bits: a few parts in a thousand of the largest value.
            let tol = if low_ran { 1e-2 } else { 1e-6 };
            assert!(d > 0.0 || !low_ran, "f16 gave the f32 values exactly");
            assert!(
                d <= tol * scale,
                "{dtype:?} portable {portable}: off by {d} of {scale}"
            );
        }
        let g = (y.sum_all()? + yt.sum_all()?)?.backward()?;
        assert_eq!(g.get(w.as_tensor()).expect("dw").dtype(), DType::F32);
        assert_eq!(g.get(x.as_tensor()).expect("dx").dtype(), DType::F32);
    }
    Ok(())
}

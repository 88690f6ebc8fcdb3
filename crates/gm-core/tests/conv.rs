//! gm's convolution ops against PyTorch (values from `scripts/conv_reference.py`), candle's own
//! forward kernel, and central finite differences in f64.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::conv::{
    conv2d, conv_transpose2d, cpu_kernels, with_tile_width, Conv2dParams, TileWidth,
};
use gm_core::GmRng;
use serde_json::Value;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/conv_reference.safetensors"
);

struct Case {
    transpose: bool,
    params: Conv2dParams,
    output_padding: [usize; 2],
}

fn pair(v: &Value) -> [usize; 2] {
    [
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    ]
}

fn cases() -> Result<Vec<Case>> {
    let bytes = std::fs::read(REFERENCE)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let cases: Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"])?;
    Ok(cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            transpose: c["op"] == "transpose",
            params: Conv2dParams {
                stride: pair(&c["stride"]),
                padding: pair(&c["padding"]),
                dilation: pair(&c["dilation"]),
                groups: c["groups"].as_u64().unwrap() as usize,
            },
            output_padding: pair(&c["output_padding"]),
        })
        .collect())
}

fn apply(case: &Case, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if case.transpose {
        conv_transpose2d(x, w, case.params, case.output_padding)
    } else {
        conv2d(x, w, case.params)
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

#[test]
fn forward_and_gradients_match_pytorch_in_f64_and_f32() -> Result<()> {
    let dev = Device::Cpu;
    let t = candle_core::safetensors::load(REFERENCE, &dev)?;
    let cases = cases()?;
    assert!(cases.len() >= 10);
    for (i, case) in cases.iter().enumerate() {
        let get = |n: &str| t[&format!("{i}.{n}")].clone();
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
            let x = Var::from_tensor(&get("x").to_dtype(dtype)?)?;
            let w = Var::from_tensor(&get("w").to_dtype(dtype)?)?;
            let y = apply(case, &x, &w)?;
            let dy = max_abs_diff(&y, &get("y"))?;
            assert!(
                dy < tol,
                "case {i} {dtype:?}: forward differs from PyTorch by {dy}"
            );
            let grads = (y * get("r").to_dtype(dtype)?)?.sum_all()?.backward()?;
            let gx = max_abs_diff(grads.get(&x).unwrap(), &get("dx"))?;
            let gw = max_abs_diff(grads.get(&w).unwrap(), &get("dw"))?;
            assert!(
                gx < tol && gw < tol,
                "case {i} {dtype:?}: gradients differ from PyTorch: dx {gx}, dw {gw}"
            );
        }
    }
    Ok(())
}

#[test]
fn forward_matches_candle_on_model_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(3);
    // (N, C_in, H, W, C_out, k, stride, padding): the shapes of gm's conv models.
    for (n, ci, h, c_out, k, s, p) in [
        (8, 1, 28, 32, 3, 1, 1),
        (4, 32, 28, 64, 4, 2, 1),
        (3, 64, 7, 64, 3, 1, 1),
        (1, 16, 14, 16, 1, 1, 0),
    ] {
        let x = rng.randn((n, ci, h, h), &dev)?;
        let w = rng.randn((c_out, ci, k, k), &dev)?;
        let ours = conv2d(&x, &w, Conv2dParams::default().stride(s).padding(p))?;
        let theirs = x.conv2d(&w, p, s, 1, 1)?;
        let d = max_abs_diff(&ours, &theirs)?;
        assert!(d < 1e-3, "conv {n}x{ci}x{h} k{k} s{s}: {d}");
    }
    let x = rng.randn((4, 64, 7, 7), &dev)?;
    let w = rng.randn((64, 32, 4, 4), &dev)?;
    let ours = conv_transpose2d(&x, &w, Conv2dParams::default().stride(2).padding(1), [0, 0])?;
    let theirs = x.conv_transpose2d(&w, 1, 0, 2, 1)?;
    assert!(max_abs_diff(&ours, &theirs)? < 1e-3);
    Ok(())
}

/// Central differences of `f(x, w) = Σ op(x, w) ⊙ r` in f64 against the autograd gradients.
fn check_fd(
    case: &Case,
    xs: (usize, usize, usize, usize),
    ws: (usize, usize, usize, usize),
) -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(11);
    let x = Var::from_tensor(&rng.randn(xs, &dev)?.to_dtype(DType::F64)?)?;
    let w = Var::from_tensor(&rng.randn(ws, &dev)?.to_dtype(DType::F64)?)?;
    let y = apply(case, &x, &w)?;
    let r = rng.randn(y.shape(), &dev)?.to_dtype(DType::F64)?;
    let f = |x: &Tensor, w: &Tensor| -> Result<f64> {
        Ok((apply(case, x, w)? * &r)?.sum_all()?.to_scalar::<f64>()?)
    };
    let grads = (y * &r)?.sum_all()?.backward()?;
    let eps = 1e-6;
    for (var, which) in [(&x, 0), (&w, 1)] {
        let g = grads.get(var).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let base = var.flatten_all()?.to_vec1::<f64>()?;
        for j in 0..base.len() {
            let at = |d: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += d;
                let t = Tensor::from_vec(v, var.shape(), &dev)?;
                if which == 0 {
                    f(&t, &w)
                } else {
                    f(&x, &t)
                }
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            assert!(
                (fd - g[j]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{} [{j}]: fd {fd} vs autograd {}",
                if which == 0 { "dx" } else { "dw" },
                g[j]
            );
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let conv = |s: usize, p: usize, d: usize, g: usize| Case {
        transpose: false,
        params: Conv2dParams::default()
            .stride(s)
            .padding(p)
            .dilation(d)
            .groups(g),
        output_padding: [0, 0],
    };
    check_fd(&conv(1, 1, 1, 1), (1, 2, 5, 6), (3, 2, 3, 3))?;
    check_fd(&conv(2, 3, 1, 1), (2, 2, 7, 5), (2, 2, 3, 2))?;
    check_fd(&conv(1, 2, 2, 2), (1, 4, 6, 6), (2, 2, 3, 3))?;
    let tr = Case {
        transpose: true,
        params: Conv2dParams::default().stride(2).padding(1),
        output_padding: [1, 0],
    };
    check_fd(&tr, (2, 3, 4, 3), (3, 2, 3, 4))?;
    Ok(())
}

#[test]
fn bad_shapes_are_named_errors() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev)?;
    let err = conv2d(
        &x,
        &Tensor::zeros((4, 2, 3, 3), DType::F32, &dev)?,
        Conv2dParams::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("does not fit 3 input channels"),
        "{err}"
    );
    let err = conv2d(
        &x,
        &Tensor::zeros((4, 3, 9, 9), DType::F32, &dev)?,
        Conv2dParams::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("exceeds the padded input"),
        "{err}"
    );
    let err = conv2d(
        &x,
        &Tensor::zeros((4, 3, 3, 3), DType::F32, &dev)?,
        Conv2dParams::default().groups(2),
    )
    .unwrap_err();
    assert!(err.to_string().contains("divisible by groups"), "{err}");
    let err = conv2d(
        &x.to_dtype(DType::U8)?,
        &Tensor::zeros((4, 3, 3, 3), DType::U8, &dev)?,
        Conv2dParams::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("f32 or f64"), "{err}");
    Ok(())
}

/// `conv2d_cropped` equals the full convolution narrowed to its top-left corner, forward and both
/// gradients, in f64 (strided, dilated, grouped and batched cases included).
#[test]
fn cropped_convolution_is_the_narrowed_full_one() -> Result<()> {
    use gm_core::kernels::conv::conv2d_cropped;
    let dev = Device::Cpu;
    let mut rng = GmRng::new(8);
    let cases = [
        // (n, ci, co, [h, w], [kh, kw], params, out)
        (
            2,
            3,
            4,
            [7, 9],
            [2, 5],
            Conv2dParams {
                padding: [2, 2],
                ..Default::default()
            },
            [7, 9],
        ),
        (
            3,
            2,
            6,
            [8, 8],
            [1, 3],
            Conv2dParams {
                padding: [0, 2],
                ..Default::default()
            },
            [8, 8],
        ),
        (
            1,
            4,
            4,
            [9, 6],
            [3, 3],
            Conv2dParams::default().padding(2).dilation(2).groups(2),
            [5, 4],
        ),
        (
            20,
            2,
            3,
            [6, 5],
            [3, 3],
            Conv2dParams::default().padding(2).stride(2),
            [3, 2],
        ),
    ];
    for (n, ci, co, [h, w], [kh, kw], p, out) in cases {
        let x = Var::from_tensor(&rng.randn((n, ci, h, w), &dev)?.to_dtype(DType::F64)?)?;
        let wt = Var::from_tensor(
            &rng.randn((co, ci / p.groups, kh, kw), &dev)?
                .to_dtype(DType::F64)?,
        )?;
        let ours = conv2d_cropped(&x, &wt, p, out)?;
        let full = conv2d(&x, &wt, p)?;
        let (oh, ow) = (ours.dim(2)?, ours.dim(3)?);
        assert_eq!(
            (oh, ow),
            (out[0].min(full.dim(2)?), out[1].min(full.dim(3)?))
        );
        let want = full.narrow(2, 0, oh)?.narrow(3, 0, ow)?;
        assert!(max_abs_diff(&ours, &want)? < 1e-12, "{p:?}: forward");
        let r = rng.randn(ours.shape(), &dev)?.to_dtype(DType::F64)?;
        let g1 = (ours * &r)?.sum_all()?.backward()?;
        let g2 = (want * &r)?.sum_all()?.backward()?;
        for v in [&x, &wt] {
            let d = max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap())?;
            assert!(d < 1e-10, "{p:?}: gradient differs by {d}");
        }
    }
    Ok(())
}

/// The f32 bit patterns of a tensor of f32 results held as f64.
fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .map(|&v| (v as f32).to_bits())
        .collect())
}

/// Forward, data gradient and filter gradient of one op in `dtype`, as f64 tensors.
fn run_in(
    case: &Case,
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
    crop: Option<[usize; 2]>,
    dtype: DType,
) -> Result<[Tensor; 3]> {
    let xv = Var::from_tensor(&x.to_dtype(dtype)?)?;
    let wv = Var::from_tensor(&w.to_dtype(dtype)?)?;
    let y = match crop {
        Some(out) => gm_core::kernels::conv::conv2d_cropped(&xv, &wv, case.params, out)?,
        None => apply(case, &xv, &wv)?,
    };
    let grads = (&y
        * r.narrow(2, 0, y.dim(2)?)?
            .narrow(3, 0, y.dim(3)?)?
            .to_dtype(dtype)?)?
    .sum_all()?
    .backward()?;
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
    Ok([
        f64_of(&y)?,
        f64_of(grads.get(&xv).unwrap())?,
        f64_of(grads.get(&wv).unwrap())?,
    ])
}

/// The f32 kernels (on x86-64 with AVX2 the register-tile ones, which never build the column
/// matrix) against the f64 im2col + gemm ones, on geometries that reach every edge of their
/// tiling: output-channel and column-row counts that are not multiples of the tile, pixel panels
/// that run across output rows and images, rows wider than a panel, depths beyond one slice,
/// strides 2–3 (with kernels shorter than the stride), dilation, uneven padding, groups, depthwise, 1×1, transposed with output
/// padding, cropped outputs — batches of 2 and more so that the images split over threads.
///
/// Each case runs with the direct kernel's 16-channel tiles and with its 32-channel ones (AVX-512
/// where the CPU has it, else the same tiles in plain Rust): both against f64, and the two
/// bit for bit against each other — every output is the same sequence of fused multiply-adds.
#[test]
fn f32_kernels_match_f64_on_tiling_edge_cases() -> Result<()> {
    let path = |w| with_tile_width(w, cpu_kernels);
    eprintln!(
        "conv kernels here: default {}, narrow tiles {}, wide tiles {}",
        cpu_kernels(),
        path(TileWidth::Narrow),
        path(TileWidth::Wide)
    );
    let dev = Device::Cpu;
    let mut rng = GmRng::new(21);
    let p = |s: [usize; 2], pad: [usize; 2], d: [usize; 2], g: usize| Conv2dParams {
        stride: s,
        padding: pad,
        dilation: d,
        groups: g,
    };
    // (transpose, x shape, w shape, params, output padding, cropped output)
    type Geo = (
        bool,
        (usize, usize, usize, usize),
        (usize, usize, usize, usize),
        Conv2dParams,
        [usize; 2],
        Option<[usize; 2]>,
    );
    let cases: [Geo; 27] = [
        (
            false,
            (6, 3, 5, 7),
            (5, 3, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (4, 8, 9, 9),
            (12, 8, 3, 3),
            p([2, 2], [1, 2], [1, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (3, 6, 11, 8),
            (9, 6, 2, 3),
            p([3, 2], [2, 0], [2, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (4, 8, 10, 10),
            (12, 2, 3, 3),
            p([1, 1], [1, 1], [1, 1], 4),
            [0, 0],
            None,
        ),
        (
            false,
            (2, 40, 12, 12),
            (8, 40, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (2, 4, 30, 30),
            (8, 4, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (5, 7, 4, 6),
            (3, 7, 1, 1),
            p([1, 1], [0, 0], [1, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (3, 6, 9, 9),
            (6, 1, 3, 3),
            p([1, 1], [1, 1], [1, 1], 6),
            [0, 0],
            None,
        ),
        (
            false,
            (4, 16, 14, 14),
            (32, 16, 4, 4),
            p([2, 2], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        (
            false,
            (3, 5, 9, 11),
            (7, 5, 3, 3),
            p([1, 1], [2, 2], [1, 1], 1),
            [0, 0],
            Some([9, 11]),
        ),
        (
            true,
            (3, 16, 5, 5),
            (16, 6, 4, 4),
            p([2, 2], [1, 1], [1, 1], 1),
            [1, 0],
            None,
        ),
        (
            true,
            (4, 12, 7, 7),
            (12, 2, 4, 4),
            p([2, 2], [1, 1], [1, 1], 2),
            [0, 0],
            None,
        ),
        // Stride 2 on wide rows of odd width, few channels (col2im data gradient).
        (
            false,
            (2, 3, 20, 37),
            (5, 3, 4, 4),
            p([2, 2], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // The last three have enough channels and pixels for the sub-pixel data gradient.
        // Kernel shorter than the stride: a sub-pixel phase of dx no tap reaches, and input
        // rows past the last window.
        (
            false,
            (2, 16, 30, 20),
            (4, 16, 2, 2),
            p([3, 2], [0, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // Stride 2 on rows wide enough for the vector interleave of the x-phases, odd width.
        (
            false,
            (2, 16, 20, 37),
            (5, 16, 4, 4),
            p([2, 2], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // Groups, stride and dilation in the direct kernels (12 output channels per group: a
        // partly empty 16-channel tile; column depth 144).
        (
            false,
            (2, 32, 11, 9),
            (24, 16, 3, 3),
            p([2, 2], [1, 1], [2, 1], 2),
            [0, 0],
            None,
        ),
        // Deep enough for the direct kernel in every direction: forward (depth 256), the
        // sub-pixel data gradient's phases (depth 128, 10 × 11 pixels each) and the filter
        // gradient.
        (
            false,
            (2, 16, 20, 22),
            (32, 16, 4, 4),
            p([2, 2], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // 32-channel tiles in every direction: 56 output channels (one full block, one of 24),
        // 48 input channels for the data gradient's phases (depth 224, 10 × 11 pixels each),
        // forward depth 768 (six slices).
        (
            false,
            (2, 48, 20, 22),
            (56, 48, 4, 4),
            p([2, 2], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // Groups of 24 output channels (a 32-channel tile with 8 empty lanes), stride and
        // dilation, depth 216.
        (
            false,
            (2, 48, 11, 9),
            (48, 24, 3, 3),
            p([2, 2], [1, 1], [2, 1], 2),
            [0, 0],
            None,
        ),
        // Stride with dilation: phases whose taps are two dilations apart.
        (
            false,
            (3, 16, 26, 30),
            (4, 16, 3, 2),
            p([2, 3], [1, 0], [2, 1], 1),
            [0, 0],
            None,
        ),
        // The rest are stride-1 3 × 3 with ≥ 16 channels per group (Winograd F(2×2, 3×3) for
        // the forward and both gradients). Odd output sizes (partial tiles), tiles of
        // several images in one panel.
        (
            false,
            (3, 16, 13, 11),
            (20, 16, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // Padding 0 in y and 2 in x (data gradient padded by 2 and 0).
        (
            false,
            (2, 32, 9, 14),
            (16, 32, 3, 3),
            p([1, 1], [0, 2], [1, 1], 1),
            [0, 0],
            None,
        ),
        // Groups.
        (
            false,
            (2, 32, 10, 10),
            (32, 16, 3, 3),
            p([1, 1], [1, 1], [1, 1], 2),
            [0, 0],
            None,
        ),
        // More input channels than one depth slice of the register tiles (KC = 128).
        (
            false,
            (2, 136, 6, 5),
            (40, 136, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // A stride-1 transposed convolution (its forward is the data gradient's kernel).
        (
            true,
            (2, 16, 7, 9),
            (16, 24, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // An odd number of input channels and outputs not a multiple of the tile height (4),
        // in both directions.
        (
            false,
            (2, 17, 8, 8),
            (18, 17, 3, 3),
            p([1, 1], [1, 1], [1, 1], 1),
            [0, 0],
            None,
        ),
        // Cropped: padding 2 on one side only.
        (
            false,
            (2, 16, 9, 11),
            (16, 16, 3, 3),
            p([1, 1], [2, 2], [1, 1], 1),
            [0, 0],
            Some([9, 11]),
        ),
    ];
    for (i, (transpose, xs, ws, params, output_padding, crop)) in cases.into_iter().enumerate() {
        let case = Case {
            transpose,
            params,
            output_padding,
        };
        let x = rng.randn(xs, &dev)?.to_dtype(DType::F64)?;
        let w = rng.randn(ws, &dev)?.to_dtype(DType::F64)?;
        let y = apply(&case, &x, &w)?;
        let r = rng.randn(y.shape(), &dev)?.to_dtype(DType::F64)?;
        let want = run_in(&case, &x, &w, &r, crop, DType::F64)?;
        let mut by_width = Vec::new();
        for width in [TileWidth::Narrow, TileWidth::Wide] {
            let got = with_tile_width(width, || run_in(&case, &x, &w, &r, crop, DType::F32))?;
            for (name, a, b) in [
                ("y", &got[0], &want[0]),
                ("dx", &got[1], &want[1]),
                ("dw", &got[2], &want[2]),
            ] {
                let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                let d = max_abs_diff(a, b)?;
                assert!(
                    d <= 3e-6 * (1.0 + scale),
                    "case {i}, {width:?} tiles: {name} of the f32 kernels differs from f64 by {d} \
                     (scale {scale})"
                );
            }
            by_width.push(got);
        }
        for (k, name) in ["y", "dx", "dw"].iter().enumerate() {
            assert!(
                f32_bits(&by_width[0][k])? == f32_bits(&by_width[1][k])?,
                "case {i}: {name} differs between the narrow and the wide tiles"
            );
        }
    }
    Ok(())
}

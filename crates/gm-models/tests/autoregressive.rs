//! The autoregressive ladder: exact normalisation, causality (and PixelCNN's blind spot),
//! gradients to every parameter, the raster sampler.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;
use gm_core::GmRng;
use gm_models::ar::{sample_in_order, PixelOutput};
use gm_models::fvsbn::FvsbnConfig;
use gm_models::gated_pixelcnn::{GatedPixelCnn, GatedPixelCnnConfig};
use gm_models::made::{Made, MadeConfig};
use gm_models::pixelcnn::{raster_mask, MaskType, PixelCnn, PixelCnnConfig};
use gm_models::{Batch, EvalOptions, Model, ModelConfig};

fn build(cfg: &ModelConfig, seed: u64) -> (VarMap, Box<dyn Model>) {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let m = cfg.build(vb).unwrap();
    (vm, m)
}

/// A seeded builder over a fresh parameter store.
fn vb(seed: u64) -> VarBuilder<'static> {
    gm_core::rng::seeded_var_builder(&VarMap::new(), seed, DType::F32, &Device::Cpu)
}

fn nll(m: &dyn Model, x: &Tensor, labels: Option<&Tensor>) -> Vec<f64> {
    let b = Batch {
        x: x.clone(),
        labels: labels.cloned(),
    };
    let out = m
        .eval_metrics(&b, &mut GmRng::new(0), &EvalOptions::default())
        .unwrap();
    let t = &out.iter().find(|(k, _)| k == "nll_nats").unwrap().1;
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// Every binary image of `shape`, `(2^D, C, H, W)`.
fn all_binary(shape: [usize; 3]) -> Tensor {
    let d: usize = shape.iter().product();
    let n = 1usize << d;
    let v: Vec<f32> = (0..n * d)
        .map(|k| ((k / d) >> (k % d) & 1) as f32)
        .collect();
    Tensor::from_vec(v, (n, shape[0], shape[1], shape[2]), &Device::Cpu).unwrap()
}

fn total_probability(m: &dyn Model, x: &Tensor, labels: Option<&Tensor>) -> f64 {
    nll(m, x, labels).iter().map(|l| (-l).exp()).sum()
}

/// `Σ_x p(x) = 1` over all 2^6 binary 2×3 images (so the likelihood is exact and normalised),
/// for every model with Bernoulli pixels, MADE's mixture of orderings included.
#[test]
fn bernoulli_models_sum_to_one() {
    let shape = [1, 2, 3];
    let x = all_binary(shape);
    let cfgs = [
        ModelConfig::new(FvsbnConfig { image_shape: shape }),
        ModelConfig::new(MadeConfig {
            image_shape: shape,
            hidden: vec![12, 12],
            num_masks: 3,
            order_agnostic: true,
            mask_seed: 5,
        }),
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            ..Default::default()
        }),
    ];
    for cfg in cfgs {
        let (_vm, m) = build(&cfg, 11);
        let s = total_probability(m.as_ref(), &x, None);
        assert!((s - 1.0).abs() < 1e-4, "{}: Σ p = {s}", cfg.kind());
    }
}

/// The same for 256 grey levels on a 1×1×2 image (65 536 images), and for a conditional model
/// per class.
#[test]
fn categorical_and_conditional_models_sum_to_one() {
    let shape = [1, 1, 2];
    let v: Vec<f32> = (0..65536u32)
        .flat_map(|k| [(k % 256) as f32 / 255.0, (k / 256) as f32 / 255.0])
        .collect();
    let x = Tensor::from_vec(v, (65536, 1, 1, 2), &Device::Cpu).unwrap();
    let cfgs = [
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            output: PixelOutput::Categorical,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            output: PixelOutput::Categorical,
            ..Default::default()
        }),
    ];
    for cfg in cfgs {
        let (_vm, m) = build(&cfg, 12);
        let s = total_probability(m.as_ref(), &x, None);
        assert!((s - 1.0).abs() < 1e-3, "{}: Σ p = {s}", cfg.kind());
    }
    let shape = [1, 2, 3];
    let xb = all_binary(shape);
    for cfg in [
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            num_classes: 3,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            num_classes: 3,
            ..Default::default()
        }),
    ] {
        let (_vm, m) = build(&cfg, 13);
        let mut per_class = Vec::new();
        for c in 0..3u32 {
            let y = Tensor::full(c, 64, &Device::Cpu).unwrap();
            let s = total_probability(m.as_ref(), &xb, Some(&y));
            assert!(
                (s - 1.0).abs() < 1e-4,
                "{} class {c}: Σ p = {s}",
                cfg.kind()
            );
            per_class.push(
                nll(
                    m.as_ref(),
                    &xb.narrow(0, 0, 1).unwrap(),
                    Some(&y.narrow(0, 0, 1).unwrap()),
                )[0],
            );
        }
        assert!(
            (per_class[0] - per_class[1]).abs() > 1e-6,
            "{}: the label changes nothing",
            cfg.kind()
        );
    }
}

/// `∂ logits[:, :, d] / ∂x` over a batch of random images, as an `(H, W)` grid of |gradient|.
fn input_sensitivity(logits: impl Fn(&Tensor) -> Tensor, shape: [usize; 3], d: usize) -> Vec<f32> {
    let mut rng = GmRng::new(9);
    let x0 = rng
        .uniform((4, shape[0], shape[1], shape[2]), 0.0, 1.0, &Device::Cpu)
        .unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let l = logits(x.as_tensor());
    let g = l
        .narrow(D::Minus1, d, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = g.get(x.as_tensor()).expect("gradient reaches the input");
    gx.abs()
        .unwrap()
        .sum(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_causal(name: &str, grad: &[f32], order: &[usize], t: usize) {
    let d = order[t];
    for &later in &order[t..] {
        assert_eq!(
            grad[later], 0.0,
            "{name}: logit of pixel {d} depends on pixel {later}, which comes at or after it"
        );
    }
    assert!(
        order[..t].iter().any(|&p| grad[p] > 0.0),
        "{name}: logit of pixel {d} depends on no earlier pixel"
    );
}

#[test]
fn fvsbn_and_made_are_causal_in_their_order() {
    let shape = [1, 5, 5];
    let raster: Vec<usize> = (0..25).collect();
    let vm = VarMap::new();
    let fv = gm_models::fvsbn::Fvsbn::new(
        FvsbnConfig { image_shape: shape },
        gm_core::rng::seeded_var_builder(&vm, 1, DType::F32, &Device::Cpu),
    )
    .unwrap();
    // FVSBN starts from zero weights (p = ½ everywhere); give it random ones to see its wiring.
    let w = GmRng::new(7).randn((25, 25), &Device::Cpu).unwrap();
    vm.data().lock().unwrap()["linear.weight"].set(&w).unwrap();
    for t in [1, 12, 24] {
        let g = input_sensitivity(|x| fv.logits(x).unwrap(), shape, raster[t]);
        assert_causal("fvsbn", &g, &raster, t);
        // A logistic regression on every earlier pixel: all of them matter.
        assert!(
            raster[..t].iter().all(|&p| g[p] > 0.0),
            "fvsbn misses a pixel"
        );
    }
    let made = Made::new(
        MadeConfig {
            image_shape: shape,
            hidden: vec![64, 64],
            num_masks: 3,
            order_agnostic: true,
            mask_seed: 2,
        },
        vb(2),
    )
    .unwrap();
    for k in 0..3 {
        let order = made.order(k).to_vec();
        if k > 0 {
            assert_ne!(order, raster, "order-agnostic masks keep raster order");
        }
        for t in [1, 12, 24] {
            let g = input_sensitivity(|x| made.logits(x, k).unwrap(), shape, order[t]);
            assert_causal(&format!("made/{k}"), &g, &order, t);
        }
    }
}

/// Both PixelCNNs are causal; the plain one has a blind spot, the gated one has none.
///
/// Pixel `(i, j) = (6, 5)` of a 10×10 image. The plain net (7×7 mask A, two 3×3 mask-B blocks)
/// reaches past its first layer's window only up and to the left: it never sees `(i − 1, j + 4)`
/// although it sees `(i − 2, j + 4)` (through the mask-B layer at `(i − 1, j + 1)`); the gated net
/// with the same kernels sees every earlier pixel of rows `i − 3 … i`, columns `j ± 4`.
#[test]
fn pixelcnn_blind_spot_and_gated_without_one() {
    let shape = [1, 10, 10];
    let w = 10;
    let (i, j) = (6, 5);
    let d = i * w + j;
    let raster: Vec<usize> = (0..100).collect();
    let plain = PixelCnn::new(
        PixelCnnConfig {
            image_shape: shape,
            channels: 16,
            res_blocks: 2,
            ..Default::default()
        },
        vb(3),
    )
    .unwrap();
    let gated = GatedPixelCnn::new(
        GatedPixelCnnConfig {
            image_shape: shape,
            channels: 16,
            layers: 3,
            ..Default::default()
        },
        vb(4),
    )
    .unwrap();
    let gp = input_sensitivity(|x| plain.logits(x, None).unwrap(), shape, d);
    let gg = input_sensitivity(|x| gated.logits(x, None).unwrap(), shape, d);
    assert_causal("pixelcnn", &gp, &raster, d);
    assert_causal("gated-pixelcnn", &gg, &raster, d);
    let window: Vec<usize> = (i - 3..=i)
        .flat_map(|r| (j - 4..=j + 4).map(move |c| r * w + c))
        .filter(|&p| p < d)
        .collect();
    let blind: Vec<usize> = window.iter().copied().filter(|&p| gp[p] == 0.0).collect();
    assert!(
        blind.contains(&((i - 1) * w + j + 4)),
        "pixelcnn: expected a blind spot at (i-1, j+4); zero-gradient pixels {blind:?}"
    );
    assert!(gp[(i - 2) * w + j + 4] > 0.0 && gp[(i - 1) * w + j + 3] > 0.0);
    let missed: Vec<usize> = window.iter().copied().filter(|&p| gg[p] == 0.0).collect();
    assert!(
        missed.is_empty(),
        "gated-pixelcnn: earlier pixels {missed:?} never reach pixel {d}"
    );
}

#[test]
fn every_parameter_gets_a_gradient() {
    let shape = [1, 6, 6];
    let cfgs = [
        ModelConfig::new(FvsbnConfig { image_shape: shape }),
        ModelConfig::new(MadeConfig {
            image_shape: shape,
            hidden: vec![32],
            ..Default::default()
        }),
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            num_classes: 4,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            num_classes: 4,
            output: PixelOutput::Categorical,
            ..Default::default()
        }),
    ];
    let mut rng = GmRng::new(4);
    for cfg in cfgs {
        let (vm, m) = build(&cfg, 3);
        let p = rng.uniform((8, 1, 6, 6), 0.0, 1.0, &Device::Cpu).unwrap();
        let x = if cfg.pixel_data() == gm_models::PixelData::Levels {
            ((p * 255.0).unwrap().floor().unwrap() / 255.0).unwrap()
        } else {
            rng.bernoulli(&p).unwrap()
        };
        let labels = Tensor::from_vec(vec![0u32, 1, 2, 3, 0, 1, 2, 3], 8, &Device::Cpu).unwrap();
        let b = Batch {
            x,
            labels: Some(labels),
        };
        let loss = m.loss(&b, &mut rng).unwrap();
        let g = loss.total.backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let n = g
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", cfg.kind()))
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{}: zero gradient for {name}", cfg.kind());
        }
    }
}

/// The sampler feeds each drawn pixel back: a chain where pixel d copies pixel d − 1 (with
/// saturated logits) and pixel 0 is always 1 gives all ones; a categorical that puts all its mass
/// on level `10·d` gives exactly those levels.
#[test]
fn sampler_feeds_previous_pixels_back() {
    let like = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let order: Vec<usize> = (0..6).collect();
    let chain = |x: &Tensor| -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let flat = x.reshape((n, 6))?;
        let prev = Tensor::cat(
            &[
                Tensor::ones((n, 1), DType::F32, x.device())?,
                flat.narrow(1, 0, 5)?,
            ],
            1,
        )?;
        ((prev * 80.0)? - 40.0)?.unsqueeze(1)
    };
    let mut rng = GmRng::new(0);
    let s = sample_in_order(
        [1, 2, 3],
        5,
        &order,
        PixelOutput::Bernoulli,
        &like,
        &mut rng,
        chain,
    )
    .unwrap();
    assert_eq!(s.sum_all().unwrap().to_scalar::<f32>().unwrap(), 30.0);
    let peaked = |x: &Tensor| -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let v: Vec<f32> = (0..n * 256 * 6)
            .map(|k| {
                let (c, d) = ((k / 6) % 256, k % 6);
                if c == 10 * d {
                    50.0
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (n, 256, 6), x.device())
    };
    let s = sample_in_order(
        [1, 2, 3],
        2,
        &order,
        PixelOutput::Categorical,
        &like,
        &mut rng,
        peaked,
    )
    .unwrap();
    let v = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, x) in v.iter().enumerate() {
        assert_eq!((x * 255.0).round() as usize, 10 * (k % 6));
    }
}

#[test]
fn masks_and_conditional_sampling() {
    assert_eq!(
        raster_mask(3, 3, MaskType::A),
        vec![1., 1., 1., 1., 0., 0., 0., 0., 0.]
    );
    assert_eq!(
        raster_mask(3, 3, MaskType::B),
        vec![1., 1., 1., 1., 1., 0., 0., 0., 0.]
    );
    let (_vm, m) = build(
        &ModelConfig::new(GatedPixelCnnConfig {
            image_shape: [1, 4, 4],
            num_classes: 3,
            ..Default::default()
        }),
        0,
    );
    let mut rng = GmRng::new(1);
    let s = m.sample_labels(&[0, 2, 2], &mut rng).unwrap().unwrap();
    assert_eq!(s.dims(), &[3, 1, 4, 4]);
    let e = m.sample_labels(&[3], &mut rng).unwrap_err().to_string();
    assert!(e.contains("label 3"), "{e}");
    let (_vm, u) = build(
        &ModelConfig::new(FvsbnConfig {
            image_shape: [1, 4, 4],
        }),
        0,
    );
    assert!(u.sample_labels(&[0], &mut rng).unwrap().is_none());
}

/// The banded sampler's premise: the logits of row `i` computed from rows `i − rows_above … i`
/// alone equal those computed from the whole image (and a band one row shorter differs), for
/// grey and RGB images.
#[test]
fn logits_of_a_row_need_only_the_band_above_it() {
    use gm_models::ar::RasterModel;
    for (c, width) in [(1, 16), (3, 12)] {
        let shape = [c, 12, 9];
        let plain = PixelCnn::new(
            PixelCnnConfig {
                image_shape: shape,
                res_blocks: 3,
                channels: width,
                head_channels: width,
                ..Default::default()
            },
            vb(5),
        )
        .unwrap();
        let gated = GatedPixelCnn::new(
            GatedPixelCnnConfig {
                image_shape: shape,
                layers: 4,
                channels: width,
                head_channels: width,
                ..Default::default()
            },
            vb(6),
        )
        .unwrap();
        let models: [(&str, &dyn RasterModel); 2] = [("pixelcnn", &plain), ("gated", &gated)];
        let mut rng = GmRng::new(2);
        let p = rng.uniform((3, c, 12, 9), 0.0, 1.0, &Device::Cpu).unwrap();
        let x = rng.bernoulli(&p).unwrap();
        for (name, m) in models {
            let r = m.rows_above();
            assert_eq!(r, 3 + 3, "{name}");
            let full = m.logits(&x, None).unwrap().reshape((3, c, 12, 9)).unwrap();
            let i = 10;
            let row = |lo: usize| {
                let band = x.narrow(2, lo, i + 1 - lo).unwrap();
                let l = m.logits(&band, None).unwrap();
                let rows = i + 1 - lo;
                l.reshape((3, c, rows, 9))
                    .unwrap()
                    .narrow(2, rows - 1, 1)
                    .unwrap()
            };
            let want = full.narrow(2, i, 1).unwrap();
            let diff = |a: &Tensor| max_abs_diff(a, &want);
            assert!(
                diff(&row(i - r)) < 1e-5,
                "{name}, {c} channels: the band of {r} rows is not enough"
            );
            let short = diff(&row(i - r + 1));
            assert!(
                short > 0.0,
                "{name}, {c} channels: rows_above {r} is larger than needed ({short})"
            );
        }
    }
}

/// The cached raster sampler (each value computes one position of every layer) draws the same
/// images as the banded one from the same random numbers, and the logits it drew each value from
/// equal the network's logits on the finished images: grey and RGB, Bernoulli and 256-way,
/// unconditional and class-conditional, for both nets.
#[test]
fn cached_sampler_equals_the_banded_one() {
    use gm_models::ar::RasterModel;
    let dev = Device::Cpu;
    let cases = [
        ([1, 9, 7], PixelOutput::Bernoulli, 0),
        ([1, 6, 5], PixelOutput::Categorical, 3),
        ([3, 5, 4], PixelOutput::Bernoulli, 3),
        ([3, 4, 4], PixelOutput::Categorical, 0),
    ];
    for (k, (shape, output, num_classes)) in cases.into_iter().enumerate() {
        let plain = PixelCnn::new(
            PixelCnnConfig {
                image_shape: shape,
                res_blocks: 3,
                channels: 12,
                head_channels: 12,
                output,
                num_classes,
                ..Default::default()
            },
            vb(40 + k as u64),
        )
        .unwrap();
        let gated = GatedPixelCnn::new(
            GatedPixelCnnConfig {
                image_shape: shape,
                layers: 4,
                channels: 12,
                head_channels: 12,
                output,
                num_classes,
                ..Default::default()
            },
            vb(50 + k as u64),
        )
        .unwrap();
        let n = 5;
        let labels =
            (num_classes > 0).then(|| Tensor::from_vec(vec![0u32, 1, 2, 0, 1], n, &dev).unwrap());
        let models: [(&str, &dyn RasterModel); 2] = [("pixelcnn", &plain), ("gated", &gated)];
        for (name, m) in models {
            let what = format!("{name} {shape:?} {output:?} classes {num_classes}");
            let (x, logits) = m
                .draw_cached(labels.as_ref(), n, &mut GmRng::new(7), true)
                .unwrap()
                .expect("a cached sampler");
            let logits = logits.expect("the logits kept");
            let banded = m
                .draw_banded(labels.as_ref(), n, &mut GmRng::new(7))
                .unwrap();
            assert_eq!(
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                banded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{what}: cached and banded samples differ"
            );
            let want = m.logits(&x, labels.as_ref()).unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(&logits, &want);
            assert!(
                diff < 1e-5 * scale.max(1.0) as f64,
                "{what}: cached logits differ from the network's by {diff} (scale {scale})"
            );
            // Not every value the same: the images are random draws.
            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().any(|&a| a != v[0]), "{what}: constant samples");
        }
    }
}

/// Pearson's chi-square of 6,000 samples (seed `seed`) of `m` against its own probabilities over
/// the 64 binary images `x` of six values (cells with expected count ≥ 1).
fn sample_chi_square(m: &dyn Model, x: &Tensor, seed: u64) -> f64 {
    let p: Vec<f64> = nll(m, x, None).iter().map(|l| (-l).exp()).collect();
    let n = 6000;
    let s = m.sample(n, &mut GmRng::new(seed)).unwrap().unwrap();
    let mut counts = [0f64; 64];
    for img in s.reshape((n, 6)).unwrap().to_vec2::<f32>().unwrap() {
        let k: usize = img
            .iter()
            .enumerate()
            .map(|(i, v)| (*v as usize) << i)
            .sum();
        counts[k] += 1.0;
    }
    (0..64)
        .filter(|&k| p[k] * n as f64 >= 1.0)
        .map(|k| (counts[k] - p[k] * n as f64).powi(2) / (p[k] * n as f64))
        .sum()
}

/// Samples follow the model's own exact distribution: over the 64 binary 2×3 images, the
/// frequencies of 6,000 draws match p(x) (chi-square well below its 0.1% critical value), for
/// the plain sampler (FVSBN, MADE) and the cached one (PixelCNN, Gated PixelCNN).
#[test]
fn samples_follow_the_models_probabilities() {
    let shape = [1, 2, 3];
    let x = all_binary(shape);
    let cfgs = [
        ModelConfig::new(FvsbnConfig { image_shape: shape }),
        ModelConfig::new(MadeConfig {
            image_shape: shape,
            hidden: vec![12],
            ..Default::default()
        }),
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            ..Default::default()
        }),
    ];
    for cfg in cfgs {
        let (vm, m) = build(&cfg, 21);
        if cfg.kind() == "fvsbn" {
            // Away from its zero init, so that pixels depend on each other.
            let w = GmRng::new(3).randn((6, 6), &Device::Cpu).unwrap();
            vm.data().lock().unwrap()["linear.weight"].set(&w).unwrap();
        }
        let chi2 = sample_chi_square(m.as_ref(), &x, 5);
        // 63 degrees of freedom: the 0.1% critical value is 103.4.
        assert!(chi2 < 103.4, "{}: chi-square {chi2}", cfg.kind());
    }
}

/// The masked convolution `conv` (with parameters in `vm`, f64) by its parts equals the weight
/// times the mask: the output and the gradients of the input, weight and bias agree to 1e-12 on
/// a random input `x_shape` and output `y_shape`.
fn assert_by_parts_equals_masked(
    conv: &gm_models::pixelcnn::MaskedConv2d,
    vm: &VarMap,
    x_shape: (usize, usize, usize, usize),
    y_shape: (usize, usize, usize, usize),
    rng: &mut GmRng,
    what: &str,
) {
    let dev = Device::Cpu;
    let x = rng
        .randn(x_shape, &dev)
        .and_then(|x| Var::from_tensor(&x.to_dtype(DType::F64)?))
        .unwrap();
    let r = rng
        .randn(y_shape, &dev)
        .and_then(|r| r.to_dtype(DType::F64))
        .unwrap();
    let run = |by_mask: bool| {
        let y = if by_mask {
            conv.forward_act_by_mask(&x, gm_core::kernels::ops::Act::Relu)
        } else {
            conv.forward_act(&x, gm_core::kernels::ops::Act::Relu)
        }
        .unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y, grads.get(&x).unwrap().clone()];
        let mut names: Vec<_> = vm.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        for n in names {
            let v = vm.data().lock().unwrap()[&n].clone();
            out.push(grads.get(&v).unwrap().clone());
        }
        out
    };
    let (parts, masked) = (run(false), run(true));
    assert_eq!(parts.len(), 4, "output, dx, dweight, dbias");
    for (i, (a, b)) in parts.iter().zip(&masked).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-12, "{what}: tensor {i} differs by {d}");
    }
}

/// The masked convolution computed as two convolutions of its unmasked taps equals the weight
/// multiplied by the mask: output and the gradients of the input, weight and bias, in f64, for
/// masks A and B and kernels 1 to 7 on a non-square input (batch 2, 3 → 4 channels).
#[test]
fn masked_conv_by_parts_equals_masked_weight() {
    use gm_models::pixelcnn::MaskedConv2d;
    let mut rng = GmRng::new(5);
    for (k, t) in [
        (1, MaskType::B),
        (3, MaskType::A),
        (3, MaskType::B),
        (5, MaskType::B),
        (7, MaskType::A),
    ] {
        let vm = VarMap::new();
        let vb = gm_core::rng::seeded_var_builder(&vm, 3, DType::F64, &Device::Cpu);
        let conv = MaskedConv2d::new(3, 4, k, t, vb).unwrap();
        let what = format!("k = {k}, {t:?}");
        assert_by_parts_equals_masked(&conv, &vm, (2, 3, 6, 9), (2, 4, 6, 9), &mut rng, &what);
    }
}

/// The colour models' configs: PixelCNN and Gated PixelCNN on `shape` (C colour channels).
fn colour_models(shape: [usize; 3], output: PixelOutput) -> [ModelConfig; 2] {
    [
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            channels: 12,
            head_channels: 12,
            output,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            channels: 12,
            head_channels: 12,
            output,
            ..Default::default()
        }),
    ]
}

/// With colour channels the likelihood stays exact and normalised: `Σ p = 1` over all 4,096
/// binary RGB 2×2 images, and over all 65,536 two-channel 1×1 pixels of 256 levels each (the
/// second channel's 256-way softmax conditioned on the first's level at the same pixel).
#[test]
fn colour_models_sum_to_one() {
    let x = all_binary([3, 2, 2]);
    for cfg in colour_models([3, 2, 2], PixelOutput::Bernoulli) {
        let (_vm, m) = build(&cfg, 14);
        let s = total_probability(m.as_ref(), &x, None);
        assert!((s - 1.0).abs() < 1e-4, "{} RGB: Σ p = {s}", cfg.kind());
    }
    let v: Vec<f32> = (0..65536u32)
        .flat_map(|k| [(k % 256) as f32 / 255.0, (k / 256) as f32 / 255.0])
        .collect();
    let x = Tensor::from_vec(v, (65536, 2, 1, 1), &Device::Cpu).unwrap();
    for cfg in colour_models([2, 1, 1], PixelOutput::Categorical) {
        let (_vm, m) = build(&cfg, 15);
        let s = total_probability(m.as_ref(), &x, None);
        assert!((s - 1.0).abs() < 1e-3, "{} 2 levels: Σ p = {s}", cfg.kind());
        // The second channel reads the first: its conditional p(c₂ | c₁) moves with c₁ — the
        // total variation between c₁ = 0 and c₁ = 255 (8e-4 and 2e-3 here) is far above round-off.
        let p: Vec<f64> = nll(m.as_ref(), &x, None)
            .iter()
            .map(|l| (-l).exp())
            .collect();
        let cond = |c1: usize| -> Vec<f64> {
            let row: Vec<f64> = (0..256).map(|c2| p[c2 * 256 + c1]).collect();
            let z: f64 = row.iter().sum();
            row.iter().map(|v| v / z).collect()
        };
        let (a, b) = (cond(0), cond(255));
        let tv: f64 = a.iter().zip(&b).map(|(u, v)| (u - v).abs()).sum::<f64>() / 2.0;
        assert!(
            tv > 1e-4,
            "{}: channel 2 ignores channel 1 (TV {tv})",
            cfg.kind()
        );
    }
}

/// Causality over pixels and colours (the PixelCNN paper's RGB masks): the logits of colour `c`
/// at pixel `(i, j)` of an RGB 8×8 image depend on no later pixel, nor on colours `≥ c` of the
/// same pixel, and do depend on each earlier colour of the same pixel; the gated net still sees
/// every earlier pixel of its window in every colour. (The nets are wide enough that no colour
/// group's ReLUs are all dead on the four test images, which would hide a dependence.)
#[test]
fn colour_models_are_causal_over_pixels_and_channels() {
    let shape = [3, 8, 8];
    let (h, w) = (8, 8);
    let plane = h * w;
    let order: Vec<usize> = (0..plane)
        .flat_map(|p| (0..3).map(move |c| c * plane + p))
        .collect();
    let plain = PixelCnn::new(
        PixelCnnConfig {
            image_shape: shape,
            channels: 24,
            head_channels: 24,
            ..Default::default()
        },
        vb(7),
    )
    .unwrap();
    let gated = GatedPixelCnn::new(
        GatedPixelCnnConfig {
            image_shape: shape,
            channels: 24,
            head_channels: 24,
            ..Default::default()
        },
        vb(8),
    )
    .unwrap();
    let (i, j) = (4, 3);
    for c in 0..3 {
        let d = c * plane + i * w + j;
        let t = order.iter().position(|&o| o == d).unwrap();
        let gp = input_sensitivity(|x| plain.logits(x, None).unwrap(), shape, d);
        let gg = input_sensitivity(|x| gated.logits(x, None).unwrap(), shape, d);
        for (name, g) in [("pixelcnn", &gp), ("gated-pixelcnn", &gg)] {
            assert_causal(&format!("{name} colour {c}"), g, &order, t);
            for earlier in 0..c {
                assert!(
                    g[earlier * plane + i * w + j] > 0.0,
                    "{name}: colour {c} does not read colour {earlier} of its own pixel"
                );
            }
        }
        // Gated: every earlier pixel of rows i−3…i, columns j±3, in every colour.
        let missed: Vec<usize> = (i - 3..=i)
            .flat_map(|r| (j.saturating_sub(3)..(j + 4).min(w)).map(move |q| r * w + q))
            .filter(|&p| p < i * w + j)
            .flat_map(|p| (0..3).map(move |k| k * plane + p))
            .filter(|&q| gg[q] == 0.0)
            .collect();
        assert!(
            missed.is_empty(),
            "gated colour {c}: {missed:?} never reach it"
        );
    }
}

/// The colour sampler draws from the model's own distribution — pixel by pixel, colour by
/// colour: over the 64 binary RGB 1×2 images, 6,000 draws match p(x) (chi-square below its 0.1%
/// critical value), for both nets.
#[test]
fn colour_samples_follow_the_models_probabilities() {
    let shape = [3, 1, 2];
    let x = all_binary(shape);
    for cfg in colour_models(shape, PixelOutput::Bernoulli) {
        let (_vm, m) = build(&cfg, 22);
        let chi2 = sample_chi_square(m.as_ref(), &x, 6);
        assert!(chi2 < 103.4, "{}: chi-square {chi2}", cfg.kind());
    }
}

/// With colour groups the masked convolution by parts (above rows, centre row left of the
/// centre, the colour-masked centre tap) equals the weight times the full mask, in f64: output
/// and every gradient, masks A and B, 3 colour groups over 6 → 9 channels.
#[test]
fn colour_masked_conv_by_parts_equals_masked_weight() {
    use gm_models::pixelcnn::{channel_mask, MaskedConv2d};
    // Colour o reads colour i < o (A) or ≤ o (B); channel i has colour i % 3.
    let a = channel_mask(4, 3, 3, MaskType::A);
    assert_eq!(a, [0., 0., 0., 1., 0., 0., 1., 1., 0., 0., 0., 0.]);
    let b = channel_mask(2, 4, 3, MaskType::B);
    assert_eq!(b, [1., 0., 0., 1., 1., 1., 0., 1.]);
    let mut rng = GmRng::new(6);
    for (k, t) in [(1, MaskType::B), (3, MaskType::A), (5, MaskType::B)] {
        let vm = VarMap::new();
        let vb = gm_core::rng::seeded_var_builder(&vm, 4, DType::F64, &Device::Cpu);
        let conv = MaskedConv2d::with_groups(6, 9, k, t, 3, vb).unwrap();
        let what = format!("3 colours, k = {k}, {t:?}");
        assert_by_parts_equals_masked(&conv, &vm, (2, 6, 5, 7), (2, 9, 5, 7), &mut rng, &what);
    }
}

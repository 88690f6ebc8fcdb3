//! VQ-VAE: the straight-through estimator, the codebook's moving-average step against its
//! closed form, the bound against the exact likelihood where it can be enumerated, and the
//! K-way prior as a distribution over code grids.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gm_core::GmRng;
use gm_models::vqvae::{ema_step, straight_through, Stage, VqVae, VqVaeConfig};
use gm_models::{Batch, EvalOptions, Model};

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn build(cfg: VqVaeConfig, seed: u64) -> (VarMap, VqVae) {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, seed, DType::F64, &Device::Cpu);
    let m = VqVae::new(cfg, vb).unwrap();
    (vm, m)
}

fn tiny(image: usize, k: usize) -> VqVaeConfig {
    let mut cfg = VqVaeConfig {
        image_shape: [1, image, image],
        hidden: 6,
        res_blocks: 1,
        embedding_dim: 3,
        codebook_size: k,
        stage: Stage::Prior,
        ..Default::default()
    };
    cfg.prior.code_embedding = 4;
    cfg.prior.channels = 6;
    cfg.prior.layers = 2;
    cfg.prior.first_kernel = 3;
    cfg.prior.head_channels = 5;
    cfg
}

/// The decoder sees `z_q`; the encoder receives the decoder's gradient unchanged.
#[test]
fn straight_through_passes_the_gradient_unchanged() {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(1);
    let z_e = Var::from_tensor(
        &rng.randn((2, 3, 2, 2), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    )
    .unwrap();
    let z_q = rng
        .randn((2, 3, 2, 2), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let w = rng
        .randn((2, 3, 2, 2), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let st = straight_through(z_e.as_tensor(), &z_q).unwrap();
    assert_eq!(vals(&st), vals(&z_q));
    let loss = (&st * &w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    assert_eq!(vals(g.get(z_e.as_tensor()).unwrap()), vals(&w));
}

/// `N ← γN + (1−γ)n`, `m ← γm + (1−γ)Σz`, `e = m/N̂` on a hand-made batch; then a dead code
/// restarts at the worst-quantised output.
#[test]
fn the_moving_average_step_is_its_closed_form() {
    let dev = Device::Cpu;
    let t = |v: &[f64], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
    let count = t(&[1.0, 1.0], &[2]);
    let sum = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
    let z = t(&[2.0, 0.0, 0.0, 4.0, 1.0, 1.0], &[3, 2]);
    let codes = Tensor::new(&[0u32, 1, 0], &dev).unwrap();
    let err = t(&[0.5, 0.1, 3.0], &[3]);
    let eps = 1e-5;
    let s = ema_step(&count, &sum, &z, &codes, &err, [0.5, eps, 0.0]).unwrap();
    // n = [2, 1], Σz = [[3, 1], [0, 4]].
    let n = [1.5, 1.0];
    let m = [[2.0, 0.5], [0.0, 2.5]];
    let total: f64 = n.iter().sum();
    let nh: Vec<f64> = n
        .iter()
        .map(|c| (c + eps) / (total + 2.0 * eps) * total)
        .collect();
    assert_eq!(vals(&s.count), n.to_vec());
    assert_eq!(vals(&s.sum), m.concat());
    let want: Vec<f64> = (0..4).map(|i| m[i / 2][i % 2] / nh[i / 2]).collect();
    for (a, b) in vals(&s.codebook).iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    assert_eq!(s.restarted, 0);
    // Threshold 1.2: code 1 (count 1.0) restarts at z_2 = [1, 1], the largest error.
    let s = ema_step(&count, &sum, &z, &codes, &err, [0.5, eps, 1.2]).unwrap();
    assert_eq!(s.restarted, 1);
    assert_eq!(vals(&s.count)[1], 1.0);
    assert_eq!(&vals(&s.codebook)[2..], &[1.0, 1.0]);
    assert_eq!(&vals(&s.sum)[2..], &[1.0, 1.0]);
}

/// On a 1×1 code grid `p(x) = Σ_k p(x | e_k) p(k)` is a sum of `K` terms: the reported bound is
/// never below `−log p(x)`, and equals it plus `−log p(z_q | x)` (the true posterior of the
/// chosen code).
#[test]
fn the_bound_is_above_the_enumerated_likelihood() {
    let k = 4;
    let (_vm, m) = build(tiny(4, k), 3);
    let dev = Device::Cpu;
    let mut rng = GmRng::new(5);
    let x = rng
        .uniform((8, 1, 4, 4), 0.0, 1.0, &dev)
        .unwrap()
        .ge(0.5)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let batch = Batch {
        x: x.clone(),
        labels: None,
    };
    let opts = EvalOptions {
        iwae_k: 1,
        max_pairs: 0,
        full: true,
    };
    let metrics = m.eval_metrics(&batch, &mut rng, &opts).unwrap();
    let bound = vals(&metrics.iter().find(|(n, _)| n == "bound_nats").unwrap().1);
    // log p(x | e_j) + log p(j) for every code j.
    let mut joint = vec![vec![0.0; k]; 8];
    #[allow(clippy::needless_range_loop)]
    for j in 0..k {
        let codes = Tensor::new(&[j as u32; 8], &dev).unwrap();
        let logits = m.decode(&m.lookup(&codes, 8).unwrap()).unwrap();
        let lp = gm_core::dist::Bernoulli::new(logits.reshape((8, ())).unwrap())
            .log_prob(&x.reshape((8, ())).unwrap())
            .unwrap();
        let prior = m.prior_nll(&codes, 8).unwrap();
        for (i, (a, b)) in vals(&lp).iter().zip(vals(&prior)).enumerate() {
            joint[i][j] = a - b;
        }
    }
    let (codes, _, _) = m.quantize(&m.encode(&x).unwrap()).unwrap();
    let codes: Vec<u32> = codes.to_vec1().unwrap();
    for i in 0..8 {
        let mx = joint[i].iter().cloned().fold(f64::MIN, f64::max);
        let log_px = mx + joint[i].iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        let chosen = joint[i][codes[i] as usize];
        assert!(
            bound[i] >= -log_px - 1e-9,
            "image {i}: bound {} < {}",
            bound[i],
            -log_px
        );
        // bound = −log p(x, z_q) = −log p(x) − log p(z_q | x).
        assert!((bound[i] - (-chosen)).abs() < 1e-9, "image {i}");
    }
}

/// The K-way prior is a distribution: over all 3⁴ code grids of a 2×2 grid, Σ p = 1.
#[test]
fn the_prior_sums_to_one_over_every_code_grid() {
    let k = 3;
    let (_vm, m) = build(tiny(8, k), 7);
    let n = k.pow(4);
    let codes: Vec<u32> = (0..n)
        .flat_map(|g| (0..4).map(move |p| ((g / k.pow(p as u32)) % k) as u32))
        .collect();
    let codes = Tensor::new(codes.as_slice(), &Device::Cpu).unwrap();
    let nll = vals(&m.prior_nll(&codes, n).unwrap());
    let total: f64 = nll.iter().map(|v| (-v).exp()).sum();
    assert!((total - 1.0).abs() < 1e-10, "Σ p = {total}");
}

/// The codebook's update reaches the model through `after_step_update` in stage one only.
#[test]
fn stage_one_updates_the_codebook_and_stage_two_does_not() {
    let dev = Device::Cpu;
    let x = GmRng::new(9)
        .uniform((4, 1, 8, 8), 0.0, 1.0, &dev)
        .unwrap()
        .ge(0.5)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let batch = Batch { x, labels: None };
    let (_vm, m) = build(tiny(8, 5), 8);
    assert!(m.after_step_update(&batch).unwrap().is_none());
    let mut cfg = tiny(8, 5);
    cfg.stage = Stage::Autoencoder;
    let (_vm, m) = build(cfg, 8);
    let up = m.after_step_update(&batch).unwrap().unwrap();
    let names: Vec<&str> = up.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "quantizer.ema_count",
            "quantizer.ema_sum",
            "quantizer.codebook"
        ]
    );
    // 4 images × 2×2 positions assigned: the counts move from 5 × 1 towards them.
    let count: f64 = vals(&up[0].1).iter().sum();
    assert!((count - (0.99 * 5.0 + 0.01 * 16.0)).abs() < 1e-9, "{count}");
}

//! The text model: causality over tokens, its receptive field, and top-k / temperature sampling.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use gm_core::GmRng;
use gm_models::text::{sample_top_k, TextAr, TextArConfig};

fn model() -> TextAr {
    let cfg = TextArConfig {
        vocab_size: 300,
        context: 40,
        channels: 8,
        layers: 3,
        kernel: 3,
        dilation_cycle: 3,
    };
    let vb = gm_core::rng::seeded_var_builder(&VarMap::new(), 3, DType::F32, &Device::Cpu);
    TextAr::new(cfg, vb).unwrap()
}

/// Changing token `s` leaves every logit before `s` bit-identical, changes the logits at `s`,
/// and stops mattering beyond the receptive field (`1 + 2·(1 + 2 + 4) = 15` tokens).
#[test]
fn logits_are_causal_with_the_stated_receptive_field() {
    let m = model();
    assert_eq!(m.config().receptive_field(), 15);
    let t = 40;
    let mut rng = GmRng::new(0);
    let base: Vec<u32> = (0..t).map(|_| (rng.next_u64() % 300) as u32).collect();
    let logits = |v: &[u32]| {
        m.logits(&Tensor::from_slice(v, (1, t), &Device::Cpu).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .t()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let l0 = logits(&base);
    let s = 10;
    let mut changed = base.clone();
    changed[s] = (changed[s] + 1) % 300;
    let l1 = logits(&changed);
    for p in 0..s {
        assert_eq!(l0[p], l1[p], "position {p} depends on the later token {s}");
    }
    for p in s..s + 15 {
        assert_ne!(
            l0[p], l1[p],
            "position {p} ignores token {s} inside its field"
        );
    }
    for p in s + 15..t {
        assert_eq!(l0[p], l1[p], "position {p} sees token {s} beyond its field");
    }
}

#[test]
fn top_k_and_temperature() {
    let logits = [0.0, 2.0, 1.0, -1.0];
    let mut rng = GmRng::new(1);
    for _ in 0..50 {
        assert_eq!(sample_top_k(&logits, 1.0, 1, &mut rng), 1);
        assert!(matches!(sample_top_k(&logits, 1.0, 2, &mut rng), 1 | 2));
    }
    // Frequencies follow softmax(logits / T).
    let temp = 2.0;
    let n = 40_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sample_top_k(&logits, temp, 0, &mut rng) as usize] += 1;
    }
    let z: f64 = logits.iter().map(|l| (l / temp).exp()).sum();
    for (i, c) in counts.iter().enumerate() {
        let p = (logits[i] / temp).exp() / z;
        let f = *c as f64 / n as f64;
        assert!((f - p).abs() < 0.01, "token {i}: frequency {f} vs {p}");
    }
    let prompt = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
    let out = model().generate(&prompt, 5, 0.7, 10, &mut rng).unwrap();
    assert_eq!(out.dims(), &[2, 8]);
    assert_eq!(
        out.narrow(1, 0, 3).unwrap().to_vec2::<u32>().unwrap(),
        prompt.to_vec2::<u32>().unwrap()
    );
    assert!(model().generate(&prompt, 1, 0.0, 0, &mut rng).is_err());
}

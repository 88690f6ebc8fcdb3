//! 2-D Gaussian data and the short Adam run the density tests train their models with, and the
//! tensor comparison most test files use. (Each test binary uses a part of it.)
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use candle_nn::{Optimizer, VarMap};
use gm_core::GmRng;
use gm_models::{Batch, Model};

/// The data: `N(MU, diag(VAR))`.
pub const MU: [f64; 2] = [1.0, -0.5];
pub const VAR: [f64; 2] = [0.5, 0.2];

/// `n` draws of the data as `[2, 1, 1]` vectors.
pub fn gaussian_data(n: usize, rng: &mut GmRng) -> Tensor {
    let z = rng.randn((n, 2), &Device::Cpu).unwrap();
    let s = Tensor::new(&[VAR[0].sqrt() as f32, VAR[1].sqrt() as f32], &Device::Cpu).unwrap();
    let m = Tensor::new(&[MU[0] as f32, MU[1] as f32], &Device::Cpu).unwrap();
    z.broadcast_mul(&s)
        .unwrap()
        .broadcast_add(&m)
        .unwrap()
        .reshape((n, 2, 1, 1))
        .unwrap()
}

/// The data's entropy in nats.
pub fn entropy() -> f64 {
    VAR.iter()
        .map(|v| 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E * v).ln())
        .sum()
}

/// Trains `model` (parameters in `vm`) for `steps` of batch 256 with Adam, the learning rate
/// 3e-3 decayed linearly to 0 (noisy objectives otherwise leave the weights jittering). Returns
/// the first and last 50-step mean losses and the generator, for the test's own draws after.
pub fn train_on_gaussian(vm: &VarMap, model: &dyn Model, steps: usize) -> (f64, f64, GmRng) {
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = GmRng::new(1);
    let mut losses = Vec::new();
    for i in 0..steps {
        opt.set_learning_rate(3e-3 * (1.0 - i as f64 / steps as f64));
        let batch = Batch {
            x: gaussian_data(256, &mut rng),
            labels: None,
        };
        let l = model.loss(&batch, &mut rng).unwrap().total;
        losses.push(l.to_scalar::<f32>().unwrap() as f64);
        opt.backward_step(&l).unwrap();
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&losses[..50]), mean(&losses[steps - 50..]), rng)
}

/// `max |a − b|` over all elements, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

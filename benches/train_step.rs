//! Criterion: the train step (loss, backward, Adam) of each model preset, and the VAE's IWAE
//! evaluation, on the CPU. `RAYON_NUM_THREADS=1 cargo bench` pins the thread count.

use criterion::{criterion_group, criterion_main, Criterion};
use gm::candle::{DType, Device};
use gm::candle_nn::{VarBuilder, VarMap};
use gm::optim::{named_vars, Adam, AdamConfig};
use gm::{Batch, EvalOptions, GmRng, RunConfig};
use std::path::Path;

fn preset(name: &str) -> RunConfig {
    RunConfig::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name),
        &[],
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    gm::keep_freed_memory();
    let dev = Device::Cpu;
    for name in [
        "vae-mnist.toml",
        "vae-conv-mnist.toml",
        "classifier-mnist.toml",
    ] {
        let cfg = preset(name);
        let vm = VarMap::new();
        let model = cfg
            .model
            .build(VarBuilder::from_varmap(&vm, DType::F32, &dev))
            .unwrap();
        let mut opt = Adam::new(named_vars(&vm), AdamConfig::from(&cfg.train)).unwrap();
        let mut rng = GmRng::new(0);
        let b = cfg.train.batch_size;
        let p = rng.uniform((b, 1, 28, 28), 0.0, 1.0, &dev).unwrap();
        let y = gm::candle::Tensor::from_vec(
            (0..b as u32).map(|i| i % 10).collect::<Vec<_>>(),
            b,
            &dev,
        )
        .unwrap();
        let batch = Batch {
            x: rng.bernoulli(&p).unwrap(),
            labels: Some(y),
        };
        c.bench_function(&format!("train_step/{name}/batch{b}"), |bench| {
            bench.iter(|| {
                let l = model.loss(&batch, &mut rng).unwrap();
                let g = l.total.backward().unwrap();
                opt.step(&g, 1e-3).unwrap();
            })
        });
        if name == "vae-mnist.toml" {
            let small = Batch {
                x: batch.x.narrow(0, 0, 10).unwrap(),
                labels: None,
            };
            let opts = EvalOptions {
                iwae_k: 1000,
                max_pairs: 50_000,
                full: true,
            };
            c.bench_function("iwae_1000/vae-mnist/10_images", |bench| {
                bench.iter(|| model.eval_metrics(&small, &mut rng, &opts).unwrap())
            });
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);

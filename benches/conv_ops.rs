//! Criterion: forward and forward + backward of the single-convolution cases of
//! `gm bench --ops` (the shapes gm's models use), with gm's kernels (`gm::conv`) and candle's own,
//! batch 128 on the CPU. `RAYON_NUM_THREADS=1 cargo bench --bench conv_ops` pins the thread count.

use criterion::{criterion_group, criterion_main, Criterion};
use gm::candle::{Device, Var};
use gm::opbench::{conv, Backend, CASES};
use gm::GmRng;

fn bench(c: &mut Criterion) {
    gm::keep_freed_memory();
    let dev = Device::Cpu;
    let mut rng = GmRng::new(0);
    let mut g = c.benchmark_group("conv_ops");
    g.sample_size(10);
    for case in CASES.iter().filter(|c| c.mode == "fwdbwd") {
        let x = Var::from_tensor(
            &rng.randn((128, case.c_in, case.size, case.size), &dev)
                .unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&(rng.randn(case.weight_shape(), &dev).unwrap() * 0.1).unwrap())
            .unwrap();
        let name = case.name.trim_end_matches("_fwdbwd");
        for (label, backend) in [("gm", Backend::Gm), ("candle", Backend::Candle)] {
            g.bench_function(format!("{name}/fwd/{label}"), |b| {
                b.iter(|| conv(backend, &x, &w, case).unwrap())
            });
            g.bench_function(format!("{name}/fwdbwd/{label}"), |b| {
                b.iter(|| {
                    let y = conv(backend, &x, &w, case).unwrap();
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

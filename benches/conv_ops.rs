//! Criterion: forward and forward + backward of the convolution shapes gm's models use, with
//! gm's kernels (`gm::conv`) and candle's own, batch 128 on the CPU.
//! `RAYON_NUM_THREADS=1 cargo bench --bench conv_ops` pins the thread count.

use criterion::{criterion_group, criterion_main, Criterion};
use gm::candle::{Device, Tensor, Var};
use gm::conv::{conv2d, conv_transpose2d, Conv2dParams};
use gm::GmRng;

/// (name, transposed, C_in, C_out, size, kernel, stride, padding)
type Shape = (&'static str, bool, usize, usize, usize, usize, usize, usize);
const SHAPES: &[Shape] = &[
    ("conv_1-32_3x3_28", false, 1, 32, 28, 3, 1, 1),
    ("conv_32-64_3x3_28", false, 32, 64, 28, 3, 1, 1),
    ("conv_32-64_k4s2p1_14", false, 32, 64, 14, 4, 2, 1),
    ("convT_64-32_k4s2p1_7", true, 64, 32, 7, 4, 2, 1),
    ("convT_64-32_k4s2p1_14", true, 64, 32, 14, 4, 2, 1),
];

fn run(gm: bool, t: bool, x: &Tensor, w: &Tensor, s: usize, p: usize) -> Tensor {
    let params = Conv2dParams::default().stride(s).padding(p);
    match (gm, t) {
        (true, false) => conv2d(x, w, params),
        (true, true) => conv_transpose2d(x, w, params, [0, 0]),
        (false, false) => x.conv2d(w, p, s, 1, 1),
        (false, true) => x.conv_transpose2d(w, p, 0, s, 1),
    }
    .unwrap()
}

fn bench(c: &mut Criterion) {
    gm::keep_freed_memory();
    let dev = Device::Cpu;
    let mut rng = GmRng::new(0);
    let mut g = c.benchmark_group("conv_ops");
    g.sample_size(10);
    for &(name, t, ci, co, size, k, s, p) in SHAPES {
        let x = Var::from_tensor(&rng.randn((128, ci, size, size), &dev).unwrap()).unwrap();
        let wshape = if t { (ci, co, k, k) } else { (co, ci, k, k) };
        let w = Var::from_tensor(&(rng.randn(wshape, &dev).unwrap() * 0.1).unwrap()).unwrap();
        for (label, gm) in [("gm", true), ("candle", false)] {
            g.bench_function(format!("{name}/fwd/{label}"), |b| {
                b.iter(|| run(gm, t, x.as_tensor(), w.as_tensor(), s, p))
            });
            g.bench_function(format!("{name}/fwdbwd/{label}"), |b| {
                b.iter(|| {
                    let y = run(gm, t, x.as_tensor(), w.as_tensor(), s, p);
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

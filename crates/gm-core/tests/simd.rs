//! The element-wise kernels compiled for each vector width ([`gm_core::kernels::simd`]) give the
//! same bits: every op forward and backward and Adam's update, f32 and f64, at every width this CPU runs, against
//! the baseline (SSE2) copy. Lengths that leave remainders after every vector width, and enough
//! elements for several parallel tasks.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gm_core::kernels::adam;
use gm_core::kernels::norm::{batch_norm, group_norm};
use gm_core::kernels::ops::{self, bias_act, Act};
use gm_core::kernels::simd::{self, Isa};
use gm_core::GmRng;

/// Every output and input gradient of each op, flattened to bits.
fn run_all(dtype: DType) -> Result<Vec<(String, Vec<u64>)>> {
    let dev = Device::Cpu;
    let mut rng = GmRng::new(7);
    let mut out = Vec::new();
    let mut push = |name: &str, t: &Tensor| -> Result<()> {
        let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        out.push((name.to_string(), v.iter().map(|x| x.to_bits()).collect()));
        Ok(())
    };
    for shape in [vec![3usize, 6, 5, 7], vec![4, 64, 13, 11], vec![37, 10]] {
        let s = shape.as_slice();
        // Spread wide, so the transcendental tails and the ReLU masks are exercised.
        let x = Var::from_tensor(&(rng.randn(s, &dev)? * 6.0)?.to_dtype(dtype)?)?;
        let w = rng.randn(s, &dev)?.to_dtype(dtype)?;
        let c = shape[1];
        let gamma = Var::from_tensor(&(rng.randn(c, &dev)? + 1.0)?.to_dtype(dtype)?)?;
        let beta = Var::from_tensor(&rng.randn(c, &dev)?.to_dtype(dtype)?)?;
        let mut unary: Vec<(&str, Tensor)> = vec![
            ("softplus", ops::softplus(&x)?),
            ("sigmoid", ops::sigmoid(&x)?),
            ("gated_tanh", ops::gated_tanh(&x)?),
            ("bias_leaky", bias_act(&x, &beta, Act::LeakyRelu(0.2))?),
            ("batch_norm", batch_norm(&x, &gamma, &beta, 1e-5, false)?.0),
            (
                "batch_norm_relu",
                batch_norm(&x, &gamma, &beta, 1e-5, true)?.0,
            ),
            (
                "channel_affine",
                ops::channel_affine(&x, &gamma, Some(&beta))?,
            ),
        ];
        if shape.len() == 4 {
            for silu in [false, true] {
                let y = group_norm(&x, &gamma, &beta, 2, 1e-5, silu)?;
                unary.push((
                    if silu {
                        "group_norm_silu"
                    } else {
                        "group_norm"
                    },
                    y,
                ));
            }
        }
        for (name, y) in unary {
            let name = format!("{name} {shape:?}");
            push(&format!("{name} y"), &y)?;
            let w = if y.dims() == w.dims() {
                w.clone()
            } else {
                w.narrow(1, 0, y.dim(1)?)?
            };
            let grads = (y * w)?.sum_all()?.backward()?;
            push(&format!("{name} dx"), grads.get(&x).expect("dx"))?;
            for (p, pn) in [(&gamma, "dgamma"), (&beta, "dbeta")] {
                if let Some(g) = grads.get(p) {
                    push(&format!("{name} {pn}"), g)?;
                }
            }
        }
        // Adam's in-place passes over the weights `w`, from moments `x` and `x²`.
        let (p, m, v) = (w.copy()?, x.as_tensor().copy()?, x.sqr()?);
        adam::update_moment(&m, &w, 0.9, false)?;
        adam::update_moment(&v, &w, 0.999, true)?;
        let step = adam::AdamStep {
            lr: 1e-3,
            bc1: 0.1,
            bc2: 0.001,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        adam::apply(&p, &m, &v, step)?;
        for (t, what) in [(&m, "m"), (&v, "v"), (&p, "p")] {
            push(&format!("adam {shape:?} {what}"), t)?;
        }
    }
    Ok(out)
}

#[test]
fn every_width_gives_the_baseline_bits() -> Result<()> {
    let widths: Vec<Isa> = [Isa::Baseline, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|w| *w <= simd::supported())
        .collect();
    for w in [Isa::Avx2, Isa::Avx512] {
        if w > simd::supported() {
            eprintln!(
                "SKIPPED: this CPU has no {}: its copies of the element-wise loops are not run here",
                w.name()
            );
        }
    }
    // One test in this binary, since the width is process-wide.
    simd::set_chosen(Isa::Avx512);
    assert_eq!(simd::chosen(), simd::supported(), "capped at the CPU");
    for dtype in [DType::F32, DType::F64] {
        simd::set_chosen(Isa::Baseline);
        let base = run_all(dtype)?;
        for &w in &widths[1..] {
            simd::set_chosen(w);
            assert_eq!(simd::chosen(), w);
            let got = run_all(dtype)?;
            for ((name, b), (_, g)) in base.iter().zip(&got) {
                let diff = b.iter().zip(g).filter(|(x, y)| x != y).count();
                assert_eq!(diff, 0, "{dtype:?} {name}: {diff} values differ at {w:?}");
            }
        }
        eprintln!(
            "simd: {dtype:?} ops compared bit for bit at {:?}",
            widths.iter().map(|w| w.name()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

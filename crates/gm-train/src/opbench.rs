//! Timing of the convolution shapes gm's models use, with gm's ops and with candle's own kernels,
//! so the two (and PyTorch, through `scripts/bench_vs_torch.py`) can be compared side by side.
//! `gm bench --ops` prints one JSON line per case.

use crate::optim::{Adam, AdamConfig};
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use gm_core::kernels::conv::{conv2d, conv_transpose2d, Conv2dParams};
use gm_core::GmRng;
use serde::Serialize;
use std::time::Instant;

/// Which implementation runs the convolutions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `gm_core::kernels::conv` (gm's own CPU kernels: AVX2 register tiles for f32 on x86-64, im2col /
    /// col2im + gemm otherwise).
    Gm,
    /// candle's `Tensor::conv2d` / `conv_transpose2d`.
    Candle,
}

/// One benchmarked workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OpCase {
    /// Stable name, shared with the PyTorch side of `scripts/bench_vs_torch.py`.
    pub name: &'static str,
    /// `conv` or `transpose`.
    pub op: &'static str,
    pub c_in: usize,
    pub c_out: usize,
    /// Input height = width.
    pub size: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    /// `fwd` (forward only), `fwdbwd` (forward, backward of the sum), `train` (the two-layer
    /// 3×3 stack `conv → ReLU → conv`, backward, and an AdamW update).
    pub mode: &'static str,
}

/// The cases: the two-layer stack and transposed conv of `../CANDLE-NOTES`-style measurements and
/// every layer of the conv VAE.
pub const CASES: &[OpCase] = &[
    OpCase {
        name: "stack_1-32-64_3x3_28_fwd",
        op: "conv",
        c_in: 1,
        c_out: 64,
        size: 28,
        kernel: 3,
        stride: 1,
        padding: 1,
        mode: "fwd",
    },
    OpCase {
        name: "stack_1-32-64_3x3_28_train",
        op: "conv",
        c_in: 1,
        c_out: 64,
        size: 28,
        kernel: 3,
        stride: 1,
        padding: 1,
        mode: "train",
    },
    OpCase {
        name: "conv_32-64_3x3_28_fwdbwd",
        op: "conv",
        c_in: 32,
        c_out: 64,
        size: 28,
        kernel: 3,
        stride: 1,
        padding: 1,
        mode: "fwdbwd",
    },
    OpCase {
        name: "convT_64-32_k4s2p1_14_fwdbwd",
        op: "transpose",
        c_in: 64,
        c_out: 32,
        size: 14,
        kernel: 4,
        stride: 2,
        padding: 1,
        mode: "fwdbwd",
    },
    OpCase {
        name: "conv_1-32_k4s2p1_28_fwdbwd",
        op: "conv",
        c_in: 1,
        c_out: 32,
        size: 28,
        kernel: 4,
        stride: 2,
        padding: 1,
        mode: "fwdbwd",
    },
    OpCase {
        name: "conv_32-64_k4s2p1_14_fwdbwd",
        op: "conv",
        c_in: 32,
        c_out: 64,
        size: 14,
        kernel: 4,
        stride: 2,
        padding: 1,
        mode: "fwdbwd",
    },
    OpCase {
        name: "convT_64-32_k4s2p1_7_fwdbwd",
        op: "transpose",
        c_in: 64,
        c_out: 32,
        size: 7,
        kernel: 4,
        stride: 2,
        padding: 1,
        mode: "fwdbwd",
    },
    OpCase {
        name: "convT_32-1_k4s2p1_14_fwdbwd",
        op: "transpose",
        c_in: 32,
        c_out: 1,
        size: 14,
        kernel: 4,
        stride: 2,
        padding: 1,
        mode: "fwdbwd",
    },
];

/// Which gradients a `fwdbwd` case computes: both (the case as named), only the input's (the
/// data gradient), only the weight's (the filter gradient), or none (the forward alone). Timing
/// all four separates the directions: e.g. data ≈ `input` − `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Grads {
    Both,
    Input,
    Weight,
    None,
}

/// Result of one case on one backend.
#[derive(Clone, Debug, Serialize)]
pub struct OpReport {
    #[serde(flatten)]
    pub case: OpCase,
    pub backend: Backend,
    /// The gradients computed (`fwdbwd` cases; `both` otherwise).
    pub grads: Grads,
    pub batch: usize,
    pub threads: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    /// Floating-point operations of the convolutions in one call (multiply-add = 2).
    pub flop: f64,
    /// `flop / median`, in GFLOP/s.
    pub gflops: f64,
}

fn conv_flop(c_in: usize, c_out: usize, out: usize, k: usize, batch: usize) -> f64 {
    2.0 * (batch * c_out * out * out * c_in * k * k) as f64
}

impl OpCase {
    /// The weight of a single-convolution case, in PyTorch's layout for its op.
    pub fn weight_shape(&self) -> (usize, usize, usize, usize) {
        let (i, o, k) = (self.c_in, self.c_out, self.kernel);
        if self.op == "conv" {
            (o, i, k, k)
        } else {
            (i, o, k, k)
        }
    }

    fn out_size(&self) -> usize {
        match self.op {
            "conv" => (self.size + 2 * self.padding - self.kernel) / self.stride + 1,
            _ => (self.size - 1) * self.stride + self.kernel - 2 * self.padding,
        }
    }

    /// FLOPs of one call. In `train`, the first layer's data gradient is not needed (its input
    /// is the image batch) and not counted; gm and PyTorch both skip it. In `fwdbwd` the input is
    /// a variable, so forward, data and filter gradients count once each.
    pub fn flop(&self, batch: usize) -> f64 {
        if self.mode == "fwd" || self.mode == "train" {
            let l1 = conv_flop(self.c_in, 32, self.size, 3, batch);
            let l2 = conv_flop(32, self.c_out, self.size, 3, batch);
            return if self.mode == "fwd" {
                l1 + l2
            } else {
                2.0 * l1 + 3.0 * l2
            };
        }
        // A transposed conv costs what the conv it is the adjoint of costs.
        let f = match self.op {
            "conv" => conv_flop(self.c_in, self.c_out, self.out_size(), self.kernel, batch),
            _ => conv_flop(self.c_out, self.c_in, self.size, self.kernel, batch),
        };
        3.0 * f
    }

    /// FLOPs of one call of a `fwdbwd` case computing only `grads`.
    pub fn flop_with(&self, batch: usize, grads: Grads) -> f64 {
        let f = self.flop(batch);
        if self.mode != "fwdbwd" {
            return f;
        }
        match grads {
            Grads::Both => f,
            Grads::Input | Grads::Weight => f * 2.0 / 3.0,
            Grads::None => f / 3.0,
        }
    }
}

/// The case's convolution (`c.op`, kernel, stride, padding) of `x` by `w` on `backend`.
pub fn conv(backend: Backend, x: &Tensor, w: &Tensor, c: &OpCase) -> candle_core::Result<Tensor> {
    let p = Conv2dParams::default().stride(c.stride).padding(c.padding);
    match (backend, c.op) {
        (Backend::Gm, "conv") => conv2d(x, w, p),
        (Backend::Gm, _) => conv_transpose2d(x, w, p, [0, 0]),
        (Backend::Candle, "conv") => x.conv2d(w, c.padding, c.stride, 1, 1),
        (Backend::Candle, _) => x.conv_transpose2d(w, c.padding, 0, c.stride, 1),
    }
}

/// Times one case: `warmup` untimed calls, then the median of `steps`; `grads` selects the
/// gradients of a `fwdbwd` case (other cases ignore it).
#[allow(clippy::too_many_arguments)]
pub fn run_case(
    c: &OpCase,
    backend: Backend,
    grads: Grads,
    batch: usize,
    warmup: usize,
    steps: usize,
    dev: &Device,
) -> Result<OpReport> {
    let mut rng = GmRng::new(0);
    let x = rng.randn((batch, c.c_in, c.size, c.size), dev)?;
    let mut step: Box<dyn FnMut() -> Result<()>> = match c.mode {
        "fwd" | "train" => {
            let s3 = OpCase {
                kernel: 3,
                stride: 1,
                padding: 1,
                op: "conv",
                ..*c
            };
            let w1 = Var::from_tensor(&(rng.randn((32, c.c_in, 3, 3), dev)? * 0.1)?)?;
            let w2 = Var::from_tensor(&(rng.randn((c.c_out, 32, 3, 3), dev)? * 0.05)?)?;
            let mut opt = Adam::new(
                vec![("w1".into(), w1.clone()), ("w2".into(), w2.clone())],
                AdamConfig {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                },
            )?;
            let train = c.mode == "train";
            Box::new(move || {
                let h = conv(backend, &x, &w1, &s3)?.relu()?;
                let y = conv(backend, &h, &w2, &s3)?;
                if train {
                    let grads = y.sqr()?.mean_all()?.backward()?;
                    opt.step(&grads, 1e-3)?;
                } else {
                    y.device().synchronize()?;
                }
                Ok(())
            })
        }
        _ => {
            let w = (rng.randn(c.weight_shape(), dev)? * 0.1)?;
            // A variable where its gradient is asked for, a constant otherwise.
            let var = |t: &Tensor, on: bool| -> Result<Tensor> {
                Ok(if on {
                    Var::from_tensor(t)?.as_tensor().clone()
                } else {
                    t.clone()
                })
            };
            let xv = var(&x, matches!(grads, Grads::Both | Grads::Input))?;
            let wv = var(&w, matches!(grads, Grads::Both | Grads::Weight))?;
            Box::new(move || {
                let y = conv(backend, &xv, &wv, c)?;
                if grads == Grads::None {
                    return Ok(y.device().synchronize()?);
                }
                let g = y.sum_all()?.backward()?;
                let any = g.get(&wv).or_else(|| g.get(&xv)).expect("a gradient");
                any.device().synchronize()?;
                Ok(())
            })
        }
    };
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        step()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median_ms = times[times.len() / 2];
    let flop = c.flop_with(batch, grads);
    Ok(OpReport {
        case: *c,
        backend,
        grads: if c.mode == "fwdbwd" {
            grads
        } else {
            Grads::Both
        },
        batch,
        threads: gm_core::kernels::par::threads(),
        median_ms,
        min_ms: times[0],
        flop,
        gflops: flop / median_ms / 1e6,
    })
}

//! Fused element-wise ops for the CPU hot paths: `act(x + bias[c])` in one pass forward and one
//! pass backward, where candle would run a broadcast add, an activation, and in the backward a
//! strided reduction over the batch and spatial axes (the slowest part of a small conv net's step
//! on the CPU). On CUDA and Metal they fall back to candle's ops.
//!
//! The activations are piecewise linear, so their second derivative is zero almost everywhere;
//! the backward is itself built from differentiable ops, which keeps gradients of gradients
//! (WGAN-GP) correct through these layers.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gm_core::kernels::ops::{bias_act, Act};
//! let x = Tensor::new(&[[-1f32, 2.0], [3.0, -4.0]], &Device::Cpu)?; // (N = 2, C = 2)
//! let b = Tensor::new(&[0.5f32, 1.0], &Device::Cpu)?;
//! let y = bias_act(&x, &b, Act::Relu)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.0, 3.0], vec![3.5, 0.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::kernels::cpu::{lane_sum, lane_sum2, Transcendental};
use crate::kernels::for_grad;
use std::mem::MaybeUninit;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};

/// A piecewise-linear activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Identity,
    Relu,
    /// `x` for `x > 0`, `slope · x` otherwise.
    LeakyRelu(f64),
}

impl Act {
    /// candle's ops, for devices without gm's kernels.
    fn candle(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Identity => Ok(x.clone()),
            Act::Relu => x.relu(),
            Act::LeakyRelu(a) => {
                let neg = x.minimum(0.0)?;
                x.maximum(0.0)? + (neg * a)?
            }
        }
    }
}

/// `(outer, C, inner)` of a tensor whose dimension 1 is the channel axis.
pub(crate) fn channel_dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        bail!("bias_act: input of shape {d:?} has no channel axis (dimension 1)")
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// `y = act(x + bias[c])`.
struct BiasAct(Act);
/// `dx = dy ⊙ act'(·)`, the slope read from the forward output `y`.
struct ActGrad(Act);
/// `Σ` over every axis but the channel axis (1).
struct ChannelSum;

/// Elements per parallel task of the element-wise kernels.
const PAR_CHUNK: usize = 1 << 15;

fn leaky_slope<T: WithDType>(act: Act) -> T {
    match act {
        Act::LeakyRelu(a) => T::from_f64(a),
        _ => T::zero(),
    }
}

/// Calls `run` with the activation as a closure (and its slope where `x ≤ 0`), chosen once so
/// that the element loops in `run` are monomorphised per activation and vectorise.
macro_rules! with_act {
    ($act:expr, $T:ty, |$f:ident| $run:expr) => {{
        let slope = leaky_slope::<$T>($act);
        match $act {
            Act::Identity => {
                let $f = |v: $T| v;
                $run
            }
            Act::Relu => {
                let $f = |v: $T| if v > <$T>::zero() { v } else { <$T>::zero() };
                $run
            }
            Act::LeakyRelu(_) => {
                let $f = move |v: $T| if v > <$T>::zero() { v } else { v * slope };
                $run
            }
        }
    }};
}

fn bias_act_kernel<T: WithDType>(
    act: Act,
    x: &[T],
    b: &[T],
    dims: (usize, usize, usize),
) -> Vec<T> {
    with_act!(act, T, |f| channel_map(x, b, b, dims, |v, bias, _| f(
        v + bias
    )))
}

/// `y = f(x, a[channel], b[channel])` with two per-channel vectors.
#[allow(unsafe_code)]
pub(crate) fn channel_map<T: WithDType>(
    x: &[T],
    a: &[T],
    b: &[T],
    (_, c, inner): (usize, usize, usize),
    f: impl Fn(T, T, T) -> T + Sync + Send,
) -> Vec<T> {
    // (N, C) is N rows of C features, each taking the whole vectors; (N, C, …) is N·C rows of
    // `inner` elements sharing one channel's values. Tasks take whole rows.
    let (row, per_channel) = if inner <= 1 {
        (c.max(1), false)
    } else {
        (inner, true)
    };
    let rows_per_task = PAR_CHUNK.div_ceil(row);
    // SAFETY: every task writes each element of its chunk (whole rows, zipped with x's).
    unsafe {
        crate::kernels::cpu::par_written(x.len(), rows_per_task * row, |t, ys| {
            let row0 = t * rows_per_task;
            channel_rows(row0, ys, &x[row0 * row..], (a, b), row, per_channel, &f)
        })
    }
}

crate::simd_fn! {
    /// [`channel_map`]'s whole rows of `row` elements, the first being row `row0`.
    fn channel_rows<T: WithDType>(
        row0: usize,
        ys: &mut [MaybeUninit<T>],
        x: &[T],
        ab: (&[T], &[T]),
        row: usize,
        per_channel: bool,
        f: &impl Fn(T, T, T) -> T,
    ) {
        let (a, b) = ab;
        let c = a.len();
        for (r, (yr, xr)) in ys.chunks_mut(row).zip(x.chunks(row)).enumerate() {
            if per_channel {
                let k = (row0 + r) % c;
                let (ak, bk) = (a[k], b[k]);
                for (o, v) in yr.iter_mut().zip(xr) {
                    o.write(f(*v, ak, bk));
                }
            } else {
                for (((o, v), ak), bk) in yr.iter_mut().zip(xr).zip(a).zip(b) {
                    o.write(f(*v, *ak, *bk));
                }
            }
        }
    }
}

fn act_grad_kernel<T: WithDType>(act: Act, dy: &[T], y: &[T]) -> Vec<T> {
    // The slope where y ≤ 0.
    let neg = match act {
        Act::Identity => T::one(),
        _ => leaky_slope::<T>(act),
    };
    // The slope is selected, then multiplied: branch-free, so the loop vectorises.
    par_map2(dy, y, move |g, y| {
        g * if y > T::zero() { T::one() } else { neg }
    })
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "gm-bias-act"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(l1.shape())?;
        let act = self.0;
        let out = crate::float2!("gm-bias-act", s1, l1, s2, l2, |x, b| bias_act_kernel(
            act, x, b, dims
        ));
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (y, dy) = (&for_grad(y), &for_grad(dy));
        let dx = match self.0 {
            Act::Identity => dy.clone(),
            act => dy.contiguous()?.apply_op2(y, ActGrad(act))?,
        };
        let db = b
            .track_op()
            .then(|| dx.contiguous()?.apply_op1(ChannelSum))
            .transpose()?;
        Ok((x.track_op().then_some(dx), db))
    }
}

impl CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "gm-act-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        let out = crate::float2!("gm-act-grad", s1, l1, s2, l2, |dy, y| act_grad_kernel(
            act, dy, y
        ));
        Ok((out, l1.shape().clone()))
    }
    /// Linear in `dy` with a piecewise-constant slope: no gradient flows to `y`.
    fn bwd(
        &self,
        _dy: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // `act'` is piecewise constant: its derivative with respect to `y` is zero (almost
        // everywhere). Returning it (rather than nothing) matters for gradients of gradients:
        // candle expects every tracked input of a node to receive a gradient.
        let (y, g) = (&for_grad(y), &for_grad(g));
        Ok((
            Some(g.contiguous()?.apply_op2(y, ActGrad(self.0))?),
            Some(y.zeros_like()?),
        ))
    }
}

crate::simd_fn! {
    /// `Σ` of `x` `(N, C, inner)` over every axis but 1.
    fn channel_sum_kernel<T: WithDType>(x: &[T], dims: (usize, usize, usize)) -> Vec<T> {
        let (_, c, inner) = dims;
        let mut acc = vec![0f64; c];
        if inner <= 1 {
            // (N, C): sum the rows.
            for row in x.chunks_exact(c.max(1)) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v.to_f64();
                }
            }
            return acc.into_iter().map(T::from_f64).collect();
        }
        for (i, chunk) in x.chunks_exact(inner.max(1)).enumerate() {
            acc[i % c] += lane_sum(chunk, |v| v);
        }
        acc.into_iter().map(T::from_f64).collect()
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "gm-channel-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(l.shape())?;
        let out = crate::float1!("gm-channel-sum", s, l, |x| channel_sum_kernel(x, dims));
        Ok((out, Shape::from(dims.1)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = for_grad(g);
        let mut shape = vec![1; x.rank()];
        shape[1] = x.dim(1)?;
        Ok(Some(g.reshape(shape)?.broadcast_as(x.shape())?))
    }
}

/// `y = act(x)`.
struct ActOp(Act);

fn act_kernel<T: WithDType>(act: Act, x: &[T]) -> Vec<T> {
    with_act!(act, T, |f| par_map(x, f))
}

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "gm-act"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        let out = crate::float1!("gm-act", s, l, |x| act_kernel(act, x));
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (y, dy) = (&for_grad(y), &for_grad(dy));
        Ok(Some(dy.contiguous()?.apply_op2(y, ActGrad(self.0))?))
    }
}

/// `act(x)` element-wise in one pass, its backward one pass `dy ⊙ act'` read from the output;
/// differentiable to any order. candle's `relu` backward compares `x` with a tensor of zeros on
/// one thread and multiplies by the mask (an eighth of the PixelCNN's step). candle's ops off the
/// CPU.
pub fn act(x: &Tensor, act: Act) -> Result<Tensor> {
    if act == Act::Identity {
        return Ok(x.clone());
    }
    if !native_float(x) {
        return act.candle(x);
    }
    x.contiguous()?.apply_op1(ActOp(act))
}

/// `act(x + bias)` with `bias` along dimension 1 (channels of `(N, C, H, W)`, features of
/// `(N, C)`), in one pass; its backward is one pass for `dx` and one for `dbias`.
///
/// # Shapes
/// - `x`: `(N, C, ...)`; `bias`: `(C,)`; returns the shape of `x`.
pub fn bias_act(x: &Tensor, bias: &Tensor, act: Act) -> Result<Tensor> {
    let (_, c, _) = channel_dims(x.shape())?;
    if bias.dims() != [c] {
        bail!("bias_act: bias of shape {:?} for {c} channels", bias.dims())
    }
    if !crate::native_kernels(x.device())
        || !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        let mut shape = vec![1; x.rank()];
        shape[1] = c;
        return act.candle(&x.broadcast_add(&bias.reshape(shape)?)?);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasAct(act))
}

/// `Σ` over every dimension but 1: `(N, C, ...) → (C,)`, one contiguous pass on the CPU.
pub fn channel_sum(x: &Tensor) -> Result<Tensor> {
    let (_, c, _) = channel_dims(x.shape())?;
    if !crate::native_kernels(x.device()) {
        let mut t = x.transpose(0, 1)?.contiguous()?;
        t = t.reshape((c, ()))?;
        return t.sum(1);
    }
    x.contiguous()?.apply_op1(ChannelSum)
}

/// `(C,)` → a contiguous tensor of `shape` with `out[n, c, …] = v[c]`; its backward is
/// [`channel_sum`].
struct ChannelBroadcast(Shape);

fn channel_broadcast_kernel<T: WithDType>(
    v: &[T],
    (outer, c, inner): (usize, usize, usize),
) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * c * inner);
    for _ in 0..outer {
        for &x in &v[..c] {
            out.extend(std::iter::repeat_n(x, inner));
        }
    }
    out
}

impl CustomOp1 for ChannelBroadcast {
    fn name(&self) -> &'static str {
        "gm-channel-broadcast"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(&self.0)?;
        let out = crate::float1!("gm-channel-broadcast", s, l, |v| channel_broadcast_kernel(
            v, dims
        ));
        Ok((out, self.0.clone()))
    }
    fn bwd(&self, _v: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(channel_sum(&for_grad(g))?))
    }
}

/// A per-channel vector `v` — `(C,)`, or any shape with `C` elements such as `(1, C, 1, 1)` —
/// materialised over `shape` (`(N, C, …)`): `out[n, c, …] = v[c]`. Multiplying or adding the
/// result element-wise is candle's `broadcast_mul`/`broadcast_add` with a fast backward: the
/// gradient of `v` is one contiguous [`channel_sum`] instead of candle's strided reduction over
/// the batch and spatial axes. Returns `v`'s shape-compatible broadcast on other devices.
pub fn channel_broadcast<S: Into<Shape>>(v: &Tensor, shape: S) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let (_, c, _) = channel_dims(&shape)?;
    if v.elem_count() != c {
        bail!(
            "channel_broadcast: {} values for {c} channels of {:?}",
            v.elem_count(),
            shape.dims()
        )
    }
    let mut per_channel = vec![1; shape.rank()];
    per_channel[1] = c;
    if !crate::native_kernels(v.device())
        || !matches!(v.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        return v.reshape(per_channel)?.broadcast_as(shape)?.contiguous();
    }
    v.flatten_all()?
        .contiguous()?
        .apply_op1(ChannelBroadcast(shape))
}

/// `y = tanh(a) ⊙ σ(b)` for `x = [a; b]` split along dimension 1.
struct Gate;
/// `dx = [dy ⊙ σ(b)(1 − tanh²a); dy ⊙ tanh(a) σ(b)(1 − σ(b))]` from `x` and `dy`.
struct GateGrad;

/// Runs `f(k, a_row, b_row, out_rows)` over the rows `k = n·C + c` of a gated tensor in parallel;
/// each `k` owns `OUT_ROWS` consecutive output rows.
fn gate_rows<T: WithDType, const OUT_ROWS: usize>(
    x: &[T],
    (outer, c2, inner): (usize, usize, usize),
    f: impl Fn(usize, &[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let c = c2 / 2;
    let inner = inner.max(1);
    let row = OUT_ROWS * inner;
    let mut out = vec![T::zero(); outer * c * row];
    let rows_per_task = PAR_CHUNK.div_ceil(row);
    crate::kernels::par::chunks_mut(&mut out, rows_per_task * row, |t, chunk| {
        for (r, o) in chunk.chunks_mut(row).enumerate() {
            let k = t * rows_per_task + r;
            let (n, ch) = (k / c, k % c);
            let a = &x[(n * c2 + ch) * inner..][..inner];
            let b = &x[(n * c2 + c + ch) * inner..][..inner];
            f(k, a, b, o);
        }
    });
    out
}

fn gate_kernel<T: Transcendental>(x: &[T], dims: (usize, usize, usize)) -> Vec<T> {
    // `(N, 2C)` is `(N, 2, C)`: image `n`'s halves are then one row each, contiguous runs of C
    // that the loop below vectorises, instead of 2C rows of one value.
    let (outer, c2, inner) = dims;
    let dims = if inner <= 1 { (outer, 2, c2 / 2) } else { dims };
    gate_rows::<T, 1>(x, dims, |_, a, b, o| gate_row(a, b, o))
}

crate::simd_fn! {
    /// `o = tanh(a) ⊙ σ(b)`.
    fn gate_row<T: Transcendental>(a: &[T], b: &[T], o: &mut [T]) {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a.tanh_() * b.sigmoid();
        }
    }
}

/// `dx` of shape `(N, 2C, inner)`, one parallel task per image: its first half is `da`, its
/// second `db`.
fn gate_grad_kernel<T: Transcendental>(x: &[T], dy: &[T], dims: (usize, usize, usize)) -> Vec<T> {
    let (outer, c2, inner) = dims;
    let half = c2 / 2 * inner.max(1);
    let mut dx = vec![T::zero(); outer * 2 * half];
    crate::kernels::par::chunks_mut(&mut dx, 2 * half, |n, out| {
        let (da, db) = out.split_at_mut(half);
        let xa = &x[n * 2 * half..][..half];
        let xb = &x[n * 2 * half + half..][..half];
        let g = &dy[n * half..][..half];
        gate_grad_row(xa, xb, g, da, db);
    });
    dx
}

crate::simd_fn! {
    /// `da`, `db` of one image from its halves `xa`, `xb` and `dy`.
    fn gate_grad_row<T: Transcendental>(
        xa: &[T],
        xb: &[T],
        g: &[T],
        da: &mut [T],
        db: &mut [T],
    ) {
        let one = T::one();
        let n = da.len();
        let (xa, xb, g, db) = (&xa[..n], &xb[..n], &g[..n], &mut db[..n]);
        for i in 0..n {
            let (t, s) = (xa[i].tanh_(), xb[i].sigmoid());
            da[i] = g[i] * s * (one - t * t);
            db[i] = g[i] * t * s * (one - s);
        }
    }
}

impl CustomOp1 for Gate {
    fn name(&self) -> &'static str {
        "gm-gate"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(l.shape())?;
        let out = crate::float1!("gm-gate", s, l, |x| gate_kernel(x, dims));
        let mut shape = l.shape().dims().to_vec();
        shape[1] /= 2;
        Ok((out, Shape::from(shape)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (for_grad(x), for_grad(g));
        Ok(Some(x.apply_op2(&g.contiguous()?, GateGrad)?))
    }
}

impl CustomOp2 for GateGrad {
    fn name(&self) -> &'static str {
        "gm-gate-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(l1.shape())?;
        let out = crate::float2!("gm-gate-grad", s1, l1, s2, l2, |x, dy| gate_grad_kernel(
            x, dy, dims
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// The gated activation of WaveNet and the Gated PixelCNN, `tanh(a) ⊙ σ(b)` where `x = [a; b]`
/// is split in two halves along dimension 1: one pass forward and one backward on the CPU
/// (candle's ops elsewhere). First-order only: its backward is not itself differentiable.
///
/// # Shapes
/// - `x`: `(N, 2C, ...)`; returns `(N, C, ...)`.
pub fn gated_tanh(x: &Tensor) -> Result<Tensor> {
    let (_, c2, _) = channel_dims(x.shape())?;
    if c2 % 2 != 0 {
        bail!("gated_tanh: {c2} channels cannot be split in two halves")
    }
    if !crate::native_kernels(x.device())
        || !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        let c = c2 / 2;
        return x.narrow(1, 0, c)?.tanh()? * candle_nn::ops::sigmoid(&x.narrow(1, c, c)?)?;
    }
    x.contiguous()?.apply_op1(Gate)
}

/// A per-element function of the fused loops. Closures are one (LLVM inlines the small ones into
/// each vector width's copy of a loop); the transcendental ones are unit types whose
/// `#[inline(always)]` bodies always inline, which a closure or a function item calling them
/// does not at their size.
pub(crate) trait Elem<T>: Sync {
    fn f(&self, x: T) -> T;
}

impl<T, F: Fn(T) -> T + Sync> Elem<T> for F {
    #[inline(always)]
    fn f(&self, x: T) -> T {
        self(x)
    }
}

/// [`Elem`] of two operands.
pub(crate) trait Elem2<T>: Sync {
    fn f(&self, a: T, b: T) -> T;
}

impl<T, F: Fn(T, T) -> T + Sync> Elem2<T> for F {
    #[inline(always)]
    fn f(&self, a: T, b: T) -> T {
        self(a, b)
    }
}

/// `ln(1 + eˣ)` as an [`Elem`].
struct SoftplusFn;
impl<T: Transcendental> Elem<T> for SoftplusFn {
    #[inline(always)]
    fn f(&self, x: T) -> T {
        x.softplus()
    }
}

/// `σ(x)` as an [`Elem`].
struct SigmoidFn;
impl<T: Transcendental> Elem<T> for SigmoidFn {
    #[inline(always)]
    fn f(&self, x: T) -> T {
        x.sigmoid()
    }
}

/// `dy ⊙ σ(x)` as an [`Elem2`] of `(x, dy)`.
struct SoftplusGradFn;
impl<T: Transcendental> Elem2<T> for SoftplusGradFn {
    #[inline(always)]
    fn f(&self, x: T, dy: T) -> T {
        dy * x.sigmoid()
    }
}

/// `f(x[i])` for every element, spread over the thread pool.
#[allow(unsafe_code)]
fn par_map<T: WithDType>(x: &[T], f: impl Elem<T>) -> Vec<T> {
    // SAFETY: every task writes each element of its chunk.
    unsafe {
        crate::kernels::cpu::par_written(x.len(), PAR_CHUNK, |t, out| {
            map_into(out, &x[t * PAR_CHUNK..], &f)
        })
    }
}

crate::simd_fn! {
    /// `out[i] = f(x[i])` over `out`'s length.
    fn map_into<T: WithDType>(out: &mut [MaybeUninit<T>], x: &[T], f: &impl Elem<T>) {
        for (o, v) in out.iter_mut().zip(x) {
            o.write(f.f(*v));
        }
    }
}

/// `f(a[i], b[i])` for every element, spread over the thread pool.
#[allow(unsafe_code)]
fn par_map2<T: WithDType>(a: &[T], b: &[T], f: impl Elem2<T>) -> Vec<T> {
    // SAFETY: every task writes each element of its chunk.
    unsafe {
        crate::kernels::cpu::par_written(a.len(), PAR_CHUNK, |t, out| {
            map2_into(out, &a[t * PAR_CHUNK..], &b[t * PAR_CHUNK..], &f)
        })
    }
}

crate::simd_fn! {
    /// `out[i] = f(a[i], b[i])` over `out`'s length.
    fn map2_into<T: WithDType>(
        out: &mut [MaybeUninit<T>],
        a: &[T],
        b: &[T],
        f: &impl Elem2<T>,
    ) {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            o.write(f.f(*a, *b));
        }
    }
}

/// `y = ln(1 + eˣ)`.
struct Softplus;
/// `dx = dy ⊙ σ(x)`.
struct SoftplusGrad;
/// `y = σ(x)`.
struct Sigmoid;
/// `dx = dy ⊙ y(1 − y)`, from the forward output `y`.
struct SigmoidGrad;

impl CustomOp1 for Softplus {
    fn name(&self) -> &'static str {
        "gm-softplus"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = crate::float1!("gm-softplus", s, l, |x| par_map(x, SoftplusFn));
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if crate::kernels::second_order() {
            // Differentiable: gradients of this gradient go through σ's own backward.
            return Ok(Some((g * sigmoid(x)?)?));
        }
        let (x, g) = (for_grad(x), for_grad(g));
        Ok(Some(x.apply_op2(&g.contiguous()?, SoftplusGrad)?))
    }
}

impl CustomOp2 for SoftplusGrad {
    fn name(&self) -> &'static str {
        "gm-softplus-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = crate::float2!("gm-softplus-grad", s1, l1, s2, l2, |x, dy| par_map2(
            x,
            dy,
            SoftplusGradFn
        ));
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp1 for Sigmoid {
    fn name(&self) -> &'static str {
        "gm-sigmoid"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = crate::float1!("gm-sigmoid", s, l, |x| par_map(x, SigmoidFn));
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if crate::kernels::second_order() {
            // `y` is this op's output, so the product stays differentiable in `x`.
            return Ok(Some((g * (y * y.affine(-1.0, 1.0)?)?)?));
        }
        let (y, g) = (for_grad(y), for_grad(g));
        Ok(Some(y.apply_op2(&g.contiguous()?, SigmoidGrad)?))
    }
}

impl CustomOp2 for SigmoidGrad {
    fn name(&self) -> &'static str {
        "gm-sigmoid-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = crate::float2!("gm-sigmoid-grad", s1, l1, s2, l2, |y, dy| {
            sigmoid_grad_kernel(y, dy)
        });
        Ok((out, l1.shape().clone()))
    }
}

fn sigmoid_grad_kernel<T: WithDType>(y: &[T], dy: &[T]) -> Vec<T> {
    par_map2(y, dy, |y, g| g * (y * (T::one() - y)))
}

/// Whether `x` takes gm's element-wise kernels (f32 or f64 on the CPU's native path).
pub(crate) fn native_float(x: &Tensor) -> bool {
    crate::native_kernels(x.device())
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// `ln(1 + eˣ)`, computed stably as `max(x, 0) + ln(1 + e^{−|x|})`: one pass forward and one
/// backward (`dy ⊙ σ(x)`) on the CPU, with f32's `exp` and `ln` as vectorised polynomials
/// (relative error below 3e-7); candle's ops elsewhere. Its backward is differentiable when
/// second-order gradients are on (candle's `CANDLE_GRAD_DO_NOT_DETACH`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-100f64, 0.0, 3.0], &Device::Cpu)?;
/// let y = gm_core::kernels::ops::softplus(&x)?.to_vec1::<f64>()?;
/// assert!((y[1] - 2f64.ln()).abs() < 1e-15 && (y[2] - 3.0485873515737420).abs() < 1e-15);
/// assert!(y[0] > 0.0 && y[0] < 1e-43);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    if !native_float(x) {
        return x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    }
    x.contiguous()?.apply_op1(Softplus)
}

/// `σ(x) = 1 / (1 + e^{−x})`: one pass forward and one backward (`dy ⊙ y(1 − y)`, from the
/// output) on the CPU, f32's `exp` a vectorised polynomial (relative error below 3e-7);
/// candle's op elsewhere. Differentiable twice when second-order gradients are on.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    if !native_float(x) {
        return candle_nn::ops::sigmoid(x);
    }
    x.contiguous()?.apply_op1(Sigmoid)
}

/// `y = x ⊙ scale[c] + shift[c]`.
struct ChannelAffine;
/// `Σ` of `a ⊙ b` over every axis but the channel axis (1).
struct ChannelDot;

/// `x ⊙ scale[c] + shift[c]` over the rows of `(N, C, inner)` (or `(N, C)`, rows of C).
fn channel_affine_kernel<T: WithDType>(
    x: &[T],
    scale: &[T],
    shift: &[T],
    dims: (usize, usize, usize),
) -> Vec<T> {
    channel_map(x, scale, shift, dims, |v, a, b| v * a + b)
}

crate::simd_fn! {
    /// `Σ` of `a ⊙ b` `(N, C, inner)` over every axis but 1.
    fn channel_dot_kernel<T: WithDType>(a: &[T], b: &[T], dims: (usize, usize, usize)) -> Vec<T> {
        let (_, c, inner) = dims;
        let mut acc = vec![0f64; c];
        if inner <= 1 {
            for (ra, rb) in a.chunks_exact(c.max(1)).zip(b.chunks_exact(c.max(1))) {
                for ((s, x), y) in acc.iter_mut().zip(ra).zip(rb) {
                    *s += (*x * *y).to_f64();
                }
            }
        } else {
            for (i, (ra, rb)) in a.chunks_exact(inner).zip(b.chunks_exact(inner)).enumerate() {
                acc[i % c] += lane_sum2(ra, rb, |x, y| x * y);
            }
        }
        acc.into_iter().map(T::from_f64).collect()
    }
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "gm-channel-affine"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(l1.shape())?;
        let out = crate::float3!(self.name(), s1, l1, s2, l2, s3, l3, |x, a, b| {
            channel_affine_kernel(x, a, b, dims)
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only reached with second-order gradients off (`channel_affine` takes candle's ops
        // otherwise), so the gradients are computed from detached operands by gm's kernels.
        let dy = dy.detach().contiguous()?;
        let dx = x
            .track_op()
            .then(|| {
                let s = scale.detach();
                dy.apply_op3(&s, &s.zeros_like()?, ChannelAffine)
            })
            .transpose()?;
        let ds = scale
            .track_op()
            .then(|| dy.apply_op2(&x.detach(), ChannelDot))
            .transpose()?;
        let db = shift.track_op().then(|| channel_sum(&dy)).transpose()?;
        Ok((dx, ds, db))
    }
}

impl CustomOp2 for ChannelDot {
    fn name(&self) -> &'static str {
        "gm-channel-dot"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(l1.shape())?;
        let out = crate::float2!("gm-channel-dot", s1, l1, s2, l2, |a, b| channel_dot_kernel(
            a, b, dims
        ));
        Ok((out, Shape::from(dims.1)))
    }
}

/// `x ⊙ scale[c] + shift[c]` with per-channel `scale` and `shift` (`C` values each, any shape
/// such as `(C,)` or `(1, C, 1, 1)`; no shift when `None`), in one pass; its backward is one pass
/// for `dx` and one contiguous reduction each for `scale` and `shift`. With second-order
/// gradients on, and off the CPU, it is candle's ops over [`channel_broadcast`]s.
///
/// # Shapes
/// - `x`: `(N, C, ...)`; returns the shape of `x`.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
    let shape = x.shape();
    let (_, c, _) = channel_dims(shape)?;
    for (what, v) in [("scale", Some(scale)), ("shift", shift)] {
        if let Some(v) = v.filter(|v| v.elem_count() != c) {
            bail!(
                "channel_affine: {} {what} values for {c} channels",
                v.elem_count()
            )
        }
    }
    if !native_float(x) || crate::kernels::second_order() {
        let y = (x * channel_broadcast(scale, shape)?)?;
        return match shift {
            Some(b) => y + channel_broadcast(b, shape)?,
            None => Ok(y),
        };
    }
    let scale = scale.flatten_all()?.contiguous()?;
    let shift = match shift {
        Some(b) => b.flatten_all()?.contiguous()?,
        None => scale.zeros_like()?,
    };
    x.contiguous()?.apply_op3(&scale, &shift, ChannelAffine)
}

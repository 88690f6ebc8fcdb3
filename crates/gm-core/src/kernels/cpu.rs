//! Helpers shared by gm's CPU custom ops.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

/// The elements of a contiguous CPU operand (`what` names the op in the error).
pub(crate) fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: operand must be contiguous"),
    }
}

/// Evaluates `$body` with `$a` bound to the operand as an f32 or f64 slice, wrapping the
/// resulting `Vec` back into a `CpuStorage` of the same dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! float1 {
    ($name:expr, $s:expr, $l:expr, |$a:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        match $s {
            CpuStorage::F32(_) => {
                let $a = $crate::kernels::cpu::slice::<f32>($s, $l, $name)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                let $a = $crate::kernels::cpu::slice::<f64>($s, $l, $name)?;
                CpuStorage::F64($body)
            }
            s => candle_core::bail!("{}: f32 or f64, got {:?}", $name, s.dtype()),
        }
    }};
}

/// Evaluates `$body` with `$a`, `$b` bound to the two operands as f32 or f64 slices, wrapping the
/// resulting `Vec` back into a `CpuStorage` of the same dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! float2 {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, |$a:ident, $b:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let $a = $crate::kernels::cpu::slice::<f32>($s1, $l1, $name)?;
                let $b = $crate::kernels::cpu::slice::<f32>($s2, $l2, $name)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let $a = $crate::kernels::cpu::slice::<f64>($s1, $l1, $name)?;
                let $b = $crate::kernels::cpu::slice::<f64>($s2, $l2, $name)?;
                CpuStorage::F64($body)
            }
            (a, b) => candle_core::bail!(
                "{}: CPU kernels take f32 or f64 operands of one dtype, got {:?} and {:?}",
                $name,
                a.dtype(),
                b.dtype()
            ),
        }
    }};
}

/// Evaluates `$body` with `$a`, `$b`, `$c` bound to the three operands as f32 or f64 slices,
/// wrapping the resulting `Vec` back into a `CpuStorage` of the same dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! float3 {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr, |$a:ident, $b:ident, $c:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let $a = $crate::kernels::cpu::slice::<f32>($s1, $l1, $name)?;
                let $b = $crate::kernels::cpu::slice::<f32>($s2, $l2, $name)?;
                let $c = $crate::kernels::cpu::slice::<f32>($s3, $l3, $name)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let $a = $crate::kernels::cpu::slice::<f64>($s1, $l1, $name)?;
                let $b = $crate::kernels::cpu::slice::<f64>($s2, $l2, $name)?;
                let $c = $crate::kernels::cpu::slice::<f64>($s3, $l3, $name)?;
                CpuStorage::F64($body)
            }
            (a, _, _) => candle_core::bail!(
                "{}: f32 or f64 operands of one dtype, got {:?}",
                $name,
                a.dtype()
            ),
        }
    }};
}

/// `eˣ` in f32 without a libm call, so that loops over slices vectorise: Cody–Waite range
/// reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, Cephes' degree-7 polynomial for `eʳ`, and `2ⁿ`
/// built in the exponent bits. Relative error below 2e-7 on `[−87, 88]`; clamps outside.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    // `n` sits in the low mantissa bits of `shifted` (|n| ≤ 127 ≪ 2²²): integer arithmetic on
    // the bits builds 2ⁿ, where a float-to-int cast (saturating in Rust) would not vectorise.
    let two_n = (shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32 + 127) << 23;
    er * f32::from_bits(two_n as u32)
}

/// `ln x` in f32 without a libm call, for positive normal `x`, so that loops over slices
/// vectorise: `x = 2ᵉ·m` with `m ∈ [√½, √2)`, and Cephes' `logf` polynomial for `ln m` with the
/// exponent's `ln 2` split in two (Cody–Waite). Relative error below 2e-7 (tested on `[1e-30,
/// 1e30]`).
#[inline(always)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    let bits = x.to_bits();
    // m ∈ [½, 1) and x = 2^e · m.
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let low = m < std::f32::consts::FRAC_1_SQRT_2;
    let f = if low { m + m - 1.0 } else { m - 1.0 };
    let e = (if low { e - 1 } else { e }) as f32;
    let z = f * f;
    // Horner's rule over Cephes' coefficients, highest degree first.
    let p = [
        -1.151_461_e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ]
    .iter()
    .fold(7.037_683_6e-2f32, |acc, &c| acc * f + c);
    let y = f * z * p - 2.121_944_4e-4 * e - 0.5 * z;
    f + y + 0.693_359_4 * e
}

/// `ln(1 + e^{−|x|})`, the tail of the softplus `max(x, 0) + ln(1 + e^{−|x|})`, in f32 without a
/// libm call. `ln(u)·t/(u − 1)` with `u = 1 + t` is exact to rounding where `1 + t` rounds (the
/// `log1p` trick), so the tail keeps its relative precision where `t` is far below 1 — where
/// `ln(1 + t)` computed plainly is 0.
#[inline(always)]
pub(crate) fn softplus_tail_f32(x: f32) -> f32 {
    let t = exp_f32(-x.abs());
    let u = 1.0 + t;
    let d = u - 1.0;
    if d == 0.0 {
        t
    } else {
        ln_f32(u) * (t / d)
    }
}

/// `Σᵢ f(a[i])` with eight accumulators of `T` inside blocks of 512 elements, so the loop
/// vectorises instead of waiting on one chain of additions, and the blocks added in f64, so long
/// sums keep their precision.
#[inline(always)]
pub(crate) fn lane_sum<T: WithDType>(a: &[T], f: impl Fn(T) -> T) -> f64 {
    lane_sum2(a, a, |x, _| f(x))
}

/// `Σᵢ f(a[i], b[i])` over the common length, as [`lane_sum`].
#[inline(always)]
pub(crate) fn lane_sum2<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    let n = a.len().min(b.len());
    let mut total = 0f64;
    for (ab, bb) in a[..n].chunks(512).zip(b[..n].chunks(512)) {
        let mut acc = [T::zero(); 8];
        let (ac, bc) = (ab.chunks_exact(8), bb.chunks_exact(8));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for l in 0..8 {
                acc[l] += f(x[l], y[l]);
            }
        }
        let mut s = 0f64;
        for v in acc {
            s += v.to_f64();
        }
        for (x, y) in ar.iter().zip(br) {
            s += f(*x, *y).to_f64();
        }
        total += s;
    }
    total
}

/// `σ(x)`, `tanh(x)`, softplus and `√x` for the fused ops, vectorisable in f32.
pub(crate) trait Transcendental: WithDType {
    /// `√x`, correctly rounded (the instruction in every vector width).
    fn sqrt_(self) -> Self;
    fn sigmoid(self) -> Self;
    fn tanh_(self) -> Self;
    /// `ln(1 + eˣ)`, stable for large `|x|`.
    fn softplus(self) -> Self;
}

impl Transcendental for f32 {
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + exp_f32(-self))
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        2.0 / (1.0 + exp_f32(-2.0 * self)) - 1.0
    }
    #[inline(always)]
    fn softplus(self) -> Self {
        self.max(0.0) + softplus_tail_f32(self)
    }
}

impl Transcendental for f64 {
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
    fn tanh_(self) -> Self {
        self.tanh()
    }
    fn softplus(self) -> Self {
        self.max(0.0) + (-self.abs()).exp().ln_1p()
    }
}

/// A vector of `len` elements written by `f(task, chunk)` over consecutive chunks of `chunk`
/// elements spread over the thread pool ([`crate::kernels::par`]), without filling it with zeros first (a
/// serial pass over memory that `f` overwrites anyway).
///
/// # Safety
/// `f` must write every element of the chunk it is given.
#[allow(unsafe_code)]
pub(crate) unsafe fn par_written<T: Copy + Send + Sync>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    crate::kernels::par::chunks_mut(&mut v.spare_capacity_mut()[..len], chunk, f);
    // SAFETY: the caller's `f` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_relative_error() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) >= 0.0 && exp_f32(1000.0).is_finite());
        let t = Transcendental::tanh_(0.5f32) as f64;
        assert!((t - 0.5f64.tanh()).abs() < 2e-7);
    }

    #[test]
    fn ln_f32_and_softplus_relative_error() {
        let mut worst = 0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let want = (x as f64).ln();
            let err = ((ln_f32(x) as f64) - want).abs() / want.abs().max(1.0);
            worst = worst.max(err);
            x *= 1.000_37;
        }
        assert!(worst < 2e-7, "ln_f32: worst relative error {worst}");
        assert_eq!(ln_f32(1.0), 0.0);
        // Near 1, where ln x is small, the error is relative to ln x itself.
        for k in 1..2000 {
            let x = 1.0 + k as f32 * 1e-4;
            let want = (x as f64).ln();
            let rel = ((ln_f32(x) as f64) - want).abs() / want;
            assert!(rel < 3e-7, "ln_f32({x}): relative error {rel}");
        }
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let xd = x as f64;
            let want = xd.max(0.0) + (-xd.abs()).exp().ln_1p();
            let got = Transcendental::softplus(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.0173;
        }
        assert!(worst < 3e-7, "softplus: worst relative error {worst}");
        // The tail where 1 + e^{−|x|} rounds to 1: still e^{−|x|}, not 0.
        let t = softplus_tail_f32(-30.0) as f64;
        assert!((t / (-30f64).exp() - 1.0).abs() < 1e-6, "{t}");
    }

    #[test]
    fn lane_sums_match_f64_sums() {
        for n in [0usize, 1, 7, 8, 9, 511, 512, 513, 3137] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32) / 3.0).collect();
            let want: f64 = a.iter().map(|&v| v as f64 * v as f64).sum();
            let got = lane_sum(&a, |v| v * v);
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1.0),
                "n {n}: {got} vs {want}"
            );
            let want2: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got2 = lane_sum2(&a, &b, |x, y| x * y);
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 * y as f64).abs())
                .sum();
            assert!(
                (got2 - want2).abs() <= 1e-6 * scale.max(1.0),
                "n {n}: {got2} vs {want2}"
            );
        }
    }
}

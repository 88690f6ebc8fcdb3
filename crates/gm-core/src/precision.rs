//! Mixed precision: matrix products and convolutions in bf16 or f16, everything else in f32.
//!
//! The split is PyTorch autocast's: the ops that dominate the time (linear layers, attention's
//! products, convolutions and transposed convolutions) cast their operands to the low precision,
//! run there, and hand an f32 result on, while parameters, optimizer state, normalisations,
//! softmax, losses and their reductions stay f32. Each cast is differentiable (candle casts the
//! gradient back), so gradients reach the f32 parameters in f32: they are the master weights.
//!
//! Autocast is per thread ([`Autocast::enter`]; ranks run as threads in the data-parallel tests).
//! gm's CPU convolution kernels take f32 and f64 only: on the CPU a convolution under autocast
//! runs in f32 and is counted as such. [`counts`] says which op ran in which dtype.

use candle_core::{DType, Result, Tensor};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

thread_local! {
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
    static COUNTS: RefCell<BTreeMap<(&'static str, &'static str), u64>> =
        const { RefCell::new(BTreeMap::new()) };
}

/// A training precision: `f32`, `bf16` or `f16`.
pub fn parse(name: &str) -> std::result::Result<Option<DType>, String> {
    match name {
        "f32" => Ok(None),
        "bf16" => Ok(Some(DType::BF16)),
        "f16" => Ok(Some(DType::F16)),
        other => Err(format!(
            "'{other}' is not a precision: use f32, bf16 or f16"
        )),
    }
}

/// The low precision this thread's matrix products and convolutions run in, if any.
pub fn autocast() -> Option<DType> {
    AUTOCAST.with(|a| a.get())
}

/// Autocast for the guard's lifetime (the previous setting comes back on drop).
pub struct Autocast {
    previous: Option<DType>,
}

impl Autocast {
    /// `None` turns autocast off inside the scope.
    pub fn enter(dtype: Option<DType>) -> Self {
        let previous = AUTOCAST.with(|a| a.replace(dtype));
        Self { previous }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.with(|a| a.set(self.previous));
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "other",
    }
}

fn count(op: &'static str, d: DType) {
    COUNTS.with(|c| *c.borrow_mut().entry((op, dtype_name(d))).or_insert(0) += 1);
}

/// How many times each op ran in each dtype under autocast on this thread, since the last
/// [`reset_counts`]: `(op, dtype) → calls`.
pub fn counts() -> BTreeMap<(&'static str, &'static str), u64> {
    COUNTS.with(|c| c.borrow().clone())
}

pub fn reset_counts() {
    COUNTS.with(|c| c.borrow_mut().clear());
}

/// The dtype an autocast op on `x` runs in: the autocast precision for f32 inputs when
/// `supported`, f32 otherwise (counted either way); `None` outside autocast or for inputs that
/// are not f32 (f64 checks stay f64).
pub fn op_dtype(op: &'static str, x: &Tensor, supported: bool) -> Option<DType> {
    let low = autocast()?;
    if x.dtype() != DType::F32 {
        return None;
    }
    let d = if supported { low } else { DType::F32 };
    count(op, d);
    (d != DType::F32).then_some(d)
}

/// Runs `f` on `a` and `b` cast to the autocast precision and returns its result in f32; runs
/// `f` as is outside autocast, for non-f32 inputs, or where `supported` is false.
pub fn cast_op2(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    supported: bool,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match op_dtype(op, a, supported) {
        None => f(a, b),
        Some(d) => f(&a.to_dtype(d)?, &b.to_dtype(d)?)?.to_dtype(DType::F32),
    }
}

/// `a · b` under autocast: 2-D f32/f64 products on gm's thread pool
/// ([`crate::kernels::matmul`]), candle's batched `matmul` otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    cast_op2("matmul", a, b, true, crate::kernels::matmul::matmul)
}

/// `a · bᵀ` under autocast, as [`matmul`] ([`crate::kernels::matmul::matmul_nt`]: `b`'s gradient
/// in `b`'s layout).
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    cast_op2("matmul", a, b, true, crate::kernels::matmul::matmul_nt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn autocast_matmul_runs_low_and_returns_f32_with_f32_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = candle_core::Var::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &dev)?;
        let b = Tensor::from_vec(vec![0.5f32, -1.0, 0.25, 2.0, 1.5, -0.75], (3, 2), &dev)?;
        let exact = a.matmul(&b)?;
        reset_counts();
        let y = {
            let _g = Autocast::enter(Some(DType::BF16));
            matmul(&a, &b)?
        };
        assert_eq!(y.dtype(), DType::F32);
        // These values are exact in bf16 (few mantissa bits), so the product is too.
        assert_eq!(y.to_vec2::<f32>()?, exact.to_vec2::<f32>()?);
        assert_eq!(counts()[&("matmul", "bf16")], 1);
        let g = y.sum_all()?.backward()?;
        let ga = g.get(a.as_tensor()).expect("gradient");
        assert_eq!(ga.dtype(), DType::F32);
        // d(sum(a·b))/da = 1·bᵀ: row sums of b.
        assert_eq!(ga.to_vec2::<f32>()?[0], vec![-0.5, 2.25, 0.75]);
        // Outside the guard autocast is off again.
        assert_eq!(autocast(), None);
        assert_eq!(matmul(&a, &b)?.to_vec2::<f32>()?, exact.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn f16_overflow_shows_as_inf_in_the_gradient() -> Result<()> {
        // A gradient above f16's largest value (65504) becomes inf at the cast: what loss
        // scaling detects and skips.
        let dev = Device::Cpu;
        let a = candle_core::Var::from_vec(vec![1.0f32; 4], (2, 2), &dev)?;
        let b = Tensor::from_vec(vec![1.0f32; 4], (2, 2), &dev)?;
        let y = {
            let _g = Autocast::enter(Some(DType::F16));
            matmul(&a, &b)?
        };
        let g = (y.sum_all()? * 1e6)?.backward()?;
        let ga: Vec<f32> = g.get(a.as_tensor()).unwrap().flatten_all()?.to_vec1()?;
        assert!(ga.iter().all(|v| v.is_infinite()), "{ga:?}");
        Ok(())
    }

    #[test]
    fn precision_names() {
        assert_eq!(parse("f32"), Ok(None));
        assert_eq!(parse("bf16"), Ok(Some(DType::BF16)));
        assert_eq!(parse("f16"), Ok(Some(DType::F16)));
        assert!(parse("fp8").unwrap_err().contains("fp8"));
    }
}

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

/// Evaluates `$body` with `$a`, `$b` bound to the two operands as f32 or f64 slices, wrapping the
/// resulting `Vec` back into a `CpuStorage` of the same dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! float2 {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, |$a:ident, $b:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage as _;
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let $a = $crate::kernel::slice::<f32>($s1, $l1, $name)?;
                let $b = $crate::kernel::slice::<f32>($s2, $l2, $name)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let $a = $crate::kernel::slice::<f64>($s1, $l1, $name)?;
                let $b = $crate::kernel::slice::<f64>($s2, $l2, $name)?;
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

//! Which vector instructions gm's element-wise CPU loops (the fused ops, the norms, Adam) are
//! compiled for.
//!
//! gm is built for the x86-64 baseline (SSE2, 128-bit vectors), so a loop that LLVM vectorises
//! runs four f32 lanes wide. The loops declared with `simd_fn!` are compiled three times — for the
//! baseline, for AVX2 and for AVX-512F — and each call runs the widest copy this CPU supports.
//! Every copy is the same source: the same operations in the same order on every element (Rust
//! never fuses `a * b + c` into one rounding, and the reductions keep their own fixed lanes), so
//! the three give the same bits, which the tests check on whatever CPU runs them.
//!
//! `GM_SIMD=baseline`, `GM_SIMD=avx2` or `GM_SIMD=avx512` caps the width (an AVX-512 CPU then
//! runs the narrower copies, to compare); the default is the widest the CPU has. The
//! convolutions choose their own kernels ([`crate::kernels::conv::cpu_kernels`], `GM_CONV`).

use std::sync::atomic::{AtomicU8, Ordering};

/// A set of vector instructions, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The x86-64 baseline (SSE2), or whatever the target was built for elsewhere.
    Baseline,
    /// AVX2 (256-bit vectors).
    Avx2,
    /// AVX-512F (512-bit vectors).
    Avx512,
}

impl Isa {
    /// `"baseline"`, `"avx2"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .get(v as usize)
            .copied()
    }
}

/// The widest set this CPU supports.
pub fn supported() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// `u8::MAX` until the first call decides.
static CHOSEN: AtomicU8 = AtomicU8::new(u8::MAX);

/// The set the element-wise loops run with: [`supported`], capped by `GM_SIMD` (an unknown
/// value is ignored, with one line on stderr).
pub fn chosen() -> Isa {
    if let Some(isa) = Isa::from_u8(CHOSEN.load(Ordering::Relaxed)) {
        return isa;
    }
    let cap = match std::env::var("GM_SIMD").as_deref() {
        Err(_) | Ok("") => Isa::Avx512,
        Ok("baseline") => Isa::Baseline,
        Ok("avx2") => Isa::Avx2,
        Ok("avx512") => Isa::Avx512,
        Ok(other) => {
            eprintln!("gm: GM_SIMD={other:?} is not baseline, avx2 or avx512; ignored");
            Isa::Avx512
        }
    };
    let isa = supported().min(cap);
    CHOSEN.store(isa as u8, Ordering::Relaxed);
    isa
}

/// Makes every later element-wise loop of this process run with `isa` (capped at
/// [`supported`]); returns the set chosen before. For tests and benchmarks that compare widths:
/// the results are the same bits at every width, so other threads are not disturbed.
pub fn set_chosen(isa: Isa) -> Isa {
    let before = chosen();
    CHOSEN.store(isa.min(supported()) as u8, Ordering::Relaxed);
    before
}

/// Defines a function whose body is compiled for the baseline, AVX2 and AVX-512F, and runs the
/// widest copy [`chosen`] allows. One generic parameter `T` with one bound; closures defined in
/// the body are compiled with it. Closures passed in are inlined into each copy only where LLVM
/// judges them small (the piecewise-linear activations are); larger per-element functions go in
/// as unit types whose `#[inline(always)]` bodies always inline (the softplus, σ), and functions
/// the body calls must be `#[inline(always)]` too, or they run at the baseline width.
#[macro_export]
#[doc(hidden)]
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$g:ident: $b:path>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments, unsafe_code)]
        $vis fn $name<$g: $b>($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$g: $b>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$g: $b>($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$g: $b>($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                match $crate::kernels::simd::chosen() {
                    // SAFETY: `chosen` never exceeds what the CPU supports.
                    $crate::kernels::simd::Isa::Avx512 => return unsafe { avx512($($a),*) },
                    // SAFETY: as above.
                    $crate::kernels::simd::Isa::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::kernels::simd::Isa::Baseline => {}
                }
            }
            body($($a),*)
        }
    };
}

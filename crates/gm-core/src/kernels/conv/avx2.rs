//! AVX2 + FMA kernels for f32 convolutions that never build the whole column matrix.
//!
//! Each image is first laid out as zero-padded *planes*: for stride `s`, the `s × s` *phase*
//! sub-grids of the padded plane, so that the pixels one kernel tap reads along an output row are
//! contiguous whatever the stride (the direct kernel reads single values, and takes the padded
//! plane itself). Then, per direction:
//! - **forward**: with at least 12 output channels per group and a column depth of 128 or
//!   more, the [`direct`] kernel: register tiles of 6 output pixels × 16 channels (32 with
//!   AVX-512F), each input value broadcast from the planes against two vectors of packed
//!   weights, so nothing is gathered; transposed into `y` once per 48 pixels. Otherwise the
//!   *panel* kernel: for each panel of [`NR`] output pixels (panels run across rows and images),
//!   the `K × NR` block of the column matrix is copied from the phase planes into a panel that
//!   stays in L1, and an `MR × NR` register tile multiplies the packed weight by it, stored
//!   straight into `y` (with AVX-512F, each row of the tile one 512-bit and one 256-bit vector);
//! - **data gradient**: `s_h·s_w` sub-pixel convolutions. The pixels of `dx` that are
//!   `≡ (py, px)` modulo the stride receive only the kernel taps whose offset matches that phase,
//!   so each phase is a stride-1 convolution of `dy` (padded) by those taps, flipped, with the
//!   weight's channel axes swapped: a forward kernel computes it, and the phases are
//!   interleaved into `dx` (at stride 1, the one phase is `dx` itself). No column matrix is
//!   built and nothing is added back (no col2im);
//! - **filter gradient**: with enough output channels and depth, the [`direct`] kernel's tiles
//!   of 6 column rows × 16 output channels, summed over the pixels of a transposed `dy` while
//!   each row's input value is broadcast from the planes; otherwise dot products along the
//!   pixels between rows of `dy` and rows of the column matrix of a chunk of images, in 3 × 4
//!   register tiles.
//!
//! The general gemm these replace packs both operands of every call into its own layout; here the
//! panels (or the planes the direct kernel reads) *are* the packed layout, which removes that
//! pass and the column matrix's round trip through memory.

#![allow(unsafe_code)]

use super::{sum_tasks, Geom, Plan};
use crate::kernels::reuse::Reused;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Assembly that zeroes the 12 accumulators `ymm4`–`ymm15` of the register tiles.
macro_rules! zero_acc {
    () => {
        concat!(
            "vxorps ymm4, ymm4, ymm4\n",
            "vxorps ymm5, ymm5, ymm5\n",
            "vxorps ymm6, ymm6, ymm6\n",
            "vxorps ymm7, ymm7, ymm7\n",
            "vxorps ymm8, ymm8, ymm8\n",
            "vxorps ymm9, ymm9, ymm9\n",
            "vxorps ymm10, ymm10, ymm10\n",
            "vxorps ymm11, ymm11, ymm11\n",
            "vxorps ymm12, ymm12, ymm12\n",
            "vxorps ymm13, ymm13, ymm13\n",
            "vxorps ymm14, ymm14, ymm14\n",
            "vxorps ymm15, ymm15, ymm15\n",
        )
    };
}

mod direct;
mod winograd;

/// Rows of a register tile (the broadcast operand).
const MR: usize = 4;
/// Columns of a register tile: three vectors of eight.
const NR: usize = 24;
/// Depth slice of the forward's register tiles.
const KC: usize = 128;
/// Floats of headroom after every buffer that vector copies may run past.
const SLACK: usize = 32;

/// Whether this CPU has AVX2 and FMA, and `GM_CONV` does not ask for the generic kernels.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let generic = std::env::var("GM_CONV").is_ok_and(|v| v == "gemm");
        !generic && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    })
}

/// Sets this thread's direct-kernel tile width (`None`: the process default); returns the
/// previous setting.
pub(super) fn set_width(width: Option<super::TileWidth>) -> Option<super::TileWidth> {
    direct::WIDTH.with(|w| w.replace(width))
}

/// [`super::cpu_kernels`] when the AVX2 kernels run.
pub(super) fn tiles_name() -> &'static str {
    match direct::Tiles::chosen() {
        direct::Tiles::Avx2 => "avx2",
        direct::Tiles::Avx512 => "avx512",
        direct::Tiles::WideRust => "wide-rust",
    }
}

/// Geometry of the phase planes of one image.
#[derive(Clone, Debug)]
struct Planes {
    /// `spot[iy·w + ix]`: where pixel `(iy, ix)` of a channel goes in that channel's planes.
    spot: Vec<u32>,
    sh: usize,
    sw: usize,
    hq: usize,
    wq: usize,
    /// Floats per channel (all phases).
    chan: usize,
    /// Floats per image (all channels).
    img: usize,
}

impl Planes {
    fn new(g: &Geom) -> Self {
        let [sh, sw] = g.p.stride;
        let hp = g.h + 2 * g.p.padding[0];
        let wp = g.w + 2 * g.p.padding[1];
        let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
        let chan = sh * sw * hq * wq;
        let mut pl = Self {
            spot: Vec::new(),
            sh,
            sw,
            hq,
            wq,
            chan,
            img: g.ci * chan,
        };
        let [ph, pw] = g.p.padding;
        pl.spot = (0..g.h)
            .flat_map(|iy| (0..g.w).map(move |ix| (iy, ix)))
            .map(|(iy, ix)| pl.at(0, iy + ph, ix + pw) as u32)
            .collect();
        pl
    }

    /// Planes of stride 1 (one phase: the padded plane itself) for `g`'s input, whatever its
    /// stride — what the [`direct`] kernels read.
    fn flat(g: &Geom) -> Self {
        let mut flat = *g;
        flat.p.stride = [1, 1];
        Self::new(&flat)
    }

    /// Where output pixel `q` of a chunk (image `q / pix`, pixel `q % pix` of `g`'s output)
    /// starts reading in the chunk's stride-1 planes: the offset [`Planes::taps`] add to.
    fn origin(&self, g: &Geom, q: usize) -> usize {
        debug_assert_eq!((self.sh, self.sw), (1, 1));
        let (img, p) = (q / g.pix(), q % g.pix());
        let [sh, sw] = g.p.stride;
        img * self.img + sh * (p / g.wo) * self.wq + sw * (p % g.wo)
    }

    /// Offset of padded position `(y, x)` of channel `c`.
    fn at(&self, c: usize, y: usize, x: usize) -> usize {
        c * self.chan
            + ((y % self.sh) * self.sw + x % self.sw) * self.hq * self.wq
            + (y / self.sh) * self.wq
            + x / self.sw
    }

    /// Offsets read by each column-matrix row `(c, ky, kx)` of each group at output pixel
    /// `(0, 0)`; output pixel `(oy, ox)` adds `oy·wq + ox`.
    fn taps(&self, g: &Geom) -> Vec<usize> {
        let [dh, dw] = g.p.dilation;
        let mut t = Vec::with_capacity(g.ci * g.kh * g.kw);
        for c in 0..g.ci {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    t.push(self.at(c, ky * dh, kx * dw));
                }
            }
        }
        t
    }

    /// Writes image `x` `(ci, h, w)` into the interior of its planes (the border stays as it is:
    /// zero).
    fn fill(&self, g: &Geom, x: &[f32], dst: &mut [f32]) {
        let hw = g.h * g.w;
        for (c, xc) in x.chunks_exact(hw).enumerate() {
            let d = &mut dst[c * self.chan..][..self.chan];
            if self.sw == 1 {
                for (iy, src) in xc.chunks_exact(g.w).enumerate() {
                    let o = self.spot[iy * g.w] as usize;
                    d[o..o + g.w].copy_from_slice(src);
                }
            } else {
                for (&v, &o) in xc.iter().zip(&self.spot) {
                    d[o as usize] = v;
                }
            }
        }
    }

    /// [`Planes::fill`] for consecutive images `xs` into consecutive planes.
    fn fill_images(&self, g: &Geom, xs: &[f32], planes: &mut [f32]) {
        for (x, dst) in xs
            .chunks_exact(g.in_len())
            .zip(planes.chunks_exact_mut(self.img))
        {
            self.fill(g, x, dst);
        }
    }

    /// The inverse of [`Planes::fill`]: the interior of the planes into image `x`.
    fn extract(&self, g: &Geom, src: &[f32], x: &mut [MaybeUninit<f32>]) {
        let hw = g.h * g.w;
        for (c, xc) in x.chunks_exact_mut(hw).enumerate() {
            let s = &src[c * self.chan..][..self.chan];
            if self.sw == 1 {
                for (iy, dst) in xc.chunks_exact_mut(g.w).enumerate() {
                    let o = self.spot[iy * g.w] as usize;
                    put(dst, &s[o..o + g.w]);
                }
            } else {
                for (d, &o) in xc.iter_mut().zip(&self.spot) {
                    d.write(s[o as usize]);
                }
            }
        }
    }
}

/// `dst = src`, element by element into memory that may not be initialised yet.
fn put(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(*s);
    }
}

/// A run of panel columns `[j, j + len)` lying in one output row (or one image) of image `img`
/// of the chunk, starting at its pixel `p`; `src` is where the run starts in the chunk's planes
/// (before adding a tap).
#[derive(Clone, Copy, Debug)]
struct Seg {
    j: usize,
    len: usize,
    img: usize,
    p: usize,
    src: usize,
}

/// Splits chunk columns `[q0, q0 + width)` (column `q` = image `q / pix`, pixel `q % pix`) at
/// output rows (`rows`) or only at images.
fn segments(g: &Geom, pl: &Planes, q0: usize, width: usize, rows: bool, out: &mut Vec<Seg>) {
    out.clear();
    let pix = g.pix();
    let end = q0 + width;
    let mut q = q0;
    while q < end {
        let (img, p) = (q / pix, q % pix);
        let run = if rows { g.wo - p % g.wo } else { pix - p };
        let len = run.min(end - q);
        out.push(Seg {
            j: q - q0,
            len,
            img,
            p,
            src: img * pl.img + (p / g.wo) * pl.wq + p % g.wo,
        });
        q += len;
    }
}

/// A zeroed buffer of `len` floats plus [`SLACK`], and the offset at which a 32-byte aligned
/// region of `len` floats starts.
fn aligned(len: usize) -> (Vec<f32>, usize) {
    let v = vec![0f32; len + SLACK + 8];
    let off = v.as_ptr().align_offset(32).min(7);
    (v, off)
}

/// As [`aligned`], from the thread's [`Reused`] buffers: not zeroed, for working memory that is
/// written before it is read.
fn aligned_reused(len: usize) -> (Reused, usize) {
    let v = Reused::new(len + SLACK + 8);
    let off = v.as_ptr().align_offset(32).min(7);
    (v, off)
}

/// Copies `len` floats from `src` to `dst` in whole vectors of 8 (up to 7 more are read and
/// written).
///
/// # Safety
/// `src` and `dst` must be valid for `len.next_multiple_of(8)` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn copy_over(dst: *mut f32, src: *const f32, len: usize) {
    let mut t = 0;
    while t < len {
        _mm256_storeu_ps(dst.add(t), _mm256_loadu_ps(src.add(t)));
        t += 8;
    }
}

static MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// `dst[t] += src[t]` for `t < len`, in whole vectors (the floats up to the next multiple of 8
/// are read, and written back unchanged).
///
/// # Safety
/// `src` and `dst` must be valid for `len.next_multiple_of(8)` floats, and nothing else may
/// access `dst`'s range meanwhile.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_over(dst: *mut f32, src: *const f32, len: usize) {
    let mut t = 0;
    while t + 8 <= len {
        let d = _mm256_loadu_ps(dst.add(t));
        _mm256_storeu_ps(dst.add(t), _mm256_add_ps(d, _mm256_loadu_ps(src.add(t))));
        t += 8;
    }
    if t < len {
        let m = _mm256_loadu_si256(MASK.as_ptr().add(8 - (len - t)) as *const __m256i);
        let v = _mm256_and_ps(_mm256_loadu_ps(src.add(t)), _mm256_castsi256_ps(m));
        let d = _mm256_loadu_ps(dst.add(t));
        _mm256_storeu_ps(dst.add(t), _mm256_add_ps(d, v));
    }
}

/// Row `r` of `dst` (rows `ld` apart) gets the runs `segs` read from `planes` at tap `taps[r]`:
/// the column-matrix rows of a panel.
///
/// # Safety
/// Every run `planes[src + tap ..][..len]` must lie inside `planes` with 7 more floats readable,
/// and every `dst[r·ld + j ..][..len + 7]` inside `dst`.
#[target_feature(enable = "avx2,fma")]
unsafe fn gather(dst: *mut f32, ld: usize, planes: *const f32, taps: &[usize], segs: &[Seg]) {
    for (r, &t) in taps.iter().enumerate() {
        for s in segs {
            copy_over(dst.add(r * ld + s.j), planes.add(s.src + t), s.len);
        }
    }
}

/// The adjoint of [`gather`]: adds row `r` of `src` (rows `ld` apart) onto `planes` at tap
/// `taps[r]` along the runs `segs` (col2im of a panel).
///
/// # Safety
/// As [`gather`] with the roles of the two buffers swapped; nothing else may access `planes`.
#[target_feature(enable = "avx2,fma")]
unsafe fn scatter(planes: *mut f32, src: *const f32, ld: usize, taps: &[usize], segs: &[Seg]) {
    for (r, &t) in taps.iter().enumerate() {
        for s in segs {
            add_over(planes.add(s.src + t), src.add(r * ld + s.j), s.len);
        }
    }
}

/// Row `o < rows` of `dst` (rows `NR` apart) gets, for each run of `segs`, `len` floats of
/// `src` from `base + img·img_stride + o·row_stride + p`: an `NR`-wide panel of a
/// `(N, C, pix)` tensor.
///
/// # Safety
/// `dst` must be valid for `rows·NR + SLACK` floats and every run must lie inside `src`.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_rows(
    dst: *mut f32,
    src: &[f32],
    base: usize,
    [rows, row_stride, img_stride]: [usize; 3],
    segs: &[Seg],
) {
    for o in 0..rows {
        for s in segs {
            let off = base + s.img * img_stride + o * row_stride + s.p;
            let d = dst.add(o * NR + s.j);
            if off + s.len.next_multiple_of(8) <= src.len() {
                copy_over(d, src.as_ptr().add(off), s.len);
            } else {
                std::ptr::copy_nonoverlapping(src[off..off + s.len].as_ptr(), d, s.len);
            }
        }
    }
}

/// `c (MR × NR) = [c +] a · b`, `a` packed as `[depth][MR]`, `b` `depth` rows of `NR` floats
/// `ldb` apart, `c` row-major with row stride `ldc`; `c` is added to when `accumulate`.
///
/// Written in assembly: the 4 × 24 tile needs all 16 vector registers (12 accumulators, three
/// vectors of `b`, one broadcast of `a`), and the compiler's scheduling spills an accumulator.
///
/// With `wide` (the CPU has AVX-512F: [`direct::Tiles::Avx512`]), each row of 24 is one
/// 512-bit and one 256-bit vector ([`tile_avx512`]): 8 FMA instructions per step instead of 12,
/// the same fused multiply-adds per lane, so the same bits.
///
/// # Safety
/// `a` valid for `depth·MR` floats, `b` for `depth` rows of `NR` floats `ldb` apart, `c` for
/// `MR` rows of `NR` floats `ldc` apart; with `wide`, the CPU has AVX-512F.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    wide: bool,
    depth: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if wide {
        debug_assert!(direct::avx512());
        tile_avx512(depth, a, b, ldb, c, ldc, accumulate)
    } else {
        tile_avx2(depth, a, b, ldb, c, ldc, accumulate)
    }
}

/// Whether the panel tiles of a convolution called on this thread use 512-bit vectors.
fn wide_panels() -> bool {
    direct::Tiles::chosen() == direct::Tiles::Avx512
}

/// [`tile`] in 256-bit vectors: three per row of 24.
///
/// # Safety
/// As [`tile`]; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(
    depth: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    const _: () = assert!(MR == 4 && NR == 24);
    std::arch::asm!(
        "lea {c3}, [{c} + {l}*2]",
        "add {c3}, {l}",
        "test {acc}, {acc}",
        "jz 4f",
        "vmovups ymm4, [{c}]",
        "vmovups ymm5, [{c} + 32]",
        "vmovups ymm6, [{c} + 64]",
        "vmovups ymm7, [{c} + {l}]",
        "vmovups ymm8, [{c} + {l} + 32]",
        "vmovups ymm9, [{c} + {l} + 64]",
        "vmovups ymm10, [{c} + {l}*2]",
        "vmovups ymm11, [{c} + {l}*2 + 32]",
        "vmovups ymm12, [{c} + {l}*2 + 64]",
        "vmovups ymm13, [{c3}]",
        "vmovups ymm14, [{c3} + 32]",
        "vmovups ymm15, [{c3} + 64]",
        "jmp 5f",
        "4:",
        zero_acc!(),
        "5:",
        "test {d}, {d}",
        "jz 3f",
        "2:",
        "vmovups ymm0, [{b}]",
        "vmovups ymm1, [{b} + 32]",
        "vmovups ymm2, [{b} + 64]",
        "vbroadcastss ymm3, dword ptr [{a}]",
        "vfmadd231ps ymm4, ymm3, ymm0",
        "vfmadd231ps ymm5, ymm3, ymm1",
        "vfmadd231ps ymm6, ymm3, ymm2",
        "vbroadcastss ymm3, dword ptr [{a} + 4]",
        "vfmadd231ps ymm7, ymm3, ymm0",
        "vfmadd231ps ymm8, ymm3, ymm1",
        "vfmadd231ps ymm9, ymm3, ymm2",
        "vbroadcastss ymm3, dword ptr [{a} + 8]",
        "vfmadd231ps ymm10, ymm3, ymm0",
        "vfmadd231ps ymm11, ymm3, ymm1",
        "vfmadd231ps ymm12, ymm3, ymm2",
        "vbroadcastss ymm3, dword ptr [{a} + 12]",
        "vfmadd231ps ymm13, ymm3, ymm0",
        "vfmadd231ps ymm14, ymm3, ymm1",
        "vfmadd231ps ymm15, ymm3, ymm2",
        "add {a}, 16",
        "add {b}, {lb}",
        "dec {d}",
        "jnz 2b",
        "3:",
        "vmovups [{c}], ymm4",
        "vmovups [{c} + 32], ymm5",
        "vmovups [{c} + 64], ymm6",
        "vmovups [{c} + {l}], ymm7",
        "vmovups [{c} + {l} + 32], ymm8",
        "vmovups [{c} + {l} + 64], ymm9",
        "vmovups [{c} + {l}*2], ymm10",
        "vmovups [{c} + {l}*2 + 32], ymm11",
        "vmovups [{c} + {l}*2 + 64], ymm12",
        "vmovups [{c3}], ymm13",
        "vmovups [{c3} + 32], ymm14",
        "vmovups [{c3} + 64], ymm15",
        "vzeroupper",
        d = inout(reg) depth => _,
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        c = in(reg) c,
        acc = in(reg) accumulate as usize,
        l = in(reg) ldc * 4,
        lb = in(reg) ldb * 4,
        c3 = out(reg) _,
        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
        options(nostack),
    );
}

/// [`tile`] with each row of 24 as one 512-bit vector (16 columns) and one 256-bit vector (8):
/// accumulators `zmm4`/`ymm5`, `zmm6`/`ymm7`, `zmm8`/`ymm9`, `zmm10`/`ymm11` for the four rows,
/// `b` in `zmm0`/`ymm1`, the broadcast of `a` in `zmm3` (whose low half serves the 256-bit FMA).
///
/// # Safety
/// As [`tile`]; the CPU has AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_avx512(
    depth: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    const _: () = assert!(MR == 4 && NR == 24);
    std::arch::asm!(
        "lea {c3}, [{c} + {l}*2]",
        "add {c3}, {l}",
        "test {acc}, {acc}",
        "jz 4f",
        "vmovups zmm4, [{c}]",
        "vmovups ymm5, [{c} + 64]",
        "vmovups zmm6, [{c} + {l}]",
        "vmovups ymm7, [{c} + {l} + 64]",
        "vmovups zmm8, [{c} + {l}*2]",
        "vmovups ymm9, [{c} + {l}*2 + 64]",
        "vmovups zmm10, [{c3}]",
        "vmovups ymm11, [{c3} + 64]",
        "jmp 5f",
        "4:",
        "vpxord zmm4, zmm4, zmm4",
        "vpxord zmm5, zmm5, zmm5",
        "vpxord zmm6, zmm6, zmm6",
        "vpxord zmm7, zmm7, zmm7",
        "vpxord zmm8, zmm8, zmm8",
        "vpxord zmm9, zmm9, zmm9",
        "vpxord zmm10, zmm10, zmm10",
        "vpxord zmm11, zmm11, zmm11",
        "5:",
        "test {d}, {d}",
        "jz 3f",
        "2:",
        "vmovups zmm0, [{b}]",
        "vmovups ymm1, [{b} + 64]",
        "vbroadcastss zmm3, dword ptr [{a}]",
        "vfmadd231ps zmm4, zmm3, zmm0",
        "vfmadd231ps ymm5, ymm3, ymm1",
        "vbroadcastss zmm3, dword ptr [{a} + 4]",
        "vfmadd231ps zmm6, zmm3, zmm0",
        "vfmadd231ps ymm7, ymm3, ymm1",
        "vbroadcastss zmm3, dword ptr [{a} + 8]",
        "vfmadd231ps zmm8, zmm3, zmm0",
        "vfmadd231ps ymm9, ymm3, ymm1",
        "vbroadcastss zmm3, dword ptr [{a} + 12]",
        "vfmadd231ps zmm10, zmm3, zmm0",
        "vfmadd231ps ymm11, ymm3, ymm1",
        "add {a}, 16",
        "add {b}, {lb}",
        "dec {d}",
        "jnz 2b",
        "3:",
        "vmovups [{c}], zmm4",
        "vmovups [{c} + 64], ymm5",
        "vmovups [{c} + {l}], zmm6",
        "vmovups [{c} + {l} + 64], ymm7",
        "vmovups [{c} + {l}*2], zmm8",
        "vmovups [{c} + {l}*2 + 64], ymm9",
        "vmovups [{c3}], zmm10",
        "vmovups [{c3} + 64], ymm11",
        "vzeroupper",
        d = inout(reg) depth => _,
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        c = in(reg) c,
        acc = in(reg) accumulate as usize,
        l = in(reg) ldc * 4,
        lb = in(reg) ldb * 4,
        c3 = out(reg) _,
        out("zmm0") _, out("zmm1") _, out("zmm3") _,
        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
        options(nostack),
    );
}

/// Columns of the Winograd products' register tiles where the tiles are wide (AVX-512, or
/// their plain-Rust stand-in): two 512-bit vectors.
const NR_WIDE: usize = 32;

/// [`tile`] for 8 rows and [`NR_WIDE`] columns: rows 0–3 from `a` (`[depth][MR]`, as in
/// [`tile`]), rows 4–7 from `a1` (the next block of MR rows, or zeros past the last one). Every
/// output is the same sequence of fused multiply-adds over the depth as in [`tile`], so the bits
/// are the same.
///
/// # Safety
/// As [`tile`], for 8 rows of `c` and NR_WIDE columns of `b`; `a1` holds `depth·MR` floats;
/// `tiles` runs on this CPU.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_wide(
    tiles: direct::Tiles,
    depth: usize,
    a: *const f32,
    a1: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if tiles == direct::Tiles::Avx512 {
        return tile_avx512_8x32(depth, a, a1, b, ldb, c, ldc, accumulate);
    }
    for r in 0..2 * MR {
        let ar = if r < MR { a.add(r) } else { a1.add(r - MR) };
        for j in 0..NR_WIDE {
            let cr = c.add(r * ldc + j);
            let mut sum = if accumulate { *cr } else { 0.0 };
            for k in 0..depth {
                sum = (*ar.add(k * MR)).mul_add(*b.add(k * ldb + j), sum);
            }
            *cr = sum;
        }
    }
}

/// [`tile_wide`] in 512-bit vectors: accumulators `zmm4`–`zmm19`, two per row; rows 4–7
/// broadcast from `a1`.
///
/// # Safety
/// As [`tile_wide`]; the CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512_8x32(
    depth: usize,
    a: *const f32,
    a1: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    const _: () = assert!(MR == 4 && NR_WIDE == 32);
    std::arch::asm!(
        "lea {c3}, [{c} + {l}*2]",
        "add {c3}, {l}",
        "lea {c4}, [{c} + {l}*4]",
        "lea {c7}, [{c3} + {l}*4]",
        "test {acc}, {acc}",
        "jz 4f",
        "vmovups zmm4, [{c}]",
        "vmovups zmm5, [{c} + 64]",
        "vmovups zmm6, [{c} + {l}]",
        "vmovups zmm7, [{c} + {l} + 64]",
        "vmovups zmm8, [{c} + {l}*2]",
        "vmovups zmm9, [{c} + {l}*2 + 64]",
        "vmovups zmm10, [{c3}]",
        "vmovups zmm11, [{c3} + 64]",
        "vmovups zmm12, [{c4}]",
        "vmovups zmm13, [{c4} + 64]",
        "vmovups zmm14, [{c4} + {l}]",
        "vmovups zmm15, [{c4} + {l} + 64]",
        "vmovups zmm16, [{c4} + {l}*2]",
        "vmovups zmm17, [{c4} + {l}*2 + 64]",
        "vmovups zmm18, [{c7}]",
        "vmovups zmm19, [{c7} + 64]",
        "jmp 5f",
        "4:",
        "vpxord zmm4, zmm4, zmm4",
        "vpxord zmm5, zmm5, zmm5",
        "vpxord zmm6, zmm6, zmm6",
        "vpxord zmm7, zmm7, zmm7",
        "vpxord zmm8, zmm8, zmm8",
        "vpxord zmm9, zmm9, zmm9",
        "vpxord zmm10, zmm10, zmm10",
        "vpxord zmm11, zmm11, zmm11",
        "vpxord zmm12, zmm12, zmm12",
        "vpxord zmm13, zmm13, zmm13",
        "vpxord zmm14, zmm14, zmm14",
        "vpxord zmm15, zmm15, zmm15",
        "vpxord zmm16, zmm16, zmm16",
        "vpxord zmm17, zmm17, zmm17",
        "vpxord zmm18, zmm18, zmm18",
        "vpxord zmm19, zmm19, zmm19",
        "5:",
        "test {d}, {d}",
        "jz 3f",
        "2:",
        "vmovups zmm0, [{b}]",
        "vmovups zmm1, [{b} + 64]",
        "vbroadcastss zmm2, dword ptr [{a}]",
        "vbroadcastss zmm3, dword ptr [{a} + 4]",
        "vfmadd231ps zmm4, zmm2, zmm0",
        "vfmadd231ps zmm5, zmm2, zmm1",
        "vfmadd231ps zmm6, zmm3, zmm0",
        "vfmadd231ps zmm7, zmm3, zmm1",
        "vbroadcastss zmm2, dword ptr [{a} + 8]",
        "vbroadcastss zmm3, dword ptr [{a} + 12]",
        "vfmadd231ps zmm8, zmm2, zmm0",
        "vfmadd231ps zmm9, zmm2, zmm1",
        "vfmadd231ps zmm10, zmm3, zmm0",
        "vfmadd231ps zmm11, zmm3, zmm1",
        "vbroadcastss zmm2, dword ptr [{a1}]",
        "vbroadcastss zmm3, dword ptr [{a1} + 4]",
        "vfmadd231ps zmm12, zmm2, zmm0",
        "vfmadd231ps zmm13, zmm2, zmm1",
        "vfmadd231ps zmm14, zmm3, zmm0",
        "vfmadd231ps zmm15, zmm3, zmm1",
        "vbroadcastss zmm2, dword ptr [{a1} + 8]",
        "vbroadcastss zmm3, dword ptr [{a1} + 12]",
        "vfmadd231ps zmm16, zmm2, zmm0",
        "vfmadd231ps zmm17, zmm2, zmm1",
        "vfmadd231ps zmm18, zmm3, zmm0",
        "vfmadd231ps zmm19, zmm3, zmm1",
        "add {a}, 16",
        "add {a1}, 16",
        "add {b}, {lb}",
        "dec {d}",
        "jnz 2b",
        "3:",
        "vmovups [{c}], zmm4",
        "vmovups [{c} + 64], zmm5",
        "vmovups [{c} + {l}], zmm6",
        "vmovups [{c} + {l} + 64], zmm7",
        "vmovups [{c} + {l}*2], zmm8",
        "vmovups [{c} + {l}*2 + 64], zmm9",
        "vmovups [{c3}], zmm10",
        "vmovups [{c3} + 64], zmm11",
        "vmovups [{c4}], zmm12",
        "vmovups [{c4} + 64], zmm13",
        "vmovups [{c4} + {l}], zmm14",
        "vmovups [{c4} + {l} + 64], zmm15",
        "vmovups [{c4} + {l}*2], zmm16",
        "vmovups [{c4} + {l}*2 + 64], zmm17",
        "vmovups [{c7}], zmm18",
        "vmovups [{c7} + 64], zmm19",
        "vzeroupper",
        d = inout(reg) depth => _,
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        c = in(reg) c,
        acc = in(reg) accumulate as usize,
        a1 = inout(reg) a1 => _,
        l = in(reg) ldc * 4,
        lb = in(reg) ldb * 4,
        c3 = out(reg) _,
        c4 = out(reg) _,
        c7 = out(reg) _,
        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
        out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
        options(nostack),
    );
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `out[i][j] += Σ_t a[i·lda + t] · b[j·ldb + t]` over `t < len` (`len` a multiple of 8).
///
/// # Safety
/// The `M` rows of `a` and `N` rows of `b` must be valid for `len` floats.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // register tiles read best indexed
unsafe fn dots<const M: usize, const N: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    len: usize,
    out: &mut [[f32; 4]; 3],
) {
    let mut acc = [[_mm256_setzero_ps(); N]; M];
    let mut t = 0;
    while t < len {
        let mut av = [_mm256_setzero_ps(); M];
        for (i, v) in av.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(a.add(i * lda + t));
        }
        for j in 0..N {
            let bv = _mm256_loadu_ps(b.add(j * ldb + t));
            for i in 0..M {
                acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
            }
        }
        t += 8;
    }
    for i in 0..M {
        for j in 0..N {
            out[i][j] += hsum(acc[i][j]);
        }
    }
}

/// [`dots`] for an `m × n` tile, `m ≤ 3`, `n ≤ 4`.
///
/// # Safety
/// As [`dots`].
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_mn(
    m: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    len: usize,
    out: &mut [[f32; 4]; 3],
) {
    match (m, n) {
        (3, 4) => dots::<3, 4>(a, lda, b, ldb, len, out),
        (3, 3) => dots::<3, 3>(a, lda, b, ldb, len, out),
        (3, 2) => dots::<3, 2>(a, lda, b, ldb, len, out),
        (3, 1) => dots::<3, 1>(a, lda, b, ldb, len, out),
        (2, 4) => dots::<2, 4>(a, lda, b, ldb, len, out),
        (2, 3) => dots::<2, 3>(a, lda, b, ldb, len, out),
        (2, 2) => dots::<2, 2>(a, lda, b, ldb, len, out),
        (2, 1) => dots::<2, 1>(a, lda, b, ldb, len, out),
        (1, 4) => dots::<1, 4>(a, lda, b, ldb, len, out),
        (1, 3) => dots::<1, 3>(a, lda, b, ldb, len, out),
        (1, 2) => dots::<1, 2>(a, lda, b, ldb, len, out),
        (1, 1) => dots::<1, 1>(a, lda, b, ldb, len, out),
        _ => unreachable!("tile {m}×{n}"),
    }
}

/// A weight packed for the register tiles of each group: `rows` rows of `depth` values
/// `at(group, row, d)`, as `[group][block of W rows][depth][W]`, zero rows past `rows` — the
/// broadcast operand of [`tile`] (`W` = [`MR`]) or the vector operand of the direct kernels
/// (`W` = [`direct::CH`] or [`direct::CH_WIDE`]).
fn pack_weight<const W: usize>(
    groups: usize,
    rows: usize,
    depth: usize,
    at: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let blocks = rows.div_ceil(W);
    let mut packed = vec![0f32; groups * blocks * depth * W];
    for grp in 0..groups {
        for row in 0..rows {
            for d in 0..depth {
                packed[((grp * blocks + row / W) * depth + d) * W + row % W] = at(grp, row, d);
            }
        }
    }
    packed
}

/// The forward kernel on filled planes: for each panel of [`NR`] output pixels, the column
/// panel is gathered from the planes at `taps` and multiplied by the packed weight `apack` in
/// register tiles. `g` gives the output geometry (channels, groups, kernel depth, pixels).
/// Shared by the forward and the data gradient's sub-pixel convolutions.
struct Forward<'a> {
    g: &'a Geom,
    pl: &'a Planes,
    /// Plane offsets of the column rows, `[group][k]`.
    taps: &'a [usize],
    /// The weight packed by [`pack_weight`] as `[group][block of MR output channels][k][MR]`.
    apack: &'a [f32],
    /// 512-bit panel tiles ([`tile`]).
    wide: bool,
}

/// Per-task buffers of [`Forward::run`].
struct Scratch {
    panel: Vec<f32>,
    po: usize,
    ctiles: Vec<f32>,
    co: usize,
    rsegs: Vec<Seg>,
    isegs: Vec<Seg>,
}

impl Scratch {
    /// Buffers for kernel depths up to `k` and `cog` output channels per group.
    fn new(k: usize, cog: usize) -> Self {
        let (panel, po) = aligned(k * NR);
        let (ctiles, co) = aligned(cog.div_ceil(MR) * MR * NR);
        Self {
            panel,
            po,
            ctiles,
            co,
            rsegs: Vec::new(),
            isegs: Vec::new(),
        }
    }
}

impl Forward<'_> {
    /// `ys`: the outputs of the images whose planes fill the start of `planes`.
    fn run(&self, planes: &[f32], ys: &mut [MaybeUninit<f32>], s: &mut Scratch) {
        let (g, pl) = (self.g, self.pl);
        let (k, pix, cog, out_len) = (g.k(), g.pix(), g.cog(), g.out_len());
        let blocks = cog.div_ceil(MR);
        let ncols = ys.len() / out_len * pix;
        assert!(planes.len() >= ys.len() / out_len * pl.img + SLACK && s.panel.len() >= k * NR);
        for q0 in (0..ncols).step_by(NR) {
            let width = NR.min(ncols - q0);
            segments(g, pl, q0, width, true, &mut s.rsegs);
            segments(g, pl, q0, width, false, &mut s.isegs);
            // A full panel inside one image, for a block of MR real output channels, is
            // accumulated in place in y; the others go through `ctiles`.
            let direct = width == NR && s.isegs.len() == 1;
            let in_place = |blk: usize| direct && (blk + 1) * MR <= cog;
            for grp in 0..g.p.groups {
                let ktaps = &self.taps[grp * k..][..k];
                // Depth in slices of KC rows, so that the panel slice (KC × NR) stays in L1
                // while every block of output channels reads it.
                for kc0 in (0..k).step_by(KC) {
                    let kd = KC.min(k - kc0);
                    // SAFETY: a run reads planes[src + tap ..][..len rounded up to 8]; src + tap
                    // + len ≤ nb·img (a valid padded position of the chunk), and the planes
                    // have SLACK ≥ 8 more (asserted). Panel row r gets columns [j, j + len + 7]
                    // ⊂ [r·NR, (r + 1)·NR + 7], inside k·NR + SLACK.
                    unsafe {
                        gather(
                            s.panel.as_mut_ptr().add(s.po + kc0 * NR),
                            NR,
                            planes.as_ptr(),
                            &ktaps[kc0..kc0 + kd],
                            &s.rsegs,
                        )
                    };
                    for blk in 0..blocks {
                        let a = &self.apack[(grp * blocks + blk) * k * MR + kc0 * MR..][..kd * MR];
                        let (c, ldc) = if in_place(blk) {
                            let sg = &s.isegs[0];
                            let o = grp * cog + blk * MR;
                            let off = sg.img * out_len + o * pix + sg.p;
                            (ys[off..].as_mut_ptr().cast::<f32>(), pix)
                        } else {
                            (s.ctiles[s.co + blk * MR * NR..].as_mut_ptr(), NR)
                        };
                        // SAFETY: a holds kd·MR floats, the panel from row kc0 kd·NR; c is
                        // either a tile of ctiles (MR·NR floats) or MR rows of y, pix apart,
                        // each with NR columns left in its image.
                        unsafe {
                            tile(
                                self.wide,
                                kd,
                                a.as_ptr(),
                                s.panel.as_ptr().add(s.po + kc0 * NR),
                                NR,
                                c,
                                ldc,
                                kc0 > 0,
                            )
                        };
                    }
                }
                for blk in 0..blocks {
                    if in_place(blk) {
                        continue;
                    }
                    let c = &s.ctiles[s.co + blk * MR * NR..][..MR * NR];
                    for i in 0..MR.min(cog - blk * MR) {
                        let o = grp * cog + blk * MR + i;
                        for sg in &s.isegs {
                            put(
                                &mut ys[sg.img * out_len + o * pix + sg.p..][..sg.len],
                                &c[i * NR + sg.j..][..sg.len],
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The [`direct`] kernel's tiles for `cog` output channels per group, if they suit it: at most
/// a quarter of a tile's channels wasted. The chosen width ([`direct::Tiles::chosen`]) where
/// they fit, else the 16-channel tiles; fewer channels go to the panel kernel [`Forward`], whose
/// tiles are [`MR`] channels by [`NR`] pixels.
fn direct_tiles(cog: usize) -> Option<direct::Tiles> {
    let fits = |t: direct::Tiles| 4 * cog >= 3 * cog.next_multiple_of(t.ch());
    [direct::Tiles::chosen(), direct::Tiles::Avx2]
        .into_iter()
        .find(|&t| fits(t))
}

/// Column-matrix depth from which a forward takes the [`direct`] kernel: its results are
/// transposed into the output, a fixed cost per output value that a shallow depth does not
/// repay (the panel kernel stores in place). pixelcnn-mnist's train step (1 × 1 and split
/// masked convolutions of depth 32–96): 231.6 ms with this threshold against 243.6 with the
/// direct kernel at every depth (five alternating pairs, one thread).
const DIRECT_DEPTH: usize = 128;

/// The weight packed for the forward kernel [`Kernel::new`] builds (`rows` output channels per
/// group, `at(group, row, d)`): for the direct kernel's `tiles`, or the panel kernel.
fn pack_fwd(
    direct: Option<direct::Tiles>,
    groups: usize,
    rows: usize,
    depth: usize,
    at: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    match direct.map(direct::Tiles::ch) {
        Some(direct::CH) => pack_weight::<{ direct::CH }>(groups, rows, depth, at),
        Some(direct::CH_WIDE) => pack_weight::<{ direct::CH_WIDE }>(groups, rows, depth, at),
        Some(ch) => unreachable!("direct tiles of {ch} channels"),
        None => pack_weight::<MR>(groups, rows, depth, at),
    }
}

/// A forward kernel on filled planes (the convolution, or a sub-pixel phase of a data
/// gradient): the direct kernel on stride-1 planes, or the panel kernel on phase planes.
enum Kernel<'a> {
    Panel(Forward<'a>),
    Direct(direct::Direct<'a>),
}

/// Per-task buffers of either kernel.
enum Scratches {
    Panel(Scratch),
    Direct(direct::Scratch),
}

impl Scratches {
    /// Buffers for kernel depths up to `k` and `cog` output channels per group.
    fn new(direct: Option<direct::Tiles>, k: usize, cog: usize) -> Self {
        match direct {
            Some(tiles) => Self::Direct(direct::Scratch::new(cog, tiles.ch())),
            None => Self::Panel(Scratch::new(k, cog)),
        }
    }
}

impl<'a> Kernel<'a> {
    /// `pack` from [`pack_fwd`] with the same `direct`; `taps` from `pl`, which for the direct
    /// kernel has stride 1; `wide` from [`wide_panels`] on the calling thread.
    fn new(
        direct: Option<direct::Tiles>,
        wide: bool,
        g: &'a Geom,
        pl: &'a Planes,
        taps: &'a [usize],
        pack: &'a [f32],
    ) -> Self {
        match direct {
            Some(tiles) => Self::Direct(direct::Direct {
                g,
                pl,
                taps,
                wpack: pack,
                tiles,
            }),
            None => Self::Panel(Forward {
                g,
                pl,
                taps,
                apack: pack,
                wide,
            }),
        }
    }

    /// `ys`: the outputs of the images whose planes fill the start of `planes`.
    fn run(&self, planes: &[f32], ys: &mut [MaybeUninit<f32>], s: &mut Scratches) {
        match (self, s) {
            (Self::Direct(k), Scratches::Direct(s)) => k.run(planes, ys, s),
            (Self::Panel(k), Scratches::Panel(s)) => k.run(planes, ys, s),
            _ => unreachable!("scratch for the other kernel"),
        }
    }
}

/// Whether `g` is a stride-1, dilation-1 3 × 3 convolution padded by at most 2 (so that its data
/// gradient is one too) whose direction (`data_gradient` or the forward) [`winograd`] computes
/// faster, and `GM_WINOGRAD` is not `0`: at least [`winograd::MIN_CHANNELS`] channels per group
/// in and out, and outputs at least a quarter of the inputs — the input transform is shared by
/// the output channels, so with few of them it costs more than the products save (batch 64,
/// 7 × 7, one thread: 96 → 16 channels 1.72 ms against 1.64 direct, and the data gradient of
/// 16 → 96, from 96 channels to 16, 1.79 against 1.25; 32 → 16 on 14 × 14: 1.77 against 1.98).
/// The filter gradient goes with the forward's answer.
fn winograd_fits(g: &Geom, data_gradient: bool) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let (ins, outs) = if data_gradient {
        (g.cog(), g.cig())
    } else {
        (g.cig(), g.cog())
    };
    *ON.get_or_init(|| std::env::var("GM_WINOGRAD").map_or(true, |v| v != "0"))
        && (g.kh, g.kw) == (3, 3)
        && g.p.stride == [1, 1]
        && g.p.dilation == [1, 1]
        && g.p.padding.iter().all(|&p| p <= 2)
        && ins.min(outs) >= winograd::MIN_CHANNELS
        && 4 * outs >= ins
}

/// `y = conv2d(x, w)`.
pub(super) fn conv_fwd(g: &Geom, plan: &Plan, x: &[f32], wt: &[f32]) -> Vec<f32> {
    if winograd_fits(g, false) {
        let shape = winograd::Shape::of(g, false);
        return winograd::conv3x3(&shape, plan.per_task, x, wt, false);
    }
    let (k, cog, in_len, out_len) = (g.k(), g.cog(), g.in_len(), g.out_len());
    let direct = direct_tiles(cog).filter(|_| k >= DIRECT_DEPTH);
    // The direct kernel reads any stride from plain padded planes; the panel kernel's runs
    // need the phase planes.
    let pl = if direct.is_some() {
        Planes::flat(g)
    } else {
        Planes::new(g)
    };
    let taps = pl.taps(g);
    let pack = pack_fwd(direct, g.p.groups, cog, k, |grp, o, r| {
        wt[(grp * cog + o) * k + r]
    });
    let fwd = Kernel::new(direct, wide_panels(), g, &pl, &taps, &pack);
    let images = |task: usize, ys: &mut [MaybeUninit<f32>]| {
        let mut planes = vec![0f32; plan.nb * pl.img + SLACK];
        let mut scratch = Scratches::new(direct, k, cog);
        for (sub, ys) in ys.chunks_mut(plan.nb * out_len).enumerate() {
            let first = task * plan.per_task + sub * plan.nb;
            let nb = ys.len() / out_len;
            pl.fill_images(g, &x[first * in_len..][..nb * in_len], &mut planes);
            fwd.run(&planes, ys, &mut scratch);
        }
    };
    // SAFETY: every task writes all of its images' outputs: the panels (or pixel groups) cover
    // every pixel of the chunk, and each block of output channels is stored (the panel kernel's
    // in place or from `ctiles`, the direct kernel's from its tile results).
    unsafe { crate::kernels::cpu::par_written(g.n * out_len, plan.per_task * out_len, images) }
}

/// One sub-pixel phase `(py, px)` of the data gradient: the input pixels `(s·a + py, s·b + px)`
/// receive only the kernel taps `ky·d ≡ py + p (mod s)` (and likewise in x), from `dy` at
/// `(a + offy, b + offx)` with `off = (py + p − ky·d) / s` — a stride-1 convolution of `dy`.
struct Phase {
    /// `(ky, offy)` and `(kx, offx)` of the taps that reach this phase.
    ty: Vec<(usize, isize)>,
    tx: Vec<(usize, isize)>,
    /// Input pixels of the phase: `ha × wa`.
    ha: usize,
    wa: usize,
}

impl Phase {
    fn axis(
        phase: usize,
        size: usize,
        kernel: usize,
        s: usize,
        p: usize,
        d: usize,
    ) -> (Vec<(usize, isize)>, usize) {
        let taps = (0..kernel)
            .filter_map(|k| {
                let num = (phase + p) as isize - (k * d) as isize;
                (num.rem_euclid(s as isize) == 0).then(|| (k, num.div_euclid(s as isize)))
            })
            .collect();
        (taps, size.saturating_sub(phase).div_ceil(s))
    }

    fn all(g: &Geom) -> Vec<Self> {
        let ([sh, sw], [ph, pw], [dh, dw]) = (g.p.stride, g.p.padding, g.p.dilation);
        let rows: Vec<_> = (0..sh)
            .map(|py| Self::axis(py, g.h, g.kh, sh, ph, dh))
            .collect();
        let cols: Vec<_> = (0..sw)
            .map(|px| Self::axis(px, g.w, g.kw, sw, pw, dw))
            .collect();
        rows.iter()
            .flat_map(|(ty, ha)| {
                cols.iter().map(|(tx, wa)| Self {
                    ty: ty.clone(),
                    tx: tx.clone(),
                    ha: *ha,
                    wa: *wa,
                })
            })
            .collect()
    }
}

/// Padding of `dy` along one axis that every phase's reads `a + off` (`a < ha`, `dy` size `n`)
/// stay within.
fn phase_padding(n: usize, reach: impl Iterator<Item = (usize, isize)>) -> usize {
    reach
        .map(|(len, off)| {
            let below = (-off).max(0) as usize;
            let above = (len as isize - 1 + off - (n as isize - 1)).max(0) as usize;
            below.max(above)
        })
        .max()
        .unwrap_or(0)
}

/// The sub-pixel data gradient needs this many `dx` channels per group (below, a register tile
/// of [`MR`] channels is mostly empty and col2im is faster)…
const SUBPIXEL_CHANNELS: usize = 16;
/// …and this many pixels per phase of an image (below, panels break into short runs and the
/// gather costs more than col2im's adds: 1.06× faster at 14 × 14 per phase, 0.94–0.97× at 7 × 7,
/// measured with `gm bench --ops` at one thread).
const SUBPIXEL_PIXELS: usize = 100;

/// `dx = conv2d_backward_data(dy, w)` (the transposed convolution of `dy` by `w`), as `s_h·s_w`
/// sub-pixel forward convolutions of `dy`: each phase of `dx` (the pixels `≡ (py, px)` modulo
/// the stride) is a stride-1 convolution of `dy` with the kernel taps that reach it, flipped
/// and with the channel axes swapped. Each phase is computed by a [`Kernel`] into a buffer and
/// interleaved into `dx` (written directly at stride 1) — no col2im adds. Few channels or small
/// phases go to [`conv_bwd_data_col2im`].
pub(super) fn conv_bwd_data(g: &Geom, plan: &Plan, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    if winograd_fits(g, true) {
        // dx = conv3x3(dy, w flipped, channel axes swapped), padded by 2 − p.
        let shape = winograd::Shape::of(g, true);
        return winograd::conv3x3(&shape, plan.per_task, dy, wt, true);
    }
    let phase_pixels = g.h * g.w / (g.p.stride[0] * g.p.stride[1]);
    if g.cig() < SUBPIXEL_CHANNELS || phase_pixels < SUBPIXEL_PIXELS {
        return conv_bwd_data_col2im(g, plan, dy, wt);
    }
    let (cog, cig, in_len, out_len) = (g.cog(), g.cig(), g.in_len(), g.out_len());
    let (kk, groups) = (g.kh * g.kw, g.p.groups);
    let phases = Phase::all(g);
    let pad = [
        phase_padding(
            g.ho,
            phases
                .iter()
                .flat_map(|f| f.ty.iter().map(|&(_, o)| (f.ha, o))),
        ),
        phase_padding(
            g.wo,
            phases
                .iter()
                .flat_map(|f| f.tx.iter().map(|&(_, o)| (f.wa, o))),
        ),
    ];
    // dy as the input of stride-1 convolutions; one set of planes serves every phase.
    let as_input = |f: &Phase| Geom {
        n: g.n,
        ci: g.co,
        h: g.ho,
        w: g.wo,
        co: g.ci,
        kh: f.ty.len(),
        kw: f.tx.len(),
        ho: f.ha,
        wo: f.wa,
        p: super::Conv2dParams {
            stride: [1, 1],
            padding: pad,
            dilation: [1, 1],
            groups,
        },
    };
    let geoms: Vec<Geom> = phases.iter().map(as_input).collect();
    let direct = direct_tiles(cig).filter(|_| geoms.iter().any(|gp| gp.k() >= DIRECT_DEPTH));
    let wide = wide_panels();
    let pl = Planes::new(&geoms[0]);
    let work: Vec<(Vec<usize>, Vec<f32>)> = phases
        .iter()
        .zip(&geoms)
        .map(|(f, gp)| {
            let mut taps = Vec::with_capacity(g.co * f.ty.len() * f.tx.len());
            for o in 0..g.co {
                for &(_, oy) in &f.ty {
                    for &(_, ox) in &f.tx {
                        let y = (pad[0] as isize + oy) as usize;
                        taps.push(pl.at(o, y, (pad[1] as isize + ox) as usize));
                    }
                }
            }
            let t = f.tx.len();
            let apack = pack_fwd(direct, groups, cig, gp.k(), |grp, c, d| {
                let (o, ky, kx) = (
                    d / (f.ty.len() * t),
                    f.ty[d / t % f.ty.len()].0,
                    f.tx[d % t].0,
                );
                wt[((grp * cog + o) * cig + c) * kk + ky * g.kw + kx]
            });
            (taps, apack)
        })
        .collect();
    let kmax = geoms.iter().map(Geom::k).max().unwrap_or(0);
    let single = phases.len() == 1;
    let [sh, sw] = g.p.stride;
    let images = |task: usize, xs: &mut [MaybeUninit<f32>]| {
        let mut planes = vec![0f32; plan.nb * pl.img + SLACK];
        let mut scratch = Scratches::new(direct, kmax, cig);
        let mut parts: Vec<Vec<MaybeUninit<f32>>> = vec![Vec::new(); phases.len()];
        for (sub, xs) in xs.chunks_mut(plan.nb * in_len).enumerate() {
            let first = task * plan.per_task + sub * plan.nb;
            let nb = xs.len() / in_len;
            pl.fill_images(
                &geoms[0],
                &dy[first * out_len..][..nb * out_len],
                &mut planes,
            );
            for ((part, gp), (taps, apack)) in parts.iter_mut().zip(&geoms).zip(&work) {
                let fwd = Kernel::new(direct, wide, gp, &pl, taps, apack);
                if single {
                    fwd.run(&planes, xs, &mut scratch);
                    continue;
                }
                part.resize(nb * gp.out_len(), MaybeUninit::new(0.0));
                if gp.k() > 0 {
                    fwd.run(&planes, part, &mut scratch);
                } else {
                    part.fill(MaybeUninit::new(0.0));
                }
            }
            if single {
                continue;
            }
            // dx[.., sh·a + py, sw·b + px] = parts[py·sw + px][.., a, b], row by row.
            for (plane, dst) in xs.chunks_exact_mut(g.h * g.w).enumerate() {
                for (iy, row) in dst.chunks_exact_mut(g.w).enumerate() {
                    let (py, a) = (iy % sh, iy / sh);
                    let src = |px: usize| {
                        let f = &phases[py * sw + px];
                        &parts[py * sw + px][(plane * f.ha + a) * f.wa..][..f.wa]
                    };
                    if sw == 2 && g.w >= 2 {
                        interleave2(row, src(0), src(1));
                    } else {
                        for px in 0..sw.min(g.w) {
                            for (d, v) in row[px..].iter_mut().step_by(sw).zip(src(px)) {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    };
    // SAFETY: every task writes all of its images' dx: each dx pixel lies in exactly one phase,
    // whose kernel run (or zero fill, for a phase no tap reaches) wrote every element of its
    // part, copied row by row; or the single phase's run wrote `xs` directly.
    unsafe { crate::kernels::cpu::par_written(g.n * in_len, plan.per_task * in_len, images) }
}

/// `row[2b] = even[b]`, `row[2b + 1] = odd[b]` (`even` has `⌈len/2⌉` values, `odd` `⌊len/2⌋`).
fn interleave2(row: &mut [MaybeUninit<f32>], even: &[MaybeUninit<f32>], odd: &[MaybeUninit<f32>]) {
    assert!(even.len() == row.len().div_ceil(2) && odd.len() == row.len() / 2);
    // SAFETY: the vector loop reads 8 values of each source and writes 16 of row while
    // b + 8 ≤ odd.len() (so 2b + 16 ≤ row.len()); the tail is bounds-checked.
    unsafe { interleave2_avx(row, even, odd) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn interleave2_avx(
    row: &mut [MaybeUninit<f32>],
    even: &[MaybeUninit<f32>],
    odd: &[MaybeUninit<f32>],
) {
    let (e, o, d) = (
        even.as_ptr().cast::<f32>(),
        odd.as_ptr().cast::<f32>(),
        row.as_mut_ptr().cast::<f32>(),
    );
    let mut b = 0;
    while b + 8 <= odd.len() {
        let (ev, ov) = (_mm256_loadu_ps(e.add(b)), _mm256_loadu_ps(o.add(b)));
        let lo = _mm256_unpacklo_ps(ev, ov); // e0 o0 e1 o1 | e4 o4 e5 o5
        let hi = _mm256_unpackhi_ps(ev, ov); // e2 o2 e3 o3 | e6 o6 e7 o7
        _mm256_storeu_ps(d.add(2 * b), _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(d.add(2 * b + 8), _mm256_permute2f128_ps(lo, hi, 0x31));
        b += 8;
    }
    for (i, v) in even.iter().enumerate().skip(b) {
        row[2 * i] = *v;
    }
    for (i, v) in odd.iter().enumerate().skip(b) {
        row[2 * i + 1] = *v;
    }
}

/// [`conv_bwd_data`] by col2im: the weight's transpose times an `NR`-wide panel of `dy` gives a
/// column panel, which is added onto gradient planes while it is still in L1. Cheaper than the
/// sub-pixel convolutions when `dx` has few channels per group (a register tile of `MR`
/// channels would be mostly empty).
fn conv_bwd_data_col2im(g: &Geom, plan: &Plan, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    let (k, pix, cog, in_len, out_len) = (g.k(), g.pix(), g.cog(), g.in_len(), g.out_len());
    let groups = g.p.groups;
    let pl = Planes::new(g);
    let taps = pl.taps(g);
    let blocks = k.div_ceil(MR);
    // The weight's transpose packed as [group][block of MR column rows][cog][MR].
    let apack = pack_weight::<MR>(groups, k, cog, |grp, r, o| wt[(grp * cog + o) * k + r]);
    let wide = wide_panels();
    let images = |task: usize, xs: &mut [MaybeUninit<f32>]| {
        let mut planes = vec![0f32; plan.nb * pl.img + SLACK];
        let (mut bpanel, bo) = aligned(cog * NR);
        let (mut colp, co) = aligned(blocks * MR * NR);
        let (mut rsegs, mut isegs) = (Vec::new(), Vec::new());
        for (sub, xs) in xs.chunks_mut(plan.nb * in_len).enumerate() {
            let first = task * plan.per_task + sub * plan.nb;
            let nb = xs.len() / in_len;
            planes[..nb * pl.img].fill(0.0);
            let ncols = nb * pix;
            for q0 in (0..ncols).step_by(NR) {
                let width = NR.min(ncols - q0);
                segments(g, &pl, q0, width, true, &mut rsegs);
                segments(g, &pl, q0, width, false, &mut isegs);
                for grp in 0..groups {
                    // A full panel inside one image is read in place from dy; others are
                    // packed.
                    let (b, ldb) = if width == NR && isegs.len() == 1 {
                        let s = &isegs[0];
                        let off = (first + s.img) * out_len + grp * cog * pix + s.p;
                        (dy[off..].as_ptr(), pix)
                    } else {
                        // SAFETY: the panel has cog rows of NR plus SLACK floats.
                        unsafe {
                            pack_rows(
                                bpanel.as_mut_ptr().add(bo),
                                dy,
                                first * out_len + grp * cog * pix,
                                [cog, pix, out_len],
                                &isegs,
                            )
                        };
                        (bpanel[bo..].as_ptr(), NR)
                    };
                    for blk in 0..blocks {
                        let a = &apack[(grp * blocks + blk) * cog * MR..][..cog * MR];
                        // SAFETY: a holds cog·MR floats; b has cog rows of NR floats ldb
                        // apart (inside one image of dy, or the panel); colp blocks·MR·NR.
                        unsafe {
                            tile(
                                wide,
                                cog,
                                a.as_ptr(),
                                b,
                                ldb,
                                colp.as_mut_ptr().add(co + blk * MR * NR),
                                NR,
                                false,
                            )
                        };
                    }
                    // SAFETY: as in the forward's panel copy, every run lies inside the
                    // planes buffer with at most 7 floats past a valid position (SLACK ≥ 8),
                    // and reads colp row r at [j, j + len + 7] ⊂ the buffer; the planes are
                    // this task's own.
                    unsafe {
                        scatter(
                            planes.as_mut_ptr(),
                            colp.as_ptr().add(co),
                            NR,
                            &taps[grp * k..][..k],
                            &rsegs,
                        )
                    };
                }
            }
            for b in 0..nb {
                pl.extract(
                    g,
                    &planes[b * pl.img..][..pl.img],
                    &mut xs[b * in_len..][..in_len],
                );
            }
        }
    };
    // SAFETY: every task extracts all of its images' planes into its chunk of dx.
    unsafe { crate::kernels::cpu::par_written(g.n * in_len, plan.per_task * in_len, images) }
}

/// Column-matrix depth from which the filter gradient takes the [`direct`] kernel.
const FILTER_DIRECT_DEPTH: usize = 64;

/// `dw = conv2d_backward_filter(x, dy)`, summed over the batch: by [`winograd`] where the
/// forward runs there ([`winograd_fits`]; its products in the [`direct`] filter tiles), by the
/// [`direct`] kernel ([`direct::filter`]) with enough output channels and depth, otherwise by dot
/// products along the pixels.
pub(super) fn conv_bwd_filter(g: &Geom, plan: &Plan, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, pix, cog, in_len, out_len) = (g.k(), g.pix(), g.cog(), g.in_len(), g.out_len());
    if let Some(tiles) = direct_tiles(cog).filter(|_| winograd_fits(g, false)) {
        let s = winograd::Shape::of(g, false);
        let len = winograd::filter_acc_len(&s, tiles.ch());
        let task = |first: usize, last: usize| {
            winograd::filter_part(
                &s,
                tiles,
                &x[first * in_len..last * in_len],
                &dy[first * out_len..last * out_len],
            )
        };
        return winograd::filter_unpack(&s, &sum_tasks(g, plan, len, task), tiles.ch());
    }
    // The direct kernel transposes dy first; a shallow column matrix (one input channel's 16
    // taps: 1.7 ms against 1.4 for conv 1 → 32 k4s2 on 28 × 28) does too little with it.
    if let Some(tiles) = direct_tiles(cog).filter(|_| k >= FILTER_DIRECT_DEPTH) {
        let pl = Planes::flat(g);
        let taps = pl.taps(g);
        let len = direct::filter_acc_len(g, tiles.ch());
        let task = |first: usize, last: usize| -> Vec<f32> {
            let mut acc = vec![0f32; len];
            let mut planes = vec![0f32; plan.nb * pl.img + SLACK];
            for first in (first..last).step_by(plan.nb) {
                let nb = plan.nb.min(last - first);
                pl.fill_images(g, &x[first * in_len..][..nb * in_len], &mut planes);
                let dys = &dy[first * out_len..][..nb * out_len];
                direct::filter(g, &pl, &taps, &planes, dys, &mut acc, tiles);
            }
            acc
        };
        return direct::filter_unpack(g, &sum_tasks(g, plan, len, task), tiles.ch());
    }
    let groups = g.p.groups;
    let pl = Planes::new(g);
    let taps = pl.taps(g);
    let wlen = g.co * k;
    let cap = (plan.nb * pix).next_multiple_of(8);
    let task = |first: usize, last: usize| -> Vec<f32> {
        let mut acc = vec![0f32; wlen];
        let mut planes = vec![0f32; plan.nb * pl.img + SLACK];
        // Four column rows at a time, gathered just before the dot products read them, so
        // they stay in L1 instead of a whole column matrix streaming through L3.
        let (mut colc, co) = aligned(4 * cap);
        // Single images whose pixel count is a multiple of 8: dy's rows are read in place.
        let in_place = plan.nb == 1 && pix % 8 == 0;
        let (mut dyc, dof) = aligned(if in_place { 0 } else { cog * cap });
        let mut rsegs = Vec::new();
        for first in (first..last).step_by(plan.nb) {
            let nb = plan.nb.min(last - first);
            pl.fill_images(g, &x[first * in_len..][..nb * in_len], &mut planes);
            let ncols = nb * pix;
            let w8 = ncols.next_multiple_of(8);
            segments(g, &pl, 0, ncols, true, &mut rsegs);
            for grp in 0..groups {
                let (dyp, ld) = if in_place {
                    (dy[first * out_len + grp * cog * pix..].as_ptr(), pix)
                } else {
                    for o in 0..cog {
                        let row = &mut dyc[dof + o * w8..][..w8];
                        for b in 0..nb {
                            row[b * pix..][..pix].copy_from_slice(
                                &dy[(first + b) * out_len + (grp * cog + o) * pix..][..pix],
                            );
                        }
                        row[ncols..].fill(0.0);
                    }
                    (dyc[dof..].as_ptr(), w8)
                };
                for r0 in (0..k).step_by(4) {
                    let n = 4.min(k - r0);
                    // SAFETY: as in the forward's panel copy; row r of colc gets columns
                    // [j, j + len + 7] ⊂ [r·w8, (r + 1)·w8 + 7], inside 4·cap + SLACK.
                    unsafe {
                        gather(
                            colc.as_mut_ptr().add(co),
                            w8,
                            planes.as_ptr(),
                            &taps[grp * k + r0..][..n],
                            &rsegs,
                        )
                    };
                    for r in 0..n {
                        colc[co + r * w8 + ncols..co + (r + 1) * w8].fill(0.0);
                    }
                    for o0 in (0..cog).step_by(3) {
                        let m = 3.min(cog - o0);
                        let mut out = [[0f32; 4]; 3];
                        // SAFETY: rows o0..o0 + m of dy (in place, or of dyc) hold w8 floats
                        // ld apart, rows 0..n of colc w8 floats.
                        unsafe {
                            dots_mn(
                                m,
                                n,
                                dyp.add(o0 * ld),
                                ld,
                                colc.as_ptr().add(co),
                                w8,
                                w8,
                                &mut out,
                            )
                        };
                        for (i, row) in out.iter().enumerate().take(m) {
                            let dst = &mut acc[(grp * cog + o0 + i) * k + r0..][..n];
                            for (d, v) in dst.iter_mut().zip(row) {
                                *d += *v;
                            }
                        }
                    }
                }
            }
        }
        acc
    };
    sum_tasks(g, plan, wlen, task)
}

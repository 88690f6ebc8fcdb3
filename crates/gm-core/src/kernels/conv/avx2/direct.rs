//! Direct convolution: input pixels broadcast against vectors of output-channel weights.
//!
//! The register tile is [`PX`] output pixels × `ch` output channels, two vectors wide: 16
//! channels in 256-bit vectors (AVX2), or 32 in 512-bit ones where the CPU has AVX-512 ([`Tiles`]
//! picks). Each step of its depth loop reads one column-matrix row `(c, ky, kx)`: the weights of
//! the `ch` channels (two vectors, packed) and, for each pixel, the one input value that tap
//! reads, broadcast straight from the zero-padded input plane. The pixels are independent
//! addresses, so any stride, dilation or row break costs nothing: no column panel is gathered,
//! and the planes are plain padded copies of the images (whole rows copied). The tile's results
//! are pixel-major; they are transposed into the `(channel, pixel)` output once, after the whole
//! depth.
//!
//! The filter gradient ([`filter`]) has the same shape with the roles turned: a tile is [`PX`]
//! column-matrix rows × `ch` output channels, its loop runs over the pixels, and per pixel it
//! reads the `ch` values of a pixel-major copy of `dy` and broadcasts the input value each of
//! the rows reads there.
//!
//! Every lane of a tile computes its output by the same sequence of fused multiply-adds whatever
//! the width, so both widths give the same bits; everything but the two assembly loops is shared
//! and takes the width as a value. The wide tiles also run as plain Rust ([`Tiles::WideRust`],
//! `GM_CONV=wide` on a CPU without AVX-512), which tests that shared logic at 32 channels
//! anywhere.

use super::{aligned, segments, Planes, Seg, KC};
use crate::kernels::conv::{Geom, TileWidth};
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Pixels of a register tile (the broadcast operand).
pub(super) const PX: usize = 6;
/// Output channels of a 256-bit register tile: two vectors of eight.
pub(super) const CH: usize = 16;
/// Output channels of a 512-bit register tile: two vectors of sixteen.
pub(super) const CH_WIDE: usize = 32;
/// Pixels per group: the tiles of a group share the weight slice and the planes' lines in L1.
const GROUP: usize = PX * 8;

/// The register tiles the direct kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tiles {
    /// [`CH`] channels in `ymm` registers (AVX2 + FMA).
    Avx2,
    /// [`CH_WIDE`] channels in `zmm` registers (AVX-512F).
    Avx512,
    /// [`CH_WIDE`] channels computed by plain Rust with the same fused multiply-adds: the wide
    /// layout on a CPU without AVX-512, to test it (slow; only when asked for).
    WideRust,
}

impl Tiles {
    /// Output channels per tile.
    pub fn ch(self) -> usize {
        match self {
            Self::Avx2 => CH,
            Self::Avx512 | Self::WideRust => CH_WIDE,
        }
    }

    /// The tiles of the width asked for: by [`crate::kernels::conv::with_tile_width`] on this
    /// thread, else by `GM_CONV` (`avx2`: narrow; `wide`: wide), else the widest this CPU runs.
    pub fn chosen() -> Self {
        let width = WIDTH.with(Cell::get).unwrap_or_else(|| {
            static FROM_ENV: OnceLock<TileWidth> = OnceLock::new();
            *FROM_ENV.get_or_init(|| match std::env::var("GM_CONV").as_deref() {
                Ok("avx2") => TileWidth::Narrow,
                Ok("wide") => TileWidth::Wide,
                _ => TileWidth::Auto,
            })
        });
        match (width, avx512()) {
            (TileWidth::Narrow, _) | (TileWidth::Auto, false) => Self::Avx2,
            (TileWidth::Auto | TileWidth::Wide, true) => Self::Avx512,
            (TileWidth::Wide, false) => Self::WideRust,
        }
    }
}

thread_local! {
    /// The width [`crate::kernels::conv::with_tile_width`] set on this thread.
    pub(super) static WIDTH: Cell<Option<TileWidth>> = const { Cell::new(None) };
}

/// Whether this CPU runs AVX-512F.
pub(super) fn avx512() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// Assembly that loads the 12 accumulators `ymm4`–`ymm15` from 12 consecutive vectors at `{c}`
/// (a `[PX][CH]` tile).
macro_rules! load_acc {
    () => {
        concat!(
            "vmovups ymm4, [{c}]\n",
            "vmovups ymm5, [{c} + 32]\n",
            "vmovups ymm6, [{c} + 64]\n",
            "vmovups ymm7, [{c} + 96]\n",
            "vmovups ymm8, [{c} + 128]\n",
            "vmovups ymm9, [{c} + 160]\n",
            "vmovups ymm10, [{c} + 192]\n",
            "vmovups ymm11, [{c} + 224]\n",
            "vmovups ymm12, [{c} + 256]\n",
            "vmovups ymm13, [{c} + 288]\n",
            "vmovups ymm14, [{c} + 320]\n",
            "vmovups ymm15, [{c} + 352]\n",
        )
    };
}

/// Assembly that stores the 12 accumulators back where [`load_acc`] reads them.
macro_rules! store_acc {
    () => {
        concat!(
            "vmovups [{c}], ymm4\n",
            "vmovups [{c} + 32], ymm5\n",
            "vmovups [{c} + 64], ymm6\n",
            "vmovups [{c} + 96], ymm7\n",
            "vmovups [{c} + 128], ymm8\n",
            "vmovups [{c} + 160], ymm9\n",
            "vmovups [{c} + 192], ymm10\n",
            "vmovups [{c} + 224], ymm11\n",
            "vmovups [{c} + 256], ymm12\n",
            "vmovups [{c} + 288], ymm13\n",
            "vmovups [{c} + 320], ymm14\n",
            "vmovups [{c} + 352], ymm15\n",
        )
    };
}

/// [`load_acc`] for 512-bit vectors: the 12 accumulators `zmm4`–`zmm15` from `[{c}]`.
macro_rules! load_acc_zmm {
    () => {
        concat!(
            "vmovups zmm4, [{c}]\n",
            "vmovups zmm5, [{c} + 64]\n",
            "vmovups zmm6, [{c} + 128]\n",
            "vmovups zmm7, [{c} + 192]\n",
            "vmovups zmm8, [{c} + 256]\n",
            "vmovups zmm9, [{c} + 320]\n",
            "vmovups zmm10, [{c} + 384]\n",
            "vmovups zmm11, [{c} + 448]\n",
            "vmovups zmm12, [{c} + 512]\n",
            "vmovups zmm13, [{c} + 576]\n",
            "vmovups zmm14, [{c} + 640]\n",
            "vmovups zmm15, [{c} + 704]\n",
        )
    };
}

/// [`store_acc`] for 512-bit vectors.
macro_rules! store_acc_zmm {
    () => {
        concat!(
            "vmovups [{c}], zmm4\n",
            "vmovups [{c} + 64], zmm5\n",
            "vmovups [{c} + 128], zmm6\n",
            "vmovups [{c} + 192], zmm7\n",
            "vmovups [{c} + 256], zmm8\n",
            "vmovups [{c} + 320], zmm9\n",
            "vmovups [{c} + 384], zmm10\n",
            "vmovups [{c} + 448], zmm11\n",
            "vmovups [{c} + 512], zmm12\n",
            "vmovups [{c} + 576], zmm13\n",
            "vmovups [{c} + 640], zmm14\n",
            "vmovups [{c} + 704], zmm15\n",
        )
    };
}

/// Zeroes the 12 accumulators `zmm4`–`zmm15` (`vpxord`: AVX-512F; `vxorps` on `zmm` needs DQ).
macro_rules! zero_acc_zmm {
    () => {
        concat!(
            "vpxord zmm4, zmm4, zmm4\n",
            "vpxord zmm5, zmm5, zmm5\n",
            "vpxord zmm6, zmm6, zmm6\n",
            "vpxord zmm7, zmm7, zmm7\n",
            "vpxord zmm8, zmm8, zmm8\n",
            "vpxord zmm9, zmm9, zmm9\n",
            "vpxord zmm10, zmm10, zmm10\n",
            "vpxord zmm11, zmm11, zmm11\n",
            "vpxord zmm12, zmm12, zmm12\n",
            "vpxord zmm13, zmm13, zmm13\n",
            "vpxord zmm14, zmm14, zmm14\n",
            "vpxord zmm15, zmm15, zmm15\n",
        )
    };
}

/// One row pair of a register tile's step, in `ymm` (`v = "ymm"`) or `zmm`: the value at `$a`
/// broadcast into `{v}$b`, then `{v}$acc0 += {v}$b · {v}0` and `{v}$acc1 += {v}$b · {v}1`.
#[rustfmt::skip]
macro_rules! fma_row {
    ($v:literal, $b:literal, $acc0:literal, $acc1:literal, $a:literal) => {
        concat!(
            "vbroadcastss ", $v, $b, ", dword ptr ", $a, "\n",
            "vfmadd231ps ", $v, $acc0, ", ", $v, $b, ", ", $v, "0\n",
            "vfmadd231ps ", $v, $acc1, ", ", $v, $b, ", ", $v, "1\n",
        )
    };
}

/// The FMA rows of a register tile's step: the weights (or `dy` values) `{v}0`, `{v}1` against
/// the broadcast of each of the six pixel (or row) values `$a`, alternating `{v}2` and `{v}3`,
/// into the accumulators `{v}4`–`{v}15`.
#[rustfmt::skip]
macro_rules! fma_rows {
    ($v:literal, $a0:literal, $a1:literal, $a2:literal, $a3:literal, $a4:literal, $a5:literal) => {
        concat!(
            fma_row!($v, "2", "4", "5", $a0),
            fma_row!($v, "3", "6", "7", $a1),
            fma_row!($v, "2", "8", "9", $a2),
            fma_row!($v, "3", "10", "11", $a3),
            fma_row!($v, "2", "12", "13", $a4),
            fma_row!($v, "3", "14", "15", $a5),
        )
    };
}

/// `c (PX × ch) = [c +] Σ_d px[i][taps[d]] · w[d][j]` in `tiles`' registers: `w` packed as
/// `[depth][ch]`, `c` row-major `[PX][ch]` (`ch` = [`Tiles::ch`]).
///
/// # Safety
/// `taps` valid for `depth` offsets, `w` for `depth·ch` floats, each `px[i].add(taps[d])` for
/// one float, `c` for `PX·ch` floats; `tiles` runnable on this CPU.
unsafe fn tile(
    tiles: Tiles,
    depth: usize,
    taps: *const usize,
    w: *const f32,
    px: &[*const f32; PX],
    c: *mut f32,
    accumulate: bool,
) {
    match tiles {
        Tiles::Avx2 => tile_avx2(depth, taps, w, px, c, accumulate),
        Tiles::Avx512 => tile_avx512(depth, taps, w, px, c, accumulate),
        Tiles::WideRust => {
            let rows: [_; PX] = std::array::from_fn(|i| move |d: usize| *px[i].add(*taps.add(d)));
            tile_rust(CH_WIDE, depth, &rows, w, c, accumulate)
        }
    }
}

/// Plain Rust of the tiles' arithmetic: `c[i][j] (= or +=) Σ_d row_i(d) · w[d][j]`, one fused
/// multiply-add per step in `d` order, as every lane of the assembly tiles does.
///
/// # Safety
/// `w` valid for `depth·ch` floats, `c` for `PX·ch`, each `rows[i]` for `d < depth`.
unsafe fn tile_rust(
    ch: usize,
    depth: usize,
    rows: &[impl Fn(usize) -> f32; PX],
    w: *const f32,
    c: *mut f32,
    accumulate: bool,
) {
    for (i, row) in rows.iter().enumerate() {
        let acc = std::slice::from_raw_parts_mut(c.add(i * ch), ch);
        if !accumulate {
            acc.fill(0.0);
        }
        for d in 0..depth {
            let (v, wd) = (row(d), std::slice::from_raw_parts(w.add(d * ch), ch));
            for (a, &wj) in acc.iter_mut().zip(wd) {
                *a = v.mul_add(wj, *a);
            }
        }
    }
}

/// Defines a forward register tile ([`tile`]'s arithmetic) in one vector width: `$v` the
/// register prefix (`"ymm"` or `"zmm"`), `$vb` a vector's bytes, `$step` two vectors' bytes, the
/// accumulator macros of that width, and the 16 registers it clobbers (asm! takes only literal
/// register names).
macro_rules! tile_fn {
    ($(#[$m:meta])* $name:ident, $feature:literal, $v:literal, $vb:literal, $step:literal,
     $load:ident, $zero:ident, $store:ident, [$($r:tt),*]) => {
        $(#[$m])*
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            depth: usize,
            taps: *const usize,
            w: *const f32,
            px: &[*const f32; PX],
            c: *mut f32,
            accumulate: bool,
        ) {
            std::arch::asm!(
                "test {acc}, {acc}",
                "jz 4f",
                $load!(),
                "jmp 5f",
                "4:",
                $zero!(),
                "5:",
                "test {d}, {d}",
                "jz 3f",
                "2:",
                "mov {t}, [{tp}]",
                concat!("vmovups ", $v, "0, [{w}]"),
                concat!("vmovups ", $v, "1, [{w} + ", $vb, "]"),
                fma_rows!(
                    $v,
                    "[{p0} + {t}*4]",
                    "[{p1} + {t}*4]",
                    "[{p2} + {t}*4]",
                    "[{p3} + {t}*4]",
                    "[{p4} + {t}*4]",
                    "[{p5} + {t}*4]"
                ),
                "add {tp}, 8",
                concat!("add {w}, ", $step),
                "dec {d}",
                "jnz 2b",
                "3:",
                $store!(),
                "vzeroupper",
                d = inout(reg) depth => _,
                tp = inout(reg) taps => _,
                w = inout(reg) w => _,
                t = out(reg) _,
                p0 = in(reg) px[0],
                p1 = in(reg) px[1],
                p2 = in(reg) px[2],
                p3 = in(reg) px[3],
                p4 = in(reg) px[4],
                p5 = in(reg) px[5],
                c = in(reg) c,
                acc = in(reg) accumulate as usize,
                $(out($r) _,)*
                options(nostack),
            );
        }
    };
}

const _: () = assert!(PX == 6 && CH == 16 && CH_WIDE == 32);

tile_fn!(
    /// [`tile`] in 256-bit vectors ([`CH`] channels). 12 accumulators, two weight vectors and two
    /// broadcasts use all 16 vector registers.
    ///
    /// # Safety
    /// As [`tile`], with `ch` = [`CH`]; the CPU has AVX2 and FMA.
    tile_avx2, "avx2,fma", "ymm", "32", "64", load_acc, zero_acc, store_acc,
    ["ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7",
     "ymm8", "ymm9", "ymm10", "ymm11", "ymm12", "ymm13", "ymm14", "ymm15"]
);

tile_fn!(
    /// [`tile`] in 512-bit vectors ([`CH_WIDE`] channels): the same loop in `zmm` registers,
    /// each instruction twice the channels.
    ///
    /// # Safety
    /// As [`tile`], with `ch` = [`CH_WIDE`]; the CPU has AVX-512F.
    tile_avx512, "avx512f", "zmm", "64", "128", load_acc_zmm, zero_acc_zmm, store_acc_zmm,
    ["zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7",
     "zmm8", "zmm9", "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15"]
);

/// The direct kernel on filled stride-1 planes: `g` gives the output geometry (channels,
/// groups, kernel depth, pixels, and the stride at which output pixels step through the
/// planes).
pub(super) struct Direct<'a> {
    pub g: &'a Geom,
    /// Padded planes of one image (stride 1: one phase).
    pub pl: &'a Planes,
    /// Plane offsets of the column rows from an output pixel's origin, `[group][k]`.
    pub taps: &'a [usize],
    /// The weight packed by [`super::pack_weight`] in blocks of `tiles.ch()` output channels.
    pub wpack: &'a [f32],
    pub tiles: Tiles,
}

/// Per-task buffers of [`Direct::run`].
pub(super) struct Scratch {
    cbuf: Vec<f32>,
    co: usize,
    isegs: Vec<Seg>,
}

impl Scratch {
    /// Buffers for `cog` output channels per group in tiles of `ch`.
    pub fn new(cog: usize, ch: usize) -> Self {
        let (cbuf, co) = aligned(cog.div_ceil(ch) * GROUP * ch);
        Self {
            cbuf,
            co,
            isegs: Vec::new(),
        }
    }
}

impl Direct<'_> {
    /// `ys`: the outputs of the images whose planes fill the start of `planes`.
    pub fn run(&self, planes: &[f32], ys: &mut [MaybeUninit<f32>], s: &mut Scratch) {
        let (g, pl, ch) = (self.g, self.pl, self.tiles.ch());
        assert_eq!((pl.sh, pl.sw), (1, 1));
        let (k, pix, cog, out_len) = (g.k(), g.pix(), g.cog(), g.out_len());
        let blocks = cog.div_ceil(ch);
        let nimg = ys.len() / out_len;
        let ncols = nimg * pix;
        assert!(planes.len() >= nimg * pl.img && s.cbuf.len() >= s.co + blocks * GROUP * ch);
        assert!(self.wpack.len() >= g.p.groups * blocks * k * ch);
        assert!(self.tiles != Tiles::Avx512 || avx512());
        let mut px = [planes.as_ptr(); GROUP];
        for q0 in (0..ncols).step_by(GROUP) {
            let width = GROUP.min(ncols - q0);
            for (j, p) in px.iter_mut().enumerate() {
                // Pixels past the chunk repeat its last one: read, computed and dropped.
                *p = planes[pl.origin(g, q0 + j.min(width - 1))..].as_ptr();
            }
            segments(g, pl, q0, width, false, &mut s.isegs);
            let tiles = width.div_ceil(PX);
            for grp in 0..g.p.groups {
                let ktaps = &self.taps[grp * k..][..k];
                for kc0 in (0..k).step_by(KC) {
                    let kd = KC.min(k - kc0);
                    for blk in 0..blocks {
                        let w = &self.wpack[((grp * blocks + blk) * k + kc0) * ch..][..kd * ch];
                        for t in 0..tiles {
                            let c = s.cbuf[s.co + (blk * GROUP + t * PX) * ch..][..PX * ch]
                                .as_mut_ptr();
                            let pxs: &[*const f32; PX] =
                                px[t * PX..][..PX].try_into().expect("PX pixels");
                            // SAFETY: ktaps[kc0..] holds kd offsets and w kd·ch floats; every
                            // pixel origin plus a tap offset is a padded position of its
                            // image's planes; c is PX·ch floats of cbuf; the tiles run here
                            // (asserted for AVX-512; the AVX2 ones are what this module needs).
                            unsafe {
                                tile(
                                    self.tiles,
                                    kd,
                                    ktaps[kc0..].as_ptr(),
                                    w.as_ptr(),
                                    pxs,
                                    c,
                                    kc0 > 0,
                                )
                            };
                        }
                    }
                }
                for blk in 0..blocks {
                    let cb = &s.cbuf[s.co + blk * GROUP * ch..][..GROUP * ch];
                    let chans = ch.min(cog - blk * ch);
                    let o0 = grp * cog + blk * ch;
                    for sg in &s.isegs {
                        let at = sg.img * out_len + o0 * pix + sg.p;
                        store(cb, ch, sg.j, sg.len, chans, &mut ys[at..], pix);
                    }
                }
            }
        }
    }
}

/// Writes pixels `[j, j + len)` of the pixel-major tile results `cb` (`[pixel][ch]`) into the
/// first `chans` channel rows of `dst` (rows `pix` apart, pixel `j` at column 0).
fn store(
    cb: &[f32],
    ch: usize,
    j: usize,
    len: usize,
    chans: usize,
    dst: &mut [MaybeUninit<f32>],
    pix: usize,
) {
    assert!(chans <= ch && ch % 8 == 0);
    assert!(cb.len() >= (j + len) * ch && (chans == 0 || dst.len() >= (chans - 1) * pix + len));
    let mut t = 0;
    while t + 8 <= len {
        for h in 0..chans.div_ceil(8) {
            let n = (chans - 8 * h).min(8);
            // SAFETY: rows j + t .. j + t + 8 of cb hold ch ≥ 8h + 8 floats from column 8h;
            // channel rows 8h .. 8h + n of dst have columns t .. t + 8 (asserted).
            unsafe {
                transpose8(
                    cb.as_ptr().add((j + t) * ch + 8 * h),
                    ch,
                    dst.as_mut_ptr().add(8 * h * pix + t).cast::<f32>(),
                    pix,
                    n,
                )
            };
        }
        t += 8;
    }
    for i in 0..chans {
        for u in t..len {
            dst[i * pix + u].write(cb[(j + u) * ch + i]);
        }
    }
}

/// `dst[i·ldd + r] = src[r·lds + i]` for 8 rows `r` and the first `n` of 8 columns `i`.
///
/// # Safety
/// `src` valid for 8 rows of 8 floats `lds` apart, `dst` for `n` rows of 8 floats `ldd` apart.
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(src: *const f32, lds: usize, dst: *mut f32, ldd: usize, n: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * lds)));
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ];
    for (i, v) in out.iter().enumerate().take(n) {
        _mm256_storeu_ps(dst.add(i * ldd), *v);
    }
}

/// Floats of the transposed `dy` block of one range of pixels of the filter gradient (16 KB:
/// 256 pixels of 16 channels, 128 of 32), which stays in L1 while every tile of column rows
/// sweeps it.
const FR_FLOATS: usize = 4096;

/// `acc (PX × ch) += Σ_p x(p)[taps[i]] · dyt[p][j]` over `n` pixels in `tiles`' registers:
/// `px[p]` is pixel `p`'s origin in the planes, `dyt` the pixel-major `dy` block (`[p][ch]`),
/// `acc` row-major `[PX][ch]` (one row per column-matrix row).
///
/// # Safety
/// `px` and `dyt` valid for `n` pixels, each `px[p].add(taps[i])` for one float, `acc` for
/// `PX·ch` floats; `tiles` runnable on this CPU.
pub(super) unsafe fn filter_tile(
    tiles: Tiles,
    n: usize,
    px: *const *const f32,
    dyt: *const f32,
    taps: &[usize; PX],
    acc: *mut f32,
) {
    match tiles {
        Tiles::Avx2 => filter_tile_avx2(n, px, dyt, taps, acc),
        Tiles::Avx512 => filter_tile_avx512(n, px, dyt, taps, acc),
        Tiles::WideRust => {
            let rows: [_; PX] = std::array::from_fn(|i| move |p: usize| *(*px.add(p)).add(taps[i]));
            tile_rust(CH_WIDE, n, &rows, dyt, acc, true)
        }
    }
}

/// Defines a filter-gradient register tile ([`filter_tile`]'s arithmetic) in one vector width,
/// with the parameters of [`tile_fn`].
macro_rules! filter_tile_fn {
    ($(#[$m:meta])* $name:ident, $feature:literal, $v:literal, $vb:literal, $step:literal,
     $load:ident, $store:ident, [$($r:tt),*]) => {
        $(#[$m])*
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            n: usize,
            px: *const *const f32,
            dyt: *const f32,
            taps: &[usize; PX],
            acc: *mut f32,
        ) {
            std::arch::asm!(
                $load!(),
                "test {n}, {n}",
                "jz 3f",
                "2:",
                "mov {b}, [{px}]",
                concat!("vmovups ", $v, "0, [{dy}]"),
                concat!("vmovups ", $v, "1, [{dy} + ", $vb, "]"),
                fma_rows!(
                    $v,
                    "[{b} + {t0}*4]",
                    "[{b} + {t1}*4]",
                    "[{b} + {t2}*4]",
                    "[{b} + {t3}*4]",
                    "[{b} + {t4}*4]",
                    "[{b} + {t5}*4]"
                ),
                "add {px}, 8",
                concat!("add {dy}, ", $step),
                "dec {n}",
                "jnz 2b",
                "3:",
                $store!(),
                "vzeroupper",
                n = inout(reg) n => _,
                px = inout(reg) px => _,
                dy = inout(reg) dyt => _,
                b = out(reg) _,
                t0 = in(reg) taps[0],
                t1 = in(reg) taps[1],
                t2 = in(reg) taps[2],
                t3 = in(reg) taps[3],
                t4 = in(reg) taps[4],
                t5 = in(reg) taps[5],
                c = in(reg) acc,
                $(out($r) _,)*
                options(nostack),
            );
        }
    };
}

filter_tile_fn!(
    /// [`filter_tile`] in 256-bit vectors ([`CH`] channels).
    ///
    /// # Safety
    /// As [`filter_tile`], with `ch` = [`CH`]; the CPU has AVX2 and FMA.
    filter_tile_avx2, "avx2,fma", "ymm", "32", "64", load_acc, store_acc,
    ["ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7",
     "ymm8", "ymm9", "ymm10", "ymm11", "ymm12", "ymm13", "ymm14", "ymm15"]
);

filter_tile_fn!(
    /// [`filter_tile`] in 512-bit vectors ([`CH_WIDE`] channels).
    ///
    /// # Safety
    /// As [`filter_tile`], with `ch` = [`CH_WIDE`]; the CPU has AVX-512F.
    filter_tile_avx512, "avx512f", "zmm", "64", "128", load_acc_zmm, store_acc_zmm,
    ["zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7",
     "zmm8", "zmm9", "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15"]
);

/// The filter gradient of the images whose stride-1 planes fill the start of `planes` (outputs
/// `dy`, `(nb, co, pix)`), added to `acc`, laid out `[group][block of ch output channels][tile
/// of PX column rows][PX][ch]` ([`filter_acc_len`], `ch` = `tiles.ch()`): for each range of
/// [`FR_FLOATS`]` / ch` pixels and block of output channels, `dy` is transposed to pixel-major
/// and every tile of column rows sweeps it, broadcasting the input value each row reads at each
/// pixel.
pub(super) fn filter(
    g: &Geom,
    pl: &Planes,
    taps: &[usize],
    planes: &[f32],
    dy: &[f32],
    acc: &mut [f32],
    tiles: Tiles,
) {
    let ch = tiles.ch();
    let (k, pix, cog, out_len) = (g.k(), g.pix(), g.cog(), g.out_len());
    let (blocks, ktiles, fr) = (cog.div_ceil(ch), k.div_ceil(PX), FR_FLOATS / ch);
    let nimg = dy.len() / out_len;
    let ncols = nimg * pix;
    assert!(planes.len() >= nimg * pl.img && acc.len() >= filter_acc_len(g, ch));
    assert!(tiles != Tiles::Avx512 || avx512());
    let origins: Vec<*const f32> = (0..ncols)
        .map(|q| planes[pl.origin(g, q)..].as_ptr())
        .collect();
    let mut dyt = vec![0f32; fr * ch];
    let mut segs = Vec::new();
    for q0 in (0..ncols).step_by(fr) {
        let width = fr.min(ncols - q0);
        segments(g, pl, q0, width, false, &mut segs);
        for grp in 0..g.p.groups {
            let gtaps = &taps[grp * k..][..k];
            for blk in 0..blocks {
                let chans = ch.min(cog - blk * ch);
                for sg in &segs {
                    let at = sg.img * out_len + (grp * cog + blk * ch) * pix + sg.p;
                    load_t(&dy[at..], pix, chans, sg.len, &mut dyt[sg.j * ch..], ch);
                }
                for kt in 0..ktiles {
                    let t: [usize; PX] = std::array::from_fn(|i| gtaps[(kt * PX + i).min(k - 1)]);
                    let a = &mut acc[((grp * blocks + blk) * ktiles + kt) * PX * ch..][..PX * ch];
                    // SAFETY: origins[q0..] and dyt hold width pixels; every origin plus a tap
                    // is a padded position of its image's planes; a is PX·ch floats; the tiles
                    // run here (asserted for AVX-512).
                    unsafe {
                        filter_tile(
                            tiles,
                            width,
                            origins[q0..].as_ptr(),
                            dyt.as_ptr(),
                            &t,
                            a.as_mut_ptr(),
                        )
                    };
                }
            }
        }
    }
}

/// Length of [`filter`]'s accumulator for tiles of `ch` channels.
pub(super) fn filter_acc_len(g: &Geom, ch: usize) -> usize {
    g.p.groups * g.cog().div_ceil(ch) * g.k().div_ceil(PX) * PX * ch
}

/// The filter gradient `(co, k)` from [`filter`]'s accumulator for tiles of `ch` channels.
pub(super) fn filter_unpack(g: &Geom, acc: &[f32], ch: usize) -> Vec<f32> {
    let (k, cog) = (g.k(), g.cog());
    let (blocks, ktiles) = (cog.div_ceil(ch), k.div_ceil(PX));
    let mut dw = vec![0f32; g.co * k];
    for grp in 0..g.p.groups {
        for o in 0..cog {
            for r in 0..k {
                let (blk, i, kt, rr) = (o / ch, o % ch, r / PX, r % PX);
                dw[(grp * cog + o) * k + r] =
                    acc[(((grp * blocks + blk) * ktiles + kt) * PX + rr) * ch + i];
            }
        }
    }
    dw
}

/// `dst[p·ch + i] = src[i·ld + p]` for `chans` channel rows of `len` pixels (`chans ≤ ch`;
/// the other columns of `dst` are zeroed).
pub(super) fn load_t(src: &[f32], ld: usize, chans: usize, len: usize, dst: &mut [f32], ch: usize) {
    assert!(chans <= ch && (chans == 0 || src.len() >= (chans - 1) * ld + len));
    assert!(dst.len() >= len * ch);
    // Whole blocks of 8 channels by 8 × 8 transposes, the rest one by one.
    let full = chans / 8;
    let mut p = 0;
    while p + 8 <= len {
        for h in 0..full {
            // SAFETY: channel rows 8h .. 8h + 8 ≤ chans of src have pixels p .. p + 8 ≤ len;
            // dst rows p .. p + 8 have ch ≥ 8h + 8 columns (asserted).
            unsafe {
                transpose8(
                    src.as_ptr().add(8 * h * ld + p),
                    ld,
                    dst.as_mut_ptr().add(p * ch + 8 * h),
                    ch,
                    8,
                )
            };
        }
        p += 8;
    }
    for q in 0..len {
        let row = &mut dst[q * ch..][..ch];
        let from = if q < p { 8 * full } else { 0 };
        for (i, d) in row.iter_mut().enumerate().skip(from) {
            *d = if i < chans { src[i * ld + q] } else { 0.0 };
        }
    }
}

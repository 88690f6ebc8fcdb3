//! Direct convolution: input pixels broadcast against vectors of output-channel weights.
//!
//! The register tile is [`PX`] output pixels × [`CH`] output channels. Each step of its depth
//! loop reads one column-matrix row `(c, ky, kx)`: the weights of the [`CH`] channels (two
//! vectors, packed) and, for each pixel, the one input value that tap reads, broadcast straight
//! from the zero-padded input plane. The pixels are independent addresses, so any stride,
//! dilation or row break costs nothing: no column panel is gathered, and the planes are plain
//! padded copies of the images (whole rows copied). The tile's results are pixel-major; they are
//! transposed into the `(channel, pixel)` output once, after the whole depth.
//!
//! The filter gradient ([`filter`]) has the same shape with the roles turned: a tile is [`PX`]
//! column-matrix rows × [`CH`] output channels, its loop runs over the pixels, and per pixel it
//! reads the [`CH`] values of a pixel-major copy of `dy` and broadcasts the input value each of
//! the rows reads there.

use super::{aligned, segments, Planes, Seg, KC};
use crate::kernels::conv::Geom;
use std::mem::MaybeUninit;

/// Pixels of a register tile (the broadcast operand).
pub(super) const PX: usize = 6;
/// Output channels of a register tile: two vectors of eight.
pub(super) const CH: usize = 16;
/// Pixels per group: the tiles of a group share the weight slice and the planes' lines in L1.
const GROUP: usize = PX * 8;

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

/// `c (PX × CH) = [c +] Σ_d px[i][taps[d]] · w[d][j]`: `w` packed as `[depth][CH]`, `c`
/// row-major `[PX][CH]`.
///
/// Written in assembly: 12 accumulators, two weight vectors and two broadcasts use all 16
/// vector registers.
///
/// # Safety
/// `taps` valid for `depth` offsets, `w` for `depth·CH` floats, each `px[i].add(taps[d])` for
/// one float, `c` for `PX·CH` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(
    depth: usize,
    taps: *const usize,
    w: *const f32,
    px: &[*const f32; PX],
    c: *mut f32,
    accumulate: bool,
) {
    const _: () = assert!(PX == 6 && CH == 16);
    std::arch::asm!(
        "test {acc}, {acc}",
        "jz 4f",
        load_acc!(),
        "jmp 5f",
        "4:",
        zero_acc!(),
        "5:",
        "test {d}, {d}",
        "jz 3f",
        "2:",
        "mov {t}, [{tp}]",
        "vmovups ymm0, [{w}]",
        "vmovups ymm1, [{w} + 32]",
        "vbroadcastss ymm2, dword ptr [{p0} + {t}*4]",
        "vfmadd231ps ymm4, ymm2, ymm0",
        "vfmadd231ps ymm5, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{p1} + {t}*4]",
        "vfmadd231ps ymm6, ymm3, ymm0",
        "vfmadd231ps ymm7, ymm3, ymm1",
        "vbroadcastss ymm2, dword ptr [{p2} + {t}*4]",
        "vfmadd231ps ymm8, ymm2, ymm0",
        "vfmadd231ps ymm9, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{p3} + {t}*4]",
        "vfmadd231ps ymm10, ymm3, ymm0",
        "vfmadd231ps ymm11, ymm3, ymm1",
        "vbroadcastss ymm2, dword ptr [{p4} + {t}*4]",
        "vfmadd231ps ymm12, ymm2, ymm0",
        "vfmadd231ps ymm13, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{p5} + {t}*4]",
        "vfmadd231ps ymm14, ymm3, ymm0",
        "vfmadd231ps ymm15, ymm3, ymm1",
        "add {tp}, 8",
        "add {w}, 64",
        "dec {d}",
        "jnz 2b",
        "3:",
        store_acc!(),
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
        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
        options(nostack),
    );
}

/// The direct kernel on filled stride-1 planes: `g` gives the output geometry (channels,
/// groups, kernel depth, pixels, and the stride at which output pixels step through the
/// planes).
pub(super) struct Direct<'a> {
    pub g: &'a Geom,
    /// Padded planes of one image (stride 1: one phase).
    pub pl: &'a Planes,
    /// Plane offsets of the column rows from an output pixel's origin, `[group][k]`.
    pub taps: &'a [usize],
    /// The weight packed by [`super::pack_weight`] in blocks of [`CH`] output channels.
    pub wpack: &'a [f32],
}

/// Per-task buffers of [`Direct::run`].
pub(super) struct Scratch {
    cbuf: Vec<f32>,
    co: usize,
    isegs: Vec<Seg>,
}

impl Scratch {
    pub fn new(cog: usize) -> Self {
        let (cbuf, co) = aligned(cog.div_ceil(CH) * GROUP * CH);
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
        let (g, pl) = (self.g, self.pl);
        assert_eq!((pl.sh, pl.sw), (1, 1));
        let (k, pix, cog, out_len) = (g.k(), g.pix(), g.cog(), g.out_len());
        let blocks = cog.div_ceil(CH);
        let nimg = ys.len() / out_len;
        let ncols = nimg * pix;
        assert!(planes.len() >= nimg * pl.img && s.cbuf.len() >= s.co + blocks * GROUP * CH);
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
                        let w = &self.wpack[((grp * blocks + blk) * k + kc0) * CH..][..kd * CH];
                        for t in 0..tiles {
                            let c = s.cbuf[s.co + (blk * GROUP + t * PX) * CH..][..PX * CH]
                                .as_mut_ptr();
                            let pxs: &[*const f32; PX] =
                                px[t * PX..][..PX].try_into().expect("PX pixels");
                            // SAFETY: ktaps[kc0..] holds kd offsets and w kd·CH floats; every
                            // pixel origin plus a tap offset is a padded position of its
                            // image's planes; c is PX·CH floats of cbuf.
                            unsafe { tile(kd, ktaps[kc0..].as_ptr(), w.as_ptr(), pxs, c, kc0 > 0) };
                        }
                    }
                }
                for blk in 0..blocks {
                    let cb = &s.cbuf[s.co + blk * GROUP * CH..][..GROUP * CH];
                    let chans = CH.min(cog - blk * CH);
                    let o0 = grp * cog + blk * CH;
                    for sg in &s.isegs {
                        let at = sg.img * out_len + o0 * pix + sg.p;
                        store(cb, sg.j, sg.len, chans, &mut ys[at..], pix);
                    }
                }
            }
        }
    }
}

/// Writes pixels `[j, j + len)` of the pixel-major tile results `cb` (`[pixel][CH]`) into the
/// first `chans` channel rows of `dst` (rows `pix` apart, pixel `j` at column 0).
fn store(cb: &[f32], j: usize, len: usize, chans: usize, dst: &mut [MaybeUninit<f32>], pix: usize) {
    assert!(cb.len() >= (j + len) * CH && (chans == 0 || dst.len() >= (chans - 1) * pix + len));
    let mut t = 0;
    while t + 8 <= len {
        for h in 0..chans.div_ceil(8) {
            let n = (chans - 8 * h).min(8);
            // SAFETY: rows j + t .. j + t + 8 of cb hold CH floats from column 8h; channel rows
            // 8h .. 8h + n of dst have columns t .. t + 8 (asserted).
            unsafe {
                transpose8(
                    cb.as_ptr().add((j + t) * CH + 8 * h),
                    CH,
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
            dst[i * pix + u].write(cb[(j + u) * CH + i]);
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

/// Pixels per range of the filter gradient: the transposed `dy` block of a range
/// (`FR × CH` floats, 16 KB) stays in L1 while every tile of column rows sweeps it.
const FR: usize = 256;

/// `acc (PX × CH) += Σ_p x(p)[taps[i]] · dyt[p][j]` over `n` pixels: `px[p]` is pixel `p`'s
/// origin in the planes, `dyt` the pixel-major `dy` block (`[p][CH]`), `acc` row-major
/// `[PX][CH]` (one row per column-matrix row).
///
/// # Safety
/// `px` and `dyt` valid for `n` pixels, each `px[p].add(taps[i])` for one float, `acc` for
/// `PX·CH` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn filter_tile(
    n: usize,
    px: *const *const f32,
    dyt: *const f32,
    taps: &[usize; PX],
    acc: *mut f32,
) {
    const _: () = assert!(PX == 6 && CH == 16);
    std::arch::asm!(
        load_acc!(),
        "test {n}, {n}",
        "jz 3f",
        "2:",
        "mov {b}, [{px}]",
        "vmovups ymm0, [{dy}]",
        "vmovups ymm1, [{dy} + 32]",
        "vbroadcastss ymm2, dword ptr [{b} + {t0}*4]",
        "vfmadd231ps ymm4, ymm2, ymm0",
        "vfmadd231ps ymm5, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{b} + {t1}*4]",
        "vfmadd231ps ymm6, ymm3, ymm0",
        "vfmadd231ps ymm7, ymm3, ymm1",
        "vbroadcastss ymm2, dword ptr [{b} + {t2}*4]",
        "vfmadd231ps ymm8, ymm2, ymm0",
        "vfmadd231ps ymm9, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{b} + {t3}*4]",
        "vfmadd231ps ymm10, ymm3, ymm0",
        "vfmadd231ps ymm11, ymm3, ymm1",
        "vbroadcastss ymm2, dword ptr [{b} + {t4}*4]",
        "vfmadd231ps ymm12, ymm2, ymm0",
        "vfmadd231ps ymm13, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{b} + {t5}*4]",
        "vfmadd231ps ymm14, ymm3, ymm0",
        "vfmadd231ps ymm15, ymm3, ymm1",
        "add {px}, 8",
        "add {dy}, 64",
        "dec {n}",
        "jnz 2b",
        "3:",
        store_acc!(),
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
        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
        options(nostack),
    );
}

/// The filter gradient of the images whose stride-1 planes fill the start of `planes` (outputs
/// `dy`, `(nb, co, pix)`), added to `acc`, laid out `[group][block of CH output channels][tile
/// of PX column rows][PX][CH]` ([`filter_acc_len`]): for each range of [`FR`] pixels and block
/// of output channels, `dy` is transposed to pixel-major and every tile of column rows sweeps
/// it, broadcasting the input value each row reads at each pixel.
pub(super) fn filter(
    g: &Geom,
    pl: &Planes,
    taps: &[usize],
    planes: &[f32],
    dy: &[f32],
    acc: &mut [f32],
) {
    let (k, pix, cog, out_len) = (g.k(), g.pix(), g.cog(), g.out_len());
    let (blocks, ktiles) = (cog.div_ceil(CH), k.div_ceil(PX));
    let nimg = dy.len() / out_len;
    let ncols = nimg * pix;
    assert!(planes.len() >= nimg * pl.img && acc.len() >= filter_acc_len(g));
    let origins: Vec<*const f32> = (0..ncols)
        .map(|q| planes[pl.origin(g, q)..].as_ptr())
        .collect();
    let mut dyt = vec![0f32; FR * CH];
    let mut segs = Vec::new();
    for q0 in (0..ncols).step_by(FR) {
        let width = FR.min(ncols - q0);
        segments(g, pl, q0, width, false, &mut segs);
        for grp in 0..g.p.groups {
            let gtaps = &taps[grp * k..][..k];
            for blk in 0..blocks {
                let chans = CH.min(cog - blk * CH);
                for sg in &segs {
                    let at = sg.img * out_len + (grp * cog + blk * CH) * pix + sg.p;
                    load_t(&dy[at..], pix, chans, sg.len, &mut dyt[sg.j * CH..]);
                }
                for kt in 0..ktiles {
                    let t: [usize; PX] = std::array::from_fn(|i| gtaps[(kt * PX + i).min(k - 1)]);
                    let a = &mut acc[((grp * blocks + blk) * ktiles + kt) * PX * CH..][..PX * CH];
                    // SAFETY: origins[q0..] and dyt hold width pixels; every origin plus a tap
                    // is a padded position of its image's planes; a is PX·CH floats.
                    unsafe {
                        filter_tile(
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

/// Length of [`filter`]'s accumulator.
pub(super) fn filter_acc_len(g: &Geom) -> usize {
    g.p.groups * g.cog().div_ceil(CH) * g.k().div_ceil(PX) * PX * CH
}

/// The filter gradient `(co, k)` from [`filter`]'s accumulator.
pub(super) fn filter_unpack(g: &Geom, acc: &[f32]) -> Vec<f32> {
    let (k, cog) = (g.k(), g.cog());
    let (blocks, ktiles) = (cog.div_ceil(CH), k.div_ceil(PX));
    let mut dw = vec![0f32; g.co * k];
    for grp in 0..g.p.groups {
        for o in 0..cog {
            for r in 0..k {
                let (blk, i, kt, rr) = (o / CH, o % CH, r / PX, r % PX);
                dw[(grp * cog + o) * k + r] =
                    acc[(((grp * blocks + blk) * ktiles + kt) * PX + rr) * CH + i];
            }
        }
    }
    dw
}

/// `dst[p·CH + i] = src[i·ld + p]` for `chans` channel rows of `len` pixels (`chans ≤ CH`;
/// the other columns of `dst` are zeroed).
fn load_t(src: &[f32], ld: usize, chans: usize, len: usize, dst: &mut [f32]) {
    assert!(chans == 0 || src.len() >= (chans - 1) * ld + len);
    assert!(dst.len() >= len * CH);
    // Whole blocks of 8 channels by 8 × 8 transposes, the rest one by one.
    let full = chans / 8;
    let mut p = 0;
    while p + 8 <= len {
        for h in 0..full {
            // SAFETY: channel rows 8h .. 8h + 8 < chans of src have pixels p .. p + 8 < len;
            // dst rows p .. p + 8 have CH ≥ 8h + 8 columns (asserted).
            unsafe {
                transpose8(
                    src.as_ptr().add(8 * h * ld + p),
                    ld,
                    dst.as_mut_ptr().add(p * CH + 8 * h),
                    CH,
                    8,
                )
            };
        }
        p += 8;
    }
    for q in 0..len {
        let row = &mut dst[q * CH..][..CH];
        let from = if q < p { 8 * full } else { 0 };
        for (i, d) in row.iter_mut().enumerate().skip(from) {
            *d = if i < chans { src[i * ld + q] } else { 0.0 };
        }
    }
}

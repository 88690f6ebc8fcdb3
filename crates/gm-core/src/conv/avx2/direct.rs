//! Direct convolution: input pixels broadcast against vectors of output-channel weights.
//!
//! The register tile is [`PX`] output pixels × [`CH`] output channels. Each step of its depth
//! loop reads one column-matrix row `(c, ky, kx)`: the weights of the [`CH`] channels (two
//! vectors, packed) and, for each pixel, the one input value that tap reads, broadcast straight
//! from the zero-padded input plane. The pixels are independent addresses, so any stride,
//! dilation or row break costs nothing: no column panel is gathered, and the planes are plain
//! padded copies of the images (whole rows copied). The tile's results are pixel-major; they are
//! transposed into the `(channel, pixel)` output once, after the whole depth.

use super::{aligned, segments, Planes, Seg, KC};
use crate::conv::Geom;
use std::mem::MaybeUninit;

/// Pixels of a register tile (the broadcast operand).
pub(super) const PX: usize = 6;
/// Output channels of a register tile: two vectors of eight.
pub(super) const CH: usize = 16;
/// Pixels per group: the tiles of a group share the weight slice and the planes' lines in L1.
const GROUP: usize = PX * 8;

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
        "vmovups ymm4, [{c}]",
        "vmovups ymm5, [{c} + 32]",
        "vmovups ymm6, [{c} + 64]",
        "vmovups ymm7, [{c} + 96]",
        "vmovups ymm8, [{c} + 128]",
        "vmovups ymm9, [{c} + 160]",
        "vmovups ymm10, [{c} + 192]",
        "vmovups ymm11, [{c} + 224]",
        "vmovups ymm12, [{c} + 256]",
        "vmovups ymm13, [{c} + 288]",
        "vmovups ymm14, [{c} + 320]",
        "vmovups ymm15, [{c} + 352]",
        "jmp 5f",
        "4:",
        "vxorps ymm4, ymm4, ymm4",
        "vxorps ymm5, ymm5, ymm5",
        "vxorps ymm6, ymm6, ymm6",
        "vxorps ymm7, ymm7, ymm7",
        "vxorps ymm8, ymm8, ymm8",
        "vxorps ymm9, ymm9, ymm9",
        "vxorps ymm10, ymm10, ymm10",
        "vxorps ymm11, ymm11, ymm11",
        "vxorps ymm12, ymm12, ymm12",
        "vxorps ymm13, ymm13, ymm13",
        "vxorps ymm14, ymm14, ymm14",
        "vxorps ymm15, ymm15, ymm15",
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
        "vmovups [{c}], ymm4",
        "vmovups [{c} + 32], ymm5",
        "vmovups [{c} + 64], ymm6",
        "vmovups [{c} + 96], ymm7",
        "vmovups [{c} + 128], ymm8",
        "vmovups [{c} + 160], ymm9",
        "vmovups [{c} + 192], ymm10",
        "vmovups [{c} + 224], ymm11",
        "vmovups [{c} + 256], ymm12",
        "vmovups [{c} + 288], ymm13",
        "vmovups [{c} + 320], ymm14",
        "vmovups [{c} + 352], ymm15",
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

/// The weight packed for [`tile`]: `[group][block of CH output channels][k][CH]`, zero
/// channels past `cog`; `at(group, channel, d)` gives the weight of column-matrix row `d`.
pub(super) fn pack(
    groups: usize,
    cog: usize,
    k: usize,
    at: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let blocks = cog.div_ceil(CH);
    let mut packed = vec![0f32; groups * blocks * k * CH];
    for grp in 0..groups {
        for o in 0..cog {
            for d in 0..k {
                packed[((grp * blocks + o / CH) * k + d) * CH + o % CH] = at(grp, o, d);
            }
        }
    }
    packed
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
    /// The weight packed by [`pack`].
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
        let [sh, sw] = g.p.stride;
        assert!(planes.len() >= nimg * pl.img && s.cbuf.len() >= s.co + blocks * GROUP * CH);
        let mut px = [planes.as_ptr(); GROUP];
        for q0 in (0..ncols).step_by(GROUP) {
            let width = GROUP.min(ncols - q0);
            for (j, p) in px.iter_mut().enumerate() {
                // Pixels past the chunk repeat its last one: read, computed and dropped.
                let q = q0 + j.min(width - 1);
                let (img, p0) = (q / pix, q % pix);
                let (oy, ox) = (p0 / g.wo, p0 % g.wo);
                *p = planes[img * pl.img + sh * oy * pl.wq + sw * ox..].as_ptr();
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

/// `dst[i·ld + r] = src[r·CH + i]` for 8 rows `r` and the first `n` of 8 columns `i`.
///
/// # Safety
/// `src` valid for 8 rows of 8 floats `CH` apart, `dst` for `n` rows of 8 floats `ld` apart.
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(src: *const f32, dst: *mut f32, ld: usize, n: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * CH)));
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
        _mm256_storeu_ps(dst.add(i * ld), *v);
    }
}

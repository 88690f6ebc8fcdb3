//! Stride-1 3 × 3 convolutions by Winograd's minimal filtering F(2 × 2, 3 × 3).
//!
//! Each 2 × 2 block of outputs (a *tile*) is computed from the 4 × 4 input patch `d` under it
//! as `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: the patch and the kernel are carried into a 16-point
//! transform domain, where the sum over input channels is one matrix product per point
//! (`M[ξ] = U[ξ] · V[ξ]`, output channels × input channels times input channels × tiles), and
//! the result is carried back. That is 16 multiply-adds per tile and channel pair instead of the
//! direct convolution's 36 (2.25× fewer); the transforms are additions only. The products run
//! in the forward kernel's 4 × 24 register tiles, on panels of 24 tiles whose input transform is
//! computed just before (so the panel stays in L1/L2) and whose output transform follows.
//!
//! The filter gradient runs in the same domain: `dU[ξ] = Σ_tiles (A dY Aᵀ)[ξ] ⊗ V[ξ]` (the
//! adjoint of the output transform applied to the outputs' gradient, times the forward's input
//! transform), summed over tiles in the direct filter gradient's register tiles, then carried
//! back per kernel as `dw = Gᵀ dU G` ([`filter_part`], [`filter_unpack`]).
//!
//! Rounding: the transforms have coefficients 1 and ½; in f32 the result differs from a direct
//! convolution by a few units in the last place of the largest partial sums (the f64 comparison
//! in the tests bounds it).

use super::direct::{self, Tiles, PX};
use super::{aligned_reused, tile, tile_wide, Geom, KC, MASK, MR, NR, NR_WIDE};
use crate::kernels::reuse::Reused;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Channels per group (in and out) from which the transform pays for itself.
pub(in crate::kernels::conv) const MIN_CHANNELS: usize = 16;

/// A stride-1, dilation-1 3 × 3 convolution of `x` `(n, ci, h, w)` to `(n, co, ho, wo)`, padded
/// by `pad`, in `groups` groups.
#[derive(Clone, Copy, Debug)]
pub(in crate::kernels::conv) struct Shape {
    pub n: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub ho: usize,
    pub wo: usize,
    pub pad: [usize; 2],
    pub groups: usize,
}

impl Shape {
    /// The forward convolution of `g`, or (`data_gradient`) the one that computes its data
    /// gradient: `dx = conv3x3(dy, w flipped, channel axes swapped)`, padded by `2 − p`.
    pub(in crate::kernels::conv) fn of(g: &Geom, data_gradient: bool) -> Self {
        let (ci, h, w, co, ho, wo) = if data_gradient {
            (g.co, g.ho, g.wo, g.ci, g.h, g.w)
        } else {
            (g.ci, g.h, g.w, g.co, g.ho, g.wo)
        };
        Self {
            n: g.n,
            ci,
            h,
            w,
            co,
            ho,
            wo,
            pad: if data_gradient {
                g.p.padding.map(|p| 2 - p)
            } else {
                g.p.padding
            },
            groups: g.p.groups,
        }
    }
    fn th(&self) -> usize {
        self.ho.div_ceil(2)
    }
    fn tw(&self) -> usize {
        self.wo.div_ceil(2)
    }
    /// Rows and columns of the even/odd column planes of one channel: the padded input
    /// covering every tile (`2·th + 2` rows), split into its even and odd columns
    /// (`tw + 1` each) plus room for whole vectors.
    fn plane_rows(&self) -> usize {
        2 * self.th() + 2
    }
    fn plane_cols(&self) -> usize {
        (self.tw() + 1).next_multiple_of(8) + 8
    }
    fn plane_len(&self) -> usize {
        2 * self.plane_rows() * self.plane_cols()
    }
}

/// `y = conv3x3(x, w)`, `images_per_task` images per parallel task. `w` is a convolution weight
/// `(C_out, C_in / groups, 3, 3)`: of this convolution, or (`data_gradient`) of the convolution
/// whose data gradient this is (it is then used flipped, channel axes swapped).
pub(in crate::kernels::conv) fn conv3x3(
    s: &Shape,
    images_per_task: usize,
    x: &[f32],
    w: &[f32],
    data_gradient: bool,
) -> Vec<f32> {
    let (cig, cog, groups) = (s.ci / s.groups, s.co / s.groups, s.groups);
    let tiles = s.th() * s.tw();
    // The products' register tiles: 4 × 24 (256-bit, or one 512-bit and one 256-bit vector per
    // row), or with wide tiles 8 × 32 in 512-bit vectors, on panels of `nr` tiles.
    let direct = Tiles::chosen();
    let full = direct.ch() == direct::CH_WIDE;
    let nr = if full { NR_WIDE } else { NR };
    // Images per chunk: the one (up to 8) that wastes least of its last panel.
    let nb = (1..=8usize.min(images_per_task))
        .min_by_key(|&b| ((b * tiles).next_multiple_of(nr) - b * tiles) * 1000 / (b * tiles))
        .unwrap_or(1);
    let u = filter_transform(
        groups,
        cog,
        cig,
        &kernels(groups, cog, cig, w, data_gradient),
    );
    let in_len = s.ci * s.h * s.w;
    let out_len = s.co * s.ho * s.wo;
    // Rows of the products per ξ: whole tiles of 8 with wide tiles (an odd last block of MR
    // multiplies zeros into rows the output transform does not read).
    let (blocks, cop) = (
        cog.div_ceil(MR),
        cog.next_multiple_of(if full { 2 * MR } else { MR }),
    );
    let zeros = vec![0f32; if full { cig * MR } else { 0 }];
    let images = |task: usize, ys: &mut [MaybeUninit<f32>]| {
        let mut planes = Reused::new(nb * s.ci * s.plane_len());
        // The panel's transformed input `[ξ][c][nr + 8]` (ξ blocks `vx` apart, staggered by a
        // cache line so that the 16 stores of a tile do not alias in L1), and its products
        // `[ξ][o][nr]`.
        let vw = nr + 8;
        let vx = s.ci * vw + 16;
        let (mut v, vo) = aligned_reused(16 * vx);
        let (mut m, mo) = aligned_reused(16 * cop * nr);
        let mut segs = Vec::new();
        for (sub, ys) in ys.chunks_mut(nb * out_len).enumerate() {
            let first = task * images_per_task + sub * nb;
            let nimg = ys.len() / out_len;
            fill_planes(s, &x[first * in_len..][..nimg * in_len], &mut planes);
            let ntiles = nimg * tiles;
            for q0 in (0..ntiles).step_by(nr) {
                let width = nr.min(ntiles - q0);
                tile_segments(s, q0, width, &mut segs);
                // SAFETY: `v` holds 16 blocks of vx ≥ ci·vw floats, rows vw = nr + 8 apart; a
                // segment writes columns [j, j + len rounded up to 8) ⊂ [0, nr + 8) of a row.
                // Plane reads stay inside each channel's planes (`plane_cols` leaves a vector of
                // slack; asserted).
                unsafe { input_transform(s, &planes, &segs, v[vo..].as_mut_ptr(), vw, vx) };
                for grp in 0..groups {
                    for xi in 0..16 {
                        for blk in (0..blocks).step_by(if full { 2 } else { 1 }) {
                            let a = &u[((xi * groups + grp) * blocks + blk) * cig * MR..];
                            // The next block of MR rows (wide tiles), or zeros past the last.
                            let a1 = if blk + 1 < blocks {
                                &a[cig * MR..]
                            } else {
                                &zeros
                            };
                            for kc0 in (0..cig).step_by(KC) {
                                let kd = KC.min(cig - kc0);
                                // SAFETY: a and (wide tiles) a1 hold cig·MR floats; the kd rows
                                // of v from (ξ, group channel kc0) hold nr floats each, vw
                                // apart; the rows of m from (ξ, blk·MR) nr floats each, 8 of
                                // them with wide tiles (cop is a multiple of 8); `direct` runs
                                // on this CPU.
                                unsafe {
                                    let (a, a1) = (a.as_ptr().add(kc0 * MR), a1.as_ptr());
                                    let b = v.as_ptr().add(vo + xi * vx + (grp * cig + kc0) * vw);
                                    let c = m.as_mut_ptr().add(mo + (xi * cop + blk * MR) * nr);
                                    if full {
                                        let a1 = a1.add(kc0 * MR);
                                        tile_wide(direct, kd, a, a1, b, vw, c, nr, kc0 > 0)
                                    } else {
                                        tile(false, kd, a, b, vw, c, nr, kc0 > 0)
                                    }
                                };
                            }
                        }
                    }
                    output_transform(s, grp, nr, cop * nr, &m[mo..], &segs, ys);
                }
            }
        }
    };
    // SAFETY: every tile of every image is in one panel, and the output transform writes the
    // tile's (up to) 2 × 2 outputs of every output channel.
    unsafe { crate::kernels::cpu::par_written(s.n * out_len, images_per_task * out_len, images) }
}

/// Tiles per panel of the filter gradient.
const FILTER_PANEL: usize = 96;

/// Length of [`filter_part`]'s accumulator for register tiles of `ch` output channels:
/// `[ξ][group][block of ch outputs][tile of PX inputs][PX][ch]`.
pub(in crate::kernels::conv) fn filter_acc_len(s: &Shape, ch: usize) -> usize {
    let (cig, cog) = (s.ci / s.groups, s.co / s.groups);
    16 * s.groups * cog.div_ceil(ch) * cig.div_ceil(PX) * PX * ch
}

/// The transform-domain filter gradient `dU[ξ] = Σ_tiles dM[ξ] ⊗ V[ξ]` of the images `x`
/// (outputs' gradient `dy`), as [`filter_acc_len`] lays it out; [`filter_unpack`] carries the
/// sum over all parts back to `dw`.
///
/// `V = Bᵀ d B` is the forward's input transform (channel-major rows of a panel of
/// [`FILTER_PANEL`] tiles); `dM = A dY Aᵀ` is the adjoint of the output transform, computed
/// from `dy` transposed to pixel-major so that each tile's transform is a few vector adds per
/// block of output channels. The products run in the direct filter gradient's register tiles:
/// `PX` input channels broadcast from `V` against `ch` output channels of `dM`, summed along
/// the panel's tiles — 16 multiply-adds per tile and channel pair instead of 36.
pub(in crate::kernels::conv) fn filter_part(
    s: &Shape,
    tiles: Tiles,
    x: &[f32],
    dy: &[f32],
) -> Vec<f32> {
    let ch = tiles.ch();
    let (cig, cog, groups) = (s.ci / s.groups, s.co / s.groups, s.groups);
    let (blocks, ktiles) = (cog.div_ceil(ch), cig.div_ceil(PX));
    let gblocks = groups * blocks;
    let (in_len, out_len, pix) = (s.ci * s.h * s.w, s.co * s.ho * s.wo, s.ho * s.wo);
    let n = x.len() / in_len;
    assert!(in_len > 0 && dy.len() == n * out_len);
    assert!(tiles != Tiles::Avx512 || direct::avx512());
    let per_img = s.th() * s.tw();
    let mut acc = vec![0f32; filter_acc_len(s, ch)];
    // Images per chunk: enough tiles for one panel.
    let nb = FILTER_PANEL.div_ceil(per_img).clamp(1, 8).min(n.max(1));
    let mut planes = Reused::new(nb * s.ci * s.plane_len());
    let mut dyt = Reused::new(nb * gblocks * pix * ch);
    let vw = FILTER_PANEL + 8;
    let vx = s.ci * vw + 16;
    let (mut v, vo) = aligned_reused(16 * vx);
    // The panel's transformed input, written by the input transform and read by the tiles
    // through `px` (column p of every channel row at `px[p] + row offset`).
    let vp = v[vo..].as_mut_ptr();
    let px: Vec<*const f32> = (0..FILTER_PANEL)
        .map(|p| vp.wrapping_add(p).cast_const())
        .collect();
    let xs = dm_stride(gblocks, ch);
    let mut dm = Reused::new(16 * xs);
    let mut segs = Vec::new();
    for first in (0..n).step_by(nb) {
        let nimg = nb.min(n - first);
        fill_planes(s, &x[first * in_len..][..nimg * in_len], &mut planes);
        for img in 0..nimg {
            for gb in 0..gblocks {
                let (grp, blk) = (gb / blocks, gb % blocks);
                let chans = ch.min(cog - blk * ch);
                let src = &dy[(first + img) * out_len + (grp * cog + blk * ch) * pix..];
                let dst = &mut dyt[(img * gblocks + gb) * pix * ch..][..pix * ch];
                direct::load_t(src, pix, chans, pix, dst, ch);
            }
        }
        let ntiles = nimg * per_img;
        for q0 in (0..ntiles).step_by(FILTER_PANEL) {
            let width = FILTER_PANEL.min(ntiles - q0);
            tile_segments(s, q0, width, &mut segs);
            // SAFETY: as in the forward: `v` holds 16 blocks of vx ≥ ci·vw floats, a segment
            // writes columns [j, j + len rounded up to 8) ⊂ [0, FILTER_PANEL + 8) of a row.
            unsafe { input_transform(s, &planes, &segs, vp, vw, vx) };
            // SAFETY: the CPU has AVX2 (the tiles run here).
            unsafe { output_transform_adjoint(s, ch, gblocks, &dyt, &segs, &mut dm) };
            for xi in 0..16 {
                for gb in 0..gblocks {
                    let grp = gb / blocks;
                    let dmt = dm[xi * xs + gb * FILTER_PANEL * ch..].as_ptr();
                    for kt in 0..ktiles {
                        let t: [usize; PX] = std::array::from_fn(|i| {
                            xi * vx + (grp * cig + (kt * PX + i).min(cig - 1)) * vw
                        });
                        let a =
                            &mut acc[((xi * gblocks + gb) * ktiles + kt) * PX * ch..][..PX * ch];
                        // SAFETY: px[p] + t[i] is V's column p of channel row t[i] (inside the
                        // 16·vx floats from vo); dmt holds width pixel rows of ch floats; a is
                        // PX·ch floats; the tiles run on this CPU (asserted for AVX-512).
                        unsafe {
                            direct::filter_tile(tiles, width, px.as_ptr(), dmt, &t, a.as_mut_ptr())
                        };
                    }
                }
            }
        }
    }
    acc
}

/// Floats between the ξ blocks of [`output_transform_adjoint`]'s `dM`: staggered by a cache
/// line, so that a tile's 16 stores, one per block, do not fall into one L1 set (a block of 4
/// output-channel blocks is 24 KiB, a multiple of 4 KiB).
fn dm_stride(gblocks: usize, ch: usize) -> usize {
    gblocks * FILTER_PANEL * ch + 16
}

/// `dM[ξ][block][j][i] = (A dY Aᵀ)[ξ]` (at `ξ·xs + (block·FILTER_PANEL + j)·ch + i`, `xs` from
/// [`dm_stride`]) of output channel `block·ch + i` for panel tile `j`, from
/// `dyt` (per image of the chunk and block, pixel-major rows of `ch` channels), with
/// `A = [[1, 0], [1, 1], [1, −1], [0, −1]]`; outputs past the image's edge are zero.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `ch` a multiple of 8.
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform_adjoint(
    s: &Shape,
    ch: usize,
    gblocks: usize,
    dyt: &[f32],
    segs: &[TileSeg],
    dm: &mut [f32],
) {
    let pix = s.ho * s.wo;
    let xs = dm_stride(gblocks, ch);
    assert!(ch % 8 == 0 && dm.len() >= 16 * xs);
    let zero = _mm256_setzero_ps();
    for sg in segs {
        assert!(dyt.len() >= (sg.img + 1) * gblocks * pix * ch);
        for t in 0..sg.len {
            let (ty, tx, j) = (sg.ty, sg.tx0 + t, sg.j + t);
            // Pixel offsets of the tile's four outputs inside an image block, None past the edge.
            let spot = |a: usize, b: usize| {
                let (oy, ox) = (2 * ty + a, 2 * tx + b);
                (oy < s.ho && ox < s.wo).then_some((oy * s.wo + ox) * ch)
            };
            let spots = [spot(0, 0), spot(0, 1), spot(1, 0), spot(1, 1)];
            for gb in 0..gblocks {
                let img = dyt.as_ptr().add((sg.img * gblocks + gb) * pix * ch);
                let out = dm.as_mut_ptr().add((gb * FILTER_PANEL + j) * ch);
                for l in (0..ch).step_by(8) {
                    let ld = |k: usize| spots[k].map_or(zero, |o| _mm256_loadu_ps(img.add(o + l)));
                    let (a, b, c, d) = (ld(0), ld(1), ld(2), ld(3));
                    // Rows (p, q) of A dY, then each row times Aᵀ: p, p + q, p − q, −q.
                    let rows = [
                        (a, b),
                        (_mm256_add_ps(a, c), _mm256_add_ps(b, d)),
                        (_mm256_sub_ps(a, c), _mm256_sub_ps(b, d)),
                        (_mm256_sub_ps(zero, c), _mm256_sub_ps(zero, d)),
                    ];
                    for (i, (p, q)) in rows.into_iter().enumerate() {
                        let vals = [
                            p,
                            _mm256_add_ps(p, q),
                            _mm256_sub_ps(p, q),
                            _mm256_sub_ps(zero, q),
                        ];
                        for (jj, v) in vals.into_iter().enumerate() {
                            _mm256_storeu_ps(out.add((i * 4 + jj) * xs + l), v);
                        }
                    }
                }
            }
        }
    }
}

/// `dw = Gᵀ dU G` per kernel from the sum of [`filter_part`]'s accumulators: the gradient of
/// the weight `(C_out, C_in / groups, 3, 3)`, with `Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0],
/// [0, ½, ½, 1]]` (the adjoint of the forward's `U = G g Gᵀ`).
pub(in crate::kernels::conv) fn filter_unpack(s: &Shape, acc: &[f32], ch: usize) -> Vec<f32> {
    let mut dw = vec![0f32; s.co * (s.ci / s.groups) * 9];
    assert!(ch % 8 == 0 && acc.len() >= filter_acc_len(s, ch));
    // SAFETY: the convolution kernels run on CPUs with AVX2; the sizes are asserted.
    unsafe { unpack_kernels(s, acc, ch, &mut dw) };
    dw
}

/// [`filter_unpack`] into `dw`, eight output channels at a time: their `dU` are eight
/// consecutive floats of each ξ block of the accumulator, carried back in vectors (each lane
/// with the operations of the scalar formula, in its order).
///
/// # Safety
/// The CPU must have AVX2; `ch` a multiple of 8, `acc` at least [`filter_acc_len`] floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack_kernels(s: &Shape, acc: &[f32], ch: usize, dw: &mut [f32]) {
    let (cig, cog, groups) = (s.ci / s.groups, s.co / s.groups, s.groups);
    let (blocks, ktiles) = (cog.div_ceil(ch), cig.div_ceil(PX));
    // Floats between the accumulator's ξ blocks.
    let xs = groups * blocks * ktiles * PX * ch;
    assert!(acc.len() >= 16 * xs && dw.len() >= s.co * cig * 9);
    let half = _mm256_set1_ps(0.5);
    // Gᵀ applied to four vectors (a column or a row of dU): three.
    let gt = |a: __m256, b: __m256, c: __m256, d: __m256| {
        let (sum, diff) = (
            _mm256_mul_ps(half, _mm256_add_ps(b, c)),
            _mm256_mul_ps(half, _mm256_sub_ps(b, c)),
        );
        [_mm256_add_ps(a, sum), diff, _mm256_add_ps(sum, d)]
    };
    let mut taps = [[0f32; 8]; 9];
    for gb in 0..groups * blocks {
        let (grp, o0) = (gb / blocks, gb % blocks * ch);
        for l0 in (0..ch.min(cog - o0)).step_by(8) {
            let lanes = 8.min(cog - o0 - l0);
            for c in 0..cig {
                let at = ((gb * ktiles + c / PX) * PX + c % PX) * ch + l0;
                let du = |xi: usize| _mm256_loadu_ps(acc.as_ptr().add(xi * xs + at));
                // Gᵀ dU: four columns of three; then each row of four carried to three taps.
                let cols: [[__m256; 3]; 4] =
                    std::array::from_fn(|j| gt(du(j), du(4 + j), du(8 + j), du(12 + j)));
                for ky in 0..3 {
                    let k = gt(cols[0][ky], cols[1][ky], cols[2][ky], cols[3][ky]);
                    for (kx, v) in k.into_iter().enumerate() {
                        _mm256_storeu_ps(taps[ky * 3 + kx].as_mut_ptr(), v);
                    }
                }
                for i in 0..lanes {
                    let k = &mut dw[((grp * cog + o0 + l0 + i) * cig + c) * 9..][..9];
                    for (t, tap) in k.iter_mut().enumerate() {
                        *tap = taps[t][i];
                    }
                }
            }
        }
    }
}

/// The 3 × 3 kernels `[group][o][c]` of this convolution (`cog` outputs, `cig` inputs per
/// group) from weight `w`; with `data_gradient`, `w` is `(groups·cig, cog, 3, 3)` and each kernel
/// is `w[c][o]` flipped. `w` is read front to back either way (a weight that is not in cache
/// then streams in instead of being fetched kernel by kernel).
fn kernels(groups: usize, cog: usize, cig: usize, w: &[f32], data_gradient: bool) -> Vec<[f32; 9]> {
    if !data_gradient {
        return w
            .chunks_exact(9)
            .map(|k| std::array::from_fn(|t| k[t]))
            .collect();
    }
    let mut out = vec![[0f32; 9]; groups * cog * cig];
    for (i, k) in w.chunks_exact(9).enumerate() {
        // Weight row (group grp, channel c of this convolution's input), column o.
        let (grp, c, o) = (i / (cig * cog), i / cog % cig, i % cog);
        out[(grp * cog + o) * cig + c] = std::array::from_fn(|t| k[8 - t]);
    }
    out
}

/// `U = G g Gᵀ` of every kernel `k[(group·cog + o)·cig + c]`, packed for [`tile`] as
/// `[ξ][group][block of MR o][c][MR]`.
fn filter_transform(groups: usize, cog: usize, cig: usize, k: &[[f32; 9]]) -> Reused {
    let blocks = cog.div_ceil(MR);
    let mut packed = Reused::new(16 * groups * blocks * cig * MR);
    // SAFETY: `packed` and `k` have the sizes `transform_kernels` requires.
    unsafe { transform_kernels(groups, cog, cig, k, &mut packed) };
    packed
}

/// [`filter_transform`] into `packed` (`16·groups·⌈cog / MR⌉·cig·MR` floats), eight
/// (input channel, output channel) pairs at a time: two input channels × the MR output channels
/// of a block, which are eight consecutive floats of each ξ block of the packed layout. Every
/// float of `packed` is written (zero in the rows past `cog`), so it need not start zeroed.
///
/// # Safety
/// `k` must hold `groups·cog·cig` kernels and `packed` the size above.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // the transform reads best indexed
unsafe fn transform_kernels(
    groups: usize,
    cog: usize,
    cig: usize,
    k: &[[f32; 9]],
    packed: &mut [f32],
) {
    let blocks = cog.div_ceil(MR);
    assert!(k.len() >= groups * cog * cig && packed.len() >= 16 * groups * blocks * cig * MR);
    let half = _mm256_set1_ps(0.5);
    // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]] applied to three vectors.
    let g4 = |a: __m256, b: __m256, c: __m256| {
        let ac = _mm256_add_ps(a, c);
        [
            a,
            _mm256_mul_ps(half, _mm256_add_ps(ac, b)),
            _mm256_mul_ps(half, _mm256_sub_ps(ac, b)),
            c,
        ]
    };
    for grp in 0..groups {
        for blk in 0..blocks {
            let rows = MR.min(cog - blk * MR);
            for c0 in (0..cig).step_by(2) {
                let pair = 2.min(cig - c0);
                // Lane l: input channel c0 + l / MR, output channel blk·MR + l % MR.
                let mut taps = [[0f32; 8]; 9];
                for l in 0..pair * MR {
                    let (c, i) = (c0 + l / MR, l % MR);
                    if i < rows {
                        let g = &k[(grp * cog + blk * MR + i) * cig + c];
                        for t in 0..9 {
                            taps[t][l] = g[t];
                        }
                    }
                }
                let g: [__m256; 9] = std::array::from_fn(|t| _mm256_loadu_ps(taps[t].as_ptr()));
                // g Gᵀ per kernel row, then G per column.
                let r: [[__m256; 4]; 3] =
                    std::array::from_fn(|ky| g4(g[ky * 3], g[ky * 3 + 1], g[ky * 3 + 2]));
                let mask = _mm256_loadu_si256(MASK.as_ptr().add(8 - pair * MR) as *const __m256i);
                for j in 0..4 {
                    let col = g4(r[0][j], r[1][j], r[2][j]);
                    for i in 0..4 {
                        let xi = i * 4 + j;
                        let at = (((xi * groups + grp) * blocks + blk) * cig + c0) * MR;
                        _mm256_maskstore_ps(packed.as_mut_ptr().add(at), mask, col[i]);
                    }
                }
            }
        }
    }
}

/// Writes images `xs` into their even/odd column planes: channel `c`'s padded row `r` (input
/// row `r − pad`) has its even columns at `[0][r]` and odd ones at `[1][r]`, zero outside the
/// input.
fn fill_planes(s: &Shape, xs: &[f32], planes: &mut [f32]) {
    let (rows, cols) = (s.plane_rows(), s.plane_cols());
    let [ph, pw] = s.pad;
    let plane = s.h * s.w;
    // SAFETY: the convolution kernels run on CPUs with AVX2.
    let pieces = unsafe { Pieces::of(s.w, pw, cols) };
    // A row too near either end of `xs` for the plan's loads is split from a copy with the
    // plan's reach around it (zeros: the loads' lanes outside the row are masked anyway).
    let mut edge = Vec::new();
    for (c, pc) in planes
        .chunks_exact_mut(s.plane_len())
        .take(xs.len() / plane)
        .enumerate()
    {
        let (even, odd) = pc.split_at_mut(rows * cols);
        for r in 0..rows {
            let (e, o) = (&mut even[r * cols..][..cols], &mut odd[r * cols..][..cols]);
            match r.checked_sub(ph).filter(|&iy| iy < s.h) {
                None => {
                    e.fill(0.0);
                    o.fill(0.0);
                }
                Some(iy) => {
                    let at = c * plane + iy * s.w;
                    let row = if at >= pieces.before && at + pieces.after <= xs.len() {
                        xs[at - pieces.before..].as_ptr()
                    } else {
                        edge.clear();
                        edge.resize(pieces.before, 0.0);
                        edge.extend_from_slice(&xs[at..at + s.w]);
                        edge.resize(pieces.before + pieces.after, 0.0);
                        edge.as_ptr()
                    };
                    // SAFETY: the convolution kernels run on CPUs with AVX2; plane rows are
                    // `cols` floats, a multiple of 8; `row` starts `before` floats ahead of
                    // the row, with `after` floats from the row's first readable (in xs or in
                    // the copy).
                    unsafe { split_planned(row.add(pieces.before), &pieces.list, e, o) }
                }
            }
        }
    }
}

/// How [`split_planned`] reads the eight floats `P[8j .. 8j + 8]` of a padded row `P` (`pw` zeros,
/// the `w` floats of an input row, zeros) of plane rows `cols` floats long.
struct Pieces {
    list: Vec<Piece>,
    /// Floats the loads reach before the row's first and from it past its last.
    before: usize,
    after: usize,
}

#[derive(Clone, Copy)]
enum Piece {
    /// All outside the row.
    Zero,
    /// The eight floats from row offset `k`, all inside the row.
    Whole(isize),
    /// The eight floats from row offset `k`, the lanes outside the row zeroed by the mask.
    Part(isize, __m256),
}

impl Pieces {
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn of(w: usize, pw: usize, cols: usize) -> Self {
        let (w, pw) = (w as isize, pw as isize);
        let (mut before, mut after) = (0isize, 0isize);
        let list = (0..2 * cols as isize)
            .step_by(8)
            .map(|i| {
                let k = i - pw;
                if k >= w || k <= -8 {
                    Piece::Zero
                } else if k >= 0 && k + 8 <= w {
                    Piece::Whole(k)
                } else {
                    before = before.max(-k);
                    after = after.max(k + 8);
                    let m: [i32; 8] = std::array::from_fn(|l| {
                        let p = k + l as isize;
                        -i32::from(p >= 0 && p < w)
                    });
                    let m = _mm256_castsi256_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i));
                    Piece::Part(k, m)
                }
            })
            .collect();
        Self {
            list,
            before: before as usize,
            after: after.max(w) as usize,
        }
    }
}

/// `e[c] = P[2c]`, `o[c] = P[2c + 1]` for the padded row `P` of the input row at `row`, sixteen
/// values of `P` at a time, by its [`Pieces`]: each eight of `P` one plain load of the eight row
/// floats under them (masked after loading where they reach outside the row), or zeros. The
/// pieces depend only on the row width and padding, so they are worked out once per fill, not
/// per vector (as an earlier version did, with a clamped load and a lane permutation per vector:
/// 10.6% of the realnvp-mnist step on an AMD Zen 5, 7.0% now). Masked loads of just the row's
/// lanes took 4–5× as long per row on the Zen 5 where the input streams from memory — a loop
/// timing both on 64 MB of rows of 28 — and made the plane fill 12% of the ddpm-mnist step; a
/// version that copied every row into a padded buffer and split that made its loads straddle
/// two of the copy's stores and wait for both.
///
/// # Safety
/// The CPU must have AVX2; `row − before .. row + after` (the pieces') must be readable; `e`
/// and `o` hold `list.len() / 2 · 8` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn split_planned(row: *const f32, list: &[Piece], e: &mut [f32], o: &mut [f32]) {
    assert!(e.len() == o.len() && list.len() == e.len() / 4);
    let load = |p: Piece| match p {
        Piece::Zero => _mm256_setzero_ps(),
        Piece::Whole(k) => _mm256_loadu_ps(row.offset(k)),
        Piece::Part(k, m) => _mm256_and_ps(_mm256_loadu_ps(row.offset(k)), m),
    };
    for (c, pair) in (0..e.len()).step_by(8).zip(list.chunks_exact(2)) {
        let (a, b) = (load(pair[0]), load(pair[1]));
        deinterleave(a, b, e.as_mut_ptr().add(c), o.as_mut_ptr().add(c));
    }
}

/// Stores the even floats of `a`, `b` (sixteen consecutive values) to `e[..8]` and the odd ones
/// to `o[..8]`.
///
/// # Safety
/// The CPU must have AVX2; `e` and `o` must be valid for 8 floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn deinterleave(a: __m256, b: __m256, e: *mut f32, o: *mut f32) {
    // [a0 a2 b0 b2 | a4 a6 b4 b6] → [a0 a2 a4 a6 b0 b2 b4 b6], and the odd ones alike.
    let even = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)),
        0xD8,
    ));
    let odd = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)),
        0xD8,
    ));
    _mm256_storeu_ps(e, even);
    _mm256_storeu_ps(o, odd);
}

/// A run of panel columns `[j, j + len)`: tiles `tx0 .. tx0 + len` of tile row `ty` of image
/// `img` of the chunk.
#[derive(Clone, Copy, Debug)]
struct TileSeg {
    j: usize,
    len: usize,
    img: usize,
    ty: usize,
    tx0: usize,
}

/// Splits chunk tiles `[q0, q0 + width)` (tile `q` = image `q / (th·tw)`, row-major inside)
/// at tile rows.
fn tile_segments(s: &Shape, q0: usize, width: usize, out: &mut Vec<TileSeg>) {
    out.clear();
    let (tw, per_img) = (s.tw(), s.th() * s.tw());
    let mut q = q0;
    while q < q0 + width {
        let (img, t) = (q / per_img, q % per_img);
        let (ty, tx0) = (t / tw, t % tw);
        let len = (tw - tx0).min(q0 + width - q);
        out.push(TileSeg {
            j: q - q0,
            len,
            img,
            ty,
            tx0,
        });
        q += len;
    }
}

/// `V[ξ][c][j + t] = (Bᵀ d B)[ξ]` (at `ξ·vx + c·vw + j + t`) for every tile of `segs` and
/// channel `c`, eight tiles at a time, with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0],
/// [0, 1, 0, −1]]`.
///
/// # Safety
/// `v` must be valid for 16 blocks of `vx ≥ ci·vw` floats, rows `vw ≥ NR + 8` apart; segments
/// must lie in the chunk.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // the transform reads best indexed
unsafe fn input_transform(
    s: &Shape,
    planes: &[f32],
    segs: &[TileSeg],
    v: *mut f32,
    vw: usize,
    vx: usize,
) {
    let (rows, cols) = (s.plane_rows(), s.plane_cols());
    let half = rows * cols;
    for c in 0..s.ci {
        for sg in segs {
            let base = (sg.img * s.ci + c) * s.plane_len();
            let pc = &planes[base..base + s.plane_len()];
            let mut t = 0;
            while t < sg.len {
                let tx = sg.tx0 + t;
                // Column transform of the 4 rows under the tiles: d·B per row, vectorised over
                // 8 tiles (tile tx reads even/odd columns tx and tx + 1).
                let mut r = [[_mm256_setzero_ps(); 4]; 4];
                for (i, ri) in r.iter_mut().enumerate() {
                    let row = (2 * sg.ty + i) * cols + tx;
                    assert!(half + row + 9 <= pc.len());
                    let p = pc.as_ptr();
                    let e0 = _mm256_loadu_ps(p.add(row));
                    let e1 = _mm256_loadu_ps(p.add(row + 1));
                    let o0 = _mm256_loadu_ps(p.add(half + row));
                    let o1 = _mm256_loadu_ps(p.add(half + row + 1));
                    *ri = [
                        _mm256_sub_ps(e0, e1),
                        _mm256_add_ps(o0, e1),
                        _mm256_sub_ps(e1, o0),
                        _mm256_sub_ps(o0, o1),
                    ];
                }
                // Row transform Bᵀ·(d·B), stored to the panel.
                for j in 0..4 {
                    let out = [
                        _mm256_sub_ps(r[0][j], r[2][j]),
                        _mm256_add_ps(r[1][j], r[2][j]),
                        _mm256_sub_ps(r[2][j], r[1][j]),
                        _mm256_sub_ps(r[1][j], r[3][j]),
                    ];
                    for (i, val) in out.into_iter().enumerate() {
                        _mm256_storeu_ps(v.add((i * 4 + j) * vx + c * vw + sg.j + t), val);
                    }
                }
                t += 8;
            }
        }
    }
}

/// `Y = Aᵀ M A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]` for the panel's `nr` tiles (`m`:
/// `[ξ][o][nr]`, ξ blocks `ldo` apart), written to the outputs of group `grp` (the right column
/// or bottom row of a tile is dropped where the output ends).
fn output_transform(
    s: &Shape,
    grp: usize,
    nr: usize,
    ldo: usize,
    m: &[f32],
    segs: &[TileSeg],
    ys: &mut [MaybeUninit<f32>],
) {
    let cog = s.co / s.groups;
    let out_len = s.co * s.ho * s.wo;
    assert!(nr <= NR_WIDE && nr % 8 == 0 && m.len() >= 15 * ldo + cog * nr);
    // The two output rows of each tile, interleaved: `rows[a][2t + b] = Y[a][b]` of tile t.
    let mut rows = [[0f32; 2 * NR_WIDE]; 2];
    for o in 0..cog {
        // SAFETY: m holds 16 blocks of ldo floats, each with cog rows of nr (asserted).
        unsafe { transform_back(m.as_ptr().add(o * nr), ldo, nr, &mut rows) };
        let ch = grp * cog + o;
        for sg in segs {
            let plane = sg.img * out_len + ch * s.ho * s.wo;
            let ox = 2 * sg.tx0;
            let n = (2 * sg.len).min(s.wo - ox);
            for (a, row) in rows.iter().enumerate() {
                let oy = 2 * sg.ty + a;
                if oy < s.ho {
                    let dst = &mut ys[plane + oy * s.wo + ox..][..n];
                    // SAFETY: both ranges hold n floats (row: 2·(j + len) ≤ 2·nr).
                    unsafe {
                        copy_exact(dst.as_mut_ptr().cast(), row[2 * sg.j..][..n].as_ptr(), n)
                    };
                }
            }
        }
    }
}

/// `dst[..n] = src[..n]` in vectors of 8, the last one masked.
///
/// # Safety
/// Both must be valid for `n` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn copy_exact(dst: *mut f32, src: *const f32, n: usize) {
    let mut t = 0;
    while t + 8 <= n {
        _mm256_storeu_ps(dst.add(t), _mm256_loadu_ps(src.add(t)));
        t += 8;
    }
    if t < n {
        let m = _mm256_loadu_si256(MASK.as_ptr().add(8 - (n - t)) as *const __m256i);
        _mm256_maskstore_ps(dst.add(t), m, _mm256_maskload_ps(src.add(t), m));
    }
}

/// `rows[a][2t + b] = (Aᵀ M A)[a][b]` of the `nr` tiles of one output channel, `m[ξ·ld + t]`.
///
/// # Safety
/// `m` must be valid for 16 rows of `nr` floats, `ld` apart; `nr` is a multiple of 8, at most
/// [`NR_WIDE`].
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // the transform reads best indexed
unsafe fn transform_back(m: *const f32, ld: usize, nr: usize, rows: &mut [[f32; 2 * NR_WIDE]; 2]) {
    for t in (0..nr).step_by(8) {
        let at = |xi: usize| _mm256_loadu_ps(m.add(xi * ld + t));
        let mut sv = [[_mm256_setzero_ps(); 4]; 2];
        for j in 0..4 {
            let (m1, m2) = (at(4 + j), at(8 + j));
            sv[0][j] = _mm256_add_ps(_mm256_add_ps(at(j), m1), m2);
            sv[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), at(12 + j));
        }
        for (a, row) in rows.iter_mut().enumerate() {
            let [s0, s1, s2, s3] = sv[a];
            let y0 = _mm256_add_ps(_mm256_add_ps(s0, s1), s2);
            let y1 = _mm256_sub_ps(_mm256_sub_ps(s1, s2), s3);
            // Interleave y0 and y1: lanes (0, 1, 2, 3 | 4, 5, 6, 7) → pairs in tile order.
            let lo = _mm256_unpacklo_ps(y0, y1);
            let hi = _mm256_unpackhi_ps(y0, y1);
            let p = row.as_mut_ptr().add(2 * t);
            _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
            _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps(lo, hi, 0x31));
        }
    }
}

//! PNG output: image grids and a loss-curve plot.

use crate::data::ImageDataset;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gm_core::GmRng;
use gm_models::{EvalOptions, Model};
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

/// Saves `(N, C, H, W)` images in `[0, 1]` as a grid with `ncols` columns and 2-pixel gutters.
pub fn save_grid(images: &Tensor, ncols: usize, path: &Path) -> Result<()> {
    let (n, c, h, w) = images.dims4().context("save_grid expects (N, C, H, W)")?;
    if n == 0 || ncols == 0 {
        bail!("save_grid: nothing to draw");
    }
    let data = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let rows = n.div_ceil(ncols);
    let pad = 2;
    let (gw, gh) = ((w + pad) * ncols + pad, (h + pad) * rows + pad);
    let px = |i: usize, ch: usize, y: usize, x: usize| {
        (data[((i * c + ch) * h + y) * w + x].clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let mut img = RgbImage::from_pixel(gw as u32, gh as u32, Rgb([40, 40, 40]));
    for i in 0..n {
        let (ox, oy) = (pad + (i % ncols) * (w + pad), pad + (i / ncols) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                let v = if c == 3 {
                    [px(i, 0, y, x), px(i, 1, y, x), px(i, 2, y, x)]
                } else {
                    let g = px(i, 0, y, x);
                    [g, g, g]
                };
                img.put_pixel((ox + x) as u32, (oy + y) as u32, Rgb(v));
            }
        }
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).ok();
    }
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Draws `points` (x, y) as a polyline on a white canvas with axes, y on a linear scale between
/// the 1st and 99th percentile (so the first steps do not flatten the curve).
pub fn save_curve(points: &[(f64, f64)], path: &Path) -> Result<()> {
    let (w, h, m) = (640u32, 400u32, 40i64);
    let mut img = GrayImage::from_pixel(w, h, Luma([255]));
    let pts: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    if pts.len() < 2 {
        bail!("save_curve: need at least two finite points");
    }
    let mut ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.total_cmp(b));
    let (ylo, yhi) = (ys[ys.len() / 100], ys[ys.len() - 1 - ys.len() / 100]);
    let (ylo, yhi) = if yhi > ylo {
        (ylo, yhi)
    } else {
        (ylo - 1.0, ylo + 1.0)
    };
    let (xlo, xhi) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1.0));
    let to_px = |p: (f64, f64)| {
        let x = m as f64 + (p.0 - xlo) / (xhi - xlo) * (w as i64 - 2 * m) as f64;
        let y = (h as i64 - m) as f64
            - ((p.1.clamp(ylo, yhi) - ylo) / (yhi - ylo)) * (h as i64 - 2 * m) as f64;
        (x.round() as i64, y.round() as i64)
    };
    let mut line = |a: (i64, i64), b: (i64, i64), v: u8| {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
        for s in 0..=steps {
            let x = a.0 + (b.0 - a.0) * s / steps;
            let y = a.1 + (b.1 - a.1) * s / steps;
            if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                img.put_pixel(x as u32, y as u32, Luma([v]));
            }
        }
    };
    line((m, h as i64 - m), (w as i64 - m, h as i64 - m), 0);
    line((m, m), (m, h as i64 - m), 0);
    for pair in pts.windows(2) {
        line(to_px(pair[0]), to_px(pair[1]), 60);
    }
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The square `[-LIM, LIM]²` drawn by [`save_density_2d`] (the FFJORD figures' range).
pub const DENSITY_LIM: f64 = 4.0;

/// A colour map from dark (0) through red and orange to pale yellow (1), like matplotlib's
/// `inferno`.
fn heat(v: f64) -> Rgb<u8> {
    const STOPS: [[f64; 3]; 5] = [
        [0.0, 0.0, 4.0],
        [87.0, 16.0, 110.0],
        [188.0, 55.0, 84.0],
        [249.0, 142.0, 9.0],
        [252.0, 255.0, 164.0],
    ];
    let x = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let c = |k: usize| (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8;
    Rgb([c(0), c(1), c(2)])
}

/// The `res × res` grid cell centres of `[-LIM, LIM]²`, row-major from the top (y = +LIM) down:
/// `(res², 2)` values for a model's log-density.
pub fn density_grid(res: usize) -> Vec<[f64; 2]> {
    let step = 2.0 * DENSITY_LIM / res as f64;
    let mut g = Vec::with_capacity(res * res);
    for r in 0..res {
        for c in 0..res {
            let x = -DENSITY_LIM + (c as f64 + 0.5) * step;
            let y = DENSITY_LIM - (r as f64 + 0.5) * step;
            g.push([x, y]);
        }
    }
    g
}

fn histogram(points: &[[f32; 2]], res: usize) -> Vec<f64> {
    let mut h = vec![0.0; res * res];
    let step = 2.0 * DENSITY_LIM / res as f64;
    for p in points {
        let c = ((p[0] as f64 + DENSITY_LIM) / step).floor();
        let r = ((DENSITY_LIM - p[1] as f64) / step).floor();
        if c >= 0.0 && r >= 0.0 && (c as usize) < res && (r as usize) < res {
            h[r as usize * res + c as usize] += 1.0;
        }
    }
    h
}

/// Panels side by side over `[-4, 4]²`: a histogram of the data, the model's density
/// `exp(log_density)` on the `res × res` grid of [`density_grid`] (for models that have one), and a
/// histogram of the model's samples — each scaled to its own maximum.
pub fn save_density_2d(
    data: &[[f32; 2]],
    log_density: Option<&[f64]>,
    samples: &[[f32; 2]],
    res: usize,
    path: &Path,
) -> Result<()> {
    let mut panels = vec![histogram(data, res)];
    if let Some(log_density) = log_density {
        if log_density.len() != res * res {
            bail!(
                "save_density_2d: {} density values for a {res}×{res} grid",
                log_density.len()
            );
        }
        let lmax = log_density
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max);
        panels.push(
            log_density
                .iter()
                .map(|&l| if l.is_finite() { (l - lmax).exp() } else { 0.0 })
                .collect(),
        );
    }
    panels.push(histogram(samples, res));
    let pad = 4usize;
    let k = panels.len();
    let (gw, gh) = (k * res + (k + 1) * pad, res + 2 * pad);
    let mut img = RgbImage::from_pixel(gw as u32, gh as u32, Rgb([255, 255, 255]));
    for (k, panel) in panels.iter().enumerate() {
        let max = panel.iter().copied().fold(0.0, f64::max).max(1e-300);
        let ox = pad + k * (res + pad);
        for r in 0..res {
            for c in 0..res {
                let v = panel[r * res + c] / max;
                img.put_pixel((ox + c) as u32, (pad + r) as u32, heat(v));
            }
        }
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).ok();
    }
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the FFJORD-style picture of a 2-D model ([`save_density_2d`]): the data (`data`, up
/// to 20 000 points), the model's density on a 200 × 200 grid (density models only), and
/// `n_samples` of the model's samples.
pub fn toy_density_plot(
    model: &dyn Model,
    data: &ImageDataset,
    n_samples: usize,
    rng: &mut GmRng,
    device: &Device,
    path: &Path,
) -> Result<()> {
    const RES: usize = 200;
    let to_points = |v: &[f32]| v.chunks_exact(2).map(|p| [p[0], p[1]]).collect::<Vec<_>>();
    let data_pts = match &data.values {
        Some(v) => to_points(&v[..v.len().min(2 * 20_000)]),
        None => bail!("{}: not a 2-D toy data set", data.source),
    };
    let logd = match model.likelihood_metric() {
        Some(metric) => {
            let grid: Vec<f32> = density_grid(RES)
                .into_iter()
                .flat_map(|p| [p[0] as f32, p[1] as f32])
                .collect();
            let opts = EvalOptions {
                iwae_k: 1,
                max_pairs: 20_000,
                full: false,
            };
            let mut logd = Vec::with_capacity(RES * RES);
            for chunk in grid.chunks(2 * 4000) {
                let x = Tensor::from_slice(chunk, (chunk.len() / 2, 2, 1, 1), device)?;
                let m = model.eval_metrics(&gm_models::Batch { x, labels: None }, rng, &opts)?;
                let nll = m
                    .into_iter()
                    .find(|(k, _)| k == metric)
                    .ok_or_else(|| anyhow!("the model reported no '{metric}'"))?
                    .1;
                logd.extend(
                    nll.to_dtype(DType::F64)?
                        .to_vec1::<f64>()?
                        .iter()
                        .map(|v| -v),
                );
            }
            Some(logd)
        }
        None => None,
    };
    let samples = match model.sample(n_samples, rng)? {
        Some(s) => to_points(&s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => Vec::new(),
    };
    save_density_2d(&data_pts, logd.as_deref(), &samples, RES, path)
}

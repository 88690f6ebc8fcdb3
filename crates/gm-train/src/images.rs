//! PNG output: image grids, labelled montages, the loss-curve plot and 2-D density panels.

use crate::data::ImageDataset;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gm_core::GmRng;
use gm_models::{EvalOptions, Model};
use image::{Rgb, RgbImage};
use std::path::Path;

/// `(N, C, H, W)` images in `[0, 1]` as a grid with `ncols` columns and 2-pixel gutters.
pub fn grid_image(images: &Tensor, ncols: usize) -> Result<RgbImage> {
    let (n, c, h, w) = images.dims4().context("a grid needs (N, C, H, W) images")?;
    if n == 0 || ncols == 0 {
        bail!("a grid needs at least one image and one column");
    }
    let data = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let ncols = ncols.min(n);
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
    Ok(img)
}

fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).ok();
    }
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Saves `(N, C, H, W)` images in `[0, 1]` as a grid with `ncols` columns and 2-pixel gutters.
pub fn save_grid(images: &Tensor, ncols: usize, path: &Path) -> Result<()> {
    save_png(&grid_image(images, ncols)?, path)
}

/// Height of a line of [`draw_text`] at `scale`.
pub const fn text_height(scale: u32) -> u32 {
    8 * scale
}

/// Width of `text` drawn by [`draw_text`] at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    8 * scale * text.chars().count() as u32
}

/// Draws `text` with its top-left corner at `(x, y)` in an 8×8 bitmap font (public-domain
/// `font8x8`; ASCII, other characters as `?`), each font pixel a `scale × scale` square.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let s = scale.max(1) as i64;
    for (k, ch) in text.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY[if ch.is_ascii() {
            ch as usize
        } else {
            b'?' as usize
        }];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 0 {
                    continue;
                }
                for dy in 0..s {
                    for dx in 0..s {
                        let px = x + (k as i64 * 8 + col) * s + dx;
                        let py = y + row as i64 * s + dy;
                        if px >= 0
                            && py >= 0
                            && (px as u32) < img.width()
                            && (py as u32) < img.height()
                        {
                            img.put_pixel(px as u32, py as u32, color);
                        }
                    }
                }
            }
        }
    }
}

/// `text` cut to at most `width` pixels at `scale` (ending in `..` when cut).
fn fit(text: &str, width: u32, scale: u32) -> String {
    let max = (width / (8 * scale.max(1))) as usize;
    if text.chars().count() <= max {
        return text.to_string();
    }
    let keep = max.saturating_sub(2);
    text.chars().take(keep).collect::<String>() + &"..".chars().take(max - keep).collect::<String>()
}

/// Pictures with a caption above each, placed left to right, `per_row` to a row, on white:
/// a labelled montage (e.g. `gm compare`'s grids, or inputs above their reconstructions).
pub fn labelled_panels(panels: &[(String, RgbImage)], per_row: usize) -> Result<RgbImage> {
    if panels.is_empty() || per_row == 0 {
        bail!("a montage needs at least one picture");
    }
    let (pad, cap) = (6u32, text_height(1) + 6);
    let cols = per_row.min(panels.len());
    let rows = panels.len().div_ceil(cols);
    let cell_w = panels.iter().map(|p| p.1.width()).max().unwrap_or(0);
    let row_h: Vec<u32> = (0..rows)
        .map(|r| {
            panels[r * cols..((r + 1) * cols).min(panels.len())]
                .iter()
                .map(|p| p.1.height())
                .max()
                .unwrap_or(0)
                + cap
        })
        .collect();
    let (w, h) = (
        cols as u32 * (cell_w + pad) + pad,
        row_h.iter().sum::<u32>() + (rows as u32 + 1) * pad,
    );
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut y0 = pad;
    for (r, rh) in row_h.iter().enumerate() {
        for (c, (label, pic)) in panels[r * cols..((r + 1) * cols).min(panels.len())]
            .iter()
            .enumerate()
        {
            let x0 = pad + c as u32 * (cell_w + pad);
            draw_text(
                &mut img,
                x0 as i64,
                y0 as i64 + 1,
                &fit(label, cell_w, 1),
                1,
                Rgb([0, 0, 0]),
            );
            image::imageops::replace(&mut img, pic, x0 as i64, (y0 + cap) as i64);
        }
        y0 += rh + pad;
    }
    Ok(img)
}

/// Test images above their reconstructions, each half captioned.
pub fn save_reconstructions(
    inputs: &Tensor,
    recons: &Tensor,
    ncols: usize,
    path: &Path,
) -> Result<()> {
    let panels = [
        ("test images".to_string(), grid_image(inputs, ncols)?),
        (
            "their reconstructions".to_string(),
            grid_image(recons, ncols)?,
        ),
    ];
    save_png(&labelled_panels(&panels, 1)?, path)
}

/// A round step for about `n` ticks over `span`: 1, 2 or 5 times a power of ten.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

fn tick_label(v: f64, step: f64) -> String {
    let digits = (-step.log10().floor()).max(0.0) as usize;
    if v.abs() >= 1e5 || (v != 0.0 && v.abs() < 1e-3) {
        format!("{v:.1e}")
    } else {
        format!("{v:.digits$}")
    }
}

/// One line of [`save_curve`]: its legend, its (step, value) points and its colour.
pub struct Series<'a> {
    pub label: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
}

/// Draws each series as a polyline (a series of one point as a dot) on white, with a title, axes,
/// tick labels, axis names and a legend; y on a linear scale between the 1st and 99th
/// percentile of all finite values (so the first steps do not flatten the curve).
pub fn save_curve(series: &[Series], title: &str, ylabel: &str, path: &Path) -> Result<()> {
    let (w, h) = (720i64, 440i64);
    let (left, right, top, bottom) = (78i64, 20i64, 44i64, 48i64);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255]));
    let finite = |s: &Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect()
    };
    let all: Vec<(f64, f64)> = series.iter().flat_map(finite).collect();
    if all.len() < 2 {
        bail!("a curve needs at least two finite points");
    }
    let mut ys: Vec<f64> = all.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.total_cmp(b));
    let (ylo, yhi) = (ys[ys.len() / 100], ys[ys.len() - 1 - ys.len() / 100]);
    let (ylo, yhi) = if yhi > ylo {
        (ylo, yhi)
    } else {
        (ylo - 1.0, ylo + 1.0)
    };
    let xlo = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let xhi = all
        .iter()
        .map(|p| p.0)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(xlo + 1.0);
    let (pw, ph) = ((w - left - right) as f64, (h - top - bottom) as f64);
    let to_px = |p: (f64, f64)| {
        let x = left as f64 + (p.0 - xlo) / (xhi - xlo) * pw;
        let y = (h - bottom) as f64 - (p.1.clamp(ylo, yhi) - ylo) / (yhi - ylo) * ph;
        (x.round() as i64, y.round() as i64)
    };
    let line = |img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>| {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
        for s in 0..=steps {
            let x = a.0 + (b.0 - a.0) * s / steps;
            let y = a.1 + (b.1 - a.1) * s / steps;
            if x >= 0 && y >= 0 && x < w && y < h {
                img.put_pixel(x as u32, y as u32, c);
            }
        }
    };
    let (black, grid) = (Rgb([0, 0, 0]), Rgb([225, 225, 225]));
    // Ticks with grid lines, then the axes over them.
    let ystep = nice_step(yhi - ylo, 5.0);
    let mut v = (ylo / ystep).ceil() * ystep;
    while v <= yhi + 1e-9 * ystep {
        let (_, py) = to_px((xlo, v));
        line(&mut img, (left, py), (w - right, py), grid);
        line(&mut img, (left - 4, py), (left, py), black);
        let t = tick_label(v, ystep);
        draw_text(
            &mut img,
            left - 8 - text_width(&t, 1) as i64,
            py - 4,
            &t,
            1,
            black,
        );
        v += ystep;
    }
    let xstep = nice_step(xhi - xlo, 6.0).max(1.0);
    let mut v = (xlo / xstep).ceil() * xstep;
    while v <= xhi + 1e-9 * xstep {
        let (px, _) = to_px((v, ylo));
        line(&mut img, (px, top), (px, h - bottom), grid);
        line(&mut img, (px, h - bottom), (px, h - bottom + 4), black);
        let t = format!("{v:.0}");
        draw_text(
            &mut img,
            px - text_width(&t, 1) as i64 / 2,
            h - bottom + 8,
            &t,
            1,
            black,
        );
        v += xstep;
    }
    line(&mut img, (left, h - bottom), (w - right, h - bottom), black);
    line(&mut img, (left, top), (left, h - bottom), black);
    for s in series {
        let pts = finite(s);
        let c = Rgb(s.color);
        // Two pixels wide; a dot on every point of a short series (an evaluation's few).
        for pair in pts.windows(2) {
            let (a, b) = (to_px(pair[0]), to_px(pair[1]));
            line(&mut img, a, b, c);
            line(&mut img, (a.0, a.1 + 1), (b.0, b.1 + 1), c);
        }
        if pts.len() <= 50 {
            for &p in &pts {
                let (x, y) = to_px(p);
                for d in -2..=2 {
                    line(&mut img, (x - 2, y + d), (x + 2, y + d), c);
                }
            }
        }
    }
    draw_text(
        &mut img,
        left,
        10,
        &fit(title, (w - left - right) as u32, 2),
        2,
        black,
    );
    draw_text(
        &mut img,
        (w - text_width("step", 1) as i64) / 2,
        h - 18,
        "step",
        1,
        black,
    );
    draw_text(
        &mut img,
        4,
        top - 14,
        &fit(ylabel, (w - 8) as u32, 1),
        1,
        black,
    );
    // Legend, top right inside the plot.
    let mut ly = top + 6;
    for s in series {
        let lx = w - right - 16 - text_width(s.label, 1) as i64 - 8;
        for d in 0..3 {
            line(
                &mut img,
                (lx, ly + 3 + d),
                (lx + 12, ly + 3 + d),
                Rgb(s.color),
            );
        }
        draw_text(&mut img, lx + 16, ly, s.label, 1, black);
        ly += 14;
    }
    save_png(&img, path)
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
    let names = match log_density {
        Some(_) => vec!["data", "model density", "model samples"],
        None => vec!["data", "model samples"],
    };
    let pictures: Vec<(String, RgbImage)> = panels
        .iter()
        .zip(names)
        .map(|(panel, name)| {
            let max = panel.iter().copied().fold(0.0, f64::max).max(1e-300);
            let pic = RgbImage::from_fn(res as u32, res as u32, |c, r| {
                heat(panel[r as usize * res + c as usize] / max)
            });
            (format!("{name}, [-4, 4]^2"), pic)
        })
        .collect();
    save_png(&labelled_panels(&pictures, pictures.len())?, path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_from_the_font_bitmaps() {
        let mut img = RgbImage::from_pixel(40, 10, Rgb([255, 255, 255]));
        draw_text(&mut img, 0, 0, "A1", 1, Rgb([0, 0, 0]));
        for (k, ch) in ['A', '1'].into_iter().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[ch as usize];
            for (y, bits) in glyph.iter().enumerate() {
                for x in 0..8 {
                    let on = img.get_pixel((k * 8 + x) as u32, y as u32)[0] == 0;
                    assert_eq!(on, bits >> x & 1 == 1, "{ch} at ({x}, {y})");
                }
            }
        }
        assert_eq!(text_width("A1", 2), 32);
        assert_eq!(fit("reconstructions", 64, 1), "recons..");
        assert_eq!(fit("test", 64, 1), "test");
    }

    #[test]
    fn ticks_are_round_steps() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(0.012, 5.0), 0.005);
        assert_eq!(nice_step(1900.0, 6.0), 500.0);
        assert_eq!(tick_label(0.755, 0.005), "0.755");
        assert_eq!(tick_label(400.0, 100.0), "400");
    }

    #[test]
    fn panels_are_placed_under_their_captions() {
        let a = RgbImage::from_pixel(30, 20, Rgb([1, 2, 3]));
        let b = RgbImage::from_pixel(10, 40, Rgb([4, 5, 6]));
        let m = labelled_panels(&[("a".into(), a), ("b".into(), b)], 2).unwrap();
        // Cells as wide as the widest picture, a row as tall as its tallest plus the caption.
        assert_eq!((m.width(), m.height()), (2 * (30 + 6) + 6, 40 + 14 + 2 * 6));
        assert_eq!(m.get_pixel(6, 6 + 14)[0], 1);
        assert_eq!(m.get_pixel(6 + 36, 6 + 14 + 39)[0], 4);
    }
}

//! The user's own images: `data.dataset = "folder:PATH"` (PNG/JPEG files) or `"npy:PATH"` (a
//! uint8 NumPy array), read into the same [`ImageDataset`] the IDX readers give.
//!
//! **Folders** follow torchvision's `ImageFolder` layout: one subfolder per class (sorted names →
//! labels 0, 1, …; files below a class folder at any depth), or images directly in `PATH` (no
//! labels). `PATH/train` and `PATH/test`, when both exist, are the splits; otherwise each file
//! goes to the test split when a hash of its path relative to `PATH` falls in the first
//! `data.test_percent` of 100 buckets — fixed by the file's name, so adding files never moves
//! others between splits.
//!
//! **Arrays**: `npy:FILE.npy` holds uint8 images `(N, H, W)`, `(N, C, H, W)` or `(N, H, W, C)`
//! with C ∈ {1, 3}, labels (any integer type, 0–255) in `FILE_labels.npy` beside it if present,
//! split by a hash of the image index; `npy:DIR` holds `train.npy` and `test.npy` (and
//! `train_labels.npy`, `test_labels.npy`).
//!
//! Every image is brought to the model's `[C, H, W]`: grey ↔ RGB converted (RGB → grey by the
//! BT.709 luma weights), and — only when `data.fit` asks — resized (`"resize"`, triangle filter)
//! or centre-cropped to the target's aspect ratio and then resized (`"center-crop"`). Without it
//! an image of another size is an error naming the file. Data sets are decoded once: the pixels are
//! cached as one compact file under gm's cache (keyed by the files' names, sizes and
//! modification times and the settings), and the run says where.

use crate::config::DataConfig;
use crate::data::{ImageDataset, Split};
use anyhow::{anyhow, bail, Context, Result};
use image::{imageops::FilterType, DynamicImage};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The bytes of a NumPy v1.0 `.npy` file holding `data`, C order, of dtype `descr` (`"|u1"` for
/// uint8) and `shape` — what `np.save` writes; for building `npy:` data sets from Rust.
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

/// A data set named by `data.dataset`.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Folder(PathBuf),
    Npy(PathBuf),
}

/// The user data set `dataset` names (`folder:PATH`, `npy:PATH`), if it is one; `data_dir`
/// (`--data-dir`) replaces its path.
pub fn source(dataset: &str, data_dir: Option<&Path>) -> Option<Source> {
    let (kind, path) = dataset.split_once(':')?;
    let path = data_dir.map_or_else(|| PathBuf::from(path), Path::to_path_buf);
    match kind {
        "folder" => Some(Source::Folder(path)),
        "npy" => Some(Source::Npy(path)),
        _ => None,
    }
}

/// How an image of another size is brought to the model's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    None,
    Resize,
    CenterCrop,
}

impl std::str::FromStr for Fit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Fit::None),
            "resize" => Ok(Fit::Resize),
            "center-crop" => Ok(Fit::CenterCrop),
            _ => Err(format!(
                "data.fit must be \"none\", \"resize\" or \"center-crop\", got \"{s}\""
            )),
        }
    }
}

/// Image file extensions read from folders.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether `key` (a file's relative path, or an array index) belongs to the test split.
fn in_test(key: &str, test_percent: u32) -> bool {
    let h = Sha256::digest(format!("gm-split\0{key}").as_bytes());
    let v = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    v % 100 < test_percent as u64
}

/// One image brought to `[c, h, w]` (see the module docs), as CHW bytes.
fn fit_image(
    img: DynamicImage,
    shape: [usize; 3],
    fit: Fit,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let [c, h, w] = shape;
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let img = if (iw, ih) == (w, h) {
        img
    } else {
        match fit {
            Fit::None => bail!(
                "{}: {iw}×{ih} pixels, but the model reads {w}×{h} (set data.fit = \"resize\" or \"center-crop\")",
                what()
            ),
            Fit::Resize => img.resize_exact(w as u32, h as u32, FilterType::Triangle),
            Fit::CenterCrop => {
                // The largest centred window of the target's aspect ratio, then resized.
                let (cw, ch) = if iw * h > ih * w {
                    ((ih * w).div_ceil(h).min(iw), ih)
                } else {
                    (iw, (iw * h).div_ceil(w).min(ih))
                };
                img.crop_imm(((iw - cw) / 2) as u32, ((ih - ch) / 2) as u32, cw as u32, ch as u32)
                    .resize_exact(w as u32, h as u32, FilterType::Triangle)
            }
        }
    };
    Ok(match c {
        1 => img.to_luma8().into_raw(),
        3 => {
            let rgb = img.to_rgb8();
            let mut out = vec![0u8; 3 * h * w];
            for (i, p) in rgb.pixels().enumerate() {
                for k in 0..3 {
                    out[k * h * w + i] = p[k];
                }
            }
            out
        }
        _ => bail!("images have 1 or 3 channels; the model's image_shape asks for {c}"),
    })
}

/// The image files under `dir` (recursively), sorted by path.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A folder's images and labels (`None` without class folders), in a fixed order.
fn list_folder(root: &Path) -> Result<(Vec<PathBuf>, Option<Vec<u8>>)> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        let files = image_files(root)?;
        return Ok((files, None));
    }
    if classes.len() > 256 {
        bail!(
            "{}: {} class folders; gm's labels hold at most 256 classes",
            root.display(),
            classes.len()
        );
    }
    let (mut files, mut labels) = (Vec::new(), Vec::new());
    for (k, c) in classes.iter().enumerate() {
        for f in image_files(c)? {
            files.push(f);
            labels.push(k as u8);
        }
    }
    Ok((files, Some(labels)))
}

/// Both splits of a data set, decoded.
struct Decoded {
    train: ImageDataset,
    test: ImageDataset,
}

fn dataset(
    pixels: Vec<u8>,
    labels: Option<Vec<u8>>,
    shape: [usize; 3],
    source: String,
) -> ImageDataset {
    ImageDataset {
        pixels,
        values: None,
        labels,
        shape,
        source,
    }
}

fn decode_folder(root: &Path, shape: [usize; 3], fit: Fit, test_percent: u32) -> Result<Decoded> {
    let (train_root, test_root) = (root.join("train"), root.join("test"));
    // (file, label, test?) for every image.
    let mut items: Vec<(PathBuf, Option<u8>, bool)> = Vec::new();
    let mut labelled = None;
    if train_root.is_dir() && test_root.is_dir() {
        for (r, test) in [(&train_root, false), (&test_root, true)] {
            let (files, labels) = list_folder(r)?;
            labelled = Some(labels.is_some());
            for (i, f) in files.into_iter().enumerate() {
                items.push((f, labels.as_ref().map(|l| l[i]), test));
            }
        }
    } else {
        let (files, labels) = list_folder(root)?;
        labelled = Some(labels.is_some());
        for (i, f) in files.into_iter().enumerate() {
            let rel = f
                .strip_prefix(root)
                .unwrap_or(&f)
                .to_string_lossy()
                .replace('\\', "/");
            items.push((
                f,
                labels.as_ref().map(|l| l[i]),
                in_test(&rel, test_percent),
            ));
        }
    }
    if items.is_empty() {
        bail!(
            "{}: no PNG or JPEG images (expected class subfolders, image files, or train/ and test/)",
            root.display()
        );
    }
    let labelled = labelled.unwrap_or(false);
    let per = shape.iter().product::<usize>();
    let (mut tr, mut te) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for (f, label, test) in items {
        let img =
            image::open(&f).map_err(|e| anyhow!("{}: cannot read the image ({e})", f.display()))?;
        let px = fit_image(img, shape, fit, &|| f.display().to_string())?;
        debug_assert_eq!(px.len(), per);
        let (p, l) = if test { &mut te } else { &mut tr };
        p.extend(px);
        l.extend(label);
    }
    let src = |s: &str| format!("image folder {} ({s})", root.display());
    Ok(Decoded {
        train: dataset(tr.0, labelled.then_some(tr.1), shape, src("train")),
        test: dataset(te.0, labelled.then_some(te.1), shape, src("test")),
    })
}

/// A uint8 (or, for labels, integer) `.npy` array: its shape and values widened to i64.
fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<i64>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bad = |why: &str| anyhow!("{}: not a NumPy .npy array ({why})", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no \\x93NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("format version {v}"))),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or_else(|| bad("short header"))?,
    )
    .map_err(|_| bad("header not text"))?;
    let field = |name: &str| -> Result<&str> {
        let i = header
            .find(&format!("'{name}'"))
            .ok_or_else(|| bad(&format!("no '{name}'")))?;
        Ok(header[i + name.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or("");
    if field("fortran_order")?.starts_with("True") {
        return Err(bad("Fortran order; save it with np.ascontiguousarray"));
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("cannot read 'shape'"))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("cannot read 'shape'")))
        .collect::<Result<_>>()?;
    let data = &bytes[start + hlen..];
    let n: usize = shape.iter().product();
    let (size, signed) = match descr.trim_start_matches(['<', '|', '=']) {
        "u1" => (1, false),
        "i1" => (1, true),
        "u2" => (2, false),
        "i2" => (2, true),
        "u4" => (4, false),
        "i4" => (4, true),
        "u8" => (8, false),
        "i8" => (8, true),
        _ => {
            return Err(anyhow!(
                "{}: dtype '{descr}'; gm reads uint8 images (and integer labels): convert with .astype(np.uint8)",
                path.display()
            ))
        }
    };
    if descr.starts_with('>') && size > 1 {
        return Err(bad("big-endian"));
    }
    if data.len() != n * size {
        return Err(anyhow!(
            "{}: {} bytes of data for shape {shape:?} of {descr} ({} expected)",
            path.display(),
            data.len(),
            n * size
        ));
    }
    let vals = data
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            let u = u64::from_le_bytes(b);
            if signed {
                let shift = 64 - 8 * size as u32;
                ((u << shift) as i64) >> shift
            } else {
                u as i64
            }
        })
        .collect();
    Ok((shape, vals))
}

/// Images of an `.npy` array as CHW bytes of the model's shape.
fn npy_images(path: &Path, shape: [usize; 3], fit: Fit) -> Result<Vec<Vec<u8>>> {
    let (dims, vals) = read_npy(path)?;
    if let Some(v) = vals.iter().find(|v| !(0..=255).contains(*v)) {
        bail!("{}: holds {v}; images are uint8", path.display());
    }
    let [c, h, w] = shape;
    // (n, channels, height, width, channels-last?)
    let (n, ic, ih, iw, last) = match dims[..] {
        [n, ih, iw] => (n, 1, ih, iw, false),
        [n, a, ih, iw] if [a, ih, iw] == [c, h, w] && [1, 3].contains(&a) => (n, a, ih, iw, false),
        [n, ih, iw, b] if [ih, iw, b] == [h, w, c] && [1, 3].contains(&b) => (n, b, ih, iw, true),
        [n, a, ih, iw] if [1, 3].contains(&a) && ![1, 3].contains(&iw) => (n, a, ih, iw, false),
        [n, ih, iw, b] if [1, 3].contains(&b) => (n, b, ih, iw, true),
        _ => bail!(
            "{}: shape {dims:?}; gm reads (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3",
            path.display()
        ),
    };
    let per = ic * ih * iw;
    (0..n)
        .map(|i| {
            let img = &vals[i * per..(i + 1) * per];
            let at = |k: usize, y: usize, x: usize| {
                (if last {
                    img[(y * iw + x) * ic + k]
                } else {
                    img[(k * ih + y) * iw + x]
                }) as u8
            };
            let dynimg = if ic == 1 {
                DynamicImage::ImageLuma8(image::GrayImage::from_fn(iw as u32, ih as u32, |x, y| {
                    image::Luma([at(0, y as usize, x as usize)])
                }))
            } else {
                DynamicImage::ImageRgb8(image::RgbImage::from_fn(iw as u32, ih as u32, |x, y| {
                    let (x, y) = (x as usize, y as usize);
                    image::Rgb([at(0, y, x), at(1, y, x), at(2, y, x)])
                }))
            };
            fit_image(dynimg, shape, fit, &|| {
                format!("{} image {i}", path.display())
            })
        })
        .collect()
}

fn npy_labels(path: &Path, n: usize) -> Result<Option<Vec<u8>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let (dims, vals) = read_npy(path)?;
    if dims.iter().product::<usize>() != n {
        bail!(
            "{}: {} labels for {n} images",
            path.display(),
            dims.iter().product::<usize>()
        );
    }
    vals.iter()
        .map(|&v| {
            u8::try_from(v)
                .map_err(|_| anyhow!("{}: label {v}; gm's labels are 0–255", path.display()))
        })
        .collect::<Result<Vec<u8>>>()
        .map(Some)
}

fn decode_npy(path: &Path, shape: [usize; 3], fit: Fit, test_percent: u32) -> Result<Decoded> {
    let src = |s: &str| format!("NumPy array {} ({s})", path.display());
    if path.is_dir() {
        let mut out = Vec::new();
        for split in ["train", "test"] {
            let f = path.join(format!("{split}.npy"));
            if !f.is_file() {
                bail!(
                    "{}: no {split}.npy (npy:DIR holds train.npy and test.npy)",
                    path.display()
                );
            }
            let imgs = npy_images(&f, shape, fit)?;
            let labels = npy_labels(&path.join(format!("{split}_labels.npy")), imgs.len())?;
            out.push(dataset(imgs.concat(), labels, shape, src(split)));
        }
        let test = out.pop().expect("two splits");
        let train = out.pop().expect("two splits");
        return Ok(Decoded { train, test });
    }
    let imgs = npy_images(path, shape, fit)?;
    let stem = path.with_extension("");
    let labels = npy_labels(
        &PathBuf::from(format!("{}_labels.npy", stem.display())),
        imgs.len(),
    )?;
    let (mut tr, mut te) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for (i, img) in imgs.into_iter().enumerate() {
        let (p, l) = if in_test(&i.to_string(), test_percent) {
            &mut te
        } else {
            &mut tr
        };
        p.extend(img);
        l.extend(labels.as_ref().map(|l| l[i]));
    }
    let has = labels.is_some();
    Ok(Decoded {
        train: dataset(tr.0, has.then_some(tr.1), shape, src("train")),
        test: dataset(te.0, has.then_some(te.1), shape, src("test")),
    })
}

/// The cache key of a data set: every file's relative path, size and modification time, and
/// the settings that shape the decoded pixels.
fn cache_key(src: &Source, shape: [usize; 3], fit: Fit, test_percent: u32) -> Result<String> {
    let root = match src {
        Source::Folder(p) | Source::Npy(p) => p,
    };
    let mut h = Sha256::new();
    h.update(format!("gm-userdata-1 {src:?} {shape:?} {fit:?} {test_percent}\n").as_bytes());
    let files = if root.is_dir() {
        let mut v = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in
                std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?
            {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    v.push(p);
                }
            }
        }
        v.sort();
        v
    } else {
        let stem = root.with_extension("");
        vec![
            root.clone(),
            PathBuf::from(format!("{}_labels.npy", stem.display())),
        ]
    };
    for f in files {
        if let Ok(m) = std::fs::metadata(&f) {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            h.update(format!("{}\0{}\0{t}\n", f.display(), m.len()).as_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

const MAGIC: &[u8; 8] = b"GMIMGv1\n";

fn write_cache(path: &Path, d: &Decoded) -> Result<()> {
    let mut out = MAGIC.to_vec();
    for ds in [&d.train, &d.test] {
        let src = ds.source.as_bytes();
        out.extend((src.len() as u64).to_le_bytes());
        out.extend(src);
        out.extend((ds.pixels.len() as u64).to_le_bytes());
        out.extend(&ds.pixels);
        match &ds.labels {
            Some(l) => {
                out.push(1);
                out.extend((l.len() as u64).to_le_bytes());
                out.extend(l);
            }
            None => out.push(0),
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::checkpoint::atomic_write(path, &out)
}

fn read_cache(path: &Path, shape: [usize; 3]) -> Option<Decoded> {
    let b = std::fs::read(path).ok()?;
    let mut at = MAGIC.len();
    if b.get(..at)? != MAGIC {
        return None;
    }
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let mut sets = Vec::new();
    for _ in 0..2 {
        let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
        let source = String::from_utf8(take(n)?.to_vec()).ok()?;
        let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
        let pixels = take(n)?.to_vec();
        let labels = match take(1)?[0] {
            1 => {
                let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
                Some(take(n)?.to_vec())
            }
            _ => None,
        };
        sets.push(dataset(pixels, labels, shape, source));
    }
    let test = sets.pop()?;
    let train = sets.pop()?;
    Some(Decoded { train, test })
}

/// One split of a user data set, decoded (or read from the cache under gm's cache folder), for a
/// model of `shape`.
pub fn load(
    src: &Source,
    cfg: &DataConfig,
    shape: [usize; 3],
    split: Split,
) -> Result<ImageDataset> {
    load_cached(
        src,
        cfg,
        shape,
        split,
        &crate::fetch::cache_dir().join("images"),
    )
}

/// [`load`] with the decoded pixels cached in `cache_root`.
pub fn load_cached(
    src: &Source,
    cfg: &DataConfig,
    shape: [usize; 3],
    split: Split,
    cache_root: &Path,
) -> Result<ImageDataset> {
    let fit: Fit = cfg.fit.parse().map_err(|e: String| anyhow!(e))?;
    let path = match src {
        Source::Folder(p) | Source::Npy(p) => p,
    };
    if !path.exists() {
        bail!("data.dataset: {} does not exist", path.display());
    }
    let key = cache_key(src, shape, fit, cfg.test_percent)?;
    let cache = cache_root.join(format!("{key}.bin"));
    let d = match read_cache(&cache, shape) {
        Some(d) => d,
        None => {
            let d = match src {
                Source::Folder(p) => decode_folder(p, shape, fit, cfg.test_percent)?,
                Source::Npy(p) => decode_npy(p, shape, fit, cfg.test_percent)?,
            };
            write_cache(&cache, &d)?;
            eprintln!(
                "gm: {} decoded into {} ({} train / {} test images)",
                path.display(),
                cache.display(),
                d.train.len(),
                d.test.len()
            );
            d
        }
    };
    let mut ds = match split {
        Split::Train => d.train,
        Split::Test => d.test,
    };
    ds.source = format!("{} (cached in {})", ds.source, cache.display());
    if ds.is_empty() {
        bail!(
            "{}: the {} split is empty (data.test_percent = {}, or train/ and test/ subfolders)",
            path.display(),
            if split == Split::Test {
                "test"
            } else {
                "train"
            },
            cfg.test_percent
        );
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn cfg(fit: &str, test_percent: u32) -> DataConfig {
        DataConfig {
            fit: fit.into(),
            test_percent,
            ..Default::default()
        }
    }

    /// A `w × h` grey image whose pixels all hold `v`.
    fn grey(path: &Path, v: u8, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_pixel(w, h, Luma([v])).save(path).unwrap();
    }

    fn both(
        src: &Source,
        c: &DataConfig,
        shape: [usize; 3],
        cache: &Path,
    ) -> (ImageDataset, ImageDataset) {
        (
            load_cached(src, c, shape, Split::Train, cache).unwrap(),
            load_cached(src, c, shape, Split::Test, cache).unwrap(),
        )
    }

    #[test]
    fn class_folders_give_labels_and_a_split_fixed_by_name() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("imgs");
        // Pixel value 10·class + index tells each image apart.
        for (c, name, n) in [(0u8, "cats", 7u8), (1, "dogs", 9)] {
            for i in 0..n {
                grey(
                    &root.join(name).join(format!("sub/{i}.png")),
                    10 * c + i,
                    8,
                    8,
                );
            }
        }
        std::fs::write(root.join("cats/readme.txt"), "not an image").unwrap();
        let src = Source::Folder(root.clone());
        let (tr, te) = both(&src, &cfg("none", 30), [1, 8, 8], &t.path().join("cache"));
        assert_eq!(tr.len() + te.len(), 16);
        for ds in [&tr, &te] {
            for (k, &l) in ds.labels.as_ref().unwrap().iter().enumerate() {
                let v = ds.pixels[k * 64];
                assert_eq!(v / 10, l, "image {k}: value {v}, label {l}");
                assert!(ds.pixels[k * 64..(k + 1) * 64].iter().all(|&p| p == v));
            }
        }
        // The test split is exactly the files whose relative path hashes into it.
        let want_test = (0..7)
            .map(|i| format!("cats/sub/{i}.png"))
            .chain((0..9).map(|i| format!("dogs/sub/{i}.png")))
            .filter(|p| in_test(p, 30))
            .count();
        assert_eq!(te.len(), want_test);
        assert!(!te.is_empty() && !tr.is_empty());
    }

    #[test]
    fn train_and_test_subfolders_are_the_splits() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("d");
        for i in 0..3 {
            grey(&root.join(format!("train/a/{i}.png")), 1, 4, 4);
            grey(&root.join(format!("train/b/{i}.png")), 2, 4, 4);
        }
        grey(&root.join("test/a/0.png"), 1, 4, 4);
        grey(&root.join("test/b/0.png"), 2, 4, 4);
        let (tr, te) = both(
            &Source::Folder(root),
            &cfg("none", 10),
            [1, 4, 4],
            &t.path().join("c"),
        );
        assert_eq!((tr.len(), te.len()), (6, 2));
        assert_eq!(te.labels.unwrap(), [0, 1]);
    }

    #[test]
    fn colour_sizes_and_bad_files() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let root = t.path().join("rgb");
        std::fs::create_dir_all(&root).unwrap();
        for i in 0..20u8 {
            RgbImage::from_pixel(6, 6, Rgb([200, 100, i]))
                .save(root.join(format!("{i}.png")))
                .unwrap();
        }
        let src = Source::Folder(root.clone());
        // RGB planes in CHW order, unlabelled (no class folders).
        let (tr, te) = both(&src, &cfg("none", 50), [3, 6, 6], &cache);
        assert!(tr.labels.is_none());
        let all: Vec<u8> = tr.pixels.iter().chain(&te.pixels).copied().collect();
        for img in all.chunks(108) {
            assert!(img[..36].iter().all(|&p| p == 200) && img[36..72].iter().all(|&p| p == 100));
        }
        // To grey: the BT.709 luma of (200, 100, b), b < 20.
        let (g, _) = both(&src, &cfg("none", 50), [1, 6, 6], &cache);
        let luma = 0.2126 * 200.0 + 0.7152 * 100.0;
        assert!(
            g.pixels.iter().all(|&p| (p as f64 - luma).abs() <= 3.0),
            "{:?}",
            &g.pixels[..6]
        );
        // Another size: an error naming the file unless data.fit asks.
        let err = load_cached(&src, &cfg("none", 50), [3, 4, 4], Split::Train, &cache).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(".png: 6×6 pixels, but the model reads 4×4") && msg.contains("data.fit"),
            "{msg}"
        );
        let (r, _) = both(&src, &cfg("resize", 50), [3, 4, 4], &cache);
        assert_eq!(r.pixels.len(), r.len() * 48);
        // Centre crop of a 12×6 picture whose middle is bright: only the middle survives.
        let wide = t.path().join("wide");
        std::fs::create_dir_all(&wide).unwrap();
        for i in 0..4 {
            GrayImage::from_fn(12, 6, |x, _| {
                Luma([if (3..9).contains(&x) { 250 } else { 0 }])
            })
            .save(wide.join(format!("{i}.png")))
            .unwrap();
        }
        let (c, d) = both(
            &Source::Folder(wide),
            &cfg("center-crop", 50),
            [1, 6, 6],
            &cache,
        );
        assert!(c.pixels.iter().chain(&d.pixels).all(|&p| p == 250));
        // A file that is no image is named.
        std::fs::write(root.join("broken.png"), b"not a png").unwrap();
        let err = load_cached(&src, &cfg("none", 50), [3, 6, 6], Split::Train, &cache).unwrap_err();
        assert!(
            format!("{err:#}").contains("broken.png: cannot read the image"),
            "{err:#}"
        );
    }

    #[test]
    fn decoded_once_then_read_from_the_cache() {
        let t = tempfile::tempdir().unwrap();
        let (root, cache) = (t.path().join("imgs"), t.path().join("cache"));
        for i in 0..10 {
            grey(&root.join(format!("{i}.png")), 7, 5, 5);
        }
        let src = Source::Folder(root.clone());
        let c = cfg("none", 20);
        let first = load_cached(&src, &c, [1, 5, 5], Split::Train, &cache).unwrap();
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            1,
            "one cache file"
        );
        // Garble a file but keep its size and modification time: the cache still answers.
        let f = root.join("0.png");
        let (len, mtime) = {
            let m = std::fs::metadata(&f).unwrap();
            (m.len() as usize, m.modified().unwrap())
        };
        std::fs::write(&f, vec![0u8; len]).unwrap();
        let touch = |t| {
            std::fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        touch(mtime);
        let again = load_cached(&src, &c, [1, 5, 5], Split::Train, &cache).unwrap();
        assert_eq!(again.pixels, first.pixels);
        // A new modification time is a new key: the folder is decoded again, and the garbled
        // file is found.
        touch(mtime + std::time::Duration::from_secs(5));
        assert!(load_cached(&src, &c, [1, 5, 5], Split::Train, &cache).is_err());
    }

    /// A NumPy v1.0 file of `descr` values.
    fn npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
        std::fs::write(path, npy_bytes(descr, shape, data)).unwrap();
    }

    #[test]
    fn arrays_channels_first_or_last_with_labels() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let n = 40;
        // Image i, channel k, pixel p: (i + 50k + p) mod 256.
        let chw: Vec<u8> = (0..n)
            .flat_map(|i| {
                (0..3).flat_map(move |k| (0..4).map(move |p| ((i + 50 * k + p) % 256) as u8))
            })
            .collect();
        let mut hwc = vec![0u8; chw.len()];
        for i in 0..n {
            for k in 0..3 {
                for p in 0..4 {
                    hwc[i * 12 + p * 3 + k] = chw[i * 12 + k * 4 + p];
                }
            }
        }
        let labels: Vec<u8> = (0..n).map(|i| (i % 5) as u8).collect();
        let (a, b) = (t.path().join("a.npy"), t.path().join("b.npy"));
        npy(&a, "|u1", &[n, 3, 2, 2], &chw);
        npy(&b, "|u1", &[n, 2, 2, 3], &hwc);
        let lab: Vec<u8> = labels
            .iter()
            .flat_map(|&l| (l as i64).to_le_bytes())
            .collect();
        npy(&t.path().join("a_labels.npy"), "<i8", &[n], &lab);
        let c = cfg("none", 25);
        let (tra, tea) = both(&Source::Npy(a.clone()), &c, [3, 2, 2], &cache);
        let (trb, teb) = both(&Source::Npy(b), &c, [3, 2, 2], &cache);
        assert_eq!(
            tra.pixels, trb.pixels,
            "channels last read as channels first"
        );
        assert_eq!(tea.pixels, teb.pixels);
        assert_eq!(tra.len() + tea.len(), n);
        // Labels follow their images.
        let la = tra.labels.as_ref().unwrap();
        for (k, img) in tra.pixels.chunks(12).enumerate() {
            let i = (0..n).find(|&i| chw[i * 12..(i + 1) * 12] == *img).unwrap();
            assert_eq!(la[k], labels[i]);
        }
        assert!(trb.labels.is_none());
        // A float array, and labels that do not match, are named.
        let f = t.path().join("f.npy");
        npy(&f, "<f4", &[2, 2, 2], &[0u8; 32]);
        let err = load_cached(&Source::Npy(f), &c, [1, 2, 2], Split::Train, &cache).unwrap_err();
        assert!(format!("{err:#}").contains("dtype '<f4'"), "{err:#}");
        npy(&t.path().join("a_labels.npy"), "|u1", &[3], &[0, 1, 2]);
        let err = load_cached(&Source::Npy(a), &c, [3, 2, 2], Split::Train, &cache).unwrap_err();
        assert!(
            format!("{err:#}").contains("3 labels for 40 images"),
            "{err:#}"
        );
    }
}

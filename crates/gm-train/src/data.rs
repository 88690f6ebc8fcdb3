//! Image data: an IDX reader (raw or gzip), in-memory data sets, pre-processing (binarisation,
//! dequantisation), deterministic batching, and 2-D toy densities.

use crate::config::{Binarize, DataConfig, RunConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gm_core::GmRng;
use gm_models::Batch;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors of the IDX reader; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an IDX file (magic {magic:#010x}; expected 0x00000801 for labels or 0x00000803 for images)")]
    BadMagic { path: PathBuf, magic: u32 },
    #[error("{path}: IDX element type {0:#04x} unsupported (only unsigned bytes, 0x08)", .code)]
    BadType { path: PathBuf, code: u8 },
    #[error("{path}: expected a {want}-dimensional IDX array, found {got} dimensions")]
    BadRank {
        path: PathBuf,
        want: usize,
        got: usize,
    },
    #[error("{path}: truncated: header promises {want} bytes of data, file has {got}")]
    Truncated {
        path: PathBuf,
        want: usize,
        got: usize,
    },
    #[error("{path}: {extra} bytes after the data the header describes (its magic gives rank {rank}, dimensions {dims:?}: {want} bytes; is the rank byte — the 4th of the magic — right?)")]
    Trailing {
        path: PathBuf,
        extra: usize,
        rank: usize,
        dims: Vec<usize>,
        want: usize,
    },
}

/// A decoded IDX array of bytes.
#[derive(Clone, Debug)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes, gzip-compressed or not (detected from the content).
pub fn read_idx(path: &Path) -> Result<IdxArray, IdxError> {
    let io = |source| IdxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        out
    } else {
        raw
    };
    parse_idx(&bytes, path)
}

/// Parses IDX bytes; `path` is only used in error messages.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray, IdxError> {
    let p = || path.to_path_buf();
    if bytes.len() < 4 {
        return Err(IdxError::Truncated {
            path: p(),
            want: 4,
            got: bytes.len(),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 || bytes[3] == 0 || bytes[3] > 4 {
        return Err(IdxError::BadMagic { path: p(), magic });
    }
    if bytes[2] != 0x08 {
        return Err(IdxError::BadType {
            path: p(),
            code: bytes[2],
        });
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(IdxError::Truncated {
            path: p(),
            want: header,
            got: bytes.len(),
        });
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    let have = bytes.len() - header;
    if have < n {
        return Err(IdxError::Truncated {
            path: p(),
            want: n,
            got: have,
        });
    }
    if have > n {
        return Err(IdxError::Trailing {
            path: p(),
            extra: have - n,
            rank,
            dims,
            want: n,
        });
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Labelled 8-bit images held in memory as bytes, `(N, C, H, W)` — or, for the 2-D toy
/// densities, real-valued points in `values` (`shape = [2, 1, 1]`, no pixel pre-processing).
#[derive(Clone, Debug)]
pub struct ImageDataset {
    pub pixels: Vec<u8>,
    /// Real-valued data (toy densities); when set, `pixels` is empty.
    pub values: Option<Vec<f32>>,
    pub labels: Option<Vec<u8>>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
    /// Where it came from, for logs and checkpoints.
    pub source: String,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        match &self.values {
            Some(v) => v.len() / self.image_len().max(1),
            None => self.pixels.len() / self.image_len().max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Keeps the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len() {
            let d = self.image_len();
            self.pixels.truncate(n * d);
            if let Some(v) = &mut self.values {
                v.truncate(n * d);
            }
            if let Some(l) = &mut self.labels {
                l.truncate(n);
            }
        }
    }

    /// Raw grey levels of the given images as `(B, C, H, W)` f32 in `[0, 255]` (on the CPU), or
    /// the real values of a toy data set.
    pub fn gather(&self, idx: &[usize]) -> Result<(Tensor, Option<Tensor>)> {
        let d = self.image_len();
        let mut v = Vec::with_capacity(idx.len() * d);
        for &i in idx {
            match &self.values {
                Some(vals) => v.extend_from_slice(&vals[i * d..(i + 1) * d]),
                None => v.extend(self.pixels[i * d..(i + 1) * d].iter().map(|&p| p as f32)),
            }
        }
        let [c, h, w] = self.shape;
        let x = Tensor::from_vec(v, (idx.len(), c, h, w), &Device::Cpu)?;
        let y = match &self.labels {
            Some(l) => Some(Tensor::from_vec(
                idx.iter().map(|&i| l[i] as u32).collect::<Vec<_>>(),
                idx.len(),
                &Device::Cpu,
            )?),
            None => None,
        };
        Ok((x, y))
    }
}

/// Loads an image/label IDX pair and checks they agree.
pub fn load_idx_pair(images: &Path, labels: Option<&Path>, source: &str) -> Result<ImageDataset> {
    let im = read_idx(images)?;
    let shape = match im.dims.as_slice() {
        [_, h, w] => [1, *h, *w],
        [_, c, h, w] => [*c, *h, *w],
        _ => bail!(IdxError::BadRank {
            path: images.to_path_buf(),
            want: 3,
            got: im.dims.len()
        }),
    };
    let n = im.dims[0];
    let labels = match labels {
        Some(lp) => {
            let l = read_idx(lp)?;
            if l.dims.len() != 1 {
                bail!(IdxError::BadRank {
                    path: lp.to_path_buf(),
                    want: 1,
                    got: l.dims.len()
                });
            }
            if l.dims[0] != n {
                bail!(
                    "{} has {} labels but {} has {} images",
                    lp.display(),
                    l.dims[0],
                    images.display(),
                    n
                );
            }
            Some(l.data)
        }
        None => None,
    };
    Ok(ImageDataset {
        pixels: im.data,
        values: None,
        labels,
        shape,
        source: source.to_string(),
    })
}

/// `train` or `test`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            o => Err(format!("unknown split '{o}' (expected train or test)")),
        }
    }
}

fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Loads one split from a folder in the MNIST IDX layout (`train-images-idx3-ubyte[.gz]`,
/// `train-labels-idx1-ubyte[.gz]`, `t10k-…`). Fashion-MNIST folders work the same.
pub fn load_split(dir: &Path, split: Split) -> Result<ImageDataset> {
    if !dir.is_dir() {
        bail!("data directory {} does not exist", dir.display());
    }
    let stem = format!("{}-images-idx3-ubyte", split.prefix());
    let images = find_file(dir, &stem).with_context(|| {
        format!(
            "{}: no {stem} or {stem}.gz (expected an MNIST-style IDX folder)",
            dir.display()
        )
    })?;
    let labels = find_file(dir, &format!("{}-labels-idx1-ubyte", split.prefix()));
    load_idx_pair(&images, labels.as_deref(), &dir.display().to_string())
}

/// Turns raw grey levels `(B, C, H, W)` in `[0, 255]` into model input per the data config.
///
/// `image_ids` are the data-set indices of the images (used by static binarisation, whose draw
/// depends only on the image and `data.static_seed`).
pub fn preprocess(
    raw: &Tensor,
    image_ids: &[usize],
    cfg: &DataConfig,
    rng: &mut GmRng,
) -> Result<Tensor> {
    let x01 = (raw / 255.0)?;
    Ok(match cfg.binarize {
        Binarize::None if cfg.dequantize => {
            let u = rng.host_uniform(raw.shape(), 0.0, 1.0)?;
            ((raw + u)? / 256.0)?
        }
        Binarize::None => x01,
        Binarize::Dynamic => rng.host_bernoulli(&x01)?,
        Binarize::Static => {
            let per = raw.elem_count() / raw.dim(0)?.max(1);
            let mut rows = Vec::with_capacity(image_ids.len());
            for (row, &id) in image_ids.iter().enumerate() {
                let mut r = GmRng::new(cfg.static_seed).derive(id as u64);
                rows.push(r.host_bernoulli(&x01.get(row)?.reshape(per)?)?);
            }
            Tensor::stack(&rows, 0)?.reshape(raw.shape())?
        }
    })
}

/// Deterministic batching: the order of epoch `e` is a permutation drawn from the run seed and
/// `e` alone, so the batch at any step is a pure function of `(seed, step)` — what makes resumed
/// runs identical to uninterrupted ones.
#[derive(Clone, Debug)]
pub struct Batcher {
    seed_rng: GmRng,
    n: usize,
    batch_size: usize,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Batcher {
    pub fn new(seed: u64, n: usize, batch_size: usize) -> Result<Self> {
        if n < batch_size {
            bail!("the training set has {n} examples (images, or token windows of a text), fewer than train.batch_size = {batch_size}");
        }
        Ok(Self {
            seed_rng: GmRng::new(seed ^ 0x5eed_da7a),
            n,
            batch_size,
            epoch: None,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.n / self.batch_size
    }

    /// Indices of the images in the batch of `step` (full batches only; the tail is dropped).
    pub fn indices(&mut self, step: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let (e, i) = (step / spe, step % spe);
        if self.epoch.as_ref().map(|(k, _)| *k) != Some(e) {
            self.epoch = Some((e, self.seed_rng.derive(e as u64).permutation(self.n)));
        }
        let perm = &self.epoch.as_ref().expect("set above").1;
        perm[i * self.batch_size..(i + 1) * self.batch_size].to_vec()
    }
}

/// Builds a model batch from data-set indices.
pub fn make_batch(
    ds: &ImageDataset,
    idx: &[usize],
    cfg: &DataConfig,
    rng: &mut GmRng,
    device: &Device,
) -> Result<Batch> {
    let (raw, y) = ds.gather(idx)?;
    let x = match ds.values {
        Some(_) => raw,
        None => preprocess(&raw, idx, cfg, rng)?,
    }
    .to_device(device)?;
    gm_core::traffic::record_upload(gm_core::traffic::bytes_of(&x));
    if let Some(y) = &y {
        gm_core::traffic::record_upload(gm_core::traffic::bytes_of(y));
    }
    Ok(Batch {
        x,
        labels: y.map(|t| t.to_device(device)).transpose()?,
    })
}

pub use crate::config::{toy_name, Toy2d};

/// `n` points of a toy density as a data set of `[2, 1, 1]` "images"; the split picks the
/// stream, so train and test are independent draws of the same seed.
pub fn toy_dataset(name: &str, n: usize, seed: u64, split: Split) -> Result<ImageDataset> {
    let toy: Toy2d = name.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let mut rng = GmRng::new(seed).derive(match split {
        Split::Train => 1,
        Split::Test => 2,
    });
    let x = toy.sample(n, &mut rng, &Device::Cpu)?;
    Ok(ImageDataset {
        pixels: Vec::new(),
        values: Some(x.flatten_all()?.to_vec1::<f32>()?),
        labels: None,
        shape: [2, 1, 1],
        source: format!("toy density {name} ({} points)", n),
    })
}

impl Toy2d {
    /// `n` samples as an `(n, 2)` f32 tensor, scaled to roughly `[-4, 4]²` as in FFJORD.
    pub fn sample(self, n: usize, rng: &mut GmRng, device: &Device) -> Result<Tensor> {
        let mut v = Vec::with_capacity(2 * n);
        let noise = |rng: &mut GmRng, s: f64| rng.normal_vec_f64(1)[0] * s;
        for _ in 0..n {
            let (x, y) = match self {
                Toy2d::TwoMoons => {
                    let t = std::f64::consts::PI * rng.uniform_f64();
                    let (x, y) = if rng.uniform_f64() < 0.5 {
                        (t.cos(), t.sin())
                    } else {
                        (1.0 - t.cos(), 0.5 - t.sin())
                    };
                    (
                        (x - 0.5) * 2.0 + noise(rng, 0.1),
                        (y - 0.25) * 2.0 + noise(rng, 0.1),
                    )
                }
                Toy2d::EightGaussians => {
                    let k = (rng.uniform_f64() * 8.0).floor();
                    let a = k * std::f64::consts::PI / 4.0;
                    (
                        2.0 * a.cos() * 1.414 + noise(rng, 0.5) * 0.5,
                        2.0 * a.sin() * 1.414 + noise(rng, 0.5) * 0.5,
                    )
                }
                Toy2d::Checkerboard => {
                    let x1 = rng.uniform_f64() * 4.0 - 2.0;
                    let x2 = rng.uniform_f64() - (rng.uniform_f64() * 2.0).floor() * 2.0;
                    let x2 = x2 + (x1.floor() % 2.0).abs();
                    (x1 * 2.0, x2 * 2.0)
                }
                Toy2d::Spirals => {
                    let t = rng.uniform_f64().sqrt() * 540.0 * (2.0 * std::f64::consts::PI) / 360.0;
                    let (sx, sy) = (-t.cos() * t, t.sin() * t);
                    let s = if rng.uniform_f64() < 0.5 { 1.0 } else { -1.0 };
                    (
                        s * sx / 3.0 + noise(rng, 0.1),
                        s * sy / 3.0 + noise(rng, 0.1),
                    )
                }
            };
            v.push(x as f32);
            v.push(y as f32);
        }
        Ok(Tensor::from_vec(v, (n, 2), device)?.to_dtype(DType::F32)?)
    }
}

/// Where the data is: an explicit folder, `data.dir`, or the named data set fetched into the cache.
pub fn resolve_data(cfg: &RunConfig, data_dir: Option<&Path>) -> Result<(PathBuf, String)> {
    if let Some(d) = data_dir {
        return Ok((d.to_path_buf(), format!("IDX folder {}", d.display())));
    }
    if let Some(d) = &cfg.data.dir {
        return Ok((PathBuf::from(d), format!("IDX folder {d}")));
    }
    crate::fetch::ensure_dataset(&cfg.data.dataset)
}

/// Points drawn for the train and test splits of a toy density (`data.max_train` caps the first).
pub const TOY_POINTS: [usize; 2] = [50_000, 10_000];

/// One split of the run's data: a toy density (`data.dataset = "toy:NAME"`, drawn from
/// `train.seed`) or an IDX folder (`--data-dir`, `data.dir`, or the named data set fetched into
/// the cache). Returns the data set and a description of its source.
pub fn load_data(
    cfg: &RunConfig,
    data_dir: Option<&Path>,
    split: Split,
) -> Result<(ImageDataset, String)> {
    if let Some(name) = crate::data::toy_name(&cfg.data.dataset) {
        let n = match split {
            Split::Train => TOY_POINTS[0],
            Split::Test => TOY_POINTS[1],
        };
        let ds = crate::data::toy_dataset(name, n, cfg.train.seed, split)?;
        let src = ds.source.clone();
        return Ok((ds, src));
    }
    if let Some(src) = crate::userdata::source(&cfg.data.dataset, data_dir) {
        let shape = cfg.model.image_shape().ok_or_else(|| {
            anyhow::anyhow!(
                "data.dataset = \"{}\" holds images; this model reads text",
                cfg.data.dataset
            )
        })?;
        let ds = crate::userdata::load(&src, &cfg.data, shape, split)?;
        let source = ds.source.clone();
        return Ok((ds, source));
    }
    let (dir, source) = resolve_data(cfg, data_dir)?;
    Ok((load_split(&dir, split)?, source))
}

/// Checks a split against the model before any step: image size, and labels within
/// `num_classes` for class-conditional models. Errors name the data and the key.
pub fn check_split(ds: &ImageDataset, cfg: &RunConfig, split: &str) -> Result<()> {
    let Some(shape) = cfg.model.image_shape() else {
        bail!(
            "a '{}' model reads text, not the images of {}",
            cfg.model.kind(),
            ds.source
        );
    };
    if ds.values.is_none() && ds.shape != shape {
        let [c, h, w] = ds.shape;
        bail!(
            "{}: the {split} images are {c}×{h}×{w} (C×H×W), the model's model.image_shape is {shape:?}",
            ds.source,
        );
    }
    let k = cfg.model.num_classes();
    if let (Some(labels), true) = (&ds.labels, k > 0) {
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            bail!(
                "{}: {split} image {i} has label {l}, outside model.num_classes = {k}",
                ds.source
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8], magic_type: u8) -> Vec<u8> {
        let mut b = vec![0, 0, magic_type, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn idx_round_trip_and_errors_name_the_problem() {
        let p = Path::new("x-images");
        let ok = parse_idx(&idx_bytes(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8], 8), p).unwrap();
        assert_eq!(ok.dims, vec![2, 2, 2]);
        assert_eq!(ok.data[7], 8);
        let e = parse_idx(b"PK\x03\x04....", p).unwrap_err().to_string();
        assert!(
            e.contains("x-images") && e.contains("not an IDX file"),
            "{e}"
        );
        let e = parse_idx(&idx_bytes(&[2, 2, 2], &[1, 2, 3], 8), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") && e.contains("8 bytes"), "{e}");
        let e = parse_idx(&idx_bytes(&[2], &[1, 2], 0x0d), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported"), "{e}");
        let e = parse_idx(&idx_bytes(&[1], &[1, 2], 8), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("after the data"), "{e}");
        let e = parse_idx(&[0, 0, 8, 3, 0], p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn files_gzip_count_mismatch_and_rank() {
        let dir = tempfile::tempdir().unwrap();
        let im = dir.path().join("train-images-idx3-ubyte.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx_bytes(&[3, 2, 2], &[7; 12], 8)).unwrap();
        std::fs::write(&im, gz.finish().unwrap()).unwrap();
        let lab = dir.path().join("train-labels-idx1-ubyte");
        std::fs::write(&lab, idx_bytes(&[2], &[1, 2], 8)).unwrap();
        let e = load_split(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 labels") && e.contains("3 images"), "{e}");
        std::fs::write(&lab, idx_bytes(&[3], &[1, 2, 3], 8)).unwrap();
        let ds = load_split(dir.path(), Split::Train).unwrap();
        assert_eq!((ds.len(), ds.shape), (3, [1, 2, 2]));
        std::fs::write(&lab, idx_bytes(&[3, 1], &[1, 2, 3], 8)).unwrap();
        let e = load_split(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1-dimensional") && e.contains("labels"), "{e}");
        let e = load_split(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("t10k-images-idx3-ubyte"), "{e}");
        let e = load_split(&dir.path().join("nope"), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn batcher_is_a_function_of_the_step() {
        let mut a = Batcher::new(5, 103, 10).unwrap();
        let mut b = Batcher::new(5, 103, 10).unwrap();
        let first: Vec<_> = (0..25).map(|s| a.indices(s)).collect();
        assert_eq!(b.indices(17), first[17]);
        assert_eq!(b.indices(3), first[3]);
        // Each epoch visits 100 distinct images; epochs differ in order.
        let mut e0: Vec<usize> = first[..10].concat();
        e0.sort();
        e0.dedup();
        assert_eq!(e0.len(), 100);
        assert_ne!(first[0], first[10]);
        assert!(Batcher::new(0, 5, 10).is_err());
    }

    #[test]
    fn preprocessing_modes() {
        let raw =
            Tensor::from_vec(vec![0f32, 255.0, 128.0, 64.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let mut rng = GmRng::new(0);
        let mut cfg = DataConfig {
            binarize: Binarize::Dynamic,
            ..Default::default()
        };
        let b = preprocess(&raw, &[0], &cfg, &mut rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!((b[0], b[1]), (0.0, 1.0));
        assert!(b.iter().all(|v| *v == 0.0 || *v == 1.0));
        cfg.binarize = Binarize::Static;
        let s1 = preprocess(&raw, &[7], &cfg, &mut rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let s2 = preprocess(&raw, &[7], &cfg, &mut GmRng::new(99))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(s1, s2, "static binarisation must not depend on the run rng");
        cfg.binarize = Binarize::None;
        cfg.dequantize = true;
        let d = preprocess(&raw, &[0], &cfg, &mut rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(d[0] >= 0.0 && d[0] < 1.0 / 256.0 && d[1] >= 255.0 / 256.0 && d[1] < 1.0);
    }

    #[test]
    fn toy_densities_have_their_shape() {
        let mut rng = GmRng::new(0);
        for t in ["two-moons", "8gaussians", "checkerboard", "spirals"] {
            let toy: Toy2d = t.parse().unwrap();
            let x = toy.sample(2000, &mut rng, &Device::Cpu).unwrap();
            let v = x.to_vec2::<f32>().unwrap();
            assert!(
                v.iter().all(|p| p[0].abs() < 6.0 && p[1].abs() < 6.0),
                "{t}"
            );
            let mx = v.iter().map(|p| p[0] as f64).sum::<f64>() / 2000.0;
            assert!(mx.abs() < 0.3, "{t}: mean x {mx}");
        }
        // The 8 Gaussians put mass near radius 2·1.414 and none near the origin.
        let x = Toy2d::EightGaussians
            .sample(1000, &mut rng, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(x.iter().all(|p| (p[0] * p[0] + p[1] * p[1]).sqrt() > 1.0));
    }
}

//! Evaluation over a split, and sample quality through gm's MNIST classifier (`fid_mnist`).

use crate::config::DataConfig;
use crate::data::{make_batch, ImageDataset};
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use gm_core::GmRng;
use gm_models::{EvalOptions, Model};
use nalgebra::{DMatrix, DVector};
use std::collections::BTreeMap;

/// Averages a model's per-image metrics over (the first `max_images` of) a data set.
/// Pre-processing randomness (dynamic binarisation, dequantisation) and estimator noise come from
/// a generator seeded with `seed`, so repeated evaluations see the same test bits.
/// Adds `n_images` and, for density models, `bits_per_dim`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Model,
    ds: &ImageDataset,
    data_cfg: &DataConfig,
    opts: &EvalOptions,
    batch_size: usize,
    max_images: usize,
    seed: u64,
    device: &Device,
) -> Result<BTreeMap<String, f64>> {
    let n = if max_images == 0 {
        ds.len()
    } else {
        max_images.min(ds.len())
    };
    if n == 0 {
        return Err(anyhow!("evaluation data set {} is empty", ds.source));
    }
    let mut rng = GmRng::new(seed);
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut start = 0;
    while start < n {
        let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let batch = make_batch(ds, &idx, data_cfg, &mut rng, device)?;
        for (name, t) in model.eval_metrics(&batch, &mut rng, opts)? {
            let t = t.to_dtype(DType::F64)?;
            if name == "nll_mc_se_nats" {
                // Independent per-image estimates: the variance of their mean adds up.
                *sums.entry("nll_mc_var_sum".into()).or_default() +=
                    t.sqr()?.sum_all()?.to_scalar::<f64>()?;
            }
            *sums.entry(name).or_default() += t.sum_all()?.to_scalar::<f64>()?;
        }
        start += idx.len();
    }
    let var_sum = sums.remove("nll_mc_var_sum");
    let mut out: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect();
    if let Some(v) = var_sum {
        // The Monte-Carlo standard error of the mean likelihood, in bits per dimension.
        out.insert(
            "bits_per_dim_mc_se".into(),
            gm_core::bits_per_dim(v.sqrt() / n as f64, ds.image_len()),
        );
    }
    if let Some(m) = model.likelihood_metric() {
        if let Some(nll) = out.get(m).copied() {
            out.insert(
                "bits_per_dim".into(),
                gm_core::bits_per_dim(nll, ds.image_len()),
            );
        }
    }
    out.insert("n_images".into(), n as f64);
    Ok(out)
}

/// The options of a full evaluation (every estimator) under the run's eval settings, with the
/// IWAE `k` given or the config's (checked against its bound).
pub fn full_options(cfg: &crate::RunConfig, iwae_k: Option<usize>) -> Result<EvalOptions> {
    let opts = EvalOptions {
        iwae_k: iwae_k.unwrap_or(cfg.eval.iwae_k),
        max_pairs: cfg.eval.max_pairs,
        full: true,
    };
    crate::config::check_iwae_k(opts.iwae_k)?;
    Ok(opts)
}

/// [`evaluate`] as `gm eval` runs it: every estimator (`full`), the run's eval settings (its
/// batch size, seed and IWAE `k` unless `iwae_k` is given), the first `max_images` of `ds`.
pub fn evaluate_full(
    model: &dyn Model,
    cfg: &crate::RunConfig,
    ds: &ImageDataset,
    iwae_k: Option<usize>,
    max_images: usize,
    device: &Device,
) -> Result<BTreeMap<String, f64>> {
    let opts = full_options(cfg, iwae_k)?;
    evaluate(
        model,
        ds,
        &cfg.data,
        &opts,
        cfg.eval.batch_size,
        max_images,
        cfg.eval.seed,
        device,
    )
}

/// Mean and (unbiased) covariance of feature rows.
pub fn feature_stats(f: &DMatrix<f64>) -> (DVector<f64>, DMatrix<f64>) {
    let n = f.nrows() as f64;
    let mu = f.row_mean().transpose();
    let mut c = f.clone();
    for mut row in c.row_iter_mut() {
        row -= mu.transpose();
    }
    let cov = c.transpose() * &c / (n - 1.0).max(1.0);
    (mu, cov)
}

fn sym_sqrt(m: &DMatrix<f64>) -> DMatrix<f64> {
    let e = m.clone().symmetric_eigen();
    let d = DMatrix::from_diagonal(&e.eigenvalues.map(|v| v.max(0.0).sqrt()));
    &e.eigenvectors * d * e.eigenvectors.transpose()
}

/// The Fréchet distance between `N(mu1, s1)` and `N(mu2, s2)`:
/// `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½})`.
pub fn frechet_distance(
    mu1: &DVector<f64>,
    s1: &DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> f64 {
    let r1 = sym_sqrt(s1);
    let inner = &r1 * s2 * &r1;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_sqrt: f64 = inner
        .symmetric_eigen()
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    (mu1 - mu2).norm_squared() + s1.trace() + s2.trace() - 2.0 * tr_sqrt
}

/// Bootstrap resamples behind `fid_mnist_se`.
pub const FID_BOOTSTRAP: usize = 50;

/// The standard deviation of the Fréchet distance over `b` bootstrap resamples (rows drawn with
/// replacement from each feature set; seeded, so a report is reproducible).
pub fn bootstrap_se(fs: &DMatrix<f64>, fr: &DMatrix<f64>, b: usize) -> f64 {
    let mut rng = GmRng::new(0x5eed);
    let mut resample = |f: &DMatrix<f64>| {
        let n = f.nrows();
        let idx: Vec<usize> = (0..n)
            .map(|_| (rng.next_u64() % n as u64) as usize)
            .collect();
        DMatrix::from_fn(n, f.ncols(), |i, j| f[(idx[i], j)])
    };
    let d: Vec<f64> = (0..b)
        .map(|_| {
            let (m1, s1) = feature_stats(&resample(fs));
            let (m2, s2) = feature_stats(&resample(fr));
            frechet_distance(&m1, &s1, &m2, &s2)
        })
        .collect();
    let mean = d.iter().sum::<f64>() / b as f64;
    (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (b as f64 - 1.0).max(1.0)).sqrt()
}

/// Blocks of the delete-a-block jackknife behind `kid_se`.
pub const KID_JACKKNIFE_BLOCKS: usize = 10;

/// Kernel inception-style distance (Bińkowski et al., 2018) between two feature sets: the
/// unbiased estimate of MMD² with the cubic polynomial kernel `k(x, y) = (x·y / d + 1)³`, and
/// its standard error by the delete-a-block jackknife over [`KID_JACKKNIFE_BLOCKS`] blocks (each
/// set cut into that many contiguous blocks; block `b` of both left out in turn). Unbiased: its
/// expectation is 0 when both sets come from one distribution, so small sets do not inflate it
/// the way they inflate the Fréchet distance.
pub fn kid(fs: &DMatrix<f64>, fr: &DMatrix<f64>) -> (f64, f64) {
    let d = fs.ncols() as f64;
    let kern =
        |a: &DMatrix<f64>, b: &DMatrix<f64>| (a * b.transpose()).map(|v| (v / d + 1.0).powi(3));
    let (kss, krr, ksr) = (kern(fs, fs), kern(fr, fr), kern(fs, fr));
    let (m, n) = (fs.nrows(), fr.nrows());
    let nb = KID_JACKKNIFE_BLOCKS.min(m).min(n);
    let block = |i: usize, len: usize| i * nb / len;
    // Block sums: within a set without the diagonal, and across the sets.
    let sums = |k: &DMatrix<f64>, same: bool, rows: usize, cols: usize| {
        let mut s = vec![vec![0.0; nb]; nb];
        for i in 0..rows {
            for j in 0..cols {
                if !(same && i == j) {
                    s[block(i, rows)][block(j, cols)] += k[(i, j)];
                }
            }
        }
        s
    };
    let (sss, srr, ssr) = (
        sums(&kss, true, m, m),
        sums(&krr, true, n, n),
        sums(&ksr, false, m, n),
    );
    let sizes = |len: usize| {
        let mut c = vec![0usize; nb];
        for i in 0..len {
            c[block(i, len)] += 1;
        }
        c
    };
    let (cm, cn) = (sizes(m), sizes(n));
    // The U-statistic with block `skip` of both sets left out (none: `skip = nb`).
    let mmd = |skip: usize| {
        let total = |s: &Vec<Vec<f64>>| -> f64 {
            (0..nb)
                .filter(|&a| a != skip)
                .map(|a| (0..nb).filter(|&b| b != skip).map(|b| s[a][b]).sum::<f64>())
                .sum()
        };
        let mm = (m - if skip < nb { cm[skip] } else { 0 }) as f64;
        let nn = (n - if skip < nb { cn[skip] } else { 0 }) as f64;
        total(&sss) / (mm * (mm - 1.0)) + total(&srr) / (nn * (nn - 1.0))
            - 2.0 * total(&ssr) / (mm * nn)
    };
    let full = mmd(nb);
    if nb < 2 {
        return (full, f64::NAN);
    }
    let loo: Vec<f64> = (0..nb).map(mmd).collect();
    let mean = loo.iter().sum::<f64>() / nb as f64;
    let var = (nb as f64 - 1.0) / nb as f64 * loo.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
    (full, var.sqrt())
}

/// Squared Euclidean distances between the rows of `a` and of `b`.
fn sq_dists(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let na: Vec<f64> = a.row_iter().map(|r| r.norm_squared()).collect();
    let nb: Vec<f64> = b.row_iter().map(|r| r.norm_squared()).collect();
    let mut g = a * b.transpose();
    for i in 0..g.nrows() {
        for j in 0..g.ncols() {
            g[(i, j)] = (na[i] + nb[j] - 2.0 * g[(i, j)]).max(0.0);
        }
    }
    g
}

/// The distance from each row of `f` to its `k`-th nearest other row (squared).
fn knn_radius(f: &DMatrix<f64>, k: usize) -> Vec<f64> {
    let d = sq_dists(f, f);
    (0..f.nrows())
        .map(|i| {
            let mut row: Vec<f64> = (0..f.nrows())
                .filter(|&j| j != i)
                .map(|j| d[(i, j)])
                .collect();
            let k = k.min(row.len()).max(1) - 1;
            *row.select_nth_unstable_by(k, |a, b| a.total_cmp(b)).1
        })
        .collect()
}

/// Nearest neighbours behind precision, recall, density and coverage (Naeem et al.'s default).
pub const PRDC_K: usize = 5;

/// Precision and recall (Kynkäänniemi et al., 2019) and density and coverage (Naeem et al.,
/// 2020) of generated features `fs` against real ones `fr`, with `k`-nearest-neighbour balls:
/// precision = the share of samples inside some real point's ball (fidelity), recall = the share
/// of real points inside some sample's ball (diversity), density = the mean number of real balls
/// a sample falls in, over `k`, coverage = the share of real balls that hold a sample.
pub fn prdc(fs: &DMatrix<f64>, fr: &DMatrix<f64>, k: usize) -> (f64, f64, f64, f64) {
    let (rr, rs) = (knn_radius(fr, k), knn_radius(fs, k));
    let d = sq_dists(fr, fs);
    let (m, n) = (fr.nrows(), fs.nrows());
    let inside = |i: usize, j: usize| d[(i, j)] < rr[i];
    let precision = (0..n).filter(|&j| (0..m).any(|i| inside(i, j))).count() as f64 / n as f64;
    let recall = (0..m)
        .filter(|&i| (0..n).any(|j| d[(i, j)] < rs[j]))
        .count() as f64
        / m as f64;
    let density = (0..n)
        .map(|j| (0..m).filter(|&i| inside(i, j)).count())
        .sum::<usize>() as f64
        / (k as f64 * n as f64);
    let coverage = (0..m)
        .filter(|&i| (0..n).map(|j| d[(i, j)]).fold(f64::INFINITY, f64::min) < rr[i])
        .count() as f64
        / m as f64;
    (precision, recall, density, coverage)
}

/// Sample-quality report of generated images, through gm's classifier.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SampleQuality {
    /// Fréchet distance in the classifier's penultimate feature space (not Inception-FID).
    pub fid_mnist: f64,
    /// Its bootstrap standard error: both image sets resampled with replacement
    /// ([`FID_BOOTSTRAP`] times, seeded).
    pub fid_mnist_se: f64,
    /// Fraction of samples the classifier assigns to each class.
    pub class_histogram: Vec<f64>,
    /// KL(class histogram ‖ uniform), nats: 0 when every class is equally present.
    pub class_kl_uniform_nats: f64,
    /// Number of classes with at least 5% of the samples.
    pub classes_ge_5pct: usize,
    /// Mean max-softmax probability of the classifier on the samples.
    pub classifier_confidence: f64,
    /// Kernel distance in the same features ([`kid`]): unbiased, so comparable across sample
    /// counts, with its jackknife standard error.
    pub kid_mnist: f64,
    pub kid_mnist_se: f64,
    /// Precision, recall, density and coverage in the same features ([`prdc`], `prdc_k`
    /// neighbours).
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    pub prdc_k: usize,
}

fn features_and_probs(
    classifier: &dyn Model,
    x: &Tensor,
    batch: usize,
) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    let n = x.dim(0)?;
    let (mut feats, mut probs) = (Vec::new(), Vec::new());
    let mut dims = (0, 0);
    for s in (0..n).step_by(batch) {
        let xb = x.narrow(0, s, batch.min(n - s))?;
        let f = classifier
            .features(&xb)?
            .ok_or_else(|| anyhow!("model gives no features"))?;
        let l = classifier
            .class_logits(&xb)?
            .ok_or_else(|| anyhow!("model gives no class logits"))?;
        let p = candle_nn::ops::softmax(&l, 1)?;
        dims = (f.dim(1)?, p.dim(1)?);
        feats.extend(f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        probs.extend(p.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
    }
    Ok((
        DMatrix::from_row_slice(n, dims.0, &feats),
        DMatrix::from_row_slice(n, dims.1, &probs),
    ))
}

/// Compares generated images with real ones through the classifier. Both `(N, C, H, W)` in `[0, 1]`.
pub fn sample_quality(
    classifier: &dyn Model,
    samples: &Tensor,
    real: &Tensor,
) -> Result<SampleQuality> {
    let (fs, ps) = features_and_probs(classifier, samples, 250)?;
    let (fr, _) = features_and_probs(classifier, real, 250)?;
    let (m1, s1) = feature_stats(&fs);
    let (m2, s2) = feature_stats(&fr);
    let k = ps.ncols();
    let mut hist = vec![0.0; k];
    let mut conf = 0.0;
    for row in ps.row_iter() {
        let (arg, max) =
            row.iter()
                .enumerate()
                .fold((0, f64::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        hist[arg] += 1.0;
        conf += max;
    }
    let n = ps.nrows() as f64;
    for h in &mut hist {
        *h /= n;
    }
    let kl = hist
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p * (p * k as f64).ln())
        .sum();
    let (kid_mnist, kid_mnist_se) = kid(&fs, &fr);
    let (precision, recall, density, coverage) = prdc(&fs, &fr, PRDC_K);
    Ok(SampleQuality {
        kid_mnist,
        kid_mnist_se,
        precision,
        recall,
        density,
        coverage,
        prdc_k: PRDC_K,
        fid_mnist: frechet_distance(&m1, &s1, &m2, &s2),
        fid_mnist_se: bootstrap_se(&fs, &fr, FID_BOOTSTRAP),
        classes_ge_5pct: hist.iter().filter(|&&p| p >= 0.05).count(),
        class_histogram: hist,
        class_kl_uniform_nats: kl,
        classifier_confidence: conf / n,
    })
}

/// How a model's likelihood metric stands to `−log p(x)` ([`Model::likelihood_estimate`]), with
/// the IWAE's `k` filled in.
pub fn likelihood_estimate_label(model: &dyn Model, iwae_k: usize) -> String {
    model
        .likelihood_estimate()
        .replace("IWAE-k", &format!("IWAE-{iwae_k}"))
}

/// gm's classifier from `path`, for sample quality; errors say how to train one.
pub fn load_classifier(
    path: &std::path::Path,
    device: &Device,
) -> Result<crate::checkpoint::LoadedCheckpoint> {
    let hint = "gm train --config models/classifier-mnist.toml";
    let cls = crate::checkpoint::load_checkpoint(path, device).map_err(|e| {
        anyhow!(
            "sample quality needs gm's classifier at {} ({hint}): {e:#}",
            path.display()
        )
    })?;
    if cls
        .built
        .cfg
        .model
        .get::<gm_models::classifier::ClassifierConfig>()
        .is_none()
    {
        return Err(anyhow!(
            "{}: a '{}' checkpoint; sample quality needs gm's classifier ({hint})",
            cls.path.display(),
            cls.built.model.kind()
        ));
    }
    Ok(cls)
}

/// The name of the data a classifier was trained on, which names its feature space in the
/// reported metrics (`fid_mnist`, `kid_mnist`; `fid_photos32` for a classifier of
/// `npy:…/photos32`): the data set's name, or the last component of a user data set's path.
pub fn feature_space(cls: &crate::checkpoint::LoadedCheckpoint) -> String {
    let data = &cls.built.cfg.data;
    let Some((_, path)) = data.dataset.split_once(':') else {
        return data.dataset.clone();
    };
    let path = std::path::PathBuf::from(data.dir.as_deref().unwrap_or(path));
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.is_empty() {
        "data".into()
    } else {
        name
    }
}

/// Refuses a classifier that reads images of another shape than the model makes, saying how to
/// train one on the model's data.
pub fn check_classifier_shape(
    cls: &crate::checkpoint::LoadedCheckpoint,
    shape: Option<[usize; 3]>,
    what: &str,
) -> Result<()> {
    let want = cls.built.cfg.model.image_shape();
    if shape.is_some() && want != shape {
        return Err(anyhow!(
            "{what}: the classifier {} reads {:?} images ({}) but the model makes {:?}: sample \
             quality needs a classifier trained on the model's data (gm train --config \
             models/classifier-mnist.toml --set 'model.image_shape=…' --set 'data.dataset=…', \
             then --classifier RUN)",
            cls.path.display(),
            want.unwrap_or_default(),
            feature_space(cls),
            shape.unwrap_or_default()
        ));
    }
    Ok(())
}

/// The name a [`SampleQuality`] field reports under for a classifier of data `space`
/// ([`feature_space`]): `fid_mnist` → `fid_SPACE`, likewise `kid_` and their `_se`; other names
/// unchanged.
pub fn feature_metric(name: &str, space: &str) -> String {
    name.replacen("_mnist", &format!("_{space}"), 1)
}

/// `q` as JSON fields, named by [`feature_metric`].
pub fn quality_fields(q: &SampleQuality, space: &str) -> Result<Vec<(String, serde_json::Value)>> {
    let v = serde_json::to_value(q)?;
    Ok(v.as_object()
        .expect("a struct")
        .iter()
        .map(|(k, v)| (feature_metric(k, space), v.clone()))
        .collect())
}

/// `n` samples of `model` (seeded), their quality against the first `n` images of `real`, the
/// samples, and the sampling speed in images per second.
pub fn sample_quality_of(
    model: &dyn Model,
    classifier: &dyn Model,
    real: &ImageDataset,
    n: usize,
    seed: u64,
    device: &Device,
) -> Result<(SampleQuality, Tensor, f64)> {
    check_sample_count(&format!("{n} samples"), n)?;
    if n < 2 {
        return Err(anyhow!(
            "sample quality needs at least 2 samples (a covariance), got {n}"
        ));
    }
    let t0 = std::time::Instant::now();
    let samples = sample_chunked(model, n, SAMPLE_CHUNK, &mut GmRng::new(seed))?
        .ok_or_else(|| anyhow!("a '{}' model does not sample", model.kind()))?;
    let secs = t0.elapsed().as_secs_f64();
    let n_real = n.min(real.len());
    let (raw, _) = real.gather(&(0..n_real).collect::<Vec<_>>())?;
    let real = (raw / 255.0)?.to_device(device)?;
    let q = sample_quality(classifier, &samples, &real)?;
    Ok((q, samples, n as f64 / secs))
}

/// Images generated per model call by `gm sample`, `--fid` and the trainer's sample grids: one
/// call up to this many (the same images as before chunking), bounded memory beyond.
pub const SAMPLE_CHUNK: usize = 1024;

/// `n` samples drawn `chunk` at a time (at most [`crate::config::MAX_SAMPLES`]): the same
/// images as one `model.sample(n)` call when `n ≤ chunk`, in bounded memory beyond. `None` for
/// models that do not sample.
pub fn sample_chunked(
    model: &dyn gm_models::Model,
    n: usize,
    chunk: usize,
    rng: &mut gm_core::GmRng,
) -> anyhow::Result<Option<candle_core::Tensor>> {
    check_sample_count("samples", n)?;
    let mut parts = Vec::new();
    let mut done = 0;
    while done < n {
        let c = chunk.max(1).min(n - done);
        match model.sample(c, rng)? {
            Some(s) => parts.push(s),
            None => return Ok(None),
        }
        done += c;
    }
    Ok(Some(candle_core::Tensor::cat(&parts, 0)?))
}

/// Refuses a sample count above [`crate::config::MAX_SAMPLES`], naming the option.
pub fn check_sample_count(what: &str, n: usize) -> anyhow::Result<()> {
    let max = crate::config::MAX_SAMPLES;
    if n > max {
        anyhow::bail!("{what}: {n} images asked for, gm's limit is {max} per call");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_set(rng: &mut GmRng, n: usize, d: usize, shift: f64) -> DMatrix<f64> {
        let z = rng.normal_vec_f64(n * d);
        DMatrix::from_fn(n, d, |i, j| z[i * d + j] + if j == 0 { shift } else { 0.0 })
    }

    /// `reps` independent estimates on pairs of sets, the second shifted by `shift`, and the
    /// mean of their jackknife standard errors.
    fn kid_runs(rng: &mut GmRng, reps: usize, n: usize, shift: f64) -> (Vec<f64>, f64) {
        let (mut est, mut se) = (Vec::new(), 0.0);
        for _ in 0..reps {
            let (a, b) = (gaussian_set(rng, n, 4, 0.0), gaussian_set(rng, n, 4, shift));
            let (k, s) = kid(&a, &b);
            est.push(k);
            se += s / reps as f64;
        }
        (est, se)
    }

    fn mean_sd(v: &[f64]) -> (f64, f64) {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
        (m, var.sqrt())
    }

    #[test]
    fn kid_is_unbiased_and_its_jackknife_error_is_calibrated() {
        let mut rng = GmRng::new(1);
        // Sets from one Gaussian: the mean estimate is 0 within its Monte-Carlo error (an
        // unbiased estimator; the Fréchet distance is biased upward here). There the jackknife
        // is conservative (a degenerate U-statistic): its error is larger than the spread.
        let (est, se) = kid_runs(&mut rng, 200, 100, 0.0);
        let (mean, sd) = mean_sd(&est);
        assert!(
            mean.abs() < 3.0 * sd / 200f64.sqrt(),
            "null: mean {mean}, sd {sd}"
        );
        assert!(se >= sd, "null: jackknife se {se} below the spread {sd}");
        // Sets that differ (what the metric is used for): the jackknife error matches the
        // spread of the estimates.
        let (est, se) = kid_runs(&mut rng, 200, 100, 1.5);
        let (mean, sd) = mean_sd(&est);
        assert!(mean > 3.0 * sd, "shifted: {mean} ± {sd}");
        eprintln!("kid of shifted sets: {mean} ± {sd} over 200 pairs; mean jackknife se {se}");
        assert!(
            (se / sd - 1.0).abs() < 0.2,
            "shifted: jackknife se {se} vs spread {sd}"
        );
    }

    #[test]
    fn prdc_of_identical_and_disjoint_sets() {
        let mut rng = GmRng::new(2);
        let a = gaussian_set(&mut rng, 200, 3, 0.0);
        // Samples equal to the real points: every one lies inside its own ball (radius > 0).
        let (p, r, _, c) = prdc(&a, &a, 5);
        assert_eq!((p, r, c), (1.0, 1.0, 1.0));
        // Samples far from every real point: nothing is inside anything.
        let far = gaussian_set(&mut rng, 200, 3, 100.0);
        assert_eq!(prdc(&far, &a, 5), (0.0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn frechet_closed_forms() {
        // Identical Gaussians: 0. Diagonal covariances: ‖Δμ‖² + Σ (σ₁ − σ₂)².
        let mu1 = DVector::from_vec(vec![0.0, 1.0, 2.0]);
        let s1 = DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 4.0, 9.0]));
        assert!(frechet_distance(&mu1, &s1, &mu1, &s1).abs() < 1e-10);
        let mu2 = DVector::from_vec(vec![1.0, 1.0, 0.0]);
        let s2 = DMatrix::from_diagonal(&DVector::from_vec(vec![4.0, 1.0, 1.0]));
        let want = 1.0 + 4.0 + (1.0 + 1.0 + 4.0);
        assert!((frechet_distance(&mu1, &s1, &mu2, &s2) - want).abs() < 1e-9);
        // A rotated covariance with the same spectrum still has distance ≥ 0 and symmetric.
        let r = DMatrix::from_row_slice(2, 2, &[0.6, -0.8, 0.8, 0.6]);
        let a = DMatrix::from_row_slice(2, 2, &[2.0, 0.3, 0.3, 1.0]);
        let b = &r * &a * r.transpose();
        let z = DVector::zeros(2);
        let d1 = frechet_distance(&z, &a, &z, &b);
        let d2 = frechet_distance(&z, &b, &z, &a);
        assert!(d1 > 0.0 && (d1 - d2).abs() < 1e-9);
    }

    #[test]
    fn stats_of_known_rows() {
        let f = DMatrix::from_row_slice(3, 2, &[1.0, 0.0, 2.0, 2.0, 3.0, 4.0]);
        let (m, c) = feature_stats(&f);
        assert_eq!(m, DVector::from_vec(vec![2.0, 2.0]));
        assert!(
            (c[(0, 0)] - 1.0).abs() < 1e-12
                && (c[(1, 1)] - 4.0).abs() < 1e-12
                && (c[(0, 1)] - 2.0).abs() < 1e-12
        );
    }

    /// The bootstrap standard error matches the spread of the Fréchet distance over independent
    /// draws of both sets (Gaussian features, a shifted mean), within a factor of 1.6.
    #[test]
    fn bootstrap_se_matches_the_spread_over_independent_draws() {
        let mut rng = GmRng::new(11);
        let mut draw = |n: usize, shift: f64| {
            let v = rng.per_sample_f64(2 * n * 3);
            // Box–Muller from uniforms.
            DMatrix::from_fn(n, 3, |i, j| {
                let (u1, u2) = (v[2 * (i * 3 + j)].max(1e-12), v[2 * (i * 3 + j) + 1]);
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() + shift
            })
        };
        let fd = |a: &DMatrix<f64>, b: &DMatrix<f64>| {
            let (m1, s1) = feature_stats(a);
            let (m2, s2) = feature_stats(b);
            frechet_distance(&m1, &s1, &m2, &s2)
        };
        let pairs: Vec<(DMatrix<f64>, DMatrix<f64>)> =
            (0..60).map(|_| (draw(300, 0.5), draw(300, 0.0))).collect();
        let d: Vec<f64> = pairs.iter().map(|(a, b)| fd(a, b)).collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (d.len() - 1) as f64).sqrt();
        let se = bootstrap_se(&pairs[0].0, &pairs[0].1, FID_BOOTSTRAP);
        assert!(
            se / sd > 1.0 / 1.6 && se / sd < 1.6,
            "bootstrap {se} vs spread {sd}"
        );
    }
}

//! `gm compare`: one table over trained runs — kind, training budget, likelihood in its units
//! (and whether it is exact or a bound), sample quality through gm's classifier (fid_mnist, KID,
//! precision, recall, mode coverage) and sampling speed — plus a labelled montage of their
//! samples. Runs of one configuration that differ only in `train.seed` form a group, shown as
//! mean ± standard deviation over its seeds.

use crate::data::{load_data, Split};
use crate::eval::{evaluate_full, sample_quality_of, SampleQuality};
use crate::images::{grid_image, labelled_panels};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use image::RgbImage;
use std::path::{Path, PathBuf};

/// What `gm compare` measures, the same for every run.
pub struct CompareOptions {
    pub data_dir: Option<PathBuf>,
    /// Test images the likelihood is averaged over (the first ones; 0 = all).
    pub max_images: usize,
    /// Samples drawn per run for sample quality (and the speed).
    pub fid_n: usize,
    pub device: Device,
    /// `KEY=VALUE` settings that leave weights alone, applied to each run whose configuration
    /// has the key (e.g. one ODE solver for every continuous-time model).
    pub overrides: Vec<String>,
    /// The classifier's data, which names its feature-space metrics ([`crate::eval::feature_space`]).
    pub feature_space: String,
}

/// The overrides of `overrides` that the stored configuration of `run` accepts.
pub fn applicable_overrides(run: &Path, overrides: &[String]) -> Result<Vec<String>> {
    if overrides.is_empty() {
        return Ok(Vec::new());
    }
    let path = crate::checkpoint::resolve(run)?;
    let meta = crate::checkpoint::read_meta(&path)?;
    let text = meta
        .get("gm.config")
        .ok_or_else(|| anyhow!("{}: no gm.config metadata", path.display()))?;
    Ok(overrides
        .iter()
        .filter(|o| crate::RunConfig::from_toml_str(text, &[o.to_string()], "").is_ok())
        .cloned()
        .collect())
}

/// A run's likelihood as evaluated.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Likelihood {
    /// The metric read (`nll_nats`, `nll_iwae_nats`, `vlb_nats`, ...).
    pub metric: String,
    pub nats: f64,
    pub bits_per_dim: f64,
    /// `exact`, `bound (...)`, `ODE` or `learned normaliser` ([`gm_models::Model::likelihood_estimate`]).
    pub estimate: String,
    /// The data scale: `binarised`, `8-bit (dequantised)` or `continuous` (2-D toys).
    pub scale: String,
    pub n_images: usize,
}

/// One run's row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    pub run: String,
    pub kind: String,
    pub seed: u64,
    pub steps: usize,
    /// Training images per optimizer step (batch × accumulation).
    pub batch: usize,
    pub parameters: usize,
    pub likelihood: Option<Likelihood>,
    pub quality: Option<SampleQuality>,
    pub sample_images_per_s: Option<f64>,
    /// The run's configuration with the seed left out: runs with equal keys are one group.
    #[serde(skip)]
    pub group_key: String,
    #[serde(skip)]
    pub grid: Option<RgbImage>,
}

fn scale_of(cfg: &crate::RunConfig) -> String {
    if crate::data::toy_name(&cfg.data.dataset).is_some() {
        "continuous".into()
    } else if cfg.data.binarize != crate::config::Binarize::None {
        "binarised".into()
    } else if cfg.data.dequantize {
        "8-bit (dequantised)".into()
    } else {
        "8-bit".into()
    }
}

/// Evaluates one run: its likelihood on the first `max_images` test images and, with a
/// classifier and a sampling image model, the quality and speed of `fid_n` samples, whose first
/// 16 make its montage panel.
pub fn report_run(
    run: &Path,
    classifier: Option<&crate::checkpoint::LoadedCheckpoint>,
    opts: &CompareOptions,
) -> Result<RunReport> {
    if crate::text::is_text_checkpoint(run)? {
        bail!(
            "{}: a text model; gm compare covers image and 2-D models (gm eval reports a text model's bits per byte)",
            run.display()
        );
    }
    let applied = applicable_overrides(run, &opts.overrides)?;
    if !applied.is_empty() {
        eprintln!(
            "gm: compare: {}: --set {}",
            run.display(),
            applied.join(" --set ")
        );
    }
    let ck = crate::checkpoint::load_checkpoint_with(run, &opts.device, &applied)?;
    let cfg = &ck.built.cfg;
    let model = ck.built.model.as_ref();
    if model.kind() == "classifier" {
        bail!(
            "{}: a classifier, not a generative model (pass it as --classifier)",
            run.display()
        );
    }
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| run.display().to_string());
    let (ds, _) = load_data(cfg, opts.data_dir.as_deref(), Split::Test)
        .with_context(|| format!("{}: its test data", run.display()))?;
    let likelihood = match model.likelihood_metric() {
        Some(metric) => {
            let m = evaluate_full(model, cfg, &ds, None, opts.max_images, &opts.device)
                .with_context(|| format!("{}: evaluation", run.display()))?;
            let nats = *m
                .get(metric)
                .ok_or_else(|| anyhow!("{}: the evaluation gave no {metric}", run.display()))?;
            let estimate = crate::eval::likelihood_estimate_label(model, cfg.eval.iwae_k);
            Some(Likelihood {
                metric: metric.to_string(),
                nats,
                bits_per_dim: m
                    .get("bits_per_dim")
                    .copied()
                    .unwrap_or_else(|| gm_core::bits_per_dim(nats, ds.image_len())),
                estimate,
                scale: scale_of(cfg),
                n_images: m.get("n_images").copied().unwrap_or(0.0) as usize,
            })
        }
        None => None,
    };
    let image_model = crate::data::toy_name(&cfg.data.dataset).is_none();
    let (quality, per_s, grid) = match (classifier, image_model) {
        (Some(cls), true) => {
            crate::eval::check_classifier_shape(
                cls,
                cfg.model.image_shape(),
                &run.display().to_string(),
            )?;
            let cls = cls.built.model.as_ref();
            let (q, samples, per_s) =
                sample_quality_of(model, cls, &ds, opts.fid_n, cfg.eval.seed, &opts.device)
                    .with_context(|| format!("{}: sample quality", run.display()))?;
            let shown = samples.narrow(0, 0, samples.dim(0)?.min(16))?;
            let g = grid_image(&shown, 4)?;
            let g = image::imageops::resize(
                &g,
                2 * g.width(),
                2 * g.height(),
                image::imageops::FilterType::Nearest,
            );
            (Some(q), Some(per_s), Some(g))
        }
        _ => (None, None, None),
    };
    let mut key_cfg = cfg.clone();
    key_cfg.train.seed = 0;
    Ok(RunReport {
        run: name,
        kind: model.kind().to_string(),
        seed: cfg.train.seed,
        steps: ck.step,
        batch: cfg.train.batch_size * cfg.train.accumulate,
        parameters: ck
            .built
            .varmap
            .all_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum(),
        likelihood,
        quality,
        sample_images_per_s: per_s,
        group_key: key_cfg.to_toml(),
        grid,
    })
}

/// Runs grouped by configuration (seed aside), in the order their first run was given.
pub fn groups(reports: &[RunReport]) -> Vec<Vec<&RunReport>> {
    let mut out: Vec<Vec<&RunReport>> = Vec::new();
    for r in reports {
        match out.iter_mut().find(|g| g[0].group_key == r.group_key) {
            Some(g) => g.push(r),
            None => out.push(vec![r]),
        }
    }
    out
}

/// `mean ± sd` over a group's values (the plain value for one run; `—` for none).
fn cell(values: &[f64], digits: usize) -> String {
    match values.len() {
        0 => "—".into(),
        1 => format!("{:.digits$}", values[0]),
        n => {
            let m = values.iter().sum::<f64>() / n as f64;
            let sd =
                (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
            format!("{m:.digits$} ± {sd:.digits$}")
        }
    }
}

/// The comparison as a Markdown table, one row per group.
pub fn markdown(reports: &[RunReport], opts: &CompareOptions) -> String {
    let fid = crate::eval::feature_metric("fid_mnist", &opts.feature_space);
    let mut s = format!(
        "Likelihood on the first {} test images; sample quality from {} samples per run through \
         gm's classifier of {} ({} and KID in its features, lower is better; precision, \
         recall with k = {}); groups of seeds as mean ± sd.\n\n",
        if opts.max_images == 0 {
            "all".to_string()
        } else {
            opts.max_images.to_string()
        },
        opts.fid_n,
        opts.feature_space,
        fid,
        crate::eval::PRDC_K
    );
    if !opts.overrides.is_empty() {
        let shown: Vec<String> = opts.overrides.iter().map(|o| format!("`{o}`")).collect();
        s.push_str(&format!(
            "Settings applied to every run whose configuration has them: {}.\n\n",
            shown.join(", ")
        ));
    }
    s.push_str(&format!(
        "| run | kind | seeds | steps × batch | likelihood (nats) | bits/dim | estimate, scale | {fid} | KID | precision | recall | classes ≥ 5% | class KL | samples/s |\n"
    ));
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for g in groups(reports) {
        let first = g[0];
        let get = |f: &dyn Fn(&RunReport) -> Option<f64>| -> Vec<f64> {
            g.iter().filter_map(|r| f(r)).collect()
        };
        let lik = |f: fn(&Likelihood) -> f64| get(&|r| r.likelihood.as_ref().map(f));
        let q = |f: fn(&SampleQuality) -> f64| get(&|r| r.quality.as_ref().map(f));
        let name = if g.len() == 1 {
            first.run.clone()
        } else {
            g.iter()
                .map(|r| r.run.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let est = first.likelihood.as_ref().map_or("—".to_string(), |l| {
            format!("{}, {}", l.estimate, l.scale)
        });
        s.push_str(&format!(
            "| {name} | {} | {} | {} × {} | {} | {} | {est} | {} | {} | {} | {} | {} | {} | {} |\n",
            first.kind,
            g.len(),
            first.steps,
            first.batch,
            cell(&lik(|l| l.nats), 2),
            cell(&lik(|l| l.bits_per_dim), 3),
            cell(&q(|q| q.fid_mnist), 1),
            cell(&q(|q| q.kid_mnist), 2),
            cell(&q(|q| q.precision), 3),
            cell(&q(|q| q.recall), 3),
            cell(&q(|q| q.classes_ge_5pct as f64), usize::from(g.len() > 1)),
            cell(&q(|q| q.class_kl_uniform_nats), 3),
            cell(&get(&|r| r.sample_images_per_s), 1),
        ));
    }
    s
}

/// One CSV line per run (not grouped), every measured value.
pub fn csv(reports: &[RunReport], feature_space: &str) -> String {
    let header: Vec<String> = "run,kind,seed,steps,batch,parameters,likelihood_metric,likelihood_nats,bits_per_dim,estimate,scale,n_images,fid_mnist,fid_mnist_se,kid_mnist,kid_mnist_se,precision,recall,density,coverage,classes_ge_5pct,class_kl_uniform_nats,classifier_confidence,sample_images_per_s"
        .split(',')
        .map(|c| crate::eval::feature_metric(c, feature_space))
        .collect();
    let mut s = header.join(",") + "\n";
    let q = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    let text = |t: &str| {
        if t.contains([',', '"']) {
            format!("\"{}\"", t.replace('"', "\"\""))
        } else {
            t.to_string()
        }
    };
    for r in reports {
        let l = r.likelihood.as_ref();
        let k = r.quality.as_ref();
        let cols = [
            text(&r.run),
            r.kind.clone(),
            r.seed.to_string(),
            r.steps.to_string(),
            r.batch.to_string(),
            r.parameters.to_string(),
            l.map_or(String::new(), |l| l.metric.clone()),
            q(l.map(|l| l.nats)),
            q(l.map(|l| l.bits_per_dim)),
            l.map_or(String::new(), |l| text(&l.estimate)),
            l.map_or(String::new(), |l| text(&l.scale)),
            l.map_or(String::new(), |l| l.n_images.to_string()),
            q(k.map(|k| k.fid_mnist)),
            q(k.map(|k| k.fid_mnist_se)),
            q(k.map(|k| k.kid_mnist)),
            q(k.map(|k| k.kid_mnist_se)),
            q(k.map(|k| k.precision)),
            q(k.map(|k| k.recall)),
            q(k.map(|k| k.density)),
            q(k.map(|k| k.coverage)),
            q(k.map(|k| k.classes_ge_5pct as f64)),
            q(k.map(|k| k.class_kl_uniform_nats)),
            q(k.map(|k| k.classifier_confidence)),
            q(r.sample_images_per_s),
        ];
        s.push_str(&cols.join(","));
        s.push('\n');
    }
    s
}

/// The runs' sample grids side by side, each captioned with its run's name (`None` when no run
/// drew images).
pub fn montage(reports: &[RunReport]) -> Result<Option<RgbImage>> {
    let panels: Vec<(String, RgbImage)> = reports
        .iter()
        .filter_map(|r| r.grid.clone().map(|g| (r.run.clone(), g)))
        .collect();
    if panels.is_empty() {
        return Ok(None);
    }
    let per_row = panels.len().min(6);
    labelled_panels(&panels, per_row).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(run: &str, key: &str, nats: f64) -> RunReport {
        RunReport {
            run: run.into(),
            kind: "vae".into(),
            seed: 0,
            steps: 10,
            batch: 4,
            parameters: 1,
            likelihood: Some(Likelihood {
                metric: "nll_nats".into(),
                nats,
                bits_per_dim: nats / 784.0 / std::f64::consts::LN_2,
                estimate: "exact".into(),
                scale: "binarised".into(),
                n_images: 5,
            }),
            quality: None,
            sample_images_per_s: None,
            group_key: key.into(),
            grid: None,
        }
    }

    #[test]
    fn seeds_of_one_config_group_as_mean_and_sd() {
        let r = [
            report("a-seed0", "A", 100.0),
            report("b", "B", 90.0),
            report("a-seed1", "A", 102.0),
        ];
        let g = groups(&r);
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0].iter().map(|r| r.run.as_str()).collect::<Vec<_>>(),
            ["a-seed0", "a-seed1"]
        );
        assert_eq!(cell(&[100.0, 102.0], 2), "101.00 ± 1.41");
        assert_eq!(cell(&[9.0], 0), "9");
        assert_eq!(cell(&[], 1), "—");
        let opts = CompareOptions {
            data_dir: None,
            max_images: 5,
            fid_n: 10,
            device: Device::Cpu,
            overrides: Vec::new(),
            feature_space: "mnist".into(),
        };
        let md = markdown(&r, &opts);
        assert!(
            md.contains("| a-seed0, a-seed1 | vae | 2 | 10 × 4 | 101.00 ± 1.41 |"),
            "{md}"
        );
        assert!(md.contains("| b | vae | 1 | 10 × 4 | 90.00 |"), "{md}");
        assert_eq!(csv(&r, "mnist").lines().count(), 4);
    }
}

//! `gm doctor`: proof that a device computes what the CPU computes, family by family.
//!
//! For every model family gm builds the tiny preset's model with fixed weights and runs, twice
//! from the same weights, batch and noise (all drawn on the host, so identical):
//! - one training step: the loss, its gradients and one Adam update (fed the reference
//!   gradients on both sides, so the optimizer is compared on its own);
//! - one sampling pass (a few sampler or solver steps; the next-token logits for the text model);
//!
//! once with gm's own CPU kernels (the reference) and once on the named device through the
//! portable path — candle's ops, the code that runs on CUDA and Metal. With `--device cpu` the
//! second run is the portable path on the CPU ([`gm_core::portable_kernels`]). Then a checkpoint
//! round trip: the device's weights to a file, read on the CPU, read back onto the device, all
//! bit-exact. Each family runs in its own child process (WGAN-GP's second-order switch is
//! process-wide), so a crash in one is reported as that family's failure.

use crate::checkpoint::{read_safetensors, to_safetensors};
use crate::optim::{named_vars, Adam, AdamConfig};
use crate::trainer::{build, device_name, group_loss, optimizers, set_data_init, set_vars};
use crate::RunConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gm_core::GmRng;
use gm_models::{Batch, PixelData};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Largest accepted differences of one family, each relative (see [`FamilyReport`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Tolerance {
    pub loss: f64,
    pub grads: f64,
    pub params: f64,
    /// Continuous samples: the largest absolute difference (images are in `[0, 1]`). Discrete
    /// samples (autoregressive pixels) must be identical: see [`Family::discrete`].
    pub samples: f64,
}

/// One model family as the doctor checks it.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    /// The tiny preset's TOML (compiled in: the doctor needs no files).
    preset: &'static str,
    overrides: &'static [&'static str],
    pub tol: Tolerance,
    /// Samples are drawn pixel by pixel from probabilities by host-drawn uniforms: equal
    /// probabilities give equal samples, and a flip needs a uniform within the probabilities'
    /// difference (~1e-6) of a threshold. Such samples must match exactly.
    pub discrete: bool,
}

const fn tol(loss: f64, grads: f64, samples: f64) -> Tolerance {
    Tolerance {
        loss,
        grads,
        params: 1e-5,
        samples,
    }
}

macro_rules! preset {
    ($name:literal) => {
        include_str!(concat!("../../../models/", $name, ".toml"))
    };
}

/// Every family, in the order the table prints them.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "vae",
        preset: preset!("vae-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 1e-4),
        discrete: false,
    },
    Family {
        name: "vae-conv",
        preset: preset!("vae-tiny"),
        overrides: &["model.arch=\"conv\"", "model.channels=[8, 16]"],
        tol: tol(1e-5, 1e-4, 1e-4),
        discrete: false,
    },
    Family {
        name: "classifier",
        preset: preset!("classifier-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 0.0),
        discrete: false,
    },
    Family {
        name: "fvsbn",
        preset: preset!("fvsbn-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 0.0),
        discrete: true,
    },
    Family {
        name: "made",
        preset: preset!("made-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 0.0),
        discrete: true,
    },
    Family {
        name: "pixelcnn",
        preset: preset!("pixelcnn-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 0.0),
        discrete: true,
    },
    Family {
        name: "gated-pixelcnn",
        preset: preset!("gated-pixelcnn-cond-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 0.0),
        discrete: true,
    },
    Family {
        name: "ddpm",
        preset: preset!("ddpm-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-3, 1e-3),
        discrete: false,
    },
    Family {
        name: "flow-matching",
        preset: preset!("flow-matching-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-3, 1e-3),
        discrete: false,
    },
    Family {
        name: "realnvp",
        preset: preset!("realnvp-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-3, 1e-3),
        discrete: false,
    },
    Family {
        name: "cnf",
        preset: preset!("cnf-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-3, 1e-3),
        discrete: false,
    },
    Family {
        name: "dcgan",
        preset: preset!("dcgan-cond-tiny"),
        overrides: &[],
        tol: tol(1e-5, 3e-3, 1e-4),
        discrete: false,
    },
    Family {
        name: "wgan-gp",
        preset: preset!("dcgan-tiny"),
        overrides: &["model.loss=\"wgan-gp\""],
        tol: tol(1e-5, 3e-3, 1e-4),
        discrete: false,
    },
    Family {
        name: "text-ar",
        preset: preset!("text-ar-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 1e-4),
        discrete: false,
    },
    Family {
        name: "vqvae",
        preset: preset!("vqvae-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-4, 1e-4),
        discrete: false,
    },
    Family {
        name: "score",
        preset: preset!("score-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-3, 1e-3),
        discrete: false,
    },
    Family {
        name: "ebm-nce",
        preset: preset!("ebm-nce-tiny"),
        overrides: &[],
        tol: tol(1e-5, 1e-3, 1e-3),
        discrete: false,
    },
];

/// The family called `name`; the error lists the known ones.
pub fn family(name: &str) -> Result<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        anyhow!("unknown family '{name}'; known: {}", known.join(", "))
    })
}

/// What one family's check found. Differences are relative: for the loss `|a − b| / |b|`; for
/// gradients and parameters, per tensor `max|a − b|` over `max|b|` — or over 1e-3 of the largest
/// gradient of the model where that is larger, so that gradients that are zero in exact
/// arithmetic (a bias before a normalisation) compare at the model's scale, not their noise —
/// the largest over tensors; for continuous samples the largest absolute difference.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FamilyReport {
    pub family: String,
    pub device: String,
    pub loss_rel: f64,
    pub grads_rel: f64,
    pub params_rel: f64,
    /// Continuous: the largest absolute difference; discrete: the fraction of values that differ.
    pub samples_diff: Option<f64>,
    pub roundtrip_ok: bool,
    /// Seconds of the reference (gm's CPU kernels) and of the device run: build, step, sampling.
    pub cpu_s: f64,
    pub device_s: f64,
    pub tol: Tolerance,
    pub pass: bool,
    /// Why it failed, when a step errored or a difference is out of tolerance.
    pub error: Option<String>,
}

/// Everything one run of a family produced, on the host.
struct Outcome {
    losses: Vec<f64>,
    grads: Vec<(String, Tensor)>,
    params: Vec<(String, Tensor)>,
    samples: Option<Tensor>,
    seconds: f64,
}

fn config(f: &Family) -> Result<RunConfig> {
    let overrides: Vec<String> = f.overrides.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml_str(f.preset, &overrides, &format!("doctor preset '{}'", f.name))
}

/// A host batch of the family's data type: binary, 8-bit levels or dequantised.
fn host_batch(cfg: &RunConfig, rng: &mut GmRng) -> Result<Batch> {
    let b = cfg.train.batch_size.min(8);
    let Some([c, h, w]) = cfg.model.image_shape() else {
        bail!("a '{}' model reads text, not images", cfg.model.kind())
    };
    let n = b * c * h * w;
    let u = rng.uniform_vec(n, 0.0, 1.0);
    let v: Vec<f32> = match cfg.model.pixel_data() {
        PixelData::Binary => u.iter().map(|&x| (x < 0.3) as u8 as f32).collect(),
        PixelData::Levels => u.iter().map(|&x| (x * 256.0).floor() / 255.0).collect(),
        PixelData::Dequantized => {
            let d = rng.uniform_vec(n, 0.0, 1.0);
            u.iter()
                .zip(d)
                .map(|(&x, d)| ((x * 256.0).floor() + d) / 256.0)
                .collect()
        }
        PixelData::Any => u,
    };
    let x = Tensor::from_vec(v, (b, c, h, w), &Device::Cpu)?;
    let labels = Tensor::from_vec((0..b as u32).map(|i| i % 10).collect(), b, &Device::Cpu)?;
    Ok(Batch {
        x,
        labels: Some(labels),
    })
}

fn to_host(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
}

/// The values of every variable, on the host.
fn snapshot(vm: &VarMap) -> Result<HashMap<String, Tensor>> {
    named_vars(vm)
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().to_device(&Device::Cpu)?)))
        .collect()
}

/// Each variable's gradient, kept on the host under `prefix + name`; with `ref_grads`, the
/// reference gradient of that name takes its place in `grads` for the optimizer.
fn take_grads(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[(String, Var)],
    prefix: &str,
    ref_grads: Option<&[(String, Tensor)]>,
    dev: &Device,
    out: &mut Vec<(String, Tensor)>,
) -> Result<()> {
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        if let Some(g) = grads.get(var.as_tensor()) {
            out.push((key.clone(), to_host(g)?));
        }
        if let Some(r) = ref_grads.and_then(|r| r.iter().find(|(k, _)| *k == key)) {
            grads.insert(var.as_tensor(), r.1.to_dtype(var.dtype())?.to_device(dev)?);
        }
    }
    Ok(())
}

/// Every variable's value on the host, in f64.
fn host_values(vars: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), to_host(v.as_tensor())?)))
        .collect()
}

/// One training step (every phase once) and one sampling pass of an image model. `ref_grads`,
/// when given, replaces the computed gradients before each Adam update.
fn run_image(
    cfg: &RunConfig,
    dev: &Device,
    init: &HashMap<String, Tensor>,
    host: &Batch,
    ref_grads: Option<&[(String, Tensor)]>,
) -> Result<(Outcome, VarMap)> {
    let t0 = Instant::now();
    let built = build(cfg, dev)?;
    set_vars(&built.varmap, init, "", Path::new("<doctor weights>"), true)?;
    let batch = Batch {
        x: host.x.to_device(dev)?,
        labels: host.labels.as_ref().map(|l| l.to_device(dev)).transpose()?,
    };
    let model = built.model.as_ref();
    let vars = named_vars(&built.varmap);
    let (groups, mut adams) = optimizers(model, &vars, &cfg.train)?;
    let mut rng = GmRng::new(1);
    let (mut losses, mut grads_out) = (Vec::new(), Vec::new());
    for (pi, (phase, pvars)) in groups.iter().enumerate() {
        let loss = group_loss(model, phase, pi, &batch, &mut rng)?;
        losses.push(gm_core::traffic::read_f64(&loss.total)?);
        let mut grads = loss.total.backward()?;
        take_grads(
            &mut grads,
            pvars,
            phase.name,
            ref_grads,
            dev,
            &mut grads_out,
        )?;
        adams[pi].step(&grads, cfg.train.lr * phase.lr_scale)?;
    }
    let samples = model.sample(2, &mut GmRng::new(2))?;
    let samples = samples.map(|s| to_host(&s)).transpose()?;
    dev.synchronize()?;
    let params = host_values(&vars)?;
    Ok((
        Outcome {
            losses,
            grads: grads_out,
            params,
            samples,
            seconds: t0.elapsed().as_secs_f64(),
        },
        built.varmap,
    ))
}

/// The text model's step and its next-token logits (its sampling step).
fn run_text(
    cfg: &RunConfig,
    dev: &Device,
    init: &HashMap<String, Tensor>,
    tokens: &Tensor,
    ref_grads: Option<&[(String, Tensor)]>,
) -> Result<(Outcome, VarMap)> {
    let Some(mc) = cfg.model.get::<gm_models::text::TextArConfig>() else {
        bail!("not a text model")
    };
    let t0 = Instant::now();
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 0, DType::F32, dev);
    let model = gm_models::text::TextAr::new(mc.clone(), vb)?;
    set_vars(&vm, init, "", Path::new("<doctor weights>"), true)?;
    let vars = named_vars(&vm);
    let mut adam = Adam::new(vars.clone(), AdamConfig::from(&cfg.train))?;
    let w = tokens.to_device(dev)?;
    let loss = model.token_nll(&w)?.mean_all()?;
    let losses = vec![gm_core::traffic::read_f64(&loss)?];
    let mut grads = loss.backward()?;
    let mut grads_out = Vec::new();
    take_grads(&mut grads, &vars, "", ref_grads, dev, &mut grads_out)?;
    adam.step(&grads, cfg.train.lr)?;
    let ctx = w.narrow(1, 0, mc.context)?;
    let logits = model.logits(&ctx)?.narrow(2, mc.context - 1, 1)?;
    let samples = Some(to_host(&logits)?);
    let params = host_values(&vars)?;
    Ok((
        Outcome {
            losses,
            grads: grads_out,
            params,
            samples,
            seconds: t0.elapsed().as_secs_f64(),
        },
        vm,
    ))
}

/// The largest `|x|`, NaN when any element is NaN (candle's `max` skips a NaN that is not first,
/// which would hide a NaN gradient or sample).
fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .fold(0f64, |a, x| {
            if a.is_nan() || x.is_nan() {
                f64::NAN
            } else {
                a.max(x.abs())
            }
        }))
}

/// Per tensor `max|a − b| / max(max|b|, floor)`, the largest over tensors; names must match.
fn rel_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)], floor: f64) -> Result<f64> {
    let mut worst = 0f64;
    for (name, tb) in b {
        let ta = a
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| anyhow!("'{name}' is missing from the device run"))?;
        if ta.1.dims() != tb.dims() {
            bail!(
                "'{name}': shape {:?} on the device, {:?} on the CPU",
                ta.1.dims(),
                tb.dims()
            );
        }
        let d = max_abs(&(&ta.1 - tb)?)?;
        let scale = max_abs(tb)?.max(floor).max(f64::MIN_POSITIVE);
        let r = d / scale;
        if r.is_nan() || r > worst {
            worst = if r.is_nan() { f64::INFINITY } else { r };
        }
    }
    if a.len() != b.len() {
        bail!("{} tensors on the device, {} on the CPU", a.len(), b.len());
    }
    Ok(worst)
}

/// Checks one family on `dev` against gm's CPU kernels. Errors of the run itself are returned;
/// differences out of tolerance give a report with `pass = false`.
pub fn check_family(f: &Family, dev: &Device) -> Result<FamilyReport> {
    let cfg = config(f)?;
    if f.name == "wgan-gp" {
        gm_models::gan::enable_second_order_gradients();
    }
    // TF32 would round the matrix products' inputs to 10 bits: the check is of f32 arithmetic.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let text = cfg.model.get::<gm_models::text::TextArConfig>();
    let mut rng = GmRng::new(0);

    // The reference: gm's CPU kernels.
    gm_core::set_portable_kernels(false);
    let cpu = Device::Cpu;
    let (init, tokens, host) = if let Some(mc) = text {
        let b = cfg.train.batch_size.min(8);
        let v: Vec<u32> = (0..b * (mc.context + 1))
            .map(|_| (rng.next_u64() % mc.vocab_size as u64) as u32)
            .collect();
        let tokens = Tensor::from_vec(v, (b, mc.context + 1), &cpu)?;
        let vm = VarMap::new();
        let vb = gm_core::rng::seeded_var_builder(&vm, 0, DType::F32, &cpu);
        let _ = gm_models::text::TextAr::new(mc.clone(), vb)?;
        (snapshot(&vm)?, Some(tokens), None)
    } else {
        let host = host_batch(&cfg, &mut rng)?;
        let built = build(&cfg, &cpu)?;
        // Data-dependent initialisation (the CNF's element norm), as a fresh run does.
        set_data_init(&built.varmap, built.model.data_init(&host)?)?;
        (snapshot(&built.varmap)?, None, Some(host))
    };
    let run = |dev: &Device, refg: Option<&[(String, Tensor)]>| match (&tokens, &host) {
        (Some(t), _) => run_text(&cfg, dev, &init, t, refg),
        (_, Some(h)) => run_image(&cfg, dev, &init, h, refg),
        _ => unreachable!(),
    };
    let (reference, _) = run(&cpu, None).context("the reference run (gm's CPU kernels)")?;

    // The device path.
    if dev.is_cpu() {
        gm_core::set_portable_kernels(true);
    }
    let (on_dev, dev_vm) =
        run(dev, Some(&reference.grads)).context("the run on the device path")?;
    gm_core::set_portable_kernels(false);

    let loss_rel = reference
        .losses
        .iter()
        .zip(&on_dev.losses)
        .map(|(r, d)| (d - r).abs() / r.abs().max(1e-12))
        .fold(
            0f64,
            |a, b| if b.is_nan() { f64::INFINITY } else { a.max(b) },
        );
    let gmax = reference
        .grads
        .iter()
        .map(|(_, g)| max_abs(g))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0f64, f64::max);
    let grads_rel = rel_tensors(&on_dev.grads, &reference.grads, 1e-3 * gmax)?;
    let params_rel = rel_tensors(&on_dev.params, &reference.params, 0.0)?;
    let samples_diff = match (&reference.samples, &on_dev.samples) {
        (Some(r), Some(d)) if f.discrete => {
            let ne = r
                .ne(d)?
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()?;
            Some(ne)
        }
        (Some(r), Some(d)) => Some(max_abs(&(d - r)?)?),
        (None, None) => None,
        _ => bail!("one run sampled and the other did not"),
    };
    let roundtrip_ok = roundtrip(&dev_vm, dev)?;

    let mut why = Vec::new();
    let t = f.tol;
    // NaN is out of tolerance too.
    let within = |v: f64, tol: f64| v <= tol;
    if !within(loss_rel, t.loss) {
        why.push(format!("loss differs by {loss_rel:.2e} > {:.0e}", t.loss));
    }
    if !within(grads_rel, t.grads) {
        why.push(format!(
            "gradients differ by {grads_rel:.2e} > {:.0e}",
            t.grads
        ));
    }
    if !within(params_rel, t.params) {
        why.push(format!(
            "Adam's update differs by {params_rel:.2e} > {:.0e}",
            t.params
        ));
    }
    if let Some(s) = samples_diff {
        if !within(s, t.samples) {
            why.push(format!("samples differ by {s:.2e} > {:.0e}", t.samples));
        }
    }
    if !roundtrip_ok {
        why.push("checkpoint round trip changed the weights".into());
    }
    Ok(FamilyReport {
        family: f.name.into(),
        device: device_name(dev),
        loss_rel,
        grads_rel,
        params_rel,
        samples_diff,
        roundtrip_ok,
        cpu_s: reference.seconds,
        device_s: on_dev.seconds,
        tol: f.tol,
        pass: why.is_empty(),
        error: (!why.is_empty()).then(|| why.join("; ")),
    })
}

/// Device weights → safetensors file → CPU → device: every value must come back bit for bit.
fn roundtrip(vm: &VarMap, dev: &Device) -> Result<bool> {
    let dir = std::env::temp_dir().join(format!("gm-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("roundtrip.safetensors");
    let vars = named_vars(vm);
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    crate::checkpoint::atomic_write(&path, &to_safetensors(&tensors, &HashMap::new())?)?;
    let on_cpu = read_safetensors(&path, &Device::Cpu)?.tensors;
    let back = read_safetensors(&path, dev)?.tensors;
    let _ = std::fs::remove_dir_all(&dir);
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    for (name, t) in &tensors {
        let want = bits(t)?;
        let (c, d) = match (on_cpu.get(name), back.get(name)) {
            (Some(c), Some(d)) => (c, d),
            _ => bail!("the round trip lost '{name}'"),
        };
        if !c.device().is_cpu() || !d.device().same_device(dev) {
            bail!(
                "'{name}' was not read onto the CPU and back onto {}",
                device_name(dev)
            );
        }
        if bits(c)? != want || bits(d)? != want {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The table `gm doctor` prints, one row per family.
pub fn table(reports: &[FamilyReport]) -> String {
    let mut s = String::from(
        "| family | device | loss | gradients | Adam update | samples | checkpoint round trip | CPU s | device s | result |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: f64, t: f64| format!("{v:.1e} (≤ {t:.0e})");
    for r in reports {
        let samples = match r.samples_diff {
            None => "—".to_string(),
            Some(v) if r.tol.samples == 0.0 => format!("{:.1}% differ (= 0)", v * 100.0),
            Some(v) => f(v, r.tol.samples),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} |\n",
            r.family,
            r.device,
            f(r.loss_rel, r.tol.loss),
            f(r.grads_rel, r.tol.grads),
            f(r.params_rel, r.tol.params),
            samples,
            if r.roundtrip_ok {
                "bit-exact"
            } else {
                "CHANGED"
            },
            r.cpu_s,
            r.device_s,
            if r.pass {
                "pass".to_string()
            } else {
                format!("FAIL: {}", r.error.as_deref().unwrap_or("?"))
            },
        ));
    }
    s
}

/// A failed family's row when its child process produced no report.
pub fn failed(family: &str, device: &str, why: String) -> FamilyReport {
    FamilyReport {
        family: family.into(),
        device: device.into(),
        loss_rel: f64::NAN,
        grads_rel: f64::NAN,
        params_rel: f64::NAN,
        samples_diff: None,
        roundtrip_ok: false,
        cpu_s: 0.0,
        device_s: 0.0,
        tol: FAMILIES
            .iter()
            .find(|f| f.name == family)
            .map(|f| f.tol)
            .unwrap_or(tol(0.0, 0.0, 0.0)),
        pass: false,
        error: Some(why),
    }
}

/// What the doctor can tell about this process's CUDA setup before opening a device: whether
/// the binary has CUDA at all, and which of its libraries the loader found (Linux).
pub fn cuda_environment() -> Vec<String> {
    let mut out = Vec::new();
    if !candle_core::utils::cuda_is_available() {
        out.push("this gm binary was built without CUDA (build it with scripts/build-cuda.sh or --features cuda)".into());
        return out;
    }
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let mut libs: Vec<&str> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| {
                [
                    "libcuda.so",
                    "libcublas",
                    "libcurand",
                    "libcudart",
                    "libnvrtc",
                ]
                .iter()
                .any(|n| p.contains(n))
            })
            .collect();
        libs.sort();
        libs.dedup();
        for l in libs {
            out.push(format!("loaded {l}"));
        }
    }
    out
}

/// Turns a failure to open CUDA into a message that says what to check.
pub fn explain_cuda_error(e: &candle_core::Error) -> String {
    let msg = e.to_string();
    let hint = if msg.contains("NO_DEVICE") || msg.contains("no CUDA-capable device") {
        "no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES"
    } else if msg.contains("INSUFFICIENT_DRIVER") || msg.contains("driver version") {
        "the NVIDIA driver is older than this build's CUDA 13 needs: update the driver"
    } else if msg.contains("NOT_INITIALIZED") || msg.contains("libcuda") {
        "the driver library libcuda.so.1 does not work here: check that the NVIDIA driver is installed"
    } else if msg.contains("PTX") || msg.contains("NO_BINARY_FOR_GPU") {
        "the kernels were built for another GPU: rebuild with CUDA_COMPUTE_CAP set to this GPU's compute capability"
    } else {
        "check nvidia-smi, the driver, and that libcublas.so.13, libcurand.so.10 and libcudart.so.13 are on LD_LIBRARY_PATH"
    };
    format!("cannot open the CUDA device: {msg} ({hint})")
}

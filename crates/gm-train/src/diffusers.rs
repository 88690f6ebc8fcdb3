//! Reads a diffusers model folder — a `UNet2DModel` (`config.json` +
//! `diffusion_pytorch_model.safetensors`) with its `scheduler_config.json`, or a pipeline folder
//! (`model_index.json`, `unet/`, `scheduler/`) — as a gm DDPM: the config mapped onto gm's UNet
//! and noise schedule, the tensors renamed to gm's names (`down_blocks.0.resnets.0` →
//! `down.0.res.0`, `to_q/to_k/to_v` → one `qkv` 1×1 convolution, …). Everything a config asks
//! for that gm's UNet cannot express is named in the error.
//!
//! `gm sample/eval/score --checkpoint DIR` read such a folder directly; `gm import --diffusers
//! DIR --out FILE` writes it as a gm checkpoint.

use crate::config::RunConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use gm_core::diffusion::{BetaSchedule, Prediction, ScheduleConfig};
use gm_core::samplers::{SamplerConfig, SamplerKind, Spacing};
use gm_models::ddpm::DdpmConfig;
use gm_models::unet::UNetConfig;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// The UNet folder inside `dir` (itself, or a pipeline's `unet/`), if `dir` is a diffusers folder.
pub fn unet_folder(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("unet")]
        .into_iter()
        .find(|d| d.join("config.json").is_file() && d.join(WEIGHTS).is_file())
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// A folder read as a gm model: the run config (as TOML) and the tensors under gm's names.
pub struct Imported {
    pub config: RunConfig,
    pub tensors: HashMap<String, Tensor>,
    /// What was read, for messages.
    pub notes: Vec<String>,
}

/// Reads the diffusers folder `dir`.
pub fn import(dir: &Path) -> Result<Imported> {
    let unet_dir = unet_folder(dir).ok_or_else(|| {
        anyhow!(
            "{}: not a diffusers model folder (expected config.json and {WEIGHTS}, or unet/ with them)",
            dir.display()
        )
    })?;
    let cfg_path = unet_dir.join("config.json");
    let uc = read_json(&cfg_path)?;
    let mut notes = vec![];
    let (image_shape, unet) = unet_config(&uc, &cfg_path)?;
    let sched_path = [
        unet_dir.join("scheduler_config.json"),
        dir.join("scheduler_config.json"),
        dir.join("scheduler").join("scheduler_config.json"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    let (schedule, prediction, sampler) = match &sched_path {
        Some(p) => {
            notes.push(format!("scheduler {}", p.display()));
            scheduler_config(&read_json(p)?, p)?
        }
        None => {
            notes.push(
                "no scheduler_config.json: DDPM's defaults (linear β 1e-4..0.02, T = 1000, ε)"
                    .into(),
            );
            (
                ScheduleConfig::default(),
                Prediction::Epsilon,
                SamplerConfig::default(),
            )
        }
    };
    let ddpm = DdpmConfig {
        image_shape,
        unet: unet.clone(),
        schedule,
        prediction,
        sampler,
        ..Default::default()
    };
    #[derive(serde::Serialize)]
    struct Model<'a> {
        kind: &'static str,
        #[serde(flatten)]
        cfg: &'a DdpmConfig,
    }
    #[derive(serde::Serialize)]
    struct Run<'a> {
        model: Model<'a>,
    }
    let text = toml::to_string(&Run {
        model: Model {
            kind: "ddpm",
            cfg: &ddpm,
        },
    })?;
    let config = RunConfig::from_toml_str(&text, &[], &cfg_path.display().to_string())?;
    let wpath = unet_dir.join(WEIGHTS);
    let raw = candle_core::safetensors::load(&wpath, &Device::Cpu)
        .with_context(|| format!("{}: cannot read the tensors", wpath.display()))?;
    let tensors = rename(raw, &unet, &wpath)?;
    notes.push(format!("weights {}", wpath.display()));
    Ok(Imported {
        config,
        tensors,
        notes,
    })
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_of(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    get(v, key)
        .map(|x| {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| anyhow!("{}: {key} = {x} is not a count", path.display()))
        })
        .transpose()
}

/// Checks that `key` is absent or one of the values gm can express.
fn expect(v: &Value, key: &str, allowed: &[Value], path: &Path, why: &str) -> Result<()> {
    if let Some(x) = get(v, key) {
        if !allowed.contains(x) {
            bail!(
                "{}: {key} = {x} cannot be expressed by gm's UNet ({why})",
                path.display()
            )
        }
    }
    Ok(())
}

fn unet_config(v: &Value, path: &Path) -> Result<([usize; 3], UNetConfig)> {
    let class = get(v, "_class_name").and_then(Value::as_str).unwrap_or("");
    if class != "UNet2DModel" {
        bail!(
            "{}: _class_name = {class:?}; gm reads UNet2DModel folders (unconditional pixel-space DDPMs)",
            path.display()
        )
    }
    use serde_json::json;
    expect(v, "act_fn", &[json!("silu")], path, "SiLU only")?;
    expect(
        v,
        "time_embedding_type",
        &[json!("positional")],
        path,
        "sinusoidal time features only",
    )?;
    expect(
        v,
        "center_input_sample",
        &[json!(false)],
        path,
        "inputs as given",
    )?;
    expect(
        v,
        "resnet_time_scale_shift",
        &[json!("default")],
        path,
        "the time embedding is added, not a scale-shift",
    )?;
    expect(
        v,
        "downsample_type",
        &[json!("conv")],
        path,
        "strided-convolution downsampling",
    )?;
    expect(
        v,
        "upsample_type",
        &[json!("conv")],
        path,
        "nearest + convolution upsampling",
    )?;
    expect(v, "downsample_padding", &[json!(1)], path, "padding 1")?;
    expect(
        v,
        "mid_block_scale_factor",
        &[json!(1), json!(1.0)],
        path,
        "scale 1",
    )?;
    expect(
        v,
        "norm_eps",
        &[json!(1e-5), json!(0.00001)],
        path,
        "GroupNorm ε = 1e-5",
    )?;
    expect(
        v,
        "mid_block_type",
        &[json!("UNetMidBlock2D")],
        path,
        "the standard middle block",
    )?;
    expect(v, "class_embed_type", &[], path, "no class embedding")?;
    expect(
        v,
        "num_class_embeds",
        &[],
        path,
        "unconditional models only",
    )?;
    let c_in = usize_of(v, "in_channels", path)?.unwrap_or(3);
    let c_out = usize_of(v, "out_channels", path)?.unwrap_or(3);
    if c_in != c_out {
        bail!(
            "{}: in_channels = {c_in} and out_channels = {c_out} differ (a learned variance?); gm's DDPM predicts one value per input channel",
            path.display()
        )
    }
    let (h, w) = match get(v, "sample_size") {
        Some(Value::Number(n)) => {
            let s = n.as_u64().unwrap_or(0) as usize;
            (s, s)
        }
        Some(Value::Array(a)) if a.len() == 2 => (
            a[0].as_u64().unwrap_or(0) as usize,
            a[1].as_u64().unwrap_or(0) as usize,
        ),
        other => bail!(
            "{}: sample_size = {other:?}: gm needs the image size",
            path.display()
        ),
    };
    let boc: Vec<usize> = get(v, "block_out_channels")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|n| n as usize)
                .collect()
        })
        .unwrap_or_else(|| vec![224, 448, 672, 896]);
    let base = boc[0];
    if let Some(c) = boc.iter().find(|&&c| c % base != 0) {
        bail!(
            "{}: block_out_channels = {boc:?}: {c} is not a multiple of the first level's {base} (gm's channel_mult)",
            path.display()
        )
    }
    let strs = |key: &str| -> Vec<String> {
        get(v, key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let down = strs("down_block_types");
    let up = strs("up_block_types");
    if down.len() != boc.len() || up.len() != boc.len() {
        bail!(
            "{}: {} down and {} up block types for {} levels of block_out_channels",
            path.display(),
            down.len(),
            up.len(),
            boc.len()
        )
    }
    let mut attention_levels = vec![];
    for (l, d) in down.iter().enumerate() {
        let u = &up[boc.len() - 1 - l];
        let attn = match d.as_str() {
            "DownBlock2D" => false,
            "AttnDownBlock2D" => true,
            other => bail!(
                "{}: down_block_types[{l}] = {other:?}: gm's UNet has DownBlock2D and AttnDownBlock2D",
                path.display()
            ),
        };
        let up_attn = match u.as_str() {
            "UpBlock2D" => false,
            "AttnUpBlock2D" => true,
            other => bail!(
                "{}: up_block_types[{}] = {other:?}: gm's UNet has UpBlock2D and AttnUpBlock2D",
                path.display(),
                boc.len() - 1 - l
            ),
        };
        if attn != up_attn {
            bail!(
                "{}: level {l} has attention on one path only ({d} / {u}); gm's UNet puts it on both",
                path.display()
            )
        }
        if attn {
            attention_levels.push(l);
        }
    }
    let groups = usize_of(v, "norm_num_groups", path)?.unwrap_or(32);
    if let Some(g) = usize_of(v, "attn_norm_num_groups", path)? {
        if g != groups {
            bail!(
                "{}: attn_norm_num_groups = {g} differs from norm_num_groups = {groups}",
                path.display()
            )
        }
    }
    let mid_attention = get(v, "add_attention")
        .map(|x| x.as_bool().unwrap_or(true))
        .unwrap_or(true);
    // UNet2DModel's default head size is 8; an explicit null means one head per block.
    let head_dim = match v.get("attention_head_dim") {
        None => 8,
        Some(Value::Null) => 0,
        Some(x) => x.as_u64().ok_or_else(|| {
            anyhow!(
                "{}: attention_head_dim = {x}: gm needs one head size",
                path.display()
            )
        })? as usize,
    };
    let unet = UNetConfig {
        base_channels: base,
        channel_mult: boc.iter().map(|c| c / base).collect(),
        num_res_blocks: usize_of(v, "layers_per_block", path)?.unwrap_or(2),
        attention_levels,
        mid_attention,
        groups,
        time_embed_dim: usize_of(v, "time_embedding_dim", path)?.unwrap_or(0),
        head_dim,
        flip_sin_to_cos: get(v, "flip_sin_to_cos")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        freq_shift: get(v, "freq_shift").and_then(Value::as_f64).unwrap_or(0.0),
    };
    let shape = [c_in, h, w];
    unet.validate(shape)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok((shape, unet))
}

fn scheduler_config(v: &Value, path: &Path) -> Result<(ScheduleConfig, Prediction, SamplerConfig)> {
    let bad = |key: &str, why: &str| -> anyhow::Error {
        anyhow!(
            "{}: {key} = {}: {why}",
            path.display(),
            get(v, key).cloned().unwrap_or(Value::Null)
        )
    };
    if get(v, "trained_betas").is_some() {
        return Err(bad(
            "trained_betas",
            "gm's schedules are linear or cosine (squaredcos_cap_v2)",
        ));
    }
    let f = |key: &str, default: f64| get(v, key).and_then(Value::as_f64).unwrap_or(default);
    let schedule = ScheduleConfig {
        schedule: match get(v, "beta_schedule")
            .and_then(Value::as_str)
            .unwrap_or("linear")
        {
            "linear" => BetaSchedule::Linear,
            "squaredcos_cap_v2" => BetaSchedule::Cosine,
            _ => {
                return Err(bad(
                    "beta_schedule",
                    "gm has linear and squaredcos_cap_v2 (cosine)",
                ))
            }
        },
        timesteps: get(v, "num_train_timesteps")
            .and_then(Value::as_u64)
            .unwrap_or(1000) as usize,
        beta_start: f("beta_start", 1e-4),
        beta_end: f("beta_end", 0.02),
        cosine_s: 0.008,
    };
    let prediction = match get(v, "prediction_type")
        .and_then(Value::as_str)
        .unwrap_or("epsilon")
    {
        "epsilon" => Prediction::Epsilon,
        "sample" => Prediction::Sample,
        "v_prediction" => Prediction::V,
        _ => {
            return Err(bad(
                "prediction_type",
                "gm has epsilon, sample and v_prediction",
            ))
        }
    };
    for key in ["thresholding", "rescale_betas_zero_snr"] {
        if get(v, key).and_then(Value::as_bool) == Some(true) {
            return Err(bad(key, "not in gm's samplers"));
        }
    }
    if f("clip_sample_range", 1.0) != 1.0 {
        return Err(bad("clip_sample_range", "gm clips to [-1, 1]"));
    }
    let class = get(v, "_class_name")
        .and_then(Value::as_str)
        .unwrap_or("DDPMScheduler");
    let kind = match class {
        "DDPMScheduler" => SamplerKind::Ddpm,
        "DPMSolverMultistepScheduler" => SamplerKind::Dpmpp2m,
        "UniPCMultistepScheduler" => SamplerKind::Unipc,
        "EulerDiscreteScheduler" => SamplerKind::EulerKarras,
        "HeunDiscreteScheduler" => SamplerKind::HeunKarras,
        _ => SamplerKind::Ddim,
    };
    let spacing = match get(v, "timestep_spacing").and_then(Value::as_str) {
        Some("linspace") => Spacing::Linspace,
        Some("trailing") => Spacing::Trailing,
        // diffusers' default for DDPM and DDIM.
        Some("leading") | None => Spacing::Leading,
        Some(_) => {
            return Err(bad(
                "timestep_spacing",
                "gm has linspace, leading, trailing",
            ))
        }
    };
    let sampler = SamplerConfig {
        kind,
        steps: if kind == SamplerKind::Ddpm {
            schedule.timesteps
        } else {
            50
        },
        spacing,
        steps_offset: get(v, "steps_offset").and_then(Value::as_u64).unwrap_or(0) as usize,
        clip_sample: get(v, "clip_sample")
            .and_then(Value::as_bool)
            .unwrap_or(kind != SamplerKind::Dpmpp2m && kind != SamplerKind::Unipc),
        large_variance: get(v, "variance_type").and_then(Value::as_str) == Some("fixed_large"),
        ..Default::default()
    };
    if let Some(t) = get(v, "variance_type").and_then(Value::as_str) {
        if !matches!(t, "fixed_small" | "fixed_large") {
            return Err(bad("variance_type", "gm has fixed_small and fixed_large"));
        }
    }
    if class == "DDIMScheduler"
        && get(v, "set_alpha_to_one").and_then(Value::as_bool) == Some(false)
    {
        return Err(bad(
            "set_alpha_to_one",
            "gm's DDIM ends at ᾱ = 1 (set_alpha_to_one = true)",
        ));
    }
    Ok((schedule, prediction, sampler))
}

fn take(raw: &mut HashMap<String, Tensor>, name: &str, path: &Path) -> Result<Tensor> {
    Ok(raw
        .remove(name)
        .ok_or_else(|| anyhow!("{}: no tensor '{name}'", path.display()))?
        .to_dtype(DType::F32)?)
}

/// diffusers' tensor names → gm's (`to_q/to_k/to_v` become one `qkv` 1×1 convolution, the
/// attention's linear layers 1×1 convolutions); a tensor left over is an error.
fn rename(
    mut raw: HashMap<String, Tensor>,
    unet: &UNetConfig,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let raw = &mut raw;
    let mut out = HashMap::new();
    // Weight and bias of one layer.
    let mut layer = |raw: &mut HashMap<String, Tensor>, from: &str, to: &str| -> Result<()> {
        for p in ["weight", "bias"] {
            out.insert(
                format!("{to}.{p}"),
                take(raw, &format!("{from}.{p}"), path)?,
            );
        }
        Ok(())
    };
    layer(raw, "time_embedding.linear_1", "time_embed.0")?;
    layer(raw, "time_embedding.linear_2", "time_embed.2")?;
    layer(raw, "conv_in", "conv_in")?;
    layer(raw, "conv_norm_out", "norm_out")?;
    layer(raw, "conv_out", "conv_out")?;
    let levels = unet.channel_mult.len();
    let mut res = vec![];
    let mut attn = vec![];
    for l in 0..levels {
        let u = levels - 1 - l;
        let has_attn = unet.attention_levels.contains(&l);
        for i in 0..unet.num_res_blocks {
            res.push((
                format!("down_blocks.{l}.resnets.{i}"),
                format!("down.{l}.res.{i}"),
            ));
            if has_attn {
                attn.push((
                    format!("down_blocks.{l}.attentions.{i}"),
                    format!("down.{l}.attn.{i}"),
                ));
            }
        }
        for i in 0..=unet.num_res_blocks {
            res.push((
                format!("up_blocks.{u}.resnets.{i}"),
                format!("up.{l}.res.{i}"),
            ));
            if has_attn {
                attn.push((
                    format!("up_blocks.{u}.attentions.{i}"),
                    format!("up.{l}.attn.{i}"),
                ));
            }
        }
        if l + 1 < levels {
            let from = format!("down_blocks.{l}.downsamplers.0.conv");
            layer(raw, &from, &format!("down.{l}.downsample"))?;
        }
        if l > 0 {
            let from = format!("up_blocks.{u}.upsamplers.0.conv");
            layer(raw, &from, &format!("up.{l}.upsample"))?;
        }
    }
    res.push(("mid_block.resnets.0".into(), "mid.res1".into()));
    res.push(("mid_block.resnets.1".into(), "mid.res2".into()));
    if unet.mid_attention {
        attn.push(("mid_block.attentions.0".into(), "mid.attn".into()));
    }
    for (from, to) in &res {
        for (a, b) in [
            ("norm1", "norm1"),
            ("conv1", "conv1"),
            ("time_emb_proj", "temb_proj"),
            ("norm2", "norm2"),
            ("conv2", "conv2"),
        ] {
            layer(raw, &format!("{from}.{a}"), &format!("{to}.{b}"))?;
        }
        // A shortcut exists where the channels change.
        if raw.contains_key(&format!("{from}.conv_shortcut.weight")) {
            layer(raw, &format!("{from}.conv_shortcut"), &format!("{to}.skip"))?;
        }
    }
    let conv = |t: Tensor| -> Result<Tensor> {
        let (o, i) = t.dims2()?;
        Ok(t.reshape((o, i, 1, 1))?)
    };
    for (from, to) in &attn {
        let mut get = |k: &str| take(raw, &format!("{from}.{k}"), path);
        let norm = (get("group_norm.weight")?, get("group_norm.bias")?);
        let qkv_w = Tensor::cat(
            &[
                get("to_q.weight")?,
                get("to_k.weight")?,
                get("to_v.weight")?,
            ],
            0,
        )?;
        let qkv_b = Tensor::cat(
            &[get("to_q.bias")?, get("to_k.bias")?, get("to_v.bias")?],
            0,
        )?;
        let proj = (get("to_out.0.weight")?, get("to_out.0.bias")?);
        out.insert(format!("{to}.norm.weight"), norm.0);
        out.insert(format!("{to}.norm.bias"), norm.1);
        out.insert(format!("{to}.qkv.weight"), conv(qkv_w)?);
        out.insert(format!("{to}.qkv.bias"), qkv_b);
        out.insert(format!("{to}.proj.weight"), conv(proj.0)?);
        out.insert(format!("{to}.proj.bias"), proj.1);
    }
    if let Some(extra) = raw.keys().min() {
        bail!(
            "{}: tensor '{extra}' (and {} more) has no place in gm's UNet (a config this reader does not know?)",
            path.display(),
            raw.len() - 1
        )
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(config: Value, tensors: &[(&str, &[usize])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&map, dir.path().join(WEIGHTS)).unwrap();
        dir
    }

    fn small() -> Value {
        serde_json::json!({
            "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
            "layers_per_block": 1, "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"], "attention_head_dim": 8
        })
    }

    #[test]
    fn what_gm_cannot_express_is_named() {
        for (key, value) in [
            ("resnet_time_scale_shift", serde_json::json!("scale_shift")),
            ("num_class_embeds", serde_json::json!(10)),
            ("act_fn", serde_json::json!("gelu")),
            ("out_channels", serde_json::json!(2)),
            ("block_out_channels", serde_json::json!([8, 12])),
            (
                "up_block_types",
                serde_json::json!(["AttnUpBlock2D", "UpBlock2D"]),
            ),
        ] {
            let mut c = small();
            c[key] = value;
            let d = folder(c, &[]);
            let e = import(d.path()).err().expect("an error").to_string();
            assert!(
                e.contains(key) || e.contains("attention on one path"),
                "{key}: {e}"
            );
            assert!(e.contains("config.json"), "{e}");
        }
        let mut c = small();
        c["_class_name"] = "UNet2DConditionModel".into();
        let e = import(folder(c, &[]).path()).err().unwrap().to_string();
        assert!(e.contains("UNet2DConditionModel"), "{e}");
    }

    #[test]
    fn a_missing_tensor_or_folder_is_named() {
        let d = folder(small(), &[("conv_in.weight", &[8, 1, 3, 3])]);
        let e = import(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("no tensor 'time_embedding.linear_1.weight'"),
            "{e}"
        );
        assert!(e.contains(WEIGHTS), "{e}");
        let e = import(Path::new("/nonexistent")).err().unwrap().to_string();
        assert!(e.contains("not a diffusers model folder"), "{e}");
    }
}

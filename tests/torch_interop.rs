//! gm ⇄ PyTorch: a gm checkpoint loads into `scripts/vae_torch.py` and gives the same ELBO on the
//! same batch and noise, and a PyTorch-saved safetensors loads into gm likewise.
//!
//! Needs a Python with torch and safetensors: `$GM_PYTHON`, else `.venv/bin/python`, else
//! `python3`. Without one the test says so and passes; `.ci/run` installs torch so CI runs it.

use gm::candle::{DType, Device, Tensor};
use gm::candle_nn::{VarBuilder, VarMap};
use gm::vae::{Arch, Likelihood, Vae, VaeConfig};
use gm::GmRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> Option<String> {
    let mut cands = vec![];
    if let Ok(p) = std::env::var("GM_PYTHON") {
        cands.push(p);
    }
    cands.push(root().join(".venv/bin/python").display().to_string());
    cands.push("python3".into());
    cands.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import torch, safetensors"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

fn torch_elbo(py: &str, cfg: &str, weights: &Path, batch: &Path) -> Vec<f64> {
    let out = Command::new(py)
        .arg(root().join("scripts/vae_torch.py"))
        .args(["elbo", "--config", cfg, "--weights"])
        .arg(weights)
        .arg("--batch")
        .arg(batch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vae_torch.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes named tensors as a safetensors file.
fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) {
    std::fs::write(
        path,
        gm::checkpoint::to_safetensors(tensors, &HashMap::new()).unwrap(),
    )
    .unwrap();
}

/// Writes every parameter of `vm` under its PyTorch name.
fn write_params(path: &Path, vm: &VarMap) {
    let named: HashMap<String, Tensor> = gm::optim::named_vars(vm)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    write_tensors(path, &named);
}

fn build(cfg: &VaeConfig) -> (VarMap, Vae) {
    let vm = VarMap::new();
    let vae = Vae::new(
        cfg.clone(),
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    (vm, vae)
}

#[test]
fn gm_and_pytorch_agree_on_the_elbo_both_ways() {
    let Some(py) = python() else {
        eprintln!("SKIPPED: no python with torch and safetensors (set GM_PYTHON)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let configs = [
        VaeConfig {
            arch: Arch::Mlp,
            hidden: vec![64, 32],
            latent_dim: 6,
            ..Default::default()
        },
        VaeConfig {
            arch: Arch::Conv,
            hidden: vec![48],
            channels: [4, 8],
            latent_dim: 5,
            ..Default::default()
        },
        VaeConfig {
            likelihood: Likelihood::Gaussian,
            hidden: vec![40],
            latent_dim: 3,
            beta: 2.0,
            ..Default::default()
        },
        VaeConfig {
            likelihood: Likelihood::Gaussian,
            decoder_std: Some(0.3),
            hidden: vec![40],
            ..Default::default()
        },
    ];
    for (i, cfg) in configs.iter().enumerate() {
        let json = serde_json::to_string(cfg).unwrap();
        let mut rng = GmRng::new(i as u64);
        let p = rng.uniform((5, 1, 28, 28), 0.0, 1.0, &Device::Cpu).unwrap();
        let x = rng.bernoulli(&p).unwrap().to_dtype(DType::F64).unwrap();
        let eps = rng
            .randn((5, cfg.latent_dim), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let batch = tmp.path().join(format!("batch{i}.safetensors"));
        let tensors = HashMap::from([
            ("x".to_string(), x.clone()),
            ("eps".to_string(), eps.clone()),
        ]);
        write_tensors(&batch, &tensors);

        // gm → PyTorch: save gm's (randomly initialised) weights, evaluate in both.
        let (vm, vae) = build(cfg);
        let w = tmp.path().join(format!("gm{i}.safetensors"));
        write_params(&w, &vm);
        let ours = vae
            .elbo_with_noise(&x, &eps)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let theirs = torch_elbo(&py, &json, &w, &batch);
        assert_eq!(theirs.len(), 5);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() < 1e-4,
                "config {i}, gm→torch: gm {a} vs torch {b}"
            );
        }

        // PyTorch → gm: PyTorch initialises and saves; gm loads strictly by name.
        let tw = tmp.path().join(format!("torch{i}.safetensors"));
        let st = Command::new(&py)
            .arg(root().join("scripts/vae_torch.py"))
            .args(["init", "--config", &json, "--seed", "7", "--out"])
            .arg(&tw)
            .status()
            .unwrap();
        assert!(st.success());
        let (vm2, vae2) = build(cfg);
        let loaded = gm::checkpoint::read_safetensors(&tw, &Device::Cpu).unwrap();
        gm::trainer::set_vars(&vm2, &loaded.tensors, "", &tw, true).unwrap();
        let ours = vae2
            .elbo_with_noise(&x, &eps)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let theirs = torch_elbo(&py, &json, &tw, &batch);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() < 1e-4,
                "config {i}, torch→gm: gm {a} vs torch {b}"
            );
        }
        assert!(ours.iter().all(|v| v.is_finite() && *v < 0.0));
    }
}

/// gm's PixelCNN and Gated PixelCNN weights, loaded into `scripts/pixelcnn_torch.py` by name,
/// give the same exact NLL per image (f64): Bernoulli and 256-level outputs, with and without
/// class conditioning.
#[test]
fn gm_and_pytorch_agree_on_autoregressive_nll() {
    use gm::ar::PixelOutput;
    use gm::gated_pixelcnn::GatedPixelCnnConfig;
    use gm::pixelcnn::PixelCnnConfig;
    use gm::{Batch, EvalOptions, ModelConfig};
    let Some(py) = python() else {
        eprintln!("SKIPPED: no python with torch and safetensors (set GM_PYTHON)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shape = [1, 9, 11];
    let configs = [
        ModelConfig::PixelCnn(PixelCnnConfig {
            image_shape: shape,
            channels: 8,
            res_blocks: 2,
            head_channels: 6,
            ..Default::default()
        }),
        ModelConfig::PixelCnn(PixelCnnConfig {
            image_shape: shape,
            channels: 6,
            res_blocks: 1,
            head_channels: 5,
            output: PixelOutput::Categorical,
            num_classes: 3,
            ..Default::default()
        }),
        ModelConfig::GatedPixelCnn(GatedPixelCnnConfig {
            image_shape: shape,
            channels: 5,
            layers: 3,
            kernel: 5,
            num_classes: 3,
            ..Default::default()
        }),
        ModelConfig::GatedPixelCnn(GatedPixelCnnConfig {
            image_shape: shape,
            channels: 4,
            layers: 2,
            output: PixelOutput::Categorical,
            ..Default::default()
        }),
    ];
    for (i, cfg) in configs.iter().enumerate() {
        let vm = VarMap::new();
        let vb = gm::gm_core::rng::seeded_var_builder(&vm, i as u64, DType::F64, &Device::Cpu);
        let model = cfg.build(vb).unwrap();
        let mut rng = GmRng::new(i as u64);
        let p = rng.uniform((4, 1, 9, 11), 0.0, 1.0, &Device::Cpu).unwrap();
        let x = match cfg.pixel_data() {
            gm::PixelData::Levels => ((p * 255.0).unwrap().round().unwrap() / 255.0).unwrap(),
            _ => rng.bernoulli(&p).unwrap(),
        }
        .to_dtype(DType::F64)
        .unwrap();
        let labels = Tensor::new(&[0u32, 2, 1, 2], &Device::Cpu).unwrap();
        let batch = tmp.path().join(format!("ar-batch{i}.safetensors"));
        let tensors = HashMap::from([
            ("x".to_string(), x.clone()),
            ("labels".to_string(), labels.to_dtype(DType::F64).unwrap()),
        ]);
        write_tensors(&batch, &tensors);
        let w = tmp.path().join(format!("ar-gm{i}.safetensors"));
        write_params(&w, &vm);
        let m = model
            .eval_metrics(
                &Batch {
                    x,
                    labels: Some(labels),
                },
                &mut rng,
                &EvalOptions::default(),
            )
            .unwrap();
        let ours = m[0]
            .1
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let out = Command::new(&py)
            .arg(root().join("scripts/pixelcnn_torch.py"))
            .args(["nll", "--config", &serde_json::to_string(cfg).unwrap()])
            .arg("--weights")
            .arg(&w)
            .arg("--batch")
            .arg(&batch)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pixelcnn_torch.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(theirs.len(), 4);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-8, "{}: gm {a} vs torch {b}", cfg.kind());
            assert!(*a > 0.0);
        }
    }
}

/// gm's UNet and `scripts/unet_torch.py` (same names) compute the same output in f64 from the
/// same weights — every parameter perturbed, so GroupNorm's affine and the class embedding count.
#[test]
fn gm_and_pytorch_agree_on_the_unet() {
    use gm::gm_models::unet::{UNet, UNetConfig};
    let Some(py) = python() else {
        eprintln!("SKIPPED: no python with torch and safetensors (set GM_PYTHON)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = UNetConfig {
        base_channels: 8,
        channel_mult: vec![1, 2, 2],
        num_res_blocks: 2,
        attention_levels: vec![1, 2],
        mid_attention: true,
        groups: 4,
        time_embed_dim: 24,
    };
    let vm = VarMap::new();
    let vb = gm::gm_core::rng::seeded_var_builder(&vm, 3, DType::F64, &Device::Cpu);
    let net = UNet::new(&cfg, 2, 2, 3, vb).unwrap();
    let mut rng = GmRng::new(4);
    for v in vm.all_vars() {
        let noise = rng
            .randn(v.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        v.set(&(v.as_tensor() + (noise * 0.1).unwrap()).unwrap())
            .unwrap();
    }
    let x = rng
        .randn((3, 2, 12, 8), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let t = Tensor::new(&[3f64, 500.0, 999.0], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 3, 2], &Device::Cpu).unwrap();
    let ours: Vec<f64> = net
        .forward(&x, &t, Some(&labels))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let batch = tmp.path().join("unet-batch.safetensors");
    write_tensors(
        &batch,
        &HashMap::from([
            ("x".to_string(), x),
            ("t".to_string(), t),
            ("labels".to_string(), labels.to_dtype(DType::F64).unwrap()),
        ]),
    );
    let w = tmp.path().join("unet.safetensors");
    write_params(&w, &vm);
    let model = serde_json::json!({
        "kind": "ddpm", "image_shape": [2, 12, 8], "num_classes": 3,
        "unet": serde_json::to_value(&cfg).unwrap(),
    })
    .to_string();
    let out = Command::new(&py)
        .arg(root().join("scripts/unet_torch.py"))
        .args(["forward", "--config", &model, "--weights"])
        .arg(&w)
        .arg("--batch")
        .arg(&batch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unet_torch.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-9, "gm vs PyTorch UNet: max |Δ| = {worst}");
}

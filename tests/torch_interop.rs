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
        std::fs::write(
            &batch,
            gm::checkpoint::to_safetensors(&tensors, &HashMap::new()).unwrap(),
        )
        .unwrap();

        // gm → PyTorch: save gm's (randomly initialised) weights, evaluate in both.
        let (vm, vae) = build(cfg);
        let w = tmp.path().join(format!("gm{i}.safetensors"));
        let named: HashMap<String, Tensor> = gm::optim::named_vars(&vm)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        std::fs::write(
            &w,
            gm::checkpoint::to_safetensors(&named, &HashMap::new()).unwrap(),
        )
        .unwrap();
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

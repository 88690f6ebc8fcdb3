//! gm ⇄ PyTorch: a gm checkpoint loads into `scripts/vae_torch.py` and gives the same ELBO on the
//! same batch and noise, and a PyTorch-saved safetensors loads into gm likewise.
//!
//! Needs a Python with torch and safetensors: `$GM_PYTHON`, else `.venv/bin/python`, else
//! `python3`. Without one the test says so and passes (fails under `GM_REQUIRE_PEERS=1`, as `.ci/run`
//! sets); `scripts/test.sh` installs torch.

use gm::candle::{DType, Device, Tensor};
use gm::candle_nn::{VarBuilder, VarMap};
use gm::vae::{Arch, Likelihood, Vae, VaeConfig};
use gm::GmRng;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

mod common;
use common::{peer_python, root};

fn python() -> Option<String> {
    peer_python("torch, safetensors")
}

fn torch_elbo(py: &str, cfg: &str, weights: &Path, batch: &Path) -> Vec<f64> {
    let args = [
        "elbo".as_ref(),
        "--config".as_ref(),
        cfg.as_ref(),
        "--weights".as_ref(),
    ];
    torch_elbo_with(
        py,
        &[
            &args[..],
            &[weights.as_os_str(), "--batch".as_ref(), batch.as_os_str()],
        ]
        .concat(),
    )
}

/// `scripts/vae_torch.py ARGS`: the per-image ELBO it prints.
fn torch_elbo_with(py: &str, args: &[&std::ffi::OsStr]) -> Vec<f64> {
    let out = Command::new(py)
        .arg(root().join("scripts/vae_torch.py"))
        .args(args)
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
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shape = [1, 9, 11];
    let configs = [
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            channels: 8,
            res_blocks: 2,
            head_channels: 6,
            ..Default::default()
        }),
        ModelConfig::new(PixelCnnConfig {
            image_shape: shape,
            channels: 6,
            res_blocks: 1,
            head_channels: 5,
            output: PixelOutput::Categorical,
            num_classes: 3,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
            image_shape: shape,
            channels: 5,
            layers: 3,
            kernel: 5,
            num_classes: 3,
            ..Default::default()
        }),
        ModelConfig::new(GatedPixelCnnConfig {
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
        ..Default::default()
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

/// Runs `scripts/flows_torch.py forward` on gm's weights and batch: PyTorch's `−log p(x)`.
fn torch_flow_nll(
    py: &str,
    model: &serde_json::Value,
    vm: &VarMap,
    batch: HashMap<String, Tensor>,
) -> Vec<f64> {
    let tmp = tempfile::tempdir().unwrap();
    let (w, b) = (
        tmp.path().join("w.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    write_params(&w, vm);
    write_tensors(&b, &batch);
    let out = Command::new(py)
        .arg(root().join("scripts/flows_torch.py"))
        .args(["forward", "--config", &model.to_string(), "--weights"])
        .arg(&w)
        .arg("--batch")
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flows_torch.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every parameter of `vm` moved by `N(0, 0.1²)` (couplings start at zero: perturb them all).
fn perturb(vm: &VarMap, seed: u64) {
    let mut rng = GmRng::new(seed);
    let mut vars = gm::optim::named_vars(vm);
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in vars {
        let noise = (rng.randn(v.shape(), &Device::Cpu).unwrap() * 0.1)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
}

fn assert_close(what: &str, ours: &[f64], theirs: &[f64], tol: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < tol,
        "{what}: max |Δ| = {worst} ({ours:?} vs {theirs:?})"
    );
}

/// RealNVP: gm's exact `−log p(x)` (logit, couplings, ActNorm, squeeze, factor-out, 8-bit offset)
/// equals `scripts/flows_torch.py`'s on the same weights and images, in f64.
#[test]
fn gm_and_pytorch_agree_on_realnvp_likelihoods() {
    use gm::gm_models::realnvp::{RealNvp, RealNvpConfig};
    let Some(py) = python() else {
        return;
    };
    for cfg in [
        RealNvpConfig {
            image_shape: [1, 8, 8],
            num_scales: 3,
            hidden: 6,
            num_blocks: 2,
            ..Default::default()
        },
        RealNvpConfig {
            image_shape: [2, 1, 1],
            num_couplings: 5,
            hidden: 8,
            num_blocks: 1,
            actnorm: false,
            ..Default::default()
        },
    ] {
        let vm = VarMap::new();
        let flow = RealNvp::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        perturb(&vm, 8);
        let [c, h, w] = cfg.image_shape;
        let mut rng = GmRng::new(2);
        let x = if cfg.is_vector() {
            rng.randn((4, c, h, w), &Device::Cpu).unwrap()
        } else {
            rng.uniform((4, c, h, w), 0.0, 1.0, &Device::Cpu).unwrap()
        }
        .to_dtype(DType::F64)
        .unwrap();
        let ours = flow.nll_nats(&x).unwrap().to_vec1::<f64>().unwrap();
        let mut model = serde_json::to_value(&cfg).unwrap();
        model["kind"] = "realnvp".into();
        let theirs = torch_flow_nll(&py, &model, &vm, HashMap::from([("x".to_string(), x)]));
        assert_close(
            &format!("RealNVP {:?}", cfg.image_shape),
            &ours,
            &theirs,
            1e-8,
        );
    }
}

/// CNF: gm's likelihood through 6 RK4 steps — forward-mode trace — equals PyTorch's with the
/// autograd (vector–Jacobian) trace: exact on 2-D points, Hutchinson with the same probe on a
/// squeezed image (plain, with the element-wise affine, and with residual hidden layers).
#[test]
fn gm_and_pytorch_agree_on_cnf_likelihoods() {
    use gm::gm_core::cnf::Divergence;
    use gm::gm_core::ode::SolverConfig;
    use gm::gm_models::ffjord::{solve_log_prob, Activation, Cnf, CnfConfig};
    use gm::gm_models::flow::eight_bit_offset;
    let Some(py) = python() else {
        return;
    };
    let steps = 6;
    let image = CnfConfig {
        image_shape: [1, 4, 4],
        hidden: vec![5],
        activation: Activation::Softplus,
        squeeze: 1,
        divergence: Divergence::Rademacher,
        ..Default::default()
    };
    for cfg in [
        CnfConfig {
            image_shape: [2, 1, 1],
            hidden: vec![8, 8],
            ..Default::default()
        },
        image.clone(),
        CnfConfig {
            element_norm: true,
            ..image.clone()
        },
        CnfConfig {
            hidden: vec![5, 5, 5],
            residual: true,
            ..image
        },
    ] {
        let vm = VarMap::new();
        let cnf = Cnf::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let [c, h, w] = cfg.image_shape;
        let mut rng = GmRng::new(5);
        // A non-trivial element-wise affine.
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.starts_with("norm.") {
                let r = rng.randn(var.shape(), &Device::Cpu).unwrap();
                var.set(&(r * 0.5).unwrap().to_dtype(DType::F64).unwrap())
                    .unwrap();
            }
        }
        let mut batch = HashMap::new();
        let ours = if cfg.is_vector() {
            let x = rng
                .randn((3, c, h, w), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let s = cnf
                .nll(
                    &x,
                    &SolverConfig::rk4(steps),
                    Divergence::Exact,
                    &mut rng,
                    false,
                )
                .unwrap();
            batch.insert("x".to_string(), x);
            s.log_prob.to_vec1::<f64>().unwrap()
        } else {
            let x = rng
                .uniform((3, c, h, w), 0.0, 1.0, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            // The same Rademacher probe on both sides.
            let (z0, ld) = cnf.to_state(&x).unwrap();
            let probe = gm::gm_core::cnf::draw_probe(Divergence::Rademacher, &z0, &mut rng)
                .unwrap()
                .unwrap();
            let s = solve_log_prob(
                cnf.net(),
                &z0,
                cfg.time_length,
                &SolverConfig::rk4(steps),
                Divergence::Rademacher,
                Some(&probe),
                false,
            )
            .unwrap();
            batch.insert("x".to_string(), x);
            batch.insert("probe".to_string(), probe);
            let nll = (s.log_prob + ld)
                .unwrap()
                .affine(-1.0, eight_bit_offset(c * h * w))
                .unwrap();
            nll.to_vec1::<f64>().unwrap()
        };
        batch.insert(
            "steps".to_string(),
            Tensor::new(&[steps as f64], &Device::Cpu).unwrap(),
        );
        let mut model = serde_json::to_value(&cfg).unwrap();
        model["kind"] = "cnf".into();
        let theirs = torch_flow_nll(&py, &model, &vm, batch);
        assert_close(&format!("CNF {:?}", cfg.image_shape), &ours, &theirs, 1e-8);
    }
}

/// gm's VQ-VAE and `scripts/vqvae_torch.py` (same names) agree in f64 from the same weights on
/// the reconstruction, the commitment and the prior's NLL of every image, and so on both stages'
/// losses.
#[test]
fn gm_and_pytorch_agree_on_the_vqvae() {
    use gm::vqvae::{Stage, VqVaeConfig};
    use gm::{Batch, EvalOptions};
    let Some(py) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = VqVaeConfig {
        image_shape: [1, 8, 12],
        hidden: 6,
        res_blocks: 2,
        embedding_dim: 3,
        codebook_size: 5,
        beta: 0.3,
        ..Default::default()
    };
    cfg.prior.code_embedding = 4;
    cfg.prior.channels = 6;
    cfg.prior.layers = 3;
    cfg.prior.first_kernel = 3;
    cfg.prior.head_channels = 5;
    let vm = VarMap::new();
    let vb = gm::gm_core::rng::seeded_var_builder(&vm, 21, DType::F64, &Device::Cpu);
    let prior_cfg = VqVaeConfig {
        stage: Stage::Prior,
        ..cfg.clone()
    };
    let prior_model = gm::ModelConfig::new(prior_cfg).build(vb).unwrap();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let ae_model = gm::ModelConfig::new(cfg.clone()).build(vb).unwrap();
    let mut rng = GmRng::new(22);
    let p = rng.uniform((4, 1, 8, 12), 0.0, 1.0, &Device::Cpu).unwrap();
    let x = rng.bernoulli(&p).unwrap().to_dtype(DType::F64).unwrap();
    let batch_path = tmp.path().join("vq-batch.safetensors");
    write_tensors(&batch_path, &HashMap::from([("x".to_string(), x.clone())]));
    let w = tmp.path().join("vq-gm.safetensors");
    write_params(&w, &vm);
    let out = Command::new(&py)
        .arg(root().join("scripts/vqvae_torch.py"))
        .args(["loss", "--config", &serde_json::to_string(&cfg).unwrap()])
        .arg("--weights")
        .arg(&w)
        .arg("--batch")
        .arg(&batch_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vqvae_torch.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let col = |k: &str| -> Vec<f64> {
        theirs[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let batch = Batch { x, labels: None };
    let m = prior_model
        .eval_metrics(&batch, &mut rng, &EvalOptions::default())
        .unwrap();
    let get = |name: &str| -> Vec<f64> {
        m.iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .to_vec1::<f64>()
            .unwrap()
    };
    for (name, key) in [("recon_nats", "recon"), ("prior_nats", "prior")] {
        for (a, b) in get(name).iter().zip(col(key)) {
            assert!((a - b).abs() < 1e-9, "{name}: gm {a} vs torch {b}");
        }
    }
    let loss = ae_model.loss(&batch, &mut rng).unwrap();
    let part = |n: &str| -> f64 {
        loss.parts
            .iter()
            .find(|(k, _)| *k == n)
            .unwrap()
            .1
            .to_scalar::<f64>()
            .unwrap()
    };
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    assert!((part("recon") - mean(col("recon"))).abs() < 1e-9);
    assert!((part("commit") - 0.3 * mean(col("commit"))).abs() < 1e-9);
    let total = loss.total.to_scalar::<f64>().unwrap();
    assert!((total - mean(col("recon")) - 0.3 * mean(col("commit"))).abs() < 1e-9);
}

/// gm's KID and precision/recall/density/coverage equal the peers' own code (torchmetrics'
/// `poly_mmd`, the `prdc` package) on the same features: two clusters of real points, samples
/// that cover one of them and stray off it.
#[test]
fn kid_and_prdc_match_torchmetrics_and_prdc() {
    let Some(py) = peer_python("torchmetrics, prdc") else {
        return;
    };
    let mut rng = GmRng::new(5);
    let (n, d) = (300, 16);
    // Real: two clusters (±2 in every coordinate); fake: the +2 cluster, a third of it at +3.
    let mut set = |centre: &dyn Fn(usize) -> f64| {
        let z = rng.normal_vec_f64(n * d);
        nalgebra::DMatrix::from_fn(n, d, |i, j| centre(i) + z[i * d + j])
    };
    let real = set(&|i| if i % 2 == 0 { 2.0 } else { -2.0 });
    let fake = set(&|i| if i % 3 == 0 { 3.0 } else { 2.0 });
    let rows = |m: &nalgebra::DMatrix<f64>| -> Vec<Vec<f64>> {
        m.row_iter().map(|r| r.iter().copied().collect()).collect()
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("features.json");
    let k = gm::eval::PRDC_K;
    std::fs::write(
        &file,
        serde_json::json!({"fake": rows(&fake), "real": rows(&real), "k": k}).to_string(),
    )
    .unwrap();
    let want = common::run_script_json(&py, "sample_metrics_peer.py", &[file.as_os_str()]);
    let (kid, kid_se) = gm::eval::kid(&fake, &real);
    let (p, r, dens, cov) = gm::eval::prdc(&fake, &real, k);
    eprintln!("gm: kid {kid} ± {kid_se}, precision {p}, recall {r}, density {dens}, coverage {cov}; peers: {want}");
    let kid_peer = want["kid"].as_f64().unwrap();
    assert!(
        (kid - kid_peer).abs() <= 1e-9 * kid_peer.abs().max(1.0),
        "kid {kid} vs torchmetrics {kid_peer}"
    );
    assert!(
        kid > 10.0 * kid_se,
        "the shifted samples are far: kid {kid} ± {kid_se}"
    );
    for (name, v) in [
        ("precision", p),
        ("recall", r),
        ("density", dens),
        ("coverage", cov),
    ] {
        let w = want[name].as_f64().unwrap();
        assert!((v - w).abs() < 1e-12, "{name}: gm {v}, prdc {w}");
    }
    // Half the real points (one cluster) have no sample near them.
    assert!(r < 0.75 && cov < 0.75, "recall {r}, coverage {cov}");
}

/// A folder from `gm export` (EMA weights, config.json) loads by name into the PyTorch twin and
/// gives gm's ELBO; gm reads the same folder as a checkpoint.
#[test]
fn exported_folder_loads_into_the_pytorch_twin() {
    let Some(py) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_idx(&data, 128, 32);
    let cfg = common::tiny_vae_config(&[
        "train.steps=8",
        "train.batch_size=16",
        "train.ema_decay=0.9",
        "train.checkpoint_every=8",
        "train.eval_every=0",
        "train.sample_every=0",
    ]);
    let run = tmp.path().join("run");
    gm::train(
        &cfg,
        &gm::TrainOptions {
            out: run.clone(),
            device: Device::Cpu,
            data_dir: Some(data.clone()),
            resume: false,
            progress: false,
            init_from: None,
        },
    )
    .unwrap();
    let dir = tmp.path().join("vae-tiny-export");
    let e = gm::export::export(
        &run,
        &dir,
        &gm::export::ExportOptions {
            data_dir: Some(data.clone()),
            eval_images: Some(16),
            samples: 16,
            device: Device::Cpu,
        },
    )
    .unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "README.md",
        "samples.png",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: gm\n") && card.contains("bits/dim"),
        "{card}"
    );
    assert!(e.eval.unwrap()["n_images"] == 16.0);
    // The folder holds the run's evaluation weights (the EMA's), byte for byte as tensors.
    let folder =
        gm::checkpoint::read_safetensors(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let ckpt = gm::checkpoint::read_safetensors(
        &run.join("checkpoints/step-00000008.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(folder.tensors.len(), ckpt.tensors.len());
    for (k, t) in &ckpt.tensors {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = folder.tensors[k]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{k}");
    }
    assert_eq!(folder.meta["format"], "pt");
    // gm reads the folder as a checkpoint.
    let loaded = gm::load_checkpoint(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.step, 8);
    // The PyTorch twin, given only the folder's name, computes gm's ELBO (f64 on both sides).
    let vcfg: VaeConfig = loaded.built.cfg.model.get::<VaeConfig>().unwrap().clone();
    let (vm, vae) = build(&vcfg);
    let f64s: HashMap<String, Tensor> = folder
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F64).unwrap()))
        .collect();
    gm::trainer::set_vars(&vm, &f64s, "", &dir, true).unwrap();
    let mut rng = GmRng::new(3);
    let p = rng.uniform((4, 1, 28, 28), 0.0, 1.0, &Device::Cpu).unwrap();
    let x = rng.bernoulli(&p).unwrap().to_dtype(DType::F64).unwrap();
    let eps = rng
        .randn((4, vcfg.latent_dim), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let batch = tmp.path().join("batch.safetensors");
    write_tensors(
        &batch,
        &HashMap::from([
            ("x".to_string(), x.clone()),
            ("eps".to_string(), eps.clone()),
        ]),
    );
    let ours = vae
        .elbo_with_noise(&x, &eps)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let args = [
        "elbo".as_ref(),
        "--model".as_ref(),
        dir.as_os_str(),
        "--batch".as_ref(),
        batch.as_os_str(),
    ];
    let theirs = torch_elbo_with(&py, &args);
    assert_eq!(theirs.len(), 4);
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() < 1e-4, "gm {a} vs torch {b}");
    }
}

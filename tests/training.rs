//! The trainer's promises: exact resume, checkpoint round trips, NaN stops, falling loss.

mod common;

use gm::candle::{DType, Device, Tensor};
use gm::{load_checkpoint, train, GmRng, TrainOptions};
use std::path::Path;

fn opts(out: &Path, data: &Path, resume: bool) -> TrainOptions {
    TrainOptions {
        out: out.into(),
        device: Device::Cpu,
        data_dir: Some(data.into()),
        resume,
        progress: false,
        init_from: None,
    }
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let l = gm::checkpoint::read_safetensors(path, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = l
        .tensors
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_idx(&data, 256, 64);
    for ema in ["0.0", "0.9"] {
        let cfg = common::tiny_vae_config(&[
            "train.steps=16",
            "train.batch_size=32",
            "train.checkpoint_every=8",
            "train.eval_every=0",
            "train.sample_every=0",
            "train.keep_last=5",
            &format!("train.ema_decay={ema}"),
        ]);
        let a = tmp.path().join(format!("a{ema}"));
        let full = train(&cfg, &opts(&a, &data, false)).unwrap();
        // "Kill" run b after step 8: copy a's directory and drop everything after step 8.
        let b = tmp.path().join(format!("b{ema}"));
        std::fs::create_dir_all(b.join("checkpoints")).unwrap();
        std::fs::copy(a.join("config.toml"), b.join("config.toml")).unwrap();
        for f in [
            "step-00000008.safetensors",
            "step-00000008.state.safetensors",
        ] {
            std::fs::copy(a.join("checkpoints").join(f), b.join("checkpoints").join(f)).unwrap();
        }
        // The killed run had logged past its checkpoint; resuming drops those lines.
        std::fs::copy(a.join("metrics.jsonl"), b.join("metrics.jsonl")).unwrap();
        let resumed = train(&cfg, &opts(&b, &data, true)).unwrap();
        // (step, split): a training line and a test-evaluation line may share a step.
        let logged: Vec<(u64, String)> = std::fs::read_to_string(b.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    v["split"].as_str().unwrap_or("train").to_string(),
                )
            })
            .collect();
        let mut unique = logged.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            logged.len(),
            unique.len(),
            "ema {ema}: a line is logged twice after resume: {logged:?}"
        );
        assert_eq!(
            logged,
            vec![
                (10, "train".into()),
                (16, "train".into()),
                (16, "test".into())
            ]
        );
        assert_eq!(resumed.losses.len(), 8);
        assert_eq!(
            &full.losses[8..],
            &resumed.losses[..],
            "ema {ema}: losses after resume differ"
        );
        for f in [
            "step-00000016.safetensors",
            "step-00000016.state.safetensors",
        ] {
            assert_eq!(
                weights(&a.join("checkpoints").join(f)),
                weights(&b.join("checkpoints").join(f)),
                "ema {ema}: {f} differs"
            );
        }
    }
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs_and_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_idx(&data, 256, 64);
    let cfg = common::tiny_vae_config(&[
        "train.steps=40",
        "train.batch_size=32",
        "train.eval_every=20",
    ]);
    let run = tmp.path().join("run");
    let s = train(&cfg, &opts(&run, &data, false)).unwrap();
    let head: f64 = s.losses[..5].iter().map(|l| l.1).sum::<f64>() / 5.0;
    let tail: f64 = s.losses[35..].iter().map(|l| l.1).sum::<f64>() / 5.0;
    assert!(tail < 0.7 * head, "loss did not fall: {head} -> {tail}");
    assert!(run.join("metrics.jsonl").is_file() && run.join("loss_curve.png").is_file());
    assert!(run.join("checkpoints/best.safetensors").is_file());
    assert!(run.join("samples/step-00000040.png").is_file());
    assert!(run.join("samples/recon-step-00000040.png").is_file());

    // The same seed gives the same run.
    let again = train(&cfg, &opts(&tmp.path().join("again"), &data, false)).unwrap();
    assert_eq!(s.losses, again.losses);

    let a = load_checkpoint(&run, &Device::Cpu).unwrap();
    let b = load_checkpoint(&s.checkpoint, &Device::Cpu).unwrap();
    assert_eq!(a.step, 40);
    let x = GmRng::new(5)
        .bernoulli(&Tensor::full(0.3f32, (4, 1, 28, 28), &Device::Cpu).unwrap())
        .unwrap();
    let batch = gm::Batch { x, labels: None };
    let la = a
        .built
        .model
        .loss(&batch, &mut GmRng::new(1))
        .unwrap()
        .total
        .to_scalar::<f32>()
        .unwrap();
    let lb = b
        .built
        .model
        .loss(&batch, &mut GmRng::new(1))
        .unwrap()
        .total
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(la, lb);
    let sa = a
        .built
        .model
        .sample(3, &mut GmRng::new(2))
        .unwrap()
        .unwrap();
    let sb = b
        .built
        .model
        .sample(3, &mut GmRng::new(2))
        .unwrap()
        .unwrap();
    assert_eq!(
        sa.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        sb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // The resolved config in the checkpoint rebuilds exactly the configured model.
    assert_eq!(a.built.cfg, cfg);
    assert_eq!(a.meta["gm.kind"], "vae");
}

#[test]
fn non_finite_loss_stops_with_step_part_and_kept_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_idx(&data, 64, 16);
    // An absurd learning rate blows the weights up after the first update.
    let cfg = common::tiny_vae_config(&[
        "train.steps=10",
        "train.batch_size=16",
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.schedule=\"constant\"",
        "train.checkpoint_every=1",
        "train.eval_every=0",
        "train.sample_every=0",
    ]);
    let run = tmp.path().join("run");
    let err = train(&cfg, &opts(&run, &data, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
    assert!(err.contains("step 2"), "{err}");
    assert!(err.contains("step-00000001.safetensors"), "{err}");
    // The last good checkpoint still loads and gives finite outputs.
    let ck = load_checkpoint(&run, &Device::Cpu).unwrap();
    assert_eq!(ck.step, 1);
    let _ = DType::F32;
}

#[test]
fn bad_checkpoint_files_are_named_in_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.safetensors");
    std::fs::write(&p, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let e = load_checkpoint(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("x.safetensors"), "{e}");
}

fn cnf_config(extra: &[&str]) -> gm::RunConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cnf-tiny.toml");
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    gm::RunConfig::load(&path, &overrides).unwrap()
}

#[test]
fn data_init_sets_the_element_norm_and_init_from_starts_a_fresh_run_from_those_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_idx(&data, 128, 32);
    let quiet = [
        "model.element_norm=true",
        "train.steps=4",
        "train.checkpoint_every=4",
        "train.eval_every=0",
        "train.sample_every=0",
    ];
    // Stage 1: flow matching, from the data-initialised affine.
    let fm = cnf_config(&[&quiet[..], &["model.objective=flow-matching"]].concat());
    let a = tmp.path().join("fm");
    let s = train(&fm, &opts(&a, &data, false)).unwrap();
    assert!(s.losses.iter().all(|l| l.1.is_finite()));
    let wa = weights(&s.checkpoint);
    let shift = &wa.iter().find(|(n, _)| n == "norm.shift").unwrap().1;
    let log_scale = &wa.iter().find(|(n, _)| n == "norm.log_scale").unwrap().1;
    // Four Adam steps of 1e-3 cannot move a parameter far from its start: these came from the
    // data (logits of dequantised pixels lie in about ±3; their spreads are not 1).
    let mean_shift = shift.iter().map(|v| v.abs()).sum::<f32>() / shift.len() as f32;
    let mean_log = log_scale.iter().map(|v| v.abs()).sum::<f32>() / log_scale.len() as f32;
    assert!(
        mean_shift > 0.1 && mean_log > 0.1,
        "{mean_shift} {mean_log}"
    );

    // Stage 2: likelihood training starts from stage 1's weights, not from a fresh draw.
    let mle = cnf_config(&[&quiet[..], &["train.steps=1", "train.lr=1e-9"]].concat());
    let b = tmp.path().join("mle");
    let mut o = opts(&b, &data, false);
    o.init_from = Some(a.clone());
    let sb = train(&mle, &o).unwrap();
    for ((na, va), (nb, vb)) in wa.iter().zip(weights(&sb.checkpoint)) {
        assert_eq!(na, &nb);
        let d = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-6, "{na} moved by {d}");
    }

    // Parameters that do not fit are named.
    let wide = cnf_config(&[&quiet[..], &["model.hidden=[9]"]].concat());
    let mut o = opts(&tmp.path().join("wide"), &data, false);
    o.init_from = Some(a.clone());
    let e = format!("{:#}", train(&wide, &o).expect_err("shape mismatch"));
    assert!(
        e.contains("has shape") && e.contains("step-00000004"),
        "{e}"
    );
    // And a checkpoint of another kind is refused.
    let mut o = opts(&tmp.path().join("vae"), &data, false);
    o.init_from = Some(a);
    let e = format!(
        "{:#}",
        train(&common::tiny_vae_config(&[]), &o).expect_err("kind mismatch")
    );
    assert!(
        e.contains("'cnf' checkpoint cannot start a 'vae' model"),
        "{e}"
    );
}

/// TensorBoard's own reader (the `tensorboard` package) finds every scalar gm logged, each step
/// once after an interrupted run is resumed, and the sample grids at their sizes.
#[test]
fn tensorboard_reads_the_scalars_and_images_gm_logged_once_after_resume() {
    let Some(py) = common::peer_python("tensorboard") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_idx(&data, 256, 64);
    let cfg = common::tiny_vae_config(&[
        "train.steps=16",
        "train.batch_size=32",
        "train.log_every=2",
        "train.checkpoint_every=8",
        "train.eval_every=8",
        "train.eval_images=64",
        "train.sample_every=8",
        "train.sample_n=16",
        "train.keep_last=5",
        "train.tensorboard=true",
    ]);
    let a = tmp.path().join("a");
    train(&cfg, &opts(&a, &data, false)).unwrap();
    // Run b was killed after logging step 16 but checkpointing only step 8.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(b.join("checkpoints")).unwrap();
    for f in std::fs::read_dir(&a).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("events.out.tfevents.")
            || name == "config.toml"
            || name == "metrics.jsonl"
        {
            std::fs::copy(&p, b.join(&name)).unwrap();
        }
    }
    for f in [
        "step-00000008.safetensors",
        "step-00000008.state.safetensors",
    ] {
        std::fs::copy(a.join("checkpoints").join(f), b.join("checkpoints").join(f)).unwrap();
    }
    train(&cfg, &opts(&b, &data, true)).unwrap();
    let events = std::fs::read_dir(&b)
        .unwrap()
        .filter(|f| {
            let n = f.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(events, 2, "the resumed run writes its own event file");
    let tb = common::run_script_json(&py, "tb_read.py", &[b.as_os_str()]);
    // What metrics.jsonl holds after the resume, as (tag, step) -> value.
    let mut want = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let step = v["step"].as_u64().unwrap();
        let split = v["split"].as_str().unwrap_or("train");
        for (k, x) in v.as_object().unwrap() {
            if let (Some(x), false) = (x.as_f64(), ["step", "elapsed_s"].contains(&k.as_str())) {
                want.insert((format!("{split}/{k}"), step), x);
            }
        }
    }
    let scalars = tb["scalars"].as_object().unwrap();
    let mut seen = 0;
    for ((tag, step), x) in &want {
        let pts = scalars.get(tag).unwrap_or_else(|| {
            panic!(
                "TensorBoard has no scalar {tag}; it has {:?}",
                scalars.keys()
            )
        });
        let at: Vec<f64> = pts
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p[0].as_u64() == Some(*step))
            .map(|p| p[1].as_f64().unwrap())
            .collect();
        assert_eq!(at.len(), 1, "{tag} at step {step}: {at:?} (each step once)");
        // As f32, what event files hold (serde_json's parse may differ from Python's
        // shortest repr in the last bit of an f64).
        assert_eq!(at[0] as f32, *x as f32, "{tag} at step {step}");
        seen += 1;
    }
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "test/bits_per_dim",
    ] {
        assert!(
            want.keys().any(|(t, _)| t == tag),
            "metrics.jsonl lacks {tag}"
        );
    }
    let loss_steps: Vec<u64> = scalars["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(loss_steps, (1..=8).map(|i| 2 * i).collect::<Vec<u64>>());
    assert!(scalars["train/it_per_s"].as_array().unwrap().len() >= 8);
    assert!(seen > 20, "only {seen} scalars compared");
    for (tag, file) in [("samples", "step"), ("reconstructions", "recon-step")] {
        let imgs = tb["images"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no images {tag}"));
        let steps: Vec<u64> = imgs.iter().map(|i| i[0].as_u64().unwrap()).collect();
        assert_eq!(steps, [8, 16], "{tag}");
        let (w, h) =
            image::image_dimensions(b.join(format!("samples/{file}-00000016.png"))).unwrap();
        assert_eq!(
            (imgs[1][1].as_u64().unwrap(), imgs[1][2].as_u64().unwrap()),
            (w as u64, h as u64),
            "{tag}"
        );
    }
}

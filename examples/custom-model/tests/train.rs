//! A family gm does not know, registered at run time, trained through `gm::train` like gm's own:
//! the loss falls, the evaluation reports its likelihood in bits per dimension, the checkpoint
//! rebuilds the model, and a resumed run ends where the uninterrupted one did.

use gm::candle::Device;
use gm::{Family, RunConfig, TrainOptions};
use gm_example_custom_model::PixelsConfig;
use std::path::Path;

/// 256 training and 64 test images: pixel `i` is on with probability `(i mod 7) / 8`.
fn data(dir: &Path) {
    let mut rng = gm::GmRng::new(5);
    for (split, n) in [("train", 256usize), ("t10k", 64)] {
        let px: Vec<u8> = (0..n * 784)
            .map(
                |i| match rng.uniform_vec(1, 0.0, 1.0)[0] < (i % 784 % 7) as f32 / 8.0 {
                    true => 255,
                    false => 0,
                },
            )
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        gm::fetch::write_idx_gz(
            &dir.join(format!("{split}-images-idx3-ubyte.gz")),
            &[n, 28, 28],
            &px,
        )
        .unwrap();
        gm::fetch::write_idx_gz(
            &dir.join(format!("{split}-labels-idx1-ubyte.gz")),
            &[n],
            &labels,
        )
        .unwrap();
    }
}

const CONFIG: &str = r#"
[model]
kind = "independent-bernoulli"
image_shape = [1, 28, 28]

[data]
binarize = "static"

[train]
batch_size = 32
steps = 60
lr = 0.1
eval_every = 30
checkpoint_every = 30
sample_every = 60
sample_n = 16
eval_images = 64
log_every = 10
"#;

#[test]
fn a_registered_family_trains_evaluates_and_resumes() {
    gm::register::<PixelsConfig>().unwrap();
    // Registering the same family again is harmless; another family under its kind is refused.
    gm::register::<PixelsConfig>().unwrap();
    assert!(gm::kinds().contains(&PixelsConfig::KIND));

    let t = tempfile::tempdir().unwrap();
    data(t.path());
    let cfg = RunConfig::from_toml_str(CONFIG, &[], "custom.toml").unwrap();
    assert_eq!(cfg.model.kind(), "independent-bernoulli");
    assert!(cfg.model.get::<PixelsConfig>().is_some());
    // The config round-trips through the TOML every run directory and checkpoint holds.
    assert_eq!(
        RunConfig::from_toml_str(&cfg.to_toml(), &[], "again").unwrap(),
        cfg
    );

    let opts = |out: &Path, resume: bool| TrainOptions {
        out: out.to_path_buf(),
        device: Device::Cpu,
        data_dir: Some(t.path().to_path_buf()),
        resume,
        progress: false,
        init_from: None,
    };
    let run = t.path().join("run");
    let s = gm::train(&cfg, &opts(&run, false)).unwrap();
    let (first, last) = (s.losses[0].1, s.losses.last().unwrap().1);
    // Uniform pixels cost 784 ln 2 = 543 nats; the fitted marginals far less.
    assert!((first - 784.0 * 2f64.ln()).abs() < 1e-3, "{first}");
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let eval = s.last_eval.expect("a test split");
    let bpd = eval["bits_per_dim"];
    assert!(bpd > 0.0 && bpd < 0.8, "{eval:?}");
    assert!(run.join("samples/step-00000060.png").exists());

    // The checkpoint alone rebuilds the model.
    let ck = gm::load_checkpoint(&run, &Device::Cpu).unwrap();
    assert_eq!(ck.built.model.kind(), "independent-bernoulli");

    // Resumed from step 30, the run ends where the uninterrupted one did.
    let again = t.path().join("again");
    std::fs::create_dir_all(again.join("checkpoints")).unwrap();
    std::fs::copy(run.join("config.toml"), again.join("config.toml")).unwrap();
    for f in [
        "step-00000030.safetensors",
        "step-00000030.state.safetensors",
    ] {
        std::fs::copy(
            run.join("checkpoints").join(f),
            again.join("checkpoints").join(f),
        )
        .unwrap();
    }
    gm::train(&cfg, &opts(&again, true)).unwrap();
    let a = std::fs::read(run.join("checkpoints/step-00000060.safetensors")).unwrap();
    let b = std::fs::read(again.join("checkpoints/step-00000060.safetensors")).unwrap();
    assert!(a == b, "the resumed run's final weights differ");
}

/// A kind gm already has cannot be taken by another family.
#[test]
fn a_taken_kind_is_refused() {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Impostor {}
    impl Family for Impostor {
        const KIND: &'static str = "vae";
        fn data(&self) -> gm::DataShape {
            gm::DataShape::Image([1, 28, 28])
        }
        fn build(&self, _vb: gm::candle_nn::VarBuilder) -> gm::candle::Result<Box<dyn gm::Model>> {
            gm::candle::bail!("never built")
        }
    }
    let e = gm::register::<Impostor>().unwrap_err();
    assert!(e.contains("'vae' is already registered"), "{e}");
}

//! The Trainer's parts and hooks, through the library as research code uses them.

use candle_core::{backprop::GradStore, Device};
use gm_train::hooks::{GradAction, Hook, StepContext};
use gm_train::trainer::Trainer;
use gm_train::{RunConfig, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// 64 training and 16 test images of noise, with labels.
fn idx_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = gm_core::GmRng::new(3);
    for (split, n) in [("train", 64usize), ("t10k", 16)] {
        let px: Vec<u8> = (0..n * 784).map(|_| (rng.next_u64() % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 4) as u8).collect();
        let f = |k: &str| {
            dir.join(format!(
                "{split}-{k}-idx{}-ubyte.gz",
                if k == "images" { 3 } else { 1 }
            ))
        };
        gm_train::fetch::write_idx_gz(&f("images"), &[n, 28, 28], &px).unwrap();
        gm_train::fetch::write_idx_gz(&f("labels"), &[n], &labels).unwrap();
    }
    dir.to_path_buf()
}

fn tiny_vae(sets: &[&str]) -> RunConfig {
    let sets: Vec<String> = [
        "train.eval_every=0",
        "train.sample_every=0",
        "train.checkpoint_every=0",
        "train.eval_images=16",
        "train.batch_size=16",
    ]
    .iter()
    .chain(sets)
    .map(|s| s.to_string())
    .collect();
    RunConfig::load(&root().join("models/vae-tiny.toml"), &sets).unwrap()
}

fn options(out: &Path, data: &Path) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        device: Device::Cpu,
        data_dir: Some(data.to_path_buf()),
        resume: false,
        progress: false,
        init_from: None,
    }
}

/// What a recording hook saw.
#[derive(Default)]
struct Seen {
    losses: Vec<usize>,
    backward: Vec<(usize, usize)>,
    steps: Vec<usize>,
}

struct Recorder {
    seen: Arc<Mutex<Seen>>,
    skip: bool,
}

impl Hook for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn after_loss(
        &mut self,
        ctx: &StepContext,
        _loss: &gm_train::hooks::LossValues,
    ) -> anyhow::Result<()> {
        self.seen.lock().unwrap().losses.push(ctx.step);
        Ok(())
    }
    fn after_backward(
        &mut self,
        ctx: &StepContext,
        grads: &mut GradStore,
    ) -> anyhow::Result<GradAction> {
        let with_grad = ctx
            .vars
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
            .count();
        self.seen
            .lock()
            .unwrap()
            .backward
            .push((ctx.step, with_grad));
        Ok(if self.skip {
            GradAction::Skip
        } else {
            GradAction::Step
        })
    }
    fn after_step(&mut self, ctx: &StepContext) -> anyhow::Result<()> {
        self.seen.lock().unwrap().steps.push(ctx.step);
        Ok(())
    }
}

/// A hook added by research code is called at every point of every step, sees every
/// parameter's gradient, and can skip the optimizer: skipped steps leave the weights as they were.
#[test]
fn research_code_hooks_see_every_step_and_can_skip_updates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    for skip in [false, true] {
        let cfg = tiny_vae(&["train.steps=3"]);
        let out = tmp.path().join(format!("run-{skip}"));
        let mut trainer = Trainer::new(&cfg, &options(&out, &data)).unwrap();
        let before: Vec<Vec<f32>> = trainer
            .vars()
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let n_vars = trainer.vars().len();
        let seen = Arc::new(Mutex::new(Seen::default()));
        trainer.add_hook(Box::new(Recorder {
            seen: seen.clone(),
            skip,
        }));
        let after_run = trainer.vars().to_vec();
        let summary = trainer.run().unwrap();
        assert_eq!(summary.losses.len(), 3);
        let s = seen.lock().unwrap();
        assert_eq!(s.losses, vec![1, 2, 3]);
        assert_eq!(s.steps, vec![1, 2, 3]);
        assert_eq!(s.backward, vec![(1, n_vars), (2, n_vars), (3, n_vars)]);
        let changed = after_run
            .iter()
            .zip(&before)
            .filter(|((_, v), b)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap() != **b)
            .count();
        if skip {
            assert_eq!(changed, 0, "a skipped step changed weights");
        } else {
            assert_eq!(changed, n_vars, "every parameter moves in three Adam steps");
        }
    }
}

/// The parts run one at a time give what `run` gives: the same losses and checkpoint bytes.
#[test]
fn parts_one_at_a_time_equal_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    let cfg = tiny_vae(&["train.steps=4", "train.ema_decay=0.9"]);
    let a = tmp.path().join("a");
    let summary = Trainer::new(&cfg, &options(&a, &data))
        .unwrap()
        .run()
        .unwrap();
    let b = tmp.path().join("b");
    let mut t = Trainer::new(&cfg, &options(&b, &data)).unwrap();
    let losses: Vec<f64> = (0..4).map(|s| t.step(s).unwrap().loss).collect();
    assert_eq!(
        losses,
        summary.losses.iter().map(|l| l.1).collect::<Vec<_>>()
    );
    let m = t.evaluate().unwrap().expect("a test split");
    assert!(m["elbo_nats"].is_finite());
    // The run kept gm.best from its final evaluation; the tensors must agree bit for bit.
    let (wp, _) = t.save(4).unwrap();
    let read = |p: &Path| gm_train::checkpoint::read_safetensors(p, &Device::Cpu).unwrap();
    let (mine, theirs) = (read(&wp), read(&summary.checkpoint));
    assert_eq!(mine.tensors.len(), theirs.tensors.len());
    for (name, t) in &mine.tensors {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = theirs.tensors[name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(a == b, "tensor {name} differs");
    }
    assert_eq!(mine.meta["gm.ema"], "true");
}

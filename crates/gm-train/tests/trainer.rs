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

/// Captures each step's gradients (after accumulation, before clipping) and losses.
struct GradTap {
    grads: Arc<Mutex<Vec<Vec<Vec<f32>>>>>,
}

impl Hook for GradTap {
    fn name(&self) -> &'static str {
        "grad-tap"
    }
    fn after_backward(
        &mut self,
        ctx: &StepContext,
        grads: &mut GradStore,
    ) -> anyhow::Result<GradAction> {
        let g = ctx
            .vars
            .iter()
            .map(|(_, v)| match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
                None => vec![],
            })
            .collect();
        self.grads.lock().unwrap().push(g);
        Ok(GradAction::Step)
    }
}

/// The largest difference between two steps' gradients, and the largest magnitude in `b`.
fn grad_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let scale = b.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff, scale)
}

fn tapped_run(cfg: &RunConfig, out: &Path, data: &Path) -> (Vec<f64>, Vec<Vec<Vec<f32>>>) {
    let grads = Arc::new(Mutex::new(Vec::new()));
    let mut t = Trainer::new(cfg, &options(out, data)).unwrap();
    t.add_hook(Box::new(GradTap {
        grads: grads.clone(),
    }));
    let s = t.run().unwrap();
    let g = grads.lock().unwrap().clone();
    (s.losses.iter().map(|l| l.1).collect(), g)
}

/// `train.accumulate = k` with micro-batches of b gives the gradient (and loss) of one batch of
/// k·b, to f32 round-off, at every step: MADE and PixelCNN (a deterministic loss on statically
/// binarised images; the micro-batches are the large batch's images in order), and with
/// per-sample random draws the VAE (dynamic binarisation, the reparameterisation noise) and the
/// DDPM UNet (timesteps, noise).
#[test]
fn accumulated_micro_batches_equal_one_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    for (preset, extra) in [
        ("made-tiny", "data.binarize=\"static\""),
        ("pixelcnn-tiny", "data.binarize=\"static\""),
        ("vae-tiny", "train.rng=\"per-sample\""),
        ("ddpm-tiny", "train.rng=\"per-sample\""),
    ] {
        let cfg = |sets: &[&str]| {
            let base = [
                "train.steps=3",
                "train.eval_every=0",
                "train.sample_every=0",
                "train.checkpoint_every=0",
                "train.eval_images=16",
                extra,
            ];
            let all: Vec<String> = base.iter().chain(sets).map(|s| s.to_string()).collect();
            RunConfig::load(&root().join(format!("models/{preset}.toml")), &all).unwrap()
        };
        let (la, ga) = tapped_run(
            &cfg(&["train.batch_size=8", "train.accumulate=4"]),
            &tmp.path().join(format!("{preset}-acc")),
            &data,
        );
        let (lb, gb) = tapped_run(
            &cfg(&["train.batch_size=32"]),
            &tmp.path().join(format!("{preset}-big")),
            &data,
        );
        assert_eq!(ga.len(), 3);
        for (a, b) in la.iter().zip(&lb) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{preset}: loss {a} vs {b}");
        }
        for (step, (a, b)) in ga.iter().zip(&gb).enumerate() {
            let (diff, scale) = grad_diff(a, b);
            assert!(scale > 0.0);
            assert!(
                diff <= 2e-5 * scale,
                "{preset} step {}: gradients differ by {diff} (largest {scale})",
                step + 1
            );
        }
    }
}

/// `train.gradient_checkpointing` recomputes the UNet's and the PixelCNNs' blocks in the
/// backward and gives the gradients of the plain run at every step: to the bit for the
/// PixelCNNs (the same ops in the same order), to f32 round-off for the UNet models (its
/// skips and time embedding sum their gradients in another order). Every parameter gets one,
/// the Gated PixelCNN's first layer (whose inputs are the images) included. A model without
/// checkpointed blocks is refused by name.
#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    let cfg = |preset: &str, on: bool| {
        let sets = [
            "train.steps=3".to_string(),
            "train.eval_every=0".into(),
            "train.sample_every=0".into(),
            "train.checkpoint_every=0".into(),
            "train.eval_images=16".into(),
            format!("train.gradient_checkpointing={on}"),
        ];
        RunConfig::load(&root().join(format!("models/{preset}.toml")), &sets).unwrap()
    };
    for (preset, tol) in [
        ("pixelcnn-tiny", 0.0),
        ("gated-pixelcnn-cond-tiny", 0.0),
        ("ddpm-tiny", 1e-5),
        ("flow-matching-tiny", 1e-5),
    ] {
        let (la, ga) = tapped_run(
            &cfg(preset, true),
            &tmp.path().join(format!("{preset}-ck")),
            &data,
        );
        let (lb, gb) = tapped_run(
            &cfg(preset, false),
            &tmp.path().join(format!("{preset}-plain")),
            &data,
        );
        assert_eq!(ga.len(), 3);
        for (a, b) in la.iter().zip(&lb) {
            assert!((a - b).abs() <= tol * b.abs(), "{preset}: loss {a} vs {b}");
        }
        for (step, (a, b)) in ga.iter().zip(&gb).enumerate() {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    !x.is_empty() && x.len() == y.len(),
                    "{preset} step {}: parameter {i} got no gradient",
                    step + 1
                );
            }
            let (diff, scale) = grad_diff(a, b);
            assert!(
                diff <= tol as f32 * scale,
                "{preset} step {}: gradients differ by {diff} (largest {scale})",
                step + 1
            );
        }
    }
    let err = Trainer::new(
        &cfg("vae-tiny", true),
        &options(&tmp.path().join("vae"), &data),
    )
    .err()
    .expect("a VAE has no blocks to recompute");
    assert!(
        format!("{err:#}").contains("train.gradient_checkpointing: a 'vae' model"),
        "{err:#}"
    );
}

fn weights(run: &Path, step: usize) -> Vec<u8> {
    let p = run.join(format!("checkpoints/step-{step:08}.safetensors"));
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; {:?}",
            p.display(),
            std::fs::read_dir(run.join("checkpoints"))
                .map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
        )
    })
}

/// f16 with a loss scale far too large: the first steps overflow, are skipped and halve the
/// scale until the gradients fit; training then goes on with finite weights and falling loss, and
/// a resume from the middle (with accumulation on) ends on the same bytes as the whole run.
#[test]
fn f16_loss_scaling_survives_a_forced_overflow_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    let sets = [
        "train.steps=60",
        "train.checkpoint_every=30",
        "train.log_every=1",
        "train.precision=\"f16\"",
        "train.loss_scale=1e12",
        "train.accumulate=2",
        "train.batch_size=8",
    ];
    let cfg = tiny_vae(&sets);
    let a = tmp.path().join("a");
    let s = Trainer::new(&cfg, &options(&a, &data))
        .unwrap()
        .run()
        .unwrap();
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["loss_scale"].is_number())
        .collect();
    let last = recs.last().unwrap();
    let skipped = last["skipped_steps"].as_u64().unwrap();
    let scale = last["loss_scale"].as_f64().unwrap();
    // 1e12 · 0.5^k must come below f16's range (65504) over the gradients: many skips, then
    // steps that train.
    assert!((20..50).contains(&skipped), "{skipped} skipped steps");
    assert!((1.0..1e12 / 1e6).contains(&scale), "scale {scale}");
    assert!(recs.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
    let first = s.losses[0].1;
    let end = s.losses.last().unwrap().1;
    assert!(end < first, "loss did not fall: {first} -> {end}");
    let meta = gm_train::checkpoint::read_meta(&s.checkpoint).unwrap();
    assert_eq!(meta["gm.ema"], "false");
    let st =
        gm_train::checkpoint::read_meta(&a.join("checkpoints/step-00000060.state.safetensors"))
            .unwrap();
    assert_eq!(st["gm.loss_scale"].parse::<f64>().unwrap(), scale);

    // Resume from step 30.
    let b = tmp.path().join("b");
    let mut cut = tiny_vae(&sets);
    cut.train.steps = 30;
    Trainer::new(&cut, &options(&b, &data))
        .unwrap()
        .run()
        .unwrap();
    let mut again = options(&b, &data);
    again.resume = true;
    Trainer::new(&cfg, &again).unwrap().run().unwrap();
    assert!(
        weights(&a, 60) == weights(&b, 60),
        "resumed f16 run differs"
    );
}

/// bf16 autocast: the VAE's matrix products run in bf16 (counted), its loss follows f32's
/// closely and it learns.
#[test]
fn bf16_trains_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    let run = |p: &str| {
        let cfg = tiny_vae(&["train.steps=30", &format!("train.precision=\"{p}\"")]);
        gm_core::precision::reset_counts();
        let s = Trainer::new(&cfg, &options(&tmp.path().join(p), &data))
            .unwrap()
            .run()
            .unwrap();
        (s.losses, gm_core::precision::counts())
    };
    let (f32_losses, f32_counts) = run("f32");
    let (bf16_losses, bf16_counts) = run("bf16");
    assert!(f32_counts.is_empty(), "{f32_counts:?}");
    assert!(
        bf16_counts.get(&("matmul", "bf16")).copied().unwrap_or(0) > 0,
        "{bf16_counts:?}"
    );
    assert!(
        !bf16_counts.keys().any(|(_, d)| *d == "f32"),
        "{bf16_counts:?}"
    );
    for ((_, a), (_, b)) in f32_losses.iter().zip(&bf16_losses) {
        assert!((a - b).abs() <= 0.02 * a.abs(), "bf16 loss {b} vs f32 {a}");
    }
    assert!(bf16_losses.last().unwrap().1 < bf16_losses[0].1);
}

fn tensors(path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    gm_train::checkpoint::read_safetensors(path, &Device::Cpu)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Data parallel on CPU threads: 2 ranks × batch 8 (and 4 ranks × 4) end on the parameters of 1
/// rank × batch 16 after several steps, to f32 round-off, for the VAE and the DDPM UNet (per-sample
/// draws keyed by the global index); rank 0 alone wrote the run directory, and its log holds
/// every rank's loss.
#[test]
fn data_parallel_ranks_equal_one_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    for preset in ["vae-tiny", "ddpm-tiny"] {
        let cfg = |b: usize| {
            let sets: Vec<String> = [
                "train.steps=4".to_string(),
                "train.eval_every=0".into(),
                "train.sample_every=0".into(),
                "train.checkpoint_every=0".into(),
                "train.eval_images=16".into(),
                "train.log_every=1".into(),
                "train.rng=\"per-sample\"".into(),
                format!("train.batch_size={b}"),
            ]
            .into();
            RunConfig::load(&root().join(format!("models/{preset}.toml")), &sets).unwrap()
        };
        let one = tmp.path().join(format!("{preset}-1"));
        let base = Trainer::new(&cfg(16), &options(&one, &data))
            .unwrap()
            .run()
            .unwrap();
        let want = tensors(&base.checkpoint);
        for world in [2usize, 4] {
            let out = tmp.path().join(format!("{preset}-{world}"));
            let s =
                gm_train::parallel::train_threads(&cfg(16 / world), &options(&out, &data), world)
                    .unwrap();
            let got = tensors(&s.checkpoint);
            assert_eq!(got.len(), want.len());
            let (mut worst, mut worst_name) = (0f32, "");
            for (name, w) in &want {
                let scale = w.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let d = got[name]
                    .iter()
                    .zip(w)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                if d / scale > worst {
                    (worst, worst_name) = (d / scale, name);
                }
            }
            eprintln!("DP {preset} x {world}: worst relative difference {worst:e} ({worst_name})");
            // Round-off only, but Adam normalises each element's step, so where a weight's
            // gradient nearly cancels over the batch the summation order (the kernels pick their
            // algorithm by batch size, and their vector width by CPU) moves its step visibly:
            // ddpm-tiny's worst is 1.9e-4 on an AVX2 EPYC (mid.res2.conv2.weight), 0.8% of one
            // step there. A lost rank moves weights by whole steps (training on half the batch:
            // 8.2e-2 on vae-tiny).
            assert!(
                worst < 1e-3,
                "{preset} × {world} ranks: parameters differ by {worst:e} (relative, {worst_name})"
            );
            let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
            let first: serde_json::Value =
                serde_json::from_str(log.lines().next().unwrap()).unwrap();
            assert_eq!(
                first["rank_losses"].as_array().unwrap().len(),
                world,
                "{first}"
            );
            let files = std::fs::read_dir(&out).unwrap().count();
            assert!(files >= 3, "rank 0 wrote the run directory");
        }
    }
}

/// A run started with a data folder resumes on that folder when no --data-dir is given (not on
/// the default data set).
#[test]
fn resume_reads_the_folder_the_run_started_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let mut cfg = tiny_vae(&["train.steps=2"]);
    Trainer::new(&cfg, &options(&out, &data))
        .unwrap()
        .run()
        .unwrap();
    cfg.train.steps = 4;
    let again = TrainOptions {
        data_dir: None,
        resume: true,
        ..options(&out, &data)
    };
    let s = Trainer::new(&cfg, &again).unwrap().run().unwrap();
    assert_eq!(s.data_source, format!("IDX folder {}", data.display()));
    let meta =
        gm_train::checkpoint::read_meta(&out.join("checkpoints/step-00000004.state.safetensors"))
            .unwrap();
    assert_eq!(meta["gm.data_dir"], data.display().to_string());
}

/// A model fitted in closed form (the mixture of Bernoullis by EM): each step is one EM
/// iteration on the whole training set, so the training NLL never rises (up to the small prior
/// term), no optimizer moves the parameters, and resume is exact.
#[test]
fn closed_form_em_steps_through_the_trainer() {
    let t = tempfile::tempdir().unwrap();
    let data = idx_dir(&t.path().join("data"));
    let sets: Vec<String> = [
        "train.batch_size=64",
        "train.steps=12",
        "train.eval_every=0",
        "train.sample_every=0",
        "train.checkpoint_every=6",
        "train.eval_images=16",
        "model.pseudo_count=0.01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = RunConfig::load(&root().join("models/bernoulli-mixture-tiny.toml"), &sets).unwrap();
    let run = t.path().join("em");
    let s = gm_train::train(&cfg, &options(&run, &data)).unwrap();
    let losses: Vec<f64> = s.losses.iter().map(|l| l.1).collect();
    for w in losses.windows(2) {
        assert!(
            w[1] <= w[0] + 1e-2,
            "EM raised the training NLL: {losses:?}"
        );
    }
    assert!(losses[11] < losses[0] - 1.0, "{losses:?}");
    // Resumed from step 6, the run ends where the uninterrupted one did.
    let again = t.path().join("again");
    std::fs::create_dir_all(again.join("checkpoints")).unwrap();
    std::fs::copy(run.join("config.toml"), again.join("config.toml")).unwrap();
    for f in [
        "step-00000006.safetensors",
        "step-00000006.state.safetensors",
    ] {
        std::fs::copy(
            run.join("checkpoints").join(f),
            again.join("checkpoints").join(f),
        )
        .unwrap();
    }
    let mut o = options(&again, &data);
    o.resume = true;
    gm_train::train(&cfg, &o).unwrap();
    assert!(
        weights(&run, 12) == weights(&again, 12),
        "resumed EM run differs"
    );
}

/// An NCE energy model with a RealNVP as its noise, started by `--init-from` a realnvp run:
/// the flow's tensors land under `noise_flow.` unchanged and stay frozen through training
/// (the checkpoint holds them bit for bit), while the energy trains; a fresh run without
/// `--init-from`, and a run whose `[model.flow]` differs from the flow run's model, are refused
/// with errors naming the flag and the key.
#[test]
fn ebm_noise_flow_comes_from_a_realnvp_run_and_stays_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let data = idx_dir(&dir.path().join("data"));
    let quick = [
        "train.eval_every=0",
        "train.sample_every=0",
        "train.checkpoint_every=3",
        "train.steps=3",
        "train.eval_images=16",
    ]
    .map(String::from);
    let flow_cfg = RunConfig::load(&root().join("models/realnvp-tiny.toml"), &quick).unwrap();
    let flow_run = dir.path().join("flow");
    Trainer::new(&flow_cfg, &options(&flow_run, &data))
        .unwrap()
        .run()
        .unwrap();
    let flow = tensors(&flow_run.join("checkpoints/step-00000003.safetensors"));

    let ebm_cfg = |extra: &[&str]| {
        let sets: Vec<String> = quick
            .iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        RunConfig::load(&root().join("models/ebm-nce-flow-tiny.toml"), &sets).unwrap()
    };
    let err = Trainer::new(&ebm_cfg(&[]), &options(&dir.path().join("e0"), &data))
        .err()
        .expect("a flow-noise EBM without --init-from must be refused")
        .to_string();
    assert!(
        err.contains("--init-from") && err.contains("model.flow"),
        "{err}"
    );

    let mut opts = options(&dir.path().join("e1"), &data);
    opts.init_from = Some(flow_run.clone());
    let err = Trainer::new(&ebm_cfg(&["model.flow.hidden=16"]), &opts)
        .err()
        .expect("a flow of another width must be refused")
        .to_string();
    assert!(err.contains("model.flow.hidden"), "{err}");

    let mut opts = options(&dir.path().join("e2"), &data);
    opts.init_from = Some(flow_run.clone());
    let summary = Trainer::new(&ebm_cfg(&[]), &opts).unwrap().run().unwrap();
    assert_eq!(summary.steps, 3);
    let ebm = tensors(&dir.path().join("e2/checkpoints/step-00000003.safetensors"));
    let mut frozen = 0;
    for (name, v) in &flow {
        assert_eq!(
            ebm.get(&format!("noise_flow.{name}")),
            Some(v),
            "noise_flow.{name} differs from the flow run's {name}"
        );
        frozen += 1;
    }
    assert!(frozen > 10, "{frozen} flow tensors");
    // The energy's last layer starts at zero (residual) and must have moved.
    assert!(
        ebm["energy.2.weight"].iter().any(|&w| w != 0.0),
        "the energy did not train"
    );
}

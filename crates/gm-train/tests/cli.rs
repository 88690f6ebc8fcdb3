//! The `gm` binary end to end: train → sample → eval on a tiny preset, plus its error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gm"))
        .args(args)
        .output()
        .expect("gm runs")
}

/// `gm train --config CFG --data-dir DATA --out RUN --quiet --device cpu [extra…]`.
fn train(cfg: &Path, data: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--device",
        "cpu",
    ];
    args.extend(extra);
    gm(&args)
}

/// `[first, last]` from the trainer's "gm: done: N steps, loss A -> B; …" line.
fn loss_summary(preset: &str, err: &str) -> Vec<f64> {
    err.split("loss ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(|s| s.split(" -> ").map(|v| v.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| panic!("{preset}: no loss summary in {err}"))
}

/// `gm eval --checkpoint RUN --data-dir DATA --max-images N --device cpu`.
fn eval_run(run: &Path, data: &Path, max_images: usize) -> Output {
    gm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--max-images",
        &max_images.to_string(),
        "--device",
        "cpu",
    ])
}

/// `gm sample --checkpoint RUN --n N --out PNG --device cpu`.
fn sample_to(run: &Path, n: usize, png: &Path) -> Output {
    gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--n",
        &n.to_string(),
        "--out",
        png.to_str().unwrap(),
        "--device",
        "cpu",
    ])
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Real digits when the checkout has `../shared/data/mnist-5k` beside it, else a small IDX set
/// made here (so the test always runs).
fn data_dir(tmp: &Path) -> PathBuf {
    let shared = root().join("../shared/data/mnist-5k");
    if shared.join("train-images-idx3-ubyte.gz").is_file() {
        return shared;
    }
    let d = tmp.join("data");
    std::fs::create_dir_all(&d).unwrap();
    let mut rng = gm_core::GmRng::new(1);
    for (split, n) in [("train", 300usize), ("t10k", 100)] {
        let px: Vec<u8> = (0..n * 784)
            .map(|i| {
                if (i % 28) / 7 == (i / 784) % 4 {
                    230
                } else {
                    (rng.next_u64() % 20) as u8
                }
            })
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 4) as u8).collect();
        gm_train::fetch::write_idx_gz(
            &d.join(format!("{split}-images-idx3-ubyte.gz")),
            &[n, 28, 28],
            &px,
        )
        .unwrap();
        gm_train::fetch::write_idx_gz(
            &d.join(format!("{split}-labels-idx1-ubyte.gz")),
            &[n],
            &labels,
        )
        .unwrap();
    }
    d
}

#[test]
fn train_sample_eval_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let run = tmp.path().join("run");
    let cfg = root().join("models/vae-tiny.toml");
    let o = train(&cfg, &data, &run, &["--set", "train.steps=60"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {err}");
    assert!(err.contains("device cpu"), "{err}");
    assert!(run.join("config.toml").is_file());

    let png = tmp.path().join("grid.png");
    let o = sample_to(&run, 16, &png);
    assert!(
        o.status.success(),
        "sample failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 30 + 2, 4 * 30 + 2));

    let o = gm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--iwae-k",
        "20",
        "--max-images",
        "50",
        "--device",
        "cpu",
    ]);
    assert!(
        o.status.success(),
        "eval failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    let elbo = v["elbo_nats"].as_f64().unwrap();
    let iwae = v["nll_iwae_nats"].as_f64().unwrap();
    assert!(iwae <= elbo && elbo > 0.0 && elbo < 600.0, "{v}");
    assert_eq!(v["iwae_k"], 20);
    assert_eq!(v["n_images"], 50.0);
    assert!(v["bits_per_dim"].as_f64().unwrap() > 0.0);

    // Sample quality through a (tiny) classifier trained by gm.
    let cls = tmp.path().join("classifier");
    let ccfg = root().join("models/classifier-tiny.toml");
    let o = train(&ccfg, &data, &cls, &[]);
    assert!(
        o.status.success(),
        "classifier train failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = gm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--iwae-k",
        "2",
        "--max-images",
        "20",
        "--fid",
        "--fid-n",
        "60",
        "--classifier",
        cls.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "eval --fid failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fid = v["fid_mnist"].as_f64().unwrap();
    assert!(fid.is_finite() && fid > 0.0, "{v}");
    let hist: f64 = v["class_histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!((hist - 1.0).abs() < 1e-9, "{v}");
    assert!(v["classes_ge_5pct"].as_u64().unwrap() >= 1);
    assert!(v["kid_mnist"].as_f64().unwrap().is_finite(), "{v}");
    assert!(v["kid_mnist_se"].as_f64().unwrap() > 0.0, "{v}");
    for k in ["precision", "recall", "coverage"] {
        let x = v[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{k}: {v}");
    }

    // gm compare: the same preset with another seed groups with the first run.
    let run2 = tmp.path().join("run-seed1");
    let o = train(
        &cfg,
        &data,
        &run2,
        &["--set", "train.steps=60", "--seed", "1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("compare");
    let compare = |runs: &[&Path]| {
        let mut args = vec!["compare"];
        args.extend(runs.iter().map(|r| r.to_str().unwrap()));
        args.extend([
            "--data-dir",
            data.to_str().unwrap(),
            "--max-images",
            "20",
            "--fid-n",
            "40",
            "--classifier",
            cls.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        gm(&args)
    };
    let o = compare(&[&run, &run2]);
    assert!(
        o.status.success(),
        "compare: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| run,") || l.starts_with("| run "))
        .collect();
    assert_eq!(rows.len(), 2, "a header and one grouped row: {table}");
    assert!(
        rows[1].contains(" ± ") && rows[1].contains("| vae | 2 | 60 × 64 |"),
        "{table}"
    );
    assert!(rows[1].contains("bound (IWAE-"), "{table}");
    assert_eq!(
        std::fs::read_to_string(out.join("compare.md"))
            .unwrap()
            .trim(),
        table.trim()
    );
    let csv = std::fs::read_to_string(out.join("compare.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let cols = lines[0].split(',').count();
    let kid_col = lines[0].split(',').position(|c| c == "kid_mnist").unwrap();
    for l in &lines[1..] {
        // No quoted fields in these rows: a plain split counts the columns.
        assert_eq!(l.split(',').count(), cols, "{l}");
        assert!(
            l.split(',').nth(kid_col).unwrap().parse::<f64>().is_ok(),
            "{l}"
        );
    }
    let m = image::open(out.join("montage.png")).unwrap();
    // Two 4×4 grids of 28-pixel digits, drawn twice as large, captioned, side by side.
    let g = 2 * (4 * 30 + 2);
    assert_eq!((m.width(), m.height()), (2 * (g + 6) + 6, g + 14 + 2 * 6));
    // gm export: a folder that sample and eval read; an existing folder is never written into.
    let folder = tmp.path().join("exported");
    let export = || {
        gm(&[
            "export",
            run.to_str().unwrap(),
            folder.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--max-images",
            "20",
            "--samples",
            "16",
        ])
    };
    let o = export();
    assert!(
        o.status.success(),
        "export: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let card = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(
        card.contains("| kind | `vae` |") && card.contains("60 steps × batch 64"),
        "{card}"
    );
    let png = tmp.path().join("from-folder.png");
    let o = gm(&[
        "sample",
        "--checkpoint",
        folder.to_str().unwrap(),
        "--n",
        "4",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(
        o.status.success() && png.is_file(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = export();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("exists and is not empty"),
        "{err}"
    );
    // A classifier is named as one.
    let o = compare(&[&run, &cls]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("a classifier, not a generative model"),
        "{err}"
    );
    // Without a classifier, --fid says what to do.
    let o = gm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--iwae-k",
        "2",
        "--max-images",
        "20",
        "--fid",
        "--classifier",
        "/nonexistent-classifier",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("classifier-mnist.toml"),
        "{err}"
    );
}

#[test]
fn user_errors_are_messages_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = root().join("models/vae-tiny.toml");
    let c = cfg.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--config", c, "--set", "train.batch_size=0"],
            "train.batch_size",
        ),
        (
            vec!["train", "--config", c, "--set", "train.lr=-1"],
            "train.lr",
        ),
        (
            vec!["train", "--config", c, "--set", "train.bogus=1"],
            "bogus",
        ),
        (
            vec!["train", "--config", "/nonexistent.toml"],
            "/nonexistent.toml",
        ),
        (
            vec!["train", "--config", c, "--data-dir", "/nonexistent-dir"],
            "/nonexistent-dir",
        ),
        (
            vec!["eval", "--checkpoint", "/nonexistent-ckpt"],
            "/nonexistent-ckpt",
        ),
        (vec!["train", "--config", c, "--device", "tpu"], "tpu"),
        (
            vec!["sample", "--checkpoint", "/nonexistent-ckpt", "--n", "0"],
            "--n",
        ),
    ];
    for (args, needle) in cases {
        let o = gm(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: message lacks '{needle}': {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    // A file that is not IDX, named in the error.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("train-images-idx3-ubyte"),
        b"not an idx file at all",
    )
    .unwrap();
    let o = gm(&[
        "train",
        "--config",
        c,
        "--data-dir",
        bad.to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("train-images-idx3-ubyte")
            && err.contains("not an IDX file"),
        "{err}"
    );
}

/// Every rung of the autoregressive ladder trains from its tiny preset (the loss falls), reports
/// its exact NLL with the binarisation it used, and samples; the conditional one draws a row per
/// requested digit.
#[test]
fn autoregressive_presets_train_eval_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    for preset in [
        "fvsbn-tiny",
        "made-tiny",
        "pixelcnn-tiny",
        "gated-pixelcnn-cond-tiny",
    ] {
        let run = tmp.path().join(preset);
        let cfg = root().join(format!("models/{preset}.toml"));
        let o = train(&cfg, &data, &run, &["--set", "train.sample_n=0"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: train failed: {err}");
        // "gm: done: 40 steps, loss A -> B; …"
        let losses = loss_summary(preset, &err);
        assert!(
            losses[1] < 0.8 * losses[0],
            "{preset}: loss did not fall: {losses:?}"
        );
        let o = eval_run(&run, &data, 100);
        assert!(
            o.status.success(),
            "{preset}: eval failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let nll = v["nll_nats"].as_f64().unwrap();
        let bpd = v["bits_per_dim"].as_f64().unwrap();
        assert!(nll > 20.0 && nll < 543.6, "{preset}: {v}"); // below 784·ln 2 = an untrained model
        assert!((bpd - nll / (784.0 * 2f64.ln())).abs() < 1e-9, "{v}");
        assert_eq!(v["binarization"], "dynamic", "{v}");
    }
    let run = tmp.path().join("gated-pixelcnn-cond-tiny");
    let png = tmp.path().join("digits.png");
    let o = gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--labels",
        "0-2",
        "--n",
        "3",
        "--out",
        png.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sample --labels failed: {err}");
    assert!(
        err.contains("9 samples") && err.contains("images/s"),
        "{err}"
    );
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 30 + 2, 3 * 30 + 2));
    // Without --out the grid goes into the run's samples/ folder, named by step and seed.
    let o = gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--n",
        "4",
        "--seed",
        "7",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sample without --out failed: {err}");
    let written: Vec<_> = std::fs::read_dir(run.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("sample-step-") && n.ends_with("-seed-7.png"))
        .collect();
    assert_eq!(written.len(), 1, "{written:?}; {err}");
    assert!(err.contains(&written[0]), "{err}");
    for (labels, want) in [("12", "out of range"), ("a-b", "--labels")] {
        let o = gm(&[
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--labels",
            labels,
            "--out",
            png.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{labels}: {err}");
    }
    let o = gm(&[
        "sample",
        "--checkpoint",
        tmp.path().join("made-tiny").to_str().unwrap(),
        "--labels",
        "1",
        "--out",
        png.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not class-conditional"),
        "{err}"
    );
    // A Bernoulli-pixel model on grey levels is refused, naming the key.
    let o = train(
        &root().join("models/pixelcnn-tiny.toml"),
        &data,
        &tmp.path().join("bad"),
        &["--set", "data.binarize=none"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("data.binarize"),
        "{err}"
    );
}

/// The text model through the same commands and the same trainer as the image models: train
/// (the README as corpus) with periodic evaluation, resume exactly, eval in bits per byte, sample
/// with a prompt, temperature and top-k.
#[test]
fn text_model_train_eval_resume_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("text");
    let readme = root().join("README.md");
    let sets = [
        "--set",
        "train.steps=30",
        "--set",
        "train.eval_every=15",
        "--set",
        "train.checkpoint_every=15",
    ];
    let o = train(
        &root().join("models/text-ar-tiny.toml"),
        &readme,
        &run,
        &sets,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {err}");
    assert!(err.contains("BPE with"), "{err}");
    // Periodic held-out evaluations, in bits per byte, at steps 15 and 30.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("bits_per_byte").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [15, 30], "{metrics}");
    // Resumed from step 15 (the tokenizer comes from the checkpoint), the run ends where the
    // uninterrupted one did.
    let again = tmp.path().join("again");
    std::fs::create_dir_all(again.join("checkpoints")).unwrap();
    std::fs::copy(run.join("config.toml"), again.join("config.toml")).unwrap();
    for f in [
        "step-00000015.safetensors",
        "step-00000015.state.safetensors",
    ] {
        let ck = |r: &Path| r.join("checkpoints").join(f);
        std::fs::copy(ck(&run), ck(&again)).unwrap();
    }
    let o = gm(&[
        "train",
        "--resume",
        again.to_str().unwrap(),
        "--data-dir",
        readme.to_str().unwrap(),
        "--quiet",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last = |r: &Path| std::fs::read(r.join("checkpoints/step-00000030.safetensors")).unwrap();
    assert!(last(&run) == last(&again), "the resumed text run differs");
    let o = gm(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data-dir",
        readme.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bpb = v["bits_per_byte"].as_f64().unwrap();
    assert!(bpb > 0.5 && bpb < 8.0, "{v}");
    let out = tmp.path().join("s.txt");
    let o = gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "The model",
        "--n",
        "2",
        "--tokens",
        "20",
        "--temperature",
        "0.8",
        "--top-k",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("tokens/s"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.matches("The model").count(), 2, "{text}");
    // A directory without text is a clear error.
    let o = train(
        &root().join("models/text-ar-tiny.toml"),
        &tmp.path().join("none"),
        &tmp.path().join("r2"),
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no text corpus"),
        "{err}"
    );
}

/// DDPM and flow matching through the CLI: train (loss falls), eval with the bound / the ODE
/// likelihood in bits per dimension, sample with overridden sampler and solver settings.
#[test]
fn diffusion_and_flow_matching_presets_train_eval_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    for (preset, key, sets) in [
        (
            "ddpm-tiny",
            "bpd_bound",
            ["model.sampler.kind=ddpm", "model.sampler.steps=3"],
        ),
        (
            "flow-matching-tiny",
            "bits_per_dim",
            ["model.solver.method=dopri5", "model.solver.rtol=1e-2"],
        ),
    ] {
        let run = tmp.path().join(preset);
        let cfg = root().join(format!("models/{preset}.toml"));
        let o = train(&cfg, &data, &run, &["--set", "train.steps=30"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: train failed: {err}");
        let losses = loss_summary(preset, &err);
        assert!(
            losses[1] < 0.7 * losses[0],
            "{preset}: loss did not fall: {losses:?}"
        );
        let o = eval_run(&run, &data, 20);
        assert!(
            o.status.success(),
            "{preset}: eval failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let bpd = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{preset}: no {key} in {v}"));
        // Between a perfect model and far worse than uniform over 256 levels.
        assert!(bpd > 0.0 && bpd < 16.0, "{preset}: {v}");
        assert!(v.get("iwae_k").is_none(), "{v}");
        let png = tmp.path().join(format!("{preset}.png"));
        let o = gm(&[
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--n",
            "4",
            "--out",
            png.to_str().unwrap(),
            "--set",
            sets[0],
            "--set",
            sets[1],
            "--device",
            "cpu",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: sample failed: {err}");
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (2 * 30 + 2, 2 * 30 + 2));
    }
    // Flow matching has no `sampler` table: the override is refused, naming it.
    let o = gm(&[
        "sample",
        "--checkpoint",
        tmp.path().join("flow-matching-tiny").to_str().unwrap(),
        "--set",
        "model.sampler.steps=3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("sampler"), "{err}");
    // The class-conditional DDPM with classifier-free guidance: a row per label.
    let run = tmp.path().join("ddpm-cond");
    let o = train(
        &root().join("models/ddpm-tiny.toml"),
        &data,
        &run,
        &["--set", "model.num_classes=10", "--set", "train.steps=10"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = tmp.path().join("cond.png");
    let o = gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--labels",
        "0-2",
        "--n",
        "2",
        "--set",
        "model.sampler.guidance_scale=3",
        "--out",
        png.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("6 samples"), "{err}");
    // Flow matching's likelihood is a continuous density: grey levels must be dequantised.
    let o = train(
        &root().join("models/flow-matching-tiny.toml"),
        &data,
        &tmp.path().join("bad"),
        &["--set", "data.dequantize=false"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("data.dequantize"),
        "{err}"
    );
}

#[test]
fn flow_presets_train_eval_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    for (preset, steps) in [("realnvp-tiny", "30"), ("cnf-tiny", "12")] {
        let run = tmp.path().join(preset);
        let cfg = root().join(format!("models/{preset}.toml"));
        let o = train(
            &cfg,
            &data,
            &run,
            &["--set", &format!("train.steps={steps}")],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: train failed: {err}");
        let losses = loss_summary(preset, &err);
        assert!(
            losses[1] < losses[0] - 10.0,
            "{preset}: loss did not fall: {losses:?}"
        );
        let o = eval_run(&run, &data, 16);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: eval failed: {err}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let bpd = v["bits_per_dim"]
            .as_f64()
            .unwrap_or_else(|| panic!("{preset}: no bits_per_dim in {v}"));
        assert!(bpd > 0.0 && bpd < 16.0, "{preset}: {v}");
        let png = tmp.path().join(format!("{preset}.png"));
        let o = sample_to(&run, 4, &png);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: sample failed: {err}");
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (2 * 30 + 2, 2 * 30 + 2));
    }
    // A toy density: no data folder; the run writes the data | density | samples picture.
    let run = tmp.path().join("realnvp-moons");
    let o = gm(&[
        "train",
        "--config",
        root().join("models/realnvp-moons.toml").to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--device",
        "cpu",
        "--set",
        "train.steps=60",
        "--set",
        "train.sample_every=60",
        "--set",
        "train.eval_every=60",
        "--set",
        "train.checkpoint_every=60",
        "--set",
        "model.hidden=16",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "toy train failed: {err}");
    let losses = loss_summary("realnvp-moons", &err);
    assert!(losses[1] < losses[0] - 0.5, "{losses:?}");
    let img = image::open(run.join("samples/density-step-00000060.png")).unwrap();
    // Three captioned 200-pixel panels (data, density, samples), 6-pixel gutters, a 14-pixel
    // caption line.
    assert_eq!(
        (img.width(), img.height()),
        (3 * (200 + 6) + 6, 200 + 14 + 2 * 6)
    );
    let png = tmp.path().join("moons.png");
    let o = gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--n",
        "500",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(png.is_file());
    // A 2-D model on image data, or a toy density for an image model, is refused by name.
    let o = gm(&[
        "train",
        "--config",
        root().join("models/realnvp-tiny.toml").to_str().unwrap(),
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
        "--set",
        "data.dataset=toy:moons",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("image_shape"), "{err}");
}

#[test]
fn gan_trains_with_two_optimizers_resumes_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let run = tmp.path().join("dcgan");
    let cfg = root().join("models/dcgan-cond-tiny.toml");
    let o = train(&cfg, &data, &run, &["--set", "train.steps=10"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for k in ["d_loss", "g_loss", "d_real", "d_fake"] {
        assert!(first[k].is_number(), "no {k} in {first}");
    }
    // Both optimisers' moments are in the state file, and the run resumes from them.
    let state = run.join("checkpoints/step-00000010.state.safetensors");
    let meta = std::fs::read(&state).unwrap();
    let text = String::from_utf8_lossy(&meta);
    assert!(text.contains("adam.m.generator.") && text.contains("adam.m.discriminator."));
    assert!(text.contains("gm.adam_t.1"));
    let o = gm(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.steps=20",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("checkpoints/step-00000020.safetensors").is_file());
    let png = tmp.path().join("gan.png");
    let o = gm(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--labels",
        "3,7",
        "--n",
        "4",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 30 + 2, 2 * 30 + 2));
}

#[test]
fn score_writes_per_image_likelihoods_and_ood_aurocs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let run = tmp.path().join("realnvp");
    let cfg = root().join("models/realnvp-tiny.toml");
    let o = train(&cfg, &data, &run, &["--set", "train.steps=20"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A second set that is plainly different: the digits turned negative.
    let ood = tmp.path().join("negative");
    std::fs::create_dir_all(&ood).unwrap();
    let ds = gm_train::data::load_split(&data, gm_train::data::Split::Test).unwrap();
    let neg: Vec<u8> = ds.pixels.iter().map(|p| 255 - p).collect();
    gm_train::fetch::write_idx_gz(
        &ood.join("t10k-images-idx3-ubyte.gz"),
        &[ds.len(), 28, 28],
        &neg,
    )
    .unwrap();
    let csv = tmp.path().join("scores.csv");
    let o = gm(&[
        "score",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--ood-data-dir",
        ood.to_str().unwrap(),
        "--max-images",
        "40",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["auroc_nll", "auroc_typicality", "auroc_complexity"] {
        let a = v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
        assert!((0.0..=1.0).contains(&a), "{v}");
    }
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "set,index,label,nll_nats,bits_per_dim,zlib_bpd");
    assert_eq!(lines.len(), 1 + 3 * 40);
    assert_eq!(lines.iter().filter(|l| l.starts_with("ood,")).count(), 40);
    // A model without a likelihood is refused by name.
    let gan = tmp.path().join("gan");
    let o = train(
        &root().join("models/dcgan-tiny.toml"),
        &data,
        &gan,
        &["--set", "train.steps=2"],
    );
    assert!(o.status.success());
    let o = gm(&[
        "score",
        "--checkpoint",
        gan.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no likelihood"),
        "{err}"
    );
}

/// A synthetic labelled RGB data set of 16×16 images as `npy:` arrays (`train.npy`,
/// `test.npy`, `(N, H, W, C)` uint8, with labels): class 0 a red-to-green ramp at a random
/// offset, class 1 blue stripes at a random phase, both with pixel noise.
fn rgb_data(tmp: &Path) -> PathBuf {
    let d = tmp.join("rgb");
    std::fs::create_dir_all(&d).unwrap();
    let mut rng = gm_core::GmRng::new(3);
    for (split, n) in [("train", 256usize), ("test", 64)] {
        let (mut px, mut labels) = (Vec::new(), Vec::new());
        for k in 0..n {
            let (class, shift) = (k % 2, (rng.next_u64() % 16) as usize);
            for i in 0..16 {
                for j in 0..16 {
                    let noise = (rng.next_u64() % 24) as usize;
                    let rgb = if class == 0 {
                        let t = ((j + shift) % 16) * 15;
                        [t + noise, 240 - t + noise / 2, noise]
                    } else {
                        let on = ((i + shift) / 2) % 2 * 200;
                        [noise, noise + on / 4, on + noise]
                    };
                    px.extend(rgb.map(|v| v.min(255) as u8));
                }
            }
            labels.push(class as u8);
        }
        let npy = gm_train::userdata::npy_bytes;
        std::fs::write(
            d.join(format!("{split}.npy")),
            npy("|u1", &[n, 16, 16, 3], &px),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("{split}_labels.npy")),
            npy("|u1", &[n], &labels),
        )
        .unwrap();
    }
    d
}

/// Every family's RGB preset (`models/*-rgb-tiny.toml`) trains on colour images (the loss falls,
/// except the GAN's), reports its likelihood in bits per dimension over all `3·16·16`
/// values, and samples colour images; the VQ-VAE prior and the flow-noise EBM train on their
/// stage-one runs; `gm eval --fid` works through a classifier trained on the same data, its
/// metrics named after it, and refuses a classifier of another image shape.
#[test]
fn every_family_trains_evaluates_and_samples_on_rgb_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = rgb_data(tmp.path());
    let d = (3 * 16 * 16) as f64 * 2f64.ln();
    for (preset, init) in [
        ("classifier-rgb-tiny", None),
        ("pixelcnn-rgb-tiny", None),
        ("gated-pixelcnn-rgb-tiny", None),
        ("vae-conv-rgb-tiny", None),
        ("ddpm-rgb-tiny", None),
        ("flow-matching-rgb-tiny", None),
        ("score-rgb-tiny", None),
        ("realnvp-rgb-tiny", None),
        ("cnf-rgb-tiny", None),
        ("dcgan-rgb-tiny", None),
        ("vqvae-rgb-tiny", None),
        ("vqvae-prior-rgb-tiny", Some("vqvae-rgb-tiny")),
        ("ebm-nce-flow-rgb-tiny", Some("realnvp-rgb-tiny")),
    ] {
        let run = tmp.path().join(preset);
        let cfg = root().join(format!("models/{preset}.toml"));
        let from = init.map(|i| tmp.path().join(i));
        let mut extra = vec!["--set", "train.sample_n=0"];
        if let Some(f) = &from {
            extra.extend(["--init-from", f.to_str().unwrap()]);
        }
        let o = train(&cfg, &data, &run, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{preset}: train failed: {err}");
        let losses = loss_summary(preset, &err);
        if !preset.starts_with("dcgan") {
            assert!(
                losses[1] < losses[0],
                "{preset}: loss did not fall: {losses:?}"
            );
        }
        if preset.starts_with("classifier") {
            continue;
        }
        let o = eval_run(&run, &data, 16);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|_| panic!("{preset}: {}", String::from_utf8_lossy(&o.stderr)));
        if let Some(bpd) = v.get("bits_per_dim").and_then(|b| b.as_f64()) {
            // Some nats-per-image metric of the report, over all 768 values.
            let per_image = v
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.ends_with("_nats"))
                .filter_map(|(_, n)| n.as_f64())
                .any(|n| (n / d - bpd).abs() < 1e-9);
            assert!(per_image, "{preset}: bits/dim not over 3·16·16 values: {v}");
        } else {
            assert!(
                ["ddpm", "flow-matching", "score", "dcgan"]
                    .iter()
                    .any(|k| preset.starts_with(k)),
                "{preset}: no bits_per_dim: {v}"
            );
        }
        let png = tmp.path().join(format!("{preset}.png"));
        let o = sample_to(&run, 4, &png);
        assert!(
            o.status.success(),
            "{preset}: sample failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let img = image::open(&png).unwrap().to_rgb8();
        // Tiles of 16 + 2 pixels, in a row or a square.
        let (w, h) = (img.width(), img.height());
        assert!(
            (w - 2) % 18 == 0 && (h - 2) % 18 == 0 && (w - 2) * (h - 2) >= 4 * 18 * 18,
            "{preset}: a {w}×{h} grid"
        );
        assert!(
            img.pixels().any(|p| p[0] != p[1] || p[1] != p[2]),
            "{preset}: the samples are grey"
        );
    }
    let cls = tmp.path().join("classifier-rgb-tiny");
    let fid = |classifier: &Path| {
        gm(&[
            "eval",
            "--checkpoint",
            tmp.path().join("pixelcnn-rgb-tiny").to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--max-images",
            "4",
            "--fid",
            "--fid-n",
            "8",
            "--classifier",
            classifier.to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    let o = fid(&cls);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("--fid: {}", String::from_utf8_lossy(&o.stderr)));
    assert!(v["fid_photos16"].as_f64().unwrap() >= 0.0, "{v}");
    assert!(
        v["kid_photos16_se"].as_f64().is_some() && v.get("fid_mnist").is_none(),
        "{v}"
    );
    // A classifier of grey 16×16 images does not read these colour samples.
    let grey = tmp.path().join("classifier-grey");
    let o = train(
        &root().join("models/classifier-rgb-tiny.toml"),
        &data,
        &grey,
        &[
            "--set",
            "model.image_shape=[1,16,16]",
            "--set",
            "train.steps=2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&fid(&grey).stderr).to_string();
    assert!(
        err.contains("reads [1, 16, 16] images") && err.contains("makes [3, 16, 16]"),
        "{err}"
    );
}

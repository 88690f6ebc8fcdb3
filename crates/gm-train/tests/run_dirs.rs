//! A run directory is never mixed with another run, a resume refuses what it cannot honour, and a
//! split the run cannot read stops it before step 0 — each with a message that names the path or
//! key and says what to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gm_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gm"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("gm runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A small IDX folder: `n_train` / `n_test` images of `h × w`, labels `i % 4` except `bad_label`
/// as the last test label when given.
fn idx_dir(dir: &Path, test_hw: [usize; 2], bad_label: Option<u8>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = gm_core::GmRng::new(3);
    for (split, n, [h, w]) in [("train", 64usize, [28, 28]), ("t10k", 16, test_hw)] {
        let px: Vec<u8> = (0..n * h * w)
            .map(|_| (rng.next_u64() % 256) as u8)
            .collect();
        let mut labels: Vec<u8> = (0..n).map(|i| (i % 4) as u8).collect();
        if split == "t10k" {
            if let Some(l) = bad_label {
                labels[n - 1] = l;
            }
        }
        gm_train::fetch::write_idx_gz(
            &dir.join(format!("{split}-images-idx3-ubyte.gz")),
            &[n, h, w],
            &px,
        )
        .unwrap();
        gm_train::fetch::write_idx_gz(
            &dir.join(format!("{split}-labels-idx1-ubyte.gz")),
            &[n],
            &labels,
        )
        .unwrap();
    }
    dir.to_path_buf()
}

/// Every file under `dir` with its bytes, sorted: a directory's full state.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `gm train` of the preset `cfg` on `data` into `out` (the preset's default when `None`),
/// quiet, on the CPU, with these `--set` values.
fn train_cmd(tmp: &Path, cfg: &Path, data: &Path, out: Option<&Path>, sets: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gm"));
    c.current_dir(tmp).arg("train").arg("--config").arg(cfg);
    c.arg("--data-dir")
        .arg(data)
        .args(["--quiet", "--device", "cpu"]);
    if let Some(o) = out {
        c.arg("--out").arg(o);
    }
    for s in sets {
        c.args(["--set", s]);
    }
    c
}

/// [`train_cmd`] for the tiny VAE.
fn tiny_vae_cmd(tmp: &Path, data: &Path, out: Option<&Path>, sets: &[&str]) -> Command {
    train_cmd(tmp, &root().join("models/vae-tiny.toml"), data, out, sets)
}

/// Two steps of the preset `cfg` into `out`.
fn train_two_steps(tmp: &Path, cfg: &Path, data: &Path, out: &Path) -> Output {
    train_cmd(tmp, cfg, data, Some(out), &["train.steps=2"])
        .output()
        .unwrap()
}

/// The tiny VAE for 2 steps into `out` with extra `--set` values.
fn tiny_vae_with(tmp: &Path, data: &Path, out: &Path, sets: &[&str]) -> Output {
    let sets = [&["train.steps=2"], sets].concat();
    tiny_vae_cmd(tmp, data, Some(out), &sets).output().unwrap()
}

/// The tiny VAE for `steps` steps, one evaluation at the end, no sample grids.
fn tiny_vae(tmp: &Path, data: &Path, out: Option<&Path>, steps: usize) -> Output {
    let steps = format!("train.steps={steps}");
    let sets = [
        steps.as_str(),
        "train.eval_every=0",
        "train.sample_every=0",
        "train.eval_images=16",
    ];
    tiny_vae_cmd(tmp, data, out, &sets).output().unwrap()
}

/// A temporary folder with an IDX set and a finished 6-step tiny VAE run in `run/`.
fn finished_run() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"), [28, 28], None);
    let run = tmp.path().join("run");
    let first = tiny_vae(tmp.path(), &data, Some(&run), 6);
    assert!(first.status.success(), "{}", stderr(&first));
    (tmp, data, run)
}

#[test]
fn a_finished_run_is_never_mixed_with_a_new_one() {
    let (tmp, data, run) = finished_run();
    let before = snapshot(&run);

    // A fresh run into it: refused, and nothing in it changes.
    let again = tiny_vae(tmp.path(), &data, Some(&run), 4);
    let err = stderr(&again);
    assert!(!again.status.success());
    assert!(
        err.contains(&format!(
            "{} already holds a run (checkpoints up to step 6)",
            run.display()
        )) && err.contains(&format!("--resume {}", run.display())),
        "{err}"
    );
    assert!(
        snapshot(&run) == before,
        "the refused run changed {}",
        run.display()
    );

    // A non-empty directory that is not a run is refused too.
    let other = tmp.path().join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("todo.txt"), "mine").unwrap();
    let o = tiny_vae(tmp.path(), &data, Some(&other), 2);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not empty (1 entries, e.g. 'todo.txt')"),
        "{}",
        stderr(&o)
    );

    // Without --out, the preset's default directory is taken by then: a sibling is used.
    let a = tiny_vae(tmp.path(), &data, None, 2);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = tiny_vae(tmp.path(), &data, None, 2);
    let err = stderr(&b);
    assert!(b.status.success(), "{err}");
    assert!(
        err.contains("runs/vae-tiny holds an earlier run; this one goes to runs/vae-tiny-2"),
        "{err}"
    );
    assert!(tmp.path().join("runs/vae-tiny-2/checkpoints").is_dir());
}

#[test]
fn a_resume_refuses_what_it_cannot_honour() {
    let (tmp, data, run) = finished_run();
    let before = snapshot(&run);
    let r = run.to_str().unwrap();
    let d = data.to_str().unwrap();
    let resume = |steps: usize| {
        let s = format!("train.steps={steps}");
        gm_in(
            tmp.path(),
            &[
                "train",
                "--resume",
                r,
                "--data-dir",
                d,
                "--quiet",
                "--device",
                "cpu",
                "--set",
                &s,
            ],
        )
    };

    // No steps left: refused, the config untouched.
    let o = resume(3);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("has run 6 steps and train.steps = 3 leaves none to run")
            && err.contains("--set train.steps=N (N > 6)"),
        "{err}"
    );
    assert!(snapshot(&run) == before, "a refused resume changed the run");

    // --config with --resume: the run's own config is what a resume continues.
    let cfg = root().join("models/made-tiny.toml");
    let o = gm_in(
        tmp.path(),
        &["train", "--resume", r, "--config", cfg.to_str().unwrap()],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("'--resume <RUN_DIR>' cannot be used with '--config <CONFIG>'"),
        "{err}"
    );
    assert!(snapshot(&run) == before);

    // More steps: it continues.
    let o = resume(8);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("done: 8 steps"), "{}", stderr(&o));
}

#[test]
fn a_split_the_run_cannot_read_stops_it_before_step_zero() {
    let tmp = tempfile::tempdir().unwrap();
    // Test images of 32 × 32 for a 28 × 28 model.
    let data = idx_dir(&tmp.path().join("wide"), [32, 32], None);
    let run = tmp.path().join("run-wide");
    let o = tiny_vae(tmp.path(), &data, Some(&run), 4);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&data.display().to_string())
            && err.contains(
                "the test images are 1×32×32 (C×H×W), the model's model.image_shape is [1, 28, 28]"
            ),
        "{err}"
    );
    assert!(
        !run.join("checkpoints").exists(),
        "a step ran before the check"
    );

    // A label of 200 for a 10-class conditional model.
    let data = idx_dir(&tmp.path().join("labels"), [28, 28], Some(200));
    let cfg = root().join("models/dcgan-cond-tiny.toml");
    let run = tmp.path().join("run-labels");
    let o = gm_in(
        tmp.path(),
        &[
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
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("test image 15 has label 200, outside model.num_classes = 10"),
        "{err}"
    );
    assert!(!run.join("checkpoints").exists());
}

#[test]
fn identical_runs_write_identical_checkpoint_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"), [28, 28], None);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for run in [&a, &b] {
        let o = tiny_vae(tmp.path(), &data, Some(run), 4);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (fa, fb) = (
        snapshot(&a.join("checkpoints")),
        snapshot(&b.join("checkpoints")),
    );
    assert!(fa.len() >= 2, "{fa:?}");
    assert_eq!(fa.len(), fb.len());
    for ((pa, ba), (_, bb)) in fa.iter().zip(&fb) {
        assert!(
            ba == bb,
            "{} differs between two identical runs",
            pa.display()
        );
    }
}

#[test]
fn a_resume_removes_what_an_interrupted_write_left() {
    let (tmp, data, run) = finished_run();
    let stale = run.join("checkpoints/.step-00000008.safetensors.tmp-4242");
    std::fs::write(&stale, b"half a file").unwrap();
    let o = gm_in(
        tmp.path(),
        &[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--quiet",
            "--device",
            "cpu",
            "--set",
            "train.steps=8",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("removed 1 temporary file(s)"),
        "{}",
        stderr(&o)
    );
    assert!(!stale.exists());
}

#[test]
fn counts_beyond_gm_limits_are_refused_up_front() {
    let (tmp, data, run) = finished_run();
    let (r, d) = (run.to_str().unwrap(), data.to_str().unwrap());
    let png = tmp.path().join("grid.png");
    let p = png.to_str().unwrap();
    for (args, want) in [
        (
            vec!["sample", "--checkpoint", r, "--n", "1000000000", "--out", p],
            "--n: 1000000000 images asked for, gm's limit is 65536 per call",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                r,
                "--n",
                "1000",
                "--labels",
                "0-99",
                "--out",
                p,
            ],
            "--n × --labels: 100000 images asked for, gm's limit is 65536 per call",
        ),
        (
            vec![
                "eval",
                "--checkpoint",
                r,
                "--data-dir",
                d,
                "--iwae-k",
                "1000000000",
            ],
            "--iwae-k must be in 1..=1000000",
        ),
        (
            vec![
                "eval",
                "--checkpoint",
                r,
                "--data-dir",
                d,
                "--fid",
                "--fid-n",
                "70000",
            ],
            "--fid-n 70000",
        ),
    ] {
        let o = gm_in(
            tmp.path(),
            &[args.as_slice(), &["--device", "cpu"]].concat(),
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} ran");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("memory allocation"),
            "{err}"
        );
    }
    assert!(!png.exists());
    let o = tiny_vae_with(
        tmp.path(),
        &data,
        &tmp.path().join("big"),
        &["train.sample_n=1000000000"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("train.sample_n = 1000000000 is above gm's limit of 65536"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_flipped_bit_in_a_checkpoint_is_an_error_naming_the_file() {
    let (tmp, data, run) = finished_run();
    let w = run.join("checkpoints/step-00000006.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 3; // inside the last tensor's data
    bytes[last] ^= 0x10;
    std::fs::write(&w, &bytes).unwrap();
    let args = [
        "eval",
        "--checkpoint",
        w.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--iwae-k",
        "2",
        "--max-images",
        "8",
        "--device",
        "cpu",
    ];
    let o = gm_in(tmp.path(), &args);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!(
            "{}: the tensors do not match the checksum stored at save time",
            w.display()
        )),
        "{err}"
    );
    // A changed setting in the stored config (same length, shapes intact): the metadata's hash.
    let w2 = run.join("checkpoints/best.safetensors");
    let mut bytes = std::fs::read(&w2).unwrap();
    let at = bytes
        .windows(10)
        .position(|b| b == b"beta = 1.0")
        .expect("beta in gm.config");
    bytes[at + 7] = b'9';
    std::fs::write(&w2, &bytes).unwrap();
    let mut a2 = args;
    a2[2] = w2.to_str().unwrap();
    let o = gm_in(tmp.path(), &a2);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "{}: the metadata (config, step, …) does not match the checksum",
            w2.display()
        )),
        "{}",
        stderr(&o)
    );
    // The explicit way past the check.
    let o = Command::new(env!("CARGO_BIN_EXE_gm"))
        .current_dir(tmp.path())
        .env("GM_SKIP_CHECKSUM", "1")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_run_in_checkpoint_format_1_keeps_loading_evaluating_and_resuming() {
    let tmp = tempfile::tempdir().unwrap();
    let data = idx_dir(&tmp.path().join("data"), [28, 28], None);
    let fixture = root().join("crates/gm-train/tests/data/checkpoint-format-1");
    let run = tmp.path().join("old-run");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    for f in [
        "config.toml",
        "metrics.jsonl",
        "checkpoints/step-00000004.safetensors",
        "checkpoints/step-00000004.state.safetensors",
    ] {
        std::fs::copy(fixture.join(f), run.join(f)).unwrap();
    }
    let (r, d) = (run.to_str().unwrap(), data.to_str().unwrap());
    let o = gm_in(
        tmp.path(),
        &[
            "eval",
            "--checkpoint",
            r,
            "--data-dir",
            d,
            "--iwae-k",
            "4",
            "--device",
            "cpu",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["step"], 4);
    assert!(m["nll_iwae_nats"].as_f64().unwrap().is_finite(), "{m}");
    let png = tmp.path().join("s.png");
    let o = gm_in(
        tmp.path(),
        &[
            "sample",
            "--checkpoint",
            r,
            "--n",
            "4",
            "--out",
            png.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    assert!(o.status.success() && png.is_file(), "{}", stderr(&o));
    let o = gm_in(
        tmp.path(),
        &[
            "train",
            "--resume",
            r,
            "--data-dir",
            d,
            "--quiet",
            "--device",
            "cpu",
            "--set",
            "train.steps=6",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("resuming") && stderr(&o).contains("done: 6 steps"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn checkpoints_gm_cannot_use_are_refused_with_the_reason() {
    use candle_core::{DType, Device};
    let (tmp, _data, run) = finished_run();
    let src = run.join("checkpoints/step-00000006.safetensors");
    let loaded = gm_train::checkpoint::read_safetensors(&src, &Device::Cpu).unwrap();
    let name = loaded.tensors.keys().min().unwrap().clone();
    type Edit =
        Box<dyn Fn(&mut HashMap<String, candle_core::Tensor>, &mut HashMap<String, String>)>;
    use std::collections::HashMap;
    let cases: Vec<(&str, Edit, String)> = vec![
        (
            "kind",
            Box::new(|_, m| {
                m.insert("gm.kind".into(), "bogus".into());
            }),
            "gm.kind = 'bogus' but its gm.config describes a 'vae' model".into(),
        ),
        (
            "format",
            Box::new(|_, m| {
                m.insert("gm.format".into(), "gm-checkpoint-9".into());
            }),
            "gm.format = 'gm-checkpoint-9', this gm".into(),
        ),
        (
            "step",
            Box::new(|_, m| {
                m.insert("gm.step".into(), "-5".into());
            }),
            "gm.step = '-5' is not a step number".into(),
        ),
        (
            "f64",
            Box::new({
                let n = name.clone();
                move |t, _| {
                    let v = t[&n].to_dtype(DType::F64).unwrap();
                    t.insert(n.clone(), v);
                }
            }),
            format!("tensor '{name}' is F64"),
        ),
        (
            "nan",
            Box::new({
                let n = name.clone();
                move |t, _| {
                    // One NaN, not the first element: a max-based check would miss it.
                    let old = &t[&n];
                    let mut v = old.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let last = v.len() - 1;
                    v[last] = f32::NAN;
                    let v = candle_core::Tensor::from_vec(v, old.shape(), old.device()).unwrap();
                    t.insert(n.clone(), v);
                }
            }),
            format!("tensor '{name}' holds NaN or infinite values"),
        ),
    ];
    for (what, edit, want) in cases {
        let (mut t, mut m) = (loaded.tensors.clone(), loaded.meta.clone());
        edit(&mut t, &mut m);
        m.remove(gm_train::checkpoint::HASH_KEY);
        let path = tmp.path().join(format!("{what}.safetensors"));
        let bytes = gm_train::checkpoint::to_safetensors(&t, &m).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let png = tmp.path().join("s.png");
        let o = gm_in(
            tmp.path(),
            &[
                "sample",
                "--checkpoint",
                path.to_str().unwrap(),
                "--n",
                "2",
                "--out",
                png.to_str().unwrap(),
                "--device",
                "cpu",
            ],
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: accepted");
        assert!(
            err.contains(&format!("{}: ", path.display())) && err.contains(&want),
            "{what}: {err}"
        );
    }

    // A label the conditional model does not have.
    let data = idx_dir(&tmp.path().join("d2"), [28, 28], None);
    let gan = tmp.path().join("gan");
    let cfg = root().join("models/dcgan-cond-tiny.toml");
    let o = train_two_steps(tmp.path(), &cfg, &data, &gan);
    assert!(o.status.success(), "{}", stderr(&o));
    let png = tmp.path().join("g.png");
    let o = gm_in(
        tmp.path(),
        &[
            "sample",
            "--checkpoint",
            gan.to_str().unwrap(),
            "--labels",
            "3,12",
            "--n",
            "2",
            "--out",
            png.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--labels: label 12 is out of range for the model's 10 classes"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_inputs_get_messages_that_name_the_file_or_key() {
    let (tmp, data, run) = finished_run();
    let t = tmp.path();
    let (r, d) = (run.to_str().unwrap(), data.to_str().unwrap());

    // An IDX file whose magic claims rank 4 for 3-D data.
    let idx = t.join("rank4");
    std::fs::create_dir_all(&idx).unwrap();
    for f in [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(data.join(f), idx.join(f)).unwrap();
    }
    let mut raw = vec![0u8, 0, 8, 4, 0, 0, 0, 64, 0, 0, 0, 28, 0, 0, 0, 28];
    raw.extend(vec![0u8; 64 * 28 * 28]);
    std::fs::write(idx.join("train-images-idx3-ubyte"), &raw).unwrap();

    // A second model's optimizer state in the run.
    let other = t.join("other");
    let cfg = root().join("models/made-tiny.toml");
    let o = train_two_steps(t, &cfg, &data, &other);
    assert!(o.status.success(), "{}", stderr(&o));
    let mixed = t.join("mixed");
    std::fs::create_dir_all(mixed.join("checkpoints")).unwrap();
    for f in ["config.toml", "checkpoints/step-00000006.safetensors"] {
        std::fs::copy(run.join(f), mixed.join(f)).unwrap();
    }
    let state = mixed.join("checkpoints/step-00000006.state.safetensors");
    std::fs::copy(
        other.join("checkpoints/step-00000002.state.safetensors"),
        &state,
    )
    .unwrap();

    // A preset with another model's value for a key.
    let other_keys = t.join("other-keys.toml");
    std::fs::write(&other_keys, "[model]\nkind = \"vae\"\nchannels = 8\n").unwrap();

    // Binary files as a text corpus.
    let text_cfg = root().join("models/text-ar-tiny.toml");
    let vae = root().join("models/vae-tiny.toml");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["train", "--config", other_keys.to_str().unwrap(), "--out", "x0"],
            format!("{}: model.channels = 8: invalid type: integer `8`, expected an array of length 2", other_keys.display()),
        ),
        (
            vec!["train", "--config", vae.to_str().unwrap(), "--data-dir", idx.to_str().unwrap(), "--out", "x1"],
            format!("{}: 50172 bytes after the data the header describes (its magic gives rank 4, dimensions [64, 28, 28, 0]", idx.join("train-images-idx3-ubyte").display()),
        ),
        (
            vec!["train", "--config", vae.to_str().unwrap(), "--data-dir", d, "--out", "x2", "--set", "model.latent_dim=0"],
            format!("--set model.latent_dim=0 (with {}): ", vae.display()),
        ),
        (
            vec!["train", "--resume", mixed.to_str().unwrap(), "--data-dir", d, "--set", "train.steps=8"],
            format!("{}: this optimizer state does not belong to the run's model", state.display()),
        ),
        (
            vec!["eval", "--checkpoint", r, "--data-dir", d, "--fid", "--fid-n", "8", "--classifier", r],
            "a 'vae' checkpoint; sample quality needs gm's classifier".to_string(),
        ),
        (
            vec!["train", "--quiet", "--config", text_cfg.to_str().unwrap(), "--data-dir", d, "--out", "x3"],
            "not UTF-8 text (invalid byte at offset".to_string(),
        ),
    ];
    for (args, want) in cases {
        let o = gm_in(t, &[args.as_slice(), &["--device", "cpu"]].concat());
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} ran");
        assert!(err.contains(&want), "{args:?}:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Every file a run keeps (checkpoints, their states, `best`), by name, with its bytes.
fn checkpoint_files(run: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(&run.join("checkpoints"))
        .into_iter()
        .map(|(p, b)| (p.file_name().unwrap().to_string_lossy().to_string(), b))
        .collect()
}

#[test]
fn a_run_killed_at_any_write_resumes_to_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = idx_dir(&t.join("data"), [28, 28], None);
    let run = |out: &Path, crash: Option<&str>| {
        let sets = [
            "train.steps=6",
            "train.checkpoint_every=2",
            "train.keep_last=5",
            "train.eval_every=2",
            "train.eval_images=16",
            "train.sample_every=0",
        ];
        let mut c = tiny_vae_cmd(t, &data, Some(out), &sets);
        if let Some(at) = crash {
            c.env("GM_CRASH_AT", at);
        }
        c.output().unwrap()
    };
    let whole = t.join("whole");
    let o = run(&whole, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = checkpoint_files(&whole);
    for at in [
        "after-write:step-00000004.safetensors",
        "after-rename:step-00000004.safetensors",
        "after-write:step-00000004.state.safetensors",
        "after-rename:step-00000004.state.safetensors",
        "after-write:best.safetensors",
    ] {
        let dir = t.join(at.replace(':', "-"));
        let o = run(&dir, Some(at));
        assert!(!o.status.success(), "{at}: the fault did not fire");
        assert!(
            stderr(&o).contains("stopping the process here"),
            "{at}: {}",
            stderr(&o)
        );
        // Every complete checkpoint left behind loads and evaluates.
        for step in gm_train::checkpoint::complete_steps(&dir) {
            let w = gm_train::checkpoint::weights_path(&dir, step);
            let e = gm_in(
                t,
                &[
                    "eval",
                    "--checkpoint",
                    w.to_str().unwrap(),
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--iwae-k",
                    "2",
                    "--max-images",
                    "8",
                    "--device",
                    "cpu",
                ],
            );
            assert!(e.status.success(), "{at}: step {step}: {}", stderr(&e));
        }
        // The resume finishes, leaves no temporary file, and ends with the uninterrupted
        // run's files, byte for byte.
        let r = gm_in(
            t,
            &[
                "train",
                "--resume",
                dir.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "--quiet",
                "--device",
                "cpu",
            ],
        );
        assert!(r.status.success(), "{at}: {}", stderr(&r));
        let got = checkpoint_files(&dir);
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{at}");
        for ((n, a), (_, b)) in got.iter().zip(&want) {
            assert!(a == b, "{at}: {n} differs from the uninterrupted run's");
        }
    }
}

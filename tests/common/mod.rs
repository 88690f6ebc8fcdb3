//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a small synthetic MNIST-style IDX folder: 28×28 images of four stroke templates
/// (the label) with per-image jitter, so models have structure to learn in a few steps.
pub fn synthetic_idx(dir: &Path, n_train: usize, n_test: usize) {
    let mut rng = gm::GmRng::new(99);
    for (split, n) in [("train", n_train), ("t10k", n_test)] {
        let mut px = Vec::with_capacity(n * 784);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let label = (rng.next_u64() % 4) as u8;
            let off = (rng.next_u64() % 5) as i64 - 2;
            for y in 0..28i64 {
                for x in 0..28i64 {
                    let on = match label {
                        0 => (y - 14 - off).abs() <= 2 && (4..24).contains(&x),
                        1 => (x - 14 - off).abs() <= 2 && (4..24).contains(&y),
                        2 => (x - y - off).abs() <= 2,
                        _ => ((x - 14).pow(2) + (y - 14).pow(2) - (8 + off).pow(2)).abs() <= 16,
                    };
                    let noise = (rng.next_u64() % 40) as u8;
                    px.push(if on { 215 + noise } else { noise / 4 });
                }
            }
            labels.push(label);
        }
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

/// The real digits in `../shared/data/mnist-5k`, when this checkout has them beside it.
pub fn mnist_5k() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist-5k");
    p.join("train-images-idx3-ubyte.gz").is_file().then_some(p)
}

pub fn tiny_vae_config(extra: &[&str]) -> gm::RunConfig {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vae-tiny.toml"))
            .unwrap();
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    gm::RunConfig::from_toml_str(&text, &overrides, "vae-tiny.toml").unwrap()
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Python that imports all of `modules` (`$GM_PYTHON`, else `.venv/bin/python`, else
/// `python3`), or `None` after saying the test is skipped. With `GM_REQUIRE_PEERS=1` (set by
/// `.ci/run`) a missing peer fails the test instead.
pub fn peer_python(modules: &str) -> Option<String> {
    let mut cands = vec![];
    if let Ok(p) = std::env::var("GM_PYTHON") {
        cands.push(p);
    }
    cands.push(root().join(".venv/bin/python").display().to_string());
    cands.push("python3".into());
    let found = cands.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", &format!("import {modules}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if found.is_none() {
        assert!(
            std::env::var("GM_REQUIRE_PEERS").as_deref() != Ok("1"),
            "GM_REQUIRE_PEERS=1 but no Python imports {modules} (set GM_PYTHON)"
        );
        eprintln!("SKIPPED: no python with {modules} (set GM_PYTHON)");
    }
    found
}

/// Runs `scripts/SCRIPT` with `args` under `py` and parses its standard output as JSON.
pub fn run_script_json(py: &str, script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(py)
        .arg(root().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

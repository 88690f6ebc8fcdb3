//! `gm doctor --device cpu`: gm's CPU kernels against the portable path (the code CUDA and Metal
//! run) for every model family, and a planted fault in that path that the doctor must catch.

use std::process::{Command, Output};

fn doctor(args: &[&str], fault: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gm"));
    c.args(["doctor", "--device", "cpu"]).args(args);
    c.env_remove("GM_PLANT_FAULT").env_remove("GM_KERNELS");
    if let Some(f) = fault {
        c.env("GM_PLANT_FAULT", f);
    }
    c.output().expect("gm runs")
}

fn rows(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| family"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_family_passes_on_the_portable_path() {
    let out = doctor(&[], None);
    let err = String::from_utf8_lossy(&out.stderr);
    let table = rows(&out);
    assert!(
        out.status.success(),
        "doctor failed:\n{}\n{err}",
        table.join("\n")
    );
    // One row per family, each passing, each with a bit-exact checkpoint round trip.
    let families = gm_train::doctor::FAMILIES;
    assert_eq!(table.len(), families.len(), "{table:?}");
    for (row, f) in table.iter().zip(families) {
        assert!(row.starts_with(&format!("| {} | cpu |", f.name)), "{row}");
        assert!(row.ends_with("| pass |"), "{row}");
        assert!(row.contains("bit-exact"), "{row}");
    }
    let all = format!("all {} families pass on cpu", families.len());
    assert!(err.contains(&all), "{err}");
}

#[test]
fn a_fault_planted_in_the_portable_convolution_fails_the_doctor() {
    // 1% on every portable convolution's output: the convolutional families must fail, the
    // MLP VAE (no convolution) must still pass, and the exit status must say so.
    let out = doctor(
        &["--only", "vae", "--only", "pixelcnn", "--only", "ddpm"],
        Some("conv"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let table = rows(&out);
    assert!(
        !out.status.success(),
        "a planted fault passed:\n{}",
        table.join("\n")
    );
    assert!(
        err.contains("2 of 3 families failed on cpu: pixelcnn, ddpm"),
        "{err}"
    );
    assert!(table[0].ends_with("| pass |"), "{}", table[0]);
    for row in &table[1..] {
        assert!(row.contains("FAIL: loss differs"), "{row}");
    }
}

#[test]
fn unknown_family_is_named() {
    let out = doctor(&["--only", "no-such-family"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown family 'no-such-family'"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

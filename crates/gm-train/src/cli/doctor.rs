//! `gm doctor`.

use super::*;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use gm_core::{select_device, DeviceChoice};
use std::path::PathBuf;

/// Check that a device computes what gm's CPU kernels compute, for every model family: one
/// training step (loss, gradients, Adam) and one sampling pass from the same weights, batch
/// and noise, plus a checkpoint round trip; prints a table, exits non-zero on any failure.
/// `--device cpu` compares gm's kernels with the portable path (what CUDA and Metal run).
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Only these families (repeatable); all when absent.
    #[arg(long = "only", value_name = "FAMILY")]
    pub only: Vec<String>,
    /// Also write the reports as JSON lines to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run one family in this process and print its JSON report (what each child does).
    #[arg(long, hide = true)]
    pub family: Option<String>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: DoctorArgs) -> Result<()> {
    let DoctorArgs {
        only,
        json,
        family,
        device: d,
    } = args;
    run_doctor(only, json, family, d.device)
}

/// `gm doctor`: the parent runs each family in a child process and prints the table.
pub fn run_doctor(
    only: Vec<String>,
    json: Option<PathBuf>,
    family: Option<String>,
    choice: DeviceChoice,
) -> Result<()> {
    use gm_train::doctor as dr;
    let open = || -> Result<Device> {
        match choice {
            DeviceChoice::Cuda => {
                Device::new_cuda(0).map_err(|e| anyhow!(dr::explain_cuda_error(&e)))
            }
            c => Ok(select_device(c)?.0),
        }
    };
    if let Some(name) = family {
        let f = dr::family(&name)?;
        let dev = open()?;
        let r = dr::check_family(f, &dev).unwrap_or_else(|e| {
            dr::failed(
                &name,
                &gm_train::trainer::device_name(&dev),
                format!("{e:#}"),
            )
        });
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    for name in &only {
        dr::family(name)?;
    }
    if choice == DeviceChoice::Cuda {
        for line in dr::cuda_environment() {
            eprintln!("gm doctor: {line}");
        }
    }
    // The parent opens the device once, to report a broken setup before any child runs.
    let dev_name = {
        let dev = open()?;
        let dev_name = gm_train::trainer::device_name(&dev);
        eprintln!(
            "gm doctor: {} against gm's CPU kernels{}",
            dev_name,
            if dev.is_cpu() {
                " (the device path run on the CPU: GM_KERNELS=portable)"
            } else {
                ""
            }
        );
        dev_name
    };
    let exe = std::env::current_exe().context("cannot find the gm executable")?;
    let mut reports = Vec::new();
    for f in gm_train::doctor::FAMILIES
        .iter()
        .filter(|f| only.is_empty() || only.iter().any(|o| o == f.name))
    {
        let report = check_in_child(&exe, f.name, choice, &dev_name)?;
        eprintln!(
            "gm doctor: {:<15} {}",
            f.name,
            if report.pass { "pass" } else { "FAIL" }
        );
        reports.push(report);
    }
    println!("{}", dr::table(&reports));
    if let Some(path) = json {
        let lines: Vec<String> = reports
            .iter()
            .map(serde_json::to_string)
            .collect::<std::result::Result<_, _>>()?;
        std::fs::write(&path, lines.join("\n") + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.family.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} families failed on {dev_name}: {}",
            failed.len(),
            reports.len(),
            failed.join(", ")
        );
    }
    eprintln!(
        "gm doctor: all {} families pass on {dev_name}",
        reports.len()
    );
    Ok(())
}

/// Runs one family's check in a child process (a crash there is reported, not shared) and reads
/// its JSON report.
fn check_in_child(
    exe: &std::path::Path,
    name: &str,
    choice: DeviceChoice,
    dev_name: &str,
) -> Result<gm_train::doctor::FamilyReport> {
    use gm_train::doctor as dr;
    let out = std::process::Command::new(exe)
        .args(["doctor", "--family", name, "--device", &choice.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<dr::FamilyReport>(l).ok())
        .unwrap_or_else(|| {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            dr::failed(
                name,
                dev_name,
                format!(
                    "the check exited with {} and no report: {}",
                    out.status,
                    tail.join(" / ")
                ),
            )
        });
    Ok(report)
}

//! `gm bench`.

use super::*;
use anyhow::{bail, Result};
use gm_train::RunConfig;
use std::path::PathBuf;

/// Time the train step (forward, backward, Adam) of a preset on random data; prints JSON.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Preset or config file whose train step is timed.
    #[arg(long, required_unless_present = "ops")]
    pub config: Option<PathBuf>,
    /// Time the convolution shapes of gm's models instead, with gm's and candle's kernels.
    #[arg(long, conflicts_with = "config")]
    pub ops: bool,
    /// Batch size of `--ops`.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Only these `--ops` cases (names as printed); all when empty.
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Backends of `--ops`: gm, candle, or both.
    #[arg(long, default_value = "both", value_parser = ["gm", "candle", "both"])]
    pub backend: String,
    /// Gradients of the `--ops` fwd+bwd cases, one line each: both (as named), input (the data
    /// gradient only), weight (the filter gradient only), none (the forward alone).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "both")]
    pub grads: Vec<gm_train::opbench::Grads>,
    /// Time the model's sampler for this many images instead (fresh weights; `--steps` timed
    /// calls after `--warmup` untimed ones); prints images per second.
    #[arg(long, conflicts_with = "ops")]
    pub sample: Option<usize>,
    /// Time the full evaluation (every estimator, as `gm eval` runs it: `eval.iwae_k` for the
    /// VAEs, the diffusion bound, ODE likelihoods) of this many random images in one batch
    /// instead (fresh weights); prints images per second.
    #[arg(long, conflicts_with_all = ["ops", "sample"])]
    pub eval: Option<usize>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        config,
        ops,
        batch,
        cases,
        backend,
        grads,
        sample,
        eval,
        overrides,
        steps,
        warmup,
        device: d,
    } = args;
    let dev = device(&d)?;
    if ops {
        use gm_train::opbench::{run_case, Backend, CASES};
        for name in &cases {
            if !CASES.iter().any(|c| c.name == name) {
                let known: Vec<_> = CASES.iter().map(|c| c.name).collect();
                bail!("unknown --case {name}; known: {}", known.join(", "));
            }
        }
        let backends: &[Backend] = match backend.as_str() {
            "gm" => &[Backend::Gm],
            "candle" => &[Backend::Candle],
            _ => &[Backend::Gm, Backend::Candle],
        };
        for c in CASES
            .iter()
            .filter(|c| cases.is_empty() || cases.iter().any(|n| n == c.name))
        {
            for &b in backends {
                // Cases other than fwd+bwd have one form.
                let n = if c.mode == "fwdbwd" { grads.len() } else { 1 };
                for &gr in &grads[..n] {
                    let r = run_case(c, b, gr, batch, warmup, steps.max(1), &dev)?;
                    println!("{}", serde_json::to_string(&r)?);
                }
            }
        }
        return Ok(());
    }
    let config = config.expect("clap requires --config without --ops");
    let cfg = RunConfig::load(&config, &overrides)?;
    enable_second_order_if_needed(&cfg);
    if let Some(n) = sample.or(eval) {
        if n == 0 {
            bail!("--sample and --eval must be > 0");
        }
        let r = if sample.is_some() {
            gm_train::bench::bench_sample(&cfg, &dev, n, warmup, steps.max(1))?
        } else {
            gm_train::bench::bench_eval(&cfg, &dev, n, warmup, steps.max(1))?
        };
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let r = gm_train::trainer::bench_train_step(&cfg, &dev, warmup, steps.max(1))?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

//! `gm bench`: the timed train step.

use crate::config::RunConfig;
use crate::hooks::{GradAction, Hook, LossScaler, StepContext};
use crate::optim::named_vars;
use crate::trainer::{build, group_loss, optimizers};
use anyhow::Result;
use candle_core::{Device, Tensor};
use gm_core::{grad_checkpoint, GmRng};
use std::time::Instant;

/// Timing of the train step, as `gm bench` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    /// The device the step ran on (`cpu`, `cuda:0`, …).
    pub device: String,
    pub batch_size: usize,
    /// `train.precision`: f32, bf16 or f16.
    pub precision: String,
    /// `train.gradient_checkpointing`, and the blocks one step recomputed.
    pub gradient_checkpointing: bool,
    pub recomputed_blocks: u64,
    pub threads: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    /// Training images per second at the median step time.
    pub images_per_s: f64,
    pub steps: usize,
    /// Host↔device traffic of one timed step (host-drawn noise, read-backs), averaged.
    pub upload_bytes_per_step: f64,
    pub readbacks_per_step: f64,
    /// Bytes of the batch a training step uploads on top (the benchmark reuses one batch).
    pub batch_upload_bytes: usize,
    /// Peak resident memory of the process (Linux `VmHWM`), MiB.
    pub peak_rss_mb: Option<f64>,
    /// The most heap memory live at once during a timed step, MiB: what the step needs,
    /// whatever the allocator keeps resident (`None` without [`crate::alloc::Counting`]).
    pub peak_live_mb: Option<f64>,
    /// On the CPU, what ran the f32 convolutions ([`gm_core::kernels::conv::cpu_kernels`]:
    /// `avx512`, `avx2`, `gemm`, …); `None` on other devices.
    pub conv_kernels: Option<String>,
    /// On the CPU, the vector instructions the element-wise loops (fused ops, norms, Adam) ran
    /// with ([`gm_core::kernels::simd::chosen`]: `avx512`, `avx2` or `baseline`).
    pub elementwise: Option<String>,
}

/// `n` random binary images of the model's shape with labels `0, 1, …, 9, 0, …` (the benchmarks'
/// batch; drawn from `rng`).
fn random_batch(
    cfg: &RunConfig,
    n: usize,
    rng: &mut GmRng,
    device: &Device,
) -> Result<gm_models::Batch> {
    let Some([c, h, w]) = cfg.model.image_shape() else {
        anyhow::bail!("a '{}' model reads text, not images", cfg.model.kind())
    };
    let p = rng.uniform((n, c, h, w), 0.0, 1.0, device)?;
    let labels = (0..n as u32).map(|i| i % 10).collect::<Vec<_>>();
    Ok(gm_models::Batch {
        x: rng.bernoulli(&p)?,
        labels: Some(Tensor::from_vec(labels, n, device)?),
    })
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A device's name in reports: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Times `steps` train steps (loss, backward, Adam update) on random binary images of the
/// configured batch size after `warmup` untimed ones. Each step ends by waiting for the device
/// (after the optimizer's update, so its kernels are inside the time).
pub fn bench_train_step(
    cfg: &RunConfig,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> Result<BenchReport> {
    let built = build(cfg, device)?;
    crate::trainer::check_gradient_checkpointing(cfg, built.model.as_ref())?;
    let vars = named_vars(&built.varmap);
    let t = &cfg.train;
    let (groups, mut adams) = optimizers(built.model.as_ref(), &vars, t)?;
    let mut rng = GmRng::new(0);
    let batch = random_batch(cfg, t.batch_size, &mut rng, device)?;
    let batch_upload_bytes = gm_core::traffic::bytes_of(&batch.x) + 4 * t.batch_size;
    let precision = gm_core::precision::parse(&t.precision).map_err(|e| anyhow::anyhow!(e))?;
    let mut scaler =
        (precision == Some(candle_core::DType::F16)).then(|| LossScaler::new(t.loss_scale));
    let mut times = Vec::with_capacity(steps);
    let mut peak_live = 0;
    let mut traffic = gm_core::traffic::Traffic::default();
    for i in 0..warmup + steps {
        device.synchronize()?;
        crate::alloc::reset_peak();
        let t0 = Instant::now();
        let tr0 = gm_core::traffic::snapshot();
        let autocast = gm_core::precision::Autocast::enter(precision);
        let recompute = grad_checkpoint::Enabled::enter(t.gradient_checkpointing);
        grad_checkpoint::reset_recomputed();
        for (pi, (phase, pvars)) in groups.iter().enumerate() {
            for _ in 0..phase.repeats {
                let loss = group_loss(built.model.as_ref(), phase, pi, &batch, &mut rng)?;
                let grads = match &mut scaler {
                    // f16: the loss scaler's multiply, unscale and overflow check are timed too.
                    Some(s) => {
                        let ctx = StepContext {
                            step: i + 1,
                            group: pi,
                            vars: pvars,
                            lr: t.lr,
                            last_checkpoint: None,
                        };
                        let mut g = grad_checkpoint::backward(&s.scale_loss(&ctx, loss.total)?)?;
                        if s.after_backward(&ctx, &mut g)? == GradAction::Skip {
                            continue;
                        }
                        g
                    }
                    None => grad_checkpoint::backward(&loss.total)?,
                };
                adams[pi].step(&grads, t.lr * phase.lr_scale)?;
            }
        }
        drop((autocast, recompute));
        // Wait for the device so the time covers the whole step, the update included.
        device.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            peak_live = peak_live.max(crate::alloc::peak_bytes().unwrap_or(0));
            traffic = traffic.plus(&gm_core::traffic::snapshot().since(&tr0));
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median_ms = times[times.len() / 2];
    Ok(BenchReport {
        model: cfg.model.kind().to_string(),
        device: device_name(device),
        batch_size: t.batch_size,
        precision: t.precision.clone(),
        gradient_checkpointing: t.gradient_checkpointing,
        recomputed_blocks: grad_checkpoint::recomputed(),
        threads: gm_core::kernels::par::threads(),
        median_ms,
        min_ms: times[0],
        images_per_s: t.batch_size as f64 / (median_ms / 1e3),
        steps,
        upload_bytes_per_step: traffic.upload_bytes as f64 / steps as f64,
        readbacks_per_step: traffic.readbacks as f64 / steps as f64,
        batch_upload_bytes,
        peak_rss_mb: peak_rss_mb(),
        peak_live_mb: crate::alloc::peak_bytes().map(|_| peak_live as f64 / (1 << 20) as f64),
        conv_kernels: device
            .is_cpu()
            .then(|| gm_core::kernels::conv::cpu_kernels().to_string()),
        elementwise: device
            .is_cpu()
            .then(|| gm_core::kernels::simd::chosen().name().to_string()),
    })
}

/// Timing of sampling (`gm bench --sample N`) or of the full evaluation (`gm bench --eval N`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SampleBenchReport {
    pub model: String,
    pub device: String,
    pub threads: usize,
    /// `sample` or `eval`.
    pub what: String,
    /// Images per call of the model's sampler or evaluation.
    pub n: usize,
    pub median_s: f64,
    pub min_s: f64,
    /// Images per second at the median time.
    pub images_per_s: f64,
    pub repeats: usize,
    pub peak_rss_mb: Option<f64>,
}

/// Times `repeats` calls of the model's sampler for `n` images (the configured sampler, solver
/// and steps; freshly initialised weights) after `warmup` untimed ones.
pub fn bench_sample(
    cfg: &RunConfig,
    device: &Device,
    n: usize,
    warmup: usize,
    repeats: usize,
) -> Result<SampleBenchReport> {
    let built = build(cfg, device)?;
    let mut rng = GmRng::new(0);
    time_calls(cfg, device, "sample", n, warmup, repeats, || {
        let x = built.model.sample(n, &mut rng)?.ok_or_else(|| {
            anyhow::anyhow!("a '{}' model does not sample images", cfg.model.kind())
        })?;
        // Waits for the device: the images are on the host afterwards.
        let _ = x
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(())
    })
}

/// Times `repeats` full evaluations (every estimator, as `gm eval` runs them: IWAE with
/// `eval.iwae_k` samples, the diffusion bound, ODE likelihoods) of `n` random binary images in
/// one batch (freshly initialised weights) after `warmup` untimed ones.
pub fn bench_eval(
    cfg: &RunConfig,
    device: &Device,
    n: usize,
    warmup: usize,
    repeats: usize,
) -> Result<SampleBenchReport> {
    let built = build(cfg, device)?;
    let mut rng = GmRng::new(0);
    let batch = random_batch(cfg, n, &mut rng, device)?;
    let opts = crate::eval::full_options(cfg, None)?;
    time_calls(cfg, device, "eval", n, warmup, repeats, || {
        for (_, v) in built.model.eval_metrics(&batch, &mut rng, &opts)? {
            let _ = v.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        }
        Ok(())
    })
}

/// Times `warmup + repeats` calls of `f` (each handling `n` images), keeps the last `repeats`.
fn time_calls(
    cfg: &RunConfig,
    device: &Device,
    what: &str,
    n: usize,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<SampleBenchReport> {
    let mut times = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        device.synchronize()?;
        let t0 = Instant::now();
        f()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median_s = times[times.len() / 2];
    Ok(SampleBenchReport {
        model: cfg.model.kind().to_string(),
        device: device_name(device),
        threads: gm_core::kernels::par::threads(),
        what: what.to_string(),
        n,
        median_s,
        min_s: times[0],
        images_per_s: n as f64 / median_s,
        repeats,
        peak_rss_mb: peak_rss_mb(),
    })
}

//! gm's samplers against diffusers' own schedulers: the same schedule (diffusers' `ᾱ_t`), the
//! same spacing, the same `x_T` and the same deterministic stand-in network; every network time
//! and every intermediate `x` of DDIM, DDPM (mean and standard deviation), DPM-Solver++(2M),
//! UniPC and Euler/Heun on Karras sigmas must agree.
//!
//! Needs a Python with torch and diffusers (`$GM_PYTHON`, else `.venv/bin/python`, else
//! `python3`); `scripts/test.sh` installs them. Without one the test says so and passes, unless
//! `GM_REQUIRE_PEERS=1` (set by `.ci/run`), where a missing peer fails it.
//!
//! diffusers computes its σ ladders and the multistep and Euler updates in f32; gm in f64. The
//! tolerance is relative to the trajectory's scale: `|gm − diffusers| ≤ 1e-6 · (1 + max |x|)`
//! (measured with diffusers 0.42.1: 4.9e-7 at worst, over 64 cases).

use gm::candle::{DType, Device, Tensor};
use gm::diffusion::{NoiseSchedule, Prediction};
use gm::samplers::{SamplerConfig, SamplerKind};
use gm::GmRng;
use serde_json::Value;

mod common;
use common::{peer_python, run_script_json};

/// The stand-in network of `scripts/diffusers_schedulers.py`.
fn fake_model(x: &Tensor, t: f64) -> gm::candle::Result<Tensor> {
    let a = (x.tanh()? * (0.6 * (t / 700.0).cos()))?;
    let b = (x.affine(2.0, t / 300.0)?.sin()? * 0.3)?;
    a + b
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn every_sampler_step_equals_diffusers() {
    let Some(py) = peer_python("torch, diffusers") else {
        return;
    };
    let r = run_script_json(&py, "diffusers_schedulers.py", &[]);
    let schedule = NoiseSchedule::from_alphas_cumprod(floats(&r["alphas_cumprod"])).unwrap();
    let shape: Vec<usize> = r["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let x_start = Tensor::from_vec(floats(&r["x_start"]), shape.as_slice(), &Device::Cpu).unwrap();
    let mut worst = 0f64;
    let cases = r["cases"].as_array().unwrap();
    for case in cases {
        let name = format!(
            "{} {} {} steps, {}{}{}{}",
            case["kind"].as_str().unwrap(),
            case["spacing"].as_str().unwrap(),
            case["steps"],
            case["prediction"].as_str().unwrap(),
            if case["clip"].as_bool() == Some(true) {
                ", clip"
            } else {
                ""
            },
            if case["large"].as_bool() == Some(true) {
                ", large"
            } else {
                ""
            },
            case["eta"]
                .as_f64()
                .map(|e| format!(", eta {e}"))
                .unwrap_or_default(),
        );
        let cfg: SamplerConfig = serde_json::from_value(serde_json::json!({
            "kind": case["kind"],
            "steps": case["steps"],
            "spacing": case["spacing"],
            "eta": case["eta"].as_f64().unwrap_or(0.0),
            "clip_sample": case["clip"].as_bool().unwrap_or(false),
            "large_variance": case["large"].as_bool().unwrap_or(false),
        }))
        .unwrap();
        let prediction: Prediction = serde_json::from_value(case["prediction"].clone()).unwrap();
        let times = floats(&case["times"]);
        let xs: Vec<Vec<f64>> = case["xs"].as_array().unwrap().iter().map(floats).collect();
        let stds = floats(&case["stds"]);
        let scale = 1.0 + xs.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
        let check = |what: &str, i: usize, got: &Tensor, want: &[f64]| -> f64 {
            let got: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
            let err = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(
                err < 1e-6,
                "{name}: {what} after call {i}: relative error {err:e}"
            );
            err
        };
        let discrete = matches!(cfg.kind, SamplerKind::Ddpm | SamplerKind::Ddim);
        if discrete {
            // Compared through the step's Gaussian: mean and standard deviation.
            let d = cfg.discrete(&schedule, prediction).unwrap();
            let ts: Vec<f64> = d.steps().iter().map(|&t| t as f64).collect();
            assert_eq!(ts, times, "{name}: timesteps");
            let mut x = x_start.clone();
            for (i, &t) in ts.iter().enumerate() {
                let out = fake_model(&x, t).unwrap();
                let (mean, std) = d.mean_std(&out, i, &x).unwrap();
                worst = worst.max(check("mean", i, &mean, &xs[i]));
                if i + 1 == ts.len() {
                    // The one deliberate difference: gm adds no noise in the step that returns
                    // x_0; diffusers' DDPM does when that step is not t = 0 (trailing spacing)
                    // with the β_t variance.
                    assert_eq!(std, 0.0, "{name}: the last step adds noise");
                    continue;
                }
                assert!(
                    (std - stds[i]).abs() < 1e-6,
                    "{name}: std at call {i}: {std} vs {}",
                    stds[i]
                );
                x = mean;
            }
        } else {
            let mut sm = cfg.build(&schedule, prediction).unwrap();
            assert_eq!(sm.timesteps().len(), times.len(), "{name}: NFE");
            assert_eq!(sm.timesteps().len(), cfg.kind.nfe(cfg.steps), "{name}: NFE");
            for (a, b) in sm.timesteps().iter().zip(&times) {
                assert!(
                    (a - b).abs() < 1e-3,
                    "{name}: times {:?} vs {times:?}",
                    sm.timesteps()
                );
            }
            let s0 = case["init_sigma"].as_f64().unwrap();
            assert!(
                (sm.init_noise_sigma() - s0).abs() < 1e-5 * s0,
                "{name}: init_noise_sigma {} vs {s0}",
                sm.init_noise_sigma()
            );
            let mut x = (&x_start * sm.init_noise_sigma()).unwrap();
            let mut rng = GmRng::new(0);
            for (i, want) in xs.iter().enumerate() {
                let t = sm.timesteps()[i];
                let out = fake_model(&sm.scale_model_input(&x, i).unwrap(), t).unwrap();
                x = sm.step(&out, i, &x, &mut rng).unwrap();
                worst = worst.max(check("x", i, &x, want));
            }
        }
        assert_eq!(x_start.dtype(), DType::F64);
    }
    eprintln!(
        "{} cases against diffusers {}: worst relative error {worst:.2e}",
        cases.len(),
        r["diffusers"]
    );
}

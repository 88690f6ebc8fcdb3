//! A folder diffusers itself writes (`DDIMPipeline.save_pretrained`: a `UNet2DModel` with
//! multi-head attention and `[cos, sin]` time features, and its DDIM scheduler) read by gm: the
//! UNet's output equals diffusers' on the same input and timesteps (to 1e-5 of its scale;
//! measured 1.1e-6), and gm's 10-step DDIM from diffusers' `x_T` equals `DDIMPipeline`'s images
//! to f32 round-off (measured 1.8e-5 on pixels in [0, 1]).
//!
//! Needs a Python with torch and diffusers (see `tests/diffusers_schedulers.rs`).

use gm::candle::{Device, Tensor};
use gm::ddpm::{Ddpm, DdpmConfig};
use gm::GmRng;
use serde_json::Value;

mod common;
use common::{peer_python, run_script_json};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &Tensor, b: &[f32]) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn a_diffusers_folder_loads_and_agrees_with_diffusers() {
    let Some(py) = peer_python("torch, diffusers") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ddim-pipeline");
    let r = run_script_json(&py, "diffusers_unet.py", &[dir.as_os_str()]);

    let im = gm::diffusers::import(&dir).unwrap();
    let cfg: &DdpmConfig = im.config.model.get().unwrap();
    assert_eq!(cfg.unet.head_dim, 8);
    assert!(cfg.unet.flip_sin_to_cos);
    let loaded = gm::checkpoint::load_checkpoint(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.built.model.kind(), "ddpm");
    // The same weights, as a concrete Ddpm.
    let vm = gm::candle_nn::VarMap::new();
    let vb = gm::candle_nn::VarBuilder::from_varmap(&vm, gm::candle::DType::F32, &Device::Cpu);
    let ddpm = Ddpm::new(cfg.clone(), vb).unwrap();
    gm::checkpoint::set_vars(&vm, &im.tensors, "", &dir, true).unwrap();

    let x = Tensor::from_vec(floats(&r["x"]), (2, 1, 28, 28), &Device::Cpu).unwrap();
    for (k, t) in r["timesteps"].as_array().unwrap().iter().enumerate() {
        let t = t.as_u64().unwrap() as usize;
        let ours = ddpm.predict(&x, &[t, t], None, 1.0).unwrap();
        let want = floats(&r["forward"][k]);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&ours, &want);
        eprintln!("forward at t = {t}: max |gm − diffusers| = {d:.2e} (outputs up to {scale:.2})");
        assert!(d < 1e-5 * scale.max(1.0), "t = {t}: {d}");
    }

    let x_t = Tensor::from_vec(floats(&r["x_T"]), (2, 1, 28, 28), &Device::Cpu).unwrap();
    let mut sampler = cfg.sampler.clone();
    sampler.steps = 10;
    let img = ddpm
        .sample_from(x_t, None, &sampler, &mut GmRng::new(0))
        .unwrap();
    let d = max_diff(&img, &floats(&r["ddim_10"]));
    eprintln!("DDIM 10 steps: max |gm − DDIMPipeline| = {d:.2e} (pixels in [0, 1])");
    // Ten f32 network calls whose round-off (≈1e-6, above) DDIM scales by 1/√ᾱ_t (up to 61
    // here) into x̂_0: measured 1.8e-5, 1/200 of one grey level.
    assert!(d < 1e-4, "DDIM sample differs by {d}");
}

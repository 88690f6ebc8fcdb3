//! Score models: trained by denoising or sliced score matching on 2-D Gaussian data, the
//! probability-flow ODE's likelihood lands on the data's entropy and the samplers on its moments;
//! configs that cannot work are refused with the key named.

use candle_core::{DType, Device};
use candle_nn::VarMap;
use gm_core::cnf::Divergence;
use gm_core::ode::SolverConfig;
use gm_core::sde::{Sde, SdeMethod, SdeSamplerConfig};
use gm_core::GmRng;
use gm_models::score::{Objective, ScoreConfig, ScoreModel};
use gm_models::{Batch, EvalOptions, Model};

mod common;

use common::{entropy, gaussian_data as data, train_on_gaussian, MU, VAR};

fn config(sde: Sde, objective: Objective) -> ScoreConfig {
    ScoreConfig {
        image_shape: [2, 1, 1],
        sde,
        hidden: vec![64, 64],
        objective,
        divergence: Divergence::Exact,
        likelihood_solver: SolverConfig::rk4(20),
        ..Default::default()
    }
}

/// Trains `cfg` for `steps` (see [`train_on_gaussian`]); the model and the first and last
/// 50-step mean losses.
fn train(cfg: ScoreConfig, steps: usize) -> (ScoreModel, f64, f64) {
    let vm = VarMap::new();
    let vb = gm_core::rng::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let model = ScoreModel::new(cfg, vb).unwrap();
    let (first, last, _) = train_on_gaussian(&vm, &model, steps);
    (model, first, last)
}

fn mean_nll(model: &ScoreModel) -> f64 {
    let mut rng = GmRng::new(2);
    let x = data(2000, &mut rng);
    let m = model
        .eval_metrics(
            &Batch { x, labels: None },
            &mut rng,
            &EvalOptions::default(),
        )
        .unwrap();
    let nll = &m.iter().find(|(k, _)| k == "nll_nats").unwrap().1;
    nll.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

/// Denoising score matching (VP and VE): the loss falls, and the probability-flow ODE's
/// `−log p` of held-out points is within 0.05 nats of the data's entropy (it cannot go below it
/// by more than the Monte-Carlo error of 2 000 points, ~0.02 nats).
#[test]
fn dsm_learns_a_gaussian_density() {
    let ve = Sde::Ve {
        sigma_min: 0.01,
        sigma_max: 5.0,
    };
    for (name, sde) in [("vp", Sde::default()), ("ve", ve)] {
        let (model, first, last) = train(config(sde, Objective::Dsm), 1500);
        let nll = mean_nll(&model);
        let h = entropy();
        println!("{name}: dsm_loss {first:.4} -> {last:.4}; nll {nll:.4} vs entropy {h:.4}");
        assert!(last < 0.8 * first, "{name}: the loss did not fall");
        assert!((nll - h).abs() < 0.05, "{name}: nll {nll} vs {h}");
    }
}

/// Sliced score matching (finite differences) learns the same density, less tightly.
#[test]
fn sliced_score_matching_learns_a_gaussian_density() {
    let (model, first, last) = train(config(Sde::default(), Objective::Ssm), 1500);
    let nll = mean_nll(&model);
    let h = entropy();
    println!("ssm: loss {first:.4} -> {last:.4}; nll {nll:.4} vs entropy {h:.4}");
    assert!(last < first, "the loss did not fall");
    assert!((nll - h).abs() < 0.1, "nll {nll} vs {h}");
}

/// Every sampler of a trained model reaches the data's mean and its variance within 20% (the
/// samplers' own accuracy, with the exact score, is checked tightly in gm-core's `sde` tests; this
/// is the model's plumbing and its learnt score together): the reverse SDE (Euler–Maruyama),
/// predictor–corrector and the probability-flow ODE on the VP model, NCSN's annealed Langevin
/// dynamics on the VE model it was designed for.
#[test]
fn every_sampler_of_a_trained_model_reaches_the_moments() {
    let ve = Sde::Ve {
        sigma_min: 0.01,
        sigma_max: 5.0,
    };
    let (vp_model, _, _) = train(config(Sde::default(), Objective::Dsm), 1500);
    let (ve_model, _, _) = train(config(ve, Objective::Dsm), 1500);
    let runs = [
        (&ve_model, SdeMethod::AnnealedLangevin, 100, 20),
        (&vp_model, SdeMethod::EulerMaruyama, 200, 1),
        (&vp_model, SdeMethod::Pc, 200, 1),
        (&vp_model, SdeMethod::Ode, 0, 1),
    ];
    for (model, method, steps, corrector_steps) in runs {
        let sampler = SdeSamplerConfig {
            method,
            steps,
            corrector_steps,
            step_lr: 1e-5,
            solver: SolverConfig::rk4(10),
            ..Default::default()
        };
        let mut rng = GmRng::new(4);
        let x = model.sample_with(4000, &sampler, &mut rng).unwrap();
        let v: Vec<Vec<f32>> = x.reshape((4000, 2)).unwrap().to_vec2().unwrap();
        for d in 0..2 {
            let col: Vec<f64> = v.iter().map(|r| r[d] as f64).collect();
            let m = col.iter().sum::<f64>() / 4000.0;
            let var = col.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 3999.0;
            println!(
                "{method:?} dim {d}: mean {m:.3} vs {}, var {var:.3} vs {}",
                MU[d], VAR[d]
            );
            assert!(
                (m - MU[d]).abs() < 0.1 * VAR[d].sqrt() + 0.03,
                "{method:?}: mean"
            );
            assert!((var / VAR[d] - 1.0).abs() < 0.2, "{method:?}: variance");
        }
    }
}

/// Configs that cannot work are refused, naming the key.
#[test]
fn bad_configs_name_their_key() {
    let base = config(Sde::default(), Objective::Dsm);
    let cases: Vec<(ScoreConfig, &str)> = vec![
        (
            ScoreConfig {
                levels: 1,
                ..base.clone()
            },
            "model.levels",
        ),
        (
            ScoreConfig {
                t_min: 0.0,
                ..base.clone()
            },
            "model.t_min",
        ),
        (
            ScoreConfig {
                hidden: vec![],
                ..base.clone()
            },
            "model.hidden",
        ),
        (
            ScoreConfig {
                sde: Sde::Ve {
                    sigma_min: 0.0,
                    sigma_max: 1.0,
                },
                ..base.clone()
            },
            "model.sde.sigma_min",
        ),
        (
            ScoreConfig {
                sampler: SdeSamplerConfig {
                    t_min: 1.5,
                    ..Default::default()
                },
                ..base.clone()
            },
            "model.sampler.t_min",
        ),
        (
            ScoreConfig {
                likelihood_solver: SolverConfig::fixed(gm_core::ode::Method::Unipc, 10),
                ..base.clone()
            },
            "model.likelihood_solver",
        ),
    ];
    for (cfg, key) in cases {
        let err = cfg.validate().unwrap_err();
        assert!(err.contains(key), "{key}: {err}");
    }
}

//! Variational EM (the variational Bayesian Gaussian mixture) against scikit-learn's
//! `BayesianGaussianMixture`: the same points and starting responsibilities
//! (`scripts/vbgmm_sklearn.py` wrote `tests/data/vbgmm_reference.json`), the parameters after
//! every iteration and the changes of the lower bound.

use gm_core::vbgmm::{VbGmm, VbGmmPriors};
use nalgebra::DMatrix;

const N: usize = 60;
const K: usize = 3;

/// The script's `points()` and `responsibilities()`.
fn data() -> (DMatrix<f64>, DMatrix<f64>) {
    let x = DMatrix::from_fn(N, 2, |i, j| {
        let (f, c) = (i as f64, (i % 3) as f64);
        match j {
            0 => (1.3 * f).sin() + 3.0 * (c - 1.0),
            _ => (0.7 * f).cos() * (1.0 + 0.5 * c) + c,
        }
    });
    let mut r = DMatrix::from_fn(N, K, |i, k| 1.0 + ((i * (k + 2)) % 5) as f64);
    for mut row in r.row_iter_mut() {
        let s = row.sum();
        row /= s;
    }
    (x, r)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    let mut out = Vec::new();
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|v| out.extend(floats(v))),
        v => out.push(v.as_f64().unwrap()),
    }
    out
}

fn assert_close(what: &str, it: usize, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "iteration {it}: {what} {g} vs {w}"
        );
    }
}

#[test]
fn variational_em_matches_scikit_learn_iteration_by_iteration() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vbgmm_reference.json");
    let reference: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (x, resp) = data();
    let priors = VbGmmPriors::defaults(&x, K);
    let mut m = VbGmm::from_responsibilities(&x, &resp, priors, 1e-6).unwrap();
    let trace = m.clone().fit(&x, reference.len()).unwrap();
    for (it, r) in reference.iter().enumerate() {
        m.fit(&x, 1).unwrap();
        let covs: Vec<f64> = m
            .covariances
            .iter()
            .flat_map(|c| c.transpose().iter().copied().collect::<Vec<_>>())
            .collect();
        let means: Vec<f64> = m.means.iter().flat_map(|v| v.iter().copied()).collect();
        assert_close(
            "weight_concentration",
            it,
            &m.weight_concentration,
            &floats(&r["weight_concentration"]),
            1e-10,
        );
        assert_close(
            "mean_precision",
            it,
            &m.mean_precision,
            &floats(&r["mean_precision"]),
            1e-10,
        );
        assert_close("means", it, &means, &floats(&r["means"]), 1e-10);
        assert_close(
            "degrees_of_freedom",
            it,
            &m.degrees_of_freedom,
            &floats(&r["degrees_of_freedom"]),
            1e-10,
        );
        assert_close("covariances", it, &covs, &floats(&r["covariances"]), 1e-10);
        if it > 0 {
            // scikit-learn's bound drops constants: compare its changes.
            let want = r["lower_bound"].as_f64().unwrap()
                - reference[it - 1]["lower_bound"].as_f64().unwrap();
            let got = trace.lower_bound[it] - trace.lower_bound[it - 1];
            assert!(
                (got - want).abs() < 1e-9,
                "iteration {it}: bound change {got} vs {want}"
            );
        }
    }
    // Coordinate ascent: the bound never falls.
    for w in trace.lower_bound.windows(2) {
        assert!(w[1] >= w[0] - 1e-10, "{:?}", trace.lower_bound);
    }
}

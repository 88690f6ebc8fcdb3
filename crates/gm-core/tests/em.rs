//! EM on a Gaussian mixture against scikit-learn (`scripts/gmm_reference.py` made the data and
//! the reference numbers), and the coin MLE.

use gm_core::em::{coin_mle, coin_mle_gradient_ascent, EmOptions, GaussianMixture};
use nalgebra::{DMatrix, DVector};

fn load() -> (DMatrix<f64>, serde_json::Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let csv = std::fs::read_to_string(dir.join("gmm_data.csv")).unwrap();
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .map(|l| l.split(',').map(|v| v.trim().parse().unwrap()).collect())
        .collect();
    let x = DMatrix::from_fn(rows.len(), 2, |i, j| rows[i][j]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gmm_reference.json")).unwrap())
            .unwrap();
    (x, r)
}

fn vecs(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn em_matches_scikit_learn() {
    let (x, r) = load();
    let w: Vec<f64> = r["weights_init"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let means = vecs(&r["means_init"])
        .into_iter()
        .map(DVector::from_vec)
        .collect();
    let covs = r["covariances_init"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let m = vecs(c);
            DMatrix::from_fn(2, 2, |i, j| m[i][j])
        })
        .collect();
    let mut gmm = GaussianMixture::new(w, means, covs).unwrap();
    let init_ll = gmm.score(&x).unwrap();
    let rep = gmm
        .fit_em(
            &x,
            &EmOptions {
                max_iter: r["max_iter"].as_u64().unwrap() as usize,
                tol: r["tol"].as_f64().unwrap(),
                reg_covar: r["reg_covar"].as_f64().unwrap(),
            },
        )
        .unwrap();
    // EM never decreases the likelihood.
    for pair in rep.trace.windows(2) {
        assert!(pair[1] >= pair[0] - 1e-12, "trace decreased: {pair:?}");
    }
    let ll = gmm.score(&x).unwrap();
    assert!(ll > init_ll + 0.5, "EM did not improve: {init_ll} -> {ll}");
    let want = r["mean_log_likelihood"].as_f64().unwrap();
    assert!((ll - want).abs() < 1e-8, "gm {ll} vs sklearn {want}");
    assert_eq!(rep.converged, r["converged"].as_bool().unwrap());
    assert_eq!(rep.n_iter as u64, r["n_iter"].as_u64().unwrap());
    let want_means = vecs(&r["means"]);
    for (m, w) in gmm.means.iter().zip(want_means) {
        for (a, b) in m.iter().zip(w) {
            assert!((a - b).abs() < 1e-6, "mean {a} vs {b}");
        }
    }
}

#[test]
fn coin_closed_form_equals_gradient_ascent() {
    for (h, t) in [(7u64, 3u64), (1, 9), (50, 50), (123, 77)] {
        let a = coin_mle(h, t).unwrap();
        let b = coin_mle_gradient_ascent(h, t, 3000, 1.0).unwrap();
        assert!((a - b).abs() < 1e-6, "{h}H {t}T: closed {a} vs ascent {b}");
    }
    assert!(coin_mle(0, 0).is_err());
}

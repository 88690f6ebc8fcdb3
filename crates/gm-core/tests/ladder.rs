//! Seed 001's ladder: exact EM, Monte Carlo EM and generalized EM on mixtures with a known
//! optimum — the bound's monotonicity, its tightness after the exact E-step, and the optimum each
//! rung reaches.

use gm_core::em::GaussianMixture;
use gm_core::ladder::{
    exact_em, generalized_em, monte_carlo_em, score, BernoulliMixture, GaussianLadder, LadderTrace,
    LatentMixture,
};
use gm_core::GmRng;
use nalgebra::{DMatrix, DVector};

/// 600 binary vectors of 12 pixels from three well-separated prototypes.
fn binary_data() -> DMatrix<f64> {
    let mut rng = GmRng::new(11);
    let protos = [
        [0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.2, 0.8, 0.2, 0.8],
        [0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.8, 0.2, 0.8, 0.2],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5],
    ];
    let n = 600;
    let mut v = Vec::with_capacity(n * 12);
    for i in 0..n {
        let p = &protos[[0, 0, 1, 2][i % 4]];
        v.extend(p.iter().map(|&p| f64::from(rng.uniform_f64() < p)));
    }
    DMatrix::from_row_slice(n, 12, &v)
}

fn start(c: f64) -> BernoulliMixture {
    BernoulliMixture::random(3, 12, c, &mut GmRng::new(5))
}

/// The bound never falls: M-steps raise it at fixed q, E-steps raise it at fixed θ.
fn assert_monotone(trace: &LadderTrace, what: &str) {
    for (t, s) in trace.iter().enumerate() {
        assert!(
            s.elbo_after_m >= s.elbo_after_e - 1e-12,
            "{what} iteration {t}: {s:?}"
        );
        if let Some(next) = trace.get(t + 1) {
            assert!(
                next.elbo_after_e >= s.elbo_after_m - 1e-12,
                "{what} iteration {t}: {s:?} -> {next:?}"
            );
        }
    }
}

#[test]
fn exact_em_makes_the_bound_tight_and_never_lowers_it() {
    let x = binary_data();
    for c in [0.0, 0.5] {
        let mut m = start(c);
        let trace = exact_em(&mut m, &x, 60).unwrap();
        assert_monotone(&trace, "exact EM");
        for s in &trace {
            // q = the posterior: ELBO = log-likelihood.
            assert!((s.elbo_after_e - s.log_likelihood).abs() < 1e-10, "{s:?}");
        }
        let last = trace.last().unwrap();
        assert!(
            last.log_likelihood > trace[0].log_likelihood + 1.0,
            "{trace:?}"
        );
        // Converged: the last iterations change nothing measurable.
        assert!(
            (last.elbo_after_m - last.elbo_after_e).abs() < 1e-9,
            "{last:?}"
        );
    }
}

#[test]
fn generalized_em_never_lowers_the_bound_and_reaches_the_em_optimum() {
    let x = binary_data();
    let mut em = start(0.5);
    exact_em(&mut em, &x, 300).unwrap();
    let mut gem = start(0.5);
    let trace = generalized_em(&mut gem, &x, 400, 5, 20.0).unwrap();
    assert_monotone(&trace, "generalized EM");
    let (a, b) = (score(&em, &x).unwrap(), score(&gem, &x).unwrap());
    assert!((a - b).abs() < 1e-9, "EM {a} vs generalized EM {b}");
    assert!(
        close_params(&em, &gem) < 1e-5,
        "parameters differ by {}",
        close_params(&em, &gem)
    );
}

#[test]
fn monte_carlo_em_reaches_the_em_optimum_within_its_noise() {
    let x = binary_data();
    let mut em = start(0.5);
    exact_em(&mut em, &x, 300).unwrap();
    let mut mc = start(0.5);
    // 2, 4, 6, … posterior draws per point: the noise of q shrinks as 1/√S.
    let trace = monte_carlo_em(&mut mc, &x, 60, |t| 2 * (t + 1), &mut GmRng::new(9)).unwrap();
    assert_eq!(trace.len(), 60);
    let (a, b) = (score(&em, &x).unwrap(), score(&mc, &x).unwrap());
    // 120 draws per point in the last E-step: q's error is ~0.05 per point and component, which
    // moves the parameters by ~0.05/√(N/K) ≈ 0.004 and the log-likelihood (at a maximum) by
    // about its square (measured: 0.0017 and 9e-6 nats).
    assert!(b <= a + 1e-9, "MCEM {b} above the EM optimum {a}");
    assert!(a - b < 1e-4, "EM {a} vs MCEM {b}");
    assert!(
        close_params(&em, &mc) < 0.01,
        "parameters differ by {}",
        close_params(&em, &mc)
    );
}

/// The largest difference between two mixtures' parameters, components matched by weight order
/// of their first pixel probability.
fn close_params(a: &BernoulliMixture, b: &BernoulliMixture) -> f64 {
    let order = |m: &BernoulliMixture| {
        let mut o: Vec<usize> = (0..m.weights.len()).collect();
        o.sort_by(|&i, &j| m.probs.row(i).sum().total_cmp(&m.probs.row(j).sum()));
        o
    };
    let (oa, ob) = (order(a), order(b));
    oa.iter()
        .zip(&ob)
        .map(|(&i, &j)| {
            let dw = (a.weights[i] - b.weights[j]).abs();
            let dp = (a.probs.row(i) - b.probs.row(j)).abs().max();
            dw.max(dp)
        })
        .fold(0.0, f64::max)
}

/// `q_gradient` against central differences of `(Q + log p(θ)) / N`, in f64.
fn check_gradient(model: &mut impl LatentMixture, x: &DMatrix<f64>) {
    let (_, log_resp) = gm_core::ladder::posterior(&model.joint_log_prob(x).unwrap());
    let q = log_resp.map(f64::exp);
    let n = x.nrows() as f64;
    let objective = |m: &dyn LatentMixtureDyn| m.q_value(x, &q) / n;
    let g = model.q_gradient(x, &q).unwrap();
    let theta = model.unconstrained();
    let h = 1e-6;
    for i in 0..theta.len() {
        let mut t = theta.clone();
        t[i] += h;
        model.set_unconstrained(&t).unwrap();
        let up = objective(model);
        t[i] -= 2.0 * h;
        model.set_unconstrained(&t).unwrap();
        let down = objective(model);
        model.set_unconstrained(&theta).unwrap();
        let fd = (up - down) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "parameter {i}: {} vs {fd}",
            g[i]
        );
    }
}

trait LatentMixtureDyn {
    fn q_value(&self, x: &DMatrix<f64>, q: &DMatrix<f64>) -> f64;
}

impl<M: LatentMixture> LatentMixtureDyn for M {
    fn q_value(&self, x: &DMatrix<f64>, q: &DMatrix<f64>) -> f64 {
        let j = self.joint_log_prob(x).unwrap();
        j.iter().zip(q.iter()).map(|(j, q)| j * q).sum::<f64>() + self.log_prior()
    }
}

#[test]
fn gradients_of_q_match_finite_differences() {
    let x = binary_data().rows(0, 40).into_owned();
    let mut b = BernoulliMixture::random(3, 12, 0.7, &mut GmRng::new(2));
    check_gradient(&mut b, &x);

    let pts = DMatrix::from_fn(30, 2, |i, j| ((i * 7 + j * 3) % 11) as f64 / 3.0 - 1.5);
    let mut g = GaussianLadder {
        gmm: GaussianMixture::new(
            vec![0.3, 0.7],
            vec![
                DVector::from_vec(vec![-0.5, 0.2]),
                DVector::from_vec(vec![0.8, -0.1]),
            ],
            vec![
                DMatrix::from_row_slice(2, 2, &[1.0, 0.3, 0.3, 0.8]),
                DMatrix::from_row_slice(2, 2, &[0.6, -0.1, -0.1, 1.2]),
            ],
        )
        .unwrap(),
        reg_covar: 1e-6,
    };
    check_gradient(&mut g, &pts);
}

/// The Gaussian mixture climbs the same ladder: exact EM is `GaussianMixture::fit_em`'s step,
/// generalized EM (weights and means by gradient) never lowers the bound.
#[test]
fn the_gaussian_mixture_climbs_the_same_ladder() {
    let mut rng = GmRng::new(4);
    let v: Vec<f64> = (0..400)
        .flat_map(|i| {
            let c = if i % 2 == 0 { -2.0 } else { 2.0 };
            [
                c + rng.uniform_f64() - 0.5,
                0.5 * c + rng.uniform_f64() - 0.5,
            ]
        })
        .collect();
    let x = DMatrix::from_row_slice(400, 2, &v);
    let init = || GaussianLadder {
        gmm: GaussianMixture::new(
            vec![0.5, 0.5],
            vec![
                DVector::from_vec(vec![-1.0, 0.0]),
                DVector::from_vec(vec![1.0, 0.0]),
            ],
            vec![DMatrix::identity(2, 2), DMatrix::identity(2, 2)],
        )
        .unwrap(),
        reg_covar: 1e-6,
    };
    let mut em = init();
    let trace = exact_em(&mut em, &x, 30).unwrap();
    assert_monotone(&trace, "Gaussian EM");
    let mut reference = init().gmm;
    let r = reference
        .fit_em(
            &x,
            &gm_core::em::EmOptions {
                max_iter: 30,
                tol: 0.0,
                reg_covar: 1e-6,
            },
        )
        .unwrap();
    for (s, want) in trace.iter().zip(&r.trace) {
        assert!(
            (s.log_likelihood - want).abs() < 1e-12,
            "{} vs {want}",
            s.log_likelihood
        );
    }
    let mut gem = init();
    assert_monotone(
        &generalized_em(&mut gem, &x, 30, 3, 1.0).unwrap(),
        "Gaussian generalized EM",
    );
}

/// Variational EM on the mixture of Bernoullis: the ELBO never falls, and with one component
/// (no latent choice, a conjugate Beta–Bernoulli model) mean field is exact: the ELBO equals the
/// evidence `Σ_d log B(a₀ + on_d, b₀ + off_d) − log B(a₀, b₀)`.
#[test]
fn variational_em_never_lowers_its_bound_and_is_exact_when_it_can_be() {
    use gm_core::ladder::VbBernoulliMixture;
    use gm_core::vbgmm::ln_gamma;
    let x = binary_data();
    let mut vb = VbBernoulliMixture::around(&start(0.0), 10.0, 1.0, 1.0, 1.0);
    let trace = vb.fit(&x, 40).unwrap();
    assert_monotone(&trace, "variational EM");
    assert!(
        trace[39].elbo_after_m > trace[0].elbo_after_e + 0.5,
        "{trace:?}"
    );

    let one = BernoulliMixture::new(vec![1.0], DMatrix::from_element(1, 12, 0.5), 0.0).unwrap();
    let mut vb = VbBernoulliMixture::around(&one, 2.0, 1.0, 0.7, 1.3);
    let t = vb.fit(&x, 2).unwrap();
    let ln_beta = |a: f64, b: f64| ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b);
    let n = x.nrows() as f64;
    let evidence: f64 = (0..12)
        .map(|d| {
            let on = x.column(d).sum();
            ln_beta(0.7 + on, 1.3 + n - on) - ln_beta(0.7, 1.3)
        })
        .sum();
    assert!(
        (t[1].elbo_after_m * n - evidence).abs() < 1e-8,
        "{} vs {evidence}",
        t[1].elbo_after_m * n
    );
}

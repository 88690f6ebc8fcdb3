"""Reference values for gm_core::vbgmm from scikit-learn's BayesianGaussianMixture.

Both start from the same responsibilities on the same points (formulas, no random numbers), run
scikit-learn's own E-step / M-step / lower-bound methods in the order of its fit loop, and this
script prints the parameters after every iteration and the lower bound's changes as JSON, which
crates/gm-core/tests/data/vbgmm_reference.json holds (read by crates/gm-core/tests/vbgmm.rs).

    python3 scripts/vbgmm_sklearn.py > crates/gm-core/tests/data/vbgmm_reference.json
"""
import json

import numpy as np
from sklearn.mixture import BayesianGaussianMixture

N, D, K, ITERS = 60, 2, 3, 6


def points():
    i = np.arange(N, dtype=np.float64)
    c = i % 3
    return np.stack([np.sin(1.3 * i) + 3.0 * (c - 1), np.cos(0.7 * i) * (1 + 0.5 * c) + c], axis=1)


def responsibilities():
    i = np.arange(N)[:, None]
    k = np.arange(K)[None, :]
    r = 1.0 + ((i * (k + 2)) % 5).astype(np.float64)
    return r / r.sum(axis=1, keepdims=True)


def main():
    x, resp = points(), responsibilities()
    m = BayesianGaussianMixture(
        n_components=K,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_distribution",
        reg_covar=1e-6,
    )
    m._check_parameters(x)
    m._initialize(x, resp)
    out = []
    for _ in range(ITERS):
        log_prob_norm, log_resp = m._e_step(x)
        m._m_step(x, log_resp)
        lb = m._compute_lower_bound(log_resp, log_prob_norm)
        out.append(
            {
                "lower_bound": float(lb),
                "weight_concentration": m.weight_concentration_.tolist(),
                "mean_precision": m.mean_precision_.tolist(),
                "means": m.means_.tolist(),
                "degrees_of_freedom": m.degrees_of_freedom_.tolist(),
                "covariances": m.covariances_.tolist(),
            }
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Reference values for gm-core's EM test: scikit-learn's GaussianMixture on fixed data.

Writes crates/gm-core/tests/data/gmm_data.csv (the points) and gmm_reference.json (the initial
parameters and sklearn's fitted result). Run: python3 scripts/gmm_reference.py
"""
import json
import pathlib

import numpy as np
from sklearn.mixture import GaussianMixture

out = pathlib.Path(__file__).resolve().parent.parent / "crates/gm-core/tests/data"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(1)
centres = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])
covs = [np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([[0.6, -0.2], [-0.2, 1.2]]), np.eye(2) * 0.8]
x = np.concatenate([rng.multivariate_normal(c, s, size=n) for c, s, n in zip(centres, covs, [150, 100, 50])])
x = np.round(x, 6)  # what the CSV stores is exactly what both sides read
np.savetxt(out / "gmm_data.csv", x, delimiter=",", fmt="%.6f")

weights_init = np.array([1 / 3, 1 / 3, 1 / 3])
means_init = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
precisions_init = np.array([np.eye(2)] * 3)
gm = GaussianMixture(
    n_components=3,
    covariance_type="full",
    tol=1e-8,
    reg_covar=1e-6,
    max_iter=500,
    weights_init=weights_init,
    means_init=means_init,
    precisions_init=precisions_init,
)
gm.fit(x)
ref = {
    "weights_init": weights_init.tolist(),
    "means_init": means_init.tolist(),
    "covariances_init": [np.linalg.inv(p).tolist() for p in precisions_init],
    "tol": 1e-8,
    "reg_covar": 1e-6,
    "max_iter": 500,
    "n_iter": int(gm.n_iter_),
    "converged": bool(gm.converged_),
    "mean_log_likelihood": float(gm.score(x)),
    "weights": gm.weights_.tolist(),
    "means": gm.means_.tolist(),
}
(out / "gmm_reference.json").write_text(json.dumps(ref, indent=1))
print(json.dumps(ref, indent=1))

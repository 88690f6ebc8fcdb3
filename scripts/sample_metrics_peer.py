"""Reference values for gm's sample-quality metrics from the peers' own code: KID by
torchmetrics' `poly_mmd` (the unbiased cubic-kernel MMD² of Bińkowski et al.), precision, recall,
density and coverage by the `prdc` package (Naeem et al.).

    python scripts/sample_metrics_peer.py FEATURES.json
FEATURES.json: {"fake": [[...], ...], "real": [[...], ...], "k": 5}; prints one JSON object.
"""
import contextlib
import io
import json
import sys

import numpy as np
import torch
from prdc import compute_prdc
from torchmetrics.image.kid import poly_mmd


def main():
    with open(sys.argv[1]) as f:
        d = json.load(f)
    fake = np.asarray(d["fake"], dtype=np.float64)
    real = np.asarray(d["real"], dtype=np.float64)
    kid = poly_mmd(torch.from_numpy(real), torch.from_numpy(fake)).item()
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        p = compute_prdc(real, fake, d["k"])
    print(json.dumps({"kid": kid, **{k: float(v) for k, v in p.items()}}))


if __name__ == "__main__":
    main()

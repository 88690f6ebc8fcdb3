"""PyTorch reference values for gm's convolution ops (crates/gm-core/tests/conv.rs).

    python3 scripts/conv_reference.py   # writes crates/gm-core/tests/data/conv_reference.safetensors

For each case: inputs x, weight w and an upstream gradient r drawn in float64 from a seeded numpy
generator; PyTorch (float64) computes y = conv2d(x, w) or conv_transpose2d(x, w) and the gradients
of sum(y * r) with respect to x and w. The case list (parameters) is stored in the file's metadata.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates/gm-core/tests/data/conv_reference.safetensors")

# op, N, C_in, H, W, C_out, (kH, kW), stride, padding, dilation, groups, output_padding
CASES = [
    ("conv", 1, 3, 5, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    ("conv", 2, 4, 9, 6, 6, (3, 3), (2, 2), (0, 0), (1, 1), 2, (0, 0)),
    ("conv", 2, 2, 8, 8, 3, (2, 3), (2, 1), (3, 2), (1, 1), 1, (0, 0)),
    ("conv", 1, 3, 11, 10, 3, (3, 3), (1, 1), (2, 2), (2, 2), 3, (0, 0)),
    ("conv", 3, 5, 7, 8, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1, (0, 0)),
    ("conv", 2, 2, 7, 9, 4, (5, 5), (2, 2), (2, 2), (1, 1), 1, (0, 0)),
    ("conv", 20, 2, 6, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    ("conv", 2, 1, 7, 8, 2, (3, 3), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    ("conv", 1, 2, 9, 9, 2, (7, 7), (1, 1), (3, 3), (1, 1), 1, (0, 0)),
    ("transpose", 2, 4, 7, 7, 2, (4, 4), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    ("transpose", 1, 3, 5, 6, 4, (3, 3), (2, 2), (1, 1), (1, 1), 1, (1, 1)),
    ("transpose", 2, 4, 4, 5, 6, (3, 3), (1, 1), (0, 0), (2, 2), 2, (0, 0)),
    ("transpose", 16, 3, 3, 3, 2, (4, 4), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    ("transpose", 1, 2, 5, 4, 3, (3, 2), (2, 3), (2, 0), (1, 1), 1, (1, 2)),
]


def main():
    rng = np.random.default_rng(20261123)
    tensors, meta = {}, []
    for i, (op, n, ci, h, w, co, k, s, p, d, g, op_pad) in enumerate(CASES):
        x = rng.standard_normal((n, ci, h, w))
        if op == "conv":
            wt = rng.standard_normal((co, ci // g, *k))
        else:
            wt = rng.standard_normal((ci, co // g, *k))
        xt = torch.tensor(x, requires_grad=True)
        wtt = torch.tensor(wt, requires_grad=True)
        if op == "conv":
            y = F.conv2d(xt, wtt, stride=s, padding=p, dilation=d, groups=g)
        else:
            y = F.conv_transpose2d(xt, wtt, stride=s, padding=p, output_padding=op_pad, dilation=d, groups=g)
        r = rng.standard_normal(tuple(y.shape))
        (y * torch.tensor(r)).sum().backward()
        for name, v in [("x", x), ("w", wt), ("r", r), ("y", y.detach().numpy()),
                        ("dx", xt.grad.numpy()), ("dw", wtt.grad.numpy())]:
            tensors[f"{i}.{name}"] = np.ascontiguousarray(v, dtype=np.float64)
        meta.append({"op": op, "stride": s, "padding": p, "dilation": d, "groups": g, "output_padding": op_pad})
    save_file(tensors, OUT, metadata={"cases": json.dumps(meta), "torch": torch.__version__})
    print(f"wrote {len(CASES)} cases to {OUT} (torch {torch.__version__})")


if __name__ == "__main__":
    main()

"""Train-step time of gm vs PyTorch, side by side in one run, same architecture, batch and
thread count (RAYON_NUM_THREADS for gm, torch.set_num_threads for PyTorch, both pinned with
taskset when available).

    python3 scripts/bench_vs_torch.py [--gm target/release/gm] [--threads 1 2] [--steps 30]

Prints a table: model, threads, gm ms, PyTorch ms, ratio PyTorch/gm (> 1 means gm is faster),
peak RSS of each process. Rows: every preset listed in PRESETS.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PRESETS = ["models/vae-mnist.toml", "models/vae-conv-mnist.toml"]

TORCH_CHILD = r"""
import json, sys, time, resource
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from vae_torch import VAE
cfg, threads, steps, warmup, batch = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg.pop("kind", None)
m = VAE(**cfg)
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
x = torch.bernoulli(torch.rand(batch, *cfg.get("image_shape", (1, 28, 28))))
times = []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    loss = -m.elbo(x, torch.randn(batch, cfg["latent_dim"])).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if i >= warmup:
        times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"median_ms": float(np.median(times)), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gm", default=os.path.join(ROOT, "target/release/gm"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the median is reported")
    args = ap.parse_args()
    rows = []
    for preset in PRESETS:
        with open(os.path.join(ROOT, preset), "rb") as f:
            toml = tomllib.load(f)
        model, batch = toml["model"], toml["train"]["batch_size"]
        for th in args.threads:
            pin = ["taskset", "-c", ",".join(str(i) for i in range(th))] if shutil.which("taskset") else []
            env = dict(os.environ, RAYON_NUM_THREADS=str(th), OMP_NUM_THREADS=str(th))
            g, t, grss, trss = [], [], 0, 0
            for _ in range(args.repeats):
                r = run_child(pin + [args.gm, "bench", "--config", os.path.join(ROOT, preset), "--device", "cpu",
                                     "--steps", str(args.steps), "--warmup", str(args.warmup)], env)
                g.append(r["median_ms"]); grss = max(grss, r["peak_rss_mb"] or 0)
                r = run_child(pin + [args.python, "-c", TORCH_CHILD, HERE, json.dumps(model), str(th),
                                        str(args.steps), str(args.warmup), str(batch)], env)
                t.append(r["median_ms"]); trss = max(trss, r["maxrss_mb"])
            gm_ms, pt_ms = sorted(g)[len(g) // 2], sorted(t)[len(t) // 2]
            rows.append((os.path.basename(preset), th, batch, gm_ms, pt_ms, pt_ms / gm_ms, grss, trss))
    print(f"{'preset':<24}{'thr':>4}{'batch':>6}{'gm ms':>10}{'torch ms':>10}{'torch/gm':>10}{'gm MB':>8}{'torch MB':>9}")
    for p, th, b, g, t, r, gr, tr in rows:
        print(f"{p:<24}{th:>4}{b:>6}{g:>10.2f}{t:>10.2f}{r:>10.2f}{gr:>8.0f}{tr:>9.0f}")


if __name__ == "__main__":
    main()

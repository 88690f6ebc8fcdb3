"""Few-step sampling of one DDPM checkpoint: fid_mnist (with its bootstrap standard error), mode
coverage and images/s for each sampler at each number of network evaluations (NFE), the same
x_T for every deterministic sampler (`gm eval --fid` draws x_T from the eval seed first), plus
one sample grid per sampler.

    python3 scripts/sampler_table.py --checkpoint runs/ddpm-mnist --data-dir DIR \\
        --classifier runs/classifier-mnist [--fid-n 500] [--nfe 5,10,20,50] [--grids DIR]

NFE counts network calls: Heun's n steps take 2n − 1, so its columns are the nearest odd NFE
at or below the one asked for.
"""
import argparse
import json
import os
import sys

import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--gm", default=os.path.join(ROOT, "target/release/gm"))
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--fid-n", type=int, default=500)
    ap.add_argument("--nfe", default="5,10,20,50")
    ap.add_argument("--samplers", default="ddim,dpmpp-2m,unipc,heun-karras")
    ap.add_argument("--grids", default=os.path.join(ROOT, "runs/sampler-grids"))
    ap.add_argument("--grid-nfe", type=int, default=10)
    args = ap.parse_args()
    os.makedirs(args.grids, exist_ok=True)
    rows = []
    for kind in args.samplers.split(","):
        for nfe in [int(v) for v in args.nfe.split(",")]:
            steps = (nfe + 1) // 2 if kind == "heun-karras" else nfe
            real_nfe = 2 * steps - 1 if kind == "heun-karras" else steps
            sets = ["--set", f"model.sampler.kind={kind}", "--set", f"model.sampler.steps={steps}"]
            # The bound is not what this table measures: one term on two images.
            out = run([args.gm, "eval", "--checkpoint", args.checkpoint, "--data-dir", args.data_dir,
                       "--fid", "--fid-n", str(args.fid_n), "--classifier", args.classifier,
                       "--max-images", "2", "--set", "model.bound_timesteps=1"] + sets)
            r = json.loads(out)
            rows.append((kind, real_nfe, r))
            print(f"{kind} NFE {real_nfe}: fid_mnist {r['fid_mnist']:.1f} ± {r['fid_mnist_se']:.1f}, "
                  f"{r['classes_ge_5pct']} classes ≥ 5%, KL {r['class_kl_uniform_nats']:.3f}, "
                  f"{r['sample_images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
            if nfe == args.grid_nfe:
                grid = os.path.join(args.grids, f"{kind}-nfe{real_nfe}.png")
                run([args.gm, "sample", "--checkpoint", args.checkpoint, "--n", "64", "--out", grid] + sets)
    print(f"| sampler | NFE | fid_mnist (± bootstrap SE) | classes ≥ 5% | class KL to uniform | images/s |")
    print("|---|---|---|---|---|---|")
    for kind, nfe, r in rows:
        print(f"| {kind} | {nfe} | {r['fid_mnist']:.1f} ± {r['fid_mnist_se']:.1f} | {r['classes_ge_5pct']} | "
              f"{r['class_kl_uniform_nats']:.3f} | {r['sample_images_per_s']:.1f} |")


if __name__ == "__main__":
    main()

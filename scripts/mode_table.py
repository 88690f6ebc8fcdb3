"""Mode collapse vs likelihood, in one table: for each trained run given, `gm eval --fid` (sample
quality and mode coverage through gm's MNIST classifier) and the model's test likelihood or bound,
plus one sample grid per model.

    python3 scripts/mode_table.py --data-dir DIR --classifier runs/classifier-mnist \
        [--fid-n 1000] [--max-images 500] [--grids runs/grids] RUN [RUN ...]

Columns: fid_mnist (lower is better; gm's classifier features, not Inception), the number of
classes with ≥ 5% of the samples, KL(class histogram ‖ uniform) in nats (0 = every digit equally
often), the classifier's mean confidence, and bits/dim (`bits_per_dim`, or `bpd_bound` for DDPM;
a GAN has none). Seed 001's claim: maximum-likelihood models (forward KL) cover every mode, a GAN
(reverse-KL-like) may trade modes for sharpness.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--gm", default=os.path.join(ROOT, "target/release/gm"))
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--fid-n", type=int, default=1000)
    ap.add_argument("--max-images", type=int, default=500)
    ap.add_argument("--grids", default=os.path.join(ROOT, "runs/grids"))
    args = ap.parse_args()
    os.makedirs(args.grids, exist_ok=True)
    rows = []
    for r in args.runs:
        m = json.loads(run([args.gm, "eval", "--checkpoint", r, "--data-dir", args.data_dir, "--fid",
                            "--fid-n", str(args.fid_n), "--classifier", args.classifier,
                            "--max-images", str(args.max_images)]).strip().splitlines()[-1])
        grid = os.path.join(args.grids, os.path.basename(os.path.normpath(r)) + ".png")
        run([args.gm, "sample", "--checkpoint", r, "--n", "64", "--out", grid])
        bpd = m.get("bpd_bound", m.get("bits_per_dim"))
        rows.append((os.path.basename(os.path.normpath(r)), m["fid_mnist"], m["classes_ge_5pct"],
                     m["class_kl_uniform_nats"], m["classifier_confidence"], bpd, grid))
    print(f"fid_n = {args.fid_n}, likelihood on {args.max_images} test images of {args.data_dir}\n")
    print("| run | fid_mnist | classes ≥ 5% | class KL to uniform (nats) | confidence | bits/dim | grid |")
    print("|---|---|---|---|---|---|---|")
    for name, fid, k, kl, conf, bpd, grid in rows:
        b = "—" if bpd is None else f"{bpd:.3f}"
        print(f"| {name} | {fid:.1f} | {k} | {kl:.3f} | {conf:.3f} | {b} | {grid} |")


if __name__ == "__main__":
    main()

"""Plots the traces `cargo run --release --example em_ladder` writes: log-likelihood and ELBO
per point against the EM iteration, one colour per rung of seed 001's ladder.

    python3 scripts/plot_ladder.py OUT/ladder.json OUT/ladder.png      # needs matplotlib
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    runs = json.load(open(src))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, skip in ((a, 0), (b, 5)):
        for r in runs:
            if "log_likelihood" in r:
                (line,) = ax.plot(range(skip, len(r["log_likelihood"])), r["log_likelihood"][skip:],
                                  label=r["name"] + ": log p(x | θ) + log p(θ)/N")
                ax.plot(range(skip, len(r["elbo"])), r["elbo"][skip:], "--", color=line.get_color(),
                        label=r["name"] + ": ELBO")
            else:
                ax.plot(range(skip, len(r["elbo"])), r["elbo"][skip:], ":", label=r["name"])
        ax.set_xlabel("iteration")
        ax.set_ylabel("nats per image")
    a.set_title("seed 001's ladder: mixture of Bernoullis on binarised digits")
    b.set_title(f"the same, from iteration 5")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

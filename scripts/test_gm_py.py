"""Calls gm's Python extension the way a user's research code would: train a tiny VAE on a
synthetic IDX folder, load it, sample, score, evaluate, and check the errors.

    python scripts/test_gm_py.py PATH/TO/libgm_py.so
(scripts/test.sh builds it with `cargo build -p gm-py` and runs this.)
"""
import gzip
import importlib.util
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_extension(path):
    # A cdylib is libgm_py.so; Python imports it under the module's own name.
    tmp = tempfile.mkdtemp()
    dst = os.path.join(tmp, "gm_py" + (".pyd" if os.name == "nt" else ".so"))
    shutil.copy(path, dst)
    spec = importlib.util.spec_from_file_location("gm_py", dst)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_idx(path, arr):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, arr.ndim))
        f.write(b"".join(struct.pack(">I", d) for d in arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def synthetic_digits(d, rng):
    # Four stroke templates (horizontal, vertical, diagonal, ring), jittered.
    for split, n in [("train", 256), ("t10k", 64)]:
        labels = rng.integers(0, 4, n)
        y, x = np.mgrid[0:28, 0:28]
        imgs = np.zeros((n, 28, 28))
        for i, lab in enumerate(labels):
            off = rng.integers(-2, 3)
            on = [abs(y - 14 - off) <= 2, abs(x - 14 - off) <= 2, abs(x - y - off) <= 2,
                  abs((x - 14) ** 2 + (y - 14) ** 2 - (8 + off) ** 2) <= 16][lab]
            imgs[i] = np.where(on, 220, 5)
        write_idx(os.path.join(d, f"{split}-images-idx3-ubyte.gz"), imgs)
        write_idx(os.path.join(d, f"{split}-labels-idx1-ubyte.gz"), labels)


def main():
    gm = load_extension(sys.argv[1])
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    synthetic_digits(data, np.random.default_rng(0))
    run = os.path.join(tmp, "run")
    s = gm.train(os.path.join(ROOT, "models/vae-tiny.toml"), data_dir=data, out=run,
                 overrides=["train.steps=30", "train.eval_every=30", "train.eval_images=32",
                            "train.sample_every=0", "train.checkpoint_every=30"])
    assert s["steps"] == 30 and s["last_loss"] < s["first_loss"], s
    assert os.path.samefile(s["run"], run) and os.path.isfile(s["checkpoint"]), s

    m = gm.load(run)
    assert m.kind == "vae" and m.step == 30 and m.image_shape == (1, 28, 28), m
    assert m.likelihood_estimate.startswith("bound (IWAE-"), m.likelihood_estimate
    assert m.config["model"]["kind"] == "vae"
    x = m.sample(8, seed=3)
    assert x.shape == (8, 1, 28, 28) and x.dtype == np.float32, (x.shape, x.dtype)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(x, m.sample(8, seed=3)), "a seed fixes the samples"
    assert not np.array_equal(m.sample(8), m.sample(8)), "unseeded calls draw afresh"
    xb = (x > 0.5).astype(np.float32)
    lp = m.log_prob(xb, seed=1)
    assert lp.shape == (8,) and lp.dtype == np.float64 and np.all(np.isfinite(lp)), lp
    assert np.all(lp < 0), lp
    np.testing.assert_array_equal(lp, m.log_prob(xb.astype(np.float64), seed=1))
    # Images the model scores better than noise: its own samples beat uniform random pixels.
    noise = (np.random.default_rng(1).random((8, 1, 28, 28)) > 0.5).astype(np.float32)
    assert lp.mean() > m.log_prob(noise, seed=1).mean() + 50, (lp, m.log_prob(noise, seed=1))
    ev = m.eval(data_dir=data, max_images=32)
    assert ev["n_images"] == 32 and ev["bits_per_dim"] > 0 and ev["step"] == 30, ev
    for bad, msg in [(np.zeros((2, 3, 28, 28), np.float32), "shape"),
                     (np.full((2, 1, 28, 28), 0.5, np.float32), "binarised"),
                     (np.zeros((2, 1, 28, 28), np.int64), "float32 or float64")]:
        try:
            m.log_prob(bad)
        except ValueError as e:
            assert msg in str(e), (msg, e)
        else:
            raise AssertionError(f"log_prob accepted {bad.shape} {bad.dtype}")
    try:
        gm.load(os.path.join(tmp, "no-such-run"))
    except RuntimeError as e:
        assert "does not exist" in str(e), e
    else:
        raise AssertionError("loaded a missing run")
    print(f"gm_py: trained ({s['first_loss']:.1f} -> {s['last_loss']:.1f} nats), sampled {x.shape}, "
          f"log_prob {lp.mean():.1f} nats (noise {m.log_prob(noise, seed=1).mean():.1f}), "
          f"eval {ev['bits_per_dim']:.3f} bits/dim: ok")


if __name__ == "__main__":
    main()

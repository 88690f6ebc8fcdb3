"""Real RGB data for gm's colour models: 32x32 patches of the two sample photographs that
scikit-learn ships (`sklearn.datasets.load_sample_images`: "china.jpg" and "flower.jpg",
427x640, BSD licence), written as a gm `npy:` data set.

    python scripts/photo_patches.py OUT_DIR [--size 32] [--train 6000] [--seed 0]

Writes OUT_DIR/train.npy and OUT_DIR/test.npy, uint8 (N, H, W, 3), and train_labels.npy /
test_labels.npy (0 = china, 1 = flower). Train and test never overlap: each photograph's left 80%
of columns gives the training patches (random positions), its right 20% the test patches (a grid
with stride size/2). Train with `--set data.dataset="npy:OUT_DIR"` (the `*-rgb-*` presets).
"""
import argparse
import os

import numpy as np
from sklearn.datasets import load_sample_images


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=6000, help="training patches in all")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = a.size
    rng = np.random.default_rng(a.seed)
    photos = load_sample_images().images
    train, train_y, test, test_y = [], [], [], []
    for label, img in enumerate(photos):
        h, w, _ = img.shape
        split = int(w * 0.8)
        n = a.train // len(photos)
        ys = rng.integers(0, h - s + 1, n)
        xs = rng.integers(0, split - s + 1, n)
        train += [img[y:y + s, x:x + s] for y, x in zip(ys, xs)]
        train_y += [label] * n
        for y in range(0, h - s + 1, s // 2):
            for x in range(split, w - s + 1, s // 2):
                test.append(img[y:y + s, x:x + s])
                test_y.append(label)
    os.makedirs(a.out, exist_ok=True)
    for name, arr in [("train", train), ("test", test)]:
        np.save(os.path.join(a.out, f"{name}.npy"), np.stack(arr).astype(np.uint8))
    np.save(os.path.join(a.out, "train_labels.npy"), np.array(train_y, dtype=np.uint8))
    np.save(os.path.join(a.out, "test_labels.npy"), np.array(test_y, dtype=np.uint8))
    print(f"{a.out}: {len(train)} train and {len(test)} test patches of {s}x{s} RGB")


if __name__ == "__main__":
    main()

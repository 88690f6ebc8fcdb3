"""The gm VAE in PyTorch, with the same parameter names and maths.

Modes:
  elbo   --config JSON --weights W.safetensors --batch B.safetensors
         prints the per-image single-sample ELBO (nats) for the batch's x and eps as JSON.
  init   --config JSON --out W.safetensors --seed N
         writes a freshly initialised PyTorch state_dict as safetensors.
  iwae   --config JSON --weights W.safetensors --data-dir DIR [--iwae-k K]
         evaluates a gm checkpoint with this file's estimators (test ELBO and IWAE-k, nats) on
         the test split, binarised with torch's generator seeded 4321.
  --model DIR replaces --config and --weights in elbo and iwae: a folder `gm export` wrote
         (its config.json's `model` and its model.safetensors).
  train  --data-dir DIR [--steps N --batch-size B --lr LR --threads T --iwae-k K]
         trains the `models/vae-mnist.toml` architecture the way gm does (dynamic binarisation,
         Adam, warm-up + cosine, the same steps and batch) and prints test ELBO and IWAE-k NLL in
         nats and the median train-step time.
"""
import argparse
import gzip
import json
import math
import os
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from timing import report_images_per_s


class VAE(nn.Module):
    def __init__(self, arch="mlp", image_shape=(1, 28, 28), latent_dim=8, hidden=(64,), channels=(8, 16),
                 likelihood="bernoulli", decoder_std=None, beta=1.0):
        super().__init__()
        c, h, w = image_shape
        d = c * h * w
        self.arch, self.image_shape, self.latent_dim = arch, tuple(image_shape), latent_dim
        self.likelihood, self.decoder_std, self.beta = likelihood, decoder_std, beta
        if arch == "mlp":
            enc, prev = [], d
            for hd in hidden:
                enc += [nn.Linear(prev, hd), nn.ReLU()]
                prev = hd
            self.encoder = nn.Sequential(*enc)
            dec, prev = [], latent_dim
            for hd in reversed(hidden):
                dec += [nn.Linear(prev, hd), nn.ReLU()]
                prev = hd
            dec.append(nn.Linear(prev, d))
            self.decoder = nn.Sequential(*dec)
            enc_out = hidden[-1]
        else:
            c1, c2 = channels
            flat = c2 * (h // 4) * (w // 4)
            self.encoder = nn.Sequential(
                nn.Conv2d(c, c1, 4, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                nn.Linear(flat, hidden[0]), nn.ReLU())
            self.decoder = nn.Sequential(
                nn.Linear(latent_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], flat), nn.ReLU(),
                nn.Unflatten(1, (c2, h // 4, w // 4)), nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),
                nn.ConvTranspose2d(c1, c, 4, 2, 1))
            enc_out = hidden[0]
        self.fc_mu = nn.Linear(enc_out, latent_dim)
        self.fc_logvar = nn.Linear(enc_out, latent_dim)
        if likelihood == "gaussian" and decoder_std is None:
            self.decoder_log_var = nn.Parameter(torch.zeros(image_shape))

    def encode(self, x):
        h = self.encoder(x.flatten(1) if self.arch == "mlp" else x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z):
        return self.decoder(z).reshape(z.shape[0], *self.image_shape)

    def log_px(self, out, x):
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        lv = self.decoder_log_var if self.decoder_std is None else torch.full_like(out, 2 * math.log(self.decoder_std))
        lp = -0.5 * (math.log(2 * math.pi) + lv + (x - out) ** 2 / lv.exp())
        return lp.flatten(1).sum(1)

    def elbo(self, x, eps):
        mu, lv = self.encode(x)
        z = mu + (0.5 * lv).exp() * eps
        kl = 0.5 * (lv.exp() + mu ** 2 - 1 - lv).sum(1)
        return self.log_px(self.decode(z), x) - self.beta * kl

    @torch.no_grad()
    def iwae(self, x, k, chunk):
        mu, lv = self.encode(x)
        std = (0.5 * lv).exp()
        lws = []
        for s in range(0, k, chunk):
            kc = min(chunk, k - s)
            eps = torch.randn(kc, *mu.shape)
            z = mu + std * eps
            out = self.decode(z.flatten(0, 1))
            xs = x.unsqueeze(0).expand(kc, *x.shape).flatten(0, 1)
            lpx = self.log_px(out, xs).view(kc, -1)
            lpz = (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(2)
            lq = (-0.5 * (eps ** 2 + math.log(2 * math.pi) + lv)).sum(2)
            lws.append(lpx + lpz - lq)
        lw = torch.cat(lws, 0)
        return -lw.mean(0), -(torch.logsumexp(lw, 0) - math.log(k))


def read_idx(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(d, stem):
    for n in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(d, n)):
            return os.path.join(d, n)
    raise FileNotFoundError(f"{d}: no {stem}[.gz]")


def train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    xtr = torch.tensor(read_idx(find(args.data_dir, "train-images-idx3-ubyte")), dtype=torch.float32).unsqueeze(1) / 255
    model = VAE(arch=args.arch, latent_dim=32, hidden=(512, 256) if args.arch == "mlp" else (256,), channels=(32, 64))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warm, steps, floor = 100, args.steps, 0.05

    def lr_at(s):
        if s < warm:
            return args.lr * (s + 1) / warm
        p = min((s - warm) / max(steps - warm, 1), 1.0)
        return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))

    n, b = xtr.shape[0], args.batch_size
    spe = n // b
    times, perm = [], None
    for s in range(steps):
        if s % spe == 0:
            perm = torch.randperm(n)
        idx = perm[(s % spe) * b:(s % spe + 1) * b]
        x = torch.bernoulli(xtr[idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        t0 = time.perf_counter()
        loss = -model.elbo(x, torch.randn(b, 32)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        if (s + 1) % 500 == 0:
            print(f"step {s + 1}: loss {loss.item():.2f}", flush=True)
    model.eval()
    elbo, iwae = evaluate(model, test_bits(args.data_dir), args.iwae_k)
    print(json.dumps({
        "framework": "pytorch " + torch.__version__, "threads": args.threads, "steps": steps, "batch_size": b,
        "test_elbo_nats": elbo, "test_nll_iwae_nats": iwae,
        "iwae_k": args.iwae_k, "median_step_ms": 1000 * float(np.median(times[10:])),
    }))


def test_bits(data_dir):
    xte = torch.tensor(read_idx(find(data_dir, "t10k-images-idx3-ubyte")), dtype=torch.float32).unsqueeze(1) / 255
    return torch.bernoulli(xte, generator=torch.Generator().manual_seed(4321))


def evaluate(model, xb, k):
    elbos, iwaes = [], []
    for i in range(0, xb.shape[0], 100):
        e, w = model.iwae(xb[i:i + 100], k, max(1, 50000 // 100))
        elbos.append(e)
        iwaes.append(w)
    return torch.cat(elbos).mean().item(), torch.cat(iwaes).mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["elbo", "init", "iwae", "train", "iwae-bench"])
    ap.add_argument("--config")
    ap.add_argument("--model", help="a folder written by `gm export` (config.json, model.safetensors)")
    ap.add_argument("--weights")
    ap.add_argument("--batch")
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iwae-k", type=int, default=1000)
    ap.add_argument("--n", type=int, default=100, help="iwae-bench: images in the timed batch")
    ap.add_argument("--repeats", type=int, default=1, help="iwae-bench: timed calls")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    if args.mode == "train":
        torch.set_default_dtype(torch.float32)
        return train(args)
    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            cfg = json.load(f)["model"]
        args.weights = os.path.join(args.model, "model.safetensors")
    else:
        cfg = json.loads(args.config)
    cfg.pop("kind", None)
    torch.manual_seed(args.seed)
    model = VAE(**cfg)
    if args.mode == "init":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
        return
    if args.mode == "iwae-bench":
        # The IWAE-k evaluation of --n random binary images (fresh weights), gm's pairs per
        # decoder call (eval.max_pairs = 20,000), timed: images per second.
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(args.threads)
        model = VAE(**cfg)
        x = torch.bernoulli(torch.rand(args.n, *model.image_shape))
        report_images_per_s(lambda: model.iwae(x, args.iwae_k, max(1, 20000 // args.n)), args.n, 1, args.repeats)
        return
    if args.mode == "iwae":
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(args.threads)
        model = VAE(**cfg)
        model.load_state_dict(load_file(args.weights), strict=True)
        elbo, iwae = evaluate(model, test_bits(args.data_dir), args.iwae_k)
        print(json.dumps({"test_elbo_nats": elbo, "test_nll_iwae_nats": iwae, "iwae_k": args.iwae_k}))
        return
    sd = {k: v.double() for k, v in load_file(args.weights).items()}
    model.load_state_dict(sd, strict=True)
    b = load_file(args.batch)
    with torch.no_grad():
        e = model.elbo(b["x"].double(), b["eps"].double())
    print(json.dumps(e.tolist()))


if __name__ == "__main__":
    main()

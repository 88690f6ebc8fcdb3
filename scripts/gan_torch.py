"""PyTorch twin of gm's DCGAN (models/dcgan-*.toml), for the side-by-side train-step benchmark.

    python3 scripts/gan_torch.py bench --config JSON [--threads N --steps S --warmup W --batch B]
    python3 scripts/gan_torch.py sample-bench --config JSON [--threads N --n IMAGES]

One train step = the discriminator's `d_steps` updates and one generator update, each with its own
Adam, as gm's trainer does. Parameter names follow gm's (`generator.fc`, `generator.deconv.0`,
`generator.bn.0`, `discriminator.conv.0`, `discriminator.head`, …).
"""
import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timing import report_images_per_s

DEFAULTS = {"image_shape": [1, 28, 28], "latent_dim": 64, "width": 64, "num_classes": 0,
            "loss": "non-saturating", "gp_weight": 10.0, "batch_norm": True, "d_steps": 1}


class Generator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg["image_shape"]
        wd, z = cfg["width"], cfg["latent_dim"]
        self.c0, self.h, self.w = 2 * wd, h // 4, w // 4
        nc = cfg["num_classes"]
        self.embed = nn.Embedding(nc, z) if nc else None
        self.fc = nn.Linear(z * (2 if nc else 1), self.c0 * self.h * self.w)
        self.deconv = nn.ModuleList([nn.ConvTranspose2d(self.c0, wd, 4, 2, 1), nn.ConvTranspose2d(wd, c, 4, 2, 1)])
        self.bn = nn.ModuleList([nn.BatchNorm2d(self.c0), nn.BatchNorm2d(wd)]) if cfg["batch_norm"] else None

    def forward(self, z, y=None):
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        x = self.fc(z).reshape(-1, self.c0, self.h, self.w)
        x = F.relu(self.bn[0](x) if self.bn else x)
        x = self.deconv[0](x)
        x = F.relu(self.bn[1](x) if self.bn else x)
        return torch.tanh(self.deconv[1](x))


class Discriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg["image_shape"]
        wd = cfg["width"]
        self.conv = nn.ModuleList([nn.Conv2d(c, wd, 4, 2, 1), nn.Conv2d(wd, 2 * wd, 4, 2, 1)])
        feat = 2 * wd * (h // 4) * (w // 4)
        self.head = nn.Linear(feat, 1)
        nc = cfg["num_classes"]
        self.embed = nn.Embedding(nc, feat) if nc else None

    def forward(self, x, y=None):
        for conv in self.conv:
            x = F.leaky_relu(conv(x), 0.2)
        h = x.flatten(1)
        out = self.head(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


def cmd_bench(args):
    torch.set_num_threads(args.threads)
    # Modules and tensors are made on the device; each step ends by waiting for it.
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    cfg = {**DEFAULTS, **{k: v for k, v in json.loads(args.config).items() if k != "kind"}}
    g, d = Generator(cfg), Discriminator(cfg)
    og = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    b = args.batch
    real = torch.rand(b, *cfg["image_shape"]) * 2 - 1
    y = torch.randint(0, cfg["num_classes"], (b,)) if cfg["num_classes"] else None
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for _ in range(cfg["d_steps"]):
            fake = g(torch.randn(b, cfg["latent_dim"]), y).detach()
            loss = F.softplus(-d(real, y)).mean() + F.softplus(d(fake, y)).mean()
            od.zero_grad(); loss.backward(); od.step()
        fake = g(torch.randn(b, cfg["latent_dim"]), y)
        loss = F.softplus(-d(fake, y)).mean()
        og.zero_grad(); loss.backward(); og.step()
        if args.device != "cpu":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": float(np.median(times)),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


@torch.no_grad()
def cmd_sample_bench(args):
    """Times the generator drawing `--n` images (eval mode: BatchNorm's running statistics)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = {**DEFAULTS, **{k: v for k, v in json.loads(args.config).items() if k != "kind"}}
    g = Generator(cfg).eval()
    y = torch.arange(args.n) % cfg["num_classes"] if cfg["num_classes"] else None
    report_images_per_s(lambda: g(torch.randn(args.n, cfg["latent_dim"]), y), args.n, args.warmup, args.repeats)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("bench")
    a.add_argument("--config", required=True)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch device)")
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--warmup", type=int, default=2)
    a.add_argument("--batch", type=int, default=64)
    a = sub.add_parser("sample-bench", help="time the generator (fresh weights)")
    a.add_argument("--config", required=True)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--n", type=int, default=1000)
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    {"bench": cmd_bench, "sample-bench": cmd_sample_bench}[args.cmd](args)


if __name__ == "__main__":
    main()

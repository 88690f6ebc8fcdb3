"""gm's PixelCNN and Gated PixelCNN in PyTorch: the same parameter names, masks and maths.

Modes:
  nll    --config JSON --weights W.safetensors --batch B.safetensors
         prints the per-image exact NLL (nats) of the batch's `x` (and `labels`) as JSON, with the
         weights of a gm checkpoint (names line up with this module's state_dict).
  train  --config PRESET.toml --data-dir DIR [--steps N --threads T]
         trains the preset's architecture the way gm does (dynamic binarisation, Adam, warm-up +
         cosine, gradient clipping, the same steps and batch) and prints the test NLL in nats, bits
         per dim and the median train-step time as JSON.
  bench  --config JSON --threads T --steps N --warmup W --batch B
         times the train step on random binary images (for scripts/bench_vs_torch.py).
  sample-bench  --config JSON --threads T --n N [--full]
         times raster sampling of N grey images (fresh weights): per pixel a network pass over the
         rows that pixel sees, or over the whole image with --full (pytorch-generative's way).
"""
import argparse
import json
import math
import os
import resource
import sys
import time
import tomllib

import numpy as np
import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from amp_torch import autocast, scaler
from amp_torch import step as amp_step
from timing import report_images_per_s

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vae_torch import find, read_idx  # noqa: E402  (the IDX reader shared by the reference scripts)


def raster_mask(kh, kw, mask_type):
    ci, cj = kh // 2, kw // 2
    m = torch.zeros(kh, kw)
    m[:ci, :] = 1
    m[ci, :cj] = 1
    if mask_type == "B":
        m[ci, cj] = 1
    return m


class MaskedConv2d(nn.Conv2d):
    def __init__(self, c_in, c_out, k, mask_type):
        super().__init__(c_in, c_out, k, padding=k // 2)
        self.register_buffer("mask", raster_mask(k, k, mask_type)[None, None], persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class Block(nn.Module):
    def __init__(self, c, k, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c // 2, 1)
        self.conv2 = MaskedConv2d(c // 2, c // 2, k, "B")
        self.conv3 = nn.Conv2d(c // 2, c, 1)
        self.label_emb = nn.Embedding(num_classes, c) if num_classes else None

    def forward(self, h, y):
        if self.label_emb is not None:
            h = h + self.label_emb(y)[:, :, None, None]
        r = F.relu(self.conv1(F.relu(h)))
        r = F.relu(self.conv2(r))
        return h + self.conv3(r)


def classes(output):
    return 1 if output == "bernoulli" else 256


class PixelCNN(nn.Module):
    def __init__(self, image_shape=(1, 28, 28), channels=16, res_blocks=2, first_kernel=7, kernel=3,
                 head_channels=16, output="bernoulli", num_classes=0):
        super().__init__()
        self.output = output
        self.input_conv = MaskedConv2d(image_shape[0], channels, first_kernel, "A")
        self.blocks = nn.ModuleList(Block(channels, kernel, num_classes) for _ in range(res_blocks))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(head_channels, classes(output), 1))

    def logits(self, x, y=None):
        h = self.input_conv(x)
        for b in self.blocks:
            h = maybe_checkpoint(self, b, h, y)
        return self.head(h).flatten(2)  # (B, K, D)


class ShiftedConv(nn.Conv2d):
    """Output (i, j) reads rows i - pad_h ... and columns j - pad_w ... (top-left corner crop)."""

    def __init__(self, c_in, c_out, kernel, pad):
        super().__init__(c_in, c_out, kernel, padding=pad)

    def forward(self, x):
        return super().forward(x)[:, :, : x.shape[2], : x.shape[3]]


class GatedLayer(nn.Module):
    def __init__(self, c_in, h, k, first, last, num_classes):
        super().__init__()
        r = k // 2
        rows = r if first else r + 1
        self.first, self.last = first, last
        self.v_conv = ShiftedConv(c_in, 2 * h, (rows, k), (r, r))
        self.h_conv = ShiftedConv(c_in, 2 * h, (1, rows), (0, r))
        self.v_to_h = nn.Conv2d(2 * h, 2 * h, 1)
        self.h_out = nn.Conv2d(h, h, 1)
        self.cond_v = nn.Embedding(num_classes, 2 * h) if num_classes and not last else None
        self.cond_h = nn.Embedding(num_classes, 2 * h) if num_classes else None

    @staticmethod
    def gate(x):
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h, y):
        vf = self.v_conv(v)
        hf = self.h_conv(h) + self.v_to_h(vf)
        if self.cond_v is not None:
            vf = vf + self.cond_v(y)[:, :, None, None]
        if self.cond_h is not None:
            hf = hf + self.cond_h(y)[:, :, None, None]
        v_out = vf if self.last else self.gate(vf)
        hg = self.h_out(self.gate(hf))
        return v_out, (hg if self.first else h + hg)


class GatedPixelCNN(nn.Module):
    def __init__(self, image_shape=(1, 28, 28), channels=16, layers=3, first_kernel=7, kernel=3,
                 head_channels=16, output="bernoulli", num_classes=0):
        super().__init__()
        self.output = output
        self.layers = nn.ModuleList(
            GatedLayer(image_shape[0] if i == 0 else channels, channels, first_kernel if i == 0 else kernel,
                       i == 0, i + 1 == layers, num_classes) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(head_channels, classes(output), 1))

    def logits(self, x, y=None):
        v = h = x
        for l in self.layers:
            v, h = maybe_checkpoint(self, l, v, h, y)
        return self.head(h).flatten(2)


def maybe_checkpoint(net, block, *args):
    """`block(*args)`, recomputed in the backward (torch.utils.checkpoint, diffusers' way) when
    `net.checkpointing` is set and gradients are on."""
    if getattr(net, "checkpointing", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def build(cfg):
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    return {"pixelcnn": PixelCNN, "gated-pixelcnn": GatedPixelCNN}[kind](**cfg)


def nll(model, x, y=None):
    """Exact -log p(x) per image, nats."""
    logits = model.logits(x, y)
    b = x.shape[0]
    if model.output == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits[:, 0], x.reshape(b, -1), reduction="none").sum(1)
    levels = (x.reshape(b, -1) * 255).round().long()
    return F.cross_entropy(logits, levels, reduction="none").sum(1)


def lr_at(t, step):
    if t.get("warmup_steps", 0) and step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    if t.get("schedule", "constant") == "cosine":
        w = t.get("warmup_steps", 0)
        p = min((step - min(w, step)) / max(t["steps"] - w, 1), 1.0)
        floor = t["lr"] * t.get("min_lr_ratio", 0.0)
        return floor + (t["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return t["lr"]


def cmd_train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.config, "rb") as f:
        preset = tomllib.load(f)
    cfg, t = preset["model"], preset["train"]
    if args.steps:
        t["steps"] = args.steps
    binary = preset["data"].get("binarize", "none") != "none"
    xtr = torch.from_numpy(read_idx(find(args.data_dir, "train-images-idx3-ubyte")).astype(np.float32) / 255)[:, None]
    ytr = torch.from_numpy(read_idx(find(args.data_dir, "train-labels-idx1-ubyte")).astype(np.int64))
    xte = torch.from_numpy(read_idx(find(args.data_dir, "t10k-images-idx3-ubyte")).astype(np.float32) / 255)[:, None]
    yte = torch.from_numpy(read_idx(find(args.data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64))
    model = build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=t["lr"])
    n, bs = xtr.shape[0], t["batch_size"]
    perm, pos, times, first, last = torch.randperm(n), 0, [], None, None
    for step in range(t["steps"]):
        t0 = time.perf_counter()
        if pos + bs > n:
            perm, pos = torch.randperm(n), 0
        idx = perm[pos:pos + bs]
        pos += bs
        x = torch.bernoulli(xtr[idx]) if binary else xtr[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(t, step)
        loss = nll(model, x, ytr[idx]).mean()
        opt.zero_grad()
        loss.backward()
        if t.get("grad_clip", 0):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 100 == 0:
            print(json.dumps({"step": step, "loss": last}), flush=True)
    model.eval()
    g = torch.Generator().manual_seed(4321)
    total = 0.0
    with torch.no_grad():
        for s in range(0, xte.shape[0], 100):
            x = xte[s:s + 100]
            x = torch.bernoulli(x, generator=g) if binary else x
            total += nll(model, x, yte[s:s + 100]).sum().item()
    test = total / xte.shape[0]
    d = xte[0].numel()
    print(json.dumps({"test_nll_nats": test, "bits_per_dim": test / (d * math.log(2)), "first_loss": first,
                      "last_loss": last, "median_step_ms": float(np.median(times)), "threads": args.threads,
                      "steps": t["steps"], "batch_size": bs}))


def cmd_nll(args):
    from safetensors.torch import load_file
    model = build(json.loads(args.config)).double()
    sd = load_file(args.weights)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
    b = load_file(args.batch)
    with torch.no_grad():
        out = nll(model, b["x"].double(), b["labels"].long() if "labels" in b else None)
    print(json.dumps(out.double().tolist()))


def cmd_bench(args):
    torch.set_num_threads(args.threads)
    # Modules and tensors are made on the device; each step ends by waiting for it.
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    cfg = json.loads(args.config)
    model = build(cfg)
    model.checkpointing = args.checkpoint
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    shape = cfg.get("image_shape", (1, 28, 28))
    x = torch.bernoulli(torch.rand(args.batch, *shape))
    if model.output != "bernoulli":
        x = (torch.rand(args.batch, *shape) * 255).round() / 255
    y = torch.randint(0, max(cfg.get("num_classes", 0), 1), (args.batch,))
    amp, scale = autocast(args.device, args.amp), scaler(args.device, args.amp)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with amp:
            loss = nll(model, x, y).mean()
        amp_step(loss, opt, scale)
        if args.device != "cpu":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": float(np.median(times)),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rows_above(cfg):
    """How many rows above its own a row's logits can see (gm's `rows_above`)."""
    if cfg["kind"] == "pixelcnn":
        return cfg.get("first_kernel", 7) // 2 + cfg.get("res_blocks", 2) * (cfg.get("kernel", 3) // 2)
    return cfg.get("first_kernel", 7) // 2 + (cfg.get("layers", 3) - 1) * (cfg.get("kernel", 3) // 2)


@torch.no_grad()
def sample(model, cfg, n, banded=True):
    """Raster-order samples of a grey model, pixel by pixel. `banded`: the network runs on the
    rows a pixel can see (as gm's reference sampler); else on the whole image (as
    pytorch-generative's sampler)."""
    c, h, w = cfg.get("image_shape", (1, 28, 28))
    assert c == 1, "the twin samples grey images"
    y = torch.arange(n) % cfg["num_classes"] if cfg.get("num_classes", 0) else None
    x = torch.zeros(n, c, h, w)
    r = rows_above(cfg) if banded else h
    for i in range(h):
        lo = max(0, i - r)
        for j in range(w):
            l = model.logits(x[:, :, lo:i + 1], y).reshape(n, -1, i + 1 - lo, w)[:, :, -1, j]
            if model.output == "bernoulli":
                x[:, 0, i, j] = torch.bernoulli(torch.sigmoid(l[:, 0]))
            else:
                x[:, 0, i, j] = torch.multinomial(torch.softmax(l, 1), 1)[:, 0].float() / 255
    return x


def cmd_sample_bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = json.loads(args.config)
    model = build(cfg).eval()
    report_images_per_s(lambda: sample(model, cfg, args.n, banded=not args.full), args.n, args.warmup, args.repeats)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("train")
    a.add_argument("--config", required=True)
    a.add_argument("--data-dir", required=True)
    a.add_argument("--steps", type=int, default=0)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("nll")
    a.add_argument("--config", required=True)
    a.add_argument("--weights", required=True)
    a.add_argument("--batch", required=True)
    a = sub.add_parser("bench")
    a.add_argument("--config", required=True)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch device)")
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--warmup", type=int, default=2)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--amp", default="f32", choices=["f32", "bf16", "f16"], help="mixed precision (amp_torch.py)")
    a.add_argument("--checkpoint", action="store_true", help="gradient checkpointing of every layer")
    a = sub.add_parser("sample-bench", help="time raster sampling (fresh weights)")
    a.add_argument("--config", required=True)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--n", type=int, default=16)
    a.add_argument("--repeats", type=int, default=1)
    a.add_argument("--warmup", type=int, default=0)
    a.add_argument("--full", action="store_true", help="run on the whole image for every pixel")
    args = p.parse_args()
    {"train": cmd_train, "nll": cmd_nll, "bench": cmd_bench,
     "sample-bench": cmd_sample_bench}[args.mode](args)


if __name__ == "__main__":
    main()

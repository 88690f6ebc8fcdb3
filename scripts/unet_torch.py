#!/usr/bin/env python3
"""PyTorch twin of gm's diffusion / flow-matching UNet (crates/gm-models/src/unet.rs).

Same module tree and parameter names as gm's safetensors checkpoints, so gm's weights load with
`load_state_dict(strict=True)`. Subcommands:

  bench    time the train step (DDPM ε-loss or flow-matching loss, Adam) at a thread count
  forward  run the network on a batch saved by gm (x, t, labels) with gm's weights, print JSON
  sample-bench  time DDIM (ddpm) or Heun (flow matching) sampling of --n images, fresh weights

Usage: python scripts/unet_torch.py bench --config '<model table as JSON>' --threads 1
"""
import argparse
import json
import math
import resource
import time

import numpy as np
import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from amp_torch import autocast, scaler
from amp_torch import step as amp_step
from timing import report_images_per_s


def unet_cfg(model):
    u = {"base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_levels": [2],
         "mid_attention": True, "groups": 8, "time_embed_dim": 0}
    u.update(model.get("unet", {}))
    return u


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, temb, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-5)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb_act):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class Attention(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-5)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.c = c

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class Mid(nn.Module):
    def __init__(self, ch, temb, groups, attention):
        super().__init__()
        self.res1 = ResBlock(ch, ch, temb, groups)
        self.attn = Attention(ch, groups) if attention else None
        self.res2 = ResBlock(ch, ch, temb, groups)


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half).to(t.dtype)
    args = t[:, None] * freqs[None]
    e = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(e, (0, 1)) if dim % 2 else e


class UNet(nn.Module):
    def __init__(self, cfg, in_ch, out_ch, num_classes):
        super().__init__()
        base, g = cfg["base_channels"], cfg["groups"]
        temb = cfg["time_embed_dim"] or 4 * base
        self.base = base
        self.time_embed = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label_embed = nn.Embedding(num_classes + 1, temb) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        mults = cfg["channel_mult"]
        skip, ch = [base], base
        self.down = nn.ModuleList()
        for l, m in enumerate(mults):
            lv, out = Level(), base * m
            for _ in range(cfg["num_res_blocks"]):
                lv.res.append(ResBlock(ch, out, temb, g))
                ch = out
                if l in cfg["attention_levels"]:
                    lv.attn.append(Attention(ch, g))
                skip.append(ch)
            if l + 1 < len(mults):
                lv.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                skip.append(ch)
            self.down.append(lv)
        self.mid = Mid(ch, temb, g, cfg["mid_attention"])
        self.up = nn.ModuleDict()
        for l in reversed(range(len(mults))):
            lv, out = Level(), base * mults[l]
            for _ in range(cfg["num_res_blocks"] + 1):
                lv.res.append(ResBlock(ch + skip.pop(), out, temb, g))
                ch = out
                if l in cfg["attention_levels"]:
                    lv.attn.append(Attention(ch, g))
            if l > 0:
                lv.upsample = nn.Conv2d(ch, ch, 3, padding=1)
            self.up[str(l)] = lv
        self.norm_out = nn.GroupNorm(g, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)

    checkpointing = False

    def block(self, f, *args):
        """`f(*args)`, recomputed in the backward (torch.utils.checkpoint, as diffusers'
        `gradient_checkpointing`) when `self.checkpointing` is set and gradients are on."""
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False)
        return f(*args)

    def forward(self, x, t, labels=None):
        temb = self.time_embed(timestep_embedding(t.to(x.dtype), self.base))
        if self.label_embed is not None:
            temb = temb + self.label_embed(labels)
        ta = F.silu(temb)
        h = self.conv_in(x)
        skips = [h]
        ck = self.block
        for lv in self.down:
            for i, r in enumerate(lv.res):
                h = ck(r, h, ta)
                if i < len(lv.attn):
                    h = ck(lv.attn[i], h)
                skips.append(h)
            if hasattr(lv, "downsample"):
                h = lv.downsample(h)
                skips.append(h)
        h = ck(self.mid.res1, h, ta)
        if self.mid.attn is not None:
            h = ck(self.mid.attn, h)
        h = ck(self.mid.res2, h, ta)
        for key in sorted(self.up.keys(), key=int, reverse=True):
            lv = self.up[key]
            for i, r in enumerate(lv.res):
                h = ck(r, torch.cat([h, skips.pop()], 1), ta)
                if i < len(lv.attn):
                    h = ck(lv.attn[i], h)
            if hasattr(lv, "upsample"):
                h = lv.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def build(model):
    c = model.get("image_shape", [1, 28, 28])[0]
    return UNet(unet_cfg(model), c, c, model.get("num_classes", 0))


def linear_alpha_bar(model):
    s = {"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "schedule": "linear"}
    s.update(model.get("schedule", {}))
    T = s["timesteps"]
    betas = np.linspace(s["beta_start"], s["beta_end"], T)
    return torch.tensor(np.cumprod(1 - betas), dtype=torch.float32), T


def cmd_bench(args):
    torch.set_num_threads(args.threads)
    # Modules and tensors are made on the device; each step ends by waiting for it.
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    model_cfg = json.loads(args.config)
    net = build(model_cfg)
    net.checkpointing = args.checkpoint
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    shape = model_cfg.get("image_shape", [1, 28, 28])
    x0 = torch.rand(args.batch, *shape) * 2 - 1
    nc = model_cfg.get("num_classes", 0)
    y = torch.randint(0, nc + 1, (args.batch,)) if nc else None
    ab, T = linear_alpha_bar(model_cfg)
    amp, scale = autocast(args.device, args.amp), scaler(args.device, args.amp)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        eps = torch.randn_like(x0)
        with amp:
            if model_cfg["kind"] == "ddpm":
                t = torch.randint(0, T, (args.batch,))
                a = ab[t][:, None, None, None]
                xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
                loss = (net(xt, t.float(), y).float() - eps).pow(2).mean()
            else:
                s = model_cfg.get("sigma_min", 1e-4)
                t = torch.rand(args.batch)
                tb = t[:, None, None, None]
                xt = (1 - (1 - s) * tb) * eps + tb * x0
                loss = (net(xt, t * 1000, y).float() - (x0 - (1 - s) * eps)).pow(2).mean()
        amp_step(loss, opt, scale, net.parameters(), 1.0)
        if args.device != "cpu":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": float(np.median(times)),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


@torch.no_grad()
def sample(net, model_cfg, n, steps):
    """DDPM: DDIM (η = 0) over `steps` evenly spaced timesteps; flow matching: Heun's method in
    `steps` steps (two network calls each) from noise at t = 0 to data at t = 1."""
    shape = model_cfg.get("image_shape", [1, 28, 28])
    nc = model_cfg.get("num_classes", 0)
    y = torch.arange(n) % nc if nc else None
    x = torch.randn(n, *shape)
    if model_cfg["kind"] == "ddpm":
        ab, T = linear_alpha_bar(model_cfg)
        ts = [int(i * T / steps) for i in range(steps)][::-1]
        for k, t in enumerate(ts):
            a = ab[t]
            a_prev = ab[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0)
            eps = net(x, torch.full((n,), float(t)), y)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x
    dt = 1.0 / steps
    v = lambda x, t: net(x, torch.full((n,), t * 1000.0), y)
    for k in range(steps):
        t = k * dt
        k1 = v(x, t)
        k2 = v(x + dt * k1, t + dt)
        x = x + dt / 2 * (k1 + k2)
    return x


def cmd_sample_bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = json.loads(args.config)
    net = build(model_cfg).eval()
    report_images_per_s(lambda: sample(net, model_cfg, args.n, args.steps), args.n, args.warmup, args.repeats)


def cmd_forward(args):
    from safetensors.torch import load_file
    net = build(json.loads(args.config)).double()
    net.load_state_dict({k: v.double() for k, v in load_file(args.weights).items()}, strict=True)
    b = load_file(args.batch)
    with torch.no_grad():
        out = net(b["x"].double(), b["t"].double(), b["labels"].long() if "labels" in b else None)
    print(json.dumps(out.flatten().tolist()))


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
    a.add_argument("--amp", default="f32", choices=["f32", "bf16", "f16"], help="mixed precision (amp_torch.py)")
    a.add_argument("--checkpoint", action="store_true",
                   help="gradient checkpointing of the residual and attention blocks")
    a = sub.add_parser("forward")
    a.add_argument("--config", required=True)
    a.add_argument("--weights", required=True)
    a.add_argument("--batch", required=True)
    a = sub.add_parser("sample-bench", help="time DDIM (ddpm) or Heun (flow matching) sampling, fresh weights")
    a.add_argument("--config", required=True)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--n", type=int, default=64)
    a.add_argument("--steps", type=int, required=True, help="DDIM steps or Heun steps")
    a.add_argument("--repeats", type=int, default=1)
    a.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    {"bench": cmd_bench, "forward": cmd_forward, "sample-bench": cmd_sample_bench}[args.cmd](args)


if __name__ == "__main__":
    main()

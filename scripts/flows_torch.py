"""PyTorch twins of gm's normalizing flows — RealNVP (models/realnvp-*.toml) and the FFJORD CNF
(models/cnf-*.toml) — with gm's parameter names, so a gm safetensors checkpoint loads with
`strict=True`.

    python3 scripts/flows_torch.py bench   --config JSON [--threads N --steps S --warmup W --batch B]
    python3 scripts/flows_torch.py forward --config JSON --weights W.safetensors --batch B.safetensors
    python3 scripts/flows_torch.py train   --preset models/realnvp-mnist.toml --data-dir DIR
                                           [--steps S --threads N --eval-images N --eval-steps K
                                            --init-from W.safetensors --save OUT.safetensors]
    python3 scripts/flows_torch.py sample-bench --config JSON [--threads N --n N --steps K]

`forward` prints −log p(x) per image (nats, 8-bit scale for images) in float64 — gm's interop test
compares it with gm's own. `train` trains the twin on the same IDX data with the preset's optimiser
settings (Adam, warm-up + cosine, gradient clipping) and prints the test bits/dim, time per step
and, for the CNF, the function evaluations per step.

The CNF twin computes the trace the way FFJORD does: vector–Jacobian products from autograd with
`create_graph=True` (Hutchinson: (εᵀJ)·ε; exact: one product per dimension); gm uses forward-mode
Jacobian–vector products, ε·(Jε) — the same numbers, a different graph.
"""
import argparse
import gzip
import json
import math
import resource
import time
import tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timing import report_images_per_s

LOG2PI = math.log(2 * math.pi)


def std_normal_logp(z):
    z = z.flatten(1)
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * LOG2PI


def logit_forward(x, alpha):
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    d = x[0].numel()
    ld = d * math.log(1 - 2 * alpha) - (torch.log(s) + torch.log1p(-s)).flatten(1).sum(1)
    return y, ld


def squeeze(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def is_vector(cfg):
    s = cfg["image_shape"]
    return s[1] == 1 and s[2] == 1


# ------------------------------------------------------------------------------------------------
# RealNVP

REALNVP_DEFAULTS = {"image_shape": [1, 28, 28], "num_scales": 2, "num_couplings": 8, "hidden": 64,
                    "num_blocks": 4, "actnorm": True, "logit_alpha": 0.05, "temperature": 1.0}


class Block(nn.Module):
    def __init__(self, hidden, k):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, hidden, k, padding=k // 2)
        self.conv2 = nn.Conv2d(hidden, hidden, k, padding=k // 2)


class StNet(nn.Module):
    def __init__(self, c_in, c_out, hidden, nb, k):
        super().__init__()
        self.in_conv = nn.Conv2d(c_in, hidden, k, padding=k // 2)
        self.blocks = nn.ModuleList([Block(hidden, k) for _ in range(nb)])
        self.out_conv = nn.Conv2d(hidden, c_out, k, padding=k // 2)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x):
        h = self.in_conv(x)
        for b in self.blocks:
            h = h + b.conv2(F.relu(b.conv1(F.relu(h))))
        return self.out_conv(F.relu(h))


class ActNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        return (x + self.bias) * self.log_scale.exp(), self.log_scale.sum() * h * w


class FlowStep(nn.Module):
    """One coupling (with its ActNorm): mask ('cb', parity) or ('ch', keep, flip)."""

    def __init__(self, c, mask, hidden, nb, k, actnorm, hw):
        super().__init__()
        self.mask = mask
        if actnorm:
            self.actnorm = ActNorm(c)
        else:
            self.actnorm = None
        if mask[0] == "cb":
            c_in, c_out = c + 1, c
            h, w = hw
            b = torch.tensor([[(i + j + mask[1]) % 2 for j in range(w)] for i in range(h)], dtype=torch.float32)
            self.register_buffer("b", b.reshape(1, 1, h, w), persistent=False)
        else:
            c_in, c_out = mask[1], c - mask[1]
        self.net = StNet(c_in, 2 * c_out, hidden, nb, k)
        self.scale = nn.Parameter(torch.ones(1, c_out, 1, 1))

    def s_t(self, kept, b=None):
        inp = kept if b is None else torch.cat([kept, b.expand(kept.shape[0], 1, -1, -1).to(kept.dtype)], 1)
        st = self.net(inp)
        c = st.shape[1] // 2
        return torch.tanh(st[:, :c]) * self.scale, st[:, c:]

    def forward(self, x):
        ld = torch.zeros(x.shape[0], dtype=x.dtype)
        if self.actnorm is not None:
            x, l = self.actnorm(x)
            ld = ld + l
        if self.mask[0] == "cb":
            b = self.b.to(x.dtype)
            s, t = self.s_t(x * b, b)
            s, t = s * (1 - b), t * (1 - b)
            return x * s.exp() + t, ld + s.flatten(1).sum(1)
        keep, flip = self.mask[1], self.mask[2]
        c = x.shape[1]
        xa, xb = (x[:, c - keep:], x[:, :c - keep]) if flip else (x[:, :keep], x[:, keep:])
        s, t = self.s_t(xa)
        yb = xb * s.exp() + t
        y = torch.cat([yb, xa], 1) if flip else torch.cat([xa, yb], 1)
        return y, ld + s.flatten(1).sum(1)


def unsqueeze(x):
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def flow_step_inverse(step, y):
    """x with step(x) = y: the coupling undone from the kept half, then the ActNorm."""
    if step.mask[0] == "cb":
        b = step.b.to(y.dtype)
        s, t = step.s_t(y * b, b)
        x = (y - t * (1 - b)) * (-s * (1 - b)).exp()
    else:
        keep, flip = step.mask[1], step.mask[2]
        c = y.shape[1]
        ya, yb = (y[:, c - keep:], y[:, :c - keep]) if flip else (y[:, :keep], y[:, keep:])
        s, t = step.s_t(ya)
        xb = (yb - t) * (-s).exp()
        x = torch.cat([xb, ya], 1) if flip else torch.cat([ya, xb], 1)
    if step.actnorm is not None:
        x = x * (-step.actnorm.log_scale).exp() - step.actnorm.bias
    return x


class RealNVP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg = {**REALNVP_DEFAULTS, **cfg}
        self.cfg = cfg
        c, h, w = cfg["image_shape"]
        self.plan = []  # "flow" (index into self.flow), "squeeze", "factor"
        steps = []
        hid, nb, an = cfg["hidden"], cfg["num_blocks"], cfg["actnorm"]
        if is_vector(cfg):
            for i in range(cfg["num_couplings"]):
                keep = c // 2 if i % 2 == 0 else c - c // 2
                steps.append(FlowStep(c, ("ch", keep, i % 2 == 1), hid, nb, 1, an, (1, 1)))
                self.plan.append("flow")
        else:
            for sc in range(cfg["num_scales"]):
                last = sc + 1 == cfg["num_scales"]
                for p in range(4 if last else 3):
                    steps.append(FlowStep(c, ("cb", p % 2), hid, nb, 3, an, (h, w)))
                    self.plan.append("flow")
                if last:
                    break
                self.plan.append("squeeze")
                c, h, w = 4 * c, h // 2, w // 2
                for p in range(3):
                    steps.append(FlowStep(c, ("ch", c // 2, p % 2 == 1), hid, nb, 3, an, (h, w)))
                    self.plan.append("flow")
                self.plan.append("factor")
                c -= c // 2
        self.flow = nn.ModuleList(steps)

    def nll(self, x):
        """−log p(x) per image, nats (8-bit scale for images)."""
        if is_vector(self.cfg):
            y, ld = x, torch.zeros(x.shape[0], dtype=x.dtype)
            offset = 0.0
        else:
            y, ld = logit_forward(x, self.cfg["logit_alpha"])
            offset = x[0].numel() * math.log(256)
        logp = ld
        k = 0
        for p in self.plan:
            if p == "flow":
                y, l = self.flow[k](y)
                logp = logp + l
                k += 1
            elif p == "squeeze":
                y = squeeze(y)
            else:
                c = y.shape[1]
                logp = logp + std_normal_logp(y[:, :c // 2])
                y = y[:, c // 2:]
        logp = logp + std_normal_logp(y)
        return -logp + offset

    @torch.no_grad()
    def sample(self, n):
        """n images: latents at the configured temperature through the inverse flow, then the
        inverse logit, clamped to [0, 1] (as gm's `sample`)."""
        shape = list(self.cfg["image_shape"])
        factored = []
        for p in self.plan:
            if p == "squeeze":
                shape = [4 * shape[0], shape[1] // 2, shape[2] // 2]
            elif p == "factor":
                factored.append([shape[0] // 2] + shape[1:])
                shape = [shape[0] - shape[0] // 2] + shape[1:]
        temp = self.cfg["temperature"]
        y = torch.randn(n, *shape) * temp
        k = len(self.flow)
        for p in reversed(self.plan):
            if p == "flow":
                k -= 1
                y = flow_step_inverse(self.flow[k], y)
            elif p == "squeeze":
                y = unsqueeze(y)
            else:
                y = torch.cat([torch.randn(n, *factored.pop()) * temp, y], 1)
        if is_vector(self.cfg):
            return y
        a = self.cfg["logit_alpha"]
        return ((torch.sigmoid(y) - a) / (1 - 2 * a)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# CNF

CNF_DEFAULTS = {"image_shape": [2, 1, 1], "hidden": [64, 64, 64], "activation": "tanh", "squeeze": 0,
                "time_length": 1.0, "divergence": "exact", "kinetic_weight": 0.0, "jacobian_weight": 0.0,
                "logit_alpha": 0.05, "solver": {"method": "rk4", "steps": 8}}


class ConcatSquash(nn.Module):
    def __init__(self, c_in, c_out, k):
        super().__init__()
        self.layer = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        self.gate = nn.ParameterDict({"weight": nn.Parameter(torch.rand(1, c_out, 1, 1) * 2 - 1),
                                      "bias": nn.Parameter(torch.rand(1, c_out, 1, 1) * 2 - 1)})
        self.time = nn.ParameterDict({"weight": nn.Parameter(torch.rand(1, c_out, 1, 1) * 2 - 1)})

    def forward(self, z, t):
        gate = torch.sigmoid(self.gate["weight"] * t + self.gate["bias"])
        return self.layer(z) * gate + self.time["weight"] * t


class OdeNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg["image_shape"]
        f = 2 ** cfg["squeeze"]
        c = c * f * f
        k = 1 if is_vector(cfg) else 3
        dims = [c] + list(cfg["hidden"]) + [c]
        self.layers = nn.ModuleList([ConcatSquash(a, b, k) for a, b in zip(dims[:-1], dims[1:])])
        self.act = torch.tanh if cfg["activation"] == "tanh" else F.softplus
        n = len(dims) - 1
        # gm's CnfConfig::residual: hidden layers of equal width add their input.
        self.skip = [bool(cfg.get("residual")) and 0 < i < n - 1 and dims[i] == dims[i + 1]
                     for i in range(n)]

    def forward(self, z, t):
        h = z
        for i, l in enumerate(self.layers):
            nh = l(h, t)
            if i + 1 < len(self.layers):
                nh = self.act(nh)
            h = h + nh if self.skip[i] else nh
        return h


class CNF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = {**CNF_DEFAULTS, **cfg}
        self.odenet = OdeNet(self.cfg)
        if self.cfg.get("element_norm"):
            c, h, w = self.cfg["image_shape"]
            f = 2 ** self.cfg["squeeze"]
            shape = (1, c * f * f, h // f, w // f)
            self.norm = nn.ParameterDict({"shift": nn.Parameter(torch.zeros(shape)),
                                          "log_scale": nn.Parameter(torch.zeros(shape))})

    def pre(self, x):
        """Logit pre-processing and squeezes: (y, log|det|), before the element-wise affine."""
        cfg = self.cfg
        if is_vector(cfg):
            y, ld = x, torch.zeros(x.shape[0], dtype=x.dtype)
        else:
            y, ld = logit_forward(x, cfg["logit_alpha"])
        for _ in range(cfg["squeeze"]):
            y = squeeze(y)
        return y, ld

    def to_state(self, x):
        y, ld = self.pre(x)
        if self.cfg.get("element_norm"):
            y = (y - self.norm["shift"]) * torch.exp(-self.norm["log_scale"])
            ld = ld - self.norm["log_scale"].sum()
        return y, ld

    @torch.no_grad()
    def data_init(self, x):
        """gm's Model::data_init: μ and log σ (σ ≥ 1e-3) of each state element over x."""
        if self.cfg.get("element_norm"):
            y, _ = self.pre(x.double())
            self.norm["shift"].copy_(y.mean(0, keepdim=True))
            sd = y.var(0, unbiased=False, keepdim=True).sqrt().clamp_min(1e-3)
            self.norm["log_scale"].copy_(sd.log())

    def flow_matching_loss(self, x, g):
        """gm's Objective::FlowMatching: stratified times over up to 8 groups of the batch."""
        z0, _ = self.to_state(x)
        b, T = z0.shape[0], self.cfg["time_length"]
        groups = max(1, min(b, 8))
        eps = torch.randn(z0.shape, generator=g)
        out, start = [], 0
        for k in range(groups):
            n = b // groups + (1 if k < b % groups else 0)
            zg, eg = z0[start:start + n], eps[start:start + n]
            start += n
            s = (k + torch.rand(1, generator=g).item()) / groups
            v = self.odenet((1 - s) * zg + s * eg, s * T)
            out.append(((v - (eg - zg) / T) ** 2).flatten(1).sum(1))
        return torch.cat(out)

    def dynamics(self, t, z, probe, exact):
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.requires_grad_(True)
            f = self.odenet(z, t)
            if exact:
                d = z[0].numel()
                ff, zf = f.flatten(1), z
                tr = 0
                frob = 0
                for i in range(d):
                    g = torch.autograd.grad(ff[:, i].sum(), zf, create_graph=True)[0].flatten(1)
                    tr = tr + g[:, i]
                    frob = frob + (g * g).sum(1)
            else:
                g = torch.autograd.grad(f, z, probe, create_graph=True)[0]
                tr = (g * probe).flatten(1).sum(1)
                frob = (g * g).flatten(1).sum(1)
        kin = (f * f).flatten(1).sum(1)
        return f, tr, kin, frob

    def solve(self, z0, steps, probe, exact):
        """RK4 from t = 0 to T: (log p(z0) before pre-processing, kinetic, jacobian, nfe)."""
        T = self.cfg["time_length"]
        h = T / steps
        zeros = torch.zeros(z0.shape[0], dtype=z0.dtype)
        s = [z0, zeros, zeros, zeros]
        nfe = 0

        def f(t, st):
            nonlocal nfe
            nfe += 1
            return list(self.dynamics(t, st[0], probe, exact))

        def add(st, k, c):
            return [a + c * b for a, b in zip(st, k)]

        t = 0.0
        for _ in range(steps):
            k1 = f(t, s)
            k2 = f(t + h / 2, add(s, k1, h / 2))
            k3 = f(t + h / 2, add(s, k2, h / 2))
            k4 = f(t + h, add(s, k3, h))
            s = [a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(s, k1, k2, k3, k4)]
            t += h
        return std_normal_logp(s[0]) + s[1], s[2], s[3], nfe

    @torch.no_grad()
    def sample(self, n, steps):
        """n states z(T) ~ N(0, temperature²) integrated back to t = 0 by RK4 in `steps` steps
        (the network alone, no divergence); returned as states (the pre-processing's inverse is
        a few element-wise ops, left out)."""
        c, h, w = self.cfg["image_shape"]
        f = 2 ** self.cfg["squeeze"]
        z = torch.randn(n, c * f * f, h // f, w // f) * self.cfg.get("temperature", 1.0)
        T = self.cfg["time_length"]
        dt = -T / steps
        t = T
        for _ in range(steps):
            k1 = self.odenet(z, t)
            k2 = self.odenet(z + dt / 2 * k1, t + dt / 2)
            k3 = self.odenet(z + dt / 2 * k2, t + dt / 2)
            k4 = self.odenet(z + dt * k3, t + dt)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t += dt
        return z

    def nll_parts(self, x, steps, probe=None, exact=None):
        cfg = self.cfg
        exact = cfg["divergence"] == "exact" if exact is None else exact
        offset = 0.0 if is_vector(cfg) else x[0].numel() * math.log(256)
        y, ld = self.to_state(x)
        if probe is None and not exact:
            probe = torch.randint(0, 2, y.shape).to(y.dtype) * 2 - 1
        logp, kin, frob, nfe = self.solve(y, steps, probe, exact)
        return -(logp + ld) + offset, kin, frob, nfe

    def nll(self, x):
        return self.nll_parts(x, self.cfg["solver"].get("steps", 8))[0]


# ------------------------------------------------------------------------------------------------


def build(model):
    kind = model["kind"]
    if kind == "realnvp":
        return RealNVP({k: v for k, v in model.items() if k != "kind"})
    if kind == "cnf":
        return CNF({k: v for k, v in model.items() if k != "kind"})
    raise SystemExit(f"flows_torch.py: unknown kind {kind}")


def loss_of(net, x, g=None):
    if isinstance(net, CNF) and net.cfg.get("objective") == "flow-matching":
        return net.flow_matching_loss(x, g).mean(), 1
    if isinstance(net, CNF):
        c = net.cfg
        nll, kin, frob, nfe = net.nll_parts(x, c["solver"].get("steps", 8))
        return nll.mean() + c["kinetic_weight"] * kin.mean() + c["jacobian_weight"] * frob.mean(), nfe
    return net.nll(x).mean(), 0


def cmd_bench(args):
    torch.set_num_threads(args.threads)
    # Modules and tensors are made on the device; each step ends by waiting for it.
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    cfg = json.loads(args.config)
    net = build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    shape = cfg.get("image_shape", [1, 28, 28])
    x = torch.rand(args.batch, *shape) if shape[1] > 1 else torch.randn(args.batch, *shape)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, _ = loss_of(net, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.device != "cpu":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": float(np.median(times)),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def cmd_forward(args):
    from safetensors.torch import load_file
    net = build(json.loads(args.config)).double()
    net.load_state_dict({k: v.double() for k, v in load_file(args.weights).items()}, strict=True)
    b = load_file(args.batch)
    x = b["x"].double()
    if isinstance(net, CNF):
        probe = b["probe"].double() if "probe" in b else None
        nll = net.nll_parts(x, int(b["steps"].item()), probe=probe, exact=probe is None)[0]
    else:
        nll = net.nll(x)
    print(json.dumps(nll.detach().flatten().tolist()))


def read_idx(path):
    with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_images(d, split):
    import os
    stem = "train" if split == "train" else "t10k"
    for name in (f"{stem}-images-idx3-ubyte.gz", f"{stem}-images-idx3-ubyte"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            a = read_idx(p)
            return torch.from_numpy(a.astype(np.float32)).reshape(a.shape[0], 1, 28, 28)
    raise SystemExit(f"{d}: no {stem} images")


def cmd_train(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.preset, "rb") as f:
        preset = tomllib.load(f)
    model, tr = preset["model"], preset["train"]
    steps = args.steps or tr["steps"]
    net = build(model)
    train = load_images(args.data_dir, "train")
    test = load_images(args.data_dir, "test")[: args.eval_images]
    if isinstance(net, CNF) and not args.init_from:
        # As gm's trainer: data-dependent values from the first 4,096 training images, with
        # their own dequantisation noise (--init-from weights replace every parameter instead).
        gi = torch.Generator().manual_seed(args.seed + 2)
        first = train[:4096]
        net.data_init((first + torch.rand(first.shape, generator=gi)) / 256)
    if args.init_from:
        from safetensors.torch import load_file
        net.load_state_dict(load_file(args.init_from), strict=True)
    lr, warm = tr.get("lr", 1e-3), tr.get("warmup_steps", 0)
    floor = lr * tr.get("min_lr_ratio", 0.0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(args.seed)
    bs = tr["batch_size"]
    perm, pos = torch.randperm(len(train), generator=g), 0
    times, nfes = [], []
    # As gm's trainer: an exponential moving average of the weights (train.ema_decay), which the
    # evaluation and the saved weights use.
    decay = tr.get("ema_decay", 0.0)
    shadow = {k: v.detach().clone() for k, v in net.state_dict().items()} if decay > 0 else None
    for step in range(steps):
        if step < warm:
            cur = lr * (step + 1) / warm
        elif tr.get("schedule") == "cosine":
            p = min((step - warm) / max(tr["steps"] - warm, 1), 1.0)
            cur = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * p))
        else:
            cur = lr
        for grp in opt.param_groups:
            grp["lr"] = cur
        if pos + bs > len(train):
            perm, pos = torch.randperm(len(train), generator=g), 0
        x = (train[perm[pos:pos + bs]] + torch.rand(bs, 1, 28, 28, generator=g)) / 256
        pos += bs
        t0 = time.perf_counter()
        loss, nfe = loss_of(net, x, g)
        opt.zero_grad()
        loss.backward()
        if tr.get("grad_clip", 0) > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tr["grad_clip"])
        opt.step()
        if shadow is not None:
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    shadow[k].mul_(decay).add_(v, alpha=1 - decay)
        times.append(time.perf_counter() - t0)
        nfes.append(nfe)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {loss.item():.2f}", flush=True)
    if shadow is not None:
        net.load_state_dict(shadow)
    total, n = 0.0, 0
    eg = torch.Generator().manual_seed(4321)
    for i in range(0, len(test), 100):
        x = (test[i:i + 100] + torch.rand(len(test[i:i + 100]), 1, 28, 28, generator=eg)) / 256
        if isinstance(net, CNF):
            vals = [net.nll_parts(x, args.eval_steps)[0].detach() for _ in range(args.eval_probes)]
            nll = torch.stack(vals).mean(0)
        else:
            with torch.no_grad():
                nll = net.nll(x)
        total += nll.sum().item()
        n += len(x)
    bpd = total / n / (784 * math.log(2))
    if args.save:
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, args.save)
    print(json.dumps({"bits_per_dim": bpd, "steps": steps, "median_step_ms": 1e3 * float(np.median(times)),
                      "nfe_per_step": float(np.median(nfes)), "eval_images": n, "threads": args.threads}))


def cmd_sample_bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build(json.loads(args.config)).eval()
    if isinstance(net, RealNVP):
        call = lambda: net.sample(args.n)
    else:
        call = lambda: net.sample(args.n, args.steps)
    report_images_per_s(call, args.n, 1, args.repeats)


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
    a = sub.add_parser("forward")
    a.add_argument("--config", required=True)
    a.add_argument("--weights", required=True)
    a.add_argument("--batch", required=True)
    a = sub.add_parser("sample-bench", help="time sampling (fresh weights): RealNVP's inverse, the CNF by RK4")
    a.add_argument("--config", required=True)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--n", type=int, default=64)
    a.add_argument("--steps", type=int, default=8, help="the CNF's RK4 steps")
    a.add_argument("--repeats", type=int, default=1)
    a = sub.add_parser("train")
    a.add_argument("--preset", required=True)
    a.add_argument("--data-dir", required=True)
    a.add_argument("--steps", type=int, default=0, help="0 = the preset's train.steps")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--eval-images", type=int, default=500)
    a.add_argument("--eval-steps", type=int, default=16, help="RK4 steps of the CNF's evaluation solve")
    a.add_argument("--eval-probes", type=int, default=4, help="Hutchinson probes of the CNF's evaluation")
    a.add_argument("--init-from", help="start from these weights (a safetensors file with gm's names)")
    a.add_argument("--save", help="write the trained weights here (safetensors, gm's names)")
    args = p.parse_args()
    {"bench": cmd_bench, "forward": cmd_forward, "train": cmd_train, "sample-bench": cmd_sample_bench}[args.cmd](args)


if __name__ == "__main__":
    main()

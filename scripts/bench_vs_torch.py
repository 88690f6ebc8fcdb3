"""gm vs PyTorch, side by side in one run: same architecture, batch and thread count
(RAYON_NUM_THREADS for gm, torch.set_num_threads for PyTorch, both pinned with taskset when
available), alternating runs, medians.

    python3 scripts/bench_vs_torch.py [--gm target/release/gm] [--threads 1 2] [--what models ops directions]
    python3 scripts/bench_vs_torch.py --device cuda --gm target/cuda/release/gm   # models table on a GPU

With `--device cuda` both run on the GPU (f32, TF32 off on both sides, each step timed up to a
device synchronisation after the optimizer's update); only the models table applies, nothing is
pinned, and the table adds images per second.

The header names the CPU (model, family/model numbers, vector ISA) and its fp32 peak. Four tables:
- models: the train step (loss, backward, Adam) of every preset in PRESETS — gm ms, PyTorch ms,
  ratio PyTorch/gm (> 1 means gm is faster), peak RSS of each process and the most heap gm held
  at once (`--grad-checkpointing`: both sides recompute the UNet's and PixelCNNs' blocks); on the
  CPU each run times at least --min-seconds (2 s: cheap presets run more steps);
- ops: the convolution shapes of `gm bench --ops` with gm's kernels, candle's own kernels and
  PyTorch — ms, ratio PyTorch/gm, and achieved GFLOP/s against this CPU's fp32 peak
  (FLOP per cycle per core from the CPU kind — 32 for AVX2+FMA and for AMD Zen 4's AVX-512, 64
  for AVX-512 with two full-width FMA pipes — at the clock /proc/cpuinfo reports);
- directions (not run by default): each fwd+bwd op case timed four ways on both sides — forward
  alone, forward + data gradient only, forward + filter gradient only, and both gradients — so
  that each direction's time (data = forward with the input's gradient − forward) can be compared
  on its own, apart from how each framework's autograd combines them;
- sampling (not run by default, `--what sampling`): images/s of each family's sampler (SAMPLE_CASES:
  raster PixelCNNs, DDIM-50, flow matching Heun-10, RealNVP, the CNF, DCGAN) and of the VAE's
  IWAE-1000 evaluation, gm (`gm bench --sample/--eval`) against the PyTorch twins.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PRESETS = ["models/vae-mnist.toml", "models/vae-conv-mnist.toml", "models/pixelcnn-mnist.toml",
           "models/gated-pixelcnn-mnist.toml", "models/ddpm-mnist.toml", "models/flow-matching-mnist.toml",
           "models/realnvp-mnist.toml", "models/cnf-mnist.toml", "models/dcgan-mnist.toml"]

TORCH_CHILD = r"""
import json, sys, time, resource
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from vae_torch import VAE
from amp_torch import autocast, scaler
from amp_torch import step as amp_step
cfg, threads, steps, warmup, batch = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
amp_name = sys.argv[8] if len(sys.argv) > 8 else "f32"
amp, scale = autocast(device, amp_name), scaler(device, amp_name)
torch.set_num_threads(threads)
torch.set_default_device(device)
torch.manual_seed(0)
cfg.pop("kind", None)
m = VAE(**cfg)
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
x = torch.bernoulli(torch.rand(batch, *cfg.get("image_shape", (1, 28, 28))))
times = []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    with amp:
        loss = -m.elbo(x, torch.randn(batch, cfg["latent_dim"])).mean()
    amp_step(loss, opt, scale)
    if device != "cpu":
        torch.cuda.synchronize()
    if i >= warmup:
        times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"median_ms": float(np.median(times)), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


TORCH_OPS_CHILD = r"""
import json, sys, time
import numpy as np, torch
import torch.nn.functional as F
cases, threads, steps, warmup, batch = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
out = {}
for c in cases:
    x = torch.randn(batch, c["c_in"], c["size"], c["size"])
    if c["mode"] in ("fwd", "train"):
        w1 = torch.nn.Parameter(torch.randn(32, c["c_in"], 3, 3) * 0.1)
        w2 = torch.nn.Parameter(torch.randn(c["c_out"], 32, 3, 3) * 0.05)
        opt = torch.optim.AdamW([w1, w2], lr=1e-3, weight_decay=0.01)
        def step():
            y = F.conv2d(F.relu(F.conv2d(x, w1, padding=1)), w2, padding=1)
            if c["mode"] == "train":
                opt.zero_grad(); y.square().mean().backward(); opt.step()
    else:
        shape = (c["c_out"], c["c_in"]) if c["op"] == "conv" else (c["c_in"], c["c_out"])
        grads = c.get("grads", "both")
        w = (torch.randn(*shape, c["kernel"], c["kernel"]) * 0.1).requires_grad_(grads in ("both", "weight"))
        xv = x.clone().requires_grad_(grads in ("both", "input"))
        f = F.conv2d if c["op"] == "conv" else F.conv_transpose2d
        def step():
            xv.grad = None; w.grad = None
            y = f(xv, w, stride=c["stride"], padding=c["padding"])
            if grads != "none":
                y.sum().backward()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter(); step()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    out[c["name"] + ":" + c.get("grads", "both")] = float(np.median(times))
print(json.dumps(out))
"""


def run_child(cmd, env, all_lines=False, fatal=True):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        if not fatal:
            print(f"{' '.join(cmd[:3])} ... failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return None
        sys.exit(f"{cmd[0]} failed:\n{out.stderr}")
    lines = [json.loads(l) for l in out.stdout.strip().splitlines() if l.startswith("{")]
    return lines if all_lines else lines[-1]


def cpu_mhz():
    try:
        with open("/proc/cpuinfo") as f:
            return max(float(l.split(":")[1]) for l in f if l.startswith("cpu MHz"))
    except (OSError, ValueError):
        return None


def cpu_info():
    """This CPU as the tables name it: model, family/model numbers, vector ISA, and its fp32 peak
    in FLOP per cycle per core (two FMA pipes of the vector width; AMD Zen 4 — family 25 with
    AVX-512 — runs each 512-bit FMA as two 256-bit halves, so its peak is AVX2's)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields.setdefault(k.strip(), v.strip())
    except OSError:
        return {"name": "unknown CPU", "isa": "unknown", "flop_per_cycle": float("nan")}
    flags = set(fields.get("flags", "").split())
    vendor, family = fields.get("vendor_id", ""), int(fields.get("cpu family", "0") or 0)
    avx512 = sorted(f[len("avx512"):].lstrip("_").upper() for f in flags if f.startswith("avx512"))
    if "avx512f" in flags:
        isa = "AVX-512 (" + ", ".join(avx512) + ")" + (" + AMX" if "amx_tile" in flags else "")
        flop = 32 if vendor == "AuthenticAMD" and family == 25 else 64
    elif "avx2" in flags and "fma" in flags:
        isa, flop = "AVX2 + FMA", 32
    else:
        isa, flop = "SSE", 8
    name = f"{fields.get('model name', 'unknown CPU')} ({vendor} family {family} model {fields.get('model', '?')})"
    return {"name": name, "isa": isa, "flop_per_cycle": flop}


def print_cpu(args):
    c, mhz = cpu_info(), cpu_mhz()
    print(f"CPU: {c['name']}, {os.cpu_count()} logical cores, {mhz or float('nan'):.0f} MHz; vector ISA: {c['isa']}; "
          f"fp32 peak {c['flop_per_cycle']} FLOP/cycle/core; threads {' and '.join(map(str, args.threads))}")


def median(v):
    return sorted(v)[len(v) // 2]


def bench_ops(args):
    mhz = cpu_mhz()
    rows = []
    for th in args.threads:
        pin, env = pinning(th)
        gm_runs, torch_runs, cases = [], [], None
        for _ in range(args.repeats):
            recs = run_child(pin + [args.gm, "bench", "--ops", "--device", "cpu", "--batch", str(args.batch),
                                    "--steps", str(args.op_steps), "--warmup", "1"], env, all_lines=True)
            gm_runs.append(recs)
            cases = [r for r in recs if r["backend"] == "gm"]
            torch_runs.append(run_child(pin + [args.python, "-c", TORCH_OPS_CHILD, json.dumps(cases), str(th),
                                               str(args.op_steps), "1", str(args.batch)], env))
        for c in cases:
            g = median([r["median_ms"] for run in gm_runs for r in run if r["name"] == c["name"] and r["backend"] == "gm"])
            cd = median([r["median_ms"] for run in gm_runs for r in run if r["name"] == c["name"] and r["backend"] == "candle"])
            t = median([run[c["name"] + ":both"] for run in torch_runs])
            peak = cpu_info()["flop_per_cycle"] * mhz * 1e-3 * th if mhz else float("nan")
            rows.append((c["name"], th, g, cd, t, t / g, c["flop"] / g / 1e6, c["flop"] / t / 1e6, peak))
    print(f"\nconvolution ops, batch {args.batch}, fp32 peak = {cpu_info()['flop_per_cycle']} FLOP/cycle/core x "
          f"{mhz or float('nan'):.0f} MHz x threads")
    print(f"{'case':<30}{'thr':>4}{'gm ms':>9}{'candle ms':>10}{'torch ms':>9}{'torch/gm':>9}{'gm GF/s':>9}{'torch GF/s':>11}{'gm %peak':>9}")
    for n, th, g, cd, t, r, gg, tg, peak in rows:
        print(f"{n:<30}{th:>4}{g:>9.1f}{cd:>10.1f}{t:>9.1f}{r:>9.2f}{gg:>9.1f}{tg:>11.1f}{100 * gg / peak:>8.0f}%")


def bench_directions(args):
    kinds = ["none", "input", "weight", "both"]
    rows = []
    for th in args.threads:
        pin, env = pinning(th)
        gm_runs, torch_runs, cases = [], [], None
        for _ in range(args.repeats):
            recs = run_child(pin + [args.gm, "bench", "--ops", "--backend", "gm", "--device", "cpu",
                                    "--batch", str(args.batch), "--steps", str(args.op_steps), "--warmup", "1",
                                    "--grads", ",".join(kinds)], env, all_lines=True)
            recs = [r for r in recs if r["mode"] == "fwdbwd"]
            gm_runs.append(recs)
            cases = recs
            torch_runs.append(run_child(pin + [args.python, "-c", TORCH_OPS_CHILD, json.dumps(cases), str(th),
                                               str(args.op_steps), "1", str(args.batch)], env))
        names = list(dict.fromkeys(r["name"] for r in cases))
        for n in names:
            g = {k: median([r["median_ms"] for run in gm_runs for r in run if r["name"] == n and r["grads"] == k])
                 for k in kinds}
            t = {k: median([run[n + ":" + k] for run in torch_runs]) for k in kinds}
            dirs = lambda m: (m["none"], m["input"] - m["none"], m["weight"] - m["none"], m["both"])
            rows.append((n, th, dirs(g), dirs(t)))
    print(f"\nconvolution directions, batch {args.batch}, gm ms / PyTorch ms (PyTorch/gm): forward; data gradient = "
          "(forward + input's gradient) - forward; filter gradient = (forward + weight's gradient) - forward; both")
    print(f"{'case':<30}{'thr':>4}{'forward':>20}{'data grad':>20}{'filter grad':>20}{'fwd+bwd':>20}")
    for n, th, g, t in rows:
        cells = "".join(f"{f'{a:.1f}/{b:.1f} ({b / a:.2f})':>20}" for a, b in zip(g, t))
        print(f"{n:<30}{th:>4}{cells}")


# Steps (DDIM, Heun, RK4) or importance samples (IWAE) of the sampling table, by model kind: gm's
# --set overrides below and the PyTorch twins' arguments both read them.
SAMPLE_STEPS = {"ddpm": 50, "flow-matching": 10, "cnf": 8, "vae": 1000}

# The sampling table: (preset, "sample" or "eval", gm --set overrides, images per gm call, images
# per PyTorch call, timed calls per run; the median call counts).
# The PyTorch twins' raster samplers are slow (a network pass over the rows a pixel sees, per
# pixel), so they draw fewer images per call; images/s is per call either way. The CNF runs
# RK4 × 8 (32 network calls) on both sides: an adaptive solver's step count on fresh weights
# depends on each side's initialisation, so dopri5 would not compare like with like.
SAMPLE_CASES = [
    ("models/pixelcnn-mnist.toml", "sample", [], 64, 8, 1),
    ("models/gated-pixelcnn-mnist.toml", "sample", [], 64, 8, 1),
    ("models/ddpm-mnist.toml", "sample", [f'model.sampler={{kind="ddim",steps={SAMPLE_STEPS["ddpm"]},eta=0.0}}'], 64, 64, 1),
    ("models/flow-matching-mnist.toml", "sample",
     [f'model.solver={{method="heun",steps={SAMPLE_STEPS["flow-matching"]}}}'], 64, 64, 1),
    ("models/realnvp-mnist.toml", "sample", [], 64, 64, 3),
    ("models/cnf-mnist.toml", "sample", [f'model.eval_solver={{method="rk4",steps={SAMPLE_STEPS["cnf"]}}}'], 64, 64, 3),
    ("models/dcgan-mnist.toml", "sample", [], 1000, 1000, 5),
    ("models/vae-mnist.toml", "eval", [f"eval.iwae_k={SAMPLE_STEPS['vae']}"], 100, 100, 1),
]


def torch_sampler(args, model, n, th, calls=1):
    """The PyTorch twin's sampling (or, for the VAE, IWAE-1000 evaluation) command for a preset's
    model section."""
    if model["kind"] in ("pixelcnn", "gated-pixelcnn"):
        return [args.python, os.path.join(HERE, "pixelcnn_torch.py"), "sample-bench", "--config", json.dumps(model),
                "--n", str(n), "--threads", str(th)]
    if model["kind"] in ("ddpm", "flow-matching"):
        return [args.python, os.path.join(HERE, "unet_torch.py"), "sample-bench", "--config", json.dumps(model),
                "--n", str(n), "--threads", str(th), "--steps", str(SAMPLE_STEPS[model["kind"]]), "--warmup", "0"]
    if model["kind"] in ("realnvp", "cnf"):
        return [args.python, os.path.join(HERE, "flows_torch.py"), "sample-bench", "--config", json.dumps(model),
                "--n", str(n), "--threads", str(th), "--steps", str(SAMPLE_STEPS["cnf"]), "--repeats", str(calls)]
    if model["kind"] == "vae":
        return [args.python, os.path.join(HERE, "vae_torch.py"), "iwae-bench", "--config", json.dumps(model),
                "--n", str(n), "--threads", str(th), "--iwae-k", str(SAMPLE_STEPS["vae"]), "--repeats", str(calls)]
    if model["kind"] == "gan":
        return [args.python, os.path.join(HERE, "gan_torch.py"), "sample-bench", "--config", json.dumps(model),
                "--n", str(n), "--threads", str(th), "--repeats", str(calls)]
    return None


def bench_sampling(args):
    rows = []
    for preset, mode, sets, n_gm, n_torch, calls in SAMPLE_CASES:
        with open(os.path.join(ROOT, preset), "rb") as f:
            model = tomllib.load(f)["model"]
        for th in args.threads:
            pin, env = pinning(th)
            g, t = [], []
            for _ in range(args.repeats):
                r = run_child(pin + [args.gm, "bench", "--config", os.path.join(ROOT, preset), "--device", "cpu",
                                     f"--{mode}", str(n_gm), "--steps", str(calls), "--warmup", "1",
                                     *[a for kv in sets for a in ("--set", kv)]], env, fatal=False)
                g.append(r["images_per_s"] if r else float("nan"))
                cmd = torch_sampler(args, model, n_torch, th, calls)
                r = run_child(pin + cmd, env, fatal=False) if cmd else None
                t.append(r["images_per_s"] if r else float("nan"))
            gi, ti = median(g), median(t)
            rows.append((os.path.basename(preset) + (" (IWAE eval)" if mode == "eval" else ""), " ".join(sets), th,
                         n_gm, n_torch, gi, ti, gi / ti))
            print(f"  sampling {rows[-1][0]} thr {th}: gm {gi:.2f} img/s, torch {ti:.3f} img/s", file=sys.stderr,
                  flush=True)
    print(f"\nsampling (and the VAE's IWAE-1000 evaluation), images/s (medians of {args.repeats} alternating runs, "
          "fresh weights), gm/PyTorch > 1 means gm is faster")
    print(f"{'preset':<36}{'thr':>4}{'gm n':>6}{'torch n':>8}{'gm img/s':>10}{'torch img/s':>12}{'gm/torch':>10}  settings")
    for p, sets, th, ng, nt, gi, ti, r in rows:
        print(f"{p:<36}{th:>4}{ng:>6}{nt:>8}{gi:>10.2f}{ti:>12.3f}{r:>10.2f}  {sets}")


def pinning(th, device="cpu"):
    if device != "cpu":
        return [], dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
    pin = ["taskset", "-c", ",".join(str(i) for i in range(th))] if shutil.which("taskset") else []
    return pin, dict(os.environ, RAYON_NUM_THREADS=str(th), OMP_NUM_THREADS=str(th))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gm", default=os.path.join(ROOT, "target/release/gm"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=None,
                    help="models table: time at least this much per run and side; a preset whose --steps take "
                         "less (sized by a 2-step gm probe) runs more steps, the same number on both sides "
                         "(default 2 on the CPU, 0 = off on a GPU)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the median is reported")
    ap.add_argument("--what", nargs="+", default=["models", "ops"], choices=["models", "ops", "directions", "sampling"])
    ap.add_argument("--presets", nargs="+", default=PRESETS, help="presets of the train-step table")
    ap.add_argument("--batch", type=int, default=128, help="batch of the ops table")
    ap.add_argument("--op-steps", type=int, default=5, help="timed calls per op case")
    ap.add_argument("--precision", nargs="+", default=["f32"], choices=["f32", "bf16", "f16"],
                    help="models table: gm's train.precision and PyTorch's AMP (amp_torch.py) side by side; "
                         "the realnvp, cnf and gan twins have f32 only")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="models table: gm's train.gradient_checkpointing and the UNet and PixelCNN twins' "
                         "torch.utils.checkpoint of the same blocks (other presets are skipped)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the models table on the GPU for both (no pinning; --threads then sets host threads)")
    args = ap.parse_args()
    if args.min_seconds is None:
        args.min_seconds = 2.0 if args.device == "cpu" else 0.0
    if args.device != "cpu":
        args.what = ["models"]
        args.threads = args.threads[:1]
    if args.device == "cpu":
        print_cpu(args)
    if "models" in args.what:
        bench_models(args)
    if "ops" in args.what:
        bench_ops(args)
    if "directions" in args.what:
        bench_directions(args)
    if "sampling" in args.what:
        bench_sampling(args)


def bench_models(args):
    rows, kernels, elementwise = [], set(), set()
    dev = ["--device", args.device]
    for preset in args.presets:
        with open(os.path.join(ROOT, preset), "rb") as f:
            toml = tomllib.load(f)
        model, batch = toml["model"], toml["train"]["batch_size"]
        ck_gm, ck_torch = [], []
        if args.grad_checkpointing:
            if model["kind"] not in ("pixelcnn", "gated-pixelcnn", "ddpm", "flow-matching"):
                print(f"  {os.path.basename(preset)}: no checkpointed blocks, skipped", file=sys.stderr)
                continue
            ck_gm, ck_torch = ["--set", "train.gradient_checkpointing=true"], ["--checkpoint"]
        for th, prec in [(th, p) for th in args.threads for p in args.precision]:
            pin, env = pinning(th, args.device)
            g, t, grss, glive, trss = [], [], 0, 0, 0
            def gm_bench(steps, warmup):
                return run_child(pin + [args.gm, "bench", "--config", os.path.join(ROOT, preset), *dev,
                                        "--steps", str(steps), "--warmup", str(warmup),
                                        "--set", f'train.precision="{prec}"', *ck_gm], env, fatal=False)

            steps = args.steps
            if args.min_seconds > 0:
                # A short step timed over a few steps moves with every hiccup of a shared machine.
                probe = gm_bench(2, 1)
                if probe and probe["median_ms"] > 0:
                    steps = max(steps, min(1000, math.ceil(args.min_seconds * 1e3 / probe["median_ms"])))
            for _ in range(args.repeats):
                r = gm_bench(steps, args.warmup)
                g.append(r["median_ms"] if r else float("nan")); grss = max(grss, (r or {}).get("peak_rss_mb") or 0)
                glive = max(glive, (r or {}).get("peak_live_mb") or 0)
                kernels.add((r or {}).get("conv_kernels") or "?")
                elementwise.add((r or {}).get("elementwise") or "?")
                common = ["--threads", str(th), "--steps", str(steps), "--warmup", str(args.warmup),
                          "--batch", str(batch), *dev]
                amp = ["--amp", prec, *ck_torch]
                if model["kind"] in ("pixelcnn", "gated-pixelcnn"):
                    cmd = [args.python, os.path.join(HERE, "pixelcnn_torch.py"), "bench", "--config",
                           json.dumps(model), *common, *amp]
                elif model["kind"] in ("ddpm", "flow-matching"):
                    cmd = [args.python, os.path.join(HERE, "unet_torch.py"), "bench", "--config",
                           json.dumps(model), *common, *amp]
                elif model["kind"] in ("realnvp", "cnf", "gan") and prec != "f32":
                    cmd = None
                elif model["kind"] in ("realnvp", "cnf", "gan"):
                    script = "gan_torch.py" if model["kind"] == "gan" else "flows_torch.py"
                    cmd = [args.python, os.path.join(HERE, script), "bench", "--config",
                           json.dumps(model), *common]
                else:
                    cmd = [args.python, "-c", TORCH_CHILD, HERE, json.dumps(model), str(th),
                           str(steps), str(args.warmup), str(batch), args.device, prec]
                r = run_child(pin + cmd, env, fatal=False) if cmd else None
                t.append(r["median_ms"] if r else float("nan")); trss = max(trss, (r or {}).get("maxrss_mb", 0))
            gm_ms, pt_ms = sorted(g)[len(g) // 2], sorted(t)[len(t) // 2]
            rows.append((os.path.basename(preset), prec, th, batch, steps, gm_ms, pt_ms, pt_ms / gm_ms, grss, glive,
                         trss))
            print(f"  {rows[-1][0]} {prec} thr {th}: gm {gm_ms:.2f} ms, torch {pt_ms:.2f} ms ({steps} steps)",
                  file=sys.stderr, flush=True)
    print(f"train step on {args.device}, medians of {args.repeats} alternating runs of at least --steps "
          f"{args.steps} steps and {args.min_seconds:g} s (steps: per run and side); images/s at the median; "
          "precision: gm's train.precision, PyTorch's AMP"
          + ("; gradient checkpointing on both sides" if args.grad_checkpointing else "")
          + f"; gm's convolution kernels: {', '.join(sorted(kernels))}"
          + f"; gm's element-wise loops: {', '.join(sorted(elementwise))}")
    print("peak memory: gm MB and torch MB the processes' peak RSS, gm live MB the most heap gm held at once "
          "during a timed step")
    print(f"{'preset':<26}{'prec':>5}{'thr':>4}{'batch':>6}{'steps':>6}{'gm ms':>10}{'torch ms':>10}{'torch/gm':>10}{'gm img/s':>10}{'torch img/s':>12}{'gm MB':>8}{'gm live MB':>11}{'torch MB':>9}")
    for p, pr, th, b, n, g, t, r, gr, gl, tr in rows:
        print(f"{p:<26}{pr:>5}{th:>4}{b:>6}{n:>6}{g:>10.2f}{t:>10.2f}{r:>10.2f}{b / g * 1e3:>10.0f}{b / t * 1e3:>12.0f}{gr:>8.0f}{gl:>11.0f}{tr:>9.0f}")


if __name__ == "__main__":
    main()

"""Reference trajectories of diffusers' own schedulers for gm's sampler test.

Runs DDIM, DDPM, DPM-Solver++(2M), UniPC, Euler and Heun (Karras sigmas) from diffusers on one
linear schedule (T = 1000), one x_T and a deterministic stand-in for the network (a fixed
function of the input and t), and prints every network time and every intermediate x as JSON.
`tests/diffusers_schedulers.rs` runs gm's samplers on the same inputs and compares.

Stochastic steps (DDPM, DDIM with eta > 0) are compared by their mean and standard deviation:
the noise is replaced by zeros here, and the chain continues from the mean.

    python scripts/diffusers_schedulers.py > ref.json
"""

import json
import math
import sys

import numpy as np
import torch
import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

T = 1000
SHAPE = (2, 1, 4, 4)
PRED = {"epsilon": "epsilon", "sample": "sample", "v": "v_prediction"}


def fake_model(x, t):
    """The stand-in network: gm's test evaluates the same formula."""
    return 0.6 * torch.tanh(x) * math.cos(t / 700.0) + 0.3 * torch.sin(2.0 * x + t / 300.0)


def x_start():
    n = int(np.prod(SHAPE))
    return torch.tensor(np.sin(np.arange(n) * 1.7) * 1.3, dtype=torch.float64).reshape(SHAPE)


def make(kind, spacing, prediction, clip):
    common = dict(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type=PRED[prediction],
        timestep_spacing=spacing,
    )
    if kind == "ddim":
        return DDIMScheduler(clip_sample=clip, set_alpha_to_one=True, **common)
    if kind == "ddpm":
        return DDPMScheduler(clip_sample=clip, **common)
    if kind == "dpmpp-2m":
        return DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", **common
        )
    if kind == "unipc":
        return UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True, **common)
    if kind == "euler-karras":
        return EulerDiscreteScheduler(use_karras_sigmas=True, **common)
    if kind == "heun-karras":
        return HeunDiscreteScheduler(use_karras_sigmas=True, clip_sample=clip, **common)
    raise ValueError(kind)


def run(case):
    kind, spacing, steps, prediction = case["kind"], case["spacing"], case["steps"], case["prediction"]
    clip, eta, large = case.get("clip", False), case.get("eta", 0.0), case.get("large", False)
    sched = make(kind, spacing, prediction, clip)
    if kind == "ddpm":
        sched.register_to_config(variance_type="fixed_large" if large else "fixed_small")
        sched.variance_type = sched.config.variance_type
    sched.set_timesteps(steps)
    x = x_start() * float(sched.init_noise_sigma)
    times, xs, stds = [], [], []
    for t in sched.timesteps:
        tf = float(t)
        inp = sched.scale_model_input(x, t)
        out = fake_model(inp, tf)
        if kind == "ddim":
            res = sched.step(out, int(t), x, eta=eta, use_clipped_model_output=True,
                             variance_noise=torch.zeros_like(x))
            prev = int(t) - T // steps
            stds.append(eta * float(sched._get_variance(int(t), prev)) ** 0.5)
        elif kind == "ddpm":
            res = sched.step(out, int(t), x)
            var = float(sched._get_variance(int(t))) if int(t) > 0 else 0.0
            stds.append(var ** 0.5)
        else:
            res = sched.step(out, t, x)
        x = res.prev_sample.to(torch.float64)
        times.append(tf)
        xs.append(x.flatten().tolist())
    return dict(case, times=times, init_sigma=float(sched.init_noise_sigma), xs=xs, stds=stds)


def cases():
    out = []
    for spacing in ["leading", "trailing"]:
        for prediction in ["epsilon", "sample", "v"]:
            out.append(dict(kind="ddim", spacing=spacing, steps=10, prediction=prediction))
        out.append(dict(kind="ddim", spacing=spacing, steps=20, prediction="epsilon", clip=True))
        out.append(dict(kind="ddim", spacing=spacing, steps=10, prediction="epsilon", eta=0.5))
    for spacing in ["linspace", "leading", "trailing"]:
        for large in [False, True]:
            out.append(dict(kind="ddpm", spacing=spacing, steps=10, prediction="epsilon", large=large))
        out.append(dict(kind="ddpm", spacing=spacing, steps=25, prediction="v", clip=True))
    for kind in ["dpmpp-2m", "unipc", "euler-karras", "heun-karras"]:
        for spacing in ["linspace", "leading", "trailing"]:
            for steps in [5, 10, 20]:
                out.append(dict(kind=kind, spacing=spacing, steps=steps, prediction="epsilon"))
        for prediction in ["sample", "v"]:
            out.append(dict(kind=kind, spacing="linspace", steps=10, prediction=prediction))
    out.append(dict(kind="heun-karras", spacing="linspace", steps=10, prediction="epsilon", clip=True))
    return out


def main():
    # DDPM's noise becomes zeros: the chain follows the step's mean.
    ddpm_module.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **kw: torch.zeros(
        shape, dtype=dtype, device=device
    )
    ref = make("ddim", "leading", "epsilon", False)
    json.dump(
        dict(
            diffusers=diffusers.__version__,
            torch=torch.__version__,
            alphas_cumprod=[float(a) for a in ref.alphas_cumprod],
            shape=list(SHAPE),
            x_start=x_start().flatten().tolist(),
            cases=[run(c) for c in cases()],
        ),
        sys.stdout,
    )


if __name__ == "__main__":
    main()

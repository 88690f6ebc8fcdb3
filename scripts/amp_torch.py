"""PyTorch automatic mixed precision for the twins' train-step benchmarks: `--amp f32|bf16|f16`.

bf16 and f16 run the forward pass under `torch.autocast` (PyTorch's per-op choice: matrix
products and convolutions in the low precision, reductions and losses in f32); f16 adds a
`GradScaler` (scale, unscale before clipping, skipped steps on overflow), as PyTorch's AMP recipe
does. f32 leaves both off.
"""
import contextlib

import torch


def autocast(device, amp):
    if amp == "f32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[amp]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def scaler(device, amp):
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == "f16"))


def step(loss, opt, scale, params=None, clip=None):
    """backward, (unscale and clip), the optimizer step and the scale update."""
    opt.zero_grad()
    scale.scale(loss).backward()
    if clip is not None:
        scale.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
    scale.step(opt)
    scale.update()

"""A diffusers model folder and diffusers' own outputs on it, for gm's import test.

Builds diffusers' UNet2DModel (28×28 grey, two levels of 32 and 64 channels, attention with
heads of 8 channels at the second level and in the middle), gives every parameter random values,
saves it with a DDIM scheduler through DDIMPipeline.save_pretrained(OUT), and prints as JSON:
the UNet's output on a fixed input at two timesteps, and a 10-step DDIM sample from a given x_T
(with diffusers' x_T), as DDIMPipeline returns it. `tests/diffusers_unet.rs` reads the folder
with gm and compares.

    python scripts/diffusers_unet.py OUT_DIR > ref.json
"""

import json
import sys

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    # Random values everywhere (diffusers' initialisation leaves some layers near zero).
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / max(1, p[0].numel()) ** 0.5) + 0.02 * torch.randn_like(p))
    unet.eval()
    # clip_sample=False: with clipping, gm re-derives ε from the clipped x̂_0 where DDIMPipeline
    # keeps the network's ε (use_clipped_model_output=False).
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out)

    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1, 28, 28), generator=g)
    ts = [37, 981]
    with torch.no_grad():
        fwd = [unet(x, torch.tensor([t, t])).sample for t in ts]

    g = torch.Generator().manual_seed(2)
    x_t = torch.randn((2, 1, 28, 28), generator=g)
    g = torch.Generator().manual_seed(2)
    image = pipe(batch_size=2, generator=g, eta=0.0, num_inference_steps=10, output_type="np").images
    json.dump(
        dict(
            x=x.flatten().tolist(),
            timesteps=ts,
            forward=[f.flatten().tolist() for f in fwd],
            x_T=x_t.flatten().tolist(),
            # DDIMPipeline returns (B, H, W, C) in [0, 1].
            ddim_10=np.transpose(image, (0, 3, 1, 2)).flatten().tolist(),
        ),
        sys.stdout,
    )


if __name__ == "__main__":
    main()

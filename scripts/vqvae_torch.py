"""gm's VQ-VAE in PyTorch: the same parameter names and maths (encoder, nearest-code
quantisation, straight-through decoder, commitment, the K-way Gated PixelCNN prior over codes).

  loss --config JSON --weights W.safetensors --batch B.safetensors
       prints, per image of the batch's `x`, the reconstruction -log p(x | z_q) (nats), the
       commitment ||z_e - sg(z_q)||^2 and the prior's -log p(z_q) (nats), as JSON, with the
       weights of a gm checkpoint (names line up with this module's state_dict).
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pixelcnn_torch import GatedPixelCNN  # noqa: E402


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, h, d, res_blocks):
        super().__init__()
        self.conv1 = nn.Conv2d(1, h, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(h, h, 4, stride=2, padding=1)
        self.res = nn.ModuleList(ResBlock(h) for _ in range(res_blocks))
        self.out = nn.Conv2d(h, d, 1)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        for r in self.res:
            h = r(h)
        return self.out(F.relu(h))


class Decoder(nn.Module):
    def __init__(self, h, d, res_blocks):
        super().__init__()
        setattr(self, "in", nn.Conv2d(d, h, 3, padding=1))
        self.res = nn.ModuleList(ResBlock(h) for _ in range(res_blocks))
        self.up1 = nn.ConvTranspose2d(h, h, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(h, 1, 4, stride=2, padding=1)

    def forward(self, z):
        h = getattr(self, "in")(z)
        for r in self.res:
            h = r(h)
        return self.up2(F.relu(self.up1(F.relu(h))))


class Quantizer(nn.Module):
    def __init__(self, k, d):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(k, d))
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", torch.zeros(k, d))

    def forward(self, z_e):
        b, d, h, w = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.codebook
        dist = (z * z).sum(1, keepdim=True) - 2 * z @ e.t() + (e * e).sum(1)[None]
        codes = dist.argmin(1)
        z_q = e[codes].reshape(b, h, w, d).permute(0, 3, 1, 2)
        return codes, z_q


class Prior(nn.Module):
    def __init__(self, k, grid, p):
        super().__init__()
        self.code_embed = nn.Embedding(k, p["code_embedding"])
        self.net = GatedPixelCNN(image_shape=(p["code_embedding"], *grid), channels=p["channels"],
                                 layers=p["layers"], first_kernel=p["first_kernel"], kernel=p["kernel"],
                                 head_channels=p["head_channels"], output="bernoulli")
        self.net.head[3] = nn.Conv2d(p["head_channels"], k, 1)
        self.grid = grid

    def nll(self, codes, b):
        h, w = self.grid
        emb = self.code_embed(codes).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        logits = self.net.logits(emb)  # (B, K, h*w)
        return F.cross_entropy(logits, codes.reshape(b, h * w), reduction="none").sum(1)


class VQVAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg["image_shape"]
        k, d = cfg["codebook_size"], cfg["embedding_dim"]
        self.encoder = Encoder(cfg["hidden"], d, cfg["res_blocks"])
        self.decoder = Decoder(cfg["hidden"], d, cfg["res_blocks"])
        self.quantizer = Quantizer(k, d)
        self.prior = Prior(k, (h // 4, w // 4), cfg["prior"])

    def parts(self, x):
        b = x.shape[0]
        z_e = self.encoder(x)
        codes, z_q = self.quantizer(z_e.detach())
        logits = self.decoder(z_e + (z_q - z_e).detach())
        recon = F.binary_cross_entropy_with_logits(logits.reshape(b, -1), x.reshape(b, -1), reduction="none").sum(1)
        commit = ((z_e - z_q.detach()) ** 2).flatten(1).sum(1)
        return recon, commit, self.prior.nll(codes, b)


def cmd_loss(args):
    from safetensors.torch import load_file
    model = VQVAE(json.loads(args.config)).double()
    missing, unexpected = model.load_state_dict(load_file(args.weights), strict=False)
    if missing or unexpected:
        raise SystemExit(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
    x = load_file(args.batch)["x"].double()
    with torch.no_grad():
        recon, commit, prior = model.parts(x)
    print(json.dumps({"recon": recon.tolist(), "commit": commit.tolist(), "prior": prior.tolist()}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("loss")
    a.add_argument("--config", required=True)
    a.add_argument("--weights", required=True)
    a.add_argument("--batch", required=True)
    args = p.parse_args()
    {"loss": cmd_loss}[args.cmd](args)


if __name__ == "__main__":
    main()

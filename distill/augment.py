"""Training-time augmentation (never used at inference). Teacher and student receive the *same* augmented
batch (consistent augmentation), so the teacher's targets describe exactly what the student sees.

Every random draw comes from a generator seeded by (seed, step), so a resumed run replays the same views.
Augmentations keep the answer valid for this task: small shifts (objects stay in frame with border padding),
slight brightness changes and pixel noise. No flips: a mirror image turns "left of" answers around.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.nn import functional as F


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def augment_images(x: torch.Tensor, gen: torch.Generator, *, shift: int = 2, brightness: float = 0.05,
                   noise_std: float = 0.05) -> torch.Tensor:
    """Shift each image by up to ``shift`` whole pixels, add a per-image brightness offset and pixel noise.

    ``x`` is (B, 3, H, W) normalised float; integer shifts through ``grid_sample`` are exact resampling."""
    b, _, h, w = x.shape
    if shift > 0:
        d = torch.randint(-shift, shift + 1, (b, 2), generator=gen).to(x.dtype)  # (B, 2) pixels (dx, dy)
        theta = torch.zeros(b, 2, 3, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = 2.0 * d[:, 0] / w
        theta[:, 1, 2] = 2.0 * d[:, 1] / h
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)
    if brightness > 0:
        x = x + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1).to(x) * brightness
    if noise_std > 0:
        x = x + torch.randn(x.shape, generator=gen).to(x) * noise_std
    return x


def mixup(x: torch.Tensor, labels: torch.Tensor, alpha: float,
          gen: torch.Generator) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """Mix each image with another of the batch (the question stays the first one's: text cannot be mixed).

    Returns (mixed images, labels of the partner images, lam). With alpha <= 0 nothing changes."""
    if alpha <= 0:
        return x, None, 1.0
    lam = _beta(alpha, gen)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], labels[perm], lam


def _beta(alpha: float, gen: torch.Generator) -> float:
    """Beta(alpha, alpha) from two Gamma draws made with ``gen`` (torch's Beta sampler ignores generators)."""
    a = torch._standard_gamma(torch.full((2,), float(alpha)), generator=gen)
    return float(a[0] / a.sum())

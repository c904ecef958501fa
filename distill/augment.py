"""Training-time augmentation (never used at inference). Teacher and student receive the *same* augmented
batch (consistent augmentation), so the teacher's targets describe exactly what the student sees.

Every random draw comes from a generator seeded by (seed, step), so a resumed run replays the same views.
Augmentations keep the answer valid for this task: small shifts (objects stay in frame with border padding),
slight brightness changes and pixel noise. No flips: a mirror image turns "left of" answers around.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def augment_images(x: torch.Tensor, gen: torch.Generator, *, shift: int = 2, brightness: float = 0.05,
                   noise_std: float = 0.05) -> torch.Tensor:
    """Shift each image by up to ``shift`` whole pixels, add a per-image brightness offset and per-pixel
    noise (grey: the same value on every channel).

    ``x`` is (B, 3, H, W) normalised float; shifts are whole pixels, so no pixel is interpolated."""
    b, _, h, w = x.shape
    if shift > 0:
        d = torch.randint(-shift, shift + 1, (b, 2), generator=gen)  # (B, 2) pixels (dx, dy)
        x = shift_images(x, d[:, 0], d[:, 1])  # a new tensor: the in-place adds below leave the caller's intact
    else:
        x = x.clone()
    if brightness > 0:
        x.add_((torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1).to(x), alpha=brightness)
    if noise_std > 0:  # one noise value per pixel, shared by its channels: a third of the draws, which dominated
        x.add_(torch.randn((b, 1, h, w), generator=gen).to(x), alpha=noise_std)
    return x


def shift_images(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, clamp(i + dy[b]), clamp(j + dx[b])]: whole-pixel shifts with border padding.

    Two gathers along H and W; the same pixels as ``grid_sample(mode="nearest", padding_mode="border")`` on the
    equivalent affine grid, at a fraction of its cost (building the grid dominated an augmentation step)."""
    b, c, h, w = x.shape
    rows = (torch.arange(h)[None] + dy.long()[:, None]).clamp_(0, h - 1).to(x.device)  # (B, H)
    cols = (torch.arange(w)[None] + dx.long()[:, None]).clamp_(0, w - 1).to(x.device)  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


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

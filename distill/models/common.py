"""Pieces every model family shares: the output record, masked pooling, FiLM blocks, explicit attention.

Why explicit code instead of ``nn.MultiheadAttention``: the ONNX exporters can bake the sequence length into
its reshapes; these modules only reshape along the feature axis, so batch and sequence stay dynamic.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F


class MultimodalOutput(NamedTuple):
    """What every model returns. A NamedTuple so DDP, torch.export and pytree walk it without help."""

    logits: torch.Tensor  # (B, C)
    image_embed: torch.Tensor  # (B, E) shared image-text space
    text_embed: torch.Tensor  # (B, E)
    fused: torch.Tensor  # (B, F) the representation the classifier reads
    # (B, C, h, w) the question-conditioned feature map before pooling: the dense hint spatial KD matches.
    # Not exported (the ONNX graph keeps only (B, D) outputs).
    spatial: Optional[torch.Tensor] = None


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``x`` (B, L, D) counting only positions where ``mask`` (B, L) is 1."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """Append two channels holding each pixel's (y, x) position in [-1, 1] (CoordConv): spatial questions
    such as "left of" need to know where things are, which plain convolutions do not encode."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, ys, xs], dim=1)  # (B, C+2, H, W)


class FiLMBlock(nn.Module):
    """Residual block whose normalised features are scaled and shifted by the question (FiLM, Perez et al.).

    ``depthwise=True`` uses a depthwise 3x3 convolution (the student's cheap variant)."""

    def __init__(self, channels: int, depthwise: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 2, channels, 1)
        groups = channels if depthwise else 1
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(add_coords(x)))  # (B, C, H, W)
        y = self.norm(self.conv2(h))
        y = F.relu((1.0 + gamma[:, :, None, None]) * y + beta[:, :, None, None])
        return h + y


class FiLMFusion(nn.Module):
    """The question (B, D) generates (gamma, beta) for each block applied over image features (B, C, H, W);
    a 1x1 conv and global max pool give the fused vector (B, head). Returns (fused, the last block's map)."""

    def __init__(self, text_dim: int, channels: int, blocks: int, head: int, depthwise: bool = False,
                 pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "maxmean"):
            raise ValueError(f"pool must be 'max' or 'maxmean', got {pool!r}")
        self.channels, self.n, self.pool = channels, blocks, pool
        self.out_dim = head * (2 if pool == "maxmean" else 1)
        self.film = nn.Linear(text_dim, 2 * channels * blocks)
        self.blocks = nn.ModuleList(FiLMBlock(channels, depthwise) for _ in range(blocks))
        self.head = nn.Conv2d(channels, head, 1)

    def forward(self, feats: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        params = self.film(text).view(-1, self.n, 2, self.channels)  # (B, N, 2, C)
        x = feats
        for i, block in enumerate(self.blocks):
            x = block(x, params[:, i, 0], params[:, i, 1])  # (B, C, H, W)
        h = F.relu(self.head(x))  # (B, head, H, W)
        if self.pool == "maxmean":  # the mean keeps "how much" (counts), which a max alone forgets
            return torch.cat([h.amax(dim=(2, 3)), 4.0 * h.mean(dim=(2, 3))], dim=1), x  # (B, 2*head)
        return h.amax(dim=(2, 3)), x  # (B, head)


class GRUTextEncoder(nn.Module):
    """Token embeddings and a GRU; the question vector is the state at the last real token (B, D).

    Exports to ONNX with a dynamic sequence axis (checked with the dynamo exporter at L = 3, 21, 32)."""

    def __init__(self, vocab_size: int, embed: int, dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, embed)
        self.gru = nn.GRU(embed, dim, batch_first=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.tok(input_ids))  # (B, L, D)
        last = (attention_mask.sum(1) - 1).clamp_min(0)  # (B,) index of the last real token
        return out[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # (B, D)


def conv_stem(channels: tuple[int, ...], depthwise: bool = False) -> nn.Sequential:
    """Stride-2 conv-BN-ReLU layers, one per entry of ``channels`` (3 layers: 64x64 -> 8x8). With ``depthwise``
    every layer after the first is depthwise-separable (the student's cheap variant)."""
    layers: list[nn.Module] = []
    cin = 3
    for i, cout in enumerate(channels):
        if depthwise and i > 0:
            layers += [nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                       nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        else:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out so only the feature axis is reshaped (export-safe)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hd = x.shape[-1] // self.heads
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, hd)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        att = (q @ k.transpose(-1, -2)) * hd**-0.5  # (B, H, L, L)
        keep = mask[:, None, None, :].to(torch.bool)
        att = att.masked_fill(~keep, -1e4).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).flatten(2)  # (B, L, D)
        return self.proj(y)


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer (attention + MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class ClassifierHead(nn.Module):
    """Reads the fused vector plus the image-text product (a cheap cross-modal term that also keeps the
    shared-space projections trained by the task loss alone) and returns logits."""

    def __init__(self, fused_dim: int, embed_dim: int, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(fused_dim + embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_labels))

    def forward(self, fused: torch.Tensor, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([fused, image_embed * text_embed], dim=-1))

"""Distillation losses in layers (as torchdistill): each term is an ``nn.Module`` taking the student's and
teacher's ``MultimodalOutput`` and the labels; ``WeightedLoss`` sums named terms by config weights and returns
every term so the progress bar and logs show them.

Terms:
    ce          hard-label cross-entropy (rows labelled -1 are unlabelled and skipped; mixup-aware)
    kd          KL(teacher || student) of the softened distributions at temperature T, times T^2 (Hinton)
    hard        hard-label distillation (DeiT): cross-entropy against the teacher's top-1 answer on every row,
                labelled or not; the teacher's decision as a label where no human label exists
    feature     learned linear projections of the student's image / text / fused vectors onto the teacher's,
                MSE or cosine distance, averaged over the three
    relational  the student's in-batch image-text similarity matrix matched to the teacher's (affinity
                mimicking, as in TinyCLIP / CLIP-KD): KL of row-wise (image->text) and column-wise
                (text->image) softmaxes at temperature tau
    spatial     hint learning (FitNets) on the question-conditioned feature maps: a learned 1x1 conv maps the
                student's (B, Cs, h, w) map onto the teacher's per-channel standardised (B, Ct, h, w) map, MSE.
                The pooled vectors above say *what* the teacher concluded; the map says *where* it looked,
                a dense signal that carries a small student off the text-only plateau (see the c8 config)
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from distill.models.common import MultimodalOutput
from distill.registry import Registry

LOSSES = Registry("loss")
FEATURES = ("image_embed", "text_embed", "fused")


class HardCE(nn.Module):
    """Cross-entropy on labelled rows. With mixup, ``labels_b`` and ``lam`` mix the two targets."""

    def forward(self, s: MultimodalOutput, t: Optional[MultimodalOutput], labels: torch.Tensor,
                labels_b: Optional[torch.Tensor] = None, lam: float = 1.0) -> torch.Tensor:
        logits = s.logits.float()
        loss = _ce(logits, labels) * lam
        if labels_b is not None and lam < 1.0:
            loss = loss + _ce(logits, labels_b) * (1.0 - lam)
        return loss


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP) connected on unlabelled batches
    return F.cross_entropy(logits[keep], labels[keep])


class SoftKD(nn.Module):
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.t = float(temperature)

    def forward(self, s: MultimodalOutput, t: MultimodalOutput, labels: torch.Tensor, **_: object) -> torch.Tensor:
        log_p_s = F.log_softmax(s.logits.float() / self.t, dim=-1)
        log_p_t = F.log_softmax(t.logits.float() / self.t, dim=-1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * self.t**2


class HardKD(nn.Module):
    """Cross-entropy of the student against the teacher's argmax (DeiT's hard distillation), on every row.

    Soft targets at T > 1 spread the gradient over answers the teacher rules out; the hard target gives an
    unlabelled row the full pull of a labelled one, which is what a few-label student trained mostly on
    teacher-labelled data needs to leave the text-only plateau."""

    def forward(self, s: MultimodalOutput, t: MultimodalOutput, labels: torch.Tensor, **_: object) -> torch.Tensor:
        return F.cross_entropy(s.logits.float(), t.logits.argmax(dim=-1))


class FeatureKD(nn.Module):
    """Project each student vector onto the teacher's space with a learned linear head and compare.

    ``kind="mse"`` compares raw vectors; ``"cosine"`` uses 1 - cosine similarity (scale-free)."""

    def __init__(self, student_dims: Mapping[str, int], teacher_dims: Mapping[str, int], kind: str = "cosine") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"feature loss kind must be 'mse' or 'cosine', not {kind!r}")
        self.kind = kind
        self.proj = nn.ModuleDict({k: nn.Linear(student_dims[k], teacher_dims[k]) for k in FEATURES})

    def forward(self, s: MultimodalOutput, t: MultimodalOutput, labels: torch.Tensor, **_: object) -> torch.Tensor:
        total = s.logits.new_zeros((), dtype=torch.float32)
        for k in FEATURES:
            ps = self.proj[k](getattr(s, k).float())  # (B, Dt)
            pt = getattr(t, k).float()
            if self.kind == "mse":
                total = total + F.mse_loss(ps, pt)
            else:
                total = total + (1.0 - F.cosine_similarity(ps, pt, dim=-1)).mean()
        return total / len(FEATURES)


class SpatialKD(nn.Module):
    """MSE between the projected student map and the teacher's map standardised per channel over the batch.

    Standardising makes the target's scale independent of how large the teacher's activations grew; maps of
    different sizes are average-pooled to the smaller one."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, s: MultimodalOutput, t: MultimodalOutput, labels: torch.Tensor, **_: object) -> torch.Tensor:
        if s.spatial is None or t.spatial is None:
            who = "student" if s.spatial is None else "teacher"
            raise ValueError(f"the spatial loss needs a feature map from the {who} (MultimodalOutput.spatial is "
                             "None); set loss.spatial = 0 for models without one")
        ps = self.proj(s.spatial.float())  # (B, Ct, hs, ws)
        pt = t.spatial.float().detach()  # (B, Ct, ht, wt)
        size = (min(ps.shape[2], pt.shape[2]), min(ps.shape[3], pt.shape[3]))
        ps, pt = F.adaptive_avg_pool2d(ps, size), F.adaptive_avg_pool2d(pt, size)
        mean = pt.mean(dim=(0, 2, 3), keepdim=True)
        std = pt.std(dim=(0, 2, 3), keepdim=True)
        return F.mse_loss(ps, (pt - mean) / (std + 1e-5))


def similarity(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """In-batch cosine similarity (B, B) between L2-normalised image and text embeddings."""
    return F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T


class RelationalKD(nn.Module):
    """Affinity mimicking: softmax(S_s/tau) rows and columns matched to the teacher's by KL."""

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = float(tau)

    def forward(self, s: MultimodalOutput, t: MultimodalOutput, labels: torch.Tensor, **_: object) -> torch.Tensor:
        ss = similarity(s.image_embed, s.text_embed) / self.tau  # (B, B)
        st = similarity(t.image_embed, t.text_embed) / self.tau
        rows = F.kl_div(F.log_softmax(ss, 1), F.log_softmax(st, 1), reduction="batchmean", log_target=True)
        cols = F.kl_div(F.log_softmax(ss.T, 1), F.log_softmax(st.T, 1), reduction="batchmean", log_target=True)
        return 0.5 * (rows + cols)


@LOSSES.register("ce")
def _make_ce(**_: object) -> nn.Module:
    return HardCE()


@LOSSES.register("kd")
def _make_kd(temperature: float = 4.0, **_: object) -> nn.Module:
    return SoftKD(temperature)


@LOSSES.register("hard")
def _make_hard(**_: object) -> nn.Module:
    return HardKD()


@LOSSES.register("feature")
def _make_feature(student_dims: Mapping[str, int], teacher_dims: Mapping[str, int], feature_kind: str = "cosine",
                  **_: object) -> nn.Module:
    return FeatureKD(student_dims, teacher_dims, feature_kind)


@LOSSES.register("spatial")
def _make_spatial(student_dims: Mapping[str, int], teacher_dims: Mapping[str, int], **_: object) -> nn.Module:
    for who, dims in (("student", student_dims), ("teacher", teacher_dims)):
        if "spatial" not in dims:
            raise ValueError(f"the spatial loss needs a feature map from the {who}, whose output has none; "
                             "set loss.spatial = 0")
    return SpatialKD(student_dims["spatial"], teacher_dims["spatial"])


@LOSSES.register("relational")
def _make_relational(tau: float = 0.1, **_: object) -> nn.Module:
    return RelationalKD(tau)


NEEDS_TEACHER = {"kd", "hard", "feature", "relational", "spatial"}


class WeightedLoss(nn.Module):
    """sum_k w_k * term_k. Returns (total, {name: value}) with detached per-term values plus ``total``."""

    def __init__(self, weights: Mapping[str, float], **term_kwargs: object) -> None:
        super().__init__()
        self.weights = {k: float(w) for k, w in weights.items() if float(w) > 0}
        if not self.weights:
            raise ValueError("at least one loss weight must be > 0")
        self.terms = nn.ModuleDict({k: LOSSES.create(k, **term_kwargs) for k in self.weights})

    @property
    def needs_teacher(self) -> bool:
        return any(k in NEEDS_TEACHER for k in self.weights)

    def forward(self, s: MultimodalOutput, t: Optional[MultimodalOutput], labels: torch.Tensor,
                labels_b: Optional[torch.Tensor] = None, lam: float = 1.0) -> Tuple[torch.Tensor, Dict[str, float]]:
        total = s.logits.new_zeros((), dtype=torch.float32)
        parts: Dict[str, float] = {}
        for name, term in self.terms.items():
            value = term(s, t, labels, labels_b=labels_b, lam=lam)
            total = total + self.weights[name] * value
            parts[name] = float(value.detach())
        parts["total"] = float(total.detach())
        return total, parts


def output_dims(out: MultimodalOutput) -> Dict[str, int]:
    """Feature sizes of a model's output, for building the ``FeatureKD`` and ``SpatialKD`` projections."""
    dims = {k: int(getattr(out, k).shape[-1]) for k in FEATURES}
    if getattr(out, "spatial", None) is not None:
        dims["spatial"] = int(out.spatial.shape[1])  # channels of (B, C, h, w)
    return dims

"""Model families. ``create_model(name, **kw)`` builds any registered variant; importing this package
registers every family.

Common interface: ``model(pixel_values (B,3,H,W) float32, input_ids (B,L) int64, attention_mask (B,L) int64)
-> MultimodalOutput(logits, image_embed, text_embed, fused)``; constructor kwargs ``num_labels``,
``vocab_size``, ``max_text_length``.
"""
from __future__ import annotations

from typing import Any, List

from torch import nn

from distill.models import clip_teacher, film_teacher, student  # noqa: F401  (registers the variants)
from distill.models.common import MultimodalOutput
from distill.models.registry import MODELS

__all__ = ["MODELS", "MultimodalOutput", "create_model", "list_models"]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; unknown names raise ``UnknownNameError`` listing known ones."""
    return MODELS.create(name, **kwargs)


def list_models() -> List[str]:
    return MODELS.names()

"""The default teacher: a question encoder and a convolutional image tower joined by FiLM over the image's
spatial features.

Why this shape: on two CPU cores a ViT+BERT trained from scratch stays at the text-only plateau for minutes,
while a FiLM CNN breaks through after ~1,000-1,500 steps (measured on the prototype of this task).

Why the default question encoder is a pre-norm transformer and not ``transformers.BertModel``: measured here on
the default task (lr 3e-3, batch 128), the BERT-encoder teacher was still at 36% validation accuracy after 500
steps and 51% after 2,000, while the same FiLM tower with a pre-norm encoder broke through before step 750.
Post-norm BERT trained from scratch with its 0.02-std initialisation gives FiLM a near-constant question signal
for the first thousand steps. The BERT variant stays registered (``teacher_film_bert``) for comparison.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple

import torch
from torch import nn

from distill.models.common import ClassifierHead, FiLMFusion, MultimodalOutput, TransformerLayer, masked_mean
from distill.models.registry import MODELS


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FiLMTeacher(nn.Module):
    """Image (B,3,H,W) + question (B,L) -> MultimodalOutput."""

    def __init__(self, *, num_labels: int, vocab_size: int, max_text_length: int = 32, stem: int = 32,
                 channels: int = 64, film_blocks: int = 4, text_dim: int = 256, text_layers: int = 2,
                 heads: int = 4, head_dim: int = 128, hidden: int = 256, text_encoder: str = "prenorm") -> None:
        super().__init__()
        self.image = nn.Sequential(_conv_bn(3, stem, 2), _conv_bn(stem, channels, 2))  # (B, C, H/4, W/4)
        if text_encoder == "bert":
            self.text = _bert(vocab_size, text_dim, text_layers, heads, max_text_length)
        elif text_encoder == "prenorm":
            self.text = PreNormTextEncoder(vocab_size, text_dim, text_layers, heads, max_text_length)
        else:
            raise ValueError(f"text_encoder must be 'prenorm' or 'bert', got {text_encoder!r}")
        self.image_proj = nn.Linear(channels, text_dim)
        self.fusion = FiLMFusion(text_dim, channels, film_blocks, head_dim)
        self.classifier = ClassifierHead(head_dim, text_dim, hidden, num_labels)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> MultimodalOutput:
        feats = self.image(pixel_values)  # (B, C, H/4, W/4)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        text = masked_mean(hidden, attention_mask)  # (B, D)
        image = self.image_proj(feats.mean(dim=(2, 3)))  # (B, D)
        fused = self.fusion(feats, text)  # (B, head)
        return MultimodalOutput(self.classifier(fused, image, text), image, text, fused)


class PreNormTextEncoder(nn.Module):
    """Token + position embeddings and pre-norm transformer layers; returns (B, L, D) like BertModel."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(TransformerLayer(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Hidden:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)[None]  # (B, L, D)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return _Hidden(self.ln(x))


class _Hidden(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, D), the field name BertModel uses


def _bert(vocab_size: int, dim: int, layers: int, heads: int, max_len: int) -> nn.Module:
    from transformers import BertConfig, BertModel  # heavy import, only where needed

    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * dim, max_position_embeddings=max(max_len, 8), type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    return BertModel(cfg, add_pooling_layer=False)


def _create_teacher(cfg: Dict[str, Any], **kwargs: Any) -> FiLMTeacher:
    return FiLMTeacher(**{**cfg, **kwargs})


_CFGS: Dict[str, Dict[str, Any]] = {
    "teacher_film_tiny": dict(stem=8, channels=16, film_blocks=1, text_dim=32, text_layers=1, heads=2,
                              head_dim=16, hidden=32),
    "teacher_film_base": dict(stem=32, channels=64, film_blocks=4, text_dim=256, text_layers=2, heads=4,
                              head_dim=128, hidden=256),
    "teacher_film_bert": dict(stem=32, channels=64, film_blocks=4, text_dim=256, text_layers=2, heads=4,
                              head_dim=128, hidden=256, text_encoder="bert"),
}


@MODELS.register()
def teacher_film_tiny(**kwargs: Any) -> FiLMTeacher:
    """For tests."""
    return _create_teacher(_CFGS["teacher_film_tiny"], **kwargs)


@MODELS.register()
def teacher_film_base(**kwargs: Any) -> FiLMTeacher:
    """The default teacher."""
    return _create_teacher(_CFGS["teacher_film_base"], **kwargs)


@MODELS.register()
def teacher_film_bert(**kwargs: Any) -> FiLMTeacher:
    """The base teacher with a ``transformers.BertModel`` question encoder (learns far slower here; see above)."""
    return _create_teacher(_CFGS["teacher_film_bert"], **kwargs)

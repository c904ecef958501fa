"""Shared fixtures for the export tests: a tiny multimodal model, tokenizer and raw samples.

The model uses `nn.MultiheadAttention` on purpose: it is the layer whose sequence length the legacy
TorchScript exporter bakes into Reshape nodes, so the same model also yields a realistically broken graph.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from export.bundle import PreprocessSpec
from export.parity import Sample

WORDS = ("what colour is the red green blue square circle triangle left of right above below how many "
         "shapes are there big small any a an object near far").split()
LABELS = ("red", "green", "blue", "yes", "no")
SPEC = PreprocessSpec(image_size=32, max_text_length=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class TinyVQA(nn.Module):
    """conv image tower + embedding/attention text tower -> logits, plus embeddings as extra outputs."""

    def __init__(self, vocab_size: int, num_labels: int = len(LABELS), dim: int = 32) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, dim, 3, 2, 1), nn.ReLU())
        self.tok = nn.Embedding(vocab_size, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, num_labels))

    def forward(self, pixel_values, input_ids, attention_mask):
        img = self.image(pixel_values).mean((2, 3))  # (B, D)
        t = self.tok(input_ids)  # (B, L, D)
        a, _ = self.attn(t, t, t, key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(a.dtype)
        txt = (a * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        return {"logits": self.head(torch.cat([img, txt], -1)) * 3.0, "text_embed": txt}


def write_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer over WORDS with [PAD]/[UNK]/[CLS], saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    tok.save(str(path))
    return path


def vocab_size() -> int:
    return len(WORDS) + 3


def png_bytes(rng: np.random.Generator, size: int) -> bytes:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_samples(n: int = 256, seed: int = 0) -> list[Sample]:
    """Random images of a few sizes and questions of 1..30 words (some truncated at max_text_length)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 31)))
        out.append(Sample(image=png_bytes(rng, int(rng.choice([24, 32, 40]))), text=" ".join(words),
                          label=int(rng.integers(0, len(LABELS)))))
    return out


def tiny_model(seed: int = 0) -> TinyVQA:
    torch.manual_seed(seed)
    return TinyVQA(vocab_size()).eval()

"""A user's CLIP checkpoint as a teacher: the ``CLIPModel`` towers from a local folder, plus a new FiLM fusion
head over the vision tower's patch grid, conditioned on the text embedding, fine-tuned on the task.

``clip_path`` (a local folder, loaded with ``from_pretrained``) is used when it exists; otherwise the model is
rebuilt from ``clip_config`` (stored in the run's model.json) and its fine-tuned weights are loaded after.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from distill.models.common import ClassifierHead, FiLMFusion, MultimodalOutput
from distill.models.registry import MODELS


class CLIPTeacher(nn.Module):
    def __init__(self, *, num_labels: int, vocab_size: int = 0, max_text_length: int = 32, clip_path: str = "",
                 clip_config: Optional[Dict[str, Any]] = None, channels: int = 64, film_blocks: int = 2,
                 head_dim: int = 128, hidden: int = 256) -> None:
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        if clip_path and Path(clip_path, "config.json").is_file():
            self.clip = CLIPModel.from_pretrained(clip_path, attn_implementation="eager")
        elif clip_config:
            self.clip = CLIPModel(CLIPConfig.from_dict(clip_config))
        else:
            raise ValueError("clip_teacher needs clip_path (a local CLIPModel folder) or clip_config")
        vc = self.clip.config.vision_config
        self.image_size, self.patch = int(vc.image_size), int(vc.patch_size)
        embed = int(self.clip.config.projection_dim)
        self.grid = nn.Conv2d(int(vc.hidden_size), channels, 1)
        self.fusion = FiLMFusion(embed, channels, film_blocks, head_dim)
        self.classifier = ClassifierHead(head_dim, embed, hidden, num_labels)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> MultimodalOutput:
        if pixel_values.shape[-1] != self.image_size:
            pixel_values = F.interpolate(pixel_values, size=(self.image_size, self.image_size), mode="bilinear",
                                         align_corners=False)
        v = self.clip.vision_model(pixel_values=pixel_values)
        g = self.image_size // self.patch
        patches = v.last_hidden_state[:, 1:, :]  # (B, g*g, Dv) without the class token
        feats = self.grid(patches.transpose(1, 2).unflatten(2, (g, g)))  # (B, C, g, g)
        image = self.clip.visual_projection(v.pooler_output)  # (B, E)
        t = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text = self.clip.text_projection(t.pooler_output)  # (B, E)
        fused, spatial = self.fusion(feats, text)
        return MultimodalOutput(self.classifier(fused, image, text), image, text, fused, spatial)


def clip_teacher_kwargs(path: Path) -> Dict[str, Any]:
    """model.json kwargs for a CLIP folder: the path (for pretrained weights) and the config (to rebuild)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("model_type") != "clip":
        from distill.errors import TeacherLoadError

        raise TeacherLoadError(f"{path}/config.json has model_type {cfg.get('model_type')!r}; supported teacher "
                               "folders: CLIPModel ('clip') and mmkd teacher folders (model.json)")
    return {"clip_path": str(Path(path).resolve()), "clip_config": cfg}


@MODELS.register()
def clip_teacher(**kwargs: Any) -> CLIPTeacher:
    return CLIPTeacher(**kwargs)

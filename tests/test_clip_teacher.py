"""A user's teacher from a local Hugging Face CLIPModel folder (a tiny random CLIPConfig saved to a temp folder):
its towers get a new fusion head, fine-tuned on the task with its own tokenizer, then distilled."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.runs import load_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tiny_clip_folder(path: Path, data: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from distill.data.tokenizer import SEP_ID, build_tokenizer, save_tokenizer

    texts = [json.loads(l)["text"] for l in (data / "train" / "metadata.jsonl").read_text().splitlines() if l]
    tok = build_tokenizer(texts, vocab_size=160)  # a different tokenizer from the dataset's (512 entries)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=SEP_ID),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    save_tokenizer(tok, path / "tokenizer.json")
    return path


def test_clip_folder_teacher_is_fine_tuned_and_distilled(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["data", "--out", str(data), "--samples", "120"]) == 0
    clip = _tiny_clip_folder(tmp_path / "clip", data)
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(out), "--data", str(data), "--teacher", str(clip),
                 "--no-progress"]) == 0
    card = json.loads((out / "teacher" / "model.json").read_text())
    assert card["model_name"] == "clip_teacher"
    assert (out / "teacher" / "tokenizer.json").read_bytes() == (clip / "tokenizer.json").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["student"]["fidelity"]["top1_agreement"] <= 1.0
    assert metrics["teacher"]["params"] > metrics["student"]["params"]

    assert main(["eval", "--run", str(out), "--data", str(data)]) == 0  # eval reads the teacher's own tokens
    shutil.rmtree(clip)  # the run folder alone rebuilds the fine-tuned teacher
    teacher, info = load_model(out, "teacher")
    x = torch.zeros(2, 3, 64, 64)
    ids = torch.full((2, 6), 7, dtype=torch.long)
    assert teacher(x, ids, torch.ones_like(ids)).logits.shape == (2, len(info["labels"]))


def test_folder_that_is_not_a_teacher_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["data", "--out", str(data), "--samples", "40"]) == 0
    (tmp_path / "empty").mkdir()
    code = main(["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--data", str(data),
                 "--teacher", str(tmp_path / "empty"), "--no-progress"])
    assert code != 0

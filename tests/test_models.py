"""Every registered model: shapes, finite outputs, dynamic batch/sequence, mask respected, save/load round trip."""
from __future__ import annotations

import pytest
import torch

from distill.config import load_config
from distill.errors import UnknownNameError
from distill.metrics import count_flops, count_params
from distill.models import MultimodalOutput, create_model, list_models
from distill.runs import load_model, save_tensors, write_model_card

V, C = 50, 7
SMALL = [n for n in list_models() if "tiny" in n or n in ("student_small", "student_c8", "teacher_film_c8")]


def _inputs(b: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 64, 64, generator=g)
    ids = torch.randint(1, V, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # one padded row
    return x, ids, mask


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("b,length", [(1, 5), (3, 11)])
def test_forward_shapes_and_finite(name: str, b: int, length: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_labels=C, vocab_size=V).eval()
    out = model(*_inputs(b, length))
    assert isinstance(out, MultimodalOutput)
    assert out.logits.shape == (b, C)
    assert out.image_embed.shape == out.text_embed.shape and out.image_embed.shape[0] == b
    assert out.fused.shape[0] == b
    for t in out:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", ["student_tiny", "teacher_film_tiny", "student_c8", "teacher_film_c8"])
def test_padding_does_not_change_prediction(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_labels=C, vocab_size=V).eval()
    x, ids, mask = _inputs(2, 6)
    mask[:] = 1
    padded_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    a = model(x, ids, mask).logits
    b = model(x, padded_ids, padded_mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="student_tiny"):
        create_model("student_huge", num_labels=C, vocab_size=V)


@pytest.mark.parametrize("teacher_name, student_name", [
    ("teacher_film_base", "student_small"),
    (load_config("shapes_c8").teacher.model, load_config("shapes_c8").student.model),
    (load_config("shapes").teacher.model, load_config("shapes").student.model),  # the default pair
])
def test_teacher_is_much_larger_than_its_student(teacher_name: str, student_name: str) -> None:
    student = create_model(student_name, num_labels=24, vocab_size=200)
    teacher = create_model(teacher_name, num_labels=24, vocab_size=200)
    assert count_params(teacher) >= 20 * count_params(student)
    assert count_flops(teacher, vocab_size=200) >= 10 * count_flops(student, vocab_size=200)


def test_load_model_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("student_tiny", num_labels=C, vocab_size=V).eval()
    (tmp_path / "tok.json").write_text("{}")
    write_model_card(tmp_path / "student", model_name="student_tiny", model_kwargs={"num_labels": C, "vocab_size": V},
                     labels=[str(i) for i in range(C)], preprocess={"image_size": 64}, tokenizer_src=tmp_path / "tok.json")
    save_tensors(tmp_path / "student" / "best.safetensors", model.state_dict())
    loaded, info = load_model(tmp_path, "student")
    assert not loaded.training
    assert info["labels"] == [str(i) for i in range(C)] and info["model_name"] == "student_tiny"
    assert info["tokenizer"].endswith("tokenizer.json")
    inputs = _inputs(2, 5)
    torch.testing.assert_close(loaded(*inputs).logits, model(*inputs).logits)

"""Each loss term against values computed by hand; the weighted sum; gradients reach every student parameter."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import FeatureKD, HardCE, HardKD, RelationalKD, SoftKD, SpatialKD, WeightedLoss, output_dims
from distill.models import MultimodalOutput, create_model

TOL = dict(atol=1e-5, rtol=1e-5)


def _out(logits, image=None, text=None, fused=None) -> MultimodalOutput:
    logits = torch.tensor(logits, dtype=torch.float32)
    z = torch.zeros(logits.shape[0], 2)
    f = lambda v: z if v is None else torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return MultimodalOutput(logits, f(image), f(text), f(fused))


def test_hard_ce_matches_hand_value_and_skips_unlabelled() -> None:
    s = _out([[2.0, 0.0, 0.0], [5.0, 1.0, 0.0]])
    got = HardCE()(s, None, torch.tensor([0, -1]))
    expected = math.log(1 + 2 * math.exp(-2.0))  # -log softmax([2,0,0])[0]; row 2 is unlabelled
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_hard_ce_all_unlabelled_is_zero_with_a_graph() -> None:
    logits = torch.tensor([[1.0, 2.0]], requires_grad=True)
    got = HardCE()(MultimodalOutput(logits, logits, logits, logits), None, torch.tensor([-1]))
    assert got.item() == 0.0
    got.backward()  # does not raise


def test_hard_ce_mixup_mixes_the_two_targets() -> None:
    s = _out([[1.0, 0.0]])
    got = HardCE()(s, None, torch.tensor([0]), labels_b=torch.tensor([1]), lam=0.25)
    l0, l1 = math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))
    assert got.item() == pytest.approx(0.25 * l0 + 0.75 * l1, abs=1e-6)


def test_hard_kd_is_ce_against_the_teachers_top1_on_every_row() -> None:
    s = _out([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    t = _out([[0.1, 3.0, 0.2], [0.0, 2.0, 5.0]])  # teacher answers 1 and 2
    got = HardKD()(s, t, torch.tensor([0, -1]))  # human labels (and their absence) do not matter
    row1 = math.log(math.exp(2.0) + 2)  # -log softmax([2,0,0])[1]
    row2 = math.log(2 + math.exp(1.0))  # -log softmax([0,1,0])[2]
    assert got.item() == pytest.approx((row1 + row2) / 2, abs=1e-6)


def test_soft_kd_is_t_squared_kl_teacher_to_student() -> None:
    s, t = _out([[0.0, 0.0]]), _out([[2.0, 0.0]])
    T = 2.0
    pt = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([1, 0])
    kl = sum(p * math.log(p / 0.5) for p in pt)
    assert SoftKD(T)(s, t, torch.tensor([0])).item() == pytest.approx(T * T * kl, abs=1e-6)
    assert SoftKD(T)(t, t, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_kd_with_identity_projection(kind: str) -> None:
    dims = {"image_embed": 2, "text_embed": 2, "fused": 2}
    loss = FeatureKD(dims, dims, kind)
    for lin in loss.proj.values():
        torch.nn.init.eye_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    s = _out([[0.0]], image=[[1.0, 0.0]], text=[[1.0, 1.0]], fused=[[3.0, 4.0]])
    t = _out([[0.0]], image=[[0.0, 1.0]], text=[[2.0, 2.0]], fused=[[3.0, 4.0]])
    got = loss(s, t, torch.tensor([0])).item()
    if kind == "mse":  # image: (1+1)/2 = 1; text: (1+1)/2 = 1; fused: 0  -> mean 2/3
        expected = 2.0 / 3.0
    else:  # image orthogonal: 1; text parallel: 0; fused equal: 0 -> mean 1/3
        expected = 1.0 / 3.0
    assert got == pytest.approx(expected, abs=1e-6)


def test_relational_kd_hand_value() -> None:
    # student: image and text both [[1,0],[0,1]] -> S_s = I; teacher: texts swapped -> S_t = [[0,1],[1,0]].
    tau = 1.0
    s = _out([[0.0], [0.0]], image=[[1.0, 0.0], [0.0, 1.0]], text=[[1.0, 0.0], [0.0, 1.0]])
    t = _out([[0.0], [0.0]], image=[[1.0, 0.0], [0.0, 1.0]], text=[[0.0, 1.0], [1.0, 0.0]])
    ps = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([1,0]) = student row 0
    pt = [ps[1], ps[0]]  # teacher row 0 = softmax([0,1])
    kl_row = sum(a * math.log(a / b) for a, b in zip(pt, ps))  # every row and column has this KL
    assert RelationalKD(tau)(s, t, torch.tensor([0, 0])).item() == pytest.approx(kl_row, abs=1e-6)
    assert RelationalKD(tau)(s, s, torch.tensor([0, 0])).item() == pytest.approx(0.0, abs=1e-7)


def test_spatial_kd_hand_value_against_the_standardised_teacher_map() -> None:
    # teacher map (B=2, C=1, 1x2): values [0, 2] and [2, 4] -> mean 2, std (unbiased) sqrt(8/3)
    t_map = torch.tensor([[[[0.0, 2.0]]], [[[2.0, 4.0]]]])
    s_map = torch.zeros(2, 1, 1, 2)
    loss = SpatialKD(1, 1)
    torch.nn.init.ones_(loss.proj.weight)
    torch.nn.init.zeros_(loss.proj.bias)
    s = _out([[0.0], [0.0]])._replace(spatial=s_map)
    t = _out([[0.0], [0.0]])._replace(spatial=t_map)
    std = math.sqrt(8.0 / 3.0)
    expected = sum(((v - 2.0) / std) ** 2 for v in (0.0, 2.0, 2.0, 4.0)) / 4
    assert loss(s, t, torch.tensor([0, 0])).item() == pytest.approx(expected, rel=1e-4)


def test_spatial_kd_pools_the_larger_map_and_names_a_missing_one() -> None:
    loss = SpatialKD(3, 5)
    s = _out([[0.0]])._replace(spatial=torch.randn(1, 3, 16, 16))
    t = _out([[0.0]])._replace(spatial=torch.randn(1, 5, 8, 8))
    assert torch.isfinite(loss(s, t, torch.tensor([0])))
    with pytest.raises(ValueError, match="feature map from the teacher"):
        loss(s, _out([[0.0]]), torch.tensor([0]))


def test_weighted_loss_sums_named_terms_by_weight() -> None:
    s, t = _out([[0.0, 0.0]]), _out([[2.0, 0.0]])
    labels = torch.tensor([0])
    loss = WeightedLoss({"ce": 0.5, "kd": 2.0, "relational": 0.0}, temperature=2.0)
    total, parts = loss(s, t, labels)
    assert set(parts) == {"ce", "kd", "total"}  # zero-weight terms are not built
    assert parts["ce"] == pytest.approx(math.log(2), abs=1e-6)
    assert total.item() == pytest.approx(0.5 * parts["ce"] + 2.0 * parts["kd"], abs=1e-6)
    assert parts["total"] == pytest.approx(total.item(), abs=1e-6)


def test_gradients_reach_every_student_parameter() -> None:
    torch.manual_seed(0)
    student = create_model("student_tiny", num_labels=5, vocab_size=30).train()
    teacher = create_model("teacher_film_tiny", num_labels=5, vocab_size=30).eval()
    x, ids = torch.randn(4, 3, 64, 64), torch.randint(1, 30, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    with torch.no_grad():
        t = teacher(x, ids, mask)
    s = student(x, ids, mask)
    loss = WeightedLoss({"ce": 1.0, "kd": 1.0, "hard": 1.0, "feature": 1.0, "relational": 1.0, "spatial": 1.0},
                        student_dims=output_dims(s), teacher_dims=output_dims(t))
    total, parts = loss(s, t, torch.tensor([0, 1, 2, -1]))
    total.backward()
    for name, p in list(student.named_parameters()) + list(loss.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(math.isfinite(v) for v in parts.values())
    assert all(p.grad is None for p in teacher.parameters())

"""Evaluation numbers: accuracy, macro-F1, per-class recall, one-vs-rest ROC-AUC, fidelity to a teacher,
and cost (parameters, FLOPs). Plain numpy so the same code scores torch and ONNX Runtime outputs."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties share their average rank)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over tied runs
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           label_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Accuracy, macro-F1 (over classes present in labels or predictions), per-class recall and macro
    one-vs-rest ROC-AUC (over classes with both positives and negatives) for ``logits`` (N, C)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    num = logits.shape[1]
    names = list(label_names) if label_names is not None else [str(i) for i in range(num)]
    pred = logits.argmax(axis=1)
    probs = softmax(logits)
    recall: Dict[str, float] = {}
    f1s: List[float] = []
    aucs: List[float] = []
    for c in range(num):
        tp = int(((pred == c) & (labels == c)).sum())
        support, predicted = int((labels == c).sum()), int((pred == c).sum())
        if support:
            recall[names[c]] = tp / support
        if support or predicted:
            f1s.append(2 * tp / (support + predicted))
        positive = labels == c
        if 0 < positive.sum() < len(labels):
            aucs.append(_auc(probs[:, c], positive))
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "roc_auc_ovr": float(np.mean(aucs)) if aucs else float("nan"),
        "per_class_recall": recall,
        "n": int(len(labels)),
    }


def fidelity(student_logits: np.ndarray, teacher_logits: np.ndarray) -> Dict[str, float]:
    """How closely the student copies the teacher: top-1 agreement and mean KL(teacher || student)."""
    p_t = softmax(np.asarray(teacher_logits, dtype=np.float64))
    p_s = softmax(np.asarray(student_logits, dtype=np.float64))
    kl = (p_t * (np.log(p_t + 1e-12) - np.log(p_s + 1e-12))).sum(axis=1)
    agree = (p_t.argmax(1) == p_s.argmax(1)).mean()
    return {"top1_agreement": float(agree), "mean_kl": float(kl.mean())}


def per_group_accuracy(logits: np.ndarray, labels: np.ndarray, groups: Sequence[str]) -> Dict[str, float]:
    """Accuracy per question type (or any grouping)."""
    pred = np.asarray(logits).argmax(axis=1)
    out: Dict[str, float] = {}
    groups = np.asarray(list(groups), dtype=object)
    for g in sorted(set(groups.tolist())):
        m = groups == g
        out[str(g)] = float((pred[m] == np.asarray(labels)[m]).mean())
    return out


def count_params(model) -> int:  # noqa: ANN001 - torch.nn.Module, imported lazily
    return int(sum(p.numel() for p in model.parameters()))


def count_flops(model, image_size: int = 64, text_length: int = 16, vocab_size: int = 2) -> int:  # noqa: ANN001
    """Forward FLOPs for one sample (one image, a ``text_length``-token question), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; 2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    ids = torch.randint(0, max(vocab_size, 1), (1, text_length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, text_length, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, ids, mask)
    model.train(was_training)
    return int(counter.get_total_flops())

"""Parity and calibration samples from a run's dataset: raw image bytes + text + label index.

Raw bytes on purpose: the gate must exercise the same decode -> resize -> normalise path the server runs,
not tensors cached by the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.parity import Sample


def find_data_root(run_dir: str | os.PathLike[str], info: Mapping[str, Any],
                   data_root: str | os.PathLike[str] | None = None) -> Path:
    """The dataset folder a run was trained on: explicit > RUN/data (generated) > the folder recorded in the
    run's config.json (`mmkd-distill train --data DIR`; runs of older versions did not record it: pass --data).
    """
    if data_root is not None:
        return Path(data_root)
    generated = Path(run_dir) / "data"
    if generated.is_dir():
        return generated
    data = (info.get("config") or {}).get("data")
    candidates = [info.get("data_dir"), info.get("data_root")]
    if isinstance(data, str):
        candidates.append(data)
    elif isinstance(data, Mapping):
        candidates += [data.get(k) for k in ("root", "dir", "path", "folder")]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise ExportError(f"cannot find the dataset of run {run_dir}: no {generated} and no data folder in its "
                      f"config; pass data_root= (CLI: --data DIR)")


def _label_index(label: Any, labels: Sequence[str]) -> int | None:
    if label is None:
        return None
    if isinstance(label, int):
        return label
    try:
        return list(labels).index(str(label))
    except ValueError:
        raise ExportError(f"label {label!r} of a test sample is not among the model's labels") from None


def load_run_samples(run_dir: str | os.PathLike[str], info: Mapping[str, Any], split: str, n: int,
                     labels: Sequence[str], data_root: str | os.PathLike[str] | None = None) -> list[Sample]:
    """The first `n` examples of `split` (deterministic), as raw bytes and text."""
    from distill.data.folder import read_split

    root = find_data_root(run_dir, info, data_root)
    examples = read_split(root, split, labels=list(labels), require_labels=split != "transfer")[:n]
    return [Sample(image=Path(e.path).read_bytes(), text=e.text, label=_label_index(e.label, labels))
            for e in examples]

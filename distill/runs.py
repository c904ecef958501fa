"""The run folder: where trained models live and how others (export, eval) load them.

Layout::

    RUN/config.json            resolved config + its hash
    RUN/metrics.json           evaluation results (teacher, student, baselines)
    RUN/data/                  the generated dataset (when no --data was given)
    RUN/<which>/model.json     model_name, model_kwargs, labels, preprocess, tokenizer file, config hash
    RUN/<which>/tokenizer.json the tokenizer the model was trained with
    RUN/<which>/best.safetensors, last.safetensors   weights (best on validation / latest)
    RUN/<which>/resume.safetensors  everything a --resume needs, one atomic file (+ last.state.json copy)

``which`` is ``teacher`` or ``student``; a ``RUN/teacher`` folder is also what ``--teacher DIR`` accepts.
Every file is written atomically (temp file + ``os.replace``), so a kill -9 leaves the previous version.
Every checkpoint records its own sha256 in its safetensors header (``mmkd.sha256``) and is verified on load, so a
bit flipped at rest is refused instead of silently loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from distill.errors import CheckpointError

MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKSUM_KEY = "mmkd.sha256"  # safetensors metadata key holding the file's own sha256
_UNSET = "0" * 64  # the digest field's content while the digest is computed (on write and on verify)
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def checkpoint_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """safetensors bytes whose header records the sha256 of the whole file (taken with that field zeroed).

    The record lives inside the one file that is written atomically, not in a second file: a kill -9 between two
    writes could otherwise leave good weights beside a stale record, and ``--resume`` would refuse them."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = bytearray(save(flat, metadata={**(metadata or {}), CHECKSUM_KEY: _UNSET}))
    at = _digest_offset(blob)
    blob[at:at + 64] = hashlib.sha256(blob).hexdigest().encode()
    return bytes(blob)


def _digest_offset(head: bytes | bytearray) -> int:
    """Where the recorded digest starts in ``head`` (the 8-byte length + JSON header), -1 if absent.
    In the JSON the marker can only be the metadata entry: inside any other string its quotes are escaped."""
    marker = f'"{CHECKSUM_KEY}":"'.encode()
    at = head.find(marker)
    return -1 if at < 0 else at + len(marker)


def _corrupt(path: Path, why: object) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({why}); "
                           "resume from another checkpoint or retrain")


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose bytes differ from the sha256 recorded in its header.

    A file without a record (written before mmkd recorded them) loads with a warning, so old runs stay usable."""
    with open(path, "rb") as f:
        size = f.read(8)
        n = int.from_bytes(size, "little") if len(size) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise _corrupt(path, "no safetensors header")
        head = size + f.read(n)
        try:
            recorded = (json.loads(head[8:]).get("__metadata__") or {}).get(CHECKSUM_KEY)
        except (ValueError, AttributeError) as exc:  # bad JSON, bad UTF-8, or not an object
            raise _corrupt(path, f"unreadable header: {exc}") from None
        if recorded is None:
            warnings.warn(f"checkpoint {path} has no recorded sha256 (written by an older mmkd): loaded unverified",
                          stacklevel=3)
            return
        at = _digest_offset(head)
        if at < 0:
            raise _corrupt(path, f"{CHECKSUM_KEY} is not where mmkd writes it")
        digest = hashlib.sha256(head[:at] + _UNSET.encode() + head[at + 64:])
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != recorded:
        raise CheckpointError(
            f"checkpoint {path} does not match the sha256 recorded in it (recorded {str(recorded)[:16]}..., "
            f"file {digest.hexdigest()[:16]}...): it was damaged or changed after it was written; load another "
            "checkpoint of the run (best / last / resume.safetensors), restore it from a copy, or retrain")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Atomic safetensors write with its sha256 recorded inside (contiguous CPU copies, so shared or strided
    tensors are fine)."""
    return atomic_write_bytes(path, checkpoint_bytes(tensors))


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Load a checkpoint after checking its recorded sha256; any damage is a CheckpointError naming the file."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError without naming the file
        raise _corrupt(path, exc) from exc


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def write_model_card(model_dir: Path, *, model_name: str, model_kwargs: Mapping[str, Any], labels: list,
                     preprocess: Mapping[str, Any], tokenizer_src: Optional[Path], config_hash: str = "",
                     extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model.json`` (and copy the tokenizer) so the folder can be rebuilt without the trainer."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_src is not None and Path(tokenizer_src).resolve() != (model_dir / TOKENIZER_FILE).resolve():
        atomic_write_bytes(model_dir / TOKENIZER_FILE, Path(tokenizer_src).read_bytes())
    card = {"model_name": model_name, "model_kwargs": dict(model_kwargs), "labels": list(labels),
            "preprocess": dict(preprocess), "tokenizer": TOKENIZER_FILE, "config_hash": config_hash,
            **(extra or {})}
    return atomic_write_json(model_dir / MODEL_FILE, card)


def build_from_card(model_dir: Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the (untrained) module described by ``model_dir/model.json``."""
    from distill.models import create_model

    card = read_json(Path(model_dir) / MODEL_FILE)
    return create_model(card["model_name"], **card["model_kwargs"]), card


def load_weights(model: nn.Module, path: Path) -> None:
    state = load_tensors(path)
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_model_dir(model_dir: Path, tag: str = "best") -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a model folder (``RUN/teacher``, ``RUN/student``) in eval mode with its card."""
    model_dir = Path(model_dir)
    model, card = build_from_card(model_dir)
    weights = model_dir / f"{tag}.safetensors"
    if not weights.is_file():
        weights = model_dir / "last.safetensors"
    load_weights(model, weights)
    model.eval()
    return model, card


def load_model(run_dir: str | os.PathLike, which: str = "student") -> Tuple[nn.Module, Dict[str, Any]]:
    """Load ``RUN/<which>`` (its best checkpoint) in eval mode.

    Returns ``(model, info)`` where info has ``labels``, ``preprocess`` (a ``PreprocessSpec`` dict),
    ``tokenizer`` (path to tokenizer.json), ``model_name``, ``model_kwargs``, ``config`` (the run's resolved
    config, {} if absent), ``data_dir`` (the dataset folder it trained on, None if unrecorded) and ``metrics``
    (this model's section of RUN/metrics.json, {} if absent)."""
    if which not in ("student", "teacher"):
        raise CheckpointError(f"which must be 'student' or 'teacher', not {which!r}")
    run_dir = Path(run_dir)
    model_dir = run_dir / which
    if not (model_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{model_dir / MODEL_FILE} not found: is {run_dir} a run folder written by "
                              f"`mmkd-distill train` with a trained {which}?")
    model, card = load_model_dir(model_dir)
    written = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    config = written.get("config", {})
    metrics = read_json(run_dir / "metrics.json").get(which, {}) if (run_dir / "metrics.json").is_file() else {}
    info = {
        "labels": card["labels"], "preprocess": card["preprocess"],
        "tokenizer": str(model_dir / card.get("tokenizer", TOKENIZER_FILE)),
        "model_name": card["model_name"], "model_kwargs": card["model_kwargs"],
        "config": config, "config_hash": card.get("config_hash", ""), "metrics": metrics,
        "data_dir": written.get("data_dir"),
    }
    return model, info


# ---------------------------------------------------------------------------------------------- trainer state


def save_train_state(model_dir: Path, step_module: nn.Module, optimizer: torch.optim.Optimizer,
                     state: Mapping[str, Any]) -> None:
    """Save 'last'. ``step_module`` has ``.model`` and ``.loss`` (the loss's learned projection heads).

    Everything a resume needs (model, loss heads, optimizer tensors, and the JSON state in the file's metadata)
    goes into ONE file, ``resume.safetensors``, written atomically: a kill -9 at any instant leaves either the
    previous snapshot or the new one, never a mix. ``last.safetensors`` (model only, loadable like ``best``)
    and ``last.state.json`` (for people and tools) are convenience copies written after it."""
    model_dir = Path(model_dir)
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in step_module.model.state_dict().items()}
    tensors.update({f"loss.{k}": v for k, v in step_module.loss.state_dict().items()})
    tensors.update({f"optim.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items() if torch.is_tensor(v)})
    meta = json.dumps({**state, "param_groups": opt["param_groups"]}, sort_keys=True)
    atomic_write_bytes(model_dir / "resume.safetensors", checkpoint_bytes(tensors, {"state": meta}))
    write_last_copies(model_dir, step_module.model, state)


def write_last_copies(model_dir: Path, model: nn.Module, state: Mapping[str, Any]) -> None:
    """``last.safetensors`` and ``last.state.json`` from the snapshot in ``resume.safetensors``. A resume calls
    it too: a kill between the snapshot and these copies leaves them one checkpoint behind, and a phase whose
    snapshot is already final has no step left that would write them again."""
    save_tensors(Path(model_dir) / "last.safetensors", model.state_dict())
    atomic_write_json(Path(model_dir) / "last.state.json", dict(state))


def load_train_state(model_dir: Path, step_module: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore what ``save_train_state`` wrote (from ``resume.safetensors`` alone); returns the JSON state."""
    from safetensors import safe_open

    path = Path(model_dir) / "resume.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: nothing to resume from")
    verify_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, a missing "state" entry, bad JSON: none of them name the file
        raise _corrupt(path, exc) from exc
    groups: Dict[str, Dict[str, torch.Tensor]] = {"model": {}, "loss": {}, "optim": {}}
    for key, value in tensors.items():
        head, rest = key.split(".", 1)
        groups[head][rest] = value
    for name in ("model", "loss"):
        missing, unexpected = getattr(step_module, name).load_state_dict(groups[name], strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    per_param: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in groups["optim"].items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


# ---------------------------------------------------------------------------------------------- the run's data


@dataclass
class Split:
    """One split as tensors: pixel_values (N,3,H,W) f32, input_ids / attention_mask (N,L) i64, labels (N,)
    i64 with -1 for unlabelled rows, qtypes (question types, may be empty). ``teacher_*`` hold the teacher's
    own tokenisation when its tokenizer differs from the student's."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    qtypes: list
    texts: list = field(default_factory=list)
    teacher_input_ids: Optional[torch.Tensor] = None
    teacher_attention_mask: Optional[torch.Tensor] = None

    def subset(self, idx: torch.Tensor) -> "Split":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Split(self.pixel_values[idx], self.input_ids[idx], self.attention_mask[idx], self.labels[idx],
                     [self.qtypes[i] for i in idx.tolist()] if self.qtypes else [],
                     [self.texts[i] for i in idx.tolist()] if self.texts else [],
                     pick(self.teacher_input_ids), pick(self.teacher_attention_mask))


@dataclass
class RunData:
    """Everything training needs from a dataset folder."""

    root: Path
    labels: list
    spec: Any  # export.bundle.PreprocessSpec
    tokenizer_path: Path
    vocab_size: int
    splits: Dict[str, Split] = field(default_factory=dict)


def ensure_embedded(path: Path, cfg: Any, dist: Any = None) -> Path:
    """Generate the embedded dataset into ``path`` (once; an identical one already there is reused)."""
    from distill.data.generate import SplitSizes, generate_dataset

    if dist is None or dist.rank == 0:
        generate_dataset(path, SplitSizes.for_samples(cfg.data.samples), seed=cfg.data.seed)
    if dist is not None:
        dist.barrier()
    return Path(path)


def load_data(root: Path, cfg: Any, out: Optional[Path] = None, transfer: bool = False) -> RunData:
    """Encode the splits of ``root`` with the dataset's tokenizer and the bundle's preprocessing (the unlabelled
    ``transfer`` split only when asked: at 2x the train size it dominates memory and load time).

    A dataset without ``tokenizer.json`` gets one built from its training texts, saved in ``out``."""
    from distill.data import folder
    from export.bundle import PreprocessSpec, TextEncoder

    root = Path(root)
    labels = list(folder.read_labels(root))
    tok = root / TOKENIZER_FILE
    if not tok.is_file():
        tok = _build_tokenizer(root, Path(out or root))
    spec = PreprocessSpec(image_size=_image_size(root), max_text_length=cfg.data.max_text_length)
    encoder = TextEncoder(tok, spec)
    data = RunData(root, labels, spec, tok, encoder.vocab_size)
    for split in ("train", "validation", "test") + (("transfer",) if transfer else ()):
        if (root / split).is_dir():
            data.splits[split] = _encode(root, split, spec, encoder, labels)
    for split in ("train", "validation", "test"):
        if split not in data.splits:
            raise CheckpointError(f"{root} has no {split}/ split; a dataset needs train/, validation/ and test/")
    return data


def _image_size(root: Path) -> int:
    info = root / "dataset.json"
    if info.is_file():
        return int(read_json(info).get("image_size", 64))
    return 64


def _build_tokenizer(root: Path, out: Path) -> Path:
    from distill.data import folder
    from distill.data.tokenizer import build_tokenizer, save_tokenizer

    texts = [ex.text for ex in folder.read_split(root, "train", require_labels=False)]
    return save_tokenizer(build_tokenizer(texts), out / TOKENIZER_FILE)


def _encode(root: Path, split: str, spec: Any, encoder: Any, labels: list) -> Split:
    from distill.data import folder

    enc = folder.encode_split(root, split, spec, encoder, labels, require_labels=split != "transfer")
    ids, mask = torch.as_tensor(enc.input_ids), torch.as_tensor(enc.attention_mask)
    length = max(1, int(mask.sum(1).max())) if len(mask) else 1
    ids, mask = ids[:, :length].contiguous(), mask[:, :length].contiguous()  # drop all-padding columns
    texts = list(enc.texts)
    return Split(torch.as_tensor(enc.pixel_values), ids, mask, torch.as_tensor(enc.labels).long(),
                 list(getattr(enc, "qtypes", []) or []), texts)

"""Experiment config: typed defaults here, one TOML file per experiment overriding only what differs, and
``--set section.key=value`` overrides on the command line. Unknown keys and wrong types fail loudly; the
resolved config and its hash are written into the run folder.

Example::

    cfg = load_config("distill/configs/shapes.toml", overrides=["student.steps=200", "loss.kd=2.0"])
    cfg.student.steps   # 200
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union, get_type_hints

from distill.errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """The embedded dataset generated when no --data is given (train N, validation/test N/10, transfer 2N)."""

    samples: int = 20000
    seed: int = 0
    max_text_length: int = 32


@dataclass
class PhaseConfig:
    """One training phase (teacher or student)."""

    model: str = "student_small"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # after warmup: "cosine" decay to zero, "constant", or "wsd" (see decay_fraction)
    decay_fraction: float = 0.2  # "wsd" (warmup-stable-decay): constant, then cosine to zero over this last share
    grad_clip: float = 1.0
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    checkpoint_every: int = 200  # steps between 'last' checkpoints (and at every validation)


@dataclass
class LossConfig:
    """Weights of the named loss terms (0 disables a term) and their settings."""

    ce: float = 1.0
    kd: float = 1.0
    hard: float = 0.0  # hard-label distillation: cross-entropy against the teacher's top-1 answer on every row
    feature: float = 0.5
    relational: float = 0.5
    spatial: float = 0.0  # hint KD on the question-conditioned feature maps (models with MultimodalOutput.spatial)
    temperature: float = 4.0
    tau: float = 0.1
    feature_kind: str = "cosine"
    # Teacher outputs cached per augmented view: V > 0 replays the first V epochs (same batches, same augmented
    # views) and runs the teacher only while filling them, so every later step is student-only compute. 0 = the
    # teacher runs on every step and every step shows a new view.
    teacher_cache_views: int = 0

    TERMS = ("ce", "kd", "hard", "feature", "relational", "spatial")  # the weighted terms, in logging order

    def weights(self) -> Dict[str, float]:
        return {term: getattr(self, term) for term in self.TERMS}


@dataclass
class AugmentConfig:
    """Training-time augmentation; teacher and student always see the same augmented view."""

    enabled: bool = True
    noise_std: float = 0.05
    brightness: float = 0.05
    shift: int = 2
    mixup_alpha: float = 0.0  # > 0 enables mixup (function matching); 0 = off


@dataclass
class BaselineConfig:
    """What ``--baselines`` runs: regime (a) full labels, regime (b) few labels + unlabelled transfer split."""

    seeds: int = 3
    steps: int = 0  # 0 = the student's steps
    few_labels: int = 5000
    transfer: int = 0  # unlabelled samples used in regime (b); 0 = the whole transfer split
    include_single_modality: bool = True
    workers: int = 1  # models trained at once in separate processes (CPU, single process runs), cores split evenly
    # Steps between validations for every baseline model (0 = once per epoch). One cadence for all: the best
    # checkpoint is picked on validation, and once per epoch gives a 5k-row scratch student 9x the looks of a
    # 45k-row KD student.
    eval_every: int = 250


@dataclass
class Config:
    seed: int = 0
    deterministic: bool = True
    bf16: bool = True
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    data: DataConfig = field(default_factory=DataConfig)
    teacher: PhaseConfig = field(default_factory=lambda: PhaseConfig(model="teacher_film_base", lr=1e-3))
    student: PhaseConfig = field(default_factory=PhaseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 (first 16 hex) of the canonical JSON of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check ``value`` against a scalar field type; ints are accepted where floats are expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where} must be {typ.__name__}, got {type(value).__name__} {value!r}")


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {where!r}; known keys here: {', '.join(sorted(known))}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where} is a section; give it as a [{where}] table, not {value!r}")
            _merge(getattr(obj, key), value, f"{where}.")
        else:
            setattr(obj, key, _coerce(value, typ, where))


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value``: value parsed as TOML (numbers, true/false, quoted strings); bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def validate(cfg: Config) -> Config:
    """Range checks a type cannot express."""
    for name in ("teacher", "student"):
        phase: PhaseConfig = getattr(cfg, name)
        if phase.steps < 1 or phase.batch_size < 1:
            raise ConfigError(f"{name}.steps and {name}.batch_size must be >= 1")
        if phase.lr <= 0:
            raise ConfigError(f"{name}.lr must be > 0, got {phase.lr}")
        if phase.eval_every < 0:
            raise ConfigError(f"{name}.eval_every must be >= 0 (0 = once per epoch), got {phase.eval_every}")
    for name in ("teacher", "student"):
        if getattr(cfg, name).schedule not in ("cosine", "constant", "wsd"):
            raise ConfigError(f"{name}.schedule must be 'cosine', 'constant' or 'wsd', "
                              f"got {getattr(cfg, name).schedule!r}")
        if not 0.0 < getattr(cfg, name).decay_fraction <= 1.0:
            raise ConfigError(f"{name}.decay_fraction must be in (0, 1], got {getattr(cfg, name).decay_fraction!r}")
    if cfg.loss.feature_kind not in ("mse", "cosine"):
        raise ConfigError(f"loss.feature_kind must be 'mse' or 'cosine', got {cfg.loss.feature_kind!r}")
    if cfg.loss.temperature <= 0 or cfg.loss.tau <= 0:
        raise ConfigError("loss.temperature and loss.tau must be > 0")
    negative = [term for term, w in cfg.loss.weights().items() if w < 0]
    if negative:
        raise ConfigError(f"loss weights must be >= 0: {', '.join(f'loss.{t}' for t in negative)}")
    if cfg.loss.teacher_cache_views < 0:
        raise ConfigError(f"loss.teacher_cache_views must be >= 0, got {cfg.loss.teacher_cache_views}")
    if cfg.loss.teacher_cache_views and cfg.loss.spatial > 0:
        raise ConfigError("loss.spatial needs the teacher's feature maps, which are too large to cache; "
                          "set loss.teacher_cache_views = 0 or loss.spatial = 0")
    if cfg.baselines.seeds < 1 or cfg.baselines.workers < 1:
        raise ConfigError("baselines.seeds and baselines.workers must be >= 1")
    if cfg.baselines.eval_every < 0:
        raise ConfigError(f"baselines.eval_every must be >= 0 (0 = once per epoch), got {cfg.baselines.eval_every}")
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the TOML file at ``path`` (a bare name like ``tiny`` means distill/configs/tiny.toml),
    then ``overrides`` (``section.key=value``)."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.exists() and (CONFIG_DIR / f"{p.name}.toml").exists():
            p = CONFIG_DIR / f"{p.name}.toml"
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} not found; shipped configs: "
                              f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.toml')))}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
        _merge(cfg, data, "")
    for item in overrides:
        keys, value = _parse_override(item)
        _merge(cfg, _nest(keys, value), "")
    return validate(cfg)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data, "")
    return validate(cfg)

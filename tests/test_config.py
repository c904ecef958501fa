"""Config: defaults, TOML files, --set overrides, rejection of unknown keys and wrong types, hashing."""
from __future__ import annotations

import pytest

from distill.config import CONFIG_DIR, Config, config_from_dict, load_config
from distill.errors import ConfigError


def test_shipped_configs_load() -> None:
    for path in CONFIG_DIR.glob("*.toml"):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
    assert load_config("tiny").student.model == "student_tiny"


def test_overrides_apply_with_types() -> None:
    cfg = load_config("tiny", ["student.steps=7", "loss.kd=2", "augment.enabled=false", "teacher.model=teacher_film_base"])
    assert cfg.student.steps == 7
    assert cfg.loss.kd == 2.0 and isinstance(cfg.loss.kd, float)
    assert cfg.augment.enabled is False
    assert cfg.teacher.model == "teacher_film_base"


@pytest.mark.parametrize("override,match", [
    ("student.stepz=3", "unknown config key 'student.stepz'"),
    ("nosuch.steps=3", "unknown config key 'nosuch'"),
    ("student.steps=1.5", "student.steps must be int"),
    ("student.steps=ten", "student.steps must be int"),
    ("augment.enabled=1", "augment.enabled must be bool"),
    ("student=3", "student is a section"),
    ("loss.feature_kind=l1", "feature_kind"),
    ("student.lr=0", "student.lr must be > 0"),
    ("loss.hard=-1", "loss weights must be >= 0: loss.hard"),
    ("teacher.eval_every=-1", "teacher.eval_every must be >= 0"),
    ("baselines.eval_every=-5", "baselines.eval_every must be >= 0"),
])
def test_bad_overrides_fail_loudly(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_unknown_key_in_file_fails(tmp_path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[student]\nmodel = 'student_tiny'\nbatchsize = 3\n")
    with pytest.raises(ConfigError, match="student.batchsize"):
        load_config(p)


def test_missing_file_lists_shipped_configs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="shapes"):
        load_config(tmp_path / "nope.toml")


def test_hash_is_stable_and_round_trips() -> None:
    a, b = load_config("tiny"), load_config("tiny")
    assert a.hash() == b.hash()
    assert load_config("tiny", ["seed=1"]).hash() != a.hash()
    assert config_from_dict(a.to_dict()).hash() == a.hash()

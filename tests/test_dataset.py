"""The embedded shapes-VQA dataset: deterministic, balanced, correct, and it needs both image and question."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill import cli
from distill.data import shapes
from distill.data.generate import SPLITS, SplitSizes, generate_dataset
from distill.errors import DatasetError

SMALL = SplitSizes(train=240, validation=30, test=30, transfer=60)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    generate_dataset(out, SMALL, seed=7, workers=1)
    return out


def test_layout_is_imagefolder_with_unlabelled_transfer(small: Path) -> None:
    info = json.loads((small / "dataset.json").read_text())
    assert info["labels"] == list(shapes.LABELS)
    assert info["seed"] == 7 and info["generator_version"] == shapes.GENERATOR_VERSION
    for split in SPLITS:
        rows = [json.loads(line) for line in (small / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == getattr(SMALL, split) == info["splits"][split]["samples"]
        assert all((small / split / row["file_name"]).is_file() for row in rows)
        assert all(row["qtype"] in shapes.QTYPES for row in rows)
        if split == "transfer":
            assert all("label" not in row for row in rows)
        else:
            assert all(row["label"] in shapes.LABELS for row in rows)
    image = Image.open(small / "train" / "000000.png")
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert (small / "tokenizer.json").is_file()


def test_same_seed_same_bytes_whatever_the_process_count(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, SMALL, seed=7, workers=2)  # two worker processes, chunks in a different layout
    assert _files(again) == _files(small)


def test_other_seed_other_data(small: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_dataset(other, SplitSizes(train=20, validation=5, test=5, transfer=0), seed=8, workers=1)
    assert (other / "train" / "000000.png").read_bytes() != (small / "train" / "000000.png").read_bytes()


def test_no_answer_class_above_15_percent() -> None:
    labels = Counter(shapes.generate_scene(0, "test", i).label for i in range(3000))
    assert set(labels) == set(shapes.LABELS), "every answer occurs"
    top, count = labels.most_common(1)[0]
    assert count / 3000 <= 0.15, f"{top} is {count / 3000:.1%} of the test split"


def test_labels_agree_with_an_oracle_reading_the_scene() -> None:
    for i in range(1500):
        scene = shapes.generate_scene(1, "train", i)
        assert shapes.answer(scene.objects, scene.query) == scene.label, (i, scene.text)


def test_question_alone_does_not_tell_the_answer() -> None:
    train = [shapes.generate_scene(0, "train", i) for i in range(3000)]
    test = [shapes.generate_scene(0, "test", i) for i in range(1500)]
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    for scene in train:
        by_text[scene.text][scene.label] += 1
    fallback = Counter(s.label for s in train).most_common(1)[0][0]
    guess = {text: counts.most_common(1)[0][0] for text, counts in by_text.items()}
    accuracy = sum(guess.get(s.text, fallback) == s.label for s in test) / len(test)
    assert accuracy < 0.45, f"a text-only majority baseline reaches {accuracy:.1%}"
    repeated = [counts for counts in by_text.values() if sum(counts.values()) >= 5]
    assert repeated and sum(len(c) >= 2 for c in repeated) / len(repeated) > 0.95  # same question, varied answers


def test_image_alone_does_not_tell_the_answer() -> None:
    """The same scene answers different questions differently, so the question is needed too."""
    varied = 0
    for i in range(300):
        objects = shapes.generate_scene(2, "train", i).objects
        answers = {shapes.answer(objects, {"qtype": "count", "shape": s}) for s in shapes.SHAPES}
        answers |= {shapes.answer(objects, {"qtype": "exist", "colour": c, "shape": "circle"}) for c in shapes.COLOURS}
        varied += len(answers) >= 3
    assert varied / 300 > 0.95


def test_left_of_answers_are_visible() -> None:
    for i in range(400):
        scene = shapes.generate_scene(3, "train", i)
        if scene.qtype == "left_of":
            (ca, sa), (cb, sb) = scene.query["a"], scene.query["b"]
            a = next(o for o in scene.objects if (o.colour, o.shape) == (ca, sa))
            b = next(o for o in scene.objects if (o.colour, o.shape) == (cb, sb))
            assert abs(a.x - b.x) >= shapes.LEFT_MARGIN


def test_png_decodes_to_the_rendered_pixels() -> None:
    """The hand-written PNG encoder is lossless and readable by PIL."""
    scene, rng = shapes._build(4, "validation", 5)
    pixels = shapes.render(scene.objects, rng)  # the same draws generate_sample makes
    sample = shapes.generate_sample(4, "validation", 5)
    decoded = Image.open(io.BytesIO(sample.png))
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (64, 64))
    assert np.array_equal(np.asarray(decoded), pixels)
    assert 5 < pixels.std() and pixels.min() < 60  # shapes on a dark background, with noise


def test_cli_writes_then_reuses_then_refuses_foreign_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d"
    args = ["data", "--out", str(out), "--samples", "40", "--transfer", "10", "--seed", "3"]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    first = _files(out)
    assert cli.main(args) == 0
    assert "up to date" in capsys.readouterr().out and _files(out) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left behind"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["data", "--out", str(foreign), "--samples", "20"]) == 1
    assert "--force" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


def test_a_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shapes.generate_sample

    def failing(seed: int, split: str, index: int) -> shapes.Sample:
        if split == "validation" and index == 3:
            raise RuntimeError("disk full")  # a fault half-way through
        return real(seed, split, index)

    monkeypatch.setattr(shapes, "generate_sample", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset(tmp_path / "d", SplitSizes(train=20, validation=5, test=5, transfer=0), workers=1)
    assert list(tmp_path.iterdir()) == [], "neither the dataset nor its temp folder exists"


def test_split_sizes_reject_nonsense() -> None:
    with pytest.raises(DatasetError, match="at least 1 sample"):
        SplitSizes.for_samples(5, test=0)
    assert SplitSizes.for_samples(20000).as_dict() == {
        "train": 20000, "validation": 2000, "test": 2000, "transfer": 40000
    }


def test_cli_reports_missing_subcommand_modules(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("distill.no_such_module", "not written yet"))
    assert cli.main(["ghost"]) == 1
    assert "not available" in capsys.readouterr().err
    assert cli.main([]) == 2  # no subcommand: help, non-zero


def test_data_command_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from distill import cli; "
        f"rc = cli.main(['data', '--out', {str(tmp_path / 'd')!r}, '--samples', '10', '--transfer', '0']); "
        "import distill.data.folder; "
        "assert rc == 0 and 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

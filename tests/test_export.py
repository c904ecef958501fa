"""torch -> ONNX -> bundle: the contract (names, dtypes, dynamic axes), the bundle on disk, a torch-free
reader, and failures that write nothing servable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import pytest
import torch

from export.api import bundle_model, torch_runner
from export.bundle import TextEncoder, load_bundle
from export.errors import ExportValidationError, ParityError
from export.onnx_export import check_onnx, export_onnx, validate_graph
from export.parity import GateThresholds, make_feeds

import export_helpers as h


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return h.write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return bundle_model(h.tiny_model(), out, name="tiny", labels=h.LABELS, spec=h.SPEC, tokenizer=tok,
                        samples=h.make_samples(256), provenance={"run": "test"})


def test_graph_has_contract_names_and_dynamic_axes(tmp_path):
    path = tmp_path / "m.onnx"
    names = export_onnx(h.tiny_model(), path, image_size=32, vocab_size=h.vocab_size())
    assert names == ["logits", "text_embed"]
    model = check_onnx(path)
    validate_graph(model, image_size=32, num_labels=len(h.LABELS), output_names=names)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims == {"pixel_values": ["batch", 3, 32, 32], "input_ids": ["batch", "sequence"],
                    "attention_mask": ["batch", "sequence"]}
    assert not list(tmp_path.glob("*.data")), "weights must stay inside model.onnx (no external data)"


def test_gru_question_encoder_exports_with_a_dynamic_sequence_axis(tmp_path):
    # The GRU students and teachers pick the state at the last real token; a baked-in length would break this.
    import numpy as np
    import onnxruntime as ort
    import torch

    from distill.models import create_model

    torch.manual_seed(0)
    model = create_model("student_c8", num_labels=len(h.LABELS), vocab_size=h.vocab_size()).eval()
    path = tmp_path / "gru.onnx"
    export_onnx(model, path, image_size=64, vocab_size=h.vocab_size())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in [(1, 3), (5, 29)]:
        x = torch.randn(batch, 3, 64, 64)
        ids = torch.randint(1, h.vocab_size(), (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        expected = model(x, ids, mask).logits.detach().numpy()
        got = session.run(["logits"], {"pixel_values": x.numpy(), "input_ids": ids.numpy(),
                                       "attention_mask": mask.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_opset_below_the_dynamo_minimum_is_refused_not_silently_changed(tmp_path):
    from export.errors import ExportError

    with pytest.raises(ExportError, match="opset 17 is not supported.*use --opset 18"):
        export_onnx(h.tiny_model(), tmp_path / "m.onnx", image_size=32, vocab_size=h.vocab_size(), opset=17)
    assert not (tmp_path / "m.onnx").exists()


def test_contract_check_lists_every_miss(tmp_path):
    """A graph exported with a fixed sequence axis and a wrong label count fails on both, in one error."""
    path = tmp_path / "fixed.onnx"
    model = h.tiny_model()
    example = (torch.randn(2, 3, 32, 32), torch.ones(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, dynamic_axes={"pixel_values": {0: "batch"}},
                          input_names=["pixel_values", "input_ids", "attention_mask"],
                          output_names=["logits", "text_embed"])
    with pytest.raises(ExportValidationError) as info:
        validate_graph(onnx.load(str(path)), image_size=32, num_labels=7, output_names=["logits", "text_embed"])
    problems = "\n".join(info.value.problems)
    assert "input_ids: axis 0 is fixed at 2, expected dynamic (batch)" in problems
    assert "input_ids: axis 1 is fixed at 9, expected dynamic (sequence)" in problems
    assert "logits: axis 1 is 5, expected 7" in problems


def test_bundle_on_disk_is_verified_and_self_describing(fp32_bundle):
    bundle = load_bundle(fp32_bundle)
    spec = bundle.spec
    assert set(spec.files) == {"model.onnx", "tokenizer.json", "parity.json"}
    assert spec.variant == "fp32" and spec.labels == h.LABELS and spec.preprocess == h.SPEC
    assert spec.outputs == ("logits", "text_embed")
    assert spec.session["graph_optimization_level"] == "ORT_ENABLE_ALL"
    prov = spec.provenance
    assert prov["run"] == "test" and prov["opset"] >= 18 and prov["exporter"].startswith("torch.onnx.export(dynamo")
    assert prov["axes"]["input_ids"] == ["batch", "sequence"]
    parity = json.loads(bundle.file("parity.json").read_text())
    fp32 = parity["results"]["fp32"]
    assert parity["passed"] and fp32["samples"] >= 256 and fp32["top1_agreement"] == 1.0
    assert fp32["max_abs_diff"] <= 1e-4 and {1, 7, 64} <= set(fp32["batch_sizes"])
    assert parity["size_bytes"]["fp32"] == bundle.file("model.onnx").stat().st_size


def test_bundle_runs_in_a_torch_free_interpreter(fp32_bundle, tok):
    """What the server does: load, preprocess raw bytes with the bundle's own code, run ORT — no torch."""
    samples = h.make_samples(5, seed=7)
    encoder = TextEncoder(tok, h.SPEC)
    with torch.no_grad():
        expected = torch_runner(h.tiny_model())(make_feeds(samples, h.SPEC, encoder))
    sample_dir = fp32_bundle.parent / "raw"
    sample_dir.mkdir(exist_ok=True)
    for i, s in enumerate(samples):
        (sample_dir / f"{i}.png").write_bytes(s.image)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import onnxruntime as ort
        from export.bundle import TextEncoder, load_bundle, preprocess_images
        b = load_bundle({str(fp32_bundle)!r})
        images = [Path({str(sample_dir)!r}, f"{{i}}.png").read_bytes() for i in range({len(samples)})]
        ids, mask = TextEncoder(b.tokenizer_path, b.spec.preprocess).encode({[s.text for s in samples]!r})
        sess = ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], {{"pixel_values": preprocess_images(images, b.spec.preprocess),
                                        "input_ids": ids, "attention_mask": mask}})[0]
        assert "torch" not in sys.modules, "loading a bundle imported torch"
        print(json.dumps(logits.tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), expected, atol=1e-4)


def test_failed_gate_writes_no_bundle_and_keeps_the_report(tmp_path, tok):
    out = tmp_path / "tiny"
    with pytest.raises(ParityError) as info:
        bundle_model(h.tiny_model(), out, name="tiny", labels=h.LABELS, spec=h.SPEC, tokenizer=tok,
                     samples=h.make_samples(40), thresholds=GateThresholds(min_samples=256))
    assert "only 40 samples; the gate needs at least 256" in str(info.value)
    assert not out.exists()
    report = json.loads((tmp_path / "tiny.parity-failed.json").read_text())
    assert report["passed"] is False and report["failures"] == info.value.report["failures"]


# ---------------------------------------------------------------------------------------------- the CLI on a run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `mmkd-distill train` leaves it: generated data + RUN/student with a card and weights."""
    pytest.importorskip("distill.data.folder")
    from distill.data.folder import read_labels
    from distill.data.generate import SplitSizes, generate_dataset
    from distill.models import create_model
    from distill.runs import save_tensors, write_model_card
    from export.bundle import PreprocessSpec

    run = tmp_path_factory.mktemp("run")
    generate_dataset(run / "data", SplitSizes.for_samples(8, validation=1, test=260, transfer=0), 0, workers=1)
    labels = read_labels(run / "data")
    vocab = TextEncoder(run / "data" / "tokenizer.json", PreprocessSpec()).vocab_size
    kwargs = {"num_labels": len(labels), "vocab_size": vocab, "max_text_length": 32}
    torch.manual_seed(0)
    model = create_model("student_tiny", **kwargs)
    write_model_card(run / "student", model_name="student_tiny", model_kwargs=kwargs, labels=labels,
                     preprocess=PreprocessSpec().to_dict(), tokenizer_src=run / "data" / "tokenizer.json")
    save_tensors(run / "student" / "best.safetensors", model.state_dict())
    return run


def test_cli_exports_a_run_and_prints_a_summary(run_dir, tmp_path, capsys):
    from export.cli import main

    assert main(["--run", str(run_dir), "--model", "student", "--out", str(tmp_path / "student")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == "student" and summary["parity"]["samples"] == 260 and summary["parity"]["passed"]
    spec = load_bundle(tmp_path / "student").spec
    assert spec.provenance["model_name"] == "student_tiny" and spec.provenance["which"] == "student"


def test_cli_exit_codes_say_what_failed(run_dir, tmp_path, capsys):
    from export.cli import main

    assert main(["--run", str(run_dir), "--model", "student", "--out", str(tmp_path / "s"), "--samples", "50"]) == 1
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "only 50 samples" in err and not (tmp_path / "s").exists()
    assert main(["--run", str(run_dir), "--model", "teacher", "--out", str(tmp_path / "t")]) == 2
    assert "teacher" in capsys.readouterr().err


def test_gate_and_variant_modules_are_torch_free():
    """parity/session/variants run on ONNX Runtime alone, so benchmarks can reuse them without torch."""
    code = ("import sys, export.parity, export.session, export.variants, export.errors, export.cli\n"
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_dataset_of_a_run_is_found_or_asked_for(tmp_path):
    from export.errors import ExportError
    from export.samples import find_data_root

    assert find_data_root(tmp_path, {}, data_root=tmp_path / "mine") == tmp_path / "mine"
    (tmp_path / "data").mkdir()
    assert find_data_root(tmp_path, {}) == tmp_path / "data"
    with pytest.raises(ExportError, match=r"pass data_root= \(CLI: --data DIR\)"):
        find_data_root(tmp_path / "elsewhere", {"config": {"data": {"samples": 10}}})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_run_on_a_user_folder_is_exported_without_data_again(tmp_path):
    """`mmkd-distill train --data DIR` records DIR, so exporting that run needs no --data."""
    from distill.cli import main as distill
    from distill.runs import load_model
    from export.samples import find_data_root

    data, run = tmp_path / "mine", tmp_path / "run"
    assert distill(["data", "--out", str(data), "--samples", "120"]) == 0
    assert distill(["train", "--config", "tiny", "--out", str(run), "--data", str(data), "--no-progress",
                    "--set", "student.steps=2", "--set", "teacher.steps=2"]) == 0
    assert not (run / "data").exists()
    _, info = load_model(run, "student")
    assert find_data_root(run, info) == data.resolve()

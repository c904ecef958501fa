"""Build a tiny but REAL model bundle for server tests: a torch model exported to ONNX, a `tokenizers` tokenizer,
and `export.bundle.write_bundle`. Seconds to build, deterministic from a seed.

The model: a strided conv over pixel_values, global mean pooled, next to a masked mean of token embeddings,
concatenated and fed to a linear head -> logits (B, C). Batch and sequence axes are dynamic, as the bundle
contract requires. torch is imported here only (the server never imports it).
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from export.bundle import BundleSpec, PreprocessSpec, write_bundle

LABELS = ("red", "green", "blue", "yes", "no")
WORDS = ("what", "color", "is", "the", "circle", "square", "left", "of", "is", "there", "a", "triangle", "?")
SPEC = PreprocessSpec(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_text_length=12)


def tokenizer_json() -> str:
    """A WordLevel tokenizer over a few words, with [PAD]=0 and [UNK]=1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _model(vocab_size: int, num_labels: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.embed = nn.Embedding(vocab_size, 8)
            self.head = nn.Linear(16, num_labels)

        def forward(self, pixel_values, input_ids, attention_mask):
            img = torch.relu(self.conv(pixel_values)).mean(dim=(2, 3))  # (B, 8)
            mask = attention_mask.unsqueeze(-1).to(pixel_values.dtype)  # (B, L, 1)
            txt = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, 8)
            return self.head(torch.cat([img, txt], dim=-1)) * 3.0  # (B, C)

    return Tiny().eval()


def export_onnx(path: Path, vocab_size: int, num_labels: int, seed: int) -> None:
    import torch

    model = _model(vocab_size, num_labels, seed)
    size = SPEC.image_size
    args = (torch.randn(2, 3, size, size), torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    with warnings.catch_warnings():  # the legacy exporter warns that dynamo is the default now
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, args, path)


def _export(model, args, path: Path) -> None:
    import torch

    torch.onnx.export(
        model, args, str(path), dynamo=False, opset_version=17,
        input_names=["pixel_values", "input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
                      "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
    )


def build_tiny_bundle(out_dir: str | Path, name: str = "tiny", seed: int = 0, variant: str = "fp32") -> Path:
    """Export the tiny model and write a verified bundle folder at out_dir; return its path."""
    out = Path(out_dir)
    tok = tokenizer_json()
    vocab_size = len(json.loads(tok)["model"]["vocab"])
    with tempfile.TemporaryDirectory() as work:
        onnx_path = Path(work) / "model.onnx"
        export_onnx(onnx_path, vocab_size, len(LABELS), seed)
        spec = BundleSpec(name=name, labels=LABELS, preprocess=SPEC, variant=variant,
                          provenance={"source": "tests/tiny_bundle.py", "seed": seed})
        files = {"model.onnx": onnx_path, "tokenizer.json": tok.encode(),
                 "parity.json": json.dumps({"max_abs_diff": 0.0, "top1_agreement": 1.0}).encode()}
        return write_bundle(out, spec, files, overwrite=True)


def build_repository(root: str | Path, names: tuple[str, ...] = ("tiny",)) -> Path:
    """A model repository folder with one tiny bundle per name (different seeds, so outputs differ)."""
    root = Path(root)
    for seed, name in enumerate(names):
        build_tiny_bundle(root / name, name=name, seed=seed)
    return root


def make_image(seed: int = 0, size: int = 24, fmt: str = "PNG") -> bytes:
    """A small random RGB image, encoded."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


QUESTIONS = ("what color is the circle ?", "is there a triangle ?", "what is left of the square ?",
             "is there a circle", "what color is the square left of the triangle ?")


# ------------------------------------------------------------------------------------------------------------------
# A real server on loopback, run in a background thread with its own event loop, for synchronous tests.
# ------------------------------------------------------------------------------------------------------------------


class ServerThread:
    """`with ServerThread(settings) as srv:` serves on 127.0.0.1:srv.port until the block ends (graceful stop)."""

    def __init__(self, settings) -> None:
        import asyncio
        import threading

        from server.app import InferenceServer

        self.server = InferenceServer(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mmkd-test-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def __enter__(self) -> "ServerThread":
        import asyncio

        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        except BaseException:
            self.stop(0)
            raise
        return self

    def stop(self, grace: float | None = None) -> None:
        import asyncio

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(30)
                self.loop.close()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0


def settings_for(repo: Path, **overrides):
    """ServerSettings for tests: free port, CPU, text logs."""
    from server.settings import ServerSettings

    values = dict(model_repository=repo, port=0, device="cpu", log_format="text")
    values.update(overrides)
    return ServerSettings(**values)


def reference_probs(bundle_dir: Path, image: bytes, text: str) -> np.ndarray:
    """The request computed in-process, straight on ONNX Runtime with the bundle's own preprocessing: what every
    served answer must equal."""
    import onnxruntime as ort

    from export.bundle import TextEncoder, load_bundle, preprocess_images

    bundle = load_bundle(bundle_dir)
    pixels = preprocess_images([image], bundle.spec.preprocess)
    ids, mask = TextEncoder(bundle.tokenizer_path, bundle.spec.preprocess).encode([text])
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask})[0][0]
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()

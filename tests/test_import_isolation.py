"""The serving side must run on ONNX Runtime alone: importing it must not pull in torch or transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def imported_heavy_modules(code: str) -> list[str]:
    probe = code + "\nimport sys\nprint(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


def test_bundle_module_is_torch_free():
    assert imported_heavy_modules("import export.bundle") == []


def test_every_server_module_is_torch_free():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "server").rglob("*.py")
        if p.name != "__main__.py" and (p.name != "__init__.py" or p.parent != ROOT / "server")
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    if not modules:
        pytest.skip("server package has no modules yet")
    code = "\n".join(f"import {m}" for m in ["server", *modules])
    assert imported_heavy_modules(code) == []

"""Every way an export can fail, as one tree, so callers catch exactly what they can handle.

    ExportError
    ├── ExportCheckError        onnx.checker rejected the exported graph
    ├── ExportValidationError   graph names, dtypes or shapes differ from the bundle contract
    ├── ParityError             ONNX Runtime disagrees with torch beyond the gate's bounds
    └── VariantError            int8 / fp16 conversion could not be produced

`ParityError.report` holds the full parity report (the same dict written to parity.json), so a
caller can show what diverged and by how much without re-running anything.
"""

from __future__ import annotations

from typing import Any, Sequence


class ExportError(Exception):
    """Base class: any failure while turning a run's model into a bundle."""


class ExportCheckError(ExportError):
    """`onnx.checker.check_model(full_check=True)` rejected the graph."""


class ExportValidationError(ExportError):
    """The graph does not match the contract; `.problems` lists every miss, not just the first."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("ONNX graph does not match the bundle contract:\n  - " + "\n  - ".join(self.problems))


class ParityError(ExportError):
    """The parity gate failed; `.failures` says what diverged, `.report` is the full parity.json content."""

    def __init__(self, failures: Sequence[str], report: dict[str, Any]) -> None:
        self.failures = list(failures)
        self.report = report
        variant = report.get("variant", "?")
        super().__init__(f"parity gate failed for the {variant} model:\n  - " + "\n  - ".join(self.failures))


class VariantError(ExportError):
    """Quantization or fp16 conversion failed; the message names the step and the cause."""

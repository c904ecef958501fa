"""What machine and which libraries produced a benchmark number.

Every result file, table and plot carries this label: a latency figure without the CPU model, core count and
library versions beside it cannot be compared with anything. Only the standard library is needed to read the
hardware; library versions are read from installed package metadata so nothing heavy is imported.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

LIBRARIES = ("onnxruntime-gpu", "onnxruntime", "torch", "transformers", "grpcio", "numpy", "tritonclient",
             "nvidia-pytriton")


@dataclass(frozen=True)
class MachineInfo:
    """Hardware and software facts for labels and file names.

    >>> MachineInfo(cpu="Intel Xeon", cores=2, gpu=None, python="3.12.0").device
    'cpu'
    """

    cpu: str
    cores: int
    gpu: str | None
    python: str
    os: str = ""
    libraries: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """'cuda' when a GPU was seen, else 'cpu': the first part of result file names."""
        return "cuda" if self.gpu else "cpu"

    def label(self) -> str:
        """One line for plot titles and report headers."""
        libs = ", ".join(f"{k} {v}" for k, v in self.libraries.items() if k in ("onnxruntime-gpu", "onnxruntime",
                                                                               "torch", "grpcio"))
        gpu = f", GPU {self.gpu}" if self.gpu else ", no GPU"
        return f"{self.cpu} ({self.cores} cores{gpu}); Python {self.python}; {libs}"

    def slug(self) -> str:
        """A short file-name-safe tag such as 'cpu-2c' or 'cuda-h100'."""
        if self.gpu:
            model = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-").replace("nvidia-", "")
            return f"cuda-{model[:24]}"
        return f"cpu-{self.cores}c"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device": self.device, "label": self.label(), "slug": self.slug()}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup affinity), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name from nvidia-smi, or None when there is none (no driver, no binary)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return names[0] if names else None


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers; missing ones are left out."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def describe_machine() -> MachineInfo:
    """Collect the facts once per benchmark run."""
    return MachineInfo(cpu=cpu_model(), cores=usable_cores(), gpu=gpu_name(), python=platform.python_version(),
                       os=f"{platform.system()} {platform.release()}", libraries=library_versions())

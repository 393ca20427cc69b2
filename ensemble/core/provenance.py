"""What produced a run, beyond its config and data: library versions, the machine, and whether
the installed packages are the ones pinned in the repository's ``constraints.txt``.

Results are exactly reproducible only on the same stack: the members' weights depend on the
CPU kernels torch picks (float32 reductions differ between instruction sets and thread counts),
on the library versions, and, for the default data (`builtin:python-docs`), on the Python
version, whose bundled reference manual differs between releases (the data fingerprint in the
manifest changes with it)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from ensemble import __version__

# The repository's lock file, present when the package runs from a checkout (pip install -e).
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"  # ensemble/core/ -> the repository
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;#]+)")


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import numpy
    import transformers

    return {
        "ensemble": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lock_differences(constraints: Path = CONSTRAINTS) -> list[str] | None:
    """Installed packages whose version differs from their pin in ``constraints`` (a local
    label such as +cpu ignored), as `name installed (pinned X)`; None without a lock file."""
    if not constraints.is_file():
        return None
    differences = []
    for line in constraints.read_text().splitlines():
        m = _PIN.match(line.strip())
        if not m:
            continue
        name, pinned = m.groups()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional extra (deepspeed, the test tools) that is not installed
        if installed.split("+")[0] != pinned.split("+")[0]:
            differences.append(f"{name} {installed} (pinned {pinned})")
    return differences


def environment() -> dict[str, Any]:
    """The machine and software stack, for the manifest."""
    differences = lock_differences()
    if differences is None:
        lock: str | list[str] = "no constraints.txt (not a source checkout)"
    else:
        lock = differences or "matches constraints.txt"
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "lock": lock,
    }

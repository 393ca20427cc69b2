"""The manifest's record of the software stack: installed versions against the lock file."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ensemble.core.provenance import CONSTRAINTS, lock_differences


def test_the_lock_file_pins_what_the_package_needs():
    pins = {line.split("==")[0].lower() for line in CONSTRAINTS.read_text().splitlines() if "==" in line}
    assert {"torch", "transformers", "accelerate", "datasets", "deepspeed", "numpy", "tokenizers"} <= pins


def test_lock_differences_names_each_mismatch(tmp_path: Path):
    numpy = importlib.metadata.version("numpy")
    lock = tmp_path / "constraints.txt"
    lock.write_text(
        "# comment\n"
        f"numpy=={numpy}\n"
        "pyyaml==0.0.1\n"  # installed, another version
        "surely-not-installed-package==1.0\n"  # an extra that is absent: not a difference
        f"torch=={importlib.metadata.version('torch').split('+')[0]}\n"  # local label ignored
    )
    differences = lock_differences(lock)
    assert (
        len(differences) == 1 and differences[0].startswith("pyyaml ") and "(pinned 0.0.1)" in differences[0]
    )
    assert lock_differences(tmp_path / "missing.txt") is None

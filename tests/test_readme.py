"""Every Python snippet of the README (and of docs/) runs as written, in order, in one fresh
interpreter, from a directory whose `runs/tiny` is a small trained and evaluated run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ensemble.cli import train_main

from .conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def snippets(page: Path) -> list[str]:
    return SNIPPET.findall(page.read_text())


def test_the_pages_have_snippets_to_run():
    assert len(snippets(REPO / "README.md")) >= 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, datasets_cache) -> Path:
    """`runs/tiny` (two members, evaluated: fitted temperatures and weights in results.json) and
    the repository's configs/, as the README's commands leave them."""
    root = tmp_path_factory.mktemp("readme")
    argv = tiny_overrides(root / "runs" / "tiny", datasets_cache, eval__temperature_scaling="true")
    assert train_main(argv) == 0
    (root / "configs").symlink_to(REPO / "configs")
    return root


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_snippet_runs_verbatim(page: Path, workdir: Path, datasets_cache: Path):
    blocks = snippets(page)
    # Each block is run as it is written; the separators only say which block failed.
    script = "".join(f"print('--- snippet {i}', flush=True)\n{block}\n" for i, block in enumerate(blocks, 1))
    path = workdir / f"{page.stem}-snippets.py"
    path.write_text(script)
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(datasets_cache)}
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **offline},
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("--- snippet") == len(blocks)

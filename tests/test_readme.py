"""Every Python snippet of the README (and of docs/) runs as written, in order, in one fresh
interpreter, from a directory whose `runs/tiny` is a small trained and evaluated run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensemble.cli.train import train_main

from .conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def snippets(page: Path) -> list[str]:
    return SNIPPET.findall(page.read_text())


def test_the_pages_have_snippets_to_run():
    assert len(snippets(REPO / "README.md")) >= 1
    assert sum(len(snippets(page)) for page in PAGES) >= 4


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


README_GENERATE = re.compile(r"^python launch/generate\.py runs/tiny (.+)$", re.MULTILINE)
MARKED_TOKEN = re.compile(r"\[(.*?)\|\d+\.\d+\]")


def _nudge_weights(run: Path, relative: float) -> None:
    """Every member weight moved by a relative ``relative``: the size of the differences another
    CPU's float kernels make to the same training. The members' checksums follow (these are the
    weights they were saved with, on that CPU)."""
    from safetensors.torch import load_file, save_file

    from ensemble.core.members import weight_digests
    from ensemble.core.paths import MEMBER_INFO

    gen = torch.Generator().manual_seed(0)
    for path in sorted(run.glob("members/member-*/model.safetensors")):
        weights = load_file(path)
        for w in weights.values():
            w.add_(w * relative * torch.randn(w.shape, generator=gen, dtype=w.dtype))
        save_file(weights, path, metadata={"format": "pt"})
        info_path = path.parent / MEMBER_INFO
        info = json.loads(info_path.read_text())
        info["weights_sha256"] = weight_digests(path.parent)
        info_path.write_text(json.dumps(info))


def test_the_readme_generation_does_not_hang_on_a_near_tie(workdir: Path, tmp_path: Path):
    """The README's generate command, run verbatim, prints the same tokens from members whose
    weights differ in their last bits (greedy search once printed 50 newlines on one CPU and text
    on another: its top two tokens were 0.083 and 0.082); newline tokens come out escaped."""
    (args,) = README_GENERATE.findall((REPO / "README.md").read_text())
    argv = shlex.split(args)
    nudged = tmp_path / "runs" / "tiny"
    shutil.copytree(workdir / "runs" / "tiny", nudged)
    _nudge_weights(nudged, 1e-6)
    printed = []
    for cwd in (workdir, tmp_path):
        command = [sys.executable, str(REPO / "launch" / "generate.py"), "runs/tiny", *argv]
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # off a terminal: one line of [token|MI] (a newline token escaped), then the summary
        text, summary = proc.stdout.splitlines()
        assert summary.startswith("epistemic uncertainty"), proc.stdout
        printed.append(text)
    tokens = [MARKED_TOKEN.findall(line) for line in printed]
    assert 1 < len(tokens[0]) <= int(argv[argv.index("--max-new-tokens") + 1]), printed
    assert tokens[0] == tokens[1] and len(set(tokens[0])) > 1, printed  # the same, and not one token repeated

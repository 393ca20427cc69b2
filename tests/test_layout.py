"""The package's layout holds: stage folders never import one another, the shared folders never
import a stage, and the pieces two stages share (the chunked head, the hand-over from training to
evaluation) do what both rely on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ensemble.cli.common import USER_ERROR, guarded
from ensemble.config.loading import load_config
from ensemble.core.heads import ChunkedHead
from ensemble.errors import EnsembleError
from ensemble.runtime.handoff import Trained
from ensemble.train.run import train_run

from .conftest import REPO

STAGES = ("train", "evaluate", "generate", "distill")
TOP = "cli"  # above the stages: composes them
SHARED = ("config", "core", "runtime")  # below the stages, with errors.py and files.py


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every `ensemble.*` module a file imports, lazily or not, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "ensemble"]


def layer_violations(package: Path) -> list[str]:
    """Imports that go sideways between stage folders or upwards from a shared folder (or the
    package's top-level modules) into a stage or the command lines."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        own = parts[0] if len(parts) > 1 else None  # None: errors.py, files.py, __init__.py
        for line, name in _imports(path):
            target = name.split(".")[1] if "." in name else None
            if own == TOP or target is None or target == own:
                continue
            if target in (*STAGES, TOP):
                bad.append(f"{'/'.join(parts)}:{line} imports {name}")
            elif own not in (*STAGES, *SHARED, None):
                bad.append(f"{'/'.join(parts)}:{line}: {own}/ is not a known layer")
    return bad


def test_stages_import_only_the_shared_layers():
    package = REPO / "ensemble"
    assert {p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        *STAGES,
        TOP,
        *SHARED,
    }
    assert layer_violations(package) == []


def test_the_layer_check_sees_a_sideways_and_an_upward_import(tmp_path):
    for folder, body in {
        "train": "from ensemble.evaluate.evaluator import evaluate\n",
        "core": "def f():\n    from ensemble.cli.train import train_main\n",
        "evaluate": "from ensemble.core.data import prepare_data\nfrom ensemble.evaluate import report\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.py").write_text(body)
    assert layer_violations(tmp_path) == [
        "core/m.py:2 imports ensemble.cli.train",
        "train/m.py:1 imports ensemble.evaluate.evaluator",
    ]


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_the_chunked_head_gives_the_models_own_logits(chunk_tokens):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (3, 12))
    part = ChunkedHead.of(model, chunk_tokens, "float32", torch.device("cpu"))
    with torch.inference_mode():
        hidden = part.hidden_states(ids, torch.ones_like(ids)).reshape(-1, 16)
        spans = list(part.spans(len(hidden)))
        plain = torch.cat([part.logits(hidden[s]) for s in spans])
        into = torch.cat([part.logits(hidden[s], torch.empty(len(hidden[s]), 50)) for s in spans])
        want = model(ids).logits.reshape(-1, 50)
    assert [s.start for s in spans] == list(range(0, 36, chunk_tokens))
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(into, want, rtol=1e-5, atol=1e-5)


def test_a_model_with_work_after_its_head_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50)).eval()
    forward = model.forward
    model.forward = lambda *a, **k: forward(*a, **k).__class__(logits=forward(*a, **k).logits * 30.0)
    with pytest.raises(
        EnsembleError, match="logits are not its output layer applied to its last hidden state"
    ):
        ChunkedHead.of(model, 8, "float32", torch.device("cpu"))


def test_train_refuses_a_bad_launch_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"output.dir={out}", "output.overwrite=true"])
    handed: list[Trained] = []
    with pytest.raises(EnsembleError, match="--member trains into a run shared with other launches"):
        train_run(cfg, only=[0], then=handed.append)
    assert not out.exists() and handed == []


def test_a_user_error_is_one_line_and_status_2(capsys):
    @guarded
    def main(argv):
        raise EnsembleError(f"data.dataset={argv[0]} not found; fix the path")

    assert main(["x.txt"]) == USER_ERROR == 2
    assert capsys.readouterr().err == "error: data.dataset=x.txt not found; fix the path\n"


# --------------------------------------------------------------------------------------------
# Short functions, few parameters

MAX_LINES = 60
MAX_PARAMS = 8
# Signatures that Hugging Face calls with its own keyword arguments (generate() passes them all).
HF_SIGNATURES = {("ensemble/generate/model.py", "forward")}


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of code of a function: its docstring, comments and blank lines not counted."""
    body = fn.body
    doc = range(0)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        doc = range(body[0].lineno, body[0].end_lineno + 1)
    return sum(
        1
        for i in range(fn.lineno, fn.end_lineno + 1)
        if i not in doc and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
    )


def oversized_functions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        name = path.relative_to(root.parent).as_posix()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = fn.args
            params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
            if _code_lines(fn, lines) > MAX_LINES:
                out.append(f"{name}:{fn.lineno} {fn.name}: {_code_lines(fn, lines)} lines")
            if len(params) > MAX_PARAMS and (name, fn.name) not in HF_SIGNATURES:
                out.append(f"{name}:{fn.lineno} {fn.name}: {len(params)} parameters")
    return out


def test_no_function_is_long_or_takes_many_parameters():
    assert oversized_functions(REPO / "ensemble") == []


def test_the_size_check_sees_a_long_function_and_a_wide_one(tmp_path):
    pkg = tmp_path / "ensemble"
    pkg.mkdir()
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    (pkg / "m.py").write_text(
        f'def long():\n    """doc"""\n{long_body}\n\n\ndef wide(a, b, c, d, e, f, g, h, i):\n    pass\n'
    )
    assert [line.split(": ", 1)[1] for line in oversized_functions(pkg)] == [
        f"{MAX_LINES + 2} lines",
        "9 parameters",
    ]

"""Help text from the config dataclasses' field docstrings: ``--help`` and the configuration
reference page (docs/configuration.md) are both written from them."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import yaml

from ensemble.config.schema import ExperimentConfig


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cfg: ExperimentConfig | None = None) -> str:
    """Every config key with its current value and docstring, for ``--help``."""
    cfg = cfg or ExperimentConfig()
    lines = []
    top_docs = field_docs(ExperimentConfig)
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        lines.append(f"{section.name}: {top_docs.get(section.name, '')}")
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            lines.append(
                f"  {section.name}.{f.name}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            )
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _value(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def reference_page() -> str:
    """docs/configuration.md: every section and key with its default and docstring (the text
    of ``--help``), as Markdown. Written by ``python -m ensemble.config.docs``."""
    cfg = ExperimentConfig()
    top_docs = field_docs(ExperimentConfig)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the docstrings of ensemble/config/schema.py by "
        "`python -m ensemble.config.docs`; tests/test_docs.py fails when it is stale. -->",
        "",
        "Every key, its default and what it does. Set keys in a YAML file (`--config`) or on the "
        "command line as `section.key=value` (the overrides win); `launch/train.py --help` prints "
        "the same text, `--print-config` the resolved config. How configs are read: "
        "[training.md](training.md).",
    ]
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        docs = field_docs(type(obj))
        lines += ["", f"## `{section.name}`", "", top_docs.get(section.name, ""), ""]
        lines += ["| Key | Default | Meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(obj):
            meaning = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | `{_value(getattr(obj, f.name))}` | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    Path(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md").write_text(reference_page())

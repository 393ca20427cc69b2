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

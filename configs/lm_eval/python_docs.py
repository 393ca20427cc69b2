"""The documents of configs/lm_eval/python_docs.yaml: the embedded default's test split, carved
from `builtin:python-docs` by the project's own loader (no download)."""

from __future__ import annotations

from typing import Any


def load(**_: Any) -> Any:
    import datasets

    from ensemble.config.schema import BUILTIN_PYTHON_DOCS, DataConfig
    from ensemble.core.data import load_splits

    cfg = DataConfig(dataset=BUILTIN_PYTHON_DOCS)
    cfg.validate()
    return datasets.DatasetDict({"test": load_splits(cfg)["test"]})

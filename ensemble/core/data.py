"""Text in, blocks of token ids out: loading, split carving, tokenizing, packing.

Protocol (the README documents it): each example's tokens are followed by the EOS token, the
examples of a split are concatenated in dataset order, and the stream is cut into consecutive,
non-overlapping blocks of ``block_size`` tokens. Evaluation keeps the last, shorter block so no
test token is dropped; in a block, position t predicts token t+1. Training uses full blocks only.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import logging
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble.config.schema import BUILTIN_PYTHON_DOCS, BUILTIN_PYTHON_STDLIB, DataConfig
from ensemble.core.hub import is_local, require_local_or_hub
from ensemble.errors import EnsembleError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
TEXT_BUILDERS = ("text", "json", "csv")  # formats read as text, in data.encoding


# --------------------------------------------------------------------------------------------
# Loading raw splits


def _documents(texts: dict[str, str]) -> Iterator[dict[str, str]]:
    for title, text in texts.items():
        yield {"title": title, "text": text}


def _python_docs() -> dict[str, str]:
    import pydoc_data.topics

    return dict(pydoc_data.topics.topics)


def _python_stdlib() -> dict[str, str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(root.glob("*.py"))
    if not modules:
        raise EnsembleError(
            f"{BUILTIN_PYTHON_STDLIB}: this Python keeps no module sources in {root}; use another data.dataset"
        )
    return {m.name: m.read_text(encoding="utf-8") for m in modules}


BUILTIN_LOADERS = {BUILTIN_PYTHON_DOCS: _python_docs, BUILTIN_PYTHON_STDLIB: _python_stdlib}


def _load_source(cfg: DataConfig) -> Any:
    """The dataset as a `datasets.DatasetDict` keyed by our split names (train/validation/test)."""
    import datasets

    names = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}

    if cfg.dataset in BUILTIN_LOADERS:
        # gen_kwargs are part of the cache fingerprint, so another CPython's text gets its own
        # cache entry rather than a stale one.
        ds = datasets.Dataset.from_generator(
            _documents, gen_kwargs={"texts": BUILTIN_LOADERS[cfg.dataset]()}, cache_dir=cfg.cache_dir
        )
        return datasets.DatasetDict({"train": ds})

    if cfg.dataset:
        return _load_named(cfg, names)
    return _load_files(cfg)


def _load_named(cfg: DataConfig, names: dict[str, str]) -> Any:
    """A dataset saved to disk, a local loading script or folder, or one on the Hub."""
    import datasets

    if is_local(cfg.dataset):
        path = Path(cfg.dataset).expanduser()
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path), cfg.dataset_config, cache_dir=cfg.cache_dir)
    else:
        require_local_or_hub(
            "dataset",
            "data.dataset",
            cfg.dataset,
            "save it where the Hub is reachable (datasets.load_dataset(NAME).save_to_disk(DIR)) "
            "and set data.dataset=DIR, or export its splits and set data.train_files/test_files",
        )
        try:
            loaded = datasets.load_dataset(cfg.dataset, cfg.dataset_config, cache_dir=cfg.cache_dir)
        except datasets.exceptions.DatasetNotFoundError:
            raise EnsembleError(
                f"dataset '{cfg.dataset}' was not found on the Hub; check data.dataset "
                "(and your Hub token if it is private)"
            ) from None
        except ConnectionError as e:
            raise EnsembleError(
                f"could not download dataset '{cfg.dataset}' ({e}); save it locally and set data.dataset=DIR"
            ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({cfg.train_split: loaded})
    return datasets.DatasetDict({ours: loaded[theirs] for ours, theirs in names.items() if theirs in loaded})


def _load_files(cfg: DataConfig) -> Any:
    """data.*_files: text, JSON Lines, CSV or Parquet files of one format."""
    import datasets

    files = {"train": cfg.train_files, "validation": cfg.validation_files, "test": cfg.test_files}
    files = {split: [str(Path(f).expanduser()) for f in fs] for split, fs in files.items() if fs}
    builders = set()
    for split, paths in files.items():
        for p in paths:
            if not Path(p).is_file():
                raise EnsembleError(f"data.{split}_files: file {p} not found; fix the path")
            suffix = Path(p).suffix.lower()
            if suffix not in BUILDER_BY_SUFFIX:
                raise EnsembleError(
                    f"data.{split}_files: {p} has an unsupported extension '{suffix}'; use one of "
                    f"{', '.join(sorted(BUILDER_BY_SUFFIX))}"
                )
            builders.add(BUILDER_BY_SUFFIX[suffix])
    for split, paths in files.items():
        if all(Path(p).stat().st_size == 0 for p in paths):
            # datasets cannot even build an empty split; say what is wrong in our terms
            raise EnsembleError(
                f"the {split} split has 0 token(s): data.{split}_files hold no text; "
                + (
                    "evaluation needs at least 2, give a larger test set"
                    if split == "test"
                    else "give non-empty files"
                )
            )
    if len(builders) > 1:
        raise EnsembleError(
            f"data files mix formats ({', '.join(sorted(builders))}); convert them to one format"
        )
    (builder,) = builders
    kwargs: dict[str, Any] = {}
    if builder in TEXT_BUILDERS:
        for paths in files.values():
            for p in paths:
                check_text_file(Path(p), cfg.encoding)
        kwargs["encoding"] = cfg.encoding
    if builder == "text":
        kwargs.update(sample_by=cfg.txt_sample_by, keep_linebreaks=True)
    return datasets.load_dataset(builder, data_files=files, cache_dir=cfg.cache_dir, **kwargs)


def check_text_file(path: Path, encoding: str, chunk: int = 1 << 20) -> None:
    """Refuse, in one line that says how to fix it, a file that is binary or not in ``encoding``.
    `datasets` would fail on it mid-build with a long traceback (and a half-built cache entry);
    reading it once more here is cheap next to tokenizing it."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    # UTF-16/32 text holds NUL bytes; in any 8-bit or UTF-8 text a NUL means binary data.
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    offset, line = 0, 1
    with path.open("rb") as f:
        while block := f.read(chunk):
            if not wide and (nul := block.find(b"\0")) >= 0:
                raise EnsembleError(
                    f"{path} holds binary data (a NUL byte at byte {offset + nul}), not text; "
                    "give a text file"
                )
            try:
                decoder.decode(block, final=len(block) < chunk)
            except UnicodeDecodeError as e:
                # e.object is what the decoder held: the end of a sequence cut by the last block,
                # then this block; e.start counts from its beginning
                held = len(e.object) - len(block)
                at = offset - held + e.start
                line += block[: max(e.start - held, 0)].count(b"\n")
                raise EnsembleError(
                    f"{path} is not {encoding} text (byte 0x{e.object[e.start]:02x} at byte {at}, line "
                    f"{line}); if it is in another encoding, set data.encoding (e.g. data.encoding=latin-1, "
                    f"as many Project Gutenberg books are), or convert it to {encoding}: iconv -f latin1 "
                    f"-t {encoding} {path} > {path.stem}.{encoding}{path.suffix}"
                ) from None
            offset += len(block)
            line += block.count(b"\n")


def load_splits(cfg: DataConfig) -> Any:
    """The raw splits (train/validation/test where available), missing ones carved from train."""
    return _carve(_load_source(cfg), cfg)


def _carve(dsd: Any, cfg: DataConfig) -> Any:
    """Fill in missing validation/test splits from train, deterministically."""
    import datasets

    if "train" not in dsd or ("validation" in dsd and "test" in dsd):
        return dsd
    train = dsd["train"]
    need = [s for s in ("test", "validation") if s not in dsd]
    if len(train) < len(need) + 1:
        raise EnsembleError(
            f"cannot carve {' and '.join(need)} split(s) from a train split of {len(train)} "
            "example(s); give data.test_files (and validation_files), or for a single .txt file "
            "set data.txt_sample_by=paragraph or line"
        )
    out = dict(dsd)
    left = 1.0
    for split in need:
        fraction = getattr(cfg, f"{split}_fraction") / left
        n_carve = max(1, round(fraction * len(train)))
        n_carve = min(n_carve, len(train) - 1)
        parts = train.train_test_split(test_size=n_carve, seed=cfg.split_seed, shuffle=True)
        train, out[split] = parts["train"], parts["test"]
        left -= getattr(cfg, f"{split}_fraction")
    out["train"] = train
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------
# Text and tokens


def resolve_text_fields(columns: list[str], features: Any, cfg: DataConfig) -> tuple[str | None, str | None]:
    """(column, template) to build the text from; one of them is None."""
    if cfg.text_template:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(cfg.text_template) if name}
        except ValueError as e:
            raise EnsembleError(f"data.text_template is not a valid format string ({e}); fix it") from None
        missing = sorted(fields - set(columns))
        if missing:
            raise EnsembleError(
                f"data.text_template uses column(s) {missing} that the dataset lacks; "
                f"its columns are {columns}"
            )
        return None, cfg.text_template
    if cfg.text_column:
        if cfg.text_column not in columns:
            raise EnsembleError(
                f"text column '{cfg.text_column}' not in the dataset; set data.text_column to one "
                f"of {columns} or use data.text_template"
            )
        return cfg.text_column, None
    if "text" in columns:
        return "text", None
    strings = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0], None
    raise EnsembleError(
        f"cannot tell which column holds the text (columns: {columns}); set data.text_column, "
        'or data.text_template to combine several, e.g. "{instruction}\\n{output}"'
    )


def _texts(batch: dict[str, list], column: str | None, template: str | None) -> list[str]:
    """The text of each example of a batch (missing values count as empty strings)."""
    if template is None:
        return ["" if t is None else t for t in batch[column]]
    keys = list(batch)
    rows = (
        {k: ("" if batch[k][i] is None else batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))
    )
    return [template.format_map(row) for row in rows]


def iter_texts(ds: Any, cfg: DataConfig, batch_size: int = 1000) -> Iterator[str]:
    """The texts of a split, in dataset order, built exactly as for tokenization."""
    column, template = resolve_text_fields(ds.column_names, ds.features, cfg)
    for batch in ds.iter(batch_size=batch_size):
        yield from _texts(batch, column, template)


def _tokenize_batch(
    batch: dict[str, list], tokenizer: Any, column: str | None, template: str | None, eos_id: int
) -> dict:
    ids = tokenizer(_texts(batch, column, template), add_special_tokens=False, verbose=False)["input_ids"]
    return {"input_ids": [x + [eos_id] for x in ids]}


def tokenize(ds: Any, tokenizer: Any, cfg: DataConfig, desc: str) -> Any:
    """Map a text split to `input_ids` (EOS appended per example); cached by `datasets`."""
    import datasets

    column, template = resolve_text_fields(ds.column_names, ds.features, cfg)
    return ds.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "column": column,
            "template": template,
            "eos_id": eos_id_of(tokenizer),
        },
        remove_columns=ds.column_names,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        desc=desc,
    )


def eos_id_of(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise EnsembleError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, which the "
            "data protocol appends after every example; use a tokenizer with an eos_token"
        )
    return int(tokenizer.eos_token_id)


def token_stream(tokenized: Any) -> np.ndarray:
    """All examples' ids concatenated in dataset order, as one int32 array."""
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[:]  # respects any indices mapping (carved splits)
    return pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int32, copy=False)


# --------------------------------------------------------------------------------------------
# Blocks


class TrainBlocks(torch.utils.data.Dataset):
    """Full blocks of the training stream; the remainder shorter than a block is not used."""

    def __init__(self, stream: np.ndarray, block_size: int):
        n = len(stream) // block_size
        self.blocks = torch.from_numpy(stream[: n * block_size].astype(np.int64).reshape(n, block_size))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


class EvalBlocks(torch.utils.data.Dataset):
    """Consecutive non-overlapping blocks covering the stream, the last one possibly short. A last
    block of one token is left out: nothing in it is predicted (its token follows the previous
    block's last, which does not see across the boundary), and counting it would make the blocks
    of the report disagree with those that hold predictions (the out-of-domain table's)."""

    def __init__(self, stream: np.ndarray, block_size: int):
        self.stream = torch.from_numpy(stream.astype(np.int64))
        self.block_size = block_size

    def __len__(self) -> int:
        full, rest = divmod(len(self.stream), self.block_size)
        return full + (rest > 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.stream[i * self.block_size : (i + 1) * self.block_size]

    @property
    def num_predictions(self) -> int:
        """Positions that predict a next token: every block contributes its length minus one."""
        return sum(max(len(self[i]) - 1, 0) for i in range(len(self)))


def collate_eval(blocks: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad blocks to one length. ``target_mask[b, t]`` marks positions t whose next token
    t+1 is real; under causal attention, padding after a position cannot change it."""
    length = max(len(b) for b in blocks)
    input_ids = torch.full((len(blocks), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(blocks), length), dtype=torch.long)
    for i, b in enumerate(blocks):
        input_ids[i, : len(b)] = b
        attention_mask[i, : len(b)] = 1
    target_mask = attention_mask[:, 1:].bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


# --------------------------------------------------------------------------------------------
# Everything together


@dataclass
class PreparedData:
    """Token streams per split plus what identifies them."""

    streams: dict[str, np.ndarray]
    block_size: int
    source: str

    def train_blocks(self) -> TrainBlocks:
        return TrainBlocks(self.streams["train"], self.block_size)

    def eval_blocks(self, split: str) -> EvalBlocks:
        return EvalBlocks(self.streams[split], self.block_size)

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """Content hashes of the token streams: equal fingerprints mean identical data.
        Computed once (it hashes every token)."""
        return {
            "source": self.source,
            "block_size": self.block_size,
            "splits": {
                split: {"tokens": int(len(s)), "sha256": hashlib.sha256(s.tobytes()).hexdigest()}
                for split, s in self.streams.items()
            },
        }


def describe_source(cfg: DataConfig) -> str:
    if cfg.dataset:
        return cfg.dataset + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    files = cfg.train_files + cfg.validation_files + cfg.test_files
    return ", ".join(files)


def prepare_data(
    cfg: DataConfig,
    tokenizer: Any,
    block_size: int,
    splits: tuple[str, ...] = SPLITS,
    raw: Any | None = None,
) -> PreparedData:
    """Tokenize and check the requested splits (of ``raw``, the output of :func:`load_splits`,
    loaded here if not given). Call it under ``main_process_first()`` so that one process fills
    the cache and the others read it."""
    dsd = load_splits(cfg) if raw is None else raw
    streams = {}
    for split in splits:
        if split not in dsd:
            name = getattr(cfg, f"{split}_split")
            raise EnsembleError(
                f"the data has no '{name}' split (it has {sorted(dsd)}); set data.{split}_split "
                f"to the right name or give data.{split}_files"
            )
        tokenized = tokenize(dsd[split], tokenizer, cfg, desc=f"Tokenizing {split}")
        streams[split] = token_stream(tokenized)
    if "test" in streams and len(streams["test"]) < 2:
        raise EnsembleError(
            f"the test split has {len(streams['test'])} token(s); evaluation needs at least 2 "
            "(one to predict from, one to predict); give a larger test set"
        )
    if "train" in streams and len(streams["train"]) < block_size:
        raise EnsembleError(
            f"the train split has {len(streams['train'])} tokens, fewer than one block of "
            f"data.block_size={block_size}; lower data.block_size or add training text"
        )
    for split, s in streams.items():
        logger.info("%s: %d tokens (%s)", split, len(s), describe_source(cfg))
    return PreparedData(streams=streams, block_size=block_size, source=describe_source(cfg))

"""The data protocol, checked token by token: EOS after every example, dataset order, blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.config.schema import DataConfig, ModelConfig
from ensemble.core.data import EvalBlocks, TrainBlocks, collate_eval, prepare_data
from ensemble.core.tokenization import load_tokenizer
from ensemble.errors import EnsembleError


@pytest.fixture(scope="module")
def byte_tok():
    return load_tokenizer(ModelConfig(tokenizer="byte"))


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir):
    return load_tokenizer(ModelConfig(tokenizer=str(gpt2_tokenizer_dir)))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stream_is_examples_plus_eos_in_dataset_order(tmp_path, gpt2_tok, datasets_cache):
    texts = ["Hello world", "It was a dark and stormy night.", "", "Elementary, my dear Watson!"]
    f = _jsonl(tmp_path / "test.jsonl", [{"text": t} for t in texts])
    cfg = DataConfig(test_files=[str(f)], cache_dir=str(datasets_cache))
    data = prepare_data(cfg, gpt2_tok, block_size=4, splits=("test",))
    eos = gpt2_tok.eos_token_id
    assert eos == 50256
    expected = []
    for t in texts:
        expected += gpt2_tok(t, add_special_tokens=False)["input_ids"] + [eos]
    assert expected[:3] == [15496, 995, eos]  # "Hello world" is [15496, 995] in GPT-2
    assert data.streams["test"].tolist() == expected

    blocks = data.eval_blocks("test")
    n = len(expected)
    assert len(blocks) == -(-n // 4)
    got = [blocks[i].tolist() for i in range(len(blocks))]
    assert got == [expected[i : i + 4] for i in range(0, n, 4)]  # consecutive, non-overlapping
    assert sum(len(b) for b in got) == n  # the last, shorter block is kept: nothing dropped
    assert blocks.num_predictions == sum(len(b) - 1 for b in got)


def test_collate_marks_only_real_next_tokens():
    blocks = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])]
    batch = collate_eval(blocks)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # position t predicts t+1: 3 targets in the full block, 1 in the short one
    assert batch["target_mask"].tolist() == [[True, True, True], [True, False, False]]
    targets = batch["input_ids"][:, 1:][batch["target_mask"]]
    assert targets.tolist() == [6, 7, 8, 10]


def test_train_blocks_are_full_blocks_of_the_stream():
    stream = np.arange(23, dtype=np.int32)
    tb = TrainBlocks(stream, 5)
    assert len(tb) == 4
    assert torch.equal(tb[3], torch.arange(15, 20))
    eb = EvalBlocks(stream, 5)
    assert len(eb) == 5 and eb[4].tolist() == [20, 21, 22]


def test_txt_file_is_one_document_unless_configured(tmp_path, byte_tok, datasets_cache):
    f = tmp_path / "t.txt"
    f.write_text("first line\nsecond line\n\nnext paragraph\n")
    doc = prepare_data(DataConfig(test_files=[str(f)], cache_dir=str(datasets_cache)), byte_tok, 8, ("test",))
    raw = f.read_bytes()
    # ByT5 ids are byte + 3; one document => exactly one EOS, at the end
    assert doc.streams["test"].tolist() == [b + 3 for b in raw] + [byte_tok.eos_token_id]
    para = prepare_data(
        DataConfig(test_files=[str(f)], txt_sample_by="paragraph", cache_dir=str(datasets_cache)),
        byte_tok,
        8,
        ("test",),
    )
    assert (para.streams["test"] == byte_tok.eos_token_id).sum() == 2


def test_text_column_choice_template_and_errors(tmp_path, byte_tok, datasets_cache):
    rows = [
        {"instruction": "Be.", "output": "Here now.", "n": 1},
        {"instruction": "Sit.", "output": "Ok", "n": 2},
    ]
    f = _jsonl(tmp_path / "qa.jsonl", rows)
    base = {"test_files": [str(f)], "cache_dir": str(datasets_cache)}
    eos = byte_tok.eos_token_id

    def ids(text: str) -> list[int]:
        return [b + 3 for b in text.encode()] + [eos]

    with pytest.raises(
        EnsembleError,
        match=r"cannot tell which column holds the text \(columns: \['instruction', 'output', 'n'\]\)",
    ):
        prepare_data(DataConfig(**base), byte_tok, 8, ("test",))
    with pytest.raises(
        EnsembleError, match=r"text column 'body' not in the dataset; set data.text_column to one of"
    ):
        prepare_data(DataConfig(**base, text_column="body"), byte_tok, 8, ("test",))
    with pytest.raises(EnsembleError, match=r"uses column\(s\) \['answer'\] that the dataset lacks"):
        prepare_data(DataConfig(**base, text_template="{instruction} {answer}"), byte_tok, 8, ("test",))

    col = prepare_data(DataConfig(**base, text_column="output"), byte_tok, 8, ("test",))
    assert col.streams["test"].tolist() == ids("Here now.") + ids("Ok")
    tpl = prepare_data(DataConfig(**base, text_template="{instruction}\n{output}"), byte_tok, 8, ("test",))
    assert tpl.streams["test"].tolist() == ids("Be.\nHere now.") + ids("Sit.\nOk")

    single = _jsonl(tmp_path / "one.jsonl", [{"body": "abc", "n": 1}])
    only = prepare_data(
        DataConfig(test_files=[str(single)], cache_dir=str(datasets_cache)), byte_tok, 8, ("test",)
    )
    assert only.streams["test"].tolist() == ids("abc")  # the only string column


def test_carved_splits_are_deterministic_disjoint_and_complete(tmp_path, byte_tok, datasets_cache):
    rows = [f"example number {i}" for i in range(50)]
    f = _jsonl(tmp_path / "train.jsonl", [{"text": r} for r in rows])
    eos = byte_tok.eos_token_id

    def carve(seed: int) -> dict[str, list[str]]:
        cfg = DataConfig(
            train_files=[str(f)],
            split_seed=seed,
            validation_fraction=0.2,
            test_fraction=0.1,
            cache_dir=str(datasets_cache),
        )
        data = prepare_data(cfg, byte_tok, 8)
        out = {}
        for split, stream in data.streams.items():
            assert stream[-1] == eos
            examples = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]  # each ends in EOS
            out[split] = [bytes((e[:-1] - 3).astype(np.uint8)).decode() for e in examples]
        return out

    a, b, c = carve(0), carve(0), carve(1)
    assert a == b
    assert a["test"] != c["test"]
    assert {k: len(v) for k, v in a.items()} == {"train": 35, "validation": 10, "test": 5}
    assert sorted(a["train"] + a["validation"] + a["test"]) == sorted(rows)  # disjoint and complete


def test_bad_data_errors(tmp_path, byte_tok, datasets_cache):
    with pytest.raises(EnsembleError, match=r"data.test_files: file .*missing.txt not found; fix the path"):
        prepare_data(DataConfig(test_files=[str(tmp_path / "missing.txt")]), byte_tok, 8, ("test",))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EnsembleError, match=r"the test split has 0 token\(s\): data.test_files hold no text"):
        prepare_data(
            DataConfig(test_files=[str(empty)], cache_dir=str(datasets_cache)), byte_tok, 8, ("test",)
        )
    blank = _jsonl(tmp_path / "blank.jsonl", [{"text": ""}])  # one example, so only its EOS
    with pytest.raises(EnsembleError, match=r"the test split has 1 token\(s\); evaluation needs at least 2"):
        prepare_data(
            DataConfig(test_files=[str(blank)], cache_dir=str(datasets_cache)), byte_tok, 8, ("test",)
        )
    one_doc = tmp_path / "book.txt"
    one_doc.write_text("a whole book in one document\n")
    with pytest.raises(
        EnsembleError, match=r"cannot carve test and validation split\(s\) from a train split of 1 example"
    ):
        prepare_data(DataConfig(train_files=[str(one_doc)], cache_dir=str(datasets_cache)), byte_tok, 8)
    with pytest.raises(EnsembleError, match="unsupported extension '.xml'"):
        (tmp_path / "x.xml").write_text("<a/>")
        prepare_data(DataConfig(test_files=[str(tmp_path / "x.xml")]), byte_tok, 8, ("test",))


def test_tokenized_splits_are_cached(tmp_path, byte_tok, sherlock):
    cache = tmp_path / "cache"
    cfg = DataConfig(test_files=[str(sherlock)], txt_sample_by="paragraph", cache_dir=str(cache))
    first = prepare_data(cfg, byte_tok, 64, ("test",))
    arrow_files = sorted(p.name for p in cache.rglob("cache-*.arrow"))
    assert arrow_files, "datasets.map wrote no cache file"
    second = prepare_data(cfg, byte_tok, 64, ("test",))
    assert sorted(p.name for p in cache.rglob("cache-*.arrow")) == arrow_files  # reused, not rewritten
    assert first.fingerprint == second.fingerprint


def test_csv_and_parquet_files(tmp_path, byte_tok, datasets_cache):
    import pandas as pd

    frame = pd.DataFrame({"id": [1, 2, 3], "body": ["alpha", "beta", "gamma"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    eos = byte_tok.eos_token_id
    expected = [t for word in ("alpha", "beta", "gamma") for t in [b + 3 for b in word.encode()] + [eos]]
    for name in ("t.csv", "t.parquet"):
        cfg = DataConfig(test_files=[str(tmp_path / name)], cache_dir=str(datasets_cache))
        assert prepare_data(cfg, byte_tok, 8, ("test",)).streams["test"].tolist() == expected, name


def test_a_bad_byte_is_located_across_read_blocks(tmp_path):
    """The first bad byte's offset and line are those in the file, also when the sequence it
    breaks began in the previous block read."""
    from ensemble.core.data import check_text_file

    path = tmp_path / "cut.txt"
    path.write_bytes(b"ab\ncd\n\xe2\x82x more\n")  # a 3-byte sequence broken by its third byte
    for chunk in (1, 2, 3, 7, 8, 1 << 20):
        with pytest.raises(EnsembleError, match=r"not utf-8 text \(byte 0xe2 at byte 6, line 3\)"):
            check_text_file(path, "utf-8", chunk=chunk)


def test_the_standard_library_text_is_one_document_per_module_in_name_order(datasets_cache):
    import sysconfig

    from ensemble.config.schema import BUILTIN_PYTHON_STDLIB
    from ensemble.core.data import load_splits

    cfg = DataConfig(dataset=BUILTIN_PYTHON_STDLIB, cache_dir=str(datasets_cache))
    splits = load_splits(cfg)
    titles = [t for name in splits for t in splits[name]["title"]]
    modules = sorted(p.name for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert sorted(titles) == modules and len(set(titles)) == len(
        titles
    )  # every module once, across the splits
    row = splits["train"][0]
    assert row["text"] == (Path(sysconfig.get_paths()["stdlib"]) / row["title"]).read_text(encoding="utf-8")

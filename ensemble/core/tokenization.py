"""Tokenizers: from the Hub or a directory, or built in with nothing to download.

Built in:
- ``byte``: one id per UTF-8 byte plus pad/eos/unk (transformers' ByT5 tokenizer, 259 ids).
- ``bpe``: a GPT-2-style byte-level BPE trained on the run's training split with the
  `tokenizers` library. Training is deterministic (merges are chosen by exact pair counts with a
  fixed tie-break), takes well under a second on the default data, and the result is saved into
  the run and into every member, so evaluation never retrains it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ensemble.config.schema import BPE_TOKENIZER, BYTE_TOKENIZER, ModelConfig
from ensemble.core.hub import require_local_or_hub
from ensemble.errors import EnsembleError, first_line
from ensemble.files import atomic_directory

EOS = "<|endoftext|>"


def needs_training_text(cfg: ModelConfig) -> bool:
    return (cfg.tokenizer or cfg.name_or_path) == BPE_TOKENIZER


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) with ``EOS`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def load_tokenizer(
    cfg: ModelConfig,
    training_texts: Iterable[str] | None = None,
    save_to: Path | None = None,
    replace: bool = True,
) -> Any:
    """The run's tokenizer. A ``bpe`` tokenizer is trained on ``training_texts`` and, when
    ``save_to`` is given, saved there (atomically) for the other processes and for evaluation;
    with ``replace=False`` a tokenizer already there is kept (and returned)."""
    name = cfg.tokenizer or cfg.name_or_path
    assert name, "validated by ModelConfig"
    if name == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)
    if name == BPE_TOKENIZER:
        if training_texts is None:
            raise ValueError("a bpe tokenizer needs the training texts")
        tokenizer = train_bpe(training_texts, cfg.tokenizer_vocab_size)
        if save_to is not None:
            with atomic_directory(save_to, replace=replace) as tmp:
                tokenizer.save_pretrained(tmp)
            if not replace:  # another process may have published first: use the run's one
                return load_pretrained_tokenizer(save_to)
        return tokenizer
    return load_pretrained_tokenizer(name)


def load_pretrained_tokenizer(name: str | Path) -> Any:
    from transformers import AutoTokenizer

    name = str(name)
    require_local_or_hub(
        "tokenizer",
        "model.tokenizer",
        name,
        "save it where the Hub is reachable (AutoTokenizer.from_pretrained(NAME)"
        ".save_pretrained(DIR)) and set model.tokenizer=DIR",
    )
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise EnsembleError(
            f"cannot load tokenizer '{name}' ({first_line(e)}); check model.tokenizer"
        ) from None

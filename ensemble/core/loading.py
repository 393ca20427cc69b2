"""Loading finished members for inference, and the check that they form one ensemble: one
tokenizer, one vocabulary. The evaluator, the generator and the distillation teacher all load
members through :func:`load_members`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ensemble.core.adapters import adapter_base, is_adapter_member, load_adapter_ensemble
from ensemble.core.members import read_member_info, verify_weights
from ensemble.errors import EnsembleError, first_line

PROBE_TEXT = "The quick brown fox: 3.14 + naïve café \u4e2d\u6587\n\tdef f(x): return x"


@dataclass
class LoadedMember:
    path: Path
    name: str
    seed: int | None
    tokenizer: Any
    config: Any
    model: torch.nn.Module | None = None  # None where another process holds it (member mode)
    temperature: float = 1.0


def load_members(
    paths: list[Path], device: torch.device | str, hold: set[int] | None = None
) -> list[LoadedMember]:
    """Load member directories (the weights only of members in ``hold``; all when None) and
    check that they form an ensemble: one tokenizer, one vocabulary. The error names the member
    that does not fit."""
    if not paths:
        raise EnsembleError("no finished members to evaluate; train some first or pass member directories")
    loaded = [_load_member(Path(p), device, hold is None or i in hold) for i, p in enumerate(paths)]
    members = [m for m, _ in loaded]
    _attach_adapters([(m, info) for m, info in loaded if info is not None], device)
    _unique_names(members)
    ref = members[0]
    for m in members[1:]:
        check_same_vocabulary(
            ref,
            f"member {m.name} ({m.path})",
            m.config.vocab_size,
            m.tokenizer,
            fix="ensemble members must share one tokenizer and vocabulary",
        )
    return members


def _load_member(
    path: Path, device: torch.device | str, weights: bool
) -> tuple[LoadedMember, dict[str, Any] | None]:
    """One member's tokenizer and config, and its model when ``weights``; an adapter member's
    model comes later, on the base it shares with the others (then its member.json is returned
    beside it, for :func:`_attach_adapters`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = read_member_info(path)
    name = info.get("name", path.name)
    adapter = is_adapter_member(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(adapter_base(path) if adapter else path)
        model = None
        if weights:
            verify_weights(path, info)
            if not adapter:
                model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise EnsembleError(
            f"cannot load member {name} ({path}): {first_line(e)}; re-train or remove it"
        ) from None
    member = LoadedMember(path, name, info.get("seed"), tokenizer, config, model)
    return member, (info if adapter and weights else None)


def _attach_adapters(pending: list[tuple[LoadedMember, dict[str, Any]]], device: torch.device | str) -> None:
    """The held adapter members' models: views of one base, loaded once."""
    if pending:
        views = load_adapter_ensemble([m.path for m, _ in pending], [info for _, info in pending], device)
        for (m, _), view in zip(pending, views, strict=True):
            m.model = view


def check_same_vocabulary(
    ref: LoadedMember, what: str, vocab_size: int, tokenizer: Any | None, fix: str, against: str | None = None
) -> None:
    """Refuse a model (``what``) that does not predict over ``ref``'s vocabulary: its
    ``tokenizer`` (unless None: a model saved without one) must tokenize as ``ref``'s (the same
    vocabulary, end-of-text id and ids for a probe text), and its output layer must have as many
    tokens. The error names ``against`` (default: ``ref``'s name) and says ``fix``."""
    against = against or ref.name
    if tokenizer is not None:
        vocab, ref_vocab = tokenizer.get_vocab(), ref.tokenizer.get_vocab()
        if (
            vocab != ref_vocab
            or tokenizer.eos_token_id != ref.tokenizer.eos_token_id
            or tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
            != ref.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        ):
            raise EnsembleError(
                f"{what} uses a different tokenizer than {against} ({len(vocab)} vs {len(ref_vocab)} "
                f"tokens); {fix}"
            )
    if vocab_size != ref.config.vocab_size:
        raise EnsembleError(
            f"{what} predicts over {vocab_size} tokens but {against} over {ref.config.vocab_size}; {fix}"
        )


def _unique_names(members: list[LoadedMember]) -> None:
    """Members from different runs can share a name (two member-0s): then name each by the
    shortest tail of its path that tells them apart."""
    if len({m.path.resolve() for m in members}) < len(members):
        raise EnsembleError("the same member directory is given twice; give each member once")
    depth = 0
    while len({m.name for m in members}) < len(members):
        depth += 1
        for m in members:
            m.name = "/".join(m.path.resolve().parts[-depth - 1 :])

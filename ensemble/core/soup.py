"""A weight soup: the uniform average of the members' weights, one model (Wortsman et al. 2022).

Averaging weights makes sense only for members fine-tuned from one pretrained model: they stay
in the pretrained model's basin, where the average of the solutions is itself a good solution.
Members built from scratch with different seeds start, and end, in different basins (and with
permuted units): their average is no model at all, so the soup is skipped for them, with the
reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ensemble.core.adapters import is_adapter_member, merged_model
from ensemble.core.paths import CONFIG
from ensemble.errors import EnsembleError, first_line
from ensemble.files import atomic_directory, atomic_write_json

logger = logging.getLogger(__name__)

SOUP = "soup"
SOUP_INFO = "soup.json"


def _start(member: Path) -> str | None:
    """The pretrained model a member was fine-tuned from (None: built from scratch), from the
    config saved with it."""
    path = member / CONFIG
    if not path.is_file():
        raise EnsembleError(f"member {member} has no config.yaml recording how it started")
    raw = yaml.safe_load(path.read_text()) or {}
    return (raw.get("model") or {}).get("name_or_path") or None


def soup_reason(members: list[Path]) -> str | None:
    """Why the members cannot be souped, or None when they can."""
    if len(members) < 2:
        return "one member: its soup is itself"
    try:
        starts = {str(m): _start(m) for m in members}
    except EnsembleError as e:
        return str(e)
    if any(s is None for s in starts.values()):
        scratch = [Path(m).name for m, s in starts.items() if s is None]
        return (
            f"{', '.join(scratch)} trained from scratch: members from different random initialisations "
            "end in different basins, where averaging weights gives no useful model (soups need members "
            "fine-tuned from one pretrained model)"
        )
    if len(set(starts.values())) > 1:
        return f"the members were fine-tuned from different pretrained models ({', '.join(sorted(set(starts.values())))})"
    return None


def make_soup(members: list[Path]) -> torch.nn.Module:
    """The uniform average of the members' floating-point weights (summed in float64, so that the
    soup of identical members is that member, bit for bit), as a model in eval mode on the CPU;
    other tensors (integer buffers) are the first member's. Adapter members are averaged as
    merged models: the base plus the mean of their updates."""
    from transformers import AutoModelForCausalLM

    def load(path: Path) -> torch.nn.Module:
        try:
            # an adapter member with its update merged: the soup averages the updates B·A (an
            # average of the A and B factors separately is not the average of their products)
            return (
                merged_model(path) if is_adapter_member(path) else AutoModelForCausalLM.from_pretrained(path)
            )
        except (OSError, ValueError) as e:
            raise EnsembleError(f"cannot load member {path} for the soup ({first_line(e)})") from None

    soup = load(members[0])
    state = soup.state_dict()
    sums = {k: v.double().clone() for k, v in state.items() if v.is_floating_point()}
    for path in members[1:]:
        other = load(path).state_dict()
        if other.keys() != state.keys() or any(other[k].shape != state[k].shape for k in sums):
            raise EnsembleError(
                f"member {path} has another architecture than {members[0]}; it cannot be souped"
            )
        for k, total in sums.items():
            total += other[k].double()
        del other
    with torch.no_grad():
        for k, total in sums.items():
            state[k].copy_(total / len(members))
    return soup.eval()


def save_soup(dest: Path, soup: torch.nn.Module, tokenizer: Any, members: list[Path]) -> None:
    """The soup in Hugging Face format (loads with AutoModelForCausalLM.from_pretrained),
    written atomically, with soup.json naming the members it averages."""
    try:
        with atomic_directory(dest) as tmp:
            soup.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / SOUP_INFO, {"soup": "uniform", "members": [str(m) for m in members]})
    except OSError as e:
        raise EnsembleError(
            f"could not write the soup to {dest} ({e.strerror or e}); nothing partial was kept"
        ) from None
    logger.info("soup of %d members saved to %s", len(members), dest)

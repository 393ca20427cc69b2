"""Generating text with an ensemble for a person at a terminal: settings checked before any work,
continuations streamed token by token, and each token marked by how much the members disagreed
about it (the mutual information of their distributions, see :mod:`ensemble.core.uncertainty`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from transformers.generation.streamers import BaseStreamer

from ensemble.core.uncertainty import Uncertainty
from ensemble.errors import EnsembleError, count
from ensemble.files import atomic_write_text
from ensemble.generate.model import EnsembleForCausalLM

# ANSI background colours of the marks on a terminal: low, medium, high disagreement.
_SHADES = ("", "\033[43m\033[30m", "\033[41m\033[97m")
_RESET = "\033[0m"


@dataclass(frozen=True)
class Settings:
    """How to continue each prompt."""

    max_new_tokens: int = 50
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    num_return_sequences: int = 1
    seed: int = 0
    """Prompt i is sampled from a generator seeded with seed + i, so a prompt's continuation does
    not depend on the prompts before it."""
    levels: tuple[float, float] = (0.1, 0.5)
    """Mutual information (nats) from which a token is marked as medium, and high, disagreement."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EnsembleError(f"--max-new-tokens={self.max_new_tokens}; generate at least 1 token")
        if self.temperature <= 0:
            raise EnsembleError(f"--temperature={self.temperature}; use a temperature > 0 (or greedy search)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EnsembleError(f"--top-p={self.top_p}; use a value in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise EnsembleError(f"--top-k={self.top_k}; use a value >= 1")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise EnsembleError("--num-beams and --num-return-sequences must be >= 1")
        if (
            self.num_return_sequences > 1
            and not self.do_sample
            and self.num_return_sequences > self.num_beams
        ):
            raise EnsembleError(
                f"--num-return-sequences={self.num_return_sequences} needs sampling or at least as many beams "
                f"(--num-beams={self.num_beams})"
            )
        if not 0 <= self.levels[0] <= self.levels[1]:
            raise EnsembleError(f"--uncertainty-levels={self.levels}; give two increasing values >= 0")

    @property
    def streamed(self) -> bool:
        """One sequence per prompt: its tokens can be printed as they come."""
        return self.num_beams == 1 and self.num_return_sequences == 1

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p or 1.0)
        return kwargs


@dataclass
class Continuation:
    prompt: str
    text: str
    token_ids: list[int]
    token_texts: list[str]
    uncertainty: list[dict[str, float]] = field(default_factory=list)  # per token, when asked

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "continuation": self.text}
        tokens = [{"id": i, "text": t} for i, t in zip(self.token_ids, self.token_texts, strict=True)]
        for token, u in zip(tokens, self.uncertainty, strict=False):
            token.update(u)
        out["tokens"] = tokens
        return out


def mark(text: str, epistemic: float, levels: tuple[float, float], colour: bool) -> str:
    """A token's text marked by its disagreement: a shade on a terminal, else `[text|0.12]`."""
    if not colour:  # escaped as in Python (a newline token shows as \n), quotes left as they are
        return f"[{repr(text)[1:-1]}|{epistemic:.2f}]"
    level = sum(epistemic >= x for x in levels)
    return f"{_SHADES[level]}{text}{_RESET}" if level else text


def _dim(prompt: str, colour: bool) -> str:
    return f"\033[2m{prompt}{_RESET}" if colour else prompt


def _values(u: Uncertainty, row: int) -> dict[str, float]:
    return {
        "epistemic": float(u.epistemic[row]),
        "total": float(u.total[row]),
        "aleatoric": float(u.aleatoric[row]),
    }


class _Printer(BaseStreamer):
    """Prints the generated tokens of one sequence as they come (the first `put` is the prompt),
    marked with the uncertainty the ensemble recorded for each when ``steps`` is given. Text is
    printed once it decodes whole (a character split over tokens waits for its last byte)."""

    def __init__(
        self, tokenizer: Any, out: IO[str], steps: list[Uncertainty] | None, settings: Settings, colour: bool
    ):
        self.tokenizer, self.out, self.steps = tokenizer, out, steps
        self.settings, self.colour = settings, colour
        self.ids: list[int] = []
        self.pending: list[int] = []  # token ids whose text is not whole yet
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.ids.append(token)
            self.pending.append(token)
            text = self.tokenizer.decode(self.pending)
            if text.endswith("\ufffd"):
                continue
            self.pending = []
            if self.steps is not None:
                u = self.steps[len(self.ids) - 1]
                text = mark(text, float(u.epistemic[0]), self.settings.levels, self.colour)
            self.out.write(text)
            self.out.flush()

    def end(self) -> None:
        if self.pending:
            self.out.write(self.tokenizer.decode(self.pending))
        self.out.write("\n")
        self.out.flush()


def check_lengths(model: EnsembleForCausalLM, prompt_tokens: int, settings: Settings) -> None:
    """Refuse, before any work, a prompt that with its continuation exceeds the members' context."""
    if prompt_tokens == 0:
        raise EnsembleError("an empty prompt; give some text to continue")
    need = prompt_tokens + settings.max_new_tokens
    if need > model.context:
        fix = (
            f"lower --max-new-tokens to {model.context - prompt_tokens} or shorten the prompt"
            if prompt_tokens < model.context
            else f"shorten the prompt to fewer than {model.context} tokens"
        )
        raise EnsembleError(
            f"the prompt is {count(prompt_tokens, 'token')} and --max-new-tokens {settings.max_new_tokens}, "
            f"but the members' context is {count(model.context, 'token')}; {fix}"
        )


def continue_prompts(
    model: EnsembleForCausalLM,
    tokenizer: Any,
    prompts: list[str],
    settings: Settings,
    show_uncertainty: bool = False,
    out: IO[str] | None = None,
    colour: bool | None = None,
) -> list[Continuation]:
    """Continue each prompt, printing as it goes (streamed when one sequence per prompt) to
    ``out`` (standard output), shaded on a terminal (``colour``: whether it is one)."""
    out = out or sys.stdout
    colour = out.isatty() if colour is None else colour
    encoded = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]
    for ids in encoded:
        check_lengths(model, ids.shape[1], settings)  # all prompts before the first is generated
    results = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        ids = ids.to(model.device)
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(settings.seed + i)
            results += _continue(model, tokenizer, prompt, ids, settings, show_uncertainty, out, colour)
    if show_uncertainty:
        _summary(results, out)
    return results


def _continue(model, tokenizer, prompt, ids, settings, show_uncertainty, out, colour) -> list[Continuation]:
    mask = torch.ones_like(ids)
    if settings.streamed:
        out.write(_dim(prompt, colour))
        # Recording computes the decomposition at every step: only when it is shown.
        with model.record_uncertainty() if show_uncertainty else contextlib.nullcontext() as steps:
            printer = _Printer(tokenizer, out, steps, settings, colour)
            sequences = model.generate(
                input_ids=ids, attention_mask=mask, streamer=printer, **settings.generate_kwargs()
            )
        per_sequence = (
            [[_values(steps[t], 0) for t in range(sequences.shape[1] - ids.shape[1])]]
            if show_uncertainty
            else None
        )
    else:
        sequences = model.generate(input_ids=ids, attention_mask=mask, **settings.generate_kwargs())
        per_sequence = _uncertainty_of(model, sequences, ids.shape[1]) if show_uncertainty else None
    results = []
    for row, seq in enumerate(sequences):
        new = seq[ids.shape[1] :].tolist()
        texts = [tokenizer.decode([t]) for t in new]
        c = Continuation(prompt, tokenizer.decode(new, skip_special_tokens=True), new, texts)
        if per_sequence is not None:
            c.uncertainty = per_sequence[row]
        if not settings.streamed:
            body = (
                "".join(
                    mark(t, u["epistemic"], settings.levels, colour)
                    for t, u in zip(texts, c.uncertainty, strict=True)
                )
                if show_uncertainty
                else c.text
            )
            out.write(f"[{row + 1}/{len(sequences)}] {_dim(prompt, colour)}{body}\n")
        results.append(c)
    return results


def _uncertainty_of(
    model: EnsembleForCausalLM, sequences: torch.Tensor, start: int
) -> list[list[dict[str, float]]]:
    """The uncertainty of each generated token of finished sequences (beam search), from one
    forward over them: the distribution at position t - 1 is the one token t was chosen from."""
    with torch.inference_mode():
        u = model(sequences, use_cache=False, output_uncertainty=True).uncertainty
    per_row = [u.map(lambda x, r=r: x[r]) for r in range(len(sequences))]
    return [[_values(v, t - 1) for t in range(start, sequences.shape[1])] for v in per_row]


def _summary(results: list[Continuation], out: IO[str]) -> None:
    values = [(u["epistemic"], c.token_texts[t]) for c in results for t, u in enumerate(c.uncertainty)]
    if not values:
        return
    mean = sum(v for v, _ in values) / len(values)
    top, text = max(values)
    out.write(
        f"epistemic uncertainty (mutual information between the token and the member, nats): mean {mean:.3f}, "
        f"max {top:.3f} at {text!r}\n"
    )


def write_records(path: Path, results: list[Continuation]) -> None:
    """One JSON line per continuation: prompt, text, and per token its id, text and uncertainty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(c.record()) + "\n" for c in results))

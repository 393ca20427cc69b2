"""Evaluating members and their ensemble on one split, in a single streaming pass.

For each batch of blocks every member runs once; its final hidden states are turned into
full-vocabulary log-probabilities (float32) a chunk of positions at a time, scored, and folded
into the ensemble's mixture. Memory is bounded by the batch and ``eval.chunk_tokens``, never by
the size of the test set, and no full-vocabulary logits are copied to the host.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .combining import MeanProb
from .config import DataConfig, EvalConfig
from .data import EvalBlocks, PreparedData, collate_eval, prepare_data
from .errors import EnsembleError
from .members import context_length, load_member
from .metrics import TokenMetrics
from .reporting import format_table, write_results

logger = logging.getLogger(__name__)

PROBE_TEXT = "The quick brown fox: 3.14 + naïve café \u4e2d\u6587\n\tdef f(x): return x"


@dataclass
class LoadedMember:
    path: Path
    name: str
    seed: int | None
    model: torch.nn.Module
    tokenizer: Any


def load_members(paths: list[Path], device: torch.device | str) -> list[LoadedMember]:
    """Load member directories and check that they form an ensemble (one tokenizer, one
    vocabulary); the error names the member that does not fit."""
    if not paths:
        raise EnsembleError("no finished members to evaluate; train some first or pass member directories")
    members = []
    for path in paths:
        model, tokenizer, info = load_member(Path(path), device)
        members.append(
            LoadedMember(Path(path), info.get("name", Path(path).name), info.get("seed"), model, tokenizer)
        )
    ref = members[0]
    ref_vocab = ref.tokenizer.get_vocab()
    ref_probe = ref.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    for m in members[1:]:
        vocab = m.tokenizer.get_vocab()
        if (
            vocab != ref_vocab
            or m.tokenizer.eos_token_id != ref.tokenizer.eos_token_id
            or m.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] != ref_probe
        ):
            raise EnsembleError(
                f"member {m.name} ({m.path}) uses a different tokenizer than {ref.name} "
                f"({len(vocab)} vs {len(ref_vocab)} tokens); ensemble members must share one tokenizer"
            )
        if m.model.config.vocab_size != ref.model.config.vocab_size:
            raise EnsembleError(
                f"member {m.name} ({m.path}) predicts over {m.model.config.vocab_size} tokens but "
                f"{ref.name} over {ref.model.config.vocab_size}; members must share one vocabulary"
            )
    return members


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (ids -> final hidden states) and the output layer of a causal LM.

    Applying the head a chunk of positions at a time is what bounds evaluation memory; it is
    checked once against the model's own logits so that a model with extra work after its head
    (logit scaling, soft-capping) is refused instead of mis-scored.
    """
    body, head = model.base_model, model.get_output_embeddings()
    if head is None or body is model:
        raise EnsembleError(f"{type(model).__name__} is not a causal LM with an output layer")
    probe = torch.arange(8, device=next(model.parameters()).device)[None] % model.config.vocab_size
    mask = torch.ones_like(probe)
    with torch.inference_mode():
        full = model(probe, attention_mask=mask, use_cache=False).logits.float()
        split = head(body(probe, attention_mask=mask, use_cache=False).last_hidden_state).float()
    if not torch.allclose(full, split, rtol=1e-4, atol=1e-4):
        raise EnsembleError(
            f"{type(model).__name__}'s logits are not its output layer applied to its last hidden "
            "state; such members are not supported by the evaluator"
        )
    return body, head


def evaluate_members(
    members: list[LoadedMember],
    blocks: EvalBlocks,
    batch_size: int,
    chunk_tokens: int,
    device: torch.device | str,
    show_progress: bool = True,
) -> tuple[list[TokenMetrics], TokenMetrics]:
    """Metric sums for each member and for the mean-probability ensemble."""
    for m in members:
        ctx = context_length(m.model.config)
        if blocks.block_size > ctx:
            raise EnsembleError(
                f"data.block_size={blocks.block_size} exceeds the context of member {m.name} "
                f"({ctx} tokens); set data.block_size <= {ctx}"
            )
    parts = [_body_and_head(m.model) for m in members]
    per_member = [TokenMetrics() for _ in members]
    ensemble = TokenMetrics()
    loader = DataLoader(blocks, batch_size=batch_size, shuffle=False, collate_fn=collate_eval)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not show_progress):
            ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            mask = batch["target_mask"].to(device)
            targets = ids[:, 1:][mask]
            # [n, hidden] per member: the states of positions that predict a real next token.
            states = [
                body(ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1][mask]
                for body, _ in parts
            ]
            for start in range(0, len(targets), chunk_tokens):
                stop = start + chunk_tokens
                y = targets[start:stop]
                mixture = MeanProb()
                for (_, head), h, metrics in zip(parts, states, per_member, strict=True):
                    logp = torch.log_softmax(head(h[start:stop]).float(), dim=-1)
                    metrics.update(logp, y)
                    mixture.add(logp)
                    del logp
                ensemble.update(mixture.logprobs(), y)
    expected = blocks.num_predictions
    if ensemble.tokens != expected:  # a cheap guard on the protocol itself
        raise RuntimeError(f"scored {ensemble.tokens} positions, expected {expected}")
    return per_member, ensemble


def results_dict(
    members: list[LoadedMember],
    per_member: list[TokenMetrics],
    ensemble: TokenMetrics,
    split: str,
    blocks: EvalBlocks,
    data_info: dict[str, Any],
) -> dict[str, Any]:
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "split": split,
        "data": {
            **data_info,
            "blocks": len(blocks),
            "block_size": blocks.block_size,
            "tokens_evaluated": ensemble.tokens,
        },
        "members": [
            {"name": m.name, "seed": m.seed, "path": str(m.path), **metrics.result()}
            for m, metrics in zip(members, per_member, strict=True)
        ],
        "ensemble": {"combiner": "mean_prob", "members": len(members), **ensemble.result()},
    }


def evaluate(
    member_paths: list[Path],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    split: str,
    out_dir: Path,
    device: torch.device | str,
    prepared: PreparedData | None = None,
) -> dict[str, Any]:
    """Evaluate members and their ensemble on ``split`` of ``data_cfg``; write and print the
    results. ``prepared`` reuses data already tokenized by training."""
    members = load_members(member_paths, device)
    if prepared is None or split not in prepared.streams:
        block_size = data_cfg.block_size or min(context_length(m.model.config) for m in members)
        prepared = prepare_data(data_cfg, members[0].tokenizer, block_size, splits=(split,))
    blocks = prepared.eval_blocks(split)
    per_member, ensemble = evaluate_members(
        members, blocks, eval_cfg.per_device_batch_size, eval_cfg.chunk_tokens, device
    )
    fingerprint = prepared.fingerprint
    results = results_dict(
        members,
        per_member,
        ensemble,
        split,
        blocks,
        {"source": fingerprint["source"], **fingerprint["splits"][split]},
    )
    json_path, _ = write_results(results, out_dir)
    print(format_table(results), flush=True)
    logger.info("results written to %s", json_path)
    return results

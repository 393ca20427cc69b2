"""Members: their specs, how each is built from its seed, and how they are saved and loaded.

Where each file of a run directory lies is :class:`ensemble.core.paths.RunPaths`'s.
A member directory appears under its final name only once complete (see :mod:`ensemble.files`), so any
``member-<i>`` directory with a ``member.json`` is a finished member.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ensemble.config.schema import AdapterConfig, ExperimentConfig, ModelConfig
from ensemble.core.architecture import build_config
from ensemble.core.hub import require_local_or_hub
from ensemble.core.paths import CONFIG, MEMBER_DIR_RE, MEMBER_INFO, RunPaths, check_run_dir
from ensemble.core.provenance import environment, library_versions
from ensemble.errors import EnsembleError, first_line
from ensemble.files import atomic_directory, atomic_write_json, atomic_write_text, read_record
from ensemble.runtime.faults import inject

if TYPE_CHECKING:
    from ensemble.core.adapters import BaseCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: its position in the ensemble and its seed. The distilled student
    is trained like a member: its spec has the role `student` (its name) and index -1."""

    index: int
    seed: int
    role: str = "member"

    @property
    def name(self) -> str:
        return f"member-{self.index}" if self.role == "member" else self.role


def member_specs(cfg: ExperimentConfig) -> list[MemberSpec]:
    return [MemberSpec(index=i, seed=s) for i, s in enumerate(cfg.members.seeds)]


# --------------------------------------------------------------------------------------------
# Building


def load_model_config(cfg: ModelConfig) -> Any:
    """The model's `PretrainedConfig` without weights (cheap; used for early checks). Built from
    scratch, its vocabulary is set later from the tokenizer by :func:`fit_model_config`."""
    from transformers import AutoConfig

    if cfg.model_type:
        return build_config(cfg.model_type, cfg.scratch_fields)
    require_local_or_hub(
        "model",
        "model.name_or_path",
        cfg.name_or_path,
        "save it where the Hub is reachable (AutoModelForCausalLM.from_pretrained(NAME)"
        ".save_pretrained(DIR)) and set model.name_or_path=DIR",
    )
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError) as e:
        raise EnsembleError(
            f"cannot load model '{cfg.name_or_path}' ({first_line(e)}); check model.name_or_path"
        ) from None


def fit_model_config(cfg: ModelConfig, model_config: Any, tokenizer: Any) -> Any:
    """Match the model's vocabulary and special ids to the tokenizer."""
    if not cfg.model_type:
        if len(tokenizer) > model_config.vocab_size:
            raise EnsembleError(
                f"the tokenizer has {len(tokenizer)} tokens but model '{cfg.name_or_path}' only "
                f"{model_config.vocab_size} embeddings; use the model's own tokenizer"
            )
        return model_config
    eos = tokenizer.eos_token_id
    return build_config(
        cfg.model_type,
        cfg.scratch_fields,  # the config's own values win over these defaults
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    cfg: ModelConfig,
    model_config: Any,
    seed: int,
    adapter: AdapterConfig | None = None,
    bases: BaseCache | None = None,
) -> torch.nn.Module:
    """A fresh member: pretrained weights, or a new model whose initialisation draws from a
    generator seeded with the member's seed (and from nothing else); with ``adapter.method``,
    the pretrained model frozen under a new adapter seeded likewise (the model taken from
    ``bases`` when it holds it)."""
    from transformers import AutoModelForCausalLM

    adapted = adapter is not None and adapter.method is not None
    # fork_rng restores the process RNG afterwards, so building one member cannot shift the
    # random stream of the next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not cfg.model_type:

            def load() -> torch.nn.Module:
                return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=model_config)

            model = bases.take(load) if adapted and bases is not None else load()
        else:
            model = AutoModelForCausalLM.from_config(model_config)
    if adapted:
        from ensemble.core.adapters import attach_adapter

        return attach_adapter(model, adapter, seed, cfg.name_or_path)
    return model


# --------------------------------------------------------------------------------------------
# The run directory


def write_manifest(
    paths: RunPaths,
    specs: list[MemberSpec],
    data_fingerprint: dict[str, Any],
    extra: dict[str, Any] | None = None,
    failed: set[str] = frozenset(),
) -> None:
    """Record the run's members and their status: complete (its directory exists), failed (its
    training stopped on an error) or pending."""
    members = []
    for spec in specs:
        if is_complete_member(paths.member(spec)):
            status = "complete"
        else:
            status = "failed" if spec.name in failed else "pending"
        members.append(
            {
                "name": spec.name,
                "index": spec.index,
                "seed": spec.seed,
                "path": str(paths.member(spec).relative_to(paths.root)),
                "status": status,
            }
        )
    atomic_write_json(
        paths.manifest,
        {
            "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": paths.config.name,
            "members": members,
            "data_fingerprint": data_fingerprint,
            "versions": library_versions(),
            "environment": environment(),
            **(extra or {}),
        },
    )


def read_manifest(paths: RunPaths) -> dict[str, Any]:
    return json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else {}


def is_complete_member(path: Path) -> bool:
    return (path / MEMBER_INFO).is_file()


def save_member(
    dest: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    spec: MemberSpec,
    cfg: ExperimentConfig,
    info: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a member in Hugging Face format, atomically (complete or absent, never partial)."""
    try:
        _save_member(dest, model, tokenizer, spec, cfg, info, state_dict)
    except OSError as e:
        raise EnsembleError(
            f"could not write {spec.name} to {dest} ({e.strerror or e}); nothing partial was kept: free "
            "disk space or fix the permissions, then rerun with --resume auto (it resumes from its last "
            "checkpoint)"
        ) from None


def _save_member(dest, model, tokenizer, spec, cfg, info, state_dict) -> None:
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if not any(tmp.glob("*.safetensors")) or not has_weights(tmp):
            # e.g. a sharded (ZeRO-3) model saved without gathering its weights
            raise EnsembleError(f"saving {spec.name} wrote no weights; it was not saved")
        inject("kill-save", spec.index, 0)  # tests: SIGKILL with the weights half-way to disk
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / CONFIG, cfg.to_yaml())
        # member.json last: its presence marks the directory as a finished member. It records the
        # weights' checksums, so that the evaluator can tell a corrupted file from a trained one.
        atomic_write_json(
            tmp / MEMBER_INFO,
            {
                "name": spec.name,
                "index": spec.index,
                "seed": spec.seed,
                **info,
                "weights_sha256": weight_digests(tmp),
            },
        )


def weight_digests(member_dir: Path) -> dict[str, str]:
    """sha256 of each weight file of a member directory."""
    digests = {}
    for file in sorted(Path(member_dir).glob("*.safetensors")):
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        digests[file.name] = h.hexdigest()
    return digests


def verify_weights(member_dir: Path, info: dict[str, Any]) -> None:
    """Refuse, naming the member, a directory whose weights are missing, or differ from the
    checksums recorded when it was saved (truncated, corrupted or replaced)."""
    name = info.get("name", Path(member_dir).name)
    files = sorted(Path(member_dir).glob("*.safetensors"))
    if not files:
        raise EnsembleError(
            f"member {name} ({member_dir}) has no weights (no *.safetensors); re-train it or remove it "
            "from the ensemble"
        )
    recorded = info.get("weights_sha256")
    if recorded is None:
        return  # saved elsewhere: only loading can tell
    actual = weight_digests(member_dir)
    for file, digest in recorded.items():
        if actual.get(file) != digest:
            state = "is missing" if file not in actual else "does not match the checksum saved with it"
            raise EnsembleError(
                f"member {name} ({member_dir}): {file} {state} (truncated, corrupted or replaced); "
                "re-train the member (--resume auto continues from its checkpoints) or restore the file"
            )


def has_weights(member_dir: Path) -> bool:
    """Whether a member directory's safetensors hold at least one non-empty tensor."""
    from safetensors import safe_open

    for file in Path(member_dir).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            if any(math.prod(f.get_slice(k).get_shape()) > 0 for k in f.keys()):
                return True
    return False


def find_members(run_dir: Path) -> list[Path]:
    """Finished member directories of a run, in member order."""
    members_dir = Path(run_dir) / "members"
    found = []
    if members_dir.is_dir():
        for entry in members_dir.iterdir():
            m = MEMBER_DIR_RE.match(entry.name)
            if m and is_complete_member(entry):
                found.append((int(m.group(1)), entry))
    return [p for _, p in sorted(found)]


def member_dirs(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The member directories an ensemble is made of: a run directory's finished members, or
    the given member directories; refused, with the fix, when there are none or one is missing."""
    if isinstance(source, (str, Path)):
        run = check_run_dir(source)
        if is_complete_member(run):
            logger.warning("%s is one member directory: an ensemble of one member", run)
            return [run]
        paths = find_members(run)
        if not paths:
            raise EnsembleError(
                f"{run} holds no finished members (members/member-<i>/member.json); train them first "
                "(--resume auto finishes an interrupted run)"
            )
        _warn_unfinished(run, paths)
        return paths
    paths = [Path(p) for p in source]
    if not paths:
        raise EnsembleError("no member directories given; pass a run directory or member directories")
    for p in paths:
        if not p.is_dir():
            raise EnsembleError(f"member directory {p} not found; fix the path")
    return paths


def _warn_unfinished(run: Path, finished: list[Path]) -> None:
    """Say so when the run's manifest lists members that are not finished (still training,
    failed or interrupted): the ensemble is then made of the finished ones only."""
    paths = RunPaths(run)
    listed = read_manifest(paths).get("members", [])
    missing = [m["name"] for m in listed if not is_complete_member(run / m["path"])]
    if missing:
        logger.warning(
            "%s: %d of %d members are finished; using %s, without %s (not finished: finish them with "
            "launch/train.py --config %s --resume auto)",
            run,
            len(finished),
            len(listed),
            ", ".join(p.name for p in finished),
            ", ".join(missing),
            paths.config,
        )


def read_member_info(path: Path) -> dict[str, Any]:
    return read_record(
        path,
        MEMBER_INFO,
        f"{path} is not a finished member (no {MEMBER_INFO}); point at a member directory written by "
        "launch/train.py",
    )


def load_member(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, member info) from a member directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_member_info(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EnsembleError(f"cannot load member {path} ({first_line(e)}); re-train or remove it") from None
    return model.to(device).eval(), tokenizer, info

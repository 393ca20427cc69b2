"""Distillation: one student trained to match the ensemble, a run stage after the members.

The student trains like a member (:mod:`ensemble.runtime.trainer`: seeded, checkpointed, resumable, preemptible,
tracked, saved in Hugging Face format) with another loss:

    alpha * T^2 * KL(ensemble_T || student_T) + (1 - alpha) * cross-entropy,

where ``ensemble_T`` is the mixture (the mean probability, the evaluator's headline ensemble) of
the members' softmaxes at temperature T. The teacher is computed on the fly for every batch by
the members in inference mode, never stored, and sharded over the processes as the evaluator is
(`distill.mode`): every process holds every member (`data`), or one member each (`member`),
the members' probabilities then being summed across the processes that hold them.
:func:`distill_run` lists the stage's steps.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ensemble.config.schema import AdapterConfig, ConfigError, ExperimentConfig
from ensemble.core.architecture import context_length, resolve_block_size
from ensemble.core.combining import MeanProb
from ensemble.core.data import PreparedData, prepare_data
from ensemble.core.heads import ChunkedHead, hidden_states_of
from ensemble.core.loading import LoadedMember, check_same_vocabulary, load_members
from ensemble.core.members import (
    MemberSpec,
    fit_model_config,
    is_complete_member,
    load_model_config,
    member_specs,
    read_member_info,
)
from ensemble.core.paths import STUDENT, RunPaths, run_config
from ensemble.errors import EnsembleError, Preempted
from ensemble.files import remove_stale_tmp
from ensemble.runtime.checkpointing import (
    MemberCheckpoints,
    StopRequest,
    check_processes,
    check_training_data,
    checkpoints_root,
    config_differences,
    read_checkpoint_info,
    trajectory_config,
)
from ensemble.runtime.compute import resolve_compile, resolve_eval_precision
from ensemble.runtime.distributed import Worlds, local_device
from ensemble.runtime.handoff import AfterTraining, Trained
from ensemble.runtime.launch_env import launch_info
from ensemble.runtime.sharding import Collectives, Sharding
from ensemble.runtime.throughput import flops_per_token
from ensemble.runtime.trainer import MemberJob, train_member
from ensemble.runtime.zero import check_batch, deepspeed_setup

logger = logging.getLogger(__name__)

STUDENT_INDEX = -1  # the student's index in checkpoints and ENSEMBLE_FAULT (members count from 0)


# --------------------------------------------------------------------------------------------
# The loss


def distillation_loss(
    logits: torch.Tensor, teacher_logp: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha * T^2 * mean_t KL(teacher_t || softmax(logits_t / T)) + (1 - alpha) * mean_t CE.

    ``logits`` [n, vocab] of the student, ``teacher_logp`` [n, vocab] the teacher's
    log-probabilities at temperature T, ``targets`` [n]. In float32 whatever the logits' dtype.
    Where the teacher gives a token probability 0 its term is 0 (not 0 x inf)."""
    logits = logits.float()
    loss = logits.new_zeros(())
    if alpha > 0:
        log_q = torch.log_softmax(logits / temperature, dim=-1)
        p = teacher_logp.exp()
        kl = torch.where(p > 0, p * (teacher_logp - log_q), 0.0).sum(-1).mean()
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * torch.nn.functional.cross_entropy(logits, targets)
    return loss


# --------------------------------------------------------------------------------------------
# The teacher


class Teacher:
    """The members' mixture at temperature T for batches of token blocks, in inference mode.

    Each member's body runs once per batch and its output layer ``chunk_tokens`` positions at a
    time, the mixture accumulated as the evaluator does (:class:`combining.MeanProb`), so the
    teacher at T = 1 is the evaluator's ensemble. In member mode each process runs its member on
    the batches of every process of its column (the processes holding the other members, see
    `runtime.sharding.Sharding`), and the members' probabilities for each batch are summed onto the
    process that trains on it."""

    def __init__(
        self,
        members: list[LoadedMember],
        sharding: Sharding,
        temperature: float,
        device: torch.device,
        precision: str,
        chunk_tokens: int,
    ):
        self.n, self.sharding, self.temperature = len(members), sharding, temperature
        self.device = device
        self.collectives = Collectives(sharding)
        self.parts = {
            i: ChunkedHead.of(members[i].model, chunk_tokens, precision, device)
            for i in sorted(sharding.members_held)
        }

    def _member_logprobs(self, ids: torch.Tensor) -> dict[int, list[torch.Tensor]]:
        """Each held member's log-probabilities at temperature T [chunk, vocab] for each chunk of
        the positions of ``ids`` [batch, block] that predict a next token, in (block, position)
        order (adapter members of one base in one forward pass)."""
        out = {}
        for i, hidden in hidden_states_of(self.parts, ids, torch.ones_like(ids)).items():
            part = self.parts[i]
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            out[i] = [
                torch.log_softmax(part.logits(hidden[span]).float() / self.temperature, dim=-1)
                for span in part.spans(len(hidden))
            ]
        return out

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """The mixture's log-probabilities [batch x (block - 1), vocab] (float32) for every
        position of ``ids`` that predicts a next token."""
        ids = ids.to(self.device)
        if self.sharding.mode == "member" and self.collectives.active:
            return self._member_sharded(ids)
        by_member = self._member_logprobs(ids)
        chunks = [by_member[i] for i in range(self.n)]
        out = []
        for c in range(len(chunks[0])):
            mixture = MeanProb()
            for member in chunks:
                mixture.add(member[c])
            out.append(mixture.result())
        return torch.cat(out)

    def _member_sharded(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        group, column = self.collectives.column_group, self.sharding.column_ranks(self.sharding.column)
        batches = [torch.empty_like(ids) for _ in column]
        dist.all_gather(batches, ids.contiguous(), group=group)  # the column's batches, in rank order
        (i,) = self.parts
        mine = None
        for owner, batch in zip(column, batches, strict=True):
            p = torch.cat(self._member_logprobs(batch)[i]).exp_().div_(self.n)
            dist.reduce(p, dst=owner, group=group)  # the sum over members lands on the batch's process
            if owner == dist.get_rank():
                mine = p
        return mine.log_()


class DistillObjective:
    """The student's loss of a batch of blocks (what the trainer calls instead of the LM loss)."""

    def __init__(self, teacher: Teacher, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        teacher_logp = self.teacher.logprobs(batch)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        return distillation_loss(
            logits.reshape(-1, logits.shape[-1]),
            teacher_logp,
            batch[:, 1:].reshape(-1),
            self.alpha,
            self.temperature,
        )


# --------------------------------------------------------------------------------------------
# The stage


def distill_run(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    resume: str | None = None,
    overwrite: bool = False,
    then: AfterTraining | None = None,
) -> dict[str, Any] | None:
    """Distil the finished members of ``run_dir`` into a student and evaluate it with them.
    ``overrides``: config overrides on top of the run's config.yaml (`distill.*`, and `train.*`
    for a budget other than the members'); ``resume``: "auto" continues an interrupted
    distillation from its latest checkpoint; ``then``: the evaluation of the student with the
    members, in the same processes (see :mod:`ensemble.runtime.handoff`). Returns its results,
    or None when not evaluated."""
    paths = RunPaths(Path(run_dir))
    cfg = run_config(paths, overrides)
    zero = deepspeed_setup(cfg)
    worlds = Worlds(cfg.parallel.timeout_s)
    try:
        launch = launch_info()
        worlds.join("distill", launch.rank, launch.world_size)
        setup = check_distill(cfg, paths, resume, overwrite)
        if zero:
            check_batch(zero, cfg, launch.world_size)
        device = local_device()
        sharding = Sharding(cfg.distill.mode, launch.rank, launch.world_size, len(setup.members))
        with worlds.main_first("load-teachers"):  # (a cache of remote code or weights, if any)
            teachers = load_members(setup.members, device, hold=sharding.members_held)
        student_cfg, model_config, tokenizer = student_model(cfg, teachers)
        data = _training_data(cfg, setup, worlds, tokenizer)
        _check_context(model_config, data.block_size)
        if launch.rank == 0:
            _prepare_output(setup, overwrite)
        worlds.wait_all("output")
        start = _resume_point(setup, student_cfg, launch.world_size, resume, data)
        teacher = _teacher(cfg, teachers, sharding, device)
        job = MemberJob(
            student_cfg,
            setup.spec,
            data,
            tokenizer,
            model_config,
            paths,
            flops_per_token=flops_per_token(model_config, data.block_size),
            compile_model=resolve_compile(cfg.train.compile, device, "train.compile"),
            zero=zero,
            run_id=_run_id(paths),
            resume_from=start,
            objective=DistillObjective(teacher, cfg.distill.alpha, cfg.distill.temperature),
            destination=setup.student,
            record=setup.record,
        )
        _distil(job, setup, worlds, device)
        del teacher, teachers
        results = None
        if then is not None:
            results = then(Trained(cfg, setup.members, data, worlds.main_first, student=setup.student))
        worlds.wait_all("finished")
        return results
    finally:
        worlds.close()


@dataclass(frozen=True)
class DistillSetup:
    """What the checks decided: the teachers, where the student goes, where it starts."""

    cfg: ExperimentConfig
    members: list[Path]
    spec: MemberSpec
    student: Path
    checkpoints: MemberCheckpoints
    record: dict[str, Any]  # what the student's checkpoints and member.json record
    complete: bool  # the student exists and is resumed (nothing to train)


def check_distill(
    cfg: ExperimentConfig, paths: RunPaths, resume: str | None, overwrite: bool
) -> DistillSetup:
    """Cheap checks before any model is loaded: every member finished, the student's directory
    and checkpoints free (or resumed, or to be replaced)."""
    if resume and overwrite:
        raise EnsembleError(
            "--resume continues the distillation but --overwrite would start it over; drop one"
        )
    if resume not in (None, "auto"):
        raise EnsembleError(f"--resume {resume}: distillation resumes with --resume auto only")
    members = []
    for spec in member_specs(cfg):
        path = paths.member(spec)
        if not is_complete_member(path):
            raise EnsembleError(
                f"{spec.name} of {paths.root} is not finished ({path} has no member.json); finish "
                f"training first (launch/train.py --config {paths.config} --resume auto), then distil"
            )
        members.append(path)
    student = Path(cfg.distill.dir) if cfg.distill.dir else paths.student
    spec = MemberSpec(index=STUDENT_INDEX, seed=cfg.distill.seed, role=STUDENT)
    checkpoints = MemberCheckpoints(checkpoints_root(cfg), STUDENT)
    if not overwrite and not resume:
        if is_complete_member(student):
            raise EnsembleError(
                f"{student} already holds a distilled student; pass --overwrite to replace it, or "
                "set distill.dir to keep both"
            )
        if checkpoints.latest() is not None:
            raise EnsembleError(
                f"{checkpoints.dir} holds checkpoints of an interrupted distillation; pass --resume auto "
                "to continue it, or --overwrite to start over"
            )
    teachers = {
        str(p.relative_to(paths.root)): read_member_info(p).get("weights_sha256", {}) for p in members
    }
    record = {
        "role": STUDENT,
        "distill": {"alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature},
        "teachers": teachers,
    }
    complete = bool(resume) and is_complete_member(student)
    return DistillSetup(cfg, members, spec, student, checkpoints, record, complete)


def _teacher(
    cfg: ExperimentConfig, teachers: list[LoadedMember], sharding: Sharding, device: torch.device
) -> Teacher:
    precision = resolve_eval_precision(cfg.eval.precision, device)
    return Teacher(teachers, sharding, cfg.distill.temperature, device, precision, cfg.eval.chunk_tokens)


def _distil(job: MemberJob, setup: DistillSetup, worlds: Worlds, device: torch.device) -> None:
    """Train the student (unless it is complete); a stop agreed by every rank ends the run here."""
    if setup.complete:
        logger.info("%s is complete: %s (pass --overwrite to distil again)", STUDENT, setup.student)
        return
    with StopRequest(publish=worlds.publish_stop, seen=worlds.stop_published) as stop:
        train_member(job, stop)
        worlds.wait_all("distilled", stop=stop)
        if stop.agreed(device):
            raise Preempted(f"stopped by {stop.reason()} after distillation; the evaluation did not run")


def student_model(cfg: ExperimentConfig, teachers: list[LoadedMember]) -> tuple[ExperimentConfig, Any, Any]:
    """(the config the student is trained with, its transformers config, its tokenizer): the
    members' model, resized by `distill.config`, or the pretrained `distill.name_or_path`, which
    must use the members' tokenizer and vocabulary."""
    d, model = cfg.distill, cfg.model
    ref = teachers[0]
    tokenizer = ref.tokenizer
    own = None  # the pretrained student's own tokenizer (None: saved without one, or built here)
    if d.name_or_path:
        student = dataclasses.replace(
            model, name_or_path=d.name_or_path, architecture=None, config={}, gpt2_config={}, tokenizer=None
        )
        from transformers import AutoTokenizer

        local = Path(d.name_or_path)
        if not local.is_dir() or any(
            (local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            try:
                own = AutoTokenizer.from_pretrained(d.name_or_path)
            except (OSError, ValueError):
                pass
    elif d.config:
        if not model.model_type:
            raise EnsembleError(
                f"distill.config resizes a student built from scratch, but the members were fine-tuned "
                f"from {model.name_or_path}; give a smaller pretrained student with distill.name_or_path"
            )
        fields = {**model.scratch_fields, **d.config}
        student = dataclasses.replace(model, architecture=model.model_type, config=fields, gpt2_config={})
        try:
            student.validate()
        except ConfigError as e:
            raise ConfigError(str(e).replace("model.config.", "distill.config.")) from None
    else:
        student = model
    model_config = fit_model_config(student, load_model_config(student), tokenizer)
    check_same_vocabulary(
        ref,
        f"the student distill.name_or_path={d.name_or_path}" if d.name_or_path else "the student",
        model_config.vocab_size,
        own,
        fix="the student must share the members' tokenizer and vocabulary",
        against="the members",
    )
    # the student is one full model, also when the members are adapters on a shared base
    return dataclasses.replace(cfg, model=student, adapter=AdapterConfig()), model_config, tokenizer


def _training_data(
    cfg: ExperimentConfig, setup: DistillSetup, worlds: Worlds, tokenizer: Any
) -> PreparedData:
    """The run's training split (and the evaluation splits), tokenized as the members saw it."""
    recorded = read_member_info(setup.members[0]).get("data_fingerprint", {})
    block_size = recorded.get("block_size") or cfg.data.block_size
    if block_size is None:
        block_size = resolve_block_size(cfg, load_model_config(cfg.model))
    with worlds.main_first("distill-data"):
        data = prepare_data(cfg.data, tokenizer, block_size)
    sha = recorded.get("splits", {}).get("train", {}).get("sha256")
    if sha:
        check_training_data(
            setup.members[0], {"train_sha256": sha}, data.fingerprint["splits"]["train"]["sha256"]
        )
    return data


def _check_context(model_config: Any, block_size: int) -> None:
    ctx = context_length(model_config)
    if block_size > ctx:
        raise EnsembleError(
            f"the student's context is {ctx} tokens but the members were trained on blocks of {block_size}; "
            f"give the student a context of at least {block_size} (distill.config)"
        )


def _prepare_output(setup: DistillSetup, overwrite: bool) -> None:
    """Rank 0: remove what an overwrite replaces and what interrupted saves left behind."""
    if overwrite:
        shutil.rmtree(setup.student, ignore_errors=True)
        shutil.rmtree(setup.checkpoints.dir, ignore_errors=True)
    setup.student.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(setup.student.parent, [setup.student.name])
    remove_stale_tmp(setup.checkpoints.dir)


def student_trajectory(cfg: ExperimentConfig, seed: int, record: dict[str, Any]) -> dict[str, Any]:
    """What decides the student: its model, data and training (as for a member), the loss's
    alpha and temperature, and its teachers' weights."""
    flat = trajectory_config(cfg, seed)
    flat.update({f"distill.{k}": v for k, v in record["distill"].items()})
    flat["distill.teachers"] = record["teachers"]
    return flat


def _resume_point(
    setup: DistillSetup, student_cfg: ExperimentConfig, processes: int, resume: str | None, data: PreparedData
) -> Path | None:
    """The checkpoint the student continues from (``--resume auto``), checked to be this
    distillation's: same teachers, loss, model, data, training and number of processes."""
    if not resume or setup.complete:
        return None
    start = setup.checkpoints.latest()
    if start is None:
        logger.info("no checkpoint of the student in %s: distilling from the start", setup.checkpoints.dir)
        return None
    info = read_checkpoint_info(start)
    saved = {**info.get("config", {}), **{f"distill.{k}": v for k, v in info.get("distill", {}).items()}}
    saved["distill.teachers"] = info.get("teachers")
    changed = config_differences(saved, student_trajectory(student_cfg, setup.spec.seed, setup.record))
    if changed:
        raise EnsembleError(
            f"checkpoint {start} was written by another distillation ({changed}); resume with the same "
            "members, config and overrides, or pass --overwrite to start over"
        )
    check_processes(start, info, STUDENT, processes)
    check_training_data(start, info, data.fingerprint["splits"]["train"]["sha256"])
    logger.info("the student resumes from %s", start)
    return start


def _run_id(paths: RunPaths) -> str | None:
    return paths.run_id.read_text().strip() if paths.run_id.is_file() else None

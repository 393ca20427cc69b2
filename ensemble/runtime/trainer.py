"""One member's training: an Accelerate loop over its `MemberJob`, resumable at any optimizer step.

The trainer knows nothing of placement: it trains the member it is given on the processes of the
current world (its group), from scratch or from a checkpoint, and saves it in Hugging Face format.
Which members a process trains, and on which ranks, is the run's business (:mod:`ensemble.train.run`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from ensemble.config.schema import ExperimentConfig
from ensemble.core.adapters import BaseCache
from ensemble.core.data import PreparedData
from ensemble.core.members import MemberSpec, build_model, save_member
from ensemble.core.paths import RunPaths
from ensemble.errors import EnsembleError, Preempted
from ensemble.runtime.checkpointing import (
    MemberCheckpoints,
    Progress,
    StopRequest,
    any_rank,
    checkpoints_root,
    trajectory_config,
)
from ensemble.runtime.compute import deterministic, resolve_mixed_precision, tf32
from ensemble.runtime.distributed import accelerator_kwargs, reset_accelerate_state
from ensemble.runtime.faults import armed, inject
from ensemble.runtime.launch_env import launch_info
from ensemble.runtime.progress import progress
from ensemble.runtime.throughput import mfu, peak_tflops
from ensemble.runtime.tracking import flat_config, make_trackers
from ensemble.runtime.zero import ZeroSetup, make_plugin

logger = logging.getLogger(__name__)


class Objective(Protocol):
    """The training loss of one batch of token blocks [batch, block] (distillation's, or the
    default cross-entropy)."""

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MemberJob:
    """Everything one member's training needs, decided by the run before any member starts."""

    cfg: ExperimentConfig
    spec: MemberSpec
    data: PreparedData
    tokenizer: Any
    model_config: Any  # the transformers config the member is built from
    paths: RunPaths
    flops_per_token: float  # of the whole model, computed before any DeepSpeed plugin shards it
    compile_model: bool  # the `train.compile` decision of compute.resolve_compile
    zero: ZeroSetup | None = None
    run_id: str | None = None  # trackers resume by it
    resume_from: Path | None = None  # the checkpoint to continue from; None: from scratch
    objective: Objective | None = None  # the loss of a batch; None: the causal LM's cross-entropy
    destination: Path | None = None  # where the finished model is saved; None: the member's directory
    record: dict[str, Any] = field(default_factory=dict)  # more for every checkpoint's record
    bases: BaseCache | None = None  # adapter members: the base, loaded once per process

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def save_to(self) -> Path:
        return self.destination or self.paths.member(self.spec)

    def checkpoint_record(self, processes: int, total_steps: int) -> dict[str, Any]:
        """What every checkpoint of this member records, for the resume checks."""
        return {
            "member": self.spec.name,
            "index": self.spec.index,
            "seed": self.spec.seed,
            "processes": processes,
            "zero_stage": self.zero.stage if self.zero else None,
            "total_steps": total_steps,
            "config": trajectory_config(self.cfg, self.spec.seed),
            "train_sha256": self.data.fingerprint["splits"]["train"]["sha256"],
            **self.record,
        }


@dataclass(frozen=True)
class Throughput:
    """What MFU is computed from, and whether the member was compiled (for its summary)."""

    flops_per_token: float
    peak_tflops: float | None
    compiled: bool

    def mfu(self, tokens_per_s: float, devices: int) -> float | None:
        return mfu(self.flops_per_token, tokens_per_s, self.peak_tflops, devices)


class MemberDiverged(EnsembleError):
    """A member's training loss became non-finite: that member stops, the others go on."""

    def __init__(self, message: str, info: dict[str, Any]):
        super().__init__(message)
        self.info = info


def train_member(job: MemberJob, stop: StopRequest | None = None) -> dict[str, Any]:
    """Train one member on the processes of the current world and save it, checkpointing on
    the way. Returns its training summary.

    Raises :class:`Preempted` after checkpointing when ``stop`` is requested, and
    :class:`MemberDiverged` when the loss becomes non-finite."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    t = job.cfg.train
    mixed_precision = resolve_mixed_precision(t.mixed_precision)
    reset_accelerate_state()  # one Accelerator (and DeepSpeed plugin) per member
    # Built before the Accelerator: once a ZeRO-3 plugin is registered, transformers would build
    # under zero.Init, which initialises differently, and the member would no longer equal its
    # single-process twin. Every rank builds the same full model from the seed; DeepSpeed shards it.
    model = build_model(job.cfg.model, job.model_config, job.spec.seed, job.cfg.adapter, job.bases)
    accelerator = Accelerator(
        **accelerator_kwargs(deepspeed=job.zero is not None, timeout_s=job.cfg.parallel.timeout_s),
        deepspeed_plugin=make_plugin(job.zero, job.cfg) if job.zero else None,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=make_trackers(job.cfg, job.name, job.paths.logs, job.run_id) or None,
        # The sampler's order depends on the member's seed and the epoch only, so it is the
        # same on every rank and after a restart. Batches are copied to the GPU without waiting
        # (from pinned memory, see the loader).
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=job.spec.seed, non_blocking=True
        ),
        step_scheduler_with_optimizer=False,
    )
    try:
        # Compiled CPU code is deterministic only in torch's deterministic mode (see compute).
        with tf32(t.tf32), deterministic(job.compile_model and accelerator.device.type == "cpu"):
            return _train_prepared(job, accelerator, model, mixed_precision, stop)
    finally:
        # Not accelerator.end_training(): it also destroys the process group, which the next
        # member and the evaluation still need. train_run tears the worlds down at the end.
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.free_memory()
        reset_accelerate_state()
        if job.bases is not None:
            job.bases.give_back(model)


def _cpus_available() -> int:
    """CPUs this process may use: its Slurm allocation's, where it has one (with no CPU binding
    the affinity mask would still show the whole machine), else its affinity mask."""
    allocated = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    if allocated and allocated.isdigit():
        return int(allocated)
    return len(os.sched_getaffinity(0))


def _warn_single_thread(accelerator: Any) -> None:
    cpus = _cpus_available()
    if (
        accelerator.device.type == "cpu"
        and torch.get_num_threads() == 1
        and cpus > launch_info().local_world_size
    ):
        logger.warning(
            "training on CPU with 1 thread while %d cores are available; `accelerate launch` sets "
            "OMP_NUM_THREADS=1 unless its config has use_cpu: true (see configs/accelerate/cpu.yaml) "
            "or --num_cpu_threads_per_process is given",
            cpus,
        )


def _optimizer(model: torch.nn.Module, cfg: ExperimentConfig, fused: bool) -> torch.optim.Optimizer:
    # Decay weight matrices only; biases and LayerNorm gains stay undecayed (as in GPT-2/nanoGPT).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        fused=fused or None,  # one kernel for all parameters (CUDA); None: torch's default (foreach)
    )


def _compile_in_place(accelerator: Any, model: Any) -> None:
    """torch.compile the member where it sits. In place (`nn.Module.compile`), not through
    Accelerate's dynamo plugin: its `OptimizedModule` wrapper prefixes every state-dict key with
    `_orig_mod.`, so checkpoints written with compile could not be resumed without it (and saved
    members would need unwrapping). Under DeepSpeed the engine compiles its module itself, the
    same way."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.compile(backend="inductor", compile_kwargs={})
    else:
        accelerator.unwrap_model(model).compile()


def _warn_warmup(name: str, t: Any, total_steps: int) -> None:
    if t.warmup_steps >= total_steps:
        logger.warning(
            "%s: train.warmup_steps=%d >= the %d optimizer steps of this run: the learning rate "
            "never reaches train.lr=%g",
            name,
            t.warmup_steps,
            total_steps,
            t.lr,
        )


def _announce(
    job: MemberJob,
    accelerator: Any,
    blocks: int,
    total_steps: int,
    peak_with_source: tuple[float | None, str],
    mixed_precision: str,
) -> list[int]:
    """Log where the member trains and on what; returns the ranks of its group (a collective)."""
    t, spec = job.cfg.train, job.spec
    peak, peak_source = peak_with_source
    ranks = accelerator.gather(torch.tensor([launch_info().rank], device=accelerator.device)).tolist()
    logger.info(
        "%s (seed %d) on rank(s) %s%s: %d blocks of %d tokens, %d optimizer steps; %.3g FLOPs/token, "
        "peak %s TFLOP/s per device (%s); torch.compile %s (train.compile=%s), precision %s",
        spec.name,
        spec.seed,
        ranks,
        f" with ZeRO-{job.zero.stage}" if job.zero else "",
        blocks,
        job.data.block_size,
        total_steps,
        job.flops_per_token,
        f"{peak:.3g}" if peak else "?",
        peak_source,
        "on" if job.compile_model else "off",
        t.compile,
        mixed_precision if mixed_precision != "no" else "float32",
    )
    return ranks


def _train_prepared(
    job: MemberJob, accelerator: Any, model: torch.nn.Module, mixed_precision: str, stop: StopRequest | None
) -> dict[str, Any]:
    from transformers import get_scheduler

    t, spec = job.cfg.train, job.spec
    _warn_single_thread(accelerator)
    peak, peak_source = peak_tflops(accelerator.device, mixed_precision, t.peak_tflops)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    checkpoints = MemberCheckpoints(checkpoints_root(job.cfg), spec.name)
    # Dropout draws from the process RNG: seed it from the member (and rank, so data-parallel
    # replicas drop different units) and restore it afterwards, so members do not share a stream.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed + accelerator.process_index)
        # The loader draws a base seed at every epoch start: from a generator of its own, not from
        # the process RNG that drives dropout, so that resuming mid-epoch cannot shift dropout.
        cuda = accelerator.device.type == "cuda"
        loader = DataLoader(
            job.data.train_blocks(),
            batch_size=t.per_device_batch_size,
            shuffle=True,
            generator=torch.Generator(),
            pin_memory=cuda,
        )
        model, optimizer, loader = accelerator.prepare(model, _optimizer(model, job.cfg, fused=cuda), loader)
        if job.compile_model:
            _compile_in_place(accelerator, model)
        steps_per_epoch = math.ceil(len(loader) / t.gradient_accumulation_steps)
        total_steps = t.max_steps or steps_per_epoch * t.num_epochs
        _warn_warmup(spec.name, t, total_steps)
        # prepare_scheduler, not prepare: under DeepSpeed, prepare() of a lone scheduler returns it
        # unregistered, and save_state would then leave it out of the checkpoints.
        scheduler = accelerator.prepare_scheduler(
            get_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, total_steps)
        )
        progress = Progress()
        accelerator.register_for_checkpointing(progress)
        if job.resume_from is not None:  # checked by the run (plan_resume, check_training_data)
            # Model, optimizer, scheduler, every rank's RNG states, the accumulation counter and
            # our progress (step, data position, logging window).
            accelerator.load_state(str(job.resume_from))
            resumed = {"checkpoint": str(job.resume_from), "step": progress.step}
            logger.info(
                "%s resumes from %s (step %d of %d)", spec.name, job.resume_from, progress.step, total_steps
            )
        accelerator.init_trackers(
            job.cfg.tracking.project, config={"member.seed": spec.seed, **flat_config(job.cfg)}
        )
        ranks = _announce(
            job, accelerator, len(loader.dataset), total_steps, (peak, peak_source), mixed_precision
        )
        loop = _Loop(job, accelerator, model, optimizer, loader, scheduler, progress, checkpoints)
        summary = loop.run(
            total_steps, steps_per_epoch, Throughput(job.flops_per_token, peak, job.compile_model), stop
        )
    summary.update(ranks=ranks, zero_stage=job.zero.stage if job.zero else None, peak_source=peak_source)
    if job.resume_from is not None:
        summary["resumed_from"] = resumed
    _save(job, accelerator, model, summary)
    return summary


def _save(job: MemberJob, accelerator: Any, model: Any, summary: dict[str, Any]) -> None:
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        info = {"training": summary, "data_fingerprint": job.data.fingerprint, **job.record}
        destination = job.save_to
        save_member(
            destination, accelerator.unwrap_model(model), job.tokenizer, job.spec, job.cfg, info, state_dict
        )
        logger.info("%s saved to %s", job.name, destination)
    accelerator.wait_for_everyone()


class _Loop:
    """One member's optimisation loop, resumable at any optimizer step from its `Progress`."""

    def __init__(self, job, accelerator, model, optimizer, loader, scheduler, progress, checkpoints):
        self.job, self.cfg, self.spec = job, job.cfg, job.spec
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.loader, self.scheduler = loader, scheduler
        self.p: Progress = progress
        self.checkpoints: MemberCheckpoints = checkpoints
        self.window_loss = torch.tensor(progress.window_loss, device=accelerator.device)
        self.started = time.perf_counter()
        self.window_start = time.perf_counter()
        self.record: dict[str, Any] = {}  # what each checkpoint records (set by run)

    def seconds(self) -> float:
        return self.p.seconds + (time.perf_counter() - self.started)

    def run(
        self, total_steps: int, steps_per_epoch: int, throughput: Throughput, stop: StopRequest | None
    ) -> dict[str, Any]:
        from accelerate import skip_first_batches

        acc, p, spec = self.accelerator, self.p, self.spec
        self.record = self.job.checkpoint_record(acc.num_processes, total_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
        saved_step = p.step if self.job.resume_from is not None else None  # that state is on disk
        self.window_start = time.perf_counter()
        first_step_s: float | None = None
        self.model.train()
        # A context manager, so the bar is closed (not redrawn later) when an error ends training.
        with progress(
            total=total_steps,
            initial=p.step,
            desc=f"{spec.name} (seed {spec.seed})",
            unit="step",
            disable=not acc.is_main_process,  # one bar per member, from its group's first rank
        ) as bar:
            while p.step < total_steps and p.epoch < epochs:
                # The epoch sets the sampler's order (seed + epoch); a resumed epoch skips what it
                # had already trained on.
                self.loader.set_epoch(p.epoch)
                batches = (
                    skip_first_batches(self.loader, p.batch_in_epoch) if p.batch_in_epoch else self.loader
                )
                for batch in batches:
                    if not self._micro_step(batch):
                        continue  # accumulating: no optimizer step yet
                    bar.update(1)
                    if first_step_s is None:  # compilation happens in this process's first step
                        first_step_s = time.perf_counter() - self.window_start
                        if throughput.compiled:
                            logger.info(
                                "%s: first optimizer step %.1f s (torch.compile compiled the member)",
                                spec.name,
                                first_step_s,
                            )
                    inject("raise", spec.index, p.step)
                    inject("kill", spec.index, p.step)
                    if p.step % self.cfg.train.logging_steps == 0 or p.step == total_steps:
                        self._log(bar, throughput, steps_per_epoch)
                    if p.step >= total_steps:
                        break  # the finished member is saved next: no checkpoint needed
                    saved_step = self._checkpoint_or_stop(stop, saved_step, total_steps)
        seconds = self.seconds()
        tokens_per_s = p.tokens / seconds if seconds > 0 else 0.0
        return {
            "steps": p.step,
            "epochs": epochs,
            "processes": acc.num_processes,
            "tokens": p.tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": tokens_per_s,
            "final_loss": p.last_loss,
            "first_step_seconds": round(first_step_s, 3) if first_step_s is not None else None,
            "flops_per_token": throughput.flops_per_token,
            "peak_tflops": throughput.peak_tflops,
            "compiled": throughput.compiled,
            "mfu": throughput.mfu(tokens_per_s, acc.num_processes),
        }

    def _micro_step(self, batch: torch.Tensor) -> bool:
        """One forward and backward; True when it completed an optimizer step."""
        acc, p, t = self.accelerator, self.p, self.cfg.train
        with acc.accumulate(self.model):
            if self.job.objective is None:
                loss = self.model(input_ids=batch, labels=batch).loss
            else:
                loss = self.job.objective(self.model, batch)
            if armed("nan", self.spec.index, p.step + 1):
                loss = loss * math.nan
            acc.backward(loss)
            if acc.sync_gradients and t.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        p.batch_in_epoch += 1
        self.window_loss += loss.detach()
        p.window_batches += 1
        p.window_tokens += batch.numel() * acc.num_processes
        if not acc.sync_gradients:
            return False
        p.step += 1
        if acc.gradient_state.end_of_dataloader:  # the position is always "next batch"
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        return True

    def _log(self, bar: Any, throughput: Throughput, steps_per_epoch: int) -> None:
        """Close the logging window: loss (checked finite), learning rate, tokens/s, MFU."""
        acc, p = self.accelerator, self.p
        mean_loss = self._check_finite()
        now = time.perf_counter()
        p.tokens += p.window_tokens
        tokens_per_s = p.window_tokens / max(now - self.window_start, 1e-9)
        metrics = {
            "train/loss": mean_loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens_per_s": tokens_per_s,
            "train/epoch": p.step / steps_per_epoch,
        }
        utilisation = throughput.mfu(tokens_per_s, acc.num_processes)
        if utilisation is not None:
            metrics["train/mfu"] = utilisation
        acc.log(metrics, step=p.step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
        p.last_loss = mean_loss
        self.window_loss.zero_()
        p.window_batches, p.window_tokens, self.window_start = 0, 0, now

    def _checkpoint_or_stop(
        self, stop: StopRequest | None, saved_step: int | None, total_steps: int
    ) -> int | None:
        """Checkpoint when one is due or a stop is agreed, then stop if asked. Returns the step
        whose state is on disk."""
        acc, p, c = self.accelerator, self.p, self.cfg.checkpoint
        due = (c.every_steps is not None and p.step % c.every_steps == 0) or (
            c.at_epoch_end and p.batch_in_epoch == 0
        )
        # Agreeing on a stop is a host synchronisation (and, across processes, an all-reduce and
        # a store lookup): every checkpoint.stop_check_steps steps only.
        stopping = stop is not None and p.step % c.stop_check_steps == 0 and stop.agreed(acc.device)
        if (due or stopping) and p.step != saved_step:
            self._save()
            saved_step = p.step
        if stopping:
            raise Preempted(
                f"stopped by {stop.reason()}: {self.spec.name} checkpointed at step {p.step} of "
                f"{total_steps} in {self.checkpoints.dir}"
            )
        return saved_step

    def _check_finite(self, weights: bool = False) -> float:
        """The mean loss of the window, over the group; stops the member if it (or, with
        ``weights``, a weight) is not finite."""
        from accelerate.utils import DistributedType

        acc, p, spec = self.accelerator, self.p, self.spec
        mean_loss = acc.reduce(self.window_loss / max(p.window_batches, 1), "mean")
        loss_finite = bool(torch.isfinite(mean_loss).item())
        weights_finite = True
        # (under DeepSpeed the weights live in its shards; the loss check is what remains)
        if weights and loss_finite and acc.distributed_type != DistributedType.DEEPSPEED:
            local = torch.stack([torch.isfinite(w).all() for w in self.model.parameters()]).all()
            weights_finite = not any_rank(not local.item(), acc.device)
        if not (loss_finite and weights_finite):
            last = self.checkpoints.latest()
            what = f"loss became {mean_loss.item()}" if not loss_finite else "weights became non-finite"
            info = {
                "member": spec.name,
                "seed": spec.seed,
                "step": p.step,
                "after_step": p.checked_step,
                "last_good_checkpoint": str(last) if last else None,
            }
            raise MemberDiverged(
                f"{spec.name} (seed {spec.seed}): the training {what} between steps {p.checked_step} "
                f"and {p.step}; last good checkpoint: {last or 'none'}; lower train.lr (or set "
                "train.max_grad_norm) and train into a new output.dir",
                info,
            )
        p.checked_step = p.step
        return mean_loss.item()

    def _save(self) -> None:
        self._check_finite(weights=True)  # never checkpoint a diverged member
        self.p.window_loss = self.window_loss.item()
        self.p.seconds = self.seconds()
        path = self.checkpoints.save(
            self.accelerator, self.p, self.record, self.cfg.checkpoint.keep_last, self.spec.index
        )
        logger.info("%s: checkpoint %s", self.spec.name, path)
        self.started = time.perf_counter()  # the clock goes on from the saved value, as after a resume

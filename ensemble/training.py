"""Training: the run (checks, data, members, evaluation) and one member's Accelerate loop.

`train_run` decides *which* members this process trains (a `placement.Layout`) and hands each to
`train_member`, which knows nothing about placement: it trains the member it is given on the
processes of its Accelerator.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpointing import (
    MemberCheckpoints,
    Progress,
    StopRequest,
    any_rank,
    check_resumable,
    check_training_data,
    checkpoints_root,
    config_differences,
    read_checkpoint_info,
    trajectory_config,
)
from .compute import deterministic, resolve_compile, resolve_mixed_precision, tf32
from .config import ExperimentConfig, config_from_dict
from .data import PreparedData, iter_texts, load_splits, prepare_data
from .distributed import (
    Worlds,
    accelerator_kwargs,
    launch_info,
    local_device,
    reset_accelerate_state,
    state_kwargs,
)
from .errors import EnsembleError, Preempted
from .evaluation import evaluate
from .faults import armed, inject
from .files import atomic_write_text, create_once, remove_stale_tmp, tmp_name
from .members import (
    MemberSpec,
    RunPaths,
    build_model,
    context_length,
    count_parameters,
    find_members,
    fit_model_config,
    is_complete_member,
    load_model_config,
    member_specs,
    read_manifest,
    read_member_info,
    save_member,
    write_manifest,
)
from .placement import device_memory_bytes, estimate_bytes_per_device, plan_layout
from .reporting import RESULTS_JSON, RESULTS_MD
from .throughput import flops_per_token, mfu, peak_tflops
from .tokenization import load_pretrained_tokenizer, load_tokenizer, needs_training_text
from .tracking import flat_config, make_trackers
from .zero import ZeroSetup, check_batch, load_zero, make_plugin

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Checks that run before any work


def check_output_dir(paths: RunPaths, overwrite: bool, resume: str | None = None) -> None:
    """The output directory must be writable and must not hold a run we would clobber (unless
    we were asked to replace it, or to resume it)."""
    root = paths.root
    if resume and overwrite:
        raise EnsembleError(
            "--resume continues the run in output.dir but output.overwrite=true would replace it; drop one"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tmp_name(root / "write-probe")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EnsembleError(
            f"output.dir '{root}' is not writable ({e.strerror or e}); choose a writable output.dir"
        ) from None
    existing = [p for p in (paths.manifest, root / RESULTS_JSON) if p.exists()] + find_members(root)
    if existing and not overwrite and not resume:
        raise EnsembleError(
            f"output.dir '{root}' already holds a run ({existing[0].relative_to(root)}); pass --resume "
            "auto to continue it, choose another output.dir, or pass output.overwrite=true to replace it"
        )


def clear_previous_run(paths: RunPaths, checkpoints: Path) -> None:
    """With output.overwrite: remove the old run first, so no stale member, result or checkpoint
    can be mistaken for part of the new one."""
    for path in (
        paths.manifest,
        paths.root / RESULTS_JSON,
        paths.root / RESULTS_MD,
        paths.config,
        paths.run_id,
    ):
        path.unlink(missing_ok=True)
    for path in (paths.members, paths.logs, checkpoints):
        shutil.rmtree(path, ignore_errors=True)


def resolve_block_size(cfg: ExperimentConfig, model_config: Any) -> int:
    ctx = context_length(model_config)
    block_size = cfg.data.block_size or ctx
    if block_size > ctx:
        raise EnsembleError(
            f"data.block_size={block_size} exceeds the model's context of {ctx} tokens; "
            f"set data.block_size <= {ctx}"
        )
    return block_size


# --------------------------------------------------------------------------------------------
# One member


def _cpus_available() -> int:
    """CPUs this process may use: its Slurm allocation's, where it has one (with no CPU binding
    the affinity mask would still show the whole machine), else its affinity mask."""
    allocated = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    if allocated and allocated.isdigit():
        return int(allocated)
    return len(os.sched_getaffinity(0))


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


class MemberDiverged(EnsembleError):
    """A member's training loss became non-finite: that member stops, the others go on."""

    def __init__(self, message: str, info: dict[str, Any]):
        super().__init__(message)
        self.info = info


def train_member(
    cfg: ExperimentConfig,
    spec: MemberSpec,
    data: PreparedData,
    tokenizer: Any,
    model_config: Any,
    paths: RunPaths,
    zero: ZeroSetup | None = None,
    flops: float | None = None,
    resume_from: Path | None = None,
    stop: StopRequest | None = None,
    run_id: str | None = None,
    compile_model: bool = False,
) -> dict[str, Any]:
    """Train one member on the processes of the current world and save it, from scratch or
    from the checkpoint ``resume_from``, checkpointing on the way. Returns its training summary.
    Knows nothing of placement: the world it runs in is its group. ``compile_model``: the
    `train.compile` decision of :func:`compute.resolve_compile`.

    Raises :class:`Preempted` after checkpointing when ``stop`` is requested, and
    :class:`MemberDiverged` when the loss becomes non-finite."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    t = cfg.train
    mixed_precision = resolve_mixed_precision(t.mixed_precision)
    flops = flops or flops_per_token(model_config, data.block_size)
    reset_accelerate_state()  # one Accelerator (and DeepSpeed plugin) per member
    # Built before the Accelerator: once a ZeRO-3 plugin is registered, transformers would build
    # under zero.Init, which initialises differently, and the member would no longer equal its
    # single-process twin. Every rank builds the same full model from the seed; DeepSpeed shards it.
    model = build_model(cfg.model, model_config, spec.seed)
    accelerator = Accelerator(
        **accelerator_kwargs(deepspeed=zero is not None, timeout_s=cfg.parallel.timeout_s),
        deepspeed_plugin=make_plugin(zero, cfg) if zero else None,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=make_trackers(cfg, spec.name, paths.logs, run_id) or None,
        # The sampler's order depends on the member's seed and the epoch only, so it is the
        # same on every rank and after a restart. Batches are copied to the GPU without waiting
        # (from pinned memory, see the loader).
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=spec.seed, non_blocking=True
        ),
        step_scheduler_with_optimizer=False,
    )
    try:
        # Compiled CPU code is deterministic only in torch's deterministic mode (see compute).
        with tf32(t.tf32), deterministic(compile_model and accelerator.device.type == "cpu"):
            return _train_prepared(
                accelerator, model, cfg, spec, data, tokenizer, model_config, paths, zero, flops,
                mixed_precision, resume_from, stop, compile_model,
            )  # fmt: skip
    finally:
        # Not accelerator.end_training(): it also destroys the process group, which the next
        # member and the evaluation still need. train_run tears the worlds down at the end.
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.free_memory()
        reset_accelerate_state()


def _train_prepared(
    accelerator, model, cfg, spec, data, tokenizer, model_config, paths, zero, flops, mixed_precision,
    resume_from, stop, compile_model,
) -> dict[str, Any]:  # fmt: skip
    from transformers import get_scheduler

    t = cfg.train
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
    peak, peak_source = peak_tflops(accelerator.device, mixed_precision, t.peak_tflops)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    checkpoints = MemberCheckpoints(checkpoints_root(cfg), spec.name)
    # Dropout draws from the process RNG: seed it from the member (and rank, so data-parallel
    # replicas drop different units) and restore it afterwards, so members do not share a stream.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed + accelerator.process_index)
        # The loader draws a base seed at every epoch start: from a generator of its own, not from
        # the process RNG that drives dropout, so that resuming mid-epoch cannot shift dropout.
        cuda = accelerator.device.type == "cuda"
        loader = DataLoader(
            data.train_blocks(), batch_size=t.per_device_batch_size, shuffle=True, generator=torch.Generator(),
            pin_memory=cuda,
        )  # fmt: skip
        model, optimizer, loader = accelerator.prepare(model, _optimizer(model, cfg, fused=cuda), loader)
        if compile_model:
            _compile_in_place(accelerator, model)
        steps_per_epoch = math.ceil(len(loader) / t.gradient_accumulation_steps)
        total_steps = t.max_steps or steps_per_epoch * t.num_epochs
        if t.warmup_steps >= total_steps:
            logger.warning(
                "%s: train.warmup_steps=%d >= the %d optimizer steps of this run: the learning rate "
                "never reaches train.lr=%g",
                spec.name,
                t.warmup_steps,
                total_steps,
                t.lr,
            )
        # prepare_scheduler, not prepare: under DeepSpeed, prepare() of a lone scheduler returns it
        # unregistered, and save_state would then leave it out of the checkpoints.
        scheduler = accelerator.prepare_scheduler(
            get_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, total_steps)
        )
        progress = Progress()
        accelerator.register_for_checkpointing(progress)
        if resume_from is not None:  # checked by train_run (plan_resume, check_training_data)
            # Model, optimizer, scheduler, every rank's RNG states, the accumulation counter and
            # our progress (step, data position, logging window).
            accelerator.load_state(str(resume_from))
            resumed = {"checkpoint": str(resume_from), "step": progress.step}
            logger.info(
                "%s resumes from %s (step %d of %d)", spec.name, resume_from, progress.step, total_steps
            )
        accelerator.init_trackers(cfg.tracking.project, config={"member.seed": spec.seed, **flat_config(cfg)})
        ranks = accelerator.gather(torch.tensor([launch_info().rank], device=accelerator.device)).tolist()
        logger.info(
            "%s (seed %d) on rank(s) %s%s: %d blocks of %d tokens, %d optimizer steps; %.3g FLOPs/token, "
            "peak %s TFLOP/s per device (%s); torch.compile %s (train.compile=%s), precision %s",
            spec.name,
            spec.seed,
            ranks,
            f" with ZeRO-{zero.stage}" if zero else "",
            len(loader.dataset),
            data.block_size,
            total_steps,
            flops,
            f"{peak:.3g}" if peak else "?",
            peak_source,
            "on" if compile_model else "off",
            t.compile,
            mixed_precision if mixed_precision != "no" else "float32",
        )
        throughput = {"flops_per_token": flops, "peak_tflops": peak, "compiled": compile_model}
        checkpoint_info = {
            "member": spec.name,
            "index": spec.index,
            "seed": spec.seed,
            "processes": accelerator.num_processes,
            "zero_stage": zero.stage if zero else None,
            "total_steps": total_steps,
            "config": trajectory_config(cfg, spec.seed),
            "train_sha256": data.fingerprint["splits"]["train"]["sha256"],
        }
        loop = _Loop(accelerator, model, optimizer, loader, scheduler, cfg, spec, progress, checkpoints)
        summary = loop.run(total_steps, steps_per_epoch, throughput, checkpoint_info, stop, resume_from)
    summary.update(ranks=ranks, zero_stage=zero.stage if zero else None, peak_source=peak_source)
    if resume_from is not None:
        summary["resumed_from"] = resumed

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        info = {"training": summary, "data_fingerprint": data.fingerprint}
        save_member(
            paths.member(spec), accelerator.unwrap_model(model), tokenizer, spec, cfg, info, state_dict
        )
        logger.info("%s saved to %s", spec.name, paths.member(spec))
    accelerator.wait_for_everyone()
    return summary


class _Loop:
    """One member's optimisation loop, resumable at any optimizer step from its `Progress`."""

    def __init__(self, accelerator, model, optimizer, loader, scheduler, cfg, spec, progress, checkpoints):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.loader, self.scheduler, self.cfg, self.spec = loader, scheduler, cfg, spec
        self.p: Progress = progress
        self.checkpoints: MemberCheckpoints = checkpoints
        self.window_loss = torch.tensor(progress.window_loss, device=accelerator.device)
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.p.seconds + (time.perf_counter() - self.started)

    def run(
        self, total_steps, steps_per_epoch, throughput, checkpoint_info, stop, resume_from
    ) -> dict[str, Any]:
        from accelerate import skip_first_batches

        acc, p, t, c, spec = self.accelerator, self.p, self.cfg.train, self.cfg.checkpoint, self.spec
        epochs = math.ceil(total_steps / steps_per_epoch)
        saved_step = p.step if resume_from is not None else None  # that state is already on disk
        window_start = time.perf_counter()
        first_step_s: float | None = None
        self.model.train()
        # A context manager, so the bar is closed (not redrawn later) when an error ends training.
        with tqdm(
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
                    with acc.accumulate(self.model):
                        loss = self.model(input_ids=batch, labels=batch).loss
                        if armed("nan", spec.index, p.step + 1):
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
                        continue
                    p.step += 1
                    if acc.gradient_state.end_of_dataloader:  # the position is always "next batch"
                        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                    bar.update(1)
                    if first_step_s is None:  # compilation happens in this process's first step
                        first_step_s = time.perf_counter() - window_start
                        if throughput["compiled"]:
                            logger.info(
                                "%s: first optimizer step %.1f s (torch.compile compiled the member)",
                                spec.name,
                                first_step_s,
                            )
                    inject("raise", spec.index, p.step)
                    inject("kill", spec.index, p.step)
                    if p.step % t.logging_steps == 0 or p.step == total_steps:
                        mean_loss = self._check_finite()
                        now = time.perf_counter()
                        p.tokens += p.window_tokens
                        tokens_per_s = p.window_tokens / max(now - window_start, 1e-9)
                        metrics = {
                            "train/loss": mean_loss,
                            "train/lr": self.scheduler.get_last_lr()[0],
                            "train/tokens_per_s": tokens_per_s,
                            "train/epoch": p.step / steps_per_epoch,
                        }
                        utilisation = mfu(
                            throughput["flops_per_token"],
                            tokens_per_s,
                            throughput["peak_tflops"],
                            acc.num_processes,
                        )
                        if utilisation is not None:
                            metrics["train/mfu"] = utilisation
                        acc.log(metrics, step=p.step)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
                        p.last_loss = mean_loss
                        self.window_loss.zero_()
                        p.window_batches, p.window_tokens, window_start = 0, 0, now
                    if p.step >= total_steps:
                        break  # the finished member is saved next: no checkpoint needed
                    due = (c.every_steps is not None and p.step % c.every_steps == 0) or (
                        c.at_epoch_end and p.batch_in_epoch == 0
                    )
                    # Agreeing on a stop is a host synchronisation (and, across processes, an
                    # all-reduce and a store lookup): every checkpoint.stop_check_steps steps only.
                    stopping = (
                        stop is not None and p.step % c.stop_check_steps == 0 and stop.agreed(acc.device)
                    )
                    if (due or stopping) and p.step != saved_step:
                        self._save(checkpoint_info)
                        saved_step = p.step
                    if stopping:
                        raise Preempted(
                            f"stopped by {stop.reason()}: {spec.name} checkpointed at step {p.step} of "
                            f"{total_steps} in {self.checkpoints.dir}"
                        )
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
            **throughput,
            "mfu": mfu(
                throughput["flops_per_token"], tokens_per_s, throughput["peak_tflops"], acc.num_processes
            ),
        }

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

    def _save(self, checkpoint_info: dict[str, Any]) -> None:
        self._check_finite(weights=True)  # never checkpoint a diverged member
        self.p.window_loss = self.window_loss.item()
        self.p.seconds = self.seconds()
        path = self.checkpoints.save(
            self.accelerator, self.p, checkpoint_info, self.cfg.checkpoint.keep_last, self.spec.index
        )
        logger.info("%s: checkpoint %s", self.spec.name, path)
        self.started = time.perf_counter()  # the clock goes on from the saved value, as after a resume


# --------------------------------------------------------------------------------------------
# The run


def _member_fits(cfg: ExperimentConfig, model_config: Any, block_size: int, zero: ZeroSetup | None):
    """For placement=auto: does one member fit the devices of a group of k ranks?"""
    launch = launch_info()

    def fits(group_size: int) -> bool:
        need = estimate_bytes_per_device(
            model_config,
            count_parameters(model_config),
            cfg.train.per_device_batch_size,
            block_size,
            group_size,
            zero.stage if zero else 0,
            resolve_mixed_precision(cfg.train.mixed_precision) != "no",
        )
        have, what = device_memory_bytes(launch.local_world_size)
        logger.info(
            "placement auto: a member needs ~%.2f GiB per device in groups of %d; %.2f GiB available (%s)",
            need / 2**30,
            group_size,
            have / 2**30,
            what,
        )
        return need <= have

    return fits


def select_members(specs: list[MemberSpec], only: list[int] | None) -> list[MemberSpec]:
    """The members this launch trains: all, or those whose indices ``only`` lists."""
    if only is None:
        return specs
    wrong = sorted({i for i in only if not 0 <= i < len(specs)})
    if wrong:
        raise EnsembleError(
            f"--member {', '.join(map(str, wrong))}: the config has {len(specs)} members (indices 0 to "
            f"{len(specs) - 1}, see --list-members); pass one of those, or add seeds to members.seeds"
        )
    chosen = set(only)
    return [s for s in specs if s.index in chosen]


def train_run(
    cfg: ExperimentConfig,
    resume: str | None = None,
    only: list[int] | None = None,
    evaluate_after: bool = True,
) -> dict[str, Any] | None:
    """Check everything, prepare the data once, train every member on its group of ranks,
    evaluate the ensemble. ``resume``: None (a new run), "auto" (continue every unfinished member
    from its latest checkpoint, skip finished ones) or the path of one member's checkpoint.

    ``only``: train just these member indices into the shared run (e.g. one per task of a Slurm
    array, several launches at once); the ensemble is then not evaluated here, since the other
    members may still be training. ``evaluate_after=False`` also leaves evaluation to
    launch/evaluate.py. Returns the results, or None when not evaluated."""

    launch = launch_info()
    zero = load_zero(cfg)
    if zero:
        if "LOCAL_RANK" not in os.environ:
            raise EnsembleError(
                "DeepSpeed needs a distributed launcher, even for one process: run with "
                "`accelerate launch` or `torchrun`"
            )
        # What `accelerate launch` sets for a DeepSpeed config; without it Accelerate's process
        # state would not treat the world as distributed (its barriers would do nothing).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    worlds = Worlds(cfg.parallel.timeout_s)
    try:
        return _run(cfg, launch, zero, worlds, resume, only, evaluate_after)
    finally:
        worlds.close()


@dataclass
class ResumePlan:
    """Which members to skip (complete) and which checkpoint each other member starts from."""

    complete: set[int] = field(default_factory=set)
    start: dict[int, Path] = field(default_factory=dict)
    explicit: int | None = None  # the member of `--resume PATH`


def plan_resume(
    cfg: ExperimentConfig,
    paths: RunPaths,
    specs: list[MemberSpec],
    resume: str | None,
    processes: int,
    selected: list[MemberSpec] | None = None,
) -> ResumePlan:
    """Check that the run in output.dir is this experiment and find where each member resumes;
    every mismatch is a one-line error before any work. ``selected``: the members this launch
    trains (default all); the checkpoints of the others are not looked at, as other launches may
    be writing them."""
    selected = specs if selected is None else selected
    plan = ResumePlan()
    if resume is None:
        return plan
    if paths.config.is_file():
        saved = config_from_dict(yaml.safe_load(paths.config.read_text()) or {})
        changed = config_differences(trajectory_config(saved, 0), trajectory_config(cfg, 0))
        if changed:
            raise EnsembleError(
                f"output.dir '{paths.root}' holds a run trained with a different config ({changed}); "
                "resume with its config.yaml, or train into a new output.dir"
            )
    for spec in specs:
        if is_complete_member(paths.member(spec)):
            seed = read_member_info(paths.member(spec)).get("seed")
            if seed != spec.seed:
                raise EnsembleError(
                    f"{spec.name} in '{paths.root}' was trained with seed {seed} but the config gives it "
                    f"seed {spec.seed}; keep members.seeds as they were (append new seeds at the end)"
                )
            plan.complete.add(spec.index)
    if resume != "auto":
        path = Path(resume)
        info = read_checkpoint_info(path)
        index = info.get("index")
        if not isinstance(index, int) or index >= len(specs) or specs[index].name != info.get("member"):
            raise EnsembleError(
                f"checkpoint {path} is of {info.get('member')}, which this config does not have "
                f"({len(specs)} members); pass a checkpoint of one of its members"
            )
        if specs[index] not in selected:
            raise EnsembleError(
                f"checkpoint {path} is of {specs[index].name}, which --member does not select; "
                f"add --member {index}"
            )
        if index in plan.complete:
            logger.warning(
                "%s is complete; it is trained again from %s and replaced", specs[index].name, path
            )
            plan.complete.discard(index)
        plan.explicit, plan.start[index] = index, path
    root = checkpoints_root(cfg)
    for spec in selected:
        if spec.index in plan.complete:
            continue
        start = plan.start.get(spec.index) or MemberCheckpoints(root, spec.name).latest()
        if start is not None:
            check_resumable(start, read_checkpoint_info(start), cfg, spec.name, spec.seed, processes)
            plan.start[spec.index] = start
    return plan


def _run(
    cfg: ExperimentConfig,
    launch: Any,
    zero: ZeroSetup | None,
    worlds: Worlds,
    resume: str | None,
    only: list[int] | None,
    evaluate_after: bool,
) -> dict[str, Any] | None:
    from accelerate import PartialState

    worlds.join("run", launch.rank, launch.world_size)

    def state() -> Any:  # re-created after each world switch, which resets Accelerate's state
        return PartialState(**state_kwargs(deepspeed=zero is not None, timeout_s=cfg.parallel.timeout_s))

    paths = RunPaths(Path(cfg.output.dir))
    specs = member_specs(cfg)
    selected = select_members(specs, only)
    # Cheap checks first: a mistake should cost seconds, not a dataset download.
    if only is not None and cfg.output.overwrite:
        raise EnsembleError(
            "--member trains into a run shared with other launches, which output.overwrite=true would "
            "remove; drop output.overwrite (pass --resume auto) or train all members"
        )
    check_output_dir(paths, cfg.output.overwrite, resume)
    base_config = load_model_config(cfg.model)
    block_size = resolve_block_size(cfg, base_config)
    layout = plan_layout(
        cfg.parallel, launch.world_size, len(selected), launch.local_world_size,
        fits=_member_fits(cfg, base_config, block_size, zero),
    )  # fmt: skip
    if zero:
        check_batch(zero, cfg, layout.group_size)
    plan = plan_resume(cfg, paths, specs, resume, layout.group_size, selected)
    if cfg.train.compile == "auto" and zero and zero.stage == 3:
        # ZeRO-3's parameter-gathering hooks make dynamo recompile every step until it gives up
        # (and falls back to eager) after its recompile limit: nothing to gain by default.
        logger.info("train.compile=auto: off under ZeRO-3 (set train.compile=true to force it)")
        compile_model = False
    else:
        compile_model = resolve_compile(cfg.train.compile, local_device(), "train.compile")
    if not needs_training_text(cfg.model):
        tokenizer = load_tokenizer(cfg.model)
    with worlds.main_first("data"):  # rank 0 fills the datasets cache (and trains a bpe tokenizer)
        raw = load_splits(cfg.data)
        if needs_training_text(cfg.model):
            if "train" not in raw:
                raise EnsembleError("model.tokenizer=bpe needs a training split to learn from")
            if launch.rank == 0 and not (resume and paths.tokenizer.is_dir()):
                # On a resume (e.g. the tasks of a Slurm array starting together) the first
                # tokenizer published is the run's; a new run replaces any old one.
                tokenizer = load_tokenizer(
                    cfg.model, iter_texts(raw["train"], cfg.data), paths.tokenizer, replace=not resume
                )
            else:  # the run's tokenizer, never one trained separately
                tokenizer = load_pretrained_tokenizer(paths.tokenizer)
        data = prepare_data(cfg.data, tokenizer, block_size, raw=raw)
    for start in plan.start.values():
        check_training_data(start, read_checkpoint_info(start), data.fingerprint["splits"]["train"]["sha256"])
    model_config = fit_model_config(cfg.model, base_config, tokenizer)
    flops = flops_per_token(model_config, block_size)  # before any DeepSpeed plugin exists
    run_info: dict[str, Any] = {"layout": layout.summary()}
    ckpt_root = checkpoints_root(cfg)
    if launch.rank == 0:
        for line in layout.describe([s.name for s in selected]):
            logger.info(line)
        previous = read_manifest(paths) if resume else {}
        if cfg.output.overwrite:
            clear_previous_run(paths, ckpt_root)
        paths.members.mkdir(parents=True, exist_ok=True)
        if only is None:
            remove_stale_tmp(paths.members)
            remove_stale_tmp(paths.root)
        else:  # the other members' temporaries may be live: other launches are writing them
            remove_stale_tmp(paths.members, [s.name for s in selected])
        for spec in selected:
            member_ckpts = MemberCheckpoints(ckpt_root, spec.name)
            remove_stale_tmp(member_ckpts.dir)  # interrupted checkpoint saves
            if spec.index not in plan.complete:
                member_ckpts.clear_failure()
        if plan.explicit is not None:
            start = plan.start[plan.explicit]
            dropped = MemberCheckpoints(ckpt_root, specs[plan.explicit].name).drop_after(
                read_checkpoint_info(start)["step"]  # its record, not its folder name: it may be a copy
            )
            if dropped:
                logger.warning(
                    "removed %s: later than the checkpoint resumed from", ", ".join(map(str, dropped))
                )
        # Launches that share the run (--member) may start together: the first id written wins.
        run_info["run_id"] = create_once(paths.run_id, previous.get("run_id") or uuid.uuid4().hex[:12])
        atomic_write_text(paths.config, cfg.to_yaml())
        write_manifest(paths, specs, data.fingerprint, run_info)
    state().wait_for_everyone()
    run_info["run_id"] = read_manifest(paths)["run_id"]  # rank 0's, on every rank

    group = layout.group_of(launch.rank)
    if layout.num_groups > 1:
        worlds.join(f"group-{group}", layout.rank_in_group(launch.rank), layout.group_size)
    # INFO from each group's first rank (its member's progress), warnings from every rank.
    logging.getLogger().setLevel(logging.INFO if layout.rank_in_group(launch.rank) == 0 else logging.WARNING)
    started = time.perf_counter()
    device = local_device()
    with StopRequest(publish=worlds.publish_stop, seen=worlds.stop_published) as stop:
        for index in layout.members_of(group):
            spec = selected[index]
            if spec.index in plan.complete:
                logger.info("%s is complete: skipped", spec.name)
                continue
            if stop.agreed(device):
                raise Preempted(f"stopped by {stop.reason()} before {spec.name} started")
            try:
                train_member(
                    cfg, spec, data, tokenizer, model_config, paths, zero, flops,
                    resume_from=plan.start.get(spec.index), stop=stop, run_id=run_info["run_id"],
                    compile_model=compile_model,
                )  # fmt: skip
            except MemberDiverged as e:
                # That member stops; the group goes on with its other members.
                logger.error("%s", e)
                if layout.rank_in_group(launch.rank) == 0:
                    MemberCheckpoints(ckpt_root, spec.name).record_failure({**e.info, "error": str(e)})
        worlds.wait_all("training", stop=stop)  # groups finish at different times (rounds, member sizes)
        if layout.num_groups > 1:
            worlds.join("evaluate", launch.rank, launch.world_size)
        if stop.agreed(device):
            raise Preempted(f"stopped by {stop.reason()} after training; the evaluation did not run")
    run_info["timing"] = {"train_seconds": round(time.perf_counter() - started, 3)}
    logging.getLogger().setLevel(logging.INFO if launch.rank == 0 else logging.WARNING)

    # Every member's failure goes into the manifest; this launch fails on its own members' only.
    failed = {s.name: f for s in specs if (f := MemberCheckpoints(ckpt_root, s.name).failure())}
    failures = [failed[s.name] for s in selected if s.name in failed]
    if launch.rank == 0:
        write_manifest(paths, specs, data.fingerprint, run_info, failed=set(failed))
    if failures:
        kept = [s.name for s in specs if is_complete_member(paths.member(s))]
        raise EnsembleError(
            " | ".join(f["error"] for f in failures)
            + f" | kept: {', '.join(kept) or 'no member'} (complete); the ensemble was not evaluated"
        )
    if only is not None or not evaluate_after:
        pending = [s.name for s in specs if not is_complete_member(paths.member(s))]
        logger.info(
            "%s done; the ensemble is not evaluated here: %s",
            ", ".join(s.name for s in selected),
            f"waiting for {', '.join(pending)}"
            if pending
            else f"every member is complete, run `python launch/evaluate.py {paths.root}`",
        )
        return None
    # Every process takes part: the evaluator shards the test batches over the run's world.
    results = evaluate(
        [paths.member(s) for s in specs], cfg.data, cfg.eval, cfg.eval.split, paths.root, device, data,
        main_first=worlds.main_first,
    )  # fmt: skip
    return results

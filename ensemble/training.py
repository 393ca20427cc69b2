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
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import ExperimentConfig
from .data import PreparedData, iter_texts, load_splits, prepare_data
from .distributed import (
    Worlds,
    accelerator_kwargs,
    launch_info,
    local_device,
    on_cpu,
    reset_accelerate_state,
    state_kwargs,
)
from .errors import EnsembleError
from .evaluation import evaluate
from .files import atomic_write_text, remove_stale_tmp
from .members import (
    MemberSpec,
    RunPaths,
    build_model,
    context_length,
    count_parameters,
    find_members,
    fit_model_config,
    load_model_config,
    member_specs,
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


def check_output_dir(paths: RunPaths, overwrite: bool) -> None:
    """The output directory must be writable and must not hold a run we would clobber."""
    root = paths.root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EnsembleError(
            f"output.dir '{root}' is not writable ({e.strerror or e}); choose a writable output.dir"
        ) from None
    existing = [p for p in (paths.manifest, root / RESULTS_JSON) if p.exists()] + find_members(root)
    if existing and not overwrite:
        raise EnsembleError(
            f"output.dir '{root}' already holds a run ({existing[0].relative_to(root)}); choose "
            "another output.dir, or pass output.overwrite=true to replace it"
        )


def clear_previous_run(paths: RunPaths) -> None:
    """With output.overwrite: remove the old run first, so no stale member or result can be
    mistaken for part of the new one."""
    for path in (paths.manifest, paths.root / RESULTS_JSON, paths.root / RESULTS_MD, paths.config):
        path.unlink(missing_ok=True)
    for path in (paths.members, paths.logs):
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


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher  # chosen with `accelerate launch --mixed_precision`
    if not on_cpu():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# --------------------------------------------------------------------------------------------
# One member


def _optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    # Decay weight matrices only; biases and LayerNorm gains stay undecayed (as in GPT-2/nanoGPT).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
    )


def train_member(
    cfg: ExperimentConfig,
    spec: MemberSpec,
    data: PreparedData,
    tokenizer: Any,
    model_config: Any,
    paths: RunPaths,
    zero: ZeroSetup | None = None,
    flops: float | None = None,
) -> dict[str, Any]:
    """Train one member on the processes of the current world and save it. Returns its
    training summary. Knows nothing of placement: the world it runs in is its group."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import get_scheduler

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
        log_with=make_trackers(cfg, spec.name, paths.logs) or None,
        # The sampler's order depends on the member's seed and the epoch only, so it is the
        # same on every rank and after a restart.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=spec.seed),
        step_scheduler_with_optimizer=False,
    )
    if (
        accelerator.device.type == "cpu"
        and torch.get_num_threads() == 1
        and (os.cpu_count() or 1) > launch_info().local_world_size
    ):
        logger.warning(
            "training on CPU with 1 thread while %d cores are available; `accelerate launch` sets "
            "OMP_NUM_THREADS=1 unless its config has use_cpu: true (see configs/accelerate/cpu.yaml) "
            "or --num_cpu_threads_per_process is given",
            os.cpu_count(),
        )
    peak, peak_source = peak_tflops(accelerator.device, mixed_precision, t.peak_tflops)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    # Dropout draws from the process RNG: seed it from the member (and rank, so data-parallel
    # replicas drop different units) and restore it afterwards, so members do not share a stream.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed + accelerator.process_index)
        loader = DataLoader(data.train_blocks(), batch_size=t.per_device_batch_size, shuffle=True)
        model, optimizer, loader = accelerator.prepare(model, _optimizer(model, cfg), loader)
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
        scheduler = accelerator.prepare(get_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, total_steps))
        accelerator.init_trackers(cfg.tracking.project, config={"member.seed": spec.seed, **flat_config(cfg)})
        ranks = accelerator.gather(torch.tensor([launch_info().rank], device=accelerator.device)).tolist()
        logger.info(
            "%s (seed %d) on rank(s) %s%s: %d blocks of %d tokens, %d optimizer steps; %.3g FLOPs/token, "
            "peak %s TFLOP/s per device (%s)",
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
        )
        throughput = {"flops_per_token": flops, "peak_tflops": peak}
        summary = _loop(
            accelerator,
            model,
            optimizer,
            loader,
            scheduler,
            cfg,
            spec,
            total_steps,
            steps_per_epoch,
            throughput,
        )
    summary.update(ranks=ranks, zero_stage=zero.stage if zero else None, peak_source=peak_source)

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        info = {"training": summary, "data_fingerprint": data.fingerprint}
        save_member(
            paths.member(spec), accelerator.unwrap_model(model), tokenizer, spec, cfg, info, state_dict
        )
        logger.info("%s saved to %s", spec.name, paths.member(spec))
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which the next member
    # and the evaluation still need. train_run tears the worlds down at the end.
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.free_memory()
    reset_accelerate_state()
    return summary


def _inject_fault(spec: MemberSpec, step: int) -> None:
    """Testing hook: ENSEMBLE_FAIL_MEMBER="<member index>:<step>" makes that member raise at
    that optimizer step, so tests can check that one failing member ends the whole job."""
    target = os.environ.get("ENSEMBLE_FAIL_MEMBER")
    if target and target == f"{spec.index}:{step}":
        raise RuntimeError(f"injected failure in {spec.name} at step {step} (ENSEMBLE_FAIL_MEMBER)")


def _loop(
    accelerator, model, optimizer, loader, scheduler, cfg, spec, total_steps, steps_per_epoch, throughput
) -> dict[str, Any]:
    t = cfg.train
    epochs = math.ceil(total_steps / steps_per_epoch)
    model.train()
    step, tokens = 0, 0
    window_loss = torch.zeros((), device=accelerator.device)
    window_batches, window_tokens = 0, 0
    start = window_start = time.perf_counter()
    last_loss = math.nan
    # A context manager, so the bar is closed (not redrawn later) when an error ends training.
    with tqdm(
        total=total_steps,
        desc=f"{spec.name} (seed {spec.seed})",
        unit="step",
        disable=not accelerator.is_main_process,  # one bar per member, from its group's first rank
    ) as progress:
        for _epoch in range(epochs):
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(input_ids=batch, labels=batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                window_loss += loss.detach()
                window_batches += 1
                window_tokens += batch.numel() * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                step += 1
                progress.update(1)
                _inject_fault(spec, step)
                if step % t.logging_steps == 0 or step == total_steps:
                    mean_loss = accelerator.reduce(window_loss / window_batches, "mean").item()
                    if not math.isfinite(mean_loss):
                        raise EnsembleError(
                            f"{spec.name} (seed {spec.seed}): the training loss became {mean_loss} by "
                            f"step {step}; lower train.lr or enable train.max_grad_norm"
                        )
                    now = time.perf_counter()
                    tokens += window_tokens
                    tokens_per_s = window_tokens / (now - window_start)
                    metrics = {
                        "train/loss": mean_loss,
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/tokens_per_s": tokens_per_s,
                        "train/epoch": step / steps_per_epoch,
                    }
                    utilisation = mfu(
                        throughput["flops_per_token"],
                        tokens_per_s,
                        throughput["peak_tflops"],
                        accelerator.num_processes,
                    )
                    if utilisation is not None:
                        metrics["train/mfu"] = utilisation
                    accelerator.log(metrics, step=step)
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
                    last_loss = mean_loss
                    window_loss.zero_()
                    window_batches, window_tokens, window_start = 0, 0, now
                if step >= total_steps:
                    break
            if step >= total_steps:
                break
    seconds = time.perf_counter() - start
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    return {
        "steps": step,
        "epochs": epochs,
        "processes": accelerator.num_processes,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens_per_s,
        "final_loss": last_loss,
        **throughput,
        "mfu": mfu(
            throughput["flops_per_token"], tokens_per_s, throughput["peak_tflops"], accelerator.num_processes
        ),
    }


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


def train_run(cfg: ExperimentConfig) -> dict[str, Any]:
    """Check everything, prepare the data once, train every member on its group of ranks,
    evaluate the ensemble."""

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
        return _run(cfg, launch, zero, worlds)
    finally:
        worlds.close()


def _run(cfg: ExperimentConfig, launch: Any, zero: ZeroSetup | None, worlds: Worlds) -> dict[str, Any]:
    from accelerate import PartialState

    worlds.join("run", launch.rank, launch.world_size)

    def state() -> Any:  # re-created after each world switch, which resets Accelerate's state
        return PartialState(**state_kwargs(deepspeed=zero is not None, timeout_s=cfg.parallel.timeout_s))

    paths = RunPaths(Path(cfg.output.dir))
    specs = member_specs(cfg)
    # Cheap checks first: a mistake should cost seconds, not a dataset download.
    check_output_dir(paths, cfg.output.overwrite)
    base_config = load_model_config(cfg.model)
    block_size = resolve_block_size(cfg, base_config)
    layout = plan_layout(
        cfg.parallel, launch.world_size, len(specs), launch.local_world_size,
        fits=_member_fits(cfg, base_config, block_size, zero),
    )  # fmt: skip
    if zero:
        check_batch(zero, cfg, layout.group_size)
    if not needs_training_text(cfg.model):
        tokenizer = load_tokenizer(cfg.model)
    with worlds.main_first("data"):  # rank 0 fills the datasets cache (and trains a bpe tokenizer)
        raw = load_splits(cfg.data)
        if needs_training_text(cfg.model):
            if "train" not in raw:
                raise EnsembleError("model.tokenizer=bpe needs a training split to learn from")
            if launch.rank == 0:
                tokenizer = load_tokenizer(cfg.model, iter_texts(raw["train"], cfg.data), paths.tokenizer)
            else:  # the main process's tokenizer, never one trained separately
                tokenizer = load_pretrained_tokenizer(paths.tokenizer)
        data = prepare_data(cfg.data, tokenizer, block_size, raw=raw)
    model_config = fit_model_config(cfg.model, base_config, tokenizer)
    flops = flops_per_token(model_config, block_size)  # before any DeepSpeed plugin exists
    run_info = {"layout": layout.summary()}
    if launch.rank == 0:
        for line in layout.describe():
            logger.info(line)
        if cfg.output.overwrite:
            clear_previous_run(paths)
        paths.members.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(paths.members)
        remove_stale_tmp(paths.root)
        atomic_write_text(paths.config, cfg.to_yaml())
        write_manifest(paths, specs, data.fingerprint, run_info)
    state().wait_for_everyone()

    group = layout.group_of(launch.rank)
    if layout.num_groups > 1:
        worlds.join(f"group-{group}", layout.rank_in_group(launch.rank), layout.group_size)
    # INFO from each group's first rank (its member's progress), warnings from every rank.
    logging.getLogger().setLevel(logging.INFO if layout.rank_in_group(launch.rank) == 0 else logging.WARNING)
    started = time.perf_counter()
    for index in layout.members_of(group):
        train_member(cfg, specs[index], data, tokenizer, model_config, paths, zero, flops)
    worlds.wait_all("training")  # groups finish at different times (rounds, member sizes)
    if layout.num_groups > 1:
        worlds.join("evaluate", launch.rank, launch.world_size)
    run_info["timing"] = {"train_seconds": round(time.perf_counter() - started, 3)}
    logging.getLogger().setLevel(logging.INFO if launch.rank == 0 else logging.WARNING)

    if launch.rank == 0:
        write_manifest(paths, specs, data.fingerprint, run_info)
    # Every process takes part: the evaluator shards the test batches over the run's world.
    results = evaluate(
        [paths.member(s) for s in specs], cfg.data, cfg.eval, cfg.eval.split, paths.root, local_device(), data,
        main_first=worlds.main_first,
    )  # fmt: skip
    return results

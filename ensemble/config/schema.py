"""Typed experiment configuration: one dataclass per section, a docstring under every field.

A config is read from YAML (never executed), then dotted command-line overrides are applied
(``train.lr=3e-4 members.seeds=[1,2]``), then every value is type-checked and validated before
any work starts. The docstrings double as ``--help`` text (see :func:`describe`).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ensemble.errors import ConfigError, did_you_mean

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
BUILTIN_PYTHON_STDLIB = "builtin:python-stdlib"
# Texts that ship with the interpreter: real data on every machine, nothing to download
# (core/data.py holds their loaders, keyed by these names).
BUILTIN_TEXTS = (BUILTIN_PYTHON_DOCS, BUILTIN_PYTHON_STDLIB)
BYTE_TOKENIZER = "byte"
BPE_TOKENIZER = "bpe"
DEFAULT_ARCHITECTURE = "gpt2"  # of a model built from scratch without model.architecture


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Pretrained causal LM to fine-tune: a Hub name (`gpt2`) or a local directory saved with
    `save_pretrained`. Leave empty to build a new model from `architecture` and `config`."""

    architecture: str | None = None
    """Architecture of a model built from scratch: a transformers model type of a causal LM
    (`gpt2`, `llama`, `gpt_neox`, `qwen2`, `mistral`, ...), built with `AutoConfig.for_model`.
    Empty: `gpt2`."""

    config: dict[str, Any] = field(default_factory=dict)
    """Fields of that architecture's config for a model built from scratch (for `llama`:
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    max_position_embeddings...). vocab_size and the special token ids are taken from the tokenizer."""

    gpt2_config: dict[str, Any] = field(default_factory=dict)
    """`GPT2Config` fields (n_layer, n_embd, n_head, n_positions, dropout...): the same as
    `architecture: gpt2` with these as `config` (kept for existing configs)."""

    tokenizer: str | None = None
    """Tokenizer: a Hub name or local directory; `bpe` to train a GPT-2-style byte-level BPE on
    the training split; `byte` for one id per byte. Empty: the one saved with `name_or_path`.
    `bpe` and `byte` need no download."""

    tokenizer_vocab_size: int = 2048
    """Vocabulary size of a `bpe` tokenizer (including its 256 byte symbols and EOS)."""

    @property
    def model_type(self) -> str | None:
        """The architecture built from scratch (None for a pretrained model)."""
        return None if self.name_or_path else (self.architecture or DEFAULT_ARCHITECTURE)

    @property
    def scratch_fields(self) -> dict[str, Any]:
        """The config fields of a model built from scratch, whichever key gave them."""
        return dict(self.gpt2_config or self.config)

    def validate(self) -> None:
        if self.name_or_path and (self.gpt2_config or self.config or self.architecture):
            given = (
                "model.gpt2_config"
                if self.gpt2_config
                else ("model.config" if self.config else "model.architecture")
            )
            raise ConfigError(
                f"model.name_or_path and {given} are both set; set name_or_path to fine-tune a "
                "pretrained model, or architecture and config to build one from scratch, not both"
            )
        if self.gpt2_config and self.config:
            raise ConfigError(
                "model.gpt2_config and model.config are both set; move the fields into model.config "
                "(with model.architecture=gpt2)"
            )
        if self.gpt2_config and self.architecture not in (None, DEFAULT_ARCHITECTURE):
            raise ConfigError(
                f"model.gpt2_config describes a GPT-2 but model.architecture={self.architecture}; "
                "put the fields in model.config instead"
            )
        if not self.name_or_path and not self.tokenizer:
            raise ConfigError(
                "model.tokenizer is required when building a model from scratch; "
                "set it to a Hub name, a local directory, `bpe` or `byte`"
            )
        if self.tokenizer_vocab_size < 258:
            raise ConfigError(
                f"model.tokenizer_vocab_size={self.tokenizer_vocab_size} must be at least 258 "
                "(256 bytes, EOS and one merge)"
            )
        if self.model_type:
            from ensemble.core.architecture import causal_lm_types, config_fields

            known_types = causal_lm_types()
            if self.model_type not in known_types:
                raise ConfigError(
                    f"model.architecture={self.model_type} is not a causal-LM architecture of this "
                    f"transformers{did_you_mean(self.model_type, known_types)}; use a model type such as "
                    "gpt2, llama, gpt_neox, qwen2 or mistral"
                )
            key = "gpt2_config" if self.gpt2_config else "config"
            if "vocab_size" in self.scratch_fields:
                raise ConfigError(
                    f"model.{key}.vocab_size is set, but the vocabulary size comes from the tokenizer; "
                    f"remove it (set model.tokenizer_vocab_size for a bpe tokenizer)"
                )
            config_class, known = config_fields(self.model_type)
            for name in self.scratch_fields:
                if name not in known:
                    raise ConfigError(
                        f"unknown {config_class} field model.{key}.{name}{did_you_mean(name, known)}; "
                        f"see transformers' {config_class} for the fields"
                    )


@dataclass
class AdapterConfig:
    method: Literal["lora"] | None = None
    """Train each member as a small adapter on one frozen pretrained model (`model.name_or_path`)
    instead of fine-tuning all its weights: `lora` (PEFT's LoRA). Empty: every weight is trained.
    A member's seed sets its adapter's initialisation, its data order and its dropout."""

    r: int = 8
    """The rank of each adapter's update B·A."""

    alpha: float = 16.0
    """The update's scale is alpha / r."""

    dropout: float = 0.05
    """Dropout on each adapted layer's input, in training."""

    target_modules: list[str] = field(default_factory=list)
    """The base's layers that get an adapter, by name or name suffix (GPT-2: `c_attn`, `c_proj`,
    `c_fc`; llama: `q_proj`, `v_proj`, ...). Empty: PEFT's default for the architecture."""

    def validate(self) -> None:
        if self.method is None:
            return
        if self.r < 1:
            raise ConfigError(f"adapter.r={self.r} must be at least 1")
        if not self.alpha > 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    dataset: str | None = None
    """Hub dataset name (`lonestar108/enlightenedllm`), a local directory written by
    `Dataset.save_to_disk`, or a text that ships with CPython (real text on every machine, no
    download): `builtin:python-docs`, the reference manual (`pydoc_data.topics`), or
    `builtin:python-stdlib`, the source of the standard library's top-level modules (one
    document per module; the base the fine-tuning configs pretrain)."""

    dataset_config: str | None = None
    """Hub dataset configuration (subset) name, if the dataset has several."""

    train_files: list[str] = field(default_factory=list)
    """Local training files (txt, json/jsonl, csv or parquet), used instead of `dataset`."""

    validation_files: list[str] = field(default_factory=list)
    """Local validation files; when absent, a validation split is carved from train."""

    test_files: list[str] = field(default_factory=list)
    """Local test files; when absent, a test split is carved from train."""

    train_split: str = "train"
    """Name of the training split in the dataset."""

    validation_split: str = "validation"
    """Name of the validation split; carved from train when the dataset lacks it."""

    test_split: str = "test"
    """Name of the test split; carved from train when the dataset lacks it."""

    text_column: str | None = None
    """Column holding the text. Empty: the `text` column, else the only string column."""

    text_template: str | None = None
    """Python format string over several columns, e.g. "{instruction}\\n{output}"; used instead
    of `text_column`."""

    txt_sample_by: Literal["document", "paragraph", "line"] = "document"
    """How a local .txt file is split into examples: one document per file, one per blank-line
    separated paragraph, or one per line."""

    encoding: str = "utf-8"
    """Encoding of local text files (.txt, .json/.jsonl, .csv): any Python codec name, e.g.
    `latin-1` (many Project Gutenberg books). A file that does not decode is refused before any
    work, with its first bad byte."""

    validation_fraction: float = 0.1
    """Fraction of the train examples carved out as validation when the dataset has none."""

    test_fraction: float = 0.1
    """Fraction of the train examples carved out as test when the dataset has none."""

    split_seed: int = 0
    """Seed of the deterministic shuffle used to carve validation/test splits from train."""

    block_size: int | None = None
    """Tokens per block, for training and evaluation. Empty: the model's context length."""

    cache_dir: str | None = None
    """Directory of the `datasets` cache (tokenized data is cached there). Empty: the default
    (`HF_DATASETS_CACHE`)."""

    def validate(self) -> None:
        files = bool(self.train_files or self.test_files)
        if self.dataset and files:
            raise ConfigError(
                f"data.dataset={self.dataset} and data.train_files/test_files are both set; to use your "
                "own files add data.dataset=null, to use the dataset drop the files"
            )
        if not self.dataset and not files:
            raise ConfigError(
                "no data source: set data.dataset (a Hub name, a saved dataset or "
                f"{' / '.join(BUILTIN_TEXTS)}) or data.train_files/data.test_files (local files)"
            )
        if self.dataset and self.dataset.startswith("builtin:") and self.dataset not in BUILTIN_TEXTS:
            raise ConfigError(
                f"data.dataset={self.dataset} is not a built-in text{did_you_mean(self.dataset, BUILTIN_TEXTS)}; "
                f"use one of {', '.join(BUILTIN_TEXTS)}"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"data.encoding={self.encoding!r} is not a known encoding; use a Python codec name "
                "such as utf-8 or latin-1"
            ) from None
        if self.text_column and self.text_template:
            raise ConfigError("data.text_column and data.text_template are both set; set one")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"data.{name}={value} must be between 0 and 1 (exclusive)")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "data.validation_fraction + data.test_fraction must be below 1 so that some "
                "training data is left"
            )
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(
                f"data.block_size={self.block_size} is too small: a block needs at least 2 "
                "tokens to predict one"
            )


@dataclass
class MembersConfig:
    seeds: list[int] = field(default_factory=lambda: [42, 123, 456])
    """One member per seed. A member's seed sets its initialisation (when built from config), its
    data order and its dropout; nothing else differs between members."""

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("members.seeds is empty; give at least one seed, e.g. members.seeds=[42]")
        duplicates = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if duplicates:
            raise ConfigError(
                f"members.seeds has duplicate seeds {duplicates}; members that share a seed are "
                "identical, give each member its own seed"
            )
        for seed in self.seeds:
            if not 0 <= seed < 2**32:
                raise ConfigError(f"members.seeds: seed {seed} must be in [0, 2**32)")


@dataclass
class ParallelConfig:
    placement: Literal["auto", "parallel", "sequential"] = "auto"
    """How members share the launched processes. `parallel`: the ranks form groups, each group
    trains its own members (in rounds when there are more members than groups), data-parallel
    inside the group. `sequential`: all ranks train each member in turn. `auto`: `parallel` when a
    member fits its group's devices, else `sequential`."""

    group_size: int | None = None
    """Ranks per group under `parallel` (a divisor of the number of processes). Empty: as many
    groups as there are members, or fewer so that every group has the same number of ranks."""

    groups_within_node: bool = False
    """Require every group to sit on one node: the group size must divide the processes per node."""

    deepspeed: str | None = None
    """DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json) for launchers other than
    `accelerate launch`; with `accelerate launch`, the launcher config's deepspeed_config_file is
    used. Its "auto" values are filled from train.* (batch size, accumulation, clipping)."""

    timeout_s: int = 900
    """Seconds before a collective (or the start-up rendezvous) gives up. A rank waiting for a
    crashed peer fails after this instead of hanging."""

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"parallel.group_size={self.group_size} must be at least 1")
        if self.timeout_s < 1:
            raise ConfigError(f"parallel.timeout_s={self.timeout_s} must be at least 1")
        if self.placement == "sequential" and self.group_size is not None:
            raise ConfigError("parallel.group_size applies to placement=parallel or auto, not sequential")


@dataclass
class TrainConfig:
    num_epochs: int = 1
    """Passes over the training blocks (ignored when max_steps is set)."""

    max_steps: int | None = None
    """Stop after this many optimizer steps; overrides num_epochs."""

    per_device_batch_size: int = 16
    """Blocks per device per forward pass."""

    gradient_accumulation_steps: int = 1
    """Forward/backward passes per optimizer step. Global batch = per-device batch x processes
    x this."""

    lr: float = 5e-5
    """Peak learning rate of AdamW."""

    weight_decay: float = 0.01
    """AdamW weight decay, applied to weight matrices only (not biases or LayerNorm)."""

    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW beta1 and beta2."""

    adam_eps: float = 1e-8
    """AdamW epsilon."""

    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt"] = "linear"
    """Learning-rate schedule after warmup (transformers' `get_scheduler` names)."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; empty disables clipping."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """`auto`: bf16 on GPUs that support it, else fp16 on GPU, full precision on CPU (or what
    `accelerate launch --mixed_precision` says)."""

    compile: bool | Literal["auto"] = "auto"
    """Compile each member with `torch.compile` (in place: checkpoints and saved members are the
    same as without). `auto`: on CUDA, off on CPU; where compiling fails, `auto` logs it and runs
    eager, `true` stops with an error. The first steps are slower (compilation, logged)."""

    tf32: bool = True
    """Let float32 matmuls use TF32 tensor cores on CUDA while training (ignored on CPU)."""

    logging_steps: int = 10
    """Log loss, learning rate, tokens/s and MFU every this many optimizer steps."""

    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, for MFU. Empty: a table of known GPUs at the precision in use,
    or on CPU a measured float32 matmul rate."""

    def validate(self) -> None:
        positive = {
            "num_epochs": self.num_epochs,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "logging_steps": self.logging_steps,
        }
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name}={value} must be at least 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr={self.lr} must be a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(
                f"train.adam_betas={self.adam_betas} must be two numbers in [0, 1), e.g. [0.9,0.999]"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"train.peak_tflops={self.peak_tflops} must be positive (or null)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(
                f"train.max_grad_norm={self.max_grad_norm} must be positive (or null to disable)"
            )


@dataclass
class CheckpointConfig:
    every_steps: int | None = 200
    """Save a checkpoint of each member (weights, optimizer, scheduler, RNG states, data
    position, step) every this many optimizer steps; empty: only at epoch ends."""

    at_epoch_end: bool = True
    """Also save a checkpoint at the end of every epoch."""

    keep_last: int = 2
    """Checkpoints kept per member; older ones are deleted once a newer one is complete."""

    dir: str | None = None
    """Where checkpoints go (one folder per member). Empty: `<output.dir>/checkpoints`."""

    stop_check_steps: int = 10
    """Every this many optimizer steps the processes agree whether a stop signal (SIGTERM,
    SIGUSR1) arrived; a signal is honoured at the next such step. Checking is a host
    synchronisation (an all-reduce and a store lookup in multi-process runs), hence not every step."""

    def validate(self) -> None:
        if self.stop_check_steps < 1:
            raise ConfigError(f"checkpoint.stop_check_steps={self.stop_check_steps} must be at least 1")
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(
                f"checkpoint.every_steps={self.every_steps} must be at least 1 (or null for epoch ends only)"
            )
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be at least 1")


@dataclass
class EvalConfig:
    per_device_batch_size: int = 64
    """Blocks per device per evaluation step."""

    split: Literal["test", "validation"] = "test"
    """Split of the run's data that training evaluates the ensemble on at the end."""

    mode: Literal["data", "member"] = "data"
    """How evaluation uses several processes. `data`: the test batches are shared out between
    the processes, each runs every member. `member`: for members too large to sit together on
    one device: the processes form one group per member (the number of processes must be a
    multiple of the number of members), each holding only its member; groups see the same
    batches and exchange the members' distributions."""

    combiners: list[str] = field(default_factory=lambda: ["mean_prob", "mean_logit", "geometric", "weighted"])
    """Ensemble combinations to report, all from the same forward passes (the registered
    combiners: `mean_prob`, `mean_logit`, `geometric`, `weighted`; see ensemble/core/combining.py).
    `mean_prob` (the mixture of the members' probabilities) is always computed: it is the headline."""

    temperature_scaling: bool = False
    """Fit one temperature per member on the validation split (minimising its NLL) and divide
    the member's logits by it before everything else."""

    fit_split: Literal["validation", "test"] = "validation"
    """Split of the run's data on which mixture weights and temperatures are fitted."""

    bootstrap_samples: int = 1000
    """Bootstrap replicates (Poisson bootstrap over blocks) for the 95% intervals; 0 disables."""

    bootstrap_seed: int = 0
    """Seed of the bootstrap weights (each block's weights depend only on it and the block)."""

    chunk_tokens: int = 1024
    """Positions turned into full-vocabulary distributions at a time. Bounds evaluation memory:
    about chunk_tokens x vocabulary x 4 bytes x (members + 4)."""

    precision: Literal["auto", "float32", "bf16"] = "auto"
    """Precision of the members' bodies and heads (bf16 autocast, or float32); log-softmax,
    combiners and every sum stay float32 or float64. `auto`: bf16 on GPUs that support it,
    float32 on CPU. Written into results.json and the table's header."""

    compile: bool | Literal["auto"] = "auto"
    """Compile the full-vocabulary scoring of each chunk with `torch.compile` (fused passes, no
    host synchronisation). `auto`: on CUDA, off on CPU (compiling takes longer there than it
    saves on small runs); where compiling fails, `auto` runs eager, `true` stops with an error."""

    uncertainty: bool = True
    """Decompose the ensemble's uncertainty at every position (total = aleatoric + epistemic,
    and the pairwise KL between members) and score selective prediction (risk-coverage curves,
    AURC) for the members and the ensemble, in the same pass (see ensemble/evaluate/selective.py).
    `false` skips that work (it costs a few percent of evaluation throughput; see
    benchmarks/evaluation.py --uncertainty-cost); `--ood`, `--tokens-out` and `--html` need it."""

    soup: bool = True
    """When the members were fine-tuned from the same pretrained model, also evaluate the uniform
    average of their weights as one model (the `soup` row; see ensemble/core/soup.py). Members built
    from scratch are not souped (the reason is logged and recorded)."""

    plots: bool = True
    """Write ensemble_size.png, reliability.png and risk_coverage.png (and ood.png with
    `--ood`) next to results.json."""

    def validate(self) -> None:
        for name in ("per_device_batch_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be at least 1")
        if self.bootstrap_samples < 0:
            raise ConfigError(f"eval.bootstrap_samples={self.bootstrap_samples} must be >= 0")
        from ensemble.core.combining import COMBINERS, HEADLINE

        for name in self.combiners:
            if name not in COMBINERS:
                raise ConfigError(
                    f"eval.combiners: unknown combiner {name!r}{did_you_mean(name, COMBINERS)}; "
                    f"the registered ones are {', '.join(COMBINERS)}"
                )
        if HEADLINE not in self.combiners:
            self.combiners = [HEADLINE, *self.combiners]
        if len(set(self.combiners)) != len(self.combiners):
            raise ConfigError(f"eval.combiners={self.combiners} lists a combiner twice")


@dataclass
class DistillConfig:
    alpha: float = 1.0
    """Weight of the KL divergence to the ensemble in the student's loss; 1 - alpha weighs the
    cross-entropy on the training text. In [0, 1]: 1 is pure distillation (the default: on the
    default run it kept the most of the ensemble's gain, see the README), 0 plain training."""

    temperature: float = 1.0
    """Temperature T of the distillation term: KL(ensemble_T || student_T), where each member's
    and the student's logits are divided by T, times T^2 (Hinton et al.: keeps the gradient's scale
    independent of T). The cross-entropy term is at temperature 1."""

    seed: int = 0
    """The student's seed: its initialisation (from scratch), dropout and data order."""

    config: dict[str, Any] = field(default_factory=dict)
    """Architecture fields that differ from the members' for a student built from scratch (e.g.
    {n_layer: 1} for a smaller GPT-2). Empty: the members' architecture and size."""

    name_or_path: str | None = None
    """A pretrained causal LM as the student (Hub name or local directory), instead of one like
    the members; it must use the members' tokenizer and vocabulary."""

    mode: Literal["data", "member"] = "data"
    """How the teacher (the members, in inference mode) is computed across processes, as in
    `eval.mode`. `data`: every process holds every member and computes the mixture for its own
    batches. `member`: for members too large to sit together on one device: each process holds
    one member (the number of processes must be a multiple of the number of members) and the
    members' probabilities are summed across processes."""

    dir: str | None = None
    """Where the student is saved (Hugging Face format). Empty: `<output.dir>/student`."""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"distill.alpha={self.alpha} must be in [0, 1] (the weight of the KL to the ensemble; "
                "1 - alpha weighs the cross-entropy)"
            )
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"distill.temperature={self.temperature} must be a positive number")
        if self.config and self.name_or_path:
            raise ConfigError(
                "distill.config and distill.name_or_path are both set; size a student built from "
                "scratch with distill.config, or give a pretrained one with distill.name_or_path"
            )
        if "vocab_size" in self.config:
            raise ConfigError(
                "distill.config.vocab_size is set, but the student predicts over the members' "
                "vocabulary; remove it"
            )


@dataclass
class TrackingConfig:
    report_to: list[Literal["tensorboard", "wandb", "none"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: `tensorboard`, `wandb` (offline when no credentials are found), or
    `none`."""

    project: str = "seed-ensemble"
    """Tracker project name (the wandb project)."""

    run_name: str | None = None
    """Name of the run in the trackers. Empty: the output directory's name. Each member logs as
    `<run_name>/member-<i>`."""

    def validate(self) -> None:
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError(
                f"tracking.report_to={self.report_to} mixes `none` with trackers; use one or the other"
            )


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Run directory: members/, manifest.json, results.json, results.md, logs/."""

    overwrite: bool = False
    """Replace an existing run in `dir`. Without it an existing run is never touched."""


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The member architecture and tokenizer."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """Members as adapters on one frozen pretrained model (LoRA), instead of full fine-tunes."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the text comes from and how it becomes blocks of tokens."""

    members: MembersConfig = field(default_factory=MembersConfig)
    """The ensemble's members."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of each member."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How members are placed on the launched processes; DeepSpeed."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoints, for resuming after preemption or a crash."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Ensemble evaluation."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation of the ensemble into one student (launch/distill.py)."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""

    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.adapter.method and not self.model.name_or_path:
            raise ConfigError(
                f"adapter.method={self.adapter.method} adapts a pretrained model, but model.name_or_path "
                "is empty; set model.name_or_path to the base model (a Hub name or a saved directory)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

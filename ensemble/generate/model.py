"""The ensemble as a Hugging Face causal LM: it generates text and scores it.

`EnsembleForCausalLM` wraps finished members (a run directory, or member directories) in one
`PreTrainedModel`. Its forward returns, as ``logits``, the log of the members' combined next-token
distribution (any registered combiner, with the temperatures and mixture weights the evaluator
fitted), and it keeps one KV cache per member (:class:`EnsembleCache`), so transformers'
`generate()` works unchanged: greedy search, sampling, beam search, streaming. transformers has no
token-level ensemble of its own (its ``assistant_model`` is speculative decoding, for speed); the
design is fairseq's `EnsembleModel`: an incremental state per member, the log of the mean
probability.

Members may sit on different devices (one per GPU when they do not fit one): each runs where
its weights are, and its log-probabilities are combined on the first member's device.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ensemble.core.adapters import AdapterView
from ensemble.core.architecture import context_length
from ensemble.core.combining import COMBINERS, HEADLINE, Combiner
from ensemble.core.paths import RunPaths
from ensemble.core.results import fitted_weights, member_temperatures, read_results
from ensemble.core.uncertainty import Decomposition, Uncertainty
from ensemble.errors import EnsembleError, did_you_mean

if TYPE_CHECKING:
    from ensemble.core.loading import LoadedMember

logger = logging.getLogger(__name__)

# transformers 5.2x renamed the KV-cache argument and output field from `past_key_values` to
# `cache`; the ensemble speaks the name of the installed version to its members and to generate().
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------------------------
# Config, cache and output


class EnsembleConfig(PretrainedConfig):
    """What an ensemble is made of: its members and how their distributions are combined."""

    model_type = "seed-ensemble"

    def __init__(
        self,
        members: Sequence[str] = (),
        member_names: Sequence[str] = (),
        combiner: str = HEADLINE,
        weights: Sequence[float] | None = None,
        temperatures: Sequence[float] | None = None,
        vocab_size: int = 0,
        max_position_embeddings: int = 0,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.members = [str(m) for m in members]
        self.member_names = [str(m) for m in member_names]
        self.combiner = combiner
        self.weights = None if weights is None else [float(w) for w in weights]
        self.temperatures = (
            [float(t) for t in temperatures] if temperatures is not None else [1.0] * len(members)
        )
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings  # the shortest member context
        self.use_cache = use_cache
        super().__init__(**kwargs)


class EnsembleCache(Cache):
    """One KV cache per member. Its ``layers`` are all the members' layers, so what `generate`
    does to a cache (reorder it for beam search, select or repeat rows, crop it) is done to
    every member's. Not `Cache.__init__`: the layers belong to the members' caches, which may
    create them lazily, so they are read from there each time."""

    def __init__(self, caches: Sequence[Cache]) -> None:  # noqa: D107 - see the class
        self.members = list(caches)
        self.layer_class_to_replicate = None
        self.offloading = False

    @property
    def layers(self) -> list[Any]:  # type: ignore[override]
        return [layer for cache in self.members for layer in cache.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.members[0].get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False


@dataclass
class EnsembleOutput(CausalLMOutputWithPast):
    """A causal-LM output whose ``logits`` are the ensemble's log-probabilities; with
    ``output_uncertainty=True``, also the decomposition of its uncertainty per position."""

    uncertainty: Uncertainty | None = None


# --------------------------------------------------------------------------------------------
# The model


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """Members of one ensemble behind the interface of a transformers causal LM."""

    config_class = EnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"

    def __init__(self, config: EnsembleConfig, members: Sequence[torch.nn.Module]) -> None:
        super().__init__(config)
        if len(members) != len(config.temperatures):
            raise ValueError(f"{len(members)} members but {len(config.temperatures)} temperatures")
        self.members = torch.nn.ModuleList(members)
        self._combiner = combiner_named(config.combiner)
        self._log_weights = None if config.weights is None else np.log(np.asarray(config.weights))
        self._recorders: list[list[Uncertainty]] = []
        self.post_init()

    def initialize_weights(self) -> None:
        """Nothing to initialise: the members come trained. (post_init would otherwise
        re-initialise every member module transformers did not itself load, such as PEFT's
        adapter layers.)"""

    @classmethod
    def from_pretrained(
        cls, source: str | Path | Sequence[str | Path], *args: Any, **kwargs: Any
    ) -> EnsembleForCausalLM:  # type: ignore[override]
        """The ensemble of a run directory (or of member directories): :func:`load_ensemble`'s
        model, with its keyword arguments (``combiner``, ``devices``, ``dtype``...)."""
        if args:
            raise TypeError("EnsembleForCausalLM.from_pretrained takes keyword arguments after the source")
        return load_ensemble(source, **kwargs)[0]

    # transformers' generate() would build one DynamicCache for the whole model; the forward
    # builds an EnsembleCache instead (the route generate() keeps for models with their own cache).
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        """Where the ensemble's outputs are: the first member's device."""
        return next(self.members[0].parameters()).device

    @property
    def context(self) -> int:
        return int(self.config.max_position_embeddings)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.members[0].get_input_embeddings()

    def new_cache(self) -> EnsembleCache:
        return EnsembleCache([DynamicCache(config=m.config) for m in self.members])

    @contextlib.contextmanager
    def record_uncertainty(self) -> Iterator[list[Uncertainty]]:
        """Within the block, every forward appends the uncertainty at its last position (one
        value per row, on the CPU) to the yielded list: during `generate()` with one sequence
        per row (greedy search or sampling), entry t belongs to the t-th generated token."""
        steps: list[Uncertainty] = []
        self._recorders.append(steps)
        try:
            yield steps
        finally:
            self._recorders.remove(steps)

    def _cache_for(
        self, cache: EnsembleCache | None, use_cache: bool, new_positions: int
    ) -> EnsembleCache | None:
        """The cache to extend (a new one when caching and none is given), checked to fit."""
        if cache is None and use_cache:
            cache = self.new_cache()
        elif cache is not None and not isinstance(cache, EnsembleCache):
            raise EnsembleError(
                f"an ensemble keeps one cache per member; pass the cache it returned (an EnsembleCache), "
                f"not a {type(cache).__name__}, or none"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if past + new_positions > self.context:
            raise EnsembleError(
                f"the sequence needs {past + new_positions} positions but the members' context is "
                f"{self.context} tokens; shorten the prompt or generate fewer tokens"
            )
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EnsembleCache | None = None,
        past_key_values: EnsembleCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_uncertainty: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> EnsembleOutput:
        """``logits``: [batch, positions, vocab] log-probabilities of the combined distribution
        (float32, on the first member's device); ``loss``: its mean NLL of ``labels`` (shifted as
        in any causal LM, -100 ignored). Other keyword arguments of `generate()` (attention and
        hidden-state outputs) are not supported and ignored. The cache comes as ``cache`` or
        ``past_key_values``, whichever the installed transformers uses (see `CACHE_ARG`)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._cache_for(
            cache if cache is not None else past_key_values, use_cache, input_ids.shape[1]
        )
        out = self.device
        accumulator = self._combiner.start(None, self._log_weights)
        decomposition = Decomposition() if output_uncertainty or self._recorders else None
        for i, member in enumerate(self.members):
            where = next(member.parameters()).device
            logits = member(
                input_ids=input_ids.to(where),
                attention_mask=None if attention_mask is None else attention_mask.to(where),
                position_ids=None if position_ids is None else position_ids.to(where),
                use_cache=use_cache,
                **{CACHE_ARG: cache.members[i] if cache is not None else None},
                logits_to_keep=logits_to_keep,
            ).logits
            z = logits.to(out, torch.float32)
            if self.config.temperatures[i] != 1.0:
                z = z / self.config.temperatures[i]
            logp = (
                torch.log_softmax(z, dim=-1) if self._combiner.reads == "logprobs" or decomposition else None
            )
            accumulator.add(z if self._combiner.reads == "logits" else logp)
            if decomposition is not None:
                decomposition.add(logp)
            del logits, z
        logprobs = accumulator.result()
        uncertainty = decomposition.result() if decomposition is not None else None
        if uncertainty is not None:
            for steps in self._recorders:
                steps.append(uncertainty.map(lambda u: u[:, -1].cpu()))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.nll_loss(
                logprobs[:, :-1].flatten(0, 1), labels[:, 1:].to(out).flatten(), ignore_index=-100
            )
        return EnsembleOutput(
            loss=loss,
            logits=logprobs,
            uncertainty=uncertainty if output_uncertainty else None,
            **{CACHE_ARG: cache if use_cache else None},
        )


# --------------------------------------------------------------------------------------------
# Loading


def combiner_named(name: str) -> Combiner:
    if name not in COMBINERS:
        raise EnsembleError(
            f"unknown combiner {name!r}{did_you_mean(name, COMBINERS)}; choose one of {', '.join(COMBINERS)}"
        )
    return COMBINERS[name]


def _with_shared_bases(loaded: list[LoadedMember], placement: list[torch.device]) -> list[torch.device]:
    """Adapter members sharing one base sit on one device: the first one's."""
    first: dict[int, torch.device] = {}
    out = []
    for m, device in zip(loaded, placement, strict=True):
        shared = m.model.shared if isinstance(m.model, AdapterView) else None
        out.append(first.setdefault(id(shared), device) if shared is not None else device)
    if out != placement:
        logger.info("adapter members on one base share its device: %s", ", ".join(map(str, out)))
    return out


def resolve_devices(devices: str | Sequence[str] | None, members: int) -> list[torch.device]:
    """One device per member. ``None``: the first GPU, else the CPU; ``"auto"``: members spread
    round-robin over the visible GPUs (the CPU without any); one device: all members there; a
    list: member i on the i-th. A device that does not exist is refused."""
    gpus = torch.cuda.device_count()
    if devices is None:
        names = ["cuda:0" if gpus else "cpu"] * members
    elif isinstance(devices, str) and devices == "auto":
        names = [f"cuda:{i % gpus}" if gpus else "cpu" for i in range(members)]
    elif isinstance(devices, str):
        names = [devices] * members
    else:
        names = list(devices)
        if len(names) == 1:
            names *= members
        if len(names) != members:
            raise EnsembleError(
                f"{len(names)} devices for {members} members; give one device per member, or one for all"
            )
    out = []
    for name in names:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise EnsembleError(f"device {name!r} is not a device name; use e.g. cpu, cuda, cuda:1") from None
        if device.type == "cuda":
            index = 0 if device.index is None else device.index
            if index >= gpus:
                raise EnsembleError(
                    f"device {name} does not exist (this machine has {gpus} CUDA device(s)); "
                    + (f"use cuda:0 to cuda:{gpus - 1}, or cpu" if gpus else "use cpu")
                )
            device = torch.device("cuda", index)
        elif device.type != "cpu" and device.type != getattr(
            torch.accelerator.current_accelerator(), "type", None
        ):
            raise EnsembleError(f"device {name} does not exist on this machine; use cpu or a GPU")
        out.append(device)
    return out


def _resolve_dtype(dtype: torch.dtype | str | None, placement: list[torch.device]) -> torch.dtype | None:
    if dtype == "auto":
        bf16 = all(d.type == "cuda" and torch.cuda.is_bf16_supported() for d in placement)
        return torch.bfloat16 if bf16 else None
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise EnsembleError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    return dtype


def fitted_values(run_dir: Path, names: Sequence[str]) -> tuple[list[float], list[float] | None]:
    """(temperature per member, fitted mixture weights or None) from a run's results.json, for
    the members ``names`` in this order. Temperatures are 1 where none was fitted; weights are
    returned only when they were fitted for exactly these members."""
    path = RunPaths(Path(run_dir)).results_json
    if not path.is_file():
        return [1.0] * len(names), None
    results = read_results(path)
    temperature = member_temperatures(results)
    weights = fitted_weights(results)
    if [m["name"] for m in results["members"]] != list(names):
        weights = None  # fitted for another set of members
    return [temperature.get(n, 1.0) for n in names], weights


def _check_weights(
    fitted: list[float] | None, combiner: str, names: list[str], run_dir: Path | None
) -> list[float]:
    """The mixture weights a fitted combiner uses: given, or fitted for these members."""
    if fitted is None:
        where = f"{RunPaths(run_dir).results_json}" if run_dir is not None else "member directories"
        raise EnsembleError(
            f"combiner {combiner!r} needs mixture weights fitted for these {len(names)} members and "
            f"{where} has none; evaluate the run with launch/evaluate.py (eval.combiners including "
            f"{combiner}), or choose --combiner {HEADLINE}"
        )
    if (
        len(fitted) != len(names)
        or any(w < 0 for w in fitted)
        or not math.isclose(sum(fitted), 1.0, rel_tol=1e-6)
    ):
        raise EnsembleError(f"weights {list(fitted)} must be {len(names)} non-negative numbers summing to 1")
    return fitted


def load_ensemble(
    source: str | Path | Sequence[str | Path],
    combiner: str = HEADLINE,
    devices: str | Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    fitted_temperatures: bool = True,
    weights: Sequence[float] | None = None,
) -> tuple[EnsembleForCausalLM, Any]:
    """(the ensemble, its tokenizer), from a run directory (its finished members, with the
    temperatures and mixture weights its evaluation fitted, from results.json) or a list of
    member directories. Members with different tokenizers are refused. The tokenizer pads on the
    left (with the end-of-text token when it has no padding token), as batched generation needs.

    ``combiner``: any registered combiner (``mean_prob``, ``mean_logit``, ``geometric``,
    ``weighted``...). ``devices``: see :func:`resolve_devices`. ``dtype``: cast the members'
    weights (``torch.bfloat16`` or its name; ``"auto"``: bfloat16 when every member is on a GPU
    that supports it, else unchanged); the combination stays float32.
    ``fitted_temperatures=False`` ignores fitted temperatures. ``weights``: mixture weights
    for a fitted combiner, instead of the run's.
    """
    from ensemble.core.loading import load_members
    from ensemble.core.members import member_dirs

    spec = combiner_named(combiner)
    run_dir = Path(source) if isinstance(source, (str, Path)) else None
    paths = member_dirs(source)
    placement = resolve_devices(devices, len(paths))
    loaded = load_members(paths, "cpu")
    names = [m.name for m in loaded]
    temperatures, fitted = (
        fitted_values(run_dir, names) if run_dir is not None else ([1.0] * len(names), None)
    )
    if not fitted_temperatures:
        temperatures = [1.0] * len(names)
    if spec.fitted:
        fitted = _check_weights(list(weights) if weights is not None else fitted, combiner, names, run_dir)
    placement = _with_shared_bases(loaded, placement)
    dtype = _resolve_dtype(dtype, placement)
    # Frozen: scoring without torch.no_grad() then records no graph through the members' weights
    # (the combination is still differentiable, see combining._into, for who unfreezes them).
    models = [
        m.model.to(device=device, dtype=dtype).requires_grad_(False)
        for m, device in zip(loaded, placement, strict=True)
    ]
    tokenizer = loaded[0].tokenizer
    # Ready for batched generation: prompts of different lengths are padded on the left, so
    # that every row's next token follows its last real one.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = EnsembleConfig(
        members=[str(p) for p in paths],
        member_names=names,
        combiner=combiner,
        weights=fitted if spec.fitted else None,
        temperatures=temperatures,
        vocab_size=loaded[0].config.vocab_size,
        max_position_embeddings=min(context_length(m.config) for m in loaded),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = EnsembleForCausalLM(config, models).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model, tokenizer

"""Members as adapters: one frozen pretrained base, a seeded LoRA adapter per member (PEFT).

An adapter member's directory holds PEFT's files (``adapter_config.json``,
``adapter_model.safetensors``) beside the tokenizer and ``member.json``, so
``AutoPeftModelForCausalLM.from_pretrained(dir)`` loads it, and so does transformers'
``AutoModelForCausalLM.from_pretrained(dir)`` (which reads ``adapter_config.json``).
``member.json`` records the base: where it was loaded from and the digest of its weights, so
that a resume or an evaluation with another base is refused.

Where a process holds several members (the evaluator, generation, the distillation teacher), it
loads the base once and every adapter beside it (:func:`load_adapter_ensemble`); each member is
then an :class:`AdapterView` that switches the shared model to its adapter before it runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ensemble.config.schema import AdapterConfig
from ensemble.core.paths import ADAPTER_CONFIG, CONFIG, MEMBER_INFO
from ensemble.errors import EnsembleError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_adapter_member(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: Path) -> str:
    """Where an adapter member's base is loaded from (PEFT's ``base_model_name_or_path``)."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


# --------------------------------------------------------------------------------------------
# The base's identity


def base_digest(name_or_path: str) -> str:
    """sha256 over the base's weight files (names and contents): equal digests, same base.

    A Hub name is resolved to its cached snapshot (downloaded where the Hub is reachable)."""
    root = Path(name_or_path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        patterns = [f"*{s}" for s in WEIGHT_SUFFIXES]
        root = Path(snapshot_download(name_or_path, allow_patterns=patterns))
    files = sorted(f for f in root.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if not files:
        raise EnsembleError(f"base model {name_or_path} has no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def base_location(name_or_path: str) -> str:
    """A local directory by its absolute path (so that members load from wherever the run is
    read), a Hub name as it is."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


def base_record(name_or_path: str) -> dict[str, str]:
    """What a member's record says of its base."""
    return {"name_or_path": base_location(name_or_path), "sha256": base_digest(name_or_path)}


def check_base(what: str, recorded: dict[str, Any] | None, actual: dict[str, str], fix: str) -> None:
    """Refuse ``what`` (a checkpoint, a member) recorded with another base than ``actual``."""
    if recorded and recorded.get("sha256") != actual["sha256"]:
        raise EnsembleError(
            f"{what} was trained on base {recorded.get('name_or_path')} (weights sha256 "
            f"{str(recorded.get('sha256'))[:12]}...), not on {actual['name_or_path']} "
            f"({actual['sha256'][:12]}...); {fix}"
        )


# --------------------------------------------------------------------------------------------
# Building a member


def _adaptable_layers(model: torch.nn.Module) -> dict[str, type]:
    """The layers LoRA can adapt (linear layers and GPT-2's Conv1D), by their full name."""
    from transformers.pytorch_utils import Conv1D

    return {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and name.split(".")[-1] != "lm_head"
    }


def lora_config(cfg: AdapterConfig, base: torch.nn.Module) -> Any:
    """PEFT's LoraConfig for ``base``, its target layers checked against what the base has (an
    error names the layers that exist)."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from transformers.pytorch_utils import Conv1D

    layers = _adaptable_layers(base)
    kinds = ", ".join(sorted({n.split(".")[-1] for n in layers}))
    targets = list(cfg.target_modules) or DEFAULTS.get(base.config.model_type)
    if not targets:
        raise EnsembleError(
            f"PEFT has no default LoRA layers for {base.config.model_type}; set adapter.target_modules "
            f"to some of its layers: {kinds}"
        )
    chosen = {}
    for target in targets:
        matched = {n: t for n, t in layers.items() if n == target or n.endswith(f".{target}")}
        if not matched:
            raise EnsembleError(
                f"adapter.target_modules: {target} matches no linear layer of the base "
                f"({base.config.model_type}); its layers: {kinds}"
            )
        chosen.update(matched)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores its weight transposed; PEFT needs to be told (it warns otherwise)
        fan_in_fan_out=any(t is Conv1D for t in chosen.values()),
        task_type="CAUSAL_LM",
    )


def check_adapter(cfg: AdapterConfig, model_config: Any) -> None:
    """Refuse target layers the base does not have, before anything is loaded (the check runs on
    a weightless copy of the base, built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lora_config(cfg, AutoModelForCausalLM.from_config(model_config))


def attach_adapter(base: torch.nn.Module, cfg: AdapterConfig, seed: int, base_path: str) -> torch.nn.Module:
    """``base`` (loaded from ``base_path``) frozen, with a fresh LoRA adapter whose
    initialisation draws from a generator seeded with ``seed`` (and from nothing else)."""
    from peft import get_peft_model

    config = lora_config(cfg, base)
    config.base_model_name_or_path = base_location(base_path)  # what adapter_config.json records
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, config)


class BaseCache:
    """The base of the adapter members a process trains one after another, loaded from disk
    once: each member takes it as loaded (on the CPU) and hands it back without its adapter.
    Frozen, the base leaves a member's training as it came. (Not so under DeepSpeed, which casts
    and shards the module it is given: no cache there.)"""

    def __init__(self) -> None:
        self._base: torch.nn.Module | None = None

    def take(self, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        base, self._base = self._base, None
        return base if base is not None else load()

    def give_back(self, model: torch.nn.Module) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            # on the CPU, as loaded: the next adapter is then initialised from the CPU generator,
            # as it would be on a freshly loaded base
            self._base = model.unload().to("cpu").eval()


# --------------------------------------------------------------------------------------------
# Several members on one base


class AdapterView(torch.nn.Module):
    """One member of an adapter ensemble: the shared model, switched to this member's adapter
    whenever the member runs (its forward, its body)."""

    def __init__(self, shared: torch.nn.Module, adapter: str) -> None:
        super().__init__()
        self.shared = shared
        self.adapter = adapter
        self.config = shared.config
        # not a registered submodule: the body belongs to `shared` (state dicts, .to())
        object.__setattr__(self, "_body", _AdapterBody(self))

    def activate(self) -> None:
        if self.shared.active_adapter != self.adapter:
            self.shared.set_adapter(self.adapter)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.activate()
        return self.shared(*args, **kwargs)

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformer body (as transformers' ``base_model``), with this member's adapter."""
        return self._body

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.shared.get_output_embeddings()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.shared.get_input_embeddings()


def batched_hidden_states(
    views: list[AdapterView], ids: torch.Tensor, attention_mask: torch.Tensor, grouped: bool = True
) -> list[torch.Tensor]:
    """Each view's final hidden states for ``ids`` [batch, block], from one forward pass of the
    shared body over the batch repeated once per view, each copy through its view's adapter:
    with ``grouped``, every LoRA layer's updates for all views as one batched matmul
    (`_grouped_lora`); otherwise PEFT's mixed-batch inference (``adapter_names``, one per row)."""
    shared = views[0].shared
    if any(v.shared is not shared for v in views):
        raise ValueError("batched_hidden_states needs views of one shared model")
    n, rows = len(views), ids.shape[0]
    adapters = [v.adapter for v in views]
    if grouped and _groupable(shared, adapters):
        routing = _grouped_lora(shared, adapters)
    else:
        routing = shared.base_model._enable_peft_forward_hooks(
            adapter_names=[a for a in adapters for _ in range(rows)]
        )
    with routing:
        hidden = (
            shared.get_base_model()
            .base_model(ids.repeat(n, 1), attention_mask=attention_mask.repeat(n, 1), use_cache=False)
            .last_hidden_state
        )
    return list(hidden.split(rows))


# Our own grouped LoRA layer rather than PEFT's mixed-batch forward: PEFT's launches about four
# kernels per adapter in every layer (gather the adapter's rows, A, B, scatter back), so its cost
# grows with N in exactly what one pass is meant to save on a GPU. The batch here is one
# contiguous block of rows per member, so each layer's updates for all members are two batched
# matmuls whatever N (x [N, rows, in] @ A [N, in, r] @ B [N, r, out]). On CPU the two measured
# the same (benchmarks/adapters.py, docs/performance.md#adapter-members).


def _lora_layers(shared: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in shared.modules() if isinstance(m, LoraLayer)]


def _groupable(shared: torch.nn.Module, adapters: list[str]) -> bool:
    """Plain LoRA on linear layers in inference: no DoRA or other variant, no LoRA bias, no
    dropout in training mode (those go through PEFT's own forward)."""
    for layer in _lora_layers(shared):
        for a in adapters:
            if a not in layer.lora_A:
                continue
            dropout = layer.training and not isinstance(layer.lora_dropout[a], torch.nn.Identity)
            variant = a in getattr(layer, "lora_variant", {})
            if variant or dropout or layer.lora_B[a].bias is not None:
                return False
    return True


@contextlib.contextmanager
def _grouped_lora(shared: torch.nn.Module, adapters: list[str]) -> Iterator[None]:
    """While open, every LoRA layer of ``shared`` adds adapter i's update to the i-th block of
    rows of its input (the batch repeated once per adapter, in ``adapters``' order)."""
    patched = []
    for layer in _lora_layers(shared):
        present = [a for a in adapters if a in layer.lora_A]
        if not present:
            continue
        first = layer.lora_A[present[0]].weight
        rank = max(layer.lora_A[a].weight.shape[0] for a in present)
        out_features = layer.lora_B[present[0]].weight.shape[0]
        # ranks may differ between members: zero-padded rows of A and columns of B add nothing
        down = first.new_zeros(len(adapters), first.shape[1], rank)
        up = first.new_zeros(len(adapters), rank, out_features)
        for i, a in enumerate(adapters):
            if a in layer.lora_A:
                r = layer.lora_A[a].weight.shape[0]
                down[i, :, :r] = layer.lora_A[a].weight.t()
                up[i, :r] = layer.lora_B[a].weight.t() * layer.scaling[a]
        layer.forward = functools.partial(_grouped_forward, layer, down, up)
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again


def _grouped_forward(
    layer: Any, down: torch.Tensor, up: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    blocks = x.to(down.dtype).reshape(down.shape[0], -1, x.shape[-1])
    update = torch.bmm(torch.bmm(blocks, down), up)
    return (result + update.reshape(result.shape)).to(result.dtype)


class _AdapterBody(torch.nn.Module):
    def __init__(self, view: AdapterView) -> None:
        super().__init__()
        object.__setattr__(self, "view", view)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.view.activate()
        return self.view.shared.get_base_model().base_model(*args, **kwargs)


def merged_model(path: Path) -> torch.nn.Module:
    """An adapter member as a plain transformers model: its update B·A merged into the base's
    weights (what ``AutoModelForCausalLM.from_pretrained`` then loads without PEFT)."""
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload()


def save_merged(member: Path, dest: Path) -> None:
    """Write adapter member ``member`` merged into a full Hugging Face model at ``dest``
    (atomically; an existing ``dest`` is refused): a member directory like a full fine-tune's,
    whose member.json also says what it was merged from."""
    from transformers import AutoTokenizer

    from ensemble.core.members import read_member_info, weight_digests
    from ensemble.files import atomic_directory, atomic_write_json

    if not is_adapter_member(member):
        raise EnsembleError(
            f"{member} is not an adapter member (no {ADAPTER_CONFIG}); it is a full model already"
        )
    if dest.exists():
        raise EnsembleError(f"{dest} exists; remove it or pass another --output")
    info = read_member_info(member)
    model = merged_model(member)
    try:
        with atomic_directory(dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(member).save_pretrained(tmp)
            (tmp / CONFIG).write_bytes((member / CONFIG).read_bytes())
            record = {
                **info,
                "merged_from": str(Path(member).resolve()),
                "weights_sha256": weight_digests(tmp),
            }
            atomic_write_json(tmp / MEMBER_INFO, record)  # last: marks a finished member
    except OSError as e:
        raise EnsembleError(f"could not write {dest} ({e.strerror or e}); nothing partial was kept") from None


def load_adapter_ensemble(
    paths: list[Path], infos: list[dict[str, Any]], device: torch.device | str
) -> list[AdapterView]:
    """The adapters of ``paths`` (their member.json records: ``infos``) on one base, loaded
    once: one view per member. A base whose weights differ from those a member was trained on
    is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bases = {adapter_base(p) for p in paths}
    if len(bases) > 1:
        raise EnsembleError(
            f"adapter members of different bases ({', '.join(sorted(bases))}) cannot share one model; "
            "evaluate members of one base together"
        )
    adapters = [f"m{i}" for i in range(len(paths))]  # PEFT's adapter names may not contain '.'
    base_path = bases.pop()
    actual = base_record(base_path)
    for path, info in zip(paths, infos, strict=True):
        check_base(
            f"member {info.get('name', Path(path).name)} ({path})",
            info.get("base"),
            actual,
            "restore the base it was trained on, or re-train the member on this one",
        )
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path)
        shared = PeftModel.from_pretrained(base, str(paths[0]), adapter_name=adapters[0])
        for path, adapter in zip(paths[1:], adapters[1:], strict=True):
            shared.load_adapter(str(path), adapter_name=adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise EnsembleError(
            f"cannot load the adapter members on base {base_path} ({first_line(e)}); check that the "
            "base is where their adapter_config.json says"
        ) from None
    shared = shared.to(device).eval()
    return [AdapterView(shared, a).eval() for a in adapters]

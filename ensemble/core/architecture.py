"""Members of any causal-LM architecture transformers can build from a config.

A model built from scratch is named by its transformers model type (`model.architecture`:
`gpt2`, `llama`, `gpt_neox`, `qwen2`, ...) and its config fields (`model.config`), and built with
`AutoConfig.for_model`. Everything else in the package reads the few facts it needs about a model
through :func:`model_shape` and :func:`count_parameters`, not through architecture-specific
attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ensemble.errors import EnsembleError

if TYPE_CHECKING:
    from ensemble.config.schema import ExperimentConfig

# Config attributes that hold the context length, in order of preference (transformers maps
# `max_position_embeddings` to each architecture's own name, e.g. GPT-2's n_positions).
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def causal_lm_types() -> list[str]:
    """The model types transformers can build as causal LMs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def config_fields(model_type: str) -> tuple[str, set[str]]:
    """(the name of an architecture's config class, its fields and their aliases)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    return type(config).__name__, set(config.to_dict()) | set(getattr(config, "attribute_map", {}))


def build_config(model_type: str, fields: dict[str, Any], **overrides: Any) -> Any:
    """An architecture's `PretrainedConfig` from its fields (checked by config validation)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**overrides, **fields})


@dataclass(frozen=True)
class ModelShape:
    """What placement, throughput and the memory estimate need to know about a model."""

    context: int  # tokens of context
    width: int  # hidden size
    layers: int
    heads: int
    attention_width: int  # heads x head dimension (the width of the attention products)


def model_shape(model_config: Any) -> ModelShape:
    context = next((int(v) for a in _CONTEXT_ATTRIBUTES if (v := getattr(model_config, a, None))), None)
    if context is None:
        raise EnsembleError(
            f"cannot tell the context length of a {model_config.model_type} model; set data.block_size explicitly"
        )
    width, heads = int(model_config.hidden_size), int(model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or width // heads
    return ModelShape(context, width, int(model_config.num_hidden_layers), heads, heads * int(head_dim))


def context_length(model_config: Any) -> int:
    return model_shape(model_config).context


def lookup_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters of embedding tables that are read by lookup, not multiplied: learned position
    embeddings (GPT-2's `wpe`, OPT's `embed_positions`) and token embeddings that are not tied to
    the output layer (Llama's and GPT-NeoX's by default). A tied token embedding is the output
    layer's weight, a matmul, and stays. Rotary and ALiBi models have no position table."""
    head = model.get_output_embeddings()
    tied = head.weight if head is not None else None
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.weight is not tied:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def count_parameters(model_config: Any, lookups: bool = True) -> int:
    """Parameters of the model a config describes, counted without allocating them (a tied
    embedding once); with ``lookups=False``, only those that multiply activations (see
    :func:`lookup_parameter_names`), as the FLOPs count needs."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    skip = set() if lookups else lookup_parameter_names(model)
    return sum(p.numel() for name, p in model.named_parameters() if name not in skip)


def resolve_block_size(cfg: ExperimentConfig, model_config: Any) -> int:
    """data.block_size, or the model's context when unset; refused when longer than the context."""
    ctx = context_length(model_config)
    block_size = cfg.data.block_size or ctx
    if block_size > ctx:
        raise EnsembleError(
            f"data.block_size={block_size} exceeds the model's context of {ctx} tokens; "
            f"set data.block_size <= {ctx}"
        )
    return block_size

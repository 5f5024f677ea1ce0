"""Small flat adapters that say where each family keeps its projections and norms.

Minitron (arXiv 2407.14679) prunes heads, FFN neurons, embedding channels and layers of
any decoder-only transformer; what differs between Hugging Face families is only where
the pieces live and a few quirks (Qwen2 q/k/v biases, Qwen3 and Gemma3 q_norm/k_norm,
Gemma3 scaled embeddings, ``(1 + w)`` RMSNorm and sandwich norms, per-layer
``layer_types``). Each supported ``model_type`` maps to one frozen :class:`ArchAdapter`
in the plain dict :data:`ADAPTERS`; everything else in minicompress reads the model
through it. :func:`count_parameters` is the closed-form size of a config, used both to
plan targets and to check that a rewritten model is exactly what its config says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import MinicompressError


@dataclass(frozen=True)
class ArchAdapter:
    """Where one model family keeps its parts (module names inside a decoder layer).

    Attributes:
        model_type: the Hugging Face ``model_type``.
        attn: name of the attention module in a layer.
        mlp: name of the MLP module in a layer.
        input_norms: norms whose outputs feed the attention and the MLP, in that order
            (their outputs measure embedding-channel importance).
        output_norms: sandwich norms applied to a sublayer's output before the residual
            add (Gemma3); empty for pre-norm-only families.
        norm_offset: RMSNorm multiplies by ``norm_offset + weight`` (1.0 for Gemma).
        qkv_bias: q/k/v projections always carry a bias (Qwen2), independent of config.
        qk_norm: attention has per-head ``q_norm`` / ``k_norm`` over ``head_dim``.
        scaled_embeddings: the embedding output is multiplied by sqrt(hidden_size).
        per_layer_keys: config keys holding one entry per layer (re-indexed on drop).
        hidden_divisible_by_heads: the transformers config rejects a ``hidden_size`` that
            is not a multiple of ``num_attention_heads`` (llama, gemma3 in transformers 5),
            even with an explicit ``head_dim``.
        q_proj, k_proj, v_proj, o_proj: the attention projections inside ``attn`` (the
            input of ``o_proj`` is the heads' output, scored per head).
        gate_proj, up_proj, down_proj: the gated MLP's projections inside ``mlp`` (the
            input of ``down_proj`` is the neurons' output, scored per neuron).
        q_norm, k_norm: the per-head norms of ``qk_norm`` families.
    """

    model_type: str
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    output_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    qkv_bias: bool = False
    qk_norm: bool = False
    scaled_embeddings: bool = False
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    hidden_divisible_by_heads: bool = False
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"

    @property
    def all_layer_norms(self) -> tuple[str, ...]:
        """Every hidden-size norm inside a decoder layer."""
        return self.input_norms + self.output_norms


ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", hidden_divisible_by_heads=True),
    "mistral": ArchAdapter("mistral"),
    "qwen2": ArchAdapter("qwen2", qkv_bias=True),
    "qwen3": ArchAdapter("qwen3", qk_norm=True),
    "gemma3_text": ArchAdapter(
        "gemma3_text",
        input_norms=("input_layernorm", "pre_feedforward_layernorm"),
        output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_offset=1.0,
        qk_norm=True,
        scaled_embeddings=True,
        hidden_divisible_by_heads=True,
    ),
}


def get_adapter(obj: Any) -> ArchAdapter:
    """The adapter for a model, a config, or a ``model_type`` string.

    Raises:
        MinicompressError: the model type is not supported.
    """
    if isinstance(obj, str):
        model_type = obj
    else:
        config = getattr(obj, "config", obj)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise MinicompressError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a ``*ForCausalLM``."""
    return model.model.layers


def embed_tokens(model: nn.Module) -> nn.Embedding:
    """The token embedding of a ``*ForCausalLM``."""
    return model.model.embed_tokens


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last block of a ``*ForCausalLM``."""
    return model.model.norm


def head_dim(config: Any) -> int:
    """Per-head width: the explicit ``head_dim`` or ``hidden_size // num_attention_heads``."""
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def num_kv_heads(config: Any) -> int:
    """KV heads (defaults to the query heads, as transformers does)."""
    value = getattr(config, "num_key_value_heads", None)
    return int(value) if value else config.num_attention_heads


def count_parameters(config: Any) -> dict[str, int]:
    """Closed-form parameter count of a supported config.

    A tied ``lm_head`` is counted once (inside ``embedding``).

    Args:
        config: a transformers config of a supported ``model_type``.

    Returns:
        ``{"embedding", "lm_head", "attention", "mlp", "norms", "total", "non_embedding"}``.
    """
    adapter = get_adapter(config)
    hidden, vocab = config.hidden_size, config.vocab_size
    layers, ffn = config.num_hidden_layers, config.intermediate_size
    heads, kv, hd = config.num_attention_heads, num_kv_heads(config), head_dim(config)
    attention_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))

    attn = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden
    if adapter.qkv_bias or attention_bias:
        attn += heads * hd + 2 * kv * hd
    if attention_bias:
        attn += hidden
    if adapter.qk_norm:
        attn += 2 * hd
    mlp = 3 * hidden * ffn + ((2 * ffn + hidden) if mlp_bias else 0)
    layer_norms = len(adapter.all_layer_norms) * hidden

    embedding = vocab * hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    out = {
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": layers * attn,
        "mlp": layers * mlp,
        "norms": layers * layer_norms + hidden,
    }
    out["total"] = sum(out.values())
    out["non_embedding"] = out["total"] - embedding - lm_head
    return out


def describe(config: Any) -> dict[str, Any]:
    """Architecture summary used by ``minicompress info``.

    Returns:
        A flat dict: model type, layers, hidden, heads, KV heads, head_dim, FFN, vocab,
        tied embeddings, per-layer attention types, and the parameter breakdown.
    """
    get_adapter(config)
    summary = {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": num_kv_heads(config),
        "head_dim": head_dim(config),
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "hidden_act": getattr(config, "hidden_act", getattr(config, "hidden_activation", None)),
    }
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        summary["layer_types"] = {t: layer_types.count(t) for t in sorted(set(layer_types))}
        if getattr(config, "sliding_window", None):
            summary["sliding_window"] = config.sliding_window
    summary["parameters"] = count_parameters(config)
    return summary


def tied_groups(model: nn.Module) -> list[list[str]]:
    """``state_dict`` names grouped by the tensor they name, in state-dict order (a tied
    ``lm_head.weight`` is in the embedding's group)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def lm_head_weight(model: nn.Module):
    """``[V, H]`` output projection weight (the embedding when tied)."""
    return model.get_output_embeddings().weight


def logit_softcap(model: nn.Module) -> float | None:
    """``final_logit_softcapping`` of the config (Gemma), or None."""
    return getattr(model.config, "final_logit_softcapping", None) or None


def compute_logits(model: nn.Module, hidden):
    """Logits of final hidden states, with the family's soft-capping.

    Args:
        model: a supported ``*ForCausalLM``.
        hidden: ``[..., H]`` post-final-norm hidden states.

    Returns:
        ``[..., V]`` logits in the head's dtype.
    """
    import torch

    logits = model.get_output_embeddings()(hidden)
    cap = logit_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits

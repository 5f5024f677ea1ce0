"""Causal self-attention for training on CPU: the flash forward, a faster compiled backward.

The backward is FlashAttention-2's (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", arXiv:2307.08691): from the forward's output ``O`` and
row log-sum-exp ``lse`` it recomputes ``P = exp(Q K^T s - lse)`` (causal) and forms
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P (dP - rowsum(dO O))``, ``dQ = s dS K`` and
``dK = s dS^T Q``. PyTorch's CPU flash-attention backward walks this in small blocks; at
the lengths a recovery trains on (512 tokens) the whole ``[B, heads, L, L]`` fits in
memory, so here it runs as six batched bf16 GEMMs (AMX) with the elementwise work fused by
inductor. Measured on a 2-core AMX Xeon for ``[4, 9, 512, 64]`` bf16 (issue 18,
``benchmarks/RESULTS.md``): 14 ms against 26 ms, within bf16 rounding of the float64 result.
Eager (not compiled) it is slower than the flash kernel, so :func:`use_training_attention_`
is only applied to decoder layers that go through ``torch.compile``.

The forward is PyTorch's own CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``),
so outputs are identical to ``attn_implementation="sdpa"``. Anything but plain causal
self-attention (a mask, a sliding window, dropout, soft-capping, a cache, no gradient,
another device) falls through to transformers' ``sdpa`` function.
"""

from __future__ import annotations

import torch

#: The ``attn_implementation`` name this module registers with transformers.
NAME = "minicompress_causal"


class _CausalAttention(torch.autograd.Function):
    """``softmax(Q K^T * scale + causal) V`` with the FlashAttention-2 backward in whole-sequence GEMMs."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):  # the inputs come in one dtype (see the caller)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                                 scale=scale)[:2]
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grads = attention_backward(query, key, value, out, lse, d_out.to(query.dtype).contiguous(), ctx.scale)
        return (*grads, None)


def attention_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, d_out: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of causal attention from its output and row log-sum-exp (FlashAttention-2).

    The whole ``[L, L]`` square is computed and masked (skipping its all-masked upper-right
    blocks measured no faster at ``L = 512``: the extra slicing costs what it saves).

    Args:
        query: ``[B, H, L, D]``.
        key: ``[B, H, L, D]`` (key/value heads already repeated to ``H``).
        value: ``[B, H, L, D]``.
        out: ``[B, H, L, D]`` the forward's output.
        lse: ``[B, H, L]`` float32 ``logsumexp_j(q_i k_j * scale)`` over the causal keys.
        d_out: ``[B, H, L, D]`` gradient of the output.
        scale: the softmax scale.

    Returns:
        ``(d_query, d_key, d_value)``, each ``[B, H, L, D]`` in the inputs' dtype.
    """
    length = query.shape[-2]
    rows = torch.arange(length, device=query.device)
    causal = rows.unsqueeze(1) >= rows.unsqueeze(0)  # [L, L]
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    probs = torch.where(causal, torch.exp(scores - lse.unsqueeze(-1)), 0.0)  # [B, H, L, L] float32
    d_value = torch.matmul(probs.to(query.dtype).transpose(-1, -2), d_out)
    d_probs = torch.matmul(d_out, value.transpose(-1, -2)).float()
    delta = (d_out.float() * out.float()).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
    d_scores = (probs * (d_probs - delta) * scale).to(query.dtype)
    d_query = torch.matmul(d_scores, key)
    d_key = torch.matmul(d_scores.transpose(-1, -2), query)
    return d_query, d_key, d_value


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, KV, L, D]`` -> ``[B, KV * groups, L, D]``, each key/value head repeated ``groups`` times."""
    if groups == 1:
        return states
    b, kv, length, d = states.shape
    return states[:, :, None].expand(b, kv, groups, length, d).reshape(b, kv * groups, length, d)


def causal_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function (transformers): :class:`_CausalAttention` for plain causal
    self-attention with gradients on CPU, transformers' ``sdpa`` for everything else.

    Args:
        module: the attention module (``num_key_value_groups``, ``is_causal``).
        query: ``[B, H, L, D]``.
        key: ``[B, KV, L, D]``.
        value: ``[B, KV, L, D]``.
        attention_mask: None for plain causal attention (transformers skips the mask then).
        dropout: attention dropout probability.
        scaling: the softmax scale (None: ``D ** -0.5``).
        **kwargs: the other keywords transformers passes (``sliding_window``, ``softcap``...).

    Returns:
        ``([B, L, H, D] output, None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (attention_mask is None and dropout == 0.0 and query.device.type == "cpu" and torch.is_grad_enabled()
             and query.shape[-2] == key.shape[-2] > 1 and getattr(module, "is_causal", True)
             and kwargs.get("is_causal", True) is not False and kwargs.get("sliding_window") is None
             and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and kwargs.get("s_aux") is None and not kwargs.get("output_attentions", False))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # what sdpa does under autocast: its inputs in the autocast dtype (RoPE in a float32 residual
    # stream hands over float32 queries and keys); the kernels below then run with autocast off
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    out = _CausalAttention.apply(query.to(dtype).contiguous(), _repeat_kv(key.to(dtype), groups).contiguous(),
                                 _repeat_kv(value.to(dtype), groups).contiguous(), scale)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make :data:`NAME` a valid ``attn_implementation`` (its masks are sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, causal_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_training_attention_(model: torch.nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to :data:`NAME` in place (other implementations are left).

    Returns:
        Whether it switched (undo with :func:`restore_attention_`).
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    config._attn_implementation = NAME
    return True


def restore_attention_(model: torch.nn.Module) -> None:
    """Undo :func:`use_training_attention_`: :data:`NAME` goes back to ``sdpa`` (anything else is left)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.config._attn_implementation = "sdpa"

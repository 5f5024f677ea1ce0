"""Distillation losses for Minitron-style compression of causal language models.

This module is pure PyTorch and imports nothing else from ``minicompress``.

It provides

* per-token divergences on logits -- forward KL, reverse KL, the generalised
  Jensen-Shannon divergence of GKD, a top-k (offline-cache) forward KL, cross
  entropy and the ``final_logit_softcapping`` helper;
* :func:`chunked_distill_loss`, a fused "lm_head + loss" in the style of
  Liger-Kernel's fused linear losses, which never materialises the full
  ``[N, V]`` logits of the batch: it walks over token chunks, computes each
  chunk's loss and its gradients w.r.t. the hidden states and the lm_head
  weight in the forward pass, and only rescales them in the backward pass;
  its inputs beyond the student's are three small frozen objects: the teacher's side
  (:class:`TeacherTargets`: one teacher, or the mixture of several teachers'
  distributions), the loss (:class:`LogitLoss`) and the numerics
  (:class:`LossNumerics`);
* :class:`IntermediateStateLoss`, :func:`dynamic_weight` and
  :func:`default_layer_map` for the intermediate-state (hidden state)
  distillation of Minitron.

References:
    * Muralidharan et al., "Compact Language Models via Pruning and Knowledge
      Distillation" (Minitron), arXiv:2407.14679 -- logit KD with forward KL,
      intermediate-state loss through a shared learned linear map, and the
      dynamic weighting of the intermediate-state loss.
    * Sreenivas et al., "LLM Pruning and Distillation in Practice: The
      Minitron Approach", arXiv:2408.11796 -- logit-only forward-KL
      distillation used for the Llama-3.1/Mistral-NeMo Minitron models.
    * Agarwal et al., "On-Policy Distillation of Language Models: Learning
      from Self-Generated Mistakes" (GKD), arXiv:2306.13649 -- generalised
      Jensen-Shannon divergence JSD(beta) and reverse KL for distillation.
    * Hinton et al., "Distilling the Knowledge in a Neural Network",
      arXiv:1503.02531 -- temperature softening and the ``tau**2`` scaling.
    * Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training",
      arXiv:2410.10989 -- chunked fused linear + loss with gradients computed
      in the forward pass.
    * You et al., "Learning from Multiple Teacher Networks", KDD 2017, and Liu et
      al., "Adaptive Multi-Teacher Multi-level Knowledge Distillation",
      arXiv:2103.04062 -- distillation towards a weighted average of several
      teachers' softened distributions (the mixture target of
      :meth:`TeacherTargets.mixture`).

Conventions:
    * Logits are ``[N, V]`` (tokens x vocabulary); callers flatten batch and
      sequence first (inputs with more leading dimensions are flattened
      here, too).  ``mask`` is an optional ``[N]`` bool tensor of valid
      tokens; every divergence returns the MEAN over the valid tokens (0.0
      when there are none).
    * All math is done in float32 whatever the input dtype (float64 inputs
      stay float64), and every loss is returned as a float32 scalar (float64
      for float64 inputs).  Gradients flow back in the inputs' dtypes.
    * Every divergence is computed on ``logits / temperature`` and multiplied
      by ``temperature**2`` (Hinton et al.) so that gradient magnitudes do not
      depend on the temperature.  Cross entropy is never temperature-scaled.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LOSS_KINDS, SPARSE_LOSS_KINDS

__all__ = [
    "DIVERGENCE_KINDS",
    "softcap",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "topk_kl",
    "cross_entropy",
    "chunked_distill_loss",
    "TeacherTargets",
    "LogitLoss",
    "LossNumerics",
    "auto_chunk_size",
    "IntermediateStateLoss",
    "dynamic_weight",
    "default_layer_map",
]

#: Values accepted by ``LogitLoss(kind=...)``: the config's list (one list).
DIVERGENCE_KINDS = LOSS_KINDS
#: Kinds whose teacher is a sparse target per token (from a teacher cache).
SPARSE_KINDS = SPARSE_LOSS_KINDS


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """Logit soft-capping ``cap * tanh(logits / cap)``.

    Used by models whose config has ``final_logit_softcapping`` (e.g. Gemma-2);
    apply it to the raw lm_head output, before any temperature scaling.

    Args:
        logits: Tensor of any shape, e.g. ``[N, V]``.
        cap: The soft cap (> 0), or ``None`` for the identity.

    Returns:
        Tensor of the same shape and dtype as ``logits`` (``logits`` itself if
        ``cap`` is ``None``).
    """
    if cap is None:
        return logits
    if cap <= 0:
        raise ValueError(f"softcap cap must be > 0, got {cap}")
    return torch.tanh(logits / cap) * cap


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Flattens ``[..., V]`` to ``[N, V]``."""
    return x.reshape(-1, x.shape[-1])


def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcasts to float32 (float64 inputs are kept in float64)."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _masked_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_token`` ``[N]`` over ``mask`` ``[N]`` (0 if nothing valid)."""
    if mask is None:
        if per_token.numel() == 0:
            return per_token.sum()
        return per_token.mean()
    mask = mask.reshape(-1).to(device=per_token.device, dtype=torch.bool)
    if mask.shape[0] != per_token.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} entries for {per_token.shape[0]} tokens")
    total = torch.where(mask, per_token, per_token.new_zeros(())).sum()
    return total / mask.sum().clamp_min(1).to(per_token.dtype)


def _kl_from_logprobs(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(P || Q) = sum_v p_v (log p_v - log q_v)``.

    Args:
        p_logp: ``[N, V]`` log-probabilities of P.
        q_logp: ``[N, V]`` log-probabilities of Q.

    Returns:
        ``[N]`` KL divergences.  Entries with ``p_v == 0`` contribute exactly 0
        (also when ``log p_v = log q_v = -inf``), without NaN gradients.
    """
    p = p_logp.exp()
    positive = p > 0
    diff = torch.where(positive, p_logp - q_logp, p_logp.new_zeros(()))
    return (p * diff).sum(-1)


def _per_token_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return _kl_from_logprobs(t_logp, s_logp)


def _per_token_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return _kl_from_logprobs(s_logp, t_logp)


def _per_token_jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return _per_token_forward_kl(s_logp, t_logp)
    if beta == 1.0:
        return _per_token_reverse_kl(s_logp, t_logp)
    # log M = log(beta * P_t + (1 - beta) * P_s), computed stably.
    a = t_logp + math.log(beta)
    b = s_logp + math.log1p(-beta)
    # Where both are -inf (tokens impossible under both models) logaddexp has
    # NaN gradients; evaluate it on zeros there and put -inf back.
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = a.new_zeros(())
    log_m = torch.where(both, a, torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b)))
    return beta * _kl_from_logprobs(t_logp, log_m) + (1.0 - beta) * _kl_from_logprobs(s_logp, log_m)


def _per_token_topk_kl(
    s_logp_full: torch.Tensor, t_topk_scaled: torch.Tensor, t_idx: torch.Tensor
) -> torch.Tensor:
    t_logp = torch.log_softmax(t_topk_scaled, dim=-1)
    s_logp = torch.gather(s_logp_full, -1, t_idx)
    return _kl_from_logprobs(t_logp, s_logp)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


# --------------------------------------------------------------------------
# per-token divergences on logits
# --------------------------------------------------------------------------
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward KL ``tau^2 * KL(p_teacher || p_student)``, the Minitron logit loss.

    ``p = softmax(logits / tau)`` for both models; computed in float32.

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype).
        teacher_logits: ``[N, V]`` teacher logits.
        temperature: Softening temperature ``tau > 0``.
        mask: Optional ``[N]`` bool, True for tokens that count.

    Returns:
        float32 scalar: the mean over valid tokens.
    """
    _check_temperature(temperature)
    s = torch.log_softmax(_up(_flat(student_logits)) / temperature, dim=-1)
    t = torch.log_softmax(_up(_flat(teacher_logits)) / temperature, dim=-1)
    return _masked_mean(_per_token_forward_kl(s, t), mask) * (temperature ** 2)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reverse KL ``tau^2 * KL(p_student || p_teacher)`` (mode seeking; GKD).

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype).
        teacher_logits: ``[N, V]`` teacher logits.
        temperature: Softening temperature ``tau > 0``.
        mask: Optional ``[N]`` bool, True for tokens that count.

    Returns:
        float32 scalar: the mean over valid tokens.
    """
    _check_temperature(temperature)
    s = torch.log_softmax(_up(_flat(student_logits)) / temperature, dim=-1)
    t = torch.log_softmax(_up(_flat(teacher_logits)) / temperature, dim=-1)
    return _masked_mean(_per_token_reverse_kl(s, t), mask) * (temperature ** 2)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence JSD(beta) of GKD (arXiv:2306.13649).

    ``M = beta * P_t + (1 - beta) * P_s`` and
    ``JSD(beta) = beta * KL(P_t || M) + (1 - beta) * KL(P_s || M)``, with
    ``P = softmax(logits / tau)``; the result is multiplied by ``tau^2``.

    The limits are defined as in the GKD reference code (and TRL):
    ``beta == 0`` gives the forward KL ``KL(P_t || P_s)`` and ``beta == 1``
    the reverse KL ``KL(P_s || P_t)``.  (The unnormalised JSD(beta) itself
    vanishes at both ends; ``JSD(beta) / beta -> KL(P_t || P_s)`` as
    ``beta -> 0`` and ``JSD(beta) / (1 - beta) -> KL(P_s || P_t)`` as
    ``beta -> 1``, so these are the natural non-degenerate limits.)  The
    gradient flows through ``M`` as well.

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype).
        teacher_logits: ``[N, V]`` teacher logits.
        beta: Interpolation weight in ``[0, 1]``.
        temperature: Softening temperature ``tau > 0``.
        mask: Optional ``[N]`` bool, True for tokens that count.

    Returns:
        float32 scalar: the mean over valid tokens.
    """
    _check_temperature(temperature)
    _check_beta(beta)
    s = torch.log_softmax(_up(_flat(student_logits)) / temperature, dim=-1)
    t = torch.log_softmax(_up(_flat(teacher_logits)) / temperature, dim=-1)
    return _masked_mean(_per_token_jsd(s, t, float(beta)), mask) * (temperature ** 2)


def topk_kl(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward KL against a teacher truncated to its top-k logits (offline KD).

    The teacher distribution is ``softmax(topk_logits / tau)`` renormalised
    over its k entries; the student log-probabilities are the FULL-vocabulary
    ``log_softmax(student_logits / tau)`` gathered at the top-k indices, so
    the loss is ``CE(p_t^k, p_s) - H(p_t^k)`` -- a proper cross entropy
    against the truncated teacher minus its (constant) entropy -- times
    ``tau^2``.  With ``k == V`` it equals :func:`forward_kl`.

    Args:
        student_logits: ``[N, V]`` student logits (any float dtype).
        teacher_topk_logits: ``[N, k]`` teacher logits at its top-k tokens.
        teacher_topk_indices: ``[N, k]`` int64 vocabulary ids of those tokens.
        temperature: Softening temperature ``tau > 0``.
        mask: Optional ``[N]`` bool, True for tokens that count.

    Returns:
        float32 scalar: the mean over valid tokens.
    """
    _check_temperature(temperature)
    s = torch.log_softmax(_up(_flat(student_logits)) / temperature, dim=-1)
    vals = _up(_flat(teacher_topk_logits)) / temperature
    idx = _flat(teacher_topk_indices).to(device=s.device, dtype=torch.long)
    if vals.shape != idx.shape or vals.shape[0] != s.shape[0]:
        raise ValueError(
            f"top-k shapes {tuple(vals.shape)} / {tuple(idx.shape)} do not match {s.shape[0]} tokens"
        )
    return _masked_mean(_per_token_topk_kl(s, vals, idx), mask) * (temperature ** 2)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross entropy over ``labels != ignore_index``.

    Labels must already be aligned with the logits (shifted by the caller).

    Args:
        logits: ``[N, V]`` logits (any float dtype; computed in float32).
        labels: ``[N]`` int64 target ids, ``ignore_index`` for ignored tokens.
        ignore_index: Label value to ignore.

    Returns:
        float32 scalar (0.0 if every label is ignored).
    """
    z = _up(_flat(logits))
    y = labels.reshape(-1).to(device=z.device, dtype=torch.long)
    total = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum")
    count = (y != ignore_index).sum().clamp_min(1)
    return total / count.to(total.dtype)


# --------------------------------------------------------------------------
# chunked fused lm_head + distillation loss
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _ChunkConfig:
    kind: str
    kl_weight: float
    ce_weight: float
    temperature: float
    beta: float
    chunk_size: Optional[int]
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]
    ignore_index: int
    matmul_dtype: torch.dtype
    need_grad_h: bool
    need_grad_w: bool
    compiled: bool = False
    normalizer: Optional[int] = None
    mixture: bool = False


#: Floor of a mixture's log-probabilities: tokens outside every cached top-k member have
#: probability 0 (log -inf); a finite floor keeps ``0 * (log p - log q)`` from becoming NaN.
LOG_FLOOR = -1e4


@dataclass(frozen=True, eq=False)
class _Mixture:
    """The members of a mixture target, flattened to ``[N, ...]`` (see :meth:`TeacherTargets.mixture`).

    Attributes:
        hidden: per member, ``[N, H_i]`` live hidden states or None (a cached member).
        weight: per member, its ``[V, H_i]`` lm_head weight or None.
        softcap: per member, its ``final_logit_softcapping`` or None.
        vals: per member, ``[N, k]`` cached top-k logits or None (a live member).
        idx: per member, ``[N, k]`` int64 token ids of ``vals`` or None.
        log_w: float32 log of the normalised weights, ``[T]`` or per token ``[N, T]``.
    """

    hidden: tuple
    weight: tuple
    softcap: tuple
    vals: tuple
    idx: tuple
    log_w: torch.Tensor

    @property
    def per_token(self) -> bool:
        return self.log_w.dim() == 2


def _lm_head_logits(h: torch.Tensor, w_mm: torch.Tensor) -> torch.Tensor:
    """``h @ w_mm.T`` as float32 ``[c, V]``; the matmul runs in ``w_mm``'s dtype."""
    return (h.to(w_mm.dtype) @ w_mm.t()).to(torch.float32)


def _chunk_losses(
    z: torch.Tensor,
    t_logits: Optional[torch.Tensor],
    t_vals: Optional[torch.Tensor],
    t_idx: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    cfg: _ChunkConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) KL and CE of one chunk whose rows are all valid.

    Args:
        z: ``[c, V]`` float32 raw student logits.
        t_logits: ``[c, V]`` float32 teacher logits (after softcap) or None.
        t_vals: ``[c, k]`` teacher top-k logits (``topk_kl``) or the teacher log-probs of
            ``k`` sampled tokens (``sampled_kl``), or None.
        t_idx: ``[c, k]`` their token ids or None.
        labels: ``[c]`` labels or None.
        cfg: Loss configuration.

    Returns:
        ``(kl_sum, ce_sum)`` float32 scalars; KL includes the ``tau^2`` factor.
    """
    z = softcap(z, cfg.student_softcap)
    zero = z.new_zeros(())
    kl_sum, ce_sum = zero, zero
    if cfg.kl_weight != 0.0:
        tau = cfg.temperature
        s_logp = torch.log_softmax(z / tau, dim=-1)
        if cfg.kind == "topk_kl":
            per_tok = _per_token_topk_kl(s_logp, t_vals.to(torch.float32) / tau, t_idx)
        elif cfg.kind == "sampled_kl":  # tau is 1: the draws came from the untempered teacher
            per_tok = (t_vals.to(torch.float32) - s_logp.gather(-1, t_idx)).mean(dim=-1)
        else:
            t_logp = torch.log_softmax(t_logits / tau, dim=-1)
            if cfg.kind == "forward_kl":
                per_tok = _per_token_forward_kl(s_logp, t_logp)
            elif cfg.kind == "reverse_kl":
                per_tok = _per_token_reverse_kl(s_logp, t_logp)
            else:
                per_tok = _per_token_jsd(s_logp, t_logp, cfg.beta)
        kl_sum = per_tok.sum() * (tau ** 2)
    if cfg.ce_weight != 0.0:
        ce_sum = F.cross_entropy(z, labels, ignore_index=cfg.ignore_index, reduction="sum")
    return kl_sum, ce_sum


class _ChunkedDistillFunction(torch.autograd.Function):
    """Fused lm_head + KD loss; gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, w, t_h, t_w, labels, t_vals, t_idx, mix: Optional[_Mixture], cfg: _ChunkConfig):
        device = h.device
        n_tokens = h.shape[0]
        need_grad = cfg.need_grad_h or cfg.need_grad_w

        # Compact the valid tokens: ignored positions never reach the vocab matmul.
        if labels is not None:
            valid_idx = (labels != cfg.ignore_index).nonzero().squeeze(1)
        else:
            valid_idx = torch.arange(n_tokens, device=device)
        n_valid = int(valid_idx.numel())
        denom = float(cfg.normalizer if cfg.normalizer else max(n_valid, 1))

        grad_h = torch.zeros_like(h) if cfg.need_grad_h else None
        grad_w32 = None  # float32 [V, H]: the first chunk's product, then the sum over chunks
        kl_total = torch.zeros((), dtype=torch.float32, device=device)
        ce_total = torch.zeros((), dtype=torch.float32, device=device)

        with torch.autocast(device_type=device.type, enabled=False):
            mm = cfg.matmul_dtype
            use_teacher = cfg.kl_weight != 0.0 and cfg.kind not in SPARSE_KINDS
            chunk = n_valid if cfg.chunk_size is None else cfg.chunk_size
            chunk = max(chunk, 1)
            fast = _use_fast_path(cfg, use_teacher)
            sparse = cfg.kl_weight != 0.0 and cfg.kind in SPARSE_KINDS
            fused = fast and cfg.compiled and not sparse and mix is None  # a mixture runs the eager closed form
            ws = _workspace(min(chunk, max(n_valid, 1)), w.shape[0], w.shape[1], device, mm,
                            need_grad and cfg.need_grad_w, fused) if fast else None
            # one cast of each weight per call (none when the dtypes agree), into a reused buffer
            w_mm = _cast(w.detach(), mm, ws, "student")
            t_w_mm = _cast(t_w.detach(), mm, ws, "teacher") if use_teacher and mix is None else None
            mix_w_mm = tuple(None if m_w is None else _cast(m_w.detach(), mm, ws, f"teacher{i}")
                             for i, m_w in enumerate(mix.weight)) if use_teacher and mix is not None else None
            scale = torch.tensor(1.0 / denom, dtype=torch.float32, device=device) if fused else None

            for start in range(0, n_valid, chunk):
                idx = valid_idx[start:start + chunk]
                h_c = h.detach().index_select(0, idx)
                lab_c = labels.index_select(0, idx) if labels is not None else None
                t_logits = t_vals_c = t_idx_c = None
                with torch.no_grad():
                    if sparse:
                        t_vals_c = t_vals.index_select(0, idx)
                        t_idx_c = t_idx.index_select(0, idx)
                n = idx.numel()
                if fused:  # one compiled kernel over the chunk's low-precision logits
                    with torch.no_grad():
                        z = torch.mm(h_c.to(mm), w_mm.t(), out=ws.low[:n])
                        if use_teacher:
                            t_logits = torch.mm(t_h.detach().index_select(0, idx).to(mm), t_w_mm.t(), out=ws.t[:n])
                        g_z = ws.g[:n] if need_grad else None
                        key = (cfg.kl_weight, cfg.ce_weight, cfg.temperature, mm, use_teacher,
                               lab_c is not None, g_z is not None)
                        rows_kl, rows_ce = _compiled_chunk(key)(z, t_logits, lab_c, g_z, scale, cfg.kl_weight,
                                                                cfg.ce_weight, cfg.temperature)
                        # rows summed in float64 (a single float32 sum over the chunk drifts by ~1e-4 relative)
                        kl_c = rows_kl.sum(dtype=torch.float64).float() if rows_kl is not None else kl_total.new_zeros(())
                        ce_c = rows_ce.sum(dtype=torch.float64).float() if rows_ce is not None else kl_total.new_zeros(())
                elif fast:  # closed form in preallocated buffers: no [c, V] allocation per chunk
                    z, q = ws.z[:n], ws.q[:n]
                    low = ws.low[:n] if ws.low is not None else None
                    with torch.no_grad():
                        _logits_into(z, low, h_c, w_mm)
                        if use_teacher:
                            t_logits = ws.t[:n]
                            if mix is None:
                                _logits_into(t_logits, low, t_h.detach().index_select(0, idx), t_w_mm)
                            else:  # t <- log p_mix, p <- p_mix; q is free until the student's softmax
                                _mixture_into_(t_logits, ws.p[:n], q, low, mix, mix_w_mm, idx, cfg.temperature)
                        kl_c, ce_c, g_z = _closed_form_chunk(z, q, t_logits, ws.p[:n] if use_teacher else None,
                                                             t_vals_c, t_idx_c, lab_c, cfg,
                                                             1.0 / denom if need_grad else None)
                else:  # softcap, reverse KL, JSD...: autograd on the chunk's loss
                    with torch.no_grad():
                        if use_teacher and mix is None:
                            t_logits = _lm_head_logits(t_h.detach().index_select(0, idx), t_w_mm)
                            t_logits = softcap(t_logits, cfg.teacher_softcap)
                        elif use_teacher:
                            t_logits = _mixture_logits(mix, mix_w_mm, idx, w.shape[0], mm, cfg.temperature)
                        z = _lm_head_logits(h_c, w_mm)
                    if not need_grad:
                        with torch.no_grad():
                            kl_c, ce_c = _chunk_losses(z, t_logits, t_vals_c, t_idx_c, lab_c, cfg)
                    else:
                        with torch.enable_grad():
                            z.requires_grad_(True)
                            kl_c, ce_c = _chunk_losses(z, t_logits, t_vals_c, t_idx_c, lab_c, cfg)
                            loss_c = (cfg.kl_weight * kl_c + cfg.ce_weight * ce_c) / denom
                            (g_z,) = torch.autograd.grad(loss_c, z)
                        g_z = g_z.detach()
                        kl_c, ce_c = kl_c.detach(), ce_c.detach()
                if need_grad:
                    # d loss / d h = g_z @ W ;  d loss / d W = g_z^T @ h
                    if g_z.dtype == mm:
                        g_mm = g_z
                    elif fast and ws.low is not None:  # the logits' low-precision buffer is free now
                        g_mm = ws.low[:n].copy_(g_z)
                    else:
                        g_mm = g_z.to(mm)
                    if cfg.need_grad_h:
                        grad_h.index_copy_(0, idx, (g_mm @ w_mm).to(grad_h.dtype))
                    if cfg.need_grad_w:
                        if mm == torch.float32:
                            if grad_w32 is None:
                                grad_w32 = g_mm.t() @ h_c.to(torch.float32)
                            else:
                                grad_w32.addmm_(g_mm.t(), h_c.to(torch.float32))
                        else:  # low-precision GEMM, float32 accumulation across chunks
                            gw = ws.grad_w if fast else None
                            part = (torch.mm(g_mm.t(), h_c.to(mm), out=gw) if gw is not None
                                    else g_mm.t() @ h_c.to(mm))
                            grad_w32 = part.to(torch.float32) if grad_w32 is None else grad_w32.add_(part)
                    del g_z, g_mm
                kl_total += kl_c
                ce_total += ce_c
                del z, t_logits

        kl_mean = kl_total / denom
        ce_mean = ce_total / denom
        loss = cfg.kl_weight * kl_mean + cfg.ce_weight * ce_mean

        grad_w = None
        if cfg.need_grad_w:
            grad_w = grad_w32.to(w.dtype) if grad_w32 is not None else torch.zeros_like(w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        out_h = out_w = None
        unit = grad_loss.numel() == 1 and float(grad_loss) == 1.0  # the usual loss.backward(): no copies
        if grad_h is not None and ctx.needs_input_grad[0]:
            out_h = grad_h if unit else grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None and ctx.needs_input_grad[1]:
            out_w = grad_w if unit else grad_w * grad_loss.to(grad_w.dtype)
        return out_h, out_w, None, None, None, None, None, None, None


def _use_fast_path(cfg: _ChunkConfig, has_teacher_logits: bool) -> bool:
    """Whether :func:`_closed_form_chunk` computes this loss (the
    common recovery settings).

    Forward KL on full teacher logits (one teacher or a mixture) or on cached sparse
    targets (top-k or sampled) and/or cross-entropy, no soft-capping (a mixture's members
    are soft-capped one by one in :func:`_mixture_into_`), and a temperature of 1 whenever CE is on (CE
    uses the raw logits, KL the tempered ones).
    """
    if cfg.student_softcap is not None or cfg.teacher_softcap is not None:
        return False
    if cfg.kl_weight != 0.0 and not ((cfg.kind == "forward_kl" and has_teacher_logits) or cfg.kind in SPARSE_KINDS):
        return False
    return cfg.ce_weight == 0.0 or cfg.kl_weight == 0.0 or cfg.temperature == 1.0


class _Workspace:
    """Preallocated ``[c, V]`` buffers of the closed-form chunk loss, reused across calls.

    On CPU a fresh ``[c, V]`` float32 tensor (192 MiB for 1,024 tokens of SmolLM2's
    49,152-token vocabulary) comes from ``mmap`` and page-faults on first touch: measured, allocating
    and filling one costs 4x an in-place pass over it. Reusing these buffers makes every
    chunk's elementwise work in-place.

    Attributes:
        z: ``[c, V]`` float32: student logits, then student log-probs (eager path).
        q: ``[c, V]`` float32: student probs, then the logit gradient (eager path).
        t: ``[c, V]`` teacher logits: float32, then log-probs (eager path); in the
            matmul dtype for the compiled path.
        p: ``[c, V]`` float32: teacher probs (eager path).
        low: ``[c, V]`` in the matmul dtype when it is not float32 (logits and gradient
            in bf16 for the GEMMs), else None (eager path); the student logits in the
            matmul dtype (compiled path).
        g: ``[c, V]`` logit gradient in the matmul dtype (compiled path), else None.
        grad_w: ``[V, H]`` in the matmul dtype for one chunk's ``g^T h``, else None.
        casts: ``{"student": [V, H], "teacher": [V, H_t]}`` weight copies in the matmul dtype.
    """

    def __init__(self, key: tuple, rows: int, vocab: int, hidden: int, device, mm: torch.dtype, want_grad_w: bool,
                 compiled: bool = False):
        self.key = key
        low = mm != torch.float32
        f32 = dict(dtype=torch.float32, device=device)
        self.z = self.q = self.t = self.p = self.low = self.g = None
        if compiled:  # the compiled kernel reads and writes the matmul dtype only
            self.low = torch.empty(rows, vocab, dtype=mm, device=device)
            self.t = torch.empty(rows, vocab, dtype=mm, device=device)
            self.g = torch.empty(rows, vocab, dtype=mm, device=device)
        else:
            self.z, self.q = torch.empty(rows, vocab, **f32), torch.empty(rows, vocab, **f32)
            self.t, self.p = torch.empty(rows, vocab, **f32), torch.empty(rows, vocab, **f32)
            self.low = torch.empty(rows, vocab, dtype=mm, device=device) if low else None
        self.grad_w = torch.empty(vocab, hidden, dtype=mm, device=device) if (low and want_grad_w) else None
        self.casts: dict[str, torch.Tensor] = {}  # low-precision copies of the lm_head weights


_WORKSPACE: dict[str, _Workspace] = {}


def _workspace(rows: int, vocab: int, hidden: int, device, mm: torch.dtype, want_grad_w: bool,
               compiled: bool = False) -> _Workspace:
    """The cached :class:`_Workspace` for these sizes (one is kept; other sizes replace it)."""
    key = (rows, vocab, hidden, str(device), mm, want_grad_w, compiled)
    ws = _WORKSPACE.get("current")
    if ws is None or ws.key != key:
        _WORKSPACE.pop("current", None)
        ws = _WORKSPACE["current"] = _Workspace(key, rows, vocab, hidden, device, mm, want_grad_w, compiled)
    return ws


def _cast(weight: torch.Tensor, dtype: torch.dtype, ws: Optional[_Workspace], name: str) -> torch.Tensor:
    """``weight.to(dtype)``, written into a buffer of ``ws`` that later calls reuse."""
    if weight.dtype == dtype:
        return weight
    if ws is None:
        return weight.to(dtype)
    buf = ws.casts.get(name)
    if buf is None or buf.shape != weight.shape or buf.dtype != dtype:
        buf = ws.casts[name] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return buf.copy_(weight)


def release_workspace() -> None:
    """Free the cached buffers of :func:`chunked_distill_loss` (they are rebuilt on demand)."""
    _WORKSPACE.clear()


def _logits_into(out: torch.Tensor, low: Optional[torch.Tensor], h: torch.Tensor, w_mm: torch.Tensor) -> None:
    """``out[:] = h @ w_mm.T`` (float32 ``[c, V]``), the GEMM in ``w_mm``'s dtype via ``low``."""
    if low is None:
        torch.mm(h.to(w_mm.dtype), w_mm.t(), out=out)
    else:
        torch.mm(h.to(w_mm.dtype), w_mm.t(), out=low)
        out.copy_(low)


def _log_softmax_(x: torch.Tensor, probs: torch.Tensor) -> None:
    """In place, row-wise: ``x <- log_softmax(x)`` and ``probs <- softmax(x)``, no allocation
    of ``[c, V]`` (``torch.logsumexp`` allocates ``x - max``)."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    torch.exp(x, out=probs)
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    x.sub_(total.log_())


def _mixture_into_(
    t: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    low: Optional[torch.Tensor],
    mix: _Mixture,
    weights_mm: tuple,
    idx: torch.Tensor,
    temperature: float,
) -> None:
    """The mixture target of one chunk, in place: ``t <- log p_mix``, ``p <- p_mix``.

    ``log p_mix = logsumexp_i(log w_i + log_softmax(t_i / tau))`` accumulated member by
    member with ``torch.logaddexp(..., out=t)``: each member's tempered log-probs go into
    ``p`` (the first straight into ``t``), ``q`` is the exp scratch of their softmax, so
    no ``[c, V]`` buffer beyond the closed form's own is needed. A cached top-k member
    has log-prob ``-inf`` outside its top-k; ``log p_mix`` is floored at
    :data:`LOG_FLOOR` so that tokens outside every member's support get probability 0
    without NaN. Members whose weight is 0 on every token of the chunk are skipped.

    Args:
        t: ``[c, V]`` float32 buffer; becomes ``log p_mix`` (tempered, floored).
        p: ``[c, V]`` float32 buffer; becomes ``p_mix``.
        q: ``[c, V]`` float32 scratch.
        low: ``[c, V]`` buffer in the matmul dtype for low-precision GEMMs, or None.
        mix: the members (:class:`_Mixture`).
        weights_mm: per member, its lm_head weight in the matmul dtype, or None.
        idx: ``[c]`` token rows of the chunk.
        temperature: ``tau``.
    """
    log_w = mix.log_w.index_select(0, idx) if mix.per_token else mix.log_w  # [c, T] or [T]
    members = range(len(mix.hidden))
    if mix.per_token:  # one sync per chunk; per-source teachers leave most members idle
        members = [i for i, used in enumerate(torch.isfinite(log_w).any(0).tolist()) if used]
    first = True
    for i in members:
        dst = t if first else p
        if mix.hidden[i] is not None:
            _logits_into(dst, low, mix.hidden[i].detach().index_select(0, idx), weights_mm[i])
            if mix.softcap[i] is not None:
                dst.div_(mix.softcap[i]).tanh_().mul_(mix.softcap[i])
            if temperature != 1.0:
                dst.div_(temperature)
            _log_softmax_(dst, q)
        else:
            vals = mix.vals[i].index_select(0, idx).to(torch.float32)
            dst.fill_(-math.inf).scatter_(1, mix.idx[i].index_select(0, idx),
                                          torch.log_softmax(vals / temperature, dim=-1))
        dst.add_(log_w[:, i:i + 1] if mix.per_token else log_w[i])
        if not first:
            torch.logaddexp(t, p, out=t)
        first = False
    t.clamp_(min=LOG_FLOOR)
    torch.exp(t, out=p)


def _mixture_logits(mix: _Mixture, weights_mm: tuple, idx: torch.Tensor, vocab: int, mm: torch.dtype,
                    temperature: float) -> torch.Tensor:
    """Effective teacher logits ``tau * log p_mix`` ``[c, V]`` float32 of one chunk (allocated).

    ``log_softmax(tau * log p_mix / tau)`` is ``log p_mix`` itself, so every divergence of
    :func:`_chunk_losses` (forward and reverse KL, JSD) takes the mixture unchanged.
    """
    n, device = idx.numel(), idx.device
    t = torch.empty(n, vocab, dtype=torch.float32, device=device)
    p, q = torch.empty_like(t), torch.empty_like(t)
    low = torch.empty(n, vocab, dtype=mm, device=device) if mm != torch.float32 else None
    _mixture_into_(t, p, q, low, mix, weights_mm, idx, temperature)
    del p, q, low
    return t.mul_(temperature) if temperature != 1.0 else t


def _closed_form_chunk(
    z: torch.Tensor,
    q: torch.Tensor,
    t: Optional[torch.Tensor],
    p: Optional[torch.Tensor],
    t_vals: Optional[torch.Tensor],
    t_idx: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    cfg: _ChunkConfig,
    grad_scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Forward KL and/or CE of one chunk with the closed-form logit gradient, in place.

    With ``a = z / tau``, ``q = softmax(a)`` and ``p`` the teacher's tempered distribution:
    ``d(tau^2 KL(p || q)) / dz = tau (q - p)`` and ``d CE / dz = softmax(z) - onehot``.
    The teacher is either dense (``t``: ``[c, V]`` logits) or a sparse cached target
    (``t_vals``/``t_idx``: ``[c, k]``):

    * ``topk_kl``: ``p = softmax(top-k logits / tau)`` renormalised over the top-k;
      ``KL = sum_j p_j (log p_j - log q_j)``.
    * ``sampled_kl`` (Anshumann et al., ACL 2025, "Sparse Logit Sampling"): ``k`` tokens
      drawn from the teacher with replacement, ``p = counts / k``; ``t_vals`` holds their
      full-vocabulary teacher log-probs, so ``mean_j (log p_t(x_j) - log q(x_j))`` is an
      unbiased estimate of the full KL, and ``q - counts / k`` one of its logit gradient.

    Args:
        z: ``[c, V]`` float32 student logits; becomes the student log-probs.
        q: ``[c, V]`` float32 buffer; becomes the student probs, then the gradient.
        t: ``[c, V]`` float32 teacher logits (dense teacher) or None; overwritten. With
            ``cfg.mixture`` the mixture's tempered log-probs (:func:`_mixture_into_`).
        p: ``[c, V]`` float32 buffer for the teacher probs (dense teacher) or None; with
            ``cfg.mixture`` the mixture's probs.
        t_vals: ``[c, k]`` top-k teacher logits or sampled teacher log-probs, or None.
        t_idx: ``[c, k]`` int64 token ids, or None.
        labels: ``[c]`` int64 labels (needed for CE).
        cfg: Loss configuration; see :func:`_use_fast_path`.
        grad_scale: factor of the gradient (``1 / valid tokens``), or None for no gradient.

    Returns:
        ``(kl_sum, ce_sum, grad_z)``: summed float32 KL (with ``tau^2``) and CE of the chunk,
        and ``d loss / d z`` as ``[c, V]`` (the storage of ``q``) or None.
    """
    tau = cfg.temperature if cfg.kl_weight != 0.0 else 1.0  # CE alone uses the raw logits
    zero = z.new_zeros(())
    kl_sum, ce_sum = zero, zero
    if tau != 1.0:
        z.div_(tau)
    _log_softmax_(z, q)  # z: student log-probs (tempered), q: probs
    if cfg.ce_weight != 0.0:  # temperature is 1 here
        ce_sum = -z.gather(1, labels.unsqueeze(1)).sum()
    p_sparse = None
    if cfg.kl_weight != 0.0:
        if t is not None:
            if not cfg.mixture:  # a mixture's t and p hold its tempered log-probs and probs already
                if tau != 1.0:
                    t.div_(tau)
                _log_softmax_(t, p)  # t: teacher log-probs, p: probs
            rows_kl = t.sub_(z).mul_(p).sum(dim=-1)  # sum_v p (log p - log q), one float32 sum per row
        else:
            vals = t_vals.to(torch.float32)
            if cfg.kind == "topk_kl":
                t_logp = torch.log_softmax(vals / tau, dim=-1)
                p_sparse = t_logp.exp()
            else:
                t_logp = vals
                p_sparse = torch.full_like(vals, 1.0 / vals.shape[-1])
            rows_kl = (p_sparse * (t_logp - z.gather(1, t_idx))).sum(dim=-1)
        # rows summed in float64 (a single float32 sum over the chunk drifts by ~1e-4 relative)
        kl_sum = rows_kl.sum(dtype=torch.float64).to(z.dtype) * (tau ** 2)
    if grad_scale is None:
        return kl_sum, ce_sum, None
    # g = [kl_w * tau * (q - p) + ce_w * (q - onehot)] * grad_scale
    g = q.mul_((cfg.kl_weight * tau + cfg.ce_weight) * grad_scale)
    if cfg.kl_weight != 0.0:
        if p_sparse is None:
            g.sub_(p, alpha=cfg.kl_weight * tau * grad_scale)
        else:
            g.scatter_add_(1, t_idx, p_sparse.mul_(-cfg.kl_weight * tau * grad_scale))
    if cfg.ce_weight != 0.0:
        rows = torch.arange(g.shape[0], device=g.device)
        g.index_put_((rows, labels), torch.tensor(-cfg.ce_weight * grad_scale, device=g.device), accumulate=True)
    return kl_sum, ce_sum, g


def _fused_chunk(
    s: torch.Tensor,
    t: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    g: Optional[torch.Tensor],
    grad_scale: torch.Tensor,
    kl_weight: float,
    ce_weight: float,
    temperature: float,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The math of :func:`_closed_form_chunk` on low-precision logits, for ``torch.compile``.

    Inductor fuses the row reductions (two log-sum-exps) and the elementwise work (the
    KL terms, the gradient and its cast) into a few passes that read the logits in the
    matmul dtype and write the gradient in it, where the eager path makes ~20 passes over
    float32 ``[c, V]`` copies (profiled in ``benchmarks/RESULTS.md``, issue 18). The
    softmax math is float32 in both; the logits are the same bf16 GEMM outputs.

    Args:
        s: ``[c, V]`` student logits in the matmul dtype.
        t: ``[c, V]`` teacher logits in the matmul dtype, or None (CE alone).
        labels: ``[c]`` int64 labels, or None (KL alone).
        g: ``[c, V]`` buffer in the matmul dtype for ``d loss / d s``, written in place, or
            None (no gradient).
        grad_scale: 0-dim float32 tensor, the gradient's factor (``1 / normalizer``).
        kl_weight: weight of the forward KL (0: none).
        ce_weight: weight of the CE (0: none); the temperature is 1 when both are on.
        temperature: ``tau`` of the KL.

    Returns:
        ``(rows_kl, rows_ce)``: ``[c]`` float32 per-token KL (times ``tau^2``) and CE, each
        None when its weight is 0.
    """
    tau = temperature if kl_weight != 0.0 else 1.0
    a = s.float()
    if tau != 1.0:
        a = a / tau
    log_q = a - torch.logsumexp(a, dim=-1, keepdim=True)
    q = log_q.exp()
    rows_kl = rows_ce = None
    grad = q * (kl_weight * tau + ce_weight)
    if kl_weight != 0.0:
        b = t.float()
        if tau != 1.0:
            b = b / tau
        log_p = b - torch.logsumexp(b, dim=-1, keepdim=True)
        p = log_p.exp()
        rows_kl = (p * (log_p - log_q)).sum(dim=-1) * (tau ** 2)
        grad = grad - p * (kl_weight * tau)
    if ce_weight != 0.0:
        rows_ce = -log_q.gather(1, labels.unsqueeze(1)).squeeze(1)
        onehot = torch.arange(s.shape[1], device=s.device).unsqueeze(0) == labels.unsqueeze(1)
        grad = grad - onehot * ce_weight
    if g is not None:
        g.copy_(grad * grad_scale)
    return rows_kl, rows_ce


_COMPILED: dict[tuple, object] = {}


def _compiled_chunk(key: tuple):
    """:func:`_fused_chunk` under ``torch.compile`` for one variant ``key`` (weights,
    temperature, dtype, which inputs are given), built once per process, rows dynamic.

    Each variant compiles a fresh copy of the function's code object: dynamo caps the
    graphs per code object (``recompile_limit``), and a process that evaluates and
    trains several loss settings would otherwise run into it."""
    fn = _COMPILED.get(key)
    if fn is None:
        code = _fused_chunk.__code__.replace()
        fresh = types.FunctionType(code, _fused_chunk.__globals__, _fused_chunk.__name__)
        fn = _COMPILED[key] = torch.compile(fresh, dynamic=True, fullgraph=True)
    return fn


#: Budget of one ``[chunk, V]`` float32 buffer of :func:`chunked_distill_loss` (``chunk_size=0``).
CHUNK_BYTES = 256 * 1024**2


def auto_chunk_size(vocab_size: int, budget_bytes: int = CHUNK_BYTES, *, smallest: int = 128,
                    largest: int = 1024) -> int:
    """Tokens per chunk so that one ``[chunk, V]`` float32 buffer fits ``budget_bytes``.

    A power of two in ``[smallest, largest]``; with the defaults 1024 for SmolLM2
    (V = 49,152) and 256 for Gemma-3 (V = 262,144). Below 128 tokens the
    ``grad_W += g^T h`` update of the ``[V, H]`` accumulator becomes memory-bound; above
    1024 the chunk buys no more speed.

    Args:
        vocab_size: ``V``.
        budget_bytes: bytes allowed for one ``[chunk, V]`` float32 buffer.
        smallest: floor of the result (wins over the budget).
        largest: ceiling of the result.

    Returns:
        The chunk size in tokens.
    """
    fits = max(budget_bytes // (4 * max(vocab_size, 1)), 1)
    return int(min(max(1 << (fits.bit_length() - 1), smallest), largest))


@dataclass(frozen=True, eq=False)
class TeacherTargets:
    """The teacher's side of :func:`chunked_distill_loss`: exactly one of four forms.

    * live: ``hidden`` and ``weight`` (the teacher's lm_head is applied chunk by chunk,
      then its ``softcap``); every divergence kind works;
    * ``topk``: cached top-k logits (``kind`` ``topk_kl``; ``forward_kl`` turns into it);
    * ``samples``: cached sampled tokens and their teacher log-probs (``kind``
      ``sampled_kl``; ``forward_kl`` turns into it; temperature 1);
    * ``members``: the mixture of several live or top-k teachers' distributions
      (:meth:`mixture`); ``forward_kl``, and with live members only ``reverse_kl`` and ``jsd``.

    Build the cached forms from :meth:`~minicompress.distillation.teacher_cache.TeacherCache.targets`
    with :meth:`from_cache`. Nothing here is differentiated.

    Attributes:
        hidden: ``[N, H_t]`` (or ``[B, T, H_t]``) teacher final post-norm hidden states.
        weight: ``[V, H_t]`` teacher lm_head weight.
        softcap: the teacher's ``final_logit_softcapping`` or None (live form only; cached
            values are taken as the final logits).
        topk: ``(values [N, k], indices [N, k] int64)``: the teacher's top-k logits.
        samples: ``(log_probs [N, k], indices [N, k] int64)``: ``k`` tokens drawn with
            replacement from the teacher's temperature-1 distribution and their log-probs.
        members: live or ``topk`` TeacherTargets whose distributions are mixed (:meth:`mixture`).
        member_weights: ``[T]`` (one weight per member) or ``[N, T]`` (per token; or ``[B, L, T]``)
            non-negative weights of ``members``, normalised to sum 1 per token by the loss.

    Raises:
        ValueError: not exactly one form, ``hidden`` without ``weight`` (or the reverse),
            ``softcap`` with a cached form or a mixture, or a bad mixture (see :meth:`mixture`).
    """

    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    samples: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    members: Optional[tuple["TeacherTargets", ...]] = None
    member_weights: Optional[torch.Tensor] = None

    def __post_init__(self):
        live = self.hidden is not None or self.weight is not None
        forms = live + (self.topk is not None) + (self.samples is not None) + (self.members is not None)
        if forms != 1:
            raise ValueError("TeacherTargets: give exactly one of hidden+weight, topk, samples or members")
        if live and (self.hidden is None or self.weight is None):
            raise ValueError("TeacherTargets: a live teacher needs both hidden and weight")
        if self.softcap is not None and not live:
            raise ValueError("TeacherTargets: softcap applies to live teacher logits only")
        if (self.member_weights is not None) != (self.members is not None):
            raise ValueError("TeacherTargets: member_weights go with members")
        if self.members is not None:
            _check_members(self.members, self.member_weights)

    @classmethod
    def mixture(cls, members: Sequence["TeacherTargets"], weights=None) -> "TeacherTargets":
        """The mixture of several teachers' distributions as one target.

        The target of every token is ``p_mix = sum_i w_i softmax(t_i / tau)`` with the
        weights normalised to sum 1 (per token when they are per token): probability
        space, as in multi-teacher distillation (You et al., KDD 2017). Per-token weights
        that are one-hot distil each token from one teacher (a data source with its own
        teacher). :func:`chunked_distill_loss` computes it chunk by chunk in log space and
        hands the divergence ``tau * log p_mix`` as the teacher's logits, so forward KL,
        reverse KL and JSD are the same code as for one teacher.

        Args:
            members: live (``hidden`` + ``weight``) or ``topk`` :class:`TeacherTargets`; a
                top-k member has probability 0 outside its top-k (forward KL only).
            weights: ``[T]`` or per token ``[N, T]`` (``[B, L, T]``) weights >= 0 with a
                positive sum on every token; None: equal weights.

        Raises:
            ValueError: no member, a sampled or nested-mixture member, weights of the wrong
                shape, negative or non-finite weights, or a token whose weights sum to 0.
        """
        members = tuple(members)
        if weights is None:
            weights = torch.ones(len(members))
        return cls(members=members, member_weights=torch.as_tensor(weights, dtype=torch.float32))

    @property
    def is_mixture(self) -> bool:
        """Whether this is a mixture of teachers (:meth:`mixture`)."""
        return self.members is not None

    @classmethod
    def from_cache(cls, values: torch.Tensor, indices: torch.Tensor, kind: str) -> "TeacherTargets":
        """The cached form of ``kind`` (``topk_kl`` or ``sampled_kl``), as returned by
        :meth:`~minicompress.distillation.teacher_cache.TeacherCache.targets`.

        Args:
            values: ``[N, k]`` (or ``[B, T, k]``) top-k logits or sampled log-probs.
            indices: ``[N, k]`` their token ids.
            kind: ``topk_kl`` or ``sampled_kl``.
        """
        if kind == "topk_kl":
            return cls(topk=(values, indices))
        if kind == "sampled_kl":
            return cls(samples=(values, indices))
        raise ValueError(f"kind must be one of {SPARSE_KINDS} for cached targets, got {kind!r}")

    @property
    def sparse(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``topk`` or ``samples``, whichever is set (None for a live teacher or a mixture)."""
        return self.topk if self.topk is not None else self.samples


def _check_members(members: tuple, weights: torch.Tensor) -> None:
    """Validate the members and weights of a :meth:`TeacherTargets.mixture` (one line each)."""
    if not members:
        raise ValueError("TeacherTargets.mixture: give at least one member")
    for i, member in enumerate(members):
        if not isinstance(member, TeacherTargets) or member.members is not None:
            raise ValueError(f"TeacherTargets.mixture: member {i} must be a live or top-k TeacherTargets")
        if member.samples is not None:
            raise ValueError(f"TeacherTargets.mixture: member {i} holds sampled tokens, an estimate of one teacher's "
                             "KL that cannot be mixed; use its top-k logits or the live teacher")
    if weights.dim() == 0 or weights.shape[-1] != len(members):
        raise ValueError(f"TeacherTargets.mixture: weights {tuple(weights.shape)} need a last dimension of "
                         f"{len(members)} (one per member)")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("TeacherTargets.mixture: weights must be finite and >= 0")
    if bool((weights.sum(-1) <= 0).any()):
        raise ValueError("TeacherTargets.mixture: the weights of every token must have a positive sum")


@dataclass(frozen=True)
class LogitLoss:
    """What :func:`chunked_distill_loss` computes: ``kl_weight * KL + ce_weight * CE``.

    The logit part of :class:`~minicompress.config.LossConfig` (:meth:`from_config`), plus
    the label value that marks ignored tokens.

    Attributes:
        kind: one of :data:`DIVERGENCE_KINDS`: ``forward_kl``, ``reverse_kl``, ``jsd``,
            ``topk_kl`` or ``sampled_kl``. The last two need cached :class:`TeacherTargets`;
            ``forward_kl`` with cached targets becomes their kind; ``reverse_kl`` and
            ``jsd`` need a live teacher.
        kl_weight: weight of the divergence term (0 skips the teacher).
        ce_weight: weight of the cross entropy on the labels.
        temperature: softening temperature ``tau > 0``; the divergence is scaled by
            ``tau^2``; CE uses the raw (softcapped) logits.
        beta: ``beta`` in ``[0, 1]`` of the generalised JSD (``kind="jsd"``).
        ignore_index: label value of tokens skipped in both KL and CE.

    Raises:
        ValueError: an unknown kind, ``temperature <= 0`` or ``beta`` outside ``[0, 1]``.
    """

    kind: str = "forward_kl"
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    ignore_index: int = -100

    def __post_init__(self):
        if self.kind not in DIVERGENCE_KINDS:
            raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {self.kind!r}")
        _check_temperature(self.temperature)
        _check_beta(self.beta)

    @classmethod
    def from_config(cls, config, **changes) -> "LogitLoss":
        """The logit loss of a :class:`~minicompress.config.LossConfig` (its
        ``intermediate_weight`` and ``chunk_size`` are not part of it), with ``changes``
        (e.g. ``kind`` from a teacher cache) applied."""
        fields = dict(kind=config.kind, kl_weight=config.kl_weight, ce_weight=config.ce_weight,
                      temperature=config.temperature, beta=config.beta)
        return cls(**{**fields, **changes})


@dataclass(frozen=True)
class LossNumerics:
    """How :func:`chunked_distill_loss` computes (not what): chunking and precision.

    Attributes:
        chunk_size: valid tokens per chunk; 0 picks it from the vocabulary size
            (:func:`auto_chunk_size`); None processes everything in one chunk (for
            comparison only -- it materialises ``[N, V]``).
        matmul_dtype: dtype of the vocab matmuls (logits, ``grad_h``, ``grad_W``). float32
            (the default) upcasts the weights once per call for the most accurate logits;
            None runs them in the student weight's dtype (like the model's own lm_head, no
            weight copies); ``torch.bfloat16`` (what recovery passes under bf16 autocast)
            makes bf16 copies of both weights once per call. Softmax and loss math are
            float32 and ``grad_W`` is accumulated in float32 in every case.
        compiled: compute forward KL and/or CE (no soft-capping; a dense teacher or none)
            with one ``torch.compile``-d kernel per chunk that reads the logits in the
            matmul dtype and writes the gradient in it (three ``[c, V]`` buffers in the
            matmul dtype instead of four float32 ones plus a copy); needs a compiler
            backend (:func:`minicompress.hardware.resolve_compile`). Other settings run
            the eager path.

    Raises:
        ValueError: a negative ``chunk_size``.
    """

    chunk_size: Optional[int] = 0
    matmul_dtype: Optional[torch.dtype] = torch.float32
    compiled: bool = False

    def __post_init__(self):
        if self.chunk_size is not None and self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: automatic) or None, got {self.chunk_size}")


_DEFAULT_LOSS = LogitLoss()
_DEFAULT_NUMERICS = LossNumerics()


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Optional[TeacherTargets] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    loss: LogitLoss = _DEFAULT_LOSS,
    numerics: LossNumerics = _DEFAULT_NUMERICS,
    student_softcap: Optional[float] = None,
    normalizer: Optional[int] = None,
    return_components: bool = False,
):
    """Fused "lm_head + distillation loss" that never builds the ``[N, V]`` logits.

    Computes ``loss.kl_weight * KL + loss.ce_weight * CE`` where both terms are means
    over the valid tokens of the WHOLE batch (``labels != loss.ignore_index``; all
    tokens when ``labels`` is None) -- each chunk contributes its sum, not its
    mean.  Ignored tokens are dropped before the vocab matmul, so they cost
    nothing and are excluded from the KL too.

    Implementation (Liger-Kernel style): a ``torch.autograd.Function`` whose
    forward loops over chunks of ``numerics.chunk_size`` valid tokens.  For each chunk
    it computes the float32 student logits ``h_c @ W^T`` (softcapped if
    requested), the teacher chunk logits under ``no_grad`` (or gathers the
    cached top-k), the chunk loss, and the gradient w.r.t. the chunk logits:
    in closed form and in place for forward KL and/or CE without
    soft-capping (the default recipe; three ``[c, V]`` buffers), else via
    ``torch.autograd.grad`` on the chunk's loss; from it ``grad_h_c = g @ W`` is written into
    a preallocated ``[N, H_s]`` buffer and ``grad_W += g^T @ h_c`` is
    accumulated in float32.  Backward only multiplies these stored gradients
    by the incoming gradient.  Peak extra memory is therefore O(chunk * V)
    (one chunk of logits and its softmax) plus the float32 ``[V, H_s]``
    gradient accumulator, instead of O(N * V).  Double backward is not
    supported.

    Precision (:class:`LossNumerics`): with ``matmul_dtype=torch.float32`` (default)
    the vocab matmuls run in float32 (weights are upcast once per call: a float32
    copy of ``W`` and of the teacher weight if they are low precision) for the most
    accurate logits.  With ``matmul_dtype=None`` the logits matmul and ``grad_h``
    matmul run in the weight's dtype (like the model's own bf16 lm_head) and
    only the logits are upcast; no weight copies are made, ``grad_W`` is
    still accumulated in float32.  ``matmul_dtype=torch.bfloat16`` (what
    recovery passes under bf16 autocast) runs all three vocab matmuls
    (logits, ``grad_h``, ``grad_W``) in bf16 on bf16 copies of ``W`` and the
    teacher weight made once per call; logits are upcast to float32 before
    any softmax and ``grad_W`` is accumulated over chunks in float32.
    All softmax/loss math is float32 with
    autocast disabled, so the function behaves identically inside
    ``torch.autocast``.  The loss is a float32 scalar; the gradients come back
    in the dtypes of ``student_hidden`` and ``student_weight``.

    Args:
        student_hidden: ``[N, H_s]`` (or ``[B, T, H_s]``) final post-norm
            hidden states of the student, aligned with ``labels``.
        student_weight: ``[V, H_s]`` student lm_head weight (may be tied to
            the input embeddings; autograd sums both contributions).
        teacher: the teacher's side (:class:`TeacherTargets`): live hidden states
            ``[N, H_t]`` and lm_head weight ``[V, H_t]``, or cached top-k logits or
            samples ``[N, k]``, or the mixture of several live or top-k teachers
            (:meth:`TeacherTargets.mixture`: computed per chunk in the closed form's own
            buffers, never with the compiled kernel); None when ``loss.kl_weight`` is 0.
        labels: ``[N]`` int64 next-token labels (already shifted), with
            ``loss.ignore_index`` for tokens to skip in both KL and CE.  Required
            when ``loss.ce_weight != 0``.
        loss: kind, weights, temperature and ``beta`` (:class:`LogitLoss`).
        numerics: chunk size, matmul dtype, compiled kernel (:class:`LossNumerics`).
        student_softcap: ``final_logit_softcapping`` of the student or None.
        normalizer: divide the summed KL and CE by this count instead of this call's
            valid tokens (gradient accumulation: the optimizer step's targets over all
            micro batches), so that the loss is this call's share of the step's mean and
            its backward needs no rescaling of the ``[V, H]`` gradient.
        return_components: Also return detached ``{"kl": ..., "ce": ...}``
            float32 scalars (unweighted means; sums over ``normalizer`` when given)
            for logging.

    Returns:
        The float32 scalar loss, or ``(loss, {"kl": kl, "ce": ce})`` if
        ``return_components``.  With no valid token the loss is 0 and all
        gradients are 0.

    Raises:
        ValueError: mismatched shapes, a kind the teacher cannot serve (``topk_kl``
            without cached top-k, ``reverse_kl``/``jsd`` without a live teacher or with a
            mixture holding a top-k member), a mixture with a sparse kind,
            ``ce_weight != 0`` without labels, ``sampled_kl`` at a temperature other
            than 1, or ``normalizer < 1``.
    """
    kind, temperature = loss.kind, loss.temperature
    kl_weight, ce_weight, ignore_index = loss.kl_weight, loss.ce_weight, loss.ignore_index
    chunk_size = numerics.chunk_size
    if normalizer is not None and normalizer < 1:
        raise ValueError(f"normalizer must be >= 1 or None, got {normalizer}")

    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_tokens, hidden = h.shape
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} does not match hidden size {hidden}"
        )
    vocab = student_weight.shape[0]
    if chunk_size == 0:
        chunk_size = auto_chunk_size(vocab)

    lab = None
    if labels is not None:
        lab = labels.reshape(-1).to(device=h.device, dtype=torch.long)
        if lab.shape[0] != n_tokens:
            raise ValueError(f"labels have {lab.shape[0]} entries for {n_tokens} tokens")
    if ce_weight != 0.0 and lab is None:
        raise ValueError("ce_weight != 0 requires labels")

    t_h = t_w = t_vals = t_idx = mix = None
    teacher_topk = teacher.topk if teacher is not None else None
    teacher_samples = teacher.samples if teacher is not None else None
    if teacher_topk is not None and kind == "forward_kl":
        kind = "topk_kl"
    if teacher_samples is not None and kind == "forward_kl":
        kind = "sampled_kl"
    if kind == "sampled_kl" and temperature != 1.0:
        raise ValueError("sampled_kl: the tokens were drawn at temperature 1; use temperature=1.0")
    if kl_weight != 0.0:
        if teacher is not None and teacher.is_mixture:
            mix = _prepare_mixture(teacher, kind, n_tokens, vocab, h.device)
        elif kind in SPARSE_KINDS:
            sparse = teacher_topk if kind == "topk_kl" else teacher_samples
            if sparse is None:
                what = "TeacherTargets(topk=(values, indices))" if kind == "topk_kl" else \
                    "TeacherTargets(samples=(log_probs, indices))"
                raise ValueError(f'kind="{kind}" requires {what}')
            t_vals = sparse[0].reshape(-1, sparse[0].shape[-1]).to(h.device)
            t_idx = sparse[1].reshape(-1, sparse[1].shape[-1]).to(h.device, torch.long)
            if t_vals.shape != t_idx.shape or t_vals.shape[0] != n_tokens:
                raise ValueError(
                    f"teacher {kind} target shapes {tuple(t_vals.shape)} / {tuple(t_idx.shape)} "
                    f"do not match {n_tokens} tokens"
                )
        else:
            if teacher is not None and teacher.sparse is not None:
                raise ValueError(f'kind="{kind}" needs full teacher logits (a live TeacherTargets), '
                                 'not cached targets')
            if teacher is None:
                raise ValueError(f'kind="{kind}" requires TeacherTargets(hidden, weight)')
            t_h = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
            t_w = teacher.weight
            if t_h.shape[0] != n_tokens:
                raise ValueError(f"teacher hidden has {t_h.shape[0]} tokens, student has {n_tokens}")
            if t_w.dim() != 2 or t_w.shape[1] != t_h.shape[1]:
                raise ValueError(
                    f"teacher weight {tuple(t_w.shape)} does not match teacher hidden size {t_h.shape[1]}"
                )
            if t_w.shape[0] != vocab:
                raise ValueError(f"teacher vocab {t_w.shape[0]} != student vocab {vocab}")

    grad_on = torch.is_grad_enabled()
    cfg = _ChunkConfig(
        kind=kind,
        kl_weight=float(kl_weight),
        ce_weight=float(ce_weight),
        temperature=float(temperature),
        beta=float(loss.beta),
        chunk_size=chunk_size,
        student_softcap=student_softcap,
        teacher_softcap=teacher.softcap if teacher is not None else None,
        ignore_index=int(ignore_index),
        matmul_dtype=numerics.matmul_dtype if numerics.matmul_dtype is not None else student_weight.dtype,
        need_grad_h=grad_on and h.requires_grad,
        need_grad_w=grad_on and student_weight.requires_grad,
        compiled=bool(numerics.compiled),
        normalizer=int(normalizer) if normalizer is not None else None,
        mixture=mix is not None,
    )
    loss_value, kl, ce = _ChunkedDistillFunction.apply(h, student_weight, t_h, t_w, lab, t_vals, t_idx, mix, cfg)
    if return_components:
        return loss_value, {"kl": kl, "ce": ce}
    return loss_value


def _prepare_mixture(teacher: TeacherTargets, kind: str, n_tokens: int, vocab: int, device) -> _Mixture:
    """Check a mixture against the student's tokens and vocabulary; flatten its members.

    Raises:
        ValueError: a sparse kind, ``reverse_kl``/``jsd`` with a top-k member, or members
            or weights whose shapes do not match ``n_tokens`` tokens of ``vocab``.
    """
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f'kind="{kind}": a mixture of teachers is a full distribution; use forward_kl, '
                         'reverse_kl or jsd')
    hidden, weight, caps, vals, idx = [], [], [], [], []
    for i, member in enumerate(teacher.members):
        if member.topk is not None:
            if kind != "forward_kl":
                raise ValueError(f'kind="{kind}" needs full teacher logits; a mixture with a cached top-k member '
                                 '(probability 0 outside its top-k) supports forward_kl only')
            v = member.topk[0].reshape(-1, member.topk[0].shape[-1]).to(device)
            j = member.topk[1].reshape(-1, member.topk[1].shape[-1]).to(device, torch.long)
            if v.shape != j.shape or v.shape[0] != n_tokens:
                raise ValueError(f"mixture member {i}: top-k shapes {tuple(v.shape)} / {tuple(j.shape)} do not "
                                 f"match {n_tokens} tokens")
            hidden.append(None), weight.append(None), caps.append(None), vals.append(v), idx.append(j)
            continue
        m_h = member.hidden.reshape(-1, member.hidden.shape[-1])
        if m_h.shape[0] != n_tokens:
            raise ValueError(f"mixture member {i}: teacher hidden has {m_h.shape[0]} tokens, student has {n_tokens}")
        if member.weight.dim() != 2 or member.weight.shape != (vocab, m_h.shape[1]):
            raise ValueError(f"mixture member {i}: teacher weight {tuple(member.weight.shape)} does not match "
                             f"vocab {vocab} and teacher hidden size {m_h.shape[1]}")
        hidden.append(m_h), weight.append(member.weight), caps.append(member.softcap), vals.append(None)
        idx.append(None)
    w = teacher.member_weights.to(device=device, dtype=torch.float32)
    if w.dim() > 1:
        w = w.reshape(-1, w.shape[-1])
        if w.shape[0] != n_tokens:
            raise ValueError(f"mixture weights have {w.shape[0]} tokens, student has {n_tokens}")
    log_w = (w / w.sum(-1, keepdim=True)).log()
    return _Mixture(hidden=tuple(hidden), weight=tuple(weight), softcap=tuple(caps), vals=tuple(vals),
                    idx=tuple(idx), log_w=log_w)


# --------------------------------------------------------------------------
# intermediate-state distillation (Minitron)
# --------------------------------------------------------------------------
def default_layer_map(
    num_student_layers: int, num_teacher_layers: int, offset: int = 0
) -> list[tuple[int, int]]:
    """Maps every student layer to the proportionally placed teacher layer.

    Student layer ``i`` (0-based) maps to teacher layer
    ``floor((i + 1) * L_t / L_s) - 1`` (clamped at 0), so the last student
    layer maps to the last teacher layer and equal depths give the identity.

    Args:
        num_student_layers: ``L_s >= 1``.
        num_teacher_layers: ``L_t >= 1``.
        offset: Added to both indices, e.g. ``1`` to index HF
            ``output_hidden_states`` tuples whose entry 0 is the embedding
            output (entry ``i + 1`` is the output of layer ``i``).

    Returns:
        ``[(student_idx, teacher_idx), ...]`` of length ``L_s``.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError("layer counts must be >= 1")
    out = []
    for i in range(num_student_layers):
        j = max((i + 1) * num_teacher_layers // num_student_layers - 1, 0)
        out.append((i + offset, j + offset))
    return out


class IntermediateStateLoss(nn.Module):
    """Minitron intermediate-state loss (arXiv:2407.14679 sec. 3, 2408.11796).

    For each mapped pair ``(s, t)`` the student state is passed through one
    shared learned linear map ``H_s -> H_t`` (no bias; only when widths
    differ -- identity and no parameters when equal) and compared with the
    teacher state through ``1 - cosine_similarity`` per token; the loss is the
    mean over valid tokens, then the mean over pairs.  Computed in float32.

    The projection is initialised to a "channel selection": with
    ``channel_map`` (the teacher channel kept for each student channel, as
    produced by width pruning) ``W[channel_map[j], j] = 1``; otherwise a
    truncated identity ``W[i, i] = 1`` for ``i < min(H_s, H_t)``.  For a
    width-pruned student this makes the initial projection exact on the kept
    channels.

    Args:
        student_hidden_size: ``H_s``.
        teacher_hidden_size: ``H_t``.
        layer_map: ``[(student_idx, teacher_idx), ...]``; indices index the
            sequences passed to :meth:`forward` directly.
        channel_map: Optional length-``H_s`` teacher channel ids to initialise
            the projection (only when widths differ).
    """

    def __init__(
        self,
        student_hidden_size: int,
        teacher_hidden_size: int,
        layer_map: Sequence[tuple[int, int]],
        channel_map: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if not layer_map:
            raise ValueError("layer_map must not be empty")
        self.student_hidden_size = int(student_hidden_size)
        self.teacher_hidden_size = int(teacher_hidden_size)
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        if self.student_hidden_size == self.teacher_hidden_size:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Linear(self.student_hidden_size, self.teacher_hidden_size, bias=False)
            with torch.no_grad():
                self.proj.weight.zero_()
                if channel_map is not None:
                    cm = torch.as_tensor(list(channel_map), dtype=torch.long)
                    if cm.numel() != self.student_hidden_size:
                        raise ValueError(
                            f"channel_map has {cm.numel()} entries, expected {self.student_hidden_size}"
                        )
                    if cm.numel() and (cm.min() < 0 or cm.max() >= self.teacher_hidden_size):
                        raise ValueError("channel_map entries out of range")
                    self.proj.weight[cm, torch.arange(self.student_hidden_size)] = 1.0
                else:
                    k = min(self.student_hidden_size, self.teacher_hidden_size)
                    self.proj.weight[torch.arange(k), torch.arange(k)] = 1.0

    def forward(
        self,
        student_states: Sequence[torch.Tensor],
        teacher_states: Sequence[torch.Tensor],
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Computes the loss.

        Args:
            student_states: Sequence of ``[B, T, H_s]`` tensors indexed by the
                student indices of ``layer_map``.
            teacher_states: Sequence of ``[B, T, H_t]`` tensors indexed by the
                teacher indices (treated as constants: detached).
            mask: Optional ``[B, T]`` bool (or 0/1) of valid tokens.

        Returns:
            float32 scalar: mean over pairs of the masked mean of
            ``1 - cos(proj(h_s), h_t)``.
        """
        total = None
        flat_mask = None if mask is None else mask.reshape(-1).to(torch.bool)
        for s_idx, t_idx in self.layer_map:
            hs = student_states[s_idx]
            ht = teacher_states[t_idx].detach()
            if isinstance(self.proj, nn.Linear):
                hs = self.proj(hs.to(self.proj.weight.dtype))
            hs = hs.float().reshape(-1, hs.shape[-1])
            ht = ht.float().reshape(-1, ht.shape[-1])
            if hs.shape != ht.shape:
                raise ValueError(
                    f"pair ({s_idx}, {t_idx}): projected student {tuple(hs.shape)} "
                    f"vs teacher {tuple(ht.shape)}"
                )
            if flat_mask is not None:
                flat_mask = flat_mask.to(hs.device)
            cos = F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
            term = _masked_mean(1.0 - cos, flat_mask)
            total = term if total is None else total + term
        return total / len(self.layer_map)


def dynamic_weight(l_logits: torch.Tensor, l_is: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Minitron dynamic weighting of the intermediate-state loss.

    ``total = l_logits + (l_logits.detach() / l_is.detach()) * l_is``: the
    coefficient is recomputed every step (and not differentiated) so that the
    intermediate-state term has the same magnitude as the logit term.  If
    ``l_is <= eps`` the coefficient is 0 (avoids 0/0).

    Args:
        l_logits: Scalar logit (KD) loss.
        l_is: Scalar intermediate-state loss.
        eps: Threshold below which ``l_is`` is treated as zero.

    Returns:
        Scalar total loss (value ``2 * l_logits`` when ``l_is > eps``).
    """
    l_is_d = l_is.detach()
    safe = l_is_d > eps
    alpha = torch.where(safe, l_logits.detach() / torch.where(safe, l_is_d, torch.ones_like(l_is_d)),
                        torch.zeros_like(l_is_d))
    return l_logits + alpha * l_is

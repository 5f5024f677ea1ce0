"""The ground floor every component runs on: device, autocast and final hidden states.

Nothing here loads or writes anything. Precision follows the hardware
(:func:`minicompress.hardware.resolve_autocast`): bf16 autocast where bf16 is native.
"""

from __future__ import annotations

import contextlib

import torch

from .hardware import resolve_autocast


def autocast_context(device: torch.device | str, autocast: str):
    """``torch.autocast`` in bf16 for ``autocast == "bfloat16"`` (and for ``"auto"`` where
    :func:`minicompress.hardware.resolve_autocast` picks bf16), else a no-op context."""
    if resolve_autocast(autocast, device) == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's first parameter."""
    return next(model.parameters()).device


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, H]`` post-final-norm hidden states (the input of ``lm_head``)."""
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state

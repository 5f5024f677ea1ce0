"""Weight-only post-training quantization of a causal LM's linear layers, with torchao.

Round-to-nearest (RTN) weight-only quantization: every ``nn.Linear`` weight of the decoder
(attention and MLP projections) is stored as low-bit integers plus scales, computed from the
weight alone; activations, embeddings, norms and the output head stay in floating point.
It needs no calibration data, no Hessian (GPTQ, Frantar et al., arXiv 2210.17323) and no
activation statistics (AWQ, Lin et al., arXiv 2306.00978): RTN is the baseline those methods
improve on. The tensors are torchao's (PyTorch-native quantization, github.com/pytorch/ao;
Or et al., arXiv 2507.16099), so that Hugging Face transformers' ``TorchAoConfig``
integration saves them as safetensors and ``AutoModelForCausalLM.from_pretrained`` loads
them back without minicompress.

Schemes (:data:`SCHEMES`), for weight ``W [out, in]``:

* ``int8-weight-only``: torchao ``Int8WeightOnlyConfig`` (``Int8Tensor``): symmetric int8,
  one scale per output channel (``scale = max|W_row| / 127.5``, ``q = clamp(round(W / scale),
  -128, 127)``), or per group of ``group_size`` input channels.
* ``int4-weight-only``: torchao ``IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(group_size), mapping_type=ASYMMETRIC)`` (``IntxUnpackedToInt8Tensor``):
  per group of ``group_size`` input channels, ``scale = (max(W_g, 0) - min(W_g, 0)) / 15``,
  an integer zero point ``zp = -8 - round(min(W_g, 0) / scale)`` and
  ``q = clamp(round(W / scale) + zp, -8, 7)``; ``W ~ (q - zp) * scale``.

Why not torchao's ``Int4WeightOnlyConfig`` for int4: in torchao 0.18 its packed formats run on
CUDA/XPU/NPU only (``plain`` needs the ``mslk`` CUDA kernels, ``tile_packed_to_4d`` the CUDA
tinygemm kernel), and the CPU one (the prototype ``Int4OpaqueTensor``) has no safetensors
support. ``IntxUnpackedToInt8Tensor`` runs anywhere and is saved as safetensors, but it keeps
one int4 value per int8 byte: int4 accuracy, int8 size (docs/evaluation.md: Quantize).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any

import torch
from torch import nn

from .config import QUANTIZE_SCHEMES
from .errors import MinicompressError

log = logging.getLogger(__name__)

#: The ``--scheme`` values (one list: :mod:`minicompress.config` holds it).
SCHEMES = QUANTIZE_SCHEMES
#: ``group_size`` when none is given: per output channel for int8, groups of 32 for int4
#: (GGUF's Q4 block size; it divides every width that is a multiple of 32).
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8-weight-only": None, "int4-weight-only": 32}
#: The oldest torchao that quantizes, saves and reloads both schemes (0.16 fails on per-group int8,
#: 0.15 cannot save int8 as safetensors).
TORCHAO_MIN_VERSION = "0.17"


def require_torchao() -> None:
    """Raise a one-line error when torchao is not installed.

    Raises:
        MinicompressError: torchao is missing, or older than :data:`TORCHAO_MIN_VERSION`.
    """
    if importlib.util.find_spec("torchao") is None:
        raise MinicompressError("quantize needs torchao: pip install 'minicompress[quantize]' (or pip install torchao)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torchao")
    except PackageNotFoundError:
        return  # a source checkout on the path: trust it
    if tuple(int(p) for p in found.split("+")[0].split(".")[:2] if p.isdigit()) < \
            tuple(int(p) for p in TORCHAO_MIN_VERSION.split(".")):
        raise MinicompressError(f"quantize needs torchao>={TORCHAO_MIN_VERSION}, found {found}: "
                                "pip install -U 'minicompress[quantize]'")


def _drop_import_noise(record: logging.LogRecord) -> bool:
    """False for torchao's import-time warnings on a CPU-only torch (see :func:`quiet_torchao_logs`)."""
    message = record.getMessage()
    return not ((message.startswith("Failed to load") and ".so" in message)
                or "is an Enum subclass and is now natively supported" in message)


def quiet_torchao_logs() -> None:
    """Drop torchao's import-time log noise (idempotent).

    With torchao installed, transformers imports it whenever it loads a model. On a
    CPU-only torch, torchao then logs a warning for each CUDA extension it cannot load
    (``_C_mxfp8``, ``_C_cutlass_90a``) and torch one per Enum that torchao registers with
    pytree: none of it concerns the user. Only those messages are filtered, on the
    ``torchao`` and ``torch.utils._pytree`` loggers; the CLI's ``-v`` keeps them.
    """
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_drop_import_noise)


def import_torchao():
    """Import torchao (its import-time noise dropped: :func:`quiet_torchao_logs`) and return it.

    Raises:
        MinicompressError: torchao is missing.
    """
    require_torchao()
    if not logging.getLogger("minicompress").isEnabledFor(logging.DEBUG):
        quiet_torchao_logs()
    import torchao

    return torchao


def torchao_config(scheme: str, group_size: int | None = None) -> Any:
    """The torchao ``AOBaseConfig`` of a scheme.

    Args:
        scheme: one of :data:`SCHEMES`.
        group_size: input channels sharing one scale (None: the scheme's default,
            :data:`DEFAULT_GROUP_SIZE`).

    Returns:
        ``Int8WeightOnlyConfig`` or ``IntxWeightOnlyConfig`` (int4).

    Raises:
        MinicompressError: an unknown scheme, or torchao missing.
    """
    if scheme not in SCHEMES:
        raise MinicompressError(f"scheme: {scheme!r} is not allowed; choose one of {', '.join(SCHEMES)}")
    import_torchao()
    from torchao.quantization import (Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup,
                                      PerRow)

    group_size = DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size
    if scheme == "int8-weight-only":
        return Int8WeightOnlyConfig(granularity=PerRow() if group_size is None else PerGroup(group_size),
                                    set_inductor_config=False, version=2)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                mapping_type=MappingType.ASYMMETRIC)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules that a scheme quantizes: all but the output head.

    The head stays in floating point like in transformers' ``TorchAoConfig`` default: it is
    tied to the input embedding in most small models (SmolLM2, Gemma, Qwen2), and its
    logits carry the whole vocabulary.

    Returns:
        ``[(qualified name, module)]`` in module order.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def check_group_size(model: nn.Module, scheme: str, group_size: int | None = None) -> None:
    """Check that ``group_size`` divides the input width of every quantized linear.

    Raises:
        MinicompressError: ``group_size: ...`` naming the first linear it does not divide.
    """
    group_size = DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size
    if group_size is None:
        return
    linears = quantizable_linears(model)
    for name, module in linears:
        if module.in_features % group_size:
            widths = sorted({m.in_features for _, m in linears})
            common = math.gcd(*widths)
            hint = min(common & -common, 128)  # the largest power of two dividing every width, at most 128
            raise MinicompressError(f"group_size: {group_size} does not divide in_features={module.in_features} of "
                                    f"{name}; choose a divisor of every input width {widths}, e.g. {hint}")


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds torchao-quantized weights (written by :func:`quantize_`)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "torchao"


def quantize_(model: nn.Module, scheme: str, group_size: int | None = None) -> dict[str, Any]:
    """Quantize the linear weights of a Hugging Face causal LM in place (trailing underscore).

    Every linear of :func:`quantizable_linears` gets a torchao weight tensor; the model's
    ``config.quantization_config`` becomes a ``TorchAoConfig`` and ``model.hf_quantizer``
    transformers' torchao quantizer, so ``save_pretrained`` writes the flattened tensors as
    safetensors with their torchao metadata and ``from_pretrained`` rebuilds them.

    Args:
        model: a float ``*ForCausalLM`` (any device, float32 / bfloat16 / float16).
        scheme: one of :data:`SCHEMES`.
        group_size: input channels per scale (None: :data:`DEFAULT_GROUP_SIZE`).

    Returns:
        ``{"scheme", "group_size", "quantized_linears", "quantized_parameters", "torchao"}``.

    Raises:
        MinicompressError: unknown scheme, torchao missing, a model that is already
            quantized, or a ``group_size`` that does not divide an input width.
    """
    config = torchao_config(scheme, group_size)
    if is_quantized(model):
        raise MinicompressError("model: it is quantized already; quantize its floating-point original")
    check_group_size(model, scheme, group_size)
    torchao = import_torchao()
    from torchao.quantization import quantize_ as torchao_quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    linears = quantizable_linears(model)
    chosen = {id(m) for _, m in linears}
    n_params = sum(m.weight.numel() for _, m in linears)
    with torch.no_grad():
        torchao_quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    head = [name for name, m in model.named_modules() if m is model.get_output_embeddings()]
    hf_config = TorchAoConfig(quant_type=config, modules_to_not_convert=head or None)
    model.hf_quantizer = TorchAoHfQuantizer(hf_config, pre_quantized=True)
    model.hf_quantizer.postprocess_model(model)  # sets config.quantization_config, marks the model quantized
    group = DEFAULT_GROUP_SIZE[scheme] if group_size is None else group_size
    log.info("quantized %d linears (%s parameters) to %s, %s", len(linears), f"{n_params:,}", scheme,
             "per output channel" if group is None else f"groups of {group}")
    return {"scheme": scheme, "group_size": group, "quantized_linears": len(linears),
            "quantized_parameters": n_params, "torchao": torchao.__version__}


def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The floating-point values a quantized weight stands for (a plain weight as it is).

    Args:
        weight: ``[out, in]``, a torchao tensor or a plain tensor.

    Returns:
        ``[out, in]`` plain tensor in the weight's dtype.
    """
    if importlib.util.find_spec("torchao") is not None:
        from torchao.utils import TorchAOBaseTensor

        if isinstance(weight, TorchAOBaseTensor):
            return weight.dequantize()
    return weight.detach()

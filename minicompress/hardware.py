"""Which precision is fast on this machine: ``autocast: auto`` resolved by hardware.

bf16 matmuls are only a win where the hardware has native bf16 arithmetic: CUDA GPUs,
and CPUs with AVX512-BF16 or AMX (Intel Sapphire Rapids and later, AMD Zen 4 and later).
Measured on a 2-core Xeon with AMX (``benchmarks/RESULTS.md``): a 4096x576x1536 GEMM runs
at 2.7 TFLOP/s in bf16 vs 0.31 in float32. On an AVX2-only CPU the same bf16 GEMM is about
8x *slower* than float32, so ``auto`` keeps float32 there. Master weights, optimizer state
and the loss arithmetic stay float32 either way (mixed precision, Micikevicius et al.,
arXiv 1710.03740); only the matmuls of the forward and backward run in bf16.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil

import torch

from .config import AUTOCAST as AUTOCAST_CHOICES

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX tiles).

    Uses PyTorch's own CPU feature probes (cpuinfo), so it works wherever torch runs;
    falls back to the ``avx512_bf16`` / ``amx_bf16`` flags of ``/proc/cpuinfo``.
    """
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is not None for p in probes):
        try:
            return any(bool(p()) for p in probes if p is not None)
        except Exception:  # noqa: BLE001 - a probe that fails means "unknown": read the flags
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (CUDA with bf16 support, or a CPU
    with AVX512-BF16/AMX)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_autocast(setting: str, device: torch.device | str) -> str:
    """The concrete autocast for a setting: ``auto`` becomes ``bfloat16`` where the device
    has native bf16 and ``none`` elsewhere; ``none`` / ``bfloat16`` stay as they are.

    Args:
        setting: ``auto``, ``none`` or ``bfloat16``.
        device: where the matmuls run.

    Returns:
        ``"bfloat16"`` or ``"none"``.

    Raises:
        ValueError: an unknown setting.
    """
    if setting not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast: {setting!r} is not allowed; choose one of {', '.join(AUTOCAST_CHOICES)}")
    if setting != "auto":
        return setting
    return "bfloat16" if native_bf16(device) else "none"


def describe_precision(setting: str, device: torch.device | str) -> dict:
    """A provenance record of the precision choice: what was asked, what runs, and why."""
    resolved = resolve_autocast(setting, device)
    kind = torch.device(device).type
    if setting != "auto":
        reason = f"--autocast {setting} (forced)"
    elif kind == "cpu":
        reason = "CPU with native bf16 (AVX512-BF16/AMX)" if resolved == "bfloat16" else \
            "CPU without native bf16 (no AVX512-BF16/AMX): bf16 would be slower"
    else:
        reason = f"{kind} {'with' if resolved == 'bfloat16' else 'without'} bf16 support"
    return {"autocast": setting, "resolved": resolved, "device": kind, "reason": reason,
            "master_weights": "float32", "loss_arithmetic": "float32"}


#: ``compile: auto`` compiles runs of at least this many tokens (compiling costs about 25 s;
#: the compiled step is 1.3x faster on the AMX CPU of ``benchmarks/RESULTS.md``, so this
#: pays back after about 80k tokens there)
COMPILE_MIN_TOKENS = 262144


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use (None: there is none on PATH)."""
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def resolve_compile(setting: bool | str, device: torch.device | str, *, tokens: int, world_size: int = 1,
                    activation_checkpointing: bool = False) -> tuple[bool, str]:
    """Whether a recovery compiles its decoder layers, and why.

    Args:
        setting: ``auto``, True or False.
        device: where the student trains.
        tokens: the run's token budget.
        world_size: processes under torchrun.
        activation_checkpointing: recomputed layers are left eager.

    Returns:
        ``(compile, reason)``.
    """
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"compile: {setting!r} is not allowed; choose auto, true or false")
    if isinstance(setting, bool):
        return setting, f"compile={str(setting).lower()} (forced)"
    kind = torch.device(device).type
    if world_size > 1:
        return False, "several processes: torch.compile with FSDP2 is not tested here"
    if activation_checkpointing:
        return False, "activation checkpointing"
    if tokens < COMPILE_MIN_TOKENS:
        return False, f"a short run ({tokens:,} < {COMPILE_MIN_TOKENS:,} tokens): compiling would not pay back"
    if kind == "cpu" and not cpp_compiler():
        return False, "no C++ compiler for the CPU backend"
    if kind not in ("cpu", "cuda"):
        return False, f"{kind}: not tried"
    return True, f"{kind}, {tokens:,} tokens"


#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> str:
    """Let glibc's ``malloc`` reuse freed blocks of any size instead of unmapping them.

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the
    kernel on ``free``, so each ``[c, V]`` logits chunk, ``[V, H]`` gradient or
    ``[B, heads, L, L]`` buffer of a training step page-faults on first touch, every step.
    ``mallopt(M_MMAP_MAX, 0)`` keeps all blocks in the heap and ``M_TRIM_THRESHOLD = -1``
    (never trim) keeps freed heap memory mapped, so the next step reuses the same pages (what
    jemalloc/tcmalloc do; Intel's CPU tuning guide preloads them for the same reason).
    Measured on the 2-core AMX Xeon of ``benchmarks/RESULTS.md`` (issue 18): a default recovery
    run 1.11-1.15x faster (985-1,029 vs 891 tok/s) at 3,755-3,998 vs 3,598 MiB peak RSS (``VmHWM``).
    The resident set stays at its peak until the process exits.

    Applied once per process, on Linux with glibc, unless the user set
    ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` or ``MINICOMPRESS_MALLOC=default``.

    Returns:
        What was done, for the run's precision record.
    """
    if os.environ.get("MINICOMPRESS_MALLOC", "").lower() == "default":
        return "glibc defaults (MINICOMPRESS_MALLOC=default)"
    if "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return "the user's MALLOC_* settings"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc ({platform.system()}): unchanged"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc: freed blocks reused (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1: never trimmed)" if ok else "mallopt failed: unchanged"


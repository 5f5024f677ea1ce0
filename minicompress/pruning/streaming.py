"""Prune a safetensors checkpoint one tensor at a time, without loading the model.

Minitron (Muralidharan et al., arXiv 2407.14679) prunes by slicing every weight to the
kept heads, FFN neurons, embedding channels and layers. Slicing is local: each pruned
tensor depends on one original tensor and the plan only
(:func:`minicompress.pruning.plan.slice_parameter`). A checkpoint larger than memory can
therefore be pruned by reading one source tensor, slicing it and writing the result
straight into the output shard before the next tensor is read.

How memory stays bounded:

* Output shards are laid out before any weight is read: a first pass slices empty
  ``meta`` tensors of the source shapes, which gives every output name, shape and dtype
  (and checks them against a fresh model of the new config). Each shard's safetensors
  header is then written first and the tensor bytes are appended as they are produced, so
  nothing is buffered: ``max_shard_bytes`` only sets the file sizes.
* Each source tensor is read through its own short-lived ``safe_open`` handle, so the
  memory-mapped pages of tensors already done are released (a single open handle would
  keep every page it touched resident until the file is closed).
* Vocabulary-sized tensors (``embed_tokens``, ``lm_head``) are sliced on their columns
  only, so they are read and written in row blocks of at most ``max_chunk_bytes``.

The peak is therefore about one source tensor plus its pruned copy (or one row block of
the embedding), whatever the size of the checkpoint. The plan comes from scores
(``minicompress score``), never from the loaded model, so
:func:`~minicompress.pruning.plan.make_plan` is given the checkpoint's ``config.json``.
Tensor dtypes are kept as stored (the in-memory path loads in ``--dtype``).

This module decides and slices; it writes nothing: :func:`layout_checkpoint` returns the
output's shards and config, :func:`pruned_blocks` yields each pruned tensor (or row block)
in write order, and the ``prune`` recipe
(:func:`minicompress.recipes.prune.write_pruned_checkpoint`) streams them into the folder
with :func:`minicompress.outputs.write_safetensors_streamed`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from ..arch import get_adapter, head_dim, num_kv_heads
from ..errors import MinicompressError
from ..models import SAFETENSORS_FILE as SINGLE_FILE
from ..models import has_safetensors
from .plan import PrunePlan, check_shapes_match_config, slice_parameter

DEFAULT_MAX_SHARD_BYTES = 512 << 20
DEFAULT_MAX_CHUNK_BYTES = 16 << 20
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "chat_template*", "spiece.model", "*.tiktoken")
# tensors whose slicing rule keeps every row (vocabulary entries are independent)
_ROW_BLOCKED = ("embed_tokens.weight", "lm_head.weight")
# buffers some old checkpoints carry that transformers ignores on load
_IGNORED = ("rotary_emb.inv_freq",)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class _Entry:
    """One output tensor: where it comes from and what it becomes."""

    file: Path
    source: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source_shape: tuple[int, ...]
    row_blocks: tuple[tuple[int, int], ...] | None  # None: read the whole tensor

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    @property
    def source_nbytes(self) -> int:
        n = 1
        for d in self.source_shape:
            n *= d
        return n * self.dtype.itemsize


def streaming_source(source: str) -> Path:
    """The local HF folder a ``--streaming`` prune reads (a built-in name is converted once).

    Raises:
        MinicompressError: ``source`` is not a local folder with ``config.json`` and safetensors.
    """
    from ..models import BUILTIN_MODELS, local_folder

    try:
        path = local_folder(source)
    except MinicompressError:
        path = None
    if path is None or not (path.is_dir() and (path / "config.json").is_file() and has_safetensors(path)):
        raise MinicompressError(
            f"--streaming: --model must be a local Hugging Face folder with config.json and safetensors weights, "
            f"a Hub id already in the local cache (hf download ID), or a built-in name "
            f"({', '.join(BUILTIN_MODELS)}); got {source!r}"
        )
    return path


def _source_files(folder: Path) -> list[tuple[Path, list[str]]]:
    """``[(shard path, tensor names)]`` of a single-file or sharded safetensors checkpoint."""
    from ..models import safetensors_files

    try:
        files = safetensors_files(folder)
    except MinicompressError as err:
        raise MinicompressError(f"--streaming: {err}") from None
    grouped: dict[Path, list[str]] = {}
    for name, path in files.items():
        grouped.setdefault(path, []).append(name)
    return list(grouped.items())


def pruned_config(config: Any, plan: PrunePlan, dtype: torch.dtype | None = None) -> Any:
    """The config ``apply_plan_`` + ``save_pretrained`` would write, without a model.

    Args:
        config: the original transformers config (``AutoConfig.from_pretrained``).
        plan: the plan.
        dtype: dtype of the stored weights (recorded as ``dtype`` like ``save_pretrained``).

    Returns:
        A new config: :meth:`PrunePlan.new_config` plus ``architectures`` (the
        ``AutoModelForCausalLM`` class) and ``dtype``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    new = plan.new_config(config)
    new.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    if dtype is not None:
        new.dtype = str(dtype).split(".")[1]
    return new


def _check_plan(config: Any, plan: PrunePlan) -> None:
    found = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
             "num_attention_heads": config.num_attention_heads, "num_key_value_heads": num_kv_heads(config),
             "num_hidden_layers": config.num_hidden_layers, "head_dim": head_dim(config)}
    if found != plan.original or config.model_type != plan.model_type:
        raise MinicompressError(f"--streaming: the plan is for {plan.model_type} {plan.original}, "
                                f"the checkpoint is {config.model_type} {found}")
    if getattr(config, "quantization_config", None):
        raise MinicompressError("--streaming: quantized checkpoints are not supported; prune a float checkpoint")


def _layout(folder: Path, config: Any, plan: PrunePlan, max_chunk_bytes: int) -> tuple[list[_Entry], int]:
    """Every output tensor, from slicing ``meta`` tensors of the source shapes.

    Returns:
        ``(entries, skipped)``: output tensors in source order, and how many source
        tensors produce none (dropped layers, a tied ``lm_head``, ignored buffers).
    """
    adapter = get_adapter(plan.model_type)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries, skipped = [], 0
    for path, names in _source_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                info = f.get_slice(name)
                shape, kind = tuple(info.get_shape()), info.get_dtype()
                if kind not in _DTYPES:
                    raise MinicompressError(f"--streaming: tensor {name!r} has unsupported dtype {kind}")
                if (tied and name == "lm_head.weight") or name.endswith(_IGNORED):
                    skipped += 1
                    continue
                dtype = _DTYPES[kind]
                result = slice_parameter(name, torch.empty(shape, dtype=dtype, device="meta"), plan, adapter)
                if result is None:
                    skipped += 1
                    continue
                new_name, meta = result
                blocks = None
                if name.endswith(_ROW_BLOCKED) and meta.dim() == 2 and meta.shape[0] == shape[0]:
                    step = max(1, max_chunk_bytes // max(1, shape[1] * dtype.itemsize))
                    blocks = tuple((a, min(a + step, shape[0])) for a in range(0, shape[0], step))
                entries.append(_Entry(path, name, new_name, tuple(meta.shape), meta.dtype, shape, blocks))
    _check_against_new_config(entries, pruned_config(config, plan))
    return entries, skipped


def _check_against_new_config(entries: list[_Entry], new_config: Any) -> None:
    check_shapes_match_config(new_config, {e.name: tuple(e.shape) for e in entries},
                              "--streaming: pruned tensors do not match the pruned config")


def _shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    # widest dtypes first inside a shard (as safetensors does), so every tensor is aligned
    return [sorted(s, key=lambda e: -e.dtype.itemsize) for s in shards if s]


def _read_pruned(entry: _Entry, plan: PrunePlan, adapter, rows: tuple[int, int] | None) -> torch.Tensor:
    """Read one source tensor (or a block of its rows), slice it, release the source.

    Returns:
        The pruned tensor (``entry.shape``, or ``[rows, ...]`` of it for a row block).
    """
    with safe_open(str(entry.file), framework="pt") as f:
        source = f.get_tensor(entry.source) if rows is None else f.get_slice(entry.source)[rows[0]:rows[1]]
        result = slice_parameter(entry.source, source, plan, adapter)
        del source
    if result is None or result[0] != entry.name:
        raise MinicompressError(f"--streaming: {entry.source!r} was not sliced as laid out")
    if result[1].dtype != entry.dtype:
        raise MinicompressError(f"--streaming: {entry.source!r} changed dtype to {result[1].dtype}")
    return result[1].contiguous()


def pruned_blocks(entries: list[_Entry], plan: PrunePlan) -> Iterator[torch.Tensor]:
    """Each pruned tensor of ``entries`` in order, vocabulary-sized ones as row blocks.

    Each block is read from its source and sliced only when the consumer asks for it, and
    the source is released first, so one source tensor and its pruned copy are alive at a time.

    Yields:
        ``[rows, ...]`` blocks whose concatenation along dim 0 is the entry's pruned tensor.
    """
    adapter = get_adapter(plan.model_type)
    for entry in entries:
        for rows in entry.row_blocks or (None,):
            yield _read_pruned(entry, plan, adapter, rows)


def side_files(source: Path) -> list[Path]:
    """Tokenizer files and ``generation_config.json`` of ``source`` that the output keeps."""
    return [path for path in sorted(source.iterdir()) if path.is_file() and (
        any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_FILES) or path.name == "generation_config.json")]


@dataclass(frozen=True)
class StreamingLayout:
    """What a streamed prune writes, decided before any weight is read.

    Attributes:
        config: the source checkpoint's transformers config.
        new_config: the pruned config (:func:`pruned_config`, with the stored dtype).
        names: output file names, one per shard (``model.safetensors`` when one).
        shards: the output tensors of each file, in write order.
        skipped: source tensors that produce no output (dropped layers, tied ``lm_head``).
    """

    config: Any
    new_config: Any
    names: list[str]
    shards: list[list[_Entry]]
    skipped: int

    @property
    def total_size(self) -> int:
        """Bytes of all output tensors."""
        return sum(e.nbytes for shard in self.shards for e in shard)

    def index(self) -> dict[str, Any] | None:
        """The ``model.safetensors.index.json`` of several shards (None for one file)."""
        if len(self.shards) == 1:
            return None
        n_params = sum(e.nbytes // e.dtype.itemsize for shard in self.shards for e in shard)
        return {"metadata": {"total_parameters": n_params, "total_size": self.total_size},
                "weight_map": {e.name: name for name, shard in zip(self.names, self.shards) for e in shard}}


def layout_checkpoint(source_folder: str | Path, plan: PrunePlan, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> StreamingLayout:
    """Lay out the pruned checkpoint of ``source_folder``: names, shapes, dtypes and shards.

    Produces the same tensors (names, dtypes, shapes) and config as loading the model,
    :func:`~minicompress.pruning.plan.apply_plan_` and ``save_pretrained``; only headers are
    read. For example, an ``up_proj`` ``[I, H]`` becomes ``[I', H']``; the ``[V, H]``
    embedding becomes ``[V, H']``, produced in row blocks ``[r, H]`` -> ``[r, H']``.

    Args:
        source_folder: HF folder with ``config.json`` and ``model.safetensors`` or
            ``model.safetensors.index.json`` plus shards.
        plan: from :func:`~minicompress.pruning.plan.make_plan` on this checkpoint's config.
        max_shard_bytes: largest output shard (a bigger single tensor gets its own). Does
            not affect memory.
        max_chunk_bytes: largest row block read at once from a vocabulary-sized tensor.

    Raises:
        MinicompressError: no safetensors, a plan for another shape, non-positive sizes, or a
            tensor the slicing rules do not cover.
    """
    from transformers import AutoConfig

    source = Path(source_folder).expanduser()
    if not has_safetensors(source) or not (source / "config.json").is_file():
        raise MinicompressError(f"--streaming: {source} is not a Hugging Face folder with config.json and safetensors")
    if max_shard_bytes <= 0 or max_chunk_bytes <= 0:
        raise MinicompressError("--streaming: max_shard_bytes and max_chunk_bytes must be positive")
    config = AutoConfig.from_pretrained(str(source))
    _check_plan(config, plan)
    entries, skipped = _layout(source, config, plan, max_chunk_bytes)
    floating = [e.dtype for e in entries if e.dtype.is_floating_point]
    shards = _shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return StreamingLayout(config=config, new_config=pruned_config(config, plan, floating[0] if floating else None),
                           names=names, shards=shards, skipped=skipped)

"""Outputs that are never half-written, and the provenance record next to each.

Every folder output is built in a temporary sibling folder and renamed into place only
when complete; an existing output is replaced only with ``overwrite=True``. Each output
gets ``minicompress.json`` (what produced it: command, resolved config, versions, time)
and the resolved config as ``minicompress.yaml``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .config import to_dict
from .errors import MinicompressError

PROVENANCE = "minicompress.json"
RESOLVED_CONFIG = "minicompress.yaml"


def check_output(path: str | Path | None, overwrite: bool, flag: str = "--output") -> Path:
    """Validate an output path before any work starts.

    Raises:
        MinicompressError: no path given, or it exists and ``overwrite`` is False.
    """
    if path is None:
        raise MinicompressError(f"{flag}: an output path is required")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise MinicompressError(f"{flag}: {out} already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block succeeds.

    Args:
        path: final folder.
        overwrite: replace an existing ``path``.

    Yields:
        The temporary folder to write into (a sibling of ``path``).
    """
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def settings_digest(settings: dict[str, Any]) -> str:
    """sha256 of a settings dict (keys sorted; values JSON or their ``str``): a resumed run
    compares it with the digest its interrupted run saved."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def versions() -> dict[str, str]:
    """Versions of the packages that shape results."""
    import torch
    import transformers

    from . import __version__

    return {
        "minicompress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def provenance(command: str, config: Any, **extra: Any) -> dict[str, Any]:
    """A provenance record: command, resolved config, versions, time, argv, extras."""
    return {
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "versions": versions(),
        "config": to_dict(config),
        **extra,
    }


def write_provenance(folder: str | Path, record: dict[str, Any]) -> None:
    """Write ``minicompress.json`` and the resolved config ``minicompress.yaml`` into ``folder``."""
    folder = Path(folder)
    write_json_atomic(folder / PROVENANCE, record)
    (folder / RESOLVED_CONFIG).write_text(yaml.safe_dump(record.get("config", {}), sort_keys=False))


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``minicompress.json`` of a folder, or None if there is none."""
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------
# Model cards

MODEL_CARD = "README.md"
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size")
_METRIC_KEYS = ("perplexity", "kl_to_teacher", "top1_agreement", "topk_kl_to_teacher", "kl_to_teachers")


def _hub_name(source: str | None) -> str | None:
    """A built-in name as its Hub id (``smollm2-135m`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    if source is None:
        return None
    from .models import BUILTIN_MODELS

    builtin = BUILTIN_MODELS.get(source)
    return builtin.hub_id or source if builtin else source


def _root_source(record: dict[str, Any]) -> str | None:
    """The model at the start of a chain of prunes (a run stage's original, or the first source)."""
    stage = record.get("run_stage") or {}
    if stage.get("original_source"):
        return stage["original_source"]
    source, node = record.get("source_model"), record
    while isinstance(node.get("source_provenance"), dict) and node["source_provenance"].get("source_model"):
        node = node["source_provenance"]
        source = node["source_model"]
    if source is None:
        student = (record.get("config") or {}).get("student") or {}
        source = student.get("source")
    return source


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def model_card(record: dict[str, Any], shape: dict[str, Any] | None = None, title: str | None = None) -> str:
    """The text of a Hugging Face model card (``README.md``) for a minicompress output.

    Args:
        record: the folder's provenance record (``minicompress.json``): a prune record
            (``original``, ``pruned``, ``parameters``), optionally extended by a
            ``recovery`` record and a ``run_stage`` record.
        shape: :func:`~minicompress.arch.describe` of the folder's model when the record
            has no ``pruned`` shape (a recovered model that minicompress did not prune).
        title: the card's heading (default: the output folder's name).

    Returns:
        Markdown with Hub metadata front matter (``base_model``, ``library_name``,
        ``tags``, ``pipeline_tag``), the shape against the original, the token budget and
        data, and the measured metrics.
    """
    recovery = record.get("recovery")
    correction = record.get("correction")
    stage = record.get("run_stage")
    pruned_shape = record.get("pruned") or shape or {}
    base = _hub_name(_root_source(record))
    model_type = pruned_shape.get("model_type")
    tags = ["minicompress", "minitron"] + (["pruned"] if "plan" in record else []) + (["distilled"] if recovery else [])
    tags += ["teacher-correction"] if correction else []
    tags += [model_type] if model_type else []
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags})
    output = ((recovery or {}).get("config") or {}).get("output") or (record.get("config") or {}).get("output")
    title = title or (Path(output).name if output else "minicompress model")
    what = "structurally pruned" + (" and distilled" if recovery else "") if "plan" in record else "distilled"
    if correction and not recovery and "plan" not in record:
        what = "fine-tuned (teacher-corrected)"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"A {what} version of `{base}`, made with minicompress following the Minitron recipe "
             "(Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)"
             + (": the importance of attention heads, FFN neurons, embedding channels and layers was measured on "
                "calibration text and the least important were removed" if "plan" in record else "")
             + ("; the model was recovered by knowledge distillation from its teacher." if recovery else
                ": the unpruned teacher was fine-tuned on the distillation text before pruning (teacher correction)."
                if correction else "."),
             "It is a stock Hugging Face model: `AutoModelForCausalLM.from_pretrained(<this folder>)` loads it "
             "without minicompress.", ""]
    if stage:
        lines += [f"Stage {stage.get('index', 0) + 1} of {stage.get('of', '?')} (`{stage.get('name')}`) of a "
                  "`minicompress run`.", ""]

    # shape against the original
    original = record.get("original")
    root = (stage or {}).get("original")
    columns = []
    if root and root != original:
        columns.append((f"original (`{base}`)", root))
    if original:
        columns.append((f"pruned from (`{record.get('source_model')}`)" if root and root != original
                        else f"original (`{base}`)", original))
    columns.append(("this model", pruned_shape))
    lines += ["## Shape", "", "| | " + " | ".join(c[0] for c in columns) + " |",
              "| --- |" + " --- |" * len(columns)]
    for key in _SHAPE_KEYS:
        lines.append(f"| {key} | " + " | ".join(_fmt(c[1].get(key)) for c in columns) + " |")
    totals = [(c[1].get("parameters") or {}).get("total") for c in columns]
    lines.append("| parameters | " + " | ".join(_fmt(t) for t in totals) + " |")
    if totals[0]:
        lines.append("| ratio | " + " | ".join(_fmt(t / totals[0]) if t else "n/a" for t in totals) + " |")
    lines.append("")

    # pruning
    if "plan" in record:
        cfg = record.get("config") or {}
        data = cfg.get("data") or {}
        score = cfg.get("score") or {}
        params = record.get("parameters") or {}
        lines += ["## Pruning", ""]
        if cfg.get("scores"):
            lines.append(f"- importance scores: reused from `{cfg['scores']}`")
        else:
            lines.append(f"- calibration data: `{data.get('source')}`, {_fmt(score.get('num_samples'))} sequences "
                         f"of {_fmt(data.get('seq_len'))} tokens (aggregation: sequence "
                         f"{score.get('sequence_aggregation')}, batch {score.get('batch_aggregation')})")
        target = {k: v for k, v in (record.get("target") or {}).items() if v not in (None, [], ())}
        lines.append("- target: " + ", ".join(f"{k}={_fmt(v)}" for k, v in target.items()))
        if params:
            lines.append(f"- parameters: {_fmt(params.get('original'))} -> {_fmt(params.get('pruned'))} "
                         f"(ratio {params.get('ratio', 0):.4f})")
        lines.append("")

    # recovery
    if recovery:
        rcfg = recovery.get("config") or {}
        loss = recovery.get("loss") or rcfg.get("loss") or {}
        lines += ["## Recovery (knowledge distillation)", "",
                  f"- teacher: `{_hub_name(recovery.get('teacher'))}`" + (
                      "; the mixture of " + ", ".join(f"`{_hub_name(t.get('teacher'))}` ({_fmt(t.get('weight'))})"
                                                      for t in recovery["teachers"])
                      if recovery.get("teachers") else ""),
                  f"- token budget: {_fmt(recovery.get('tokens_trained'))} tokens of "
                  f"`{(rcfg.get('data') or {}).get('source')}` ({_fmt(recovery.get('steps'))} steps of "
                  f"{_fmt(rcfg.get('global_batch_tokens'))} tokens, sequences of "
                  f"{_fmt((rcfg.get('data') or {}).get('seq_len'))})",
                  f"- loss: {loss.get('kind')} (temperature {loss.get('temperature')}, kl_weight "
                  f"{loss.get('kl_weight')}, ce_weight {loss.get('ce_weight')}), lr {rcfg.get('lr')}", ""]
        before, after = recovery.get("metrics_before") or {}, recovery.get("metrics_after") or {}
        keys = [k for k in _METRIC_KEYS if k in before or k in after]
        if keys:
            lines += [f"Held-out metrics ({_fmt(recovery.get('held_out_sequences'))} sequences of the training "
                      "text, never trained on):", "", "| metric | before recovery | after recovery |",
                      "| --- | --- | --- |"]
            lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys]
            lines.append("")

    if correction:
        lines += _correction_lines(correction, record.get("config") or {})

    versions = record.get("versions") or {}
    lines += ["## Provenance", "",
              f"Made with minicompress {versions.get('minicompress', '?')} (torch {versions.get('torch', '?')}, "
              f"transformers {versions.get('transformers', '?')}) on {record.get('created', '?')}. "
              "`minicompress.json` holds the full record (plan with kept indices, resolved config) and "
              "`minicompress.yaml` the resolved config.", ""]
    return "\n".join(lines)


def _correction_lines(correction: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The model card's section on a teacher correction (``minicompress correct``)."""
    data = cfg.get("data") or {}
    lines = ["## Teacher correction (fine-tuning)", "",
             f"- teacher: `{_hub_name(correction.get('teacher'))}`",
             f"- token budget: {_fmt(correction.get('tokens_trained'))} tokens of `{correction.get('data')}` "
             f"({_fmt(correction.get('steps'))} steps of {_fmt(cfg.get('global_batch_tokens'))} tokens, sequences "
             f"of {_fmt(data.get('seq_len'))})",
             f"- loss: next-token cross-entropy on the text, lr {correction.get('lr')}", ""]
    before, after = correction.get("metrics_before") or {}, correction.get("metrics_after") or {}
    if "perplexity" in before or "perplexity" in after:
        lines += [f"Held-out perplexity ({_fmt(correction.get('held_out_sequences'))} sequences of the text, never "
                  "trained on):", "", "| metric | before correction | after correction |", "| --- | --- | --- |",
                  f"| perplexity | {_fmt(before.get('perplexity'))} | {_fmt(after.get('perplexity'))} |", ""]
    return lines


def write_model_card(folder: str | Path, record: dict[str, Any], title: str | None = None) -> Path:
    """Write the model card ``README.md`` of an output folder (see :func:`model_card`).

    Args:
        folder: the (temporary) output folder; its ``config.json`` gives the shape when
            the record has none.
        record: the folder's provenance record.
        title: heading (default: the name of the record's ``output``).

    Returns:
        The path of the card.
    """
    folder = Path(folder)
    shape = None
    if not record.get("pruned") and (folder / "config.json").is_file():
        from transformers import AutoConfig

        from .arch import describe

        shape = describe(AutoConfig.from_pretrained(str(folder)))
    path = folder / MODEL_CARD
    path.write_text(model_card(record, shape, title))
    return path


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                       "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _write_tensor(handle, tensor) -> int:
    """Append the raw little-endian bytes of ``tensor`` (no copy); returns the byte count."""
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return 0
    data = flat.view(torch.uint8).numpy()
    handle.write(memoryview(data))
    return data.nbytes


def write_safetensors_streamed(path: str | Path, tensors: list[tuple[str, Any, tuple[int, ...]]],
                               blocks: Iterable) -> int:
    """Write a safetensors file whose tensors arrive one block at a time, buffering none.

    The header is written first from ``tensors``; then each block's bytes are appended as
    it arrives, so memory holds one block, whatever the file's size (the layout of
    https://huggingface.co/docs/safetensors: 8-byte header length, JSON header, raw data).

    Args:
        path: the file to write.
        tensors: ``[(name, torch dtype, shape)]`` in write order; widest dtypes first keeps
            every tensor aligned, as safetensors itself does.
        blocks: tensors whose concatenation along dim 0 is each tensor of ``tensors`` in turn.

    Returns:
        Bytes of tensor data written.

    Raises:
        MinicompressError: the blocks do not add up to the header's tensors.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    ends, offset = [], 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(dtype).split(".")[1]], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        ends.append((name, dtype, offset))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written, current = 0, 0
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for block in blocks:
            if current >= len(ends) or block.dtype != ends[current][1]:
                raise MinicompressError(f"{path}: a block does not match the header's tensor "
                                        f"{ends[min(current, len(ends) - 1)][0]!r}")
            written += _write_tensor(handle, block)
            del block
            while current < len(ends) and written >= ends[current][2]:
                if written > ends[current][2]:
                    raise MinicompressError(f"{path}: {ends[current][0]!r} got more bytes than its shape holds")
                current += 1
    if written != offset:
        raise MinicompressError(f"{path}: wrote {written} bytes of tensor data, the header says {offset}")
    return written

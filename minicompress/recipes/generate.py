"""``minicompress generate``: recovery data written by the teacher itself (data-free distillation).

LLM-QAT (Liu et al., arXiv 2305.17888, its ``generate_data.py``) trained on text the model
generated from one start token per vocabulary id (the next few tokens greedy, the rest
sampled), and found it better than WikiText or C4; Williams et al. (arXiv 2410.17170)
found model-generated calibration data often better than real data for pruning, and
Self-Data Distillation (arXiv 2410.09982) recovered a pruned Llama-3.1-8B better on
teacher-regenerated data. Every forward step that produces a token already has the
teacher's full distribution there, so the sparse targets of the ``sampled`` teacher cache
(Anshumann et al., ACL 2025: 12 draws with their log-probs) come from the same pass:
recovering on generated text needs no second teacher forward.

The output folder is a teacher cache that ``recover --teacher-cache DIR`` reads as it is
(``teacher_cache.json`` + ``shard-XXXXX.safetensors``), plus ``text.jsonl`` (one
``{"text": ...}`` per row) that ``--data`` and any other tool can read. Shards are written
into ``<output>.partial`` one at a time (each atomically); ``resume`` continues after the
last whole shard, and because every shard's start tokens and random stream depend only on
its index, a resumed run writes what an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .. import arch
from ..config import GenerateConfig, to_dict
from ..data import as_tensor, bos_token_id, load_sequences
from ..errors import MinicompressError
from ..hardware import describe_precision
from ..models import load_for_flag
from ..outputs import check_output, provenance, write_json_atomic, write_provenance
from ..progress import progress_bar
from ..runtime import model_device
from ..sampling import prompt_starts, sample_batch, start_tokens
from ..teacher_cache import CACHE_FORMAT, CACHE_INDEX_FILE

log = logging.getLogger(__name__)

TEXT_FILE = "text.jsonl"
_STATE = "generate.json"
#: Settings that shape the generated rows: a resumed run must match them.
_SHAPING = ("teacher", "data", "tokens", "prompt_tokens", "greedy_tokens", "top_k", "top_p", "temperature",
            "samples", "batch_size", "shard_tokens", "seed", "autocast")


def _shaping(config: GenerateConfig) -> dict[str, Any]:
    full = to_dict(config)
    return {k: full[k] for k in _SHAPING}


def _open_working_folder(config: GenerateConfig) -> tuple[Path, Path, int]:
    """Check the output; returns ``(out, work, shards already done)``.

    Raises:
        MinicompressError: an existing output without ``overwrite``; a working folder
            without ``resume`` / ``overwrite``, or one written with other settings.
    """
    out = check_output(config.output, config.overwrite)
    work = out.with_name(out.name + ".partial")
    state_path = work / _STATE
    if work.exists() and config.overwrite:
        if not state_path.is_file() and any(work.iterdir()):
            raise MinicompressError(f"--output: {work} exists and is not an interrupted generate run; "
                                    "remove it or choose another --output")
        shutil.rmtree(work)
    if work.exists() and not config.overwrite:
        if not state_path.is_file():
            raise MinicompressError(f"--output: {work} exists and is not an interrupted generate run; "
                                    "remove it or choose another --output")
        if not config.resume:
            raise MinicompressError(f"resume: {work} holds an interrupted generate run; pass --resume to continue "
                                    "it or --overwrite to start over")
        saved = json.loads(state_path.read_text())
        if saved["settings"] != _shaping(config):
            raise MinicompressError(f"resume: {work} was written with other settings; --overwrite starts over")
        return out, work, int(saved["shards_done"])
    if config.resume:
        log.warning("generate: --resume, but there is no interrupted run in %s; starting from the beginning", work)
    return out, work, 0


def generate(config: GenerateConfig, *, teacher: torch.nn.Module | None = None, tokenizer: Any = None) -> dict:
    """Sample ``config.tokens`` tokens of text from the teacher with its sparse targets.

    Args:
        config: the settings (``output`` required).
        teacher: an in-memory teacher (else loaded from ``config.teacher``).
        tokenizer: its tokenizer (required with an in-memory teacher).

    Returns:
        ``{"output", "rows", "tokens", "shards", "seconds", "tokens_per_s", "resumed_shards"}``.

    Raises:
        MinicompressError: an existing output without ``overwrite``, a stale working folder,
            a prompt text with fewer sequences than rows to start.
    """
    out, work, done = _open_working_folder(config)
    if teacher is None:
        teacher, tokenizer = load_for_flag(config.teacher, "--teacher")
    elif tokenizer is None:
        raise MinicompressError("tokenizer: pass tokenizer= together with an in-memory teacher")
    teacher.eval()
    device = model_device(teacher)
    precision = describe_precision(config.autocast, device)
    if precision["resolved"] == "bfloat16" and next(teacher.parameters()).dtype == torch.float32:
        teacher.to(torch.bfloat16)  # measured fastest under autocast (benchmarks/generate_speed.py)
    seq_len, bos = config.data.seq_len, bos_token_id(tokenizer)
    rows = config.tokens // seq_len
    if rows * seq_len != config.tokens:
        log.info("generate: %s tokens in %d rows of %d (whole rows), not %s", f"{rows * seq_len:,}", rows, seq_len,
                 f"{config.tokens:,}")
    if config.data.source is not None:
        text = load_sequences(config.data, tokenizer)
        text_rows = as_tensor(text[: min(len(text), rows)])
        text_rows = text_rows[:, 1:] if bos is not None else text_rows  # sample_batch puts BOS first itself
        starts = prompt_starts(text_rows, config.prompt_tokens, rows, config.seed)
    else:
        starts = start_tokens(tokenizer, rows, seed=config.seed)
    rows_per_shard = max(config.shard_tokens // seq_len // config.batch_size, 1) * config.batch_size
    n_shards = math.ceil(rows / rows_per_shard)
    work.mkdir(parents=True, exist_ok=True)
    if done == 0:
        (work / TEXT_FILE).write_text("")
    write_json_atomic(work / _STATE, {"settings": _shaping(config), "shards_done": done})

    from safetensors.torch import save_file

    t0, generated = time.perf_counter(), 0
    with progress_bar("generate", rows * seq_len, unit="tok") as bar:
        bar.advance(min(done * rows_per_shard, rows) * seq_len)
        for shard in range(done, n_shards):
            lo, hi = shard * rows_per_shard, min((shard + 1) * rows_per_shard, rows)
            gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + shard)
            parts = []
            for b in range(lo, hi, config.batch_size):
                part = sample_batch(teacher, starts[b:min(b + config.batch_size, hi)], seq_len,
                                    greedy_tokens=config.greedy_tokens, top_k=config.top_k, top_p=config.top_p,
                                    temperature=config.temperature, samples=config.samples, generator=gen,
                                    autocast=precision["resolved"], bos_token_id=bos, on_tokens=bar.advance)
                parts.append({k: v.cpu() for k, v in part.items()})
                generated += part["input_ids"].numel()
            ids = torch.cat([p["input_ids"] for p in parts])
            name = f"shard-{shard:05d}.safetensors"
            save_file({"input_ids": ids.to(torch.int32).contiguous(),
                       "sample_logprobs": torch.cat([p["sample_logprobs"] for p in parts]).to(torch.bfloat16).contiguous(),
                       "sample_indices": torch.cat([p["sample_indices"] for p in parts]).contiguous()},
                      str(work / f".{name}.tmp"))
            os.replace(work / f".{name}.tmp", work / name)
            with (work / TEXT_FILE).open("a") as f:
                for text in tokenizer.batch_decode(ids, skip_special_tokens=True):
                    f.write(json.dumps({"text": text}) + "\n")
            write_json_atomic(work / _STATE, {"settings": _shaping(config), "shards_done": shard + 1})
    seconds = time.perf_counter() - t0
    index = {"format": CACHE_FORMAT, "version": 1, "teacher": config.teacher.source, "seq_len": seq_len,
             "rows": rows, "tokens": rows * seq_len, "kind": "sampled", "top_k": config.samples,
             "vocab_size": arch.lm_head_weight(teacher).shape[0], "values_dtype": "bfloat16",
             "softcap_applied": arch.logit_softcap(teacher), "data": to_dict(config.data),
             "generated": {k: v for k, v in _shaping(config).items() if k not in ("teacher", "data")},
             "shards": [{"file": f"shard-{i:05d}.safetensors", "start": i * rows_per_shard,
                         "rows": min((i + 1) * rows_per_shard, rows) - i * rows_per_shard} for i in range(n_shards)]}
    write_json_atomic(work / CACHE_INDEX_FILE, index)
    (work / _STATE).unlink()
    write_provenance(work, provenance("generate", config, precision=precision, seconds=seconds,
                                      tokens_per_s=generated / max(seconds, 1e-9)))
    if out.exists():  # --overwrite
        shutil.rmtree(out)
    os.replace(work, out)
    return {"output": str(out), "rows": rows, "tokens": rows * seq_len, "shards": n_shards, "seconds": seconds,
            "tokens_per_s": generated / max(seconds, 1e-9), "resumed_shards": done}

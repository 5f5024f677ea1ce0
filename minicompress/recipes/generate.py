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
into ``<output>.partial``, each atomically, by ``workers`` processes side by side (on a CPU,
batched decoding is bound by per-operator overhead: a second process nearly doubles the
tokens/s where a second thread adds nothing); ``resume`` writes only the missing shards, and
because every shard's start tokens and random stream depend only on its index, a resumed
run, or one with other ``workers``, writes what an uninterrupted one does.
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
from safetensors.torch import load_file, save_file

from .. import arch
from ..config import GenerateConfig, to_dict
from ..data.rows import as_tensor, load_sequences
from ..data.sources import bos_token_id
from ..errors import MinicompressError
from ..hardware import describe_precision
from ..models import load_for_flag
from ..outputs import check_output, provenance, read_provenance, write_json_atomic, write_provenance
from ..progress import progress_bar
from ..runtime import model_device
from ..distillation.sampling import SamplingConfig, prompt_starts, sample_batch, start_tokens
from ..distillation.teacher_cache import CACHE_FORMAT, CACHE_INDEX_FILE

log = logging.getLogger(__name__)

TEXT_FILE = "text.jsonl"
_STATE = "generate.json"
#: most worker processes ``workers: 0`` (auto) starts on a CPU
MAX_AUTO_WORKERS = 8
#: Settings that shape the generated rows: a resumed run must match them.
_SHAPING = ("teacher", "data", "tokens", "prompt_tokens", "greedy_tokens", "top_k", "top_p", "temperature",
            "samples", "batch_size", "shard_tokens", "seed", "autocast")


def _shaping(config: GenerateConfig) -> dict[str, Any]:
    full = to_dict(config)
    return {k: full[k] for k in _SHAPING}


def same_generation(folder: str | Path, config: GenerateConfig) -> bool:
    """Whether the finished generation in ``folder`` was written with ``config``'s settings."""
    record = read_provenance(folder) or {}
    saved = record.get("config") or {}
    return {k: saved.get(k) for k in _SHAPING} == _shaping(config)


def interrupted(output: str | Path) -> bool:
    """Whether ``<output>.partial`` holds an interrupted generate run (``resume`` continues it)."""
    out = Path(output).expanduser()
    return (out.with_name(out.name + ".partial") / _STATE).is_file()


def _open_working_folder(config: GenerateConfig) -> tuple[Path, Path]:
    """Check the output; returns ``(out, work)``.

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
        return out, work
    if config.resume:
        log.warning("generate: --resume, but there is no interrupted run in %s; starting from the beginning", work)
    return out, work


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def plan_workers(requested: int, device: torch.device, pending: int) -> tuple[int, int]:
    """Worker processes and torch threads per worker for ``pending`` shards.

    Batched decoding on a CPU is bound by per-operator overhead, not arithmetic: one
    thread decodes as fast as two (``benchmarks/generate_speed.py --workers``), so ``auto``
    (``requested == 0``) runs one single-threaded process per core the process may use (at
    most :data:`MAX_AUTO_WORKERS`), each on its own shards. On an accelerator: one.

    Returns:
        ``(workers, threads)``.
    """
    if device.type != "cpu":
        return 1, torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = requested or min(cores, MAX_AUTO_WORKERS)
    workers = max(1, min(workers, pending))
    threads = torch.get_num_threads() if workers == 1 else max(1, cores // workers)
    return workers, threads


def _write_shard(teacher: torch.nn.Module, starts: torch.Tensor, shard: int, lo: int, hi: int, work: Path,
                 config: GenerateConfig, bos: int | None, autocast: str, on_tokens) -> None:
    """Generate rows ``lo:hi`` (shard ``shard``, its own random stream) and write its file atomically."""
    gen = torch.Generator(device=model_device(teacher)).manual_seed(config.seed * 1_000_003 + shard)
    sampling = SamplingConfig.from_config(config)
    parts = []
    for b in range(lo, hi, config.batch_size):
        part = sample_batch(teacher, starts[b:min(b + config.batch_size, hi)], config.data.seq_len, generator=gen,
                            sampling=sampling, autocast=autocast, bos_token_id=bos, on_tokens=on_tokens)
        parts.append({k: v.cpu() for k, v in part.items()})
    name = _shard_name(shard)
    save_file({"input_ids": torch.cat([p["input_ids"] for p in parts]).to(torch.int32).contiguous(),
               "sample_logprobs": torch.cat([p["sample_logprobs"] for p in parts]).to(torch.bfloat16).contiguous(),
               "sample_indices": torch.cat([p["sample_indices"] for p in parts]).contiguous()},
              str(work / f".{name}.tmp"))
    os.replace(work / f".{name}.tmp", work / name)


_WORKER: dict[str, Any] = {}


def _init_worker(counter, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["counter"] = counter


def _worker_advance(n: int) -> None:
    counter = _WORKER["counter"]
    with counter.get_lock():
        counter.value += n


def _worker_run(teacher: torch.nn.Module, starts: torch.Tensor, jobs: list[tuple[int, int, int]], work: str,
                shard_args: tuple) -> int:
    """A worker process: write each ``(shard, lo, hi)`` of ``jobs``; returns how many."""
    teacher.eval()
    for shard, lo, hi in jobs:
        _write_shard(teacher, starts, shard, lo, hi, Path(work), *shard_args, _worker_advance)
    return len(jobs)


def _run_workers(teacher, starts, jobs, work: Path, shard_args: tuple, workers: int, threads: int, bar) -> None:
    """Shards ``jobs`` over ``workers`` spawned processes (round robin), advancing ``bar``."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch.multiprocessing  # noqa: F401  (tensors travel to the workers in shared memory)

    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, threads)) as pool:
        futures = [pool.submit(_worker_run, teacher, starts, jobs[w::workers], str(work), shard_args)
                   for w in range(workers)]
        seen = 0
        while True:
            done, pending = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
            value = counter.value
            bar.advance(value - seen)
            seen = value
            if not pending or any(f.exception() is not None for f in done):
                break
        for f in futures:
            f.result()  # re-raises a worker's exception


def generate(config: GenerateConfig, *, teacher: torch.nn.Module | None = None, tokenizer: Any = None) -> dict:
    """Sample ``config.tokens`` tokens of text from the teacher with its sparse targets.

    Args:
        config: the settings (``output`` required).
        teacher: an in-memory teacher (else loaded from ``config.teacher``).
        tokenizer: its tokenizer (required with an in-memory teacher).

    Returns:
        ``{"output", "rows", "tokens", "shards", "seconds", "tokens_per_s", "resumed_shards",
        "workers"}``.

    Raises:
        MinicompressError: an existing output without ``overwrite``, a stale working folder,
            a prompt text with fewer sequences than rows to start.
    """
    out, work = _open_working_folder(config)
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
    write_json_atomic(work / _STATE, {"settings": _shaping(config)})
    jobs = [(i, i * rows_per_shard, min((i + 1) * rows_per_shard, rows)) for i in range(n_shards)
            if not (work / _shard_name(i)).is_file()]
    done = n_shards - len(jobs)
    workers, threads = plan_workers(config.workers, device, len(jobs))
    if workers > 1:
        log.info("generate: %d worker processes of %d thread(s) each, %d shard(s) to write", workers, threads,
                 len(jobs))
    shard_args = (config, bos, precision["resolved"])  # what every shard needs besides its rows

    t0 = time.perf_counter()
    generated = sum(hi - lo for _, lo, hi in jobs) * seq_len
    with progress_bar("generate", rows * seq_len, unit="tok", completed=rows * seq_len - generated) as bar:
        if workers == 1:
            for shard, lo, hi in jobs:
                _write_shard(teacher, starts, shard, lo, hi, work, *shard_args, bar.advance)
        else:
            _run_workers(teacher, starts, jobs, work, shard_args, workers, threads, bar)
    with (work / f".{TEXT_FILE}.tmp").open("w") as f:
        for shard in range(n_shards):
            ids = load_file(str(work / _shard_name(shard)))["input_ids"]
            for text in tokenizer.batch_decode(ids, skip_special_tokens=True):
                f.write(json.dumps({"text": text}) + "\n")
    os.replace(work / f".{TEXT_FILE}.tmp", work / TEXT_FILE)
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
                                      tokens_per_s=generated / max(seconds, 1e-9), workers=workers,
                                      threads_per_worker=threads))
    if out.exists():  # --overwrite
        shutil.rmtree(out)
    os.replace(work, out)
    return {"output": str(out), "rows": rows, "tokens": rows * seq_len, "shards": n_shards, "seconds": seconds,
            "tokens_per_s": generated / max(seconds, 1e-9), "resumed_shards": done, "workers": workers}

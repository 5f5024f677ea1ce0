"""``minicompress teacher-cache``: the teacher's sparse targets, computed once for many recoveries.

Minitron (arXiv 2407.14679) distils from a frozen teacher whose forward is a third of a
recovery step; a cache of sparse targets pays it once (as DistillKit's offline mode does).
The reader, :class:`minicompress.distillation.teacher_cache.TeacherCache`, is a component; this recipe
loads the teacher, reads the data and writes the shards atomically.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .. import arch
from ..config import TeacherCacheConfig, to_dict
from ..data.rows import as_tensor, load_sequences, load_training_data
from ..errors import MinicompressError
from ..runtime import autocast_context, final_hidden, model_device
from ..models import TORCH_DTYPES, load_model
from ..outputs import atomic_folder, check_output, provenance, write_json_atomic, write_provenance
from ..progress import progress_bar
from ..distillation.teacher_cache import CACHE_FORMAT, CACHE_INDEX_FILE

log = logging.getLogger(__name__)



@torch.no_grad()
def write_teacher_cache(config: TeacherCacheConfig, *, teacher: torch.nn.Module | None = None,
                        tokenizer: Any = None) -> dict:
    """Run the teacher over the data and store sparse targets per token, atomically.

    ``kind="topk"`` stores the teacher's top-k logits (biased: the tail's mass is dropped
    and the rest renormalised); ``kind="sampled"`` stores ``samples`` tokens drawn from
    the teacher's distribution with replacement and their log-probs, the unbiased
    "Sparse Logit Sampling" target of Anshumann et al. (ACL 2025).

    The rows are the first ``tokens // seq_len`` sequences of
    ``data.load_sequences(config.data)`` -- the same order :func:`recover` reads with the
    same ``data`` settings: its held-out sequences are rows ``[0, n_eval)`` and its first
    epoch trains on rows ``n_eval, n_eval + 1, ...``. So a cache of
    ``eval_tokens + tokens`` tokens covers a whole single-epoch recovery. With
    ``data.mixture`` the rows are the mixture's stream (stream positions ``0, 1, ...`` of
    :class:`~minicompress.data.rows.TrainingData` with nothing held out, each source's rows by
    its weight), at most as many as the sources hold together; ``teacher_cache.json``
    records the tokens of each source under ``sources``. Each shard
    ``shard-XXXXX.safetensors`` holds ``input_ids [r, L]`` int32, ``topk_values [r, L, k]``
    (``values_dtype``; the teacher's final logits, soft-capping applied) and
    ``topk_indices [r, L, k]`` int32 (``sampled``: ``sample_logprobs`` and
    ``sample_indices``, draws seeded by ``data.seed`` and the shard); ``teacher_cache.json``
    indexes them.

    Args:
        config: the cache settings (``output`` required).
        teacher: an in-memory teacher (else loaded from ``config.teacher``).
        tokenizer: its tokenizer (required with an in-memory teacher).

    Returns:
        ``{"output", "rows", "tokens", "top_k", "shards", "seconds", "tokens_per_s"}``.

    Raises:
        MinicompressError: an existing output without ``overwrite``, too little data, or
            ``top_k`` larger than the vocabulary.
    """
    out = check_output(config.output, config.overwrite)
    if teacher is None:
        teacher, tokenizer = load_model(config.teacher)
    elif tokenizer is None:
        raise MinicompressError("tokenizer: pass tokenizer= together with an in-memory teacher")
    teacher.eval()
    device = model_device(teacher)
    vocab = arch.lm_head_weight(teacher).shape[0]
    if config.kind == "topk" and config.top_k > vocab:
        raise MinicompressError(f"top_k: {config.top_k} exceeds the teacher's vocabulary ({vocab})")
    k = config.top_k if config.kind == "topk" else config.samples
    seq_len = config.data.seq_len
    mixed = None
    if config.data.mixture:  # the mixture's stream: rows drawn by weight, as recover draws them
        mixed = load_training_data(config.data, tokenizer, 0, seed=config.data.seed)
        available = mixed.num_train
    else:
        sequences = load_sequences(config.data, tokenizer)
        available = sequences.shape[0]
    rows = min(available, max(config.tokens // seq_len, 1))
    if rows * seq_len < config.tokens:
        log.warning("teacher-cache: the data holds %d sequences; caching %d tokens, not %d",
                    available, rows * seq_len, config.tokens)
    sequences = mixed.rows(torch.arange(rows)) if mixed is not None else sequences[:rows]
    rows_per_shard = max(config.shard_tokens // seq_len, 1)
    values_dtype = TORCH_DTYPES[config.values_dtype]
    shards = []
    start_time = time.perf_counter()
    from safetensors.torch import save_file

    with atomic_folder(out, config.overwrite) as tmp, progress_bar("teacher-cache", rows * seq_len, unit="tok") as bar:
        for shard_start in range(0, rows, rows_per_shard):
            shard_ids = as_tensor(sequences[shard_start:shard_start + rows_per_shard])
            values, indices = [], []
            gen = torch.Generator(device=device).manual_seed(config.data.seed * 1_000_003 + len(shards))
            for batch in shard_ids.split(config.micro_batch_size):
                ids = batch.to(device)
                with autocast_context(device, config.autocast):
                    hidden = final_hidden(teacher, ids)  # [b, L, H]
                flat = hidden.reshape(-1, hidden.shape[-1])
                v_parts, i_parts = [], []
                for chunk in flat.split(1024):  # never [b * L, V] at once
                    with autocast_context(device, config.autocast):
                        logits = arch.compute_logits(teacher, chunk)
                    if config.kind == "topk":
                        v, i = logits.float().topk(k, dim=-1)
                    else:
                        logp = torch.log_softmax(logits.float(), dim=-1)
                        i = torch.multinomial(logp.exp(), k, replacement=True, generator=gen)
                        v = logp.gather(-1, i)
                    v_parts.append(v.to(values_dtype).cpu())
                    i_parts.append(i.to(torch.int32).cpu())
                values.append(torch.cat(v_parts).view(*batch.shape, k))
                indices.append(torch.cat(i_parts).view(*batch.shape, k))
                bar.advance(batch.numel())
            name = f"shard-{len(shards):05d}.safetensors"
            v_name, i_name = ("topk_values", "topk_indices") if config.kind == "topk" else \
                ("sample_logprobs", "sample_indices")
            save_file({"input_ids": shard_ids.to(torch.int32).contiguous(),
                       v_name: torch.cat(values).contiguous(),
                       i_name: torch.cat(indices).contiguous()}, str(tmp / name))
            shards.append({"file": name, "start": shard_start, "rows": int(shard_ids.shape[0])})
        seconds = time.perf_counter() - start_time
        index = {
            "format": CACHE_FORMAT,
            "version": 1,
            "teacher": config.teacher.source,
            "seq_len": seq_len,
            "rows": rows,
            "tokens": rows * seq_len,
            "kind": config.kind,
            "top_k": k,
            "vocab_size": vocab,
            "values_dtype": config.values_dtype,
            "softcap_applied": arch.logit_softcap(teacher),
            "data": to_dict(config.data),
            "sources": mixed.tokens_per_source(rows, seq_len) if mixed is not None else {config.data.source: rows * seq_len},
            "shards": shards,
        }
        write_json_atomic(tmp / CACHE_INDEX_FILE, index)
        summary = {k: v for k, v in index.items() if k != "shards"}
        write_provenance(tmp, provenance("teacher-cache", config, cache=summary))
    return {"output": str(out), "rows": rows, "tokens": rows * seq_len, "kind": config.kind, "top_k": k,
            "shards": len(shards), "seconds": seconds, "tokens_per_s": rows * seq_len / seconds}

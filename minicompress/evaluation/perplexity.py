"""Evaluation: perplexity, agreement with a teacher, size and speed.

Perplexity follows the protocol of the pruning literature (LLM-Pruner, SliceGPT,
ShortGPT, Minitron reproductions): the evaluation text is tokenised as one stream and cut
into non-overlapping windows of ``seq_len`` (or, with ``stride``, overlapping windows
that score only their last ``stride`` tokens, as in the Hugging Face perplexity guide).
Agreement with a teacher is the per-token KL(teacher || student) and top-1 agreement of
next-token distributions. Logits are computed in chunks of tokens from the final hidden
states, so a 262k vocabulary (Gemma-3) never materialises ``[B, L, V]`` float32.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from ..arch import compute_logits, count_parameters
from ..config import DataConfig
from ..data.sources import bos_token_id, load_token_stream
from ..distillation.losses import auto_chunk_size
from ..errors import MinicompressError
from ..measure import PeakMemory, synchronize
from ..models import size_on_disk
from ..progress import progress_bar
from ..runtime import autocast_context, final_hidden, model_device

#: Bytes of one ``[chunk, V]`` float32 logits block during evaluation.
VOCAB_CHUNK_BYTES = 128 * 1024**2


def vocab_chunk_tokens(vocab_size: int) -> int:
    """Tokens per logits chunk: a power of two in [64, 1024] within ``VOCAB_CHUNK_BYTES``
    (512 for SmolLM2's 49,152-token vocabulary, 128 for Gemma-3's 262,144)."""
    return auto_chunk_size(vocab_size, VOCAB_CHUNK_BYTES, smallest=64)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def eval_windows(stream: torch.Tensor, seq_len: int, stride: int | None = None,
                 bos_token_id: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Windows over a token stream, each with the number of trailing tokens to score.

    Args:
        stream: ``[T]`` token ids.
        seq_len: window length (including BOS when given).
        stride: None for non-overlapping windows; otherwise the step between windows,
            each window scoring only the tokens not scored by the previous one.
        bos_token_id: prepended to every window when not None (never scored).

    Returns:
        ``[(window [<= seq_len], n_scored)]``; ``n_scored`` counts target positions.
    """
    body = seq_len - (1 if bos_token_id is not None else 0)
    step = stride or body
    windows = []
    prev_end = 0
    total = stream.numel()
    for begin in range(0, total, step):
        end = min(begin + body, total)
        if stride is None and end - begin < body:
            break  # drop the ragged tail, as the non-overlapping protocol does
        window = stream[begin:end]
        if bos_token_id is not None:
            window = torch.cat([torch.tensor([bos_token_id], dtype=stream.dtype), window])
        # targets are positions 1..len-1; the first window scores all of them
        n_new = end - prev_end if prev_end else window.numel() - 1
        windows.append((window, min(n_new, window.numel() - 1)))
        prev_end = end
        if end == total:
            break
    return windows


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, windows: list[tuple[torch.Tensor, int]], *,
                        teacher: torch.nn.Module | None = None, batch_size: int = 4,
                        autocast: str = "none", show_progress: bool = True) -> dict:
    """Perplexity of ``model`` over windows, and agreement with ``teacher`` if given.

    Args:
        model: the model under evaluation.
        windows: from :func:`eval_windows`.
        teacher: optional reference model with the same vocabulary.
        batch_size: windows per forward (windows of equal length are batched).
        autocast: ``none`` or ``bfloat16``.
        show_progress: draw a progress bar.

    Returns:
        ``{"nll", "perplexity", "tokens", "windows", "tokens_per_s"}`` plus
        ``{"kl_to_teacher", "top1_agreement", "teacher_nll", "teacher_perplexity"}`` with a teacher.
    """
    device = model_device(model)
    nll_sum, kl_sum, agree, t_nll_sum, count = 0.0, 0.0, 0, 0.0, 0
    tokens_in = sum(w.numel() for w, _ in windows)
    start = time.perf_counter()
    with progress_bar("eval", tokens_in, unit="tok") as bar:
        i = 0
        chunk_tokens = vocab_chunk_tokens(model.get_output_embeddings().weight.shape[0])
        while i < len(windows):
            length = windows[i][0].numel()
            group = [windows[i]]
            while i + len(group) < len(windows) and len(group) < batch_size and windows[i + len(group)][0].numel() == length:
                group.append(windows[i + len(group)])
            i += len(group)
            ids = torch.stack([w for w, _ in group]).to(device)
            with autocast_context(device, autocast):
                hidden = final_hidden(model, ids)
                t_hidden = final_hidden(teacher, ids.to(model_device(teacher))).to(device) if teacher is not None else None
            for b, (_, n_score) in enumerate(group):
                # score the last n_score targets: positions [L-1-n_score, L-1) predict [L-n_score, L)
                pos = slice(length - 1 - n_score, length - 1)
                targets = ids[b, length - n_score:]
                h, th = hidden[b, pos], (t_hidden[b, pos] if t_hidden is not None else None)
                for sl in _chunks(n_score, chunk_tokens):
                    with autocast_context(device, autocast):
                        logits = compute_logits(model, h[sl])
                    logp = F.log_softmax(logits.float(), dim=-1)
                    nll_sum -= logp.gather(-1, targets[sl, None]).sum().item()
                    if th is not None:
                        with autocast_context(device, autocast):
                            t_logits = compute_logits(teacher, th[sl].to(model_device(teacher))).to(device)
                        t_logp = F.log_softmax(t_logits.float(), dim=-1)
                        kl_sum += (t_logp.exp() * (t_logp - logp)).sum().item()
                        agree += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
                        t_nll_sum -= t_logp.gather(-1, targets[sl, None]).sum().item()
                count += n_score
            bar.advance(ids.numel())
    synchronize(device)
    elapsed = time.perf_counter() - start
    out = {
        "nll": nll_sum / count,
        "perplexity": math.exp(nll_sum / count),
        "tokens": count,
        "windows": len(windows),
        "tokens_per_s": tokens_in / elapsed,
    }
    if teacher is not None:
        out.update({
            "kl_to_teacher": kl_sum / count,
            "top1_agreement": agree / count,
            "teacher_nll": t_nll_sum / count,
            "teacher_perplexity": math.exp(t_nll_sum / count),
        })
    return out


@torch.no_grad()
def measure_speed(model: torch.nn.Module, vocab_size: int, *, prefill_tokens: int = 256,
                  decode_tokens: int = 32, autocast: str = "none", repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and greedy-decode throughput with the KV cache, batch size 1.

    Args:
        model: the model.
        vocab_size: random prompt ids are drawn below this.
        prefill_tokens: prompt length.
        decode_tokens: tokens generated one at a time after the prompt.
        autocast: ``none`` or ``bfloat16``.
        repeats: timed repetitions (after one warm-up); the median is reported.
        seed: seed of the random prompt.

    Returns:
        ``{"prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes"}``.
    """
    device = model_device(model)
    prompt = torch.randint(0, vocab_size, (1, prefill_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    prefill_times, decode_times = [], []
    with PeakMemory(device) as mem:
        for rep in range(repeats + 1):
            with autocast_context(device, autocast):
                synchronize(device)
                t0 = time.perf_counter()
                out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
                synchronize(device)
                t1 = time.perf_counter()
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(decode_tokens):  # transformers 5: ``cache=`` (``past_key_values=`` is deprecated)
                    out = model(input_ids=token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
                synchronize(device)
                t2 = time.perf_counter()
            if rep:  # the first pass warms up kernels and allocators
                prefill_times.append(t1 - t0)
                decode_times.append(t2 - t1)
    prefill_times.sort()
    decode_times.sort()
    return {
        "prefill_tokens_per_s": prefill_tokens / prefill_times[len(prefill_times) // 2],
        "decode_tokens_per_s": decode_tokens / decode_times[len(decode_times) // 2],
        "peak_memory_bytes": mem.peak,
    }


def parameter_summary(model: torch.nn.Module) -> dict:
    """Counted parameters of a model (tied weights once) next to its closed form."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    closed = count_parameters(model.config)
    return {"total": total, "non_embedding": closed["non_embedding"], "closed_form_total": closed["total"]}


def evaluate(model: torch.nn.Module, windows: list[tuple[torch.Tensor, int]] | None = None, *,
             teacher: torch.nn.Module | None = None, batch_size: int = 4, autocast: str = "auto", speed: bool = False,
             prefill_tokens: int = 256, decode_tokens: int = 32) -> dict:
    """The evaluation pipeline on ready windows: perplexity (and agreement with a teacher),
    parameters, peak memory and speed. The recipes read the text into windows
    (:func:`minicompress.evaluation.perplexity.evaluate_model`) and add the size on disk.

    Args:
        model: a supported ``*ForCausalLM``.
        windows: ``[(window [L], n_scored)]`` from :func:`eval_windows` (None: no perplexity).
        teacher: a reference model with the same vocabulary for ``kl_to_teacher``
            (KL(teacher || model) per token) and ``top1_agreement``.
        batch_size: windows per forward.
        autocast: ``auto``, ``none`` or ``bfloat16``.
        speed: also measure prefill / greedy-decode tokens/s (batch 1, KV cache).
        prefill_tokens: prompt length of the speed test.
        decode_tokens: generated tokens of the speed test.

    Returns:
        ``parameters``, ``non_embedding_parameters``, ``closed_form_parameters``,
        ``model_type``; with windows ``perplexity``, ``nll``, ``tokens``, ``windows``,
        ``eval_tokens_per_s``, ``eval_peak_memory_bytes`` (and with a teacher
        ``kl_to_teacher``, ``top1_agreement``, ``teacher_perplexity``, ``teacher_nll``); with
        ``speed`` ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``speed_peak_memory_bytes``.
    """
    out: dict = {}
    if windows is not None:
        with PeakMemory(model_device(model)) as mem:
            result = evaluate_perplexity(model, windows, teacher=teacher, batch_size=batch_size, autocast=autocast)
        out.update({k: v for k, v in result.items() if k != "tokens_per_s"})
        out["eval_tokens_per_s"] = result["tokens_per_s"]
        out["eval_peak_memory_bytes"] = mem.peak
    params = parameter_summary(model)
    out.update({"parameters": params["total"], "non_embedding_parameters": params["non_embedding"],
                "closed_form_parameters": params["closed_form_total"], "model_type": model.config.model_type})
    if speed:
        result = measure_speed(model, model.config.vocab_size, prefill_tokens=prefill_tokens,
                               decode_tokens=decode_tokens, autocast=autocast)
        out.update({"prefill_tokens_per_s": result["prefill_tokens_per_s"],
                    "decode_tokens_per_s": result["decode_tokens_per_s"],
                    "speed_peak_memory_bytes": result["peak_memory_bytes"]})
    return out


def text_windows(data: DataConfig, tokenizer, stride: int | None = None, flag: str = "--seq-len",
                 stream=None) -> list:
    """Read an evaluation text into ``[(window [L], n_scored)]``: one stream, no shuffle,
    cut into ``data.seq_len`` windows (BOS prepended for tokenizers that add one).

    Args:
        stream: the text's token stream when already read (:func:`~minicompress.data.sources.load_token_stream`).

    Raises:
        MinicompressError: unreadable text, or fewer tokens than one window (naming ``flag``).
    """
    if stream is None:
        stream = load_token_stream(data, tokenizer)
    windows = eval_windows(stream, data.seq_len, stride, bos_token_id(tokenizer))
    if not windows:
        raise MinicompressError(f"{flag}: the text has only {stream.numel()} tokens, fewer than one window of "
                                f"{data.seq_len}")
    return windows


def evaluate_model(model, tokenizer=None, data=None, *, teacher=None, seq_len: int = 1024, max_tokens: int | None = None,
                   stride: int | None = None, batch_size: int = 4, autocast: str = "auto", speed: bool = False,
                   prefill_tokens: int = 256, decode_tokens: int = 32, source: str | None = None) -> dict:
    """Held-out perplexity of an in-memory model (and agreement with a teacher, size and speed).

    This is ``minicompress eval`` on a loaded model, and what ``import minicompress as mc;
    mc.evaluate(model, tokenizer, "test.txt")`` calls; ``run``'s report uses it too.

    Args:
        model: a supported ``*ForCausalLM``.
        tokenizer: its tokenizer (needed with a text ``data``).
        data: a text source (file, folder, Hub dataset), a
            :class:`~minicompress.config.DataConfig`, ready ``[(window [L], n_scored)]``
            windows, or None (no perplexity: parameters, size and speed only).
        teacher: a reference model with the same vocabulary (KL, top-1 agreement).
        seq_len: window length for a text source.
        max_tokens: read at most this many tokens of a text source.
        stride: sliding-window stride (None: non-overlapping windows).
        batch_size, autocast, speed, prefill_tokens, decode_tokens: as for
            :func:`minicompress.evaluation.perplexity.evaluate`.
        source: the model's folder or GGUF file, for ``size_on_disk_bytes``.

    Returns:
        :func:`minicompress.evaluation.perplexity.evaluate`'s results, plus ``size_on_disk_bytes``.
    """
    windows = data
    if data is not None and not isinstance(data, list):
        config = data if isinstance(data, DataConfig) else DataConfig(
            source=str(data), seq_len=seq_len, max_tokens=max_tokens, shuffle=False, documents="file")
        windows = text_windows(config, tokenizer, stride, flag="seq_len")
    out = evaluate(model, windows, teacher=teacher, batch_size=batch_size, autocast=autocast, speed=speed,
                   prefill_tokens=prefill_tokens, decode_tokens=decode_tokens)
    out["size_on_disk_bytes"] = size_on_disk(source) if source is not None else None
    return out

"""``minicompress eval``: perplexity, teacher agreement, size and speed of a model.

Perplexity follows the protocol of the pruning literature (LLM-Pruner, SliceGPT,
ShortGPT); the metrics themselves live in :mod:`minicompress.evaluation`.
"""

from __future__ import annotations

import logging

from ..config import DataConfig, EvalConfig
from ..data import bos_token_id, load_token_stream
from ..errors import MinicompressError
from ..evaluation import eval_windows, evaluate
from ..models import load_for_flag, size_on_disk

log = logging.getLogger(__name__)


def text_windows(data: DataConfig, tokenizer, stride: int | None = None, flag: str = "--seq-len") -> list:
    """Read an evaluation text into ``[(window [L], n_scored)]``: one stream, no shuffle,
    cut into ``data.seq_len`` windows (BOS prepended for tokenizers that add one).

    Raises:
        MinicompressError: unreadable text, or fewer tokens than one window (naming ``flag``).
    """
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
            :func:`minicompress.evaluation.evaluate`.
        source: the model's folder or GGUF file, for ``size_on_disk_bytes``.

    Returns:
        :func:`minicompress.evaluation.evaluate`'s results, plus ``size_on_disk_bytes``.
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


def run_eval(config: EvalConfig) -> dict:
    """``minicompress eval``: load the model (and teacher), then :func:`evaluate_model`.

    Returns:
        A flat results dict: perplexity (and teacher agreement), parameters, size on
        disk, peak memory of the perplexity run, and prefill/decode speed.
    """
    model, tokenizer = load_for_flag(config.model, "--model")
    teacher = None
    if config.teacher is not None:
        teacher, _ = load_for_flag(config.teacher, "--teacher")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise MinicompressError(
                f"--teacher: vocabulary size {teacher.config.vocab_size} differs from the model's "
                f"{model.config.vocab_size}; KL needs the same tokenizer")
    windows = text_windows(config.data, tokenizer, config.stride)
    log.info("evaluating %s on %d windows of %d tokens", config.model.source, len(windows), config.data.seq_len)
    return evaluate_model(model, tokenizer, windows, teacher=teacher, batch_size=config.batch_size,
                          autocast=config.autocast, speed=config.speed, prefill_tokens=config.prefill_tokens,
                          decode_tokens=config.decode_tokens, source=config.model.source)

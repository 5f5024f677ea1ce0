"""``minicompress eval``: perplexity, teacher agreement, size and speed of a model.

Perplexity follows the protocol of the pruning literature (LLM-Pruner, SliceGPT,
ShortGPT); the metrics themselves live in :mod:`minicompress.evaluation`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import MinicompressError
from ..models import load_for_flag

log = logging.getLogger(__name__)




def run_eval(cfg) -> dict:
    """Run ``minicompress eval`` for a resolved :class:`~minicompress.config.EvalConfig`.

    Returns:
        A flat results dict: perplexity (and teacher agreement), parameters, size on
        disk, peak memory of the perplexity run, and prefill/decode speed.
    """
    from .. import data as data_mod
    from ..evaluation import eval_windows, evaluate_perplexity, measure_speed, parameter_summary
    from ..runtime import model_device
    from ..measure import PeakMemory
    from ..models import size_on_disk

    model, tokenizer = load_for_flag(cfg.model, "--model")
    teacher = None
    if cfg.teacher is not None:
        teacher, _ = load_for_flag(cfg.teacher, "--teacher")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise MinicompressError(
                f"--teacher: vocabulary size {teacher.config.vocab_size} differs from the model's "
                f"{model.config.vocab_size}; KL needs the same tokenizer")
    stream = data_mod.load_token_stream(cfg.data, tokenizer)
    bos = data_mod.bos_token_id(tokenizer)
    windows = eval_windows(stream, cfg.data.seq_len, cfg.stride, bos)
    if not windows:
        raise MinicompressError(
            f"--seq-len: the text has only {stream.numel()} tokens, fewer than one window of {cfg.data.seq_len}")
    log.info("evaluating %s on %d tokens: %d windows of %d", cfg.model.source, stream.numel(), len(windows),
             cfg.data.seq_len)
    device = model_device(model)
    with PeakMemory(device) as mem:
        ppl = evaluate_perplexity(model, windows, teacher=teacher, batch_size=cfg.batch_size,
                                  autocast=cfg.autocast)
    params = parameter_summary(model)
    results: dict[str, Any] = {
        "perplexity": ppl["perplexity"],
        "nll": ppl["nll"],
        "tokens": ppl["tokens"],
        "windows": ppl["windows"],
        "eval_tokens_per_s": ppl["tokens_per_s"],
    }
    for key in ("kl_to_teacher", "top1_agreement", "teacher_perplexity", "teacher_nll"):
        if key in ppl:
            results[key] = ppl[key]
    results.update({
        "parameters": params["total"],
        "non_embedding_parameters": params["non_embedding"],
        "closed_form_parameters": params["closed_form_total"],
        "size_on_disk_bytes": size_on_disk(cfg.model.source),
        "eval_peak_memory_bytes": mem.peak,
        "model_type": model.config.model_type,
    })
    if cfg.speed:
        speed = measure_speed(model, model.config.vocab_size, prefill_tokens=cfg.prefill_tokens,
                              decode_tokens=cfg.decode_tokens, autocast=cfg.autocast)
        results.update({
            "prefill_tokens_per_s": speed["prefill_tokens_per_s"],
            "decode_tokens_per_s": speed["decode_tokens_per_s"],
            "speed_peak_memory_bytes": speed["peak_memory_bytes"],
        })
    return results

"""``minicompress eval``: perplexity, teacher agreement, size and speed of a model.

Perplexity follows the protocol of the pruning literature (LLM-Pruner, SliceGPT,
ShortGPT); the metrics themselves live in :mod:`minicompress.evaluation.perplexity`. Task accuracy
(``--tasks``) goes through lm-evaluation-harness (:mod:`minicompress.evaluation.tasks`). With
``--draft``, a student drafts for the model in speculative decoding
(:mod:`minicompress.evaluation.draft`: acceptance rate and speedup).
"""

from __future__ import annotations

import dataclasses
import logging


from ..config import EvalConfig
from ..data.sources import bos_token_id, load_token_stream
from ..errors import MinicompressError
from ..evaluation.draft import check_draft, draft_prompts, evaluate_draft
from ..evaluation.perplexity import evaluate_model, text_windows
from ..models import config_for_flag, load_for_flag

log = logging.getLogger(__name__)


def _vocab_size(hf_config) -> int:
    return hf_config.get_text_config().vocab_size


def check_vocabularies(config: EvalConfig) -> None:
    """Refuse a teacher, draft or ``--compare`` model whose vocabulary size differs from the
    model's (the teacher's, for ``--compare`` with a teacher), from their ``config.json``
    alone: before any weights load. A model whose config comes only with its weights
    (GGUF, a Hub id not in the cache) is checked once loaded.

    Raises:
        MinicompressError: naming the flag, or a model that cannot be found.
    """
    model = config_for_flag(config.model, "--model")
    teacher = config_for_flag(config.teacher, "--teacher") if config.teacher is not None else None
    if config.draft is not None:
        draft = config_for_flag(config.draft, "--draft")
        if model is not None and draft is not None and _vocab_size(draft) != _vocab_size(model):
            raise MinicompressError(f"--draft: vocabulary size {_vocab_size(draft)} differs from the model's "
                                    f"{_vocab_size(model)}; a draft must share the model's tokenizer")
    if teacher is not None and model is not None and _vocab_size(teacher) != _vocab_size(model):
        raise MinicompressError(f"--teacher: vocabulary size {_vocab_size(teacher)} differs from the model's "
                                f"{_vocab_size(model)}; KL needs the same tokenizer")
    for source in config.compare if teacher is not None else ():
        other = config_for_flag(dataclasses.replace(config.model, source=source), "--compare")
        if other is not None and _vocab_size(other) != _vocab_size(teacher):
            raise MinicompressError(f"--compare {source}: vocabulary size {_vocab_size(other)} differs from the "
                                    f"teacher's {_vocab_size(teacher)}; KL needs the same tokenizer")


def run_eval(config: EvalConfig) -> dict:
    """``minicompress eval``: load the model (and teacher, and draft), then :func:`evaluate_model`
    (and, with a draft, :func:`minicompress.evaluation.draft.measure_draft`).

    Returns:
        A flat results dict: perplexity (and teacher agreement), parameters, size on
        disk, peak memory of the perplexity run, and prefill/decode speed; with a draft
        ``acceptance_rate``, ``draft_speedup`` and the other ``draft_*`` keys; with
        ``config.tasks``, ``tasks``: ``{task: {"acc", "acc_stderr", "acc_norm", ..., "n"}}``
        (:func:`minicompress.evaluation.tasks.evaluate_tasks`; no perplexity without ``data.source``);
        with ``config.compare``, ``compare``: one ``{"model", ...the same keys}`` per model.
    """
    manager = None
    if config.tasks:  # unknown tasks and a missing lm-eval fail before any model is loaded
        from ..evaluation.tasks import task_manager

        manager = task_manager(config.tasks, config.include_path)
    check_vocabularies(config)  # from config.json files: a mismatch fails before seconds of loading weights
    model, tokenizer = load_for_flag(config.model, "--model")
    teacher = None
    if config.teacher is not None:
        teacher, _ = load_for_flag(config.teacher, "--teacher")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise MinicompressError(
                f"--teacher: vocabulary size {teacher.config.vocab_size} differs from the model's "
                f"{model.config.vocab_size}; KL needs the same tokenizer")
    draft = None
    if config.draft is not None:
        draft, draft_tokenizer = load_for_flag(config.draft, "--draft")
        check_draft(model, tokenizer, draft, draft_tokenizer)
    windows = prompts = None
    if config.data.source is not None:
        stream = load_token_stream(config.data, tokenizer)
        windows = text_windows(config.data, tokenizer, config.stride, stream=stream)
        if draft is not None:
            prompts = draft_prompts(stream, config.draft_prompts, config.draft_prompt_tokens, bos_token_id(tokenizer))
    if windows is not None:
        log.info("evaluating %s on %d windows of %d tokens", config.model.source, len(windows), config.data.seq_len)
    out = evaluate_model(model, tokenizer, windows, teacher=teacher, batch_size=config.batch_size,
                         autocast=config.autocast, speed=config.speed, prefill_tokens=config.prefill_tokens,
                         decode_tokens=config.decode_tokens, source=config.model.source)
    if draft is not None:
        out.update(evaluate_draft(model, draft, prompts, new_tokens=config.draft_new_tokens,
                                  draft_tokens=config.draft_tokens, autocast=config.autocast))
    if config.tasks:
        from ..evaluation.tasks import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, tokenizer, config.tasks, include_path=config.include_path,
                                      num_fewshot=config.num_fewshot, limit=config.task_limit,
                                      batch_size=config.batch_size, autocast=config.autocast, manager=manager)
    if config.compare:
        del model, draft
        out["compare"] = [compare_model(config, source, teacher) for source in config.compare]
    return out


def compare_model(config: EvalConfig, source: str, teacher=None) -> dict:
    """One ``--compare`` model, evaluated exactly as ``config.model`` (same text, windows of its
    own tokenizer, precision, speed test and teacher), then released.

    Returns:
        ``{"model": source, **evaluate_model(...)}``.

    Raises:
        MinicompressError: the model cannot load, or its vocabulary differs from the teacher's.
    """
    model, tokenizer = load_for_flag(dataclasses.replace(config.model, source=source), "--compare")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise MinicompressError(f"--compare {source}: vocabulary size {model.config.vocab_size} differs from the "
                                f"teacher's {teacher.config.vocab_size}; KL needs the same tokenizer")
    log.info("evaluating %s (--compare)", source)
    windows = text_windows(config.data, tokenizer, config.stride)
    result = evaluate_model(model, tokenizer, windows, teacher=teacher, batch_size=config.batch_size,
                            autocast=config.autocast, speed=config.speed, prefill_tokens=config.prefill_tokens,
                            decode_tokens=config.decode_tokens, source=source)
    return {"model": source, **result}

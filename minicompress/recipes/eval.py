"""``minicompress eval``: perplexity, teacher agreement, size and speed of a model.

Perplexity follows the protocol of the pruning literature (LLM-Pruner, SliceGPT,
ShortGPT); the metrics themselves live in :mod:`minicompress.evaluation.perplexity`. Task accuracy
(``--tasks``) goes through lm-evaluation-harness (:mod:`minicompress.evaluation.tasks`). With
``--draft``, a student drafts for the model in speculative decoding
(:mod:`minicompress.evaluation.draft`: acceptance rate and speedup).
"""

from __future__ import annotations

import logging

from ..config import DataConfig, EvalConfig
from ..data.sources import bos_token_id, load_token_stream
from ..errors import MinicompressError
from ..evaluation.perplexity import eval_windows, evaluate
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


def draft_prompts(windows: list, count: int, prompt_tokens: int, flag: str = "--draft-prompts") -> list:
    """The first ``prompt_tokens`` tokens of ``count`` evenly spaced windows (the draft test's prompts).

    Args:
        windows: ``[(window [L], n_scored)]`` from :func:`text_windows`.
        count: number of prompts.
        prompt_tokens: tokens per prompt.
        flag: named in the error.

    Returns:
        ``count`` token tensors ``[prompt_tokens]``, from distinct windows in text order.

    Raises:
        MinicompressError: fewer windows of at least ``prompt_tokens`` tokens than ``count``.
    """
    usable = [w for w, _ in windows if w.numel() >= prompt_tokens]
    if len(usable) < count:
        raise MinicompressError(f"{flag}: the text has {len(usable)} windows of at least {prompt_tokens} tokens, "
                                f"fewer than {count} prompts; ask for fewer or give a longer text")
    return [usable[i * len(usable) // count][:prompt_tokens].clone() for i in range(count)]


#: ``measure_draft`` keys renamed in eval's results (the others get a ``draft_`` prefix).
_DRAFT_KEYS = {"acceptance_rate": "acceptance_rate", "prompts": "draft_prompts", "new_tokens": "draft_generated_tokens",
               "num_assistant_tokens": "draft_tokens"}


def check_draft(model, tokenizer, draft, draft_tokenizer, flag: str = "--draft") -> None:
    """Refuse a draft whose vocabulary differs from the model's (size, or the tokenizers' vocabularies).

    Raises:
        MinicompressError: naming ``flag``.
    """
    size, draft_size = model.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    if size != draft_size:
        raise MinicompressError(f"{flag}: vocabulary size {draft_size} differs from the model's {size}; "
                                "a draft must share the model's tokenizer")
    if tokenizer is not None and draft_tokenizer is not None and tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise MinicompressError(f"{flag}: its tokenizer's vocabulary differs from the model's; a draft must share "
                                "the model's tokenizer")


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
    windows = text_windows(config.data, tokenizer, config.stride) if config.data.source is not None else None
    prompts = draft_prompts(windows, config.draft_prompts, config.draft_prompt_tokens) if draft is not None else None
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
    import dataclasses

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


def evaluate_draft(model, draft, prompts: list, *, new_tokens: int, draft_tokens: int, autocast: str = "auto") -> dict:
    """:func:`minicompress.evaluation.draft.measure_draft` of ``draft`` for ``model``, as eval's flat keys.

    Returns:
        ``acceptance_rate``, ``draft_speedup``, ``draft_plain_tokens_per_s``,
        ``draft_assisted_tokens_per_s``, ``draft_outputs_identical`` ... (``measure_draft``'s
        keys prefixed with ``draft_``; ``prompts``, ``new_tokens`` and ``num_assistant_tokens``
        become ``draft_prompts``, ``draft_generated_tokens`` and ``draft_tokens``) and
        ``draft_parameters``.
    """
    from ..evaluation.perplexity import parameter_summary
    from ..progress import progress_bar
    from ..evaluation.draft import DraftSettings, measure_draft

    log.info("draft test: %d prompts of %d tokens, %d new tokens each, draft tokens per teacher forward: %d",
             len(prompts), prompts[0].numel(), new_tokens, draft_tokens)
    with progress_bar("draft", len(prompts), unit="prompt") as bar:
        result = measure_draft(model, draft, prompts, new_tokens=new_tokens,
                               settings=DraftSettings(num_assistant_tokens=draft_tokens), autocast=autocast,
                               on_prompt=lambda done: bar.advance(1))
    out = {_DRAFT_KEYS.get(key, f"draft_{key}"): value for key, value in result.items()}
    out["draft_parameters"] = parameter_summary(draft)["total"]
    return out

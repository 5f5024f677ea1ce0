"""What ``minicompress score`` and ``minicompress prune`` do, as Python functions.

This module sits on top (next to the CLI): it loads models and data and hands tensors to
:mod:`minicompress.pruning.scoring` and :mod:`minicompress.pruning.plan`, which never load anything
themselves. Every output folder is written atomically with its provenance record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed
from ..arch import count_parameters, describe
from ..config import PruneConfig
from ..data.rows import calibration_batches, load_training_data
from ..data.sources import check_local_source
from ..distillation.distill import distill, make_schedule
from ..distillation.loop import StepRuntime
from ..errors import MinicompressError
from ..hardware import describe_precision, resolve_compile
from ..checkpoint import working_folder
from ..models import SAFETENSORS_INDEX, load_config, load_model
from ..outputs import (atomic_folder, check_output, provenance, read_provenance, settings_digest, write_json_atomic,
                       write_model_card, write_provenance, write_safetensors_streamed)
from ..progress import progress_bar
from ..pruning.plan import apply_plan_, make_plan, pruned_copy
from ..quantize import is_quantized
from ..runtime import model_device
from ..pruning.search import SearchSpace, row_target, search_architecture, validate_target, zero_shot_ranking
from ..pruning.scoring import ImportanceScores
from .score import score

log = logging.getLogger(__name__)


def _explicit_sizes(target) -> dict[str, Any]:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    return {k: getattr(target, k) for k in keys if getattr(target, k) is not None}


def prune(config: PruneConfig, *, model=None, tokenizer=None,
          record_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score (or reuse scores), choose the architecture, rewrite the model and save it.

    The target is checked against the model's ``config.json`` (:func:`validate_target`)
    before any weights or data are loaded, so an impossible target fails in seconds.
    With ``target.target_params`` the search ranks candidate shapes by zero-shot loss
    (:func:`search_architecture`), then (``search_distill_candidates`` > 0) distils the
    best few from the untouched original and keeps the lowest held-out KL
    (:func:`distill_candidates`); only then is the model rewritten.

    Args:
        config: the prune configuration.
        model: an already loaded model (else ``config.model`` is loaded). It is pruned in place.
        tokenizer: its tokenizer.
        record_extra: extra keys for the output's ``minicompress.json`` (``minicompress
            run`` records the stage there).

    Returns:
        A report: original and pruned architecture, parameter counts, the plan, the
        architecture search table when ``target.target_params`` was used (also written
        as ``search.json`` in the output; the ``chosen`` row is the result), and ``seconds``.

    Raises:
        MinicompressError: no target, conflicting targets, or an impossible target.
    """
    start = time.perf_counter()
    target = config.target
    explicit = _explicit_sizes(target)
    if target.target_params is not None and (explicit or target.drop_layers):
        raise MinicompressError("target.target_params: give either target_params or explicit sizes / drop_layers, not both")
    if target.target_params is None and not explicit and not target.drop_layers:
        raise MinicompressError("target: nothing to prune; set --target-params, explicit sizes or --drop-layers")
    if config.streaming:
        config = _resolve_auto_repair(config, None)[0]  # none: the record says so
        return _prune_streaming(config, {**explicit, "drop_layers": list(target.drop_layers),
                                         "layer_metric": target.layer_metric}, record_extra=record_extra)
    if config.output is not None:
        check_output(config.output, config.overwrite)
    hf_config = model.config if model is not None else load_config(
        config.model.source, trust_remote_code=config.model.trust_remote_code)
    if hf_config is not None:  # None for GGUF: checked once loaded, still before scoring
        validate_target(hf_config, target)
    _check_data(config)  # like the target: before any folder is created or any weights are loaded
    repair_note = None
    if hf_config is not None:
        config, repair_note = _resolve_auto_repair(config, hf_config)
    _check_repair(config, hf_config)
    search_folder = _check_search_folder(config)
    if (model is None and distributed.world_size() > 1 and target.target_params is None and config.output is not None
            and _streamable(config.model)):
        return _prune_sharded(config, {**explicit, "drop_layers": list(target.drop_layers),
                                       "layer_metric": target.layer_metric}, record_extra)
    if model is None:
        model, tokenizer = load_model(config.model)
        if is_quantized(model):
            raise MinicompressError(f"--model {config.model.source}: a torchao-quantized model cannot be pruned; "
                                    "prune the float model, then quantize it")
        if hf_config is None:
            validate_target(model.config, target)
            config, repair_note = _resolve_auto_repair(config, model.config)
    original_config = model.config.to_dict()
    original_params = count_parameters(model.config)

    score_config = _score_config(config)
    work = _open_search_folder(config, *search_folder) if search_folder is not None else None
    if config.scores is not None:
        scores = ImportanceScores.load(config.scores)
    elif work is not None and (work / "scores").is_dir():
        scores = ImportanceScores.load(work / "scores")
        log.info("search: resuming from %s (scores, %s)", work,
                 "candidate table" if (work / SEARCH_FILE).is_file() else "no candidates yet")
    else:
        scores = score(score_config, model=model, tokenizer=tokenizer)
        if work is not None:
            (work / "scores").mkdir()
            scores.save(work / "scores")

    search_table = None
    if target.target_params is not None:
        save_table = None if work is None else (lambda: write_json_atomic(work / SEARCH_FILE, search_table))
        if work is not None and (work / SEARCH_FILE).is_file():
            search_table = json.loads((work / SEARCH_FILE).read_text())
        else:
            batches, _ = calibration_batches(dataclasses.replace(score_config, num_samples=config.search_batches * 2,
                                                                  batch_size=2, layer_scores=False), tokenizer)
            with progress_bar("search", None, unit="cand") as bar:
                _, search_table = search_architecture(model, scores, target.target_params, batches,
                                                      space=SearchSpace(layer_metric=target.layer_metric,
                                                                        width_multiple=target.width_multiple),
                                                      finalists=max(6, config.search_distill_candidates),
                                                      progress=bar)
            if save_table is not None:
                save_table()
        best = zero_shot_ranking(search_table)[0]
        if config.search_distill_candidates:
            best = distill_candidates(config, model, tokenizer, scores, search_table, on_candidate=save_table)
        chosen = row_target(best)
        for row in search_table:
            row["chosen"] = row is best
    else:
        chosen = {**explicit, "drop_layers": list(target.drop_layers), "layer_metric": target.layer_metric}
    plan = make_plan(scores, model.config, {**chosen, "norm_correction": target.norm_correction})
    if repair_note:
        log.info("prune: %s", repair_note)
    repair = _apply_plan_and_repair(config, model, tokenizer, plan, score_config)
    pruned_params = count_parameters(model.config)
    report = {
        "source": config.model.source,
        "target": {k: v for k, v in chosen.items()},
        "original": describe_config(original_config),
        "pruned": describe(model.config),
        "parameters": {"original": original_params["total"], "pruned": pruned_params["total"],
                       "ratio": pruned_params["total"] / original_params["total"]},
        "plan": plan.to_dict(),
        "scores_digest": scores.digest(),
        "search": search_table,
        "repair": repair,
    }
    if config.output is not None and distributed.is_main():  # torchrun: every rank pruned alike; rank 0 writes
        with atomic_folder(config.output, config.overwrite) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if search_table is not None:
                (tmp / "search.json").write_text(json.dumps(search_table, indent=2) + "\n")
            report["seconds"] = round(time.perf_counter() - start, 2)
            record = provenance("prune", config, source_model=config.model.source,
                                source_provenance=_source_provenance(config.model.source), **report,
                                **(record_extra or {}))
            write_provenance(tmp, record)
            write_model_card(tmp, record)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    if config.output is not None:
        distributed.barrier()
        report["output"] = str(config.output)
    return report


# ----------------------------------------------------------------------------------------
# Repairs (issue 30): closed-form refits around apply_plan_ (minicompress.pruning.repair)


def _score_config(config: PruneConfig):
    """The prune's scoring settings with its own model and data (nothing written): what scores,
    ranks candidates and feeds the repairs."""
    return dataclasses.replace(config.score, model=config.model, data=config.data, output=None)


def _repair_tokens(config: PruneConfig) -> tuple[int, str]:
    """Calibration tokens the repairs will read (whole rows of the scoring's), and the
    key that bounds them."""
    seq_len = config.data.seq_len
    rows = -(-config.repair_tokens // seq_len)
    if rows <= config.score.num_samples:
        return rows * seq_len, "repair_tokens"
    return config.score.num_samples * seq_len, "score.num_samples"


def _check_repair(config: PruneConfig, hf_config: Any) -> None:
    """Refuse a repair that cannot run, before any weights are loaded or anything is
    written: no calibration text, torchrun, the family (:func:`check_repairs`) and, for
    explicit sizes, too few calibration tokens for the widest refit."""
    from ..pruning.repair import check_repairs

    repairs = config.repairs
    if not repairs:
        return
    if not config.data.sources():
        raise MinicompressError("--data: --repair reads calibration text (the scoring's rows), also with --scores")
    if distributed.world_size() > 1:
        raise MinicompressError("repair: repairs run in one process, not under torchrun; drop --repair or torchrun")
    if hf_config is None:
        return  # GGUF: checked with the plan, still before anything is written
    target = config.target
    sizes = None
    if target.target_params is None:
        sizes = {"intermediate_size": target.intermediate_size or hf_config.intermediate_size,
                 "num_attention_heads": target.num_attention_heads or hf_config.num_attention_heads,
                 "drops_layers": bool(target.drop_layers) or (target.num_hidden_layers or 0) not in
                 (0, hf_config.num_hidden_layers)}
    tokens, key = _repair_tokens(config)
    check_repairs(repairs, hf_config, sizes=sizes, tokens=tokens, token_key=key)


def _resolve_auto_repair(config: PruneConfig, hf_config: Any) -> tuple[PruneConfig, str | None]:
    """``repair: auto`` made explicit: :data:`~minicompress.config.REPAIR_AUTO` where
    :func:`_check_repair` takes it, else ``none``. The resolved value is what the output's
    ``minicompress.json`` records. Other values pass unchanged.

    Returns:
        ``(config, note)``: ``note`` says what ``auto`` became and why (logged once the prune
        runs, so that a refused command still prints one line), None for other values.
    """
    if not config.repair_is_auto:
        return config, None
    reason = "--streaming never loads the model" if config.streaming else None
    if reason is None:
        try:
            _check_repair(config, hf_config)
        except MinicompressError as err:
            reason = str(err)
    if reason:
        return dataclasses.replace(config, repair=("none",)), f"repair auto -> none ({reason})"
    return (dataclasses.replace(config, repair=config.repairs),
            f"repair auto -> {','.join(config.repairs)} ({config.repair_ridge} ridge, "
            f"{_repair_tokens(config)[0]:,} calibration tokens)")


def _repair_batches(config: PruneConfig, tokenizer, score_config) -> tuple[list[torch.Tensor], str]:
    """The repairs' calibration batches (the first ``repair_tokens`` tokens of the scoring's
    rows, in ``score.batch_size`` rows each) and the key that bounds their count."""
    tokens, key = _repair_tokens(config)
    batches, _ = calibration_batches(dataclasses.replace(score_config, layer_scores=False), tokenizer)
    rows = torch.cat(batches)[: tokens // config.data.seq_len]
    if rows.shape[0] * rows.shape[1] < tokens:
        key = "repair_tokens"  # the text ran out before num_samples rows
    return list(rows.split(config.score.batch_size)), key


def _refit_(config: PruneConfig, student, teacher, plan, batches: list[torch.Tensor], bias: list[str]) -> list:
    """The refits and FLAP biases of ``config.repair`` on the pruned ``student``, in place, from
    ``teacher`` (:func:`~minicompress.pruning.repair.teacher_weights` of the original); returns the
    per-layer record."""
    from ..pruning import repair as rp
    from ..pruning.plan import check_shapes_match_config

    if bias:
        rp.add_biases_(student, bias)
        check_shapes_match_config(student.config, {n: tuple(p.shape) for n, p in student.named_parameters()},
                                  "repair: the model with biases does not match its config")
    repairs = config.repairs
    return rp.refit_layers_(student, teacher, plan, batches, rp.RefitSettings(
        refit="refit" in repairs, refit_o="refit_o" in repairs, bias=bias, damping=config.repair_damping,
        keep_scale=config.repair_keep_scale, ridge=config.repair_ridge, damping_scale=config.repair_damping_scale))


def _flap_bias(config: PruneConfig, plan) -> list[str]:
    """The projections that get FLAP's bias: where heads (o_proj) or neurons (down_proj) were dropped."""
    if "flap" not in config.repairs:
        return []
    shrunk = {key: plan.config[key] < plan.original[key] for key in ("num_attention_heads", "intermediate_size")}
    return [name for name, key in (("o_proj", "num_attention_heads"), ("down_proj", "intermediate_size"))
            if shrunk[key]]


def _apply_plan_and_repair(config: PruneConfig, model, tokenizer, plan, score_config) -> dict[str, Any] | None:
    """:func:`apply_plan_`, with the repairs of ``config.repair`` around it.

    ``replaceme`` is computed on the original model and folded into it before the plan
    is applied; the refits keep references to the original weights of the kept layers
    (no copy: peak memory is the original plus the pruned model, as in ``apply_plan_``),
    apply the plan, then repair the pruned model layer by layer on the first
    ``repair_tokens`` tokens of the scoring's calibration rows.

    Returns:
        None without repairs; else the record written to ``minicompress.json``: the
        repairs, tokens, settings, ``replaceme`` spans and per-layer ``layers`` errors
        before and after (:func:`~minicompress.pruning.repair.refit_layers_`).
    """
    repairs = config.repairs
    if not repairs:
        apply_plan_(model, plan)
        return None
    from ..pruning import repair as rp

    start = time.perf_counter()
    batches, key = _repair_batches(config, tokenizer, score_config)
    tokens = sum(b.numel() for b in batches)
    rp.check_repairs(repairs, model.config, plan, tokens=tokens, token_key=key)
    record: dict[str, Any] = {"repairs": list(repairs), "tokens": tokens, "damping": list(config.repair_damping),
                              "keep_scale": config.repair_keep_scale, "ridge": config.repair_ridge,
                              "damping_scale": config.repair_damping_scale}
    if "replaceme" in repairs:
        maps = rp.span_maps(model, plan, batches, damping=config.repair_damping[0])
        rp.fold_span_maps_(model, maps)
        record["replaceme"] = [m.record() for m in maps]
        if not maps:
            log.warning("repair: replaceme: the chosen architecture drops no layers; nothing to map")
    bias = _flap_bias(config, plan)
    if bias:
        record["flap"] = bias
    refits = "refit" in repairs or "refit_o" in repairs or bias
    teacher = rp.teacher_weights(model, plan) if refits else None
    apply_plan_(model, plan)
    if refits:
        record["layers"] = _refit_(config, model, teacher, plan, batches, bias)
        for proj in ("o_proj", "down_proj"):
            rows_ = [r[proj] for r in record["layers"] if "error_before" in r.get(proj, {})]
            if rows_:
                log.info("repair: %s relative error %.4f -> %.4f (mean over %d layers)", proj,
                         sum(r["error_before"] for r in rows_) / len(rows_),
                         sum(r["error_after"] for r in rows_) / len(rows_), len(rows_))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _candidate(config: PruneConfig, model, plan, batches: list[torch.Tensor] | None):
    """A search candidate: a pruned copy of ``model`` with the refits and FLAP biases of
    ``config.repair`` when ``batches`` are given (``replaceme`` folds into the original, which
    the search must keep: its candidates go without it)."""
    student = pruned_copy(model, plan)
    bias = _flap_bias(config, plan)
    if batches is not None and ("refit" in config.repairs or "refit_o" in config.repairs or bias):
        from ..pruning import repair as rp

        rp.check_repairs(tuple(r for r in config.repairs if r != "replaceme"), model.config, plan,
                         tokens=sum(b.numel() for b in batches))
        _refit_(config, student, rp.teacher_weights(model, plan), plan, batches, bias)
    return student


#: the candidate table of an architecture search in progress (in ``<output>.partial``)
SEARCH_FILE = "search.json"
_SEARCH_STATE = "search-state.json"
#: prune settings that change nothing an interrupted search has already computed
_SEARCH_RESUME_FREE_KEYS = ("output", "overwrite", "resume")


def _search_digest(config: PruneConfig) -> str:
    return settings_digest({k: v for k, v in dataclasses.asdict(config).items() if k not in _SEARCH_RESUME_FREE_KEYS})


def _check_data(config: PruneConfig) -> None:
    """Refuse a prune that will need calibration text and has none (or names a missing
    local file), before any folder is created or any weights are loaded.

    Text is needed to score (no ``scores``) and by every ``target_params`` search: it
    ranks the candidate shapes by their loss on that text and distils the best few on it.
    """
    needs = None
    if config.target.target_params is not None:
        needs = ("the architecture search of --target-params needs calibration text: it ranks the candidate "
                 "shapes by their loss on it and distils the best few on it")
    elif config.scores is None:
        needs = "scoring needs calibration text (or reuse scores written by minicompress score with --scores)"
    if needs is None:
        return
    if not config.data.sources():
        raise MinicompressError(f"--data: a data source is required; {needs}")
    for source, _ in config.data.sources():
        check_local_source("--data", source)


def _check_search_folder(config: PruneConfig) -> tuple[Path, bool] | None:
    """Where an architecture search keeps its progress, and whether to resume from it; no
    side effects (:func:`_open_search_folder` prepares it once everything is checked).

    A ``target_params`` prune with an output, in one process, keeps its scores and its
    candidate table (each distilled candidate's row as soon as it is done) in
    ``<output>.partial``; ``resume`` continues from there, skipping what is done. The
    folder is deleted once the output is written.

    The search recognises its own folder by its marker file (``search-state.json``) and
    only ever deletes a folder that holds it (or an empty one). A ``<output>.partial``
    without it (a recovery's checkpoints of the same name, anything else) is refused even
    with ``overwrite``: ``overwrite`` replaces the *output* and the search's own progress,
    and the foreign folder may hold hours of someone's work, so the user moves it or
    picks another output.

    Returns:
        ``(folder, resume)``, or None when no folder is kept (explicit sizes, no output,
        torchrun).

    Raises:
        MinicompressError: a foreign ``<output>.partial``; progress of an interrupted
            search is there and neither ``resume`` nor ``overwrite`` is set, or
            ``resume`` finds other settings without ``overwrite`` (with it, the search
            starts over).
    """
    if config.target.target_params is None or config.output is None or distributed.world_size() > 1:
        return None
    work = working_folder(config.output)
    if not work.exists():
        return work, False
    state = work / _SEARCH_STATE
    if not work.is_dir() or not (state.is_file() or not any(work.iterdir())):
        raise MinicompressError(f"--output: {work} exists and is not the working folder of an architecture search "
                                "(no search-state.json); move it away or choose another --output (it is never "
                                "deleted, not even with --overwrite)")
    if not state.is_file():
        return work, False  # empty
    progress = (work / "scores").is_dir() or (work / SEARCH_FILE).is_file()
    if config.resume:
        try:
            same = json.loads(state.read_text()).get("digest") == _search_digest(config)
        except (OSError, ValueError, AttributeError):
            same = False
        if same:
            return work, True
        if progress and not config.overwrite:
            raise MinicompressError(f"resume: {work} holds a search with other settings; pass --overwrite to "
                                    "start over")
    elif progress and not config.overwrite:
        raise MinicompressError(f"resume: {work} holds the progress of an interrupted architecture search; "
                                "pass --resume to continue it or --overwrite to start over")
    return work, False


def _open_search_folder(config: PruneConfig, work: Path, resume: bool) -> Path:
    """The search's working folder, ready: kept when resuming, else (re)created with its
    marker. Only called with what :func:`_check_search_folder` accepted."""
    if resume:
        return work
    if work.exists():
        if (work / _SEARCH_STATE).is_file():
            shutil.rmtree(work)
        else:
            work.rmdir()  # empty (anything else was refused): never a recursive delete
    work.mkdir(parents=True)
    write_json_atomic(work / _SEARCH_STATE, {"digest": _search_digest(config), "command": "prune"})
    return work


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def distill_candidates(config: PruneConfig, model, tokenizer, scores: ImportanceScores,
                       table: list[dict[str, Any]], *, on_candidate: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Minitron's choice (arXiv 2407.14679, sec. 4): distil the best zero-shot candidates
    briefly and keep the one with the lowest held-out KL to the original.

    Each of the ``config.search_distill_candidates`` best rows of
    :func:`~minicompress.pruning.search.zero_shot_ranking` is pruned from a copy of ``model``
    (left as it was: weights, dtype, device, ``requires_grad``, train/eval mode) and
    repaired as the chosen one will be (``config.repair``'s refits and biases, on the same
    calibration rows; the default ``auto`` refits ``down_proj``), then
    distilled in memory for ``config.search_distill_tokens`` tokens from ``model`` as live
    teacher by :func:`~minicompress.distillation.distill.distill` (the call ``recover`` makes;
    the same rows, held-out split, schedule and seed for every candidate; nothing is
    written), and timed with :func:`~minicompress.evaluation.perplexity.measure_speed`
    (128 prefill / 16 decode tokens).

    Args:
        config: the prune configuration (``search_recover`` settings).
        model: the original model (the teacher; not modified).
        tokenizer: its tokenizer.
        scores: its importance scores.
        table: the search table of :func:`~minicompress.pruning.plan.search_architecture`;
            distilled rows gain ``kl_before``, ``distill_kl``, ``distill_perplexity``,
            ``prefill_tokens_per_s`` and ``decode_tokens_per_s``. Rows that have them
            already (a resumed search) are not distilled again.
        on_candidate: called after each candidate is distilled (the prune saves the table).

    Returns:
        The chosen row (lowest ``distill_kl``; ties: the better zero-shot loss).

    Raises:
        MinicompressError: under torchrun, or from the distillation (e.g. too little data).
    """
    from ..evaluation.perplexity import measure_speed

    if distributed.world_size() > 1:
        raise MinicompressError("search_distill_candidates: the search distils candidates in one process, not under "
                                "torchrun; set it to 0 or drop torchrun")
    dtype = next(model.parameters()).dtype
    finalists = zero_shot_ranking(table)[: config.search_distill_candidates]
    state = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    recover_config = config.search_recover_config(teacher_dtype=_DTYPE_NAMES.get(dtype, "auto"))
    device = model_device(model)
    autocast = describe_precision(recover_config.autocast, device)["resolved"]
    compile_layers, _ = resolve_compile(recover_config.compile, device, tokens=recover_config.tokens,
                                        activation_checkpointing=recover_config.activation_checkpointing)
    data = schedule = batches = None  # read once, on the first candidate that is distilled
    try:
        for i, row in enumerate(finalists):
            if "distill_kl" in row:
                log.info("search: candidate %d/%d was distilled before the interruption", i + 1, len(finalists))
                continue
            log.info("search: distilling candidate %d/%d (h/q/kv/ffn/L %s/%s/%s/%s/%s, %s) on %s tokens", i + 1,
                     len(finalists), *(row[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                        "intermediate_size", "num_hidden_layers")),
                     row["layer_metric"], f"{config.search_distill_tokens:,}")
            if data is None:  # the same rows, held-out split and schedule for every candidate
                data = load_training_data(recover_config.data, tokenizer, recover_config.eval_tokens,
                                          seed=recover_config.seed)
                schedule = make_schedule(recover_config, 1, data.num_train)
            model.eval().requires_grad_(False)  # the frozen teacher
            if batches is None and {"refit", "refit_o", "flap"} & set(config.repairs):
                score_config = _score_config(config)
                batches = _repair_batches(config, tokenizer, score_config)[0]
            torch.manual_seed(recover_config.seed)
            student = _candidate(config, model, make_plan(scores, model.config, row), batches)
            student.requires_grad_(True).train()
            try:
                result = distill(student, model, data, recover_config, schedule,
                                 runtime=StepRuntime(device, autocast, compile_layers))
                before, after = result["before"], result["after"]
                del result
                speed = measure_speed(student.eval(), model.config.vocab_size, prefill_tokens=128, decode_tokens=16,
                                      repeats=1)
            finally:
                del student
                _release_candidate()
            row.update(kl_before=before.get("kl_to_teacher"), distill_kl=after["kl_to_teacher"],
                       distill_perplexity=after.get("perplexity"),
                       prefill_tokens_per_s=speed["prefill_tokens_per_s"],
                       decode_tokens_per_s=speed["decode_tokens_per_s"])
            if on_candidate is not None:
                on_candidate()
    finally:
        for param, flag in state:
            param.requires_grad_(flag)
        model.train(training)

    def key(rank_row):
        rank, row = rank_row
        kl = row["distill_kl"]
        return (kl if math.isfinite(kl) else math.inf, rank)

    return min(enumerate(finalists), key=key)[1]


def _release_candidate() -> None:
    """Free what one distilled candidate leaves behind, so that the search's memory does not
    grow with every candidate (measured on SmolLM2-135M: about +1,000 MiB RSS per candidate before).

    The student, its optimizer and gradients go with the last reference (collected here
    with any reference cycle); what outlives them is process-wide: the fused loss's
    ``[chunk, vocab]`` workspace (:func:`~minicompress.distillation.losses.release_workspace`, about
    four float32 ``[1,024, 49,152]`` buffers of 192 MiB each for SmolLM2's vocabulary), ``torch.compile``'s graphs and guards of the compiled
    layers (``search_recover.compile``; :func:`torch._dynamo.reset`), and the free pages
    glibc keeps in its heap (:func:`~minicompress.measure.release_free_heap`).
    """
    import gc
    import sys

    from ..distillation.losses import release_workspace
    from ..measure import release_free_heap

    release_workspace()
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    release_free_heap()


def _streamable(model: Any) -> bool:
    """Whether ``model`` (a ModelConfig) names a local safetensors folder a streaming prune can read."""
    from ..pruning.streaming import streaming_source

    try:
        streaming_source(model.source)
    except MinicompressError:
        return False
    return True


def _prune_sharded(config: PruneConfig, chosen: dict[str, Any], record_extra: dict[str, Any] | None) -> dict[str, Any]:
    """``prune`` under torchrun with explicit sizes: no rank ever holds the whole model.

    The scores come from :func:`score` with the model sharded by FSDP2 over the ranks (or
    from ``config.scores``); rank 0 then slices the checkpoint one tensor at a time
    (:func:`_prune_streaming`) while the others wait; every rank returns the report.
    """
    scores = ImportanceScores.load(config.scores) if config.scores is not None else score(
        _score_config(config))
    report, error = None, None
    if distributed.is_main():
        try:
            report = _prune_streaming(config, chosen, scores=scores, record_extra=record_extra)
        except MinicompressError as err:
            error = str(err)
    report, error = distributed.broadcast_object((report, error))
    if error is not None:
        raise MinicompressError(error)
    return report


def _prune_streaming(config: PruneConfig, chosen: dict[str, Any], *, scores: ImportanceScores | None = None,
                     record_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``prune --streaming``: plan from the scores (``scores``, else ``config.scores``) and
    config.json, slice tensor by tensor."""
    from transformers import AutoConfig

    from ..pruning.streaming import streaming_source

    if config.target.target_params is not None:
        raise MinicompressError("--streaming: --target-params needs the loaded model (its search ranks pruned "
                                "candidates by loss); give explicit sizes such as --hidden-size, or --drop-layers")
    if config.scores is None and scores is None:
        raise MinicompressError("--streaming: needs --scores (write them first with minicompress score, "
                                "possibly distributed); a streaming prune never loads the model to score it")
    folder = streaming_source(config.model.source)
    check_output(config.output, config.overwrite)
    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=config.model.trust_remote_code)
    if scores is None:
        scores = ImportanceScores.load(config.scores)
    plan = make_plan(scores, hf_config, {**chosen, "norm_correction": config.target.norm_correction})
    original_params = count_parameters(hf_config)["total"]
    pruned_params = count_parameters(plan.new_config(hf_config))["total"]
    report = {
        "source": config.model.source,
        "target": dict(chosen),
        "original": describe(hf_config),
        "pruned": describe(plan.new_config(hf_config)),
        "parameters": {"original": original_params, "pruned": pruned_params, "ratio": pruned_params / original_params},
        "plan": plan.to_dict(),
        "scores_digest": scores.digest(),
        "search": None,
        "streaming": True,
    }
    record = provenance("prune", config, source_model=config.model.source,
                        source_provenance=_source_provenance(str(folder)), **report, **(record_extra or {}))
    report["checkpoint"] = write_pruned_checkpoint(folder, plan, config.output, overwrite=config.overwrite,
                                                   record=record)
    report["output"] = str(config.output)
    return report


def write_pruned_checkpoint(source_folder: str | Path, plan, output_folder: str | Path, *, overwrite: bool = False,
                            max_shard_bytes: int | None = None, max_chunk_bytes: int | None = None,
                            record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prune a safetensors checkpoint into a stock HF folder, one tensor at a time.

    The folder holds what loading the model, :func:`~minicompress.pruning.plan.apply_plan_`
    and ``save_pretrained`` would write (:func:`~minicompress.pruning.streaming.layout_checkpoint`),
    with peak memory of about one source tensor plus its pruned copy: each shard's header
    is written first and every pruned block appended as it is sliced. Written to a
    temporary sibling, then renamed.

    Args:
        source_folder: HF folder with ``config.json`` and safetensors weights.
        plan: from :func:`~minicompress.pruning.plan.make_plan` on this checkpoint's config.
        output_folder: folder to create.
        overwrite: replace an existing ``output_folder``.
        max_shard_bytes: largest output shard (default 512 MiB); more than one shard adds
            ``model.safetensors.index.json``.
        max_chunk_bytes: largest row block read at once from a vocabulary-sized tensor
            (default 16 MiB).
        record: provenance written as ``minicompress.json`` (default: a minimal record
            with the source and the plan); ``streaming: true`` is added.

    Returns:
        ``{"output", "shards", "tensors", "skipped", "total_size", "largest_tensor_bytes"}``.

    Raises:
        MinicompressError: no safetensors, a plan for another shape, an existing output
            without ``overwrite``, or a tensor the slicing rules do not cover.
    """
    from ..pruning import streaming

    source = Path(source_folder).expanduser()
    check_output(output_folder, overwrite)
    sizes = {k: v for k, v in (("max_shard_bytes", max_shard_bytes), ("max_chunk_bytes", max_chunk_bytes))
             if v is not None}
    layout = streaming.layout_checkpoint(source, plan, **sizes)
    with atomic_folder(output_folder, overwrite) as tmp:
        layout.new_config.save_pretrained(tmp)
        for name, shard in zip(layout.names, layout.shards):
            write_safetensors_streamed(tmp / name, [(e.name, e.dtype, e.shape) for e in shard],
                                       streaming.pruned_blocks(shard, plan))
        if (index := layout.index()) is not None:
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        kept = streaming.side_files(source)
        for path in kept:
            shutil.copy2(path, tmp / path.name)
        if not (tmp / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(layout.new_config).save_pretrained(tmp)
        out = dict(record) if record is not None else provenance("prune", {}, source_model=str(source),
                                                                  plan=plan.to_dict())
        out["streaming"] = True
        write_provenance(tmp, out)
        write_model_card(tmp, out)
    entries = [e for shard in layout.shards for e in shard]
    return {"output": str(output_folder), "shards": layout.names, "tensors": len(entries), "skipped": layout.skipped,
            "total_size": layout.total_size, "largest_tensor_bytes": max((e.source_nbytes for e in entries), default=0)}


def describe_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """:func:`~minicompress.arch.describe` of a config given as a dict."""
    from transformers import AutoConfig

    data = dict(config_dict)
    model_type = data.pop("model_type")
    return describe(AutoConfig.for_model(model_type, **data))


def _source_provenance(source: str) -> dict[str, Any] | None:
    from pathlib import Path

    path = Path(source)
    return read_provenance(path) if path.is_dir() else None

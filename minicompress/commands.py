"""What ``minicompress score`` and ``minicompress prune`` do, as Python functions.

This module sits on top (next to the CLI): it loads models and data and hands tensors to
:mod:`minicompress.scoring` and :mod:`minicompress.prune`, which never load anything
themselves. Every output folder is written atomically with its provenance record.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from .arch import count_parameters, describe
from .config import PruneConfig, ScoreConfig
from .data import iterate_batches, load_sequences, sample_calibration
from .errors import MinicompressError
from .models import load_model
from .outputs import atomic_folder, check_output, provenance, read_provenance, write_provenance
from .progress import progress_bar
from .prune import apply_plan_, make_plan, search_architecture
from .scoring import ImportanceScores, score_model

log = logging.getLogger(__name__)


def calibration_batches(config: ScoreConfig, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration batches for scoring and the (smaller) batches for the layer-loss score.

    Returns:
        ``(batches, loss_batches)``: lists of ``[B, L]`` tensors.
    """
    data = config.data
    if data.max_tokens is None:  # read only what the samples need (with slack for shuffling)
        data = dataclasses.replace(data, max_tokens=max(config.num_samples * data.seq_len * 4, 1 << 20))
    sequences = sample_calibration(load_sequences(data, tokenizer), config.num_samples, data.seed)
    if sequences.shape[0] < config.num_samples:
        log.warning("calibration: only %d sequences of %d tokens available (asked for %d)",
                    sequences.shape[0], data.seq_len, config.num_samples)
    batches = list(iterate_batches(sequences, config.batch_size))
    loss_batches = list(iterate_batches(sequences[: config.loss_samples], config.batch_size)) \
        if config.layer_scores and config.loss_samples else []
    return batches, loss_batches


def score(config: ScoreConfig, *, model=None, tokenizer=None) -> ImportanceScores:
    """Score a model on calibration data; write the scores if ``config.output`` is set.

    Args:
        config: the score configuration.
        model: an already loaded model (else ``config.model`` is loaded).
        tokenizer: its tokenizer.

    Returns:
        :class:`~minicompress.scoring.ImportanceScores`.
    """
    if config.output is not None:
        check_output(config.output, config.overwrite)
    if config.data.source is None:
        raise MinicompressError("--data: scoring needs calibration text (never the evaluation split)")
    if model is None:
        model, tokenizer = load_model(config.model)
    batches, loss_batches = calibration_batches(config, tokenizer)
    n = sum(b.shape[0] for b in batches)
    start = time.perf_counter()
    with progress_bar("score", n, unit="samples") as bar:
        scores = score_model(model, batches, sequence_aggregation=config.sequence_aggregation,
                             batch_aggregation=config.batch_aggregation, loss_batches=loss_batches,
                             autocast=config.autocast, progress=bar,
                             meta={"source": config.model.source, "data": config.data.source})
    scores.meta["seconds"] = round(time.perf_counter() - start, 2)
    if config.output is not None:
        with atomic_folder(config.output, config.overwrite) as tmp:
            scores.save(tmp)
            write_provenance(tmp, provenance("score", config, scores_digest=scores.digest()))
    return scores


def _explicit_sizes(target) -> dict[str, Any]:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    return {k: getattr(target, k) for k in keys if getattr(target, k) is not None}


def prune(config: PruneConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Score (or reuse scores), choose the architecture, rewrite the model and save it.

    Args:
        config: the prune configuration.
        model: an already loaded model (else ``config.model`` is loaded). It is pruned in place.
        tokenizer: its tokenizer.

    Returns:
        A report: original and pruned architecture, parameter counts, the plan, and the
        architecture search table when ``target.target_params`` was used.

    Raises:
        MinicompressError: no target, conflicting targets, or an impossible target.
    """
    target = config.target
    explicit = _explicit_sizes(target)
    if target.target_params is not None and (explicit or target.drop_layers):
        raise MinicompressError("target.target_params: give either target_params or explicit sizes / drop_layers, not both")
    if target.target_params is None and not explicit and not target.drop_layers:
        raise MinicompressError("target: nothing to prune; set --target-params, explicit sizes or --drop-layers")
    if config.output is not None:
        check_output(config.output, config.overwrite)
    if model is None:
        model, tokenizer = load_model(config.model)
    original_config = model.config.to_dict()
    original_params = count_parameters(model.config)

    score_config = dataclasses.replace(config.score, model=config.model, data=config.data, output=None)
    if config.scores is not None:
        scores = ImportanceScores.load(config.scores)
    else:
        scores = score(score_config, model=model, tokenizer=tokenizer)

    search_table = None
    if target.target_params is not None:
        batches, _ = calibration_batches(dataclasses.replace(score_config, num_samples=config.search_batches * 2,
                                                              batch_size=2, layer_scores=False), tokenizer)
        with progress_bar("search", None, unit="cand") as bar:
            chosen, search_table = search_architecture(model, scores, target.target_params, batches,
                                                       layer_metric=target.layer_metric, progress=bar)
    else:
        chosen = {**explicit, "drop_layers": list(target.drop_layers), "layer_metric": target.layer_metric}
    plan = make_plan(scores, model.config, chosen)
    apply_plan_(model, plan)
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
    }
    if config.output is not None:
        with atomic_folder(config.output, config.overwrite) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            record = provenance("prune", config, source_model=config.model.source,
                                source_provenance=_source_provenance(config.model.source), **report)
            write_provenance(tmp, record)
        report["output"] = str(config.output)
    return report


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

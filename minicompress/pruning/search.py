"""Architecture search for a parameter budget (Minitron, arXiv 2407.14679, sec. 4; arXiv 2408.11796).

Candidate shapes are uniform depth x width combinations whose closed-form size is near the
budget; each is pruned on the fly and ranked by zero-shot LM loss on a few calibration
batches (given, never loaded here). Minitron found that ranking misleading and distilled
the best few briefly before choosing: that step belongs to the ``prune`` recipe
(:mod:`minicompress.recipes.prune`), since the search never imports distillation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..arch import count_parameters, get_adapter, head_dim, num_kv_heads
from ..errors import MinicompressError
from .plan import (SHAPE_KEYS, _check_layers, _check_sizes, check_target_params, layers_to_drop, make_plan,
    pruned_copy, target_parameter_count)
from .scoring import ImportanceScores


def _round_down(value: float, step: int) -> int:
    return int(value // step) * step


def _width_step(width: int, multiple: int, plain: int) -> int:
    """Grid step of one width: ``multiple``, or the plain grid's ``plain`` when the
    multiple is 1 or the width is under 4x the multiple (tiny models)."""
    return multiple if multiple > 1 and width >= 4 * multiple else plain


def candidate_targets(config: Any, target_params: float, tolerance: float = 0.03,
                      max_layer_fraction: float = 0.5, width_multiple: int = 64) -> list[dict[str, Any]]:
    """Uniform shapes whose closed-form size is within ``tolerance`` of the budget.

    For every depth (down to ``max_layer_fraction`` of the layers, full depth included:
    width-only shapes), GQA-consistent head count and embedding width on a grid, the FFN
    width is solved for the budget and rounded to the grid. Hidden and FFN widths are
    multiples of ``width_multiple`` (or the original width), which fast matmul kernels
    want: on a 2-core CPU llama.cpp prefilled a model pruned to 0.589 with hidden 450 at
    0.93x the original's speed, and one pruned to 0.507 with aligned widths 2.37x faster.
    Families whose config needs ``hidden_size`` divisible by the query heads (llama,
    gemma3) only get such shapes.

    Args:
        config: the original config.
        target_params: count (> 1) or ratio of the original size (<= 1).
        tolerance: allowed relative distance from the budget.
        max_layer_fraction: smallest depth tried, as a fraction of the original.
        width_multiple: hidden and FFN sizes are multiples of this. 1, and widths under
            4x the multiple (tiny models), use the plain grid: hidden steps of 32 from 512
            up (else ``hidden / 8``), FFN steps of 64 from 512 up (else 8).

    Returns:
        Target dicts (keys of :class:`~minicompress.config.TargetConfig`) with their
        ``params``, sorted from largest to smallest.

    Raises:
        MinicompressError: the budget is larger than the model or no shape fits it.
    """
    total = count_parameters(config)["total"]
    budget = target_params * total if target_params <= 1 else target_params
    if budget > total:
        raise MinicompressError(f"target.target_params: {int(budget):,} is more than the model's {total:,}")
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, num_kv_heads(config)
    adapter = get_adapter(config)
    h_step = _width_step(hidden, width_multiple, 32 if hidden >= 512 else max(8, _round_down(hidden / 8, 8) or 8))
    f_step = _width_step(ffn, width_multiple, 64 if ffn >= 512 else 8)
    hiddens = sorted({h for h in range(h_step, hidden + 1, h_step) if h >= int(hidden * 0.4)} | {hidden}, reverse=True)
    depth_step = max(1, round(layers / 10))
    depths = sorted({d for d in range(layers, max(1, math.ceil(layers * max_layer_fraction)) - 1, -depth_step)},
                    reverse=True)
    group = heads // kv
    head_options = sorted({(kv * g, kv) for g in range(1, group + 1)} | {(max(1, kv // 2) * group, max(1, kv // 2))},
                          reverse=True)
    out = []
    for d in depths:
        for (q, k) in head_options:
            for h in hiddens:
                if adapter.hidden_divisible_by_heads and h % q:
                    continue
                probe = {"hidden_size": h, "num_attention_heads": q, "num_key_value_heads": k,
                         "num_hidden_layers": d, "intermediate_size": 1}
                base = target_parameter_count(config, probe)
                per_neuron = target_parameter_count(config, {**probe, "intermediate_size": 2}) - base
                below = _round_down(1 + (budget - base) / per_neuron, f_step)
                options = {f for f in (below, below + f_step) if max(f_step, ffn // 8) <= f <= ffn}
                if below <= ffn < below + f_step:  # the original width, when it is not on the grid
                    options.add(ffn)
                if not options:
                    continue
                sizes = {f: target_parameter_count(config, {**probe, "intermediate_size": f}) for f in sorted(options)}
                f = min(sizes, key=lambda v: abs(sizes[v] - budget))
                if abs(sizes[f] - budget) <= tolerance * budget:
                    out.append({**probe, "intermediate_size": f, "params": sizes[f]})
    if not out:
        aligned = f" with widths multiples of {width_multiple} (lower target.width_multiple)" \
            if max(h_step, f_step) == width_multiple > 1 else ""
        raise MinicompressError(f"target.target_params: no uniform shape within {tolerance:.0%} of "
                                f"{int(budget):,}{aligned}")
    return sorted(out, key=lambda t: -t["params"])


def layer_metrics(scores: ImportanceScores, default: str = "bi") -> tuple[str, ...]:
    """The layer metrics the search tries on shallower candidates: ``default`` first, then
    ``bi`` and, when the scores have ``layer_loss``, ``loss``."""
    extra = [m for m in ("bi", "loss") if m != default and (m != "loss" or scores.layer_loss is not None)]
    return (default, *extra)


def search_candidates(scores: ImportanceScores, config: Any, target_params: float, *, layer_metric: str = "bi",
                      tolerance: float = 0.03, width_multiple: int = 64) -> list[dict[str, Any]]:
    """Every target the search ranks. Pure: reads scores and config.

    Each shape of :func:`candidate_targets` shallower than the original appears once per
    metric of :func:`layer_metrics` (Minitron found neither depth metric always best),
    unless the metrics drop the same layers; full-depth shapes appear once.

    Returns:
        Target dicts: the :data:`SHAPE_KEYS`, ``params``, ``layer_metric`` and
        ``dropped_layers`` (original indices), largest first.
    """
    n = config.num_hidden_layers
    out = []
    for cand in candidate_targets(config, target_params, tolerance, width_multiple=width_multiple):
        depth = cand["num_hidden_layers"]
        seen = set()
        for metric in layer_metrics(scores, layer_metric) if depth < n else (layer_metric,):
            dropped = tuple(layers_to_drop(scores, n, (), depth, metric))
            if dropped not in seen:
                seen.add(dropped)
                out.append({**cand, "layer_metric": metric, "dropped_layers": list(dropped)})
    return out


@dataclass(frozen=True)
class SearchSpace:
    """Which shapes :func:`search_architecture` considers (what :func:`search_candidates` takes).

    Attributes:
        layer_metric: how layers are chosen when a candidate is shallower: tried first;
            ``bi`` and (with ``scores.layer_loss``) ``loss`` are tried too.
        tolerance: allowed relative distance from the parameter budget.
        width_multiple: hidden and FFN sizes are multiples of this (see :func:`candidate_targets`).
    """

    layer_metric: str = "bi"
    tolerance: float = 0.03
    width_multiple: int = 64


def row_target(row: dict[str, Any]) -> dict[str, Any]:
    """The target (shape keys and ``layer_metric``) of a search-table row."""
    return {**{k: row[k] for k in SHAPE_KEYS}, "layer_metric": row["layer_metric"]}


def zero_shot_ranking(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finalists of a search table (rows with ``loss``), best zero-shot loss first."""
    return sorted((r for r in table if "loss" in r), key=lambda r: r["loss"])


@torch.no_grad()
def search_architecture(model: nn.Module, scores: ImportanceScores, target_params: float,
                        batches: list[torch.Tensor], *, space: SearchSpace = SearchSpace(),
                        screen_tokens: int = 512, finalists: int = 6,
                        evaluate: Callable[[nn.Module, list[torch.Tensor]], float] | None = None,
                        progress=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the uniform shape near a parameter budget with the lowest zero-shot LM loss.

    Every candidate of :func:`search_candidates` is pruned (from a copy) and screened on
    the first ``screen_tokens`` tokens of the calibration batches; the best
    ``finalists`` are then ranked on all ``batches``. Minitron (sec. 4) found this
    zero-shot ranking misleading and distils the best few briefly before choosing:
    :func:`minicompress.recipes.prune.prune` does that with :func:`zero_shot_ranking`.

    Args:
        model: the original model (not modified).
        scores: its importance scores.
        target_params: count (> 1) or ratio (<= 1) of the original parameters.
        batches: calibration ``[B, T]`` token batches (not the evaluation split).
        space: layer metric tried first, budget tolerance and width multiple of the
            candidates (:class:`SearchSpace`).
        screen_tokens: tokens used in the screening round.
        finalists: candidates re-ranked on all batches.
        evaluate: ``f(model, batches) -> mean loss`` (default: chunked LM loss).
        progress: optional progress bar with ``advance``/``update``.

    Returns:
        ``(best_target, table)``: the chosen target dict (:func:`row_target`) and every
        candidate, sorted by ``screen_loss``, with its ``params``, ``layer_metric``,
        ``dropped_layers``, ``screen_loss`` and (finalists) ``loss``.
    """
    evaluate = evaluate or _mean_lm_loss
    candidates = search_candidates(scores, model.config, target_params, layer_metric=space.layer_metric,
                                   tolerance=space.tolerance, width_multiple=space.width_multiple)
    first = batches[0]
    rows_per = max(1, screen_tokens // first.shape[1])
    screen = [first[:rows_per]]
    if progress is not None:
        progress.update(total=len(candidates) + min(finalists, len(candidates)))
    table = []
    for cand in candidates:
        small = pruned_copy(model, make_plan(scores, model.config, cand))
        table.append({**cand, "screen_loss": evaluate(small, screen)})
        del small
        if progress is not None:
            progress.advance(1)
    table.sort(key=lambda r: r["screen_loss"])
    for row in table[:finalists]:
        small = pruned_copy(model, make_plan(scores, model.config, row))
        row["loss"] = evaluate(small, batches)
        del small
        if progress is not None:
            progress.advance(1)
    return row_target(zero_shot_ranking(table)[0]), table


def _mean_lm_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    from .scoring import lm_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in batches:
        s, c = lm_loss(model, ids.to(device))
        total, count = total + s, count + c
    return total / count


def validate_target(config: Any, target: Any) -> dict[str, Any]:
    """Check a pruning target against a model config, without weights or scores.

    Pure and cheap: ``minicompress prune`` runs it right after reading the model's
    ``config.json`` (before any data is read or scored), and ``minicompress run
    --dry-run`` runs it for every stage. :func:`make_plan` applies the same checks.

    Args:
        config: the transformers config of the model to prune.
        target: a :class:`~minicompress.config.TargetConfig` or a dict of its keys.

    Returns:
        For explicit sizes / ``drop_layers``: the resolved ``hidden_size``,
        ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
        ``num_hidden_layers``, ``head_dim`` and the closed-form ``params`` of the result.
        For ``target_params``: ``{"target_params": budget count, "candidates": n,
        "min_params", "max_params"}`` of the uniform shapes the search will rank (the
        winner needs the weights).

    Raises:
        MinicompressError: one line naming the ``target.*`` key: conflicting or empty
            targets, sizes larger than the model, query heads that do not fill KV groups,
            a hidden size the family's config rejects, impossible depths, or a
            parameter budget that is not a ratio in (0, 1] / a count below the model's.
    """
    get = (lambda k, d=None: target.get(k, d)) if isinstance(target, dict) else (lambda k, d=None: getattr(target, k, d))
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    explicit = {k: get(k) for k in keys if get(k) is not None}
    drop = tuple(get("drop_layers", ()) or ())
    target_params = get("target_params")
    if target_params is not None and (explicit or drop):
        raise MinicompressError("target.target_params: give either target_params or explicit sizes / drop_layers, "
                                "not both")
    if target_params is None and not explicit and not drop:
        raise MinicompressError("target: nothing to prune; set --target-params, explicit sizes or --drop-layers")
    if target_params is not None:
        budget = check_target_params(config, target_params)
        candidates = candidate_targets(config, budget, width_multiple=get("width_multiple", 64) or 64)
        return {"target_params": budget, "candidates": len(candidates),
                "min_params": candidates[-1]["params"], "max_params": candidates[0]["params"]}
    sizes = _check_sizes(config, explicit)
    sizes["num_hidden_layers"] = _check_layers(config.num_hidden_layers, drop, explicit.get("num_hidden_layers"),
                                               get("layer_metric", "bi") or "bi")
    sizes["head_dim"] = head_dim(config)
    sizes["params"] = target_parameter_count(config, sizes)
    return sizes

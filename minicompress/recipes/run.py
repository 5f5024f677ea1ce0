"""Progressive compression from one config: ``minicompress run``.

Minitron (Muralidharan et al., arXiv 2407.14679; Sreenivas et al., arXiv 2408.11796)
compresses in stages: each stage prunes the previous stage's model (scored anew on
calibration text) and recovers it by distillation, and the paper found distilling every
stage from the *original* model better than from the previous stage, so that is the
default teacher. A :class:`~minicompress.config.RunConfig` lists the stages; this module
runs them with :func:`minicompress.recipes.prune.prune` and :func:`minicompress.recipes.recover.recover`
and compares every result with the original at the end.

The run folder::

    OUTPUT/
      minicompress.yaml, minicompress.json   the resolved run config (and its dry-run plan)
      corrected/                             with a correct: section, the original fine-tuned on the
                                             text first (teacher correction; stage 1 prunes it and it
                                             teaches every stage the original would)
      stage-1-<name>.pruned/                 pruned, not yet recovered (removed after recovery
                                             unless keep_pruned)
      stage-1-<name>.partial/                recovery checkpoints while it runs
      stage-1-<name>/                        the stage's stock HF folder, metrics, minicompress.json,
                                             README.md (model card)
      timings.json                           wall time of every stage
      report.json, report.md, report.png     original and every stage side by side

A stage is finished when its final folder exists (written atomically, with
``minicompress.json``). Running the same config again skips finished stages, reuses a
finished prune and resumes an interrupted recovery from ``<stage>.partial``; the
``run_stage.digest`` in each folder (the settings that shaped its weights) must match, so
an edited config never silently mixes with old stages (``overwrite`` starts over).

:func:`dry_run` reads only ``config.json`` files (never weights): it checks every
stage's target (:func:`minicompress.pruning.plan.validate_target`), and gives each stage's shape,
parameter count, token budget and the memory a single-process run needs
(:func:`estimate_memory`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..arch import count_parameters, describe, get_adapter, head_dim, num_kv_heads
from ..config import ModelConfig, RecoverConfig, RunConfig, TargetConfig, build_config, to_dict
from ..data.sources import check_local_source
from ..errors import ConfigError, MinicompressError
from ..outputs import provenance, read_provenance, settings_digest, write_json_atomic, write_provenance

log = logging.getLogger(__name__)

TIMINGS = "timings.json"
#: the folder of a run's corrected teacher (``correct:``)
CORRECTED = "corrected"
#: the folder of a data-free run's generated text and sparse targets (``generate:``)
GENERATED = "generated"
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
#: Columns of the end-of-run report, in order.
REPORT_COLUMNS = ("model", "parameters", "ratio", "size_on_disk_bytes", "perplexity", "kl_to_original",
                  "top1_agreement", "decode_tokens_per_s", "wall_time_s", "tokens")
#: Human column headers of ``report.md``.
REPORT_LABELS = {"model": "model", "parameters": "parameters", "ratio": "ratio", "size_on_disk_bytes": "size on disk",
                 "perplexity": "held-out perplexity", "kl_to_original": "KL to original",
                 "top1_agreement": "top-1 agreement", "decode_tokens_per_s": "decode tok/s",
                 "wall_time_s": "wall time (s)", "tokens": "training tokens"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers")


def load_run_config(config: RunConfig | str | Path, overrides: dict | list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` as given, or built from a YAML file plus ``key.sub=value`` overrides."""
    if isinstance(config, RunConfig):
        if overrides:
            raise ConfigError("overrides: pass them with a YAML file, or build the RunConfig with them")
        return config
    return build_config(RunConfig, config, overrides)


def stage_folder(output: str | Path, index: int, name: str) -> Path:
    """``OUTPUT/stage-<index + 1>-<name>``: the final folder of a stage."""
    return Path(output).expanduser() / f"stage-{index + 1}-{name}"


# ----------------------------------------------------------------------------------------
# Dry run: configs only


def estimate_memory(student: Any, teacher: Any | None, recover: RecoverConfig | None, *, dtype: str = "float32",
                    device: str = "cpu", prune_input: Any | None = None, ranks: int = 1) -> dict[str, int]:
    """Rough peak memory of one stage in one process (or per rank of ``ranks``), from configs only.

    With ``P_s``/``P_t`` the closed-form sizes of student and teacher, ``w`` the bytes of
    a weight in ``dtype`` and ``w_t`` in ``recover.teacher_dtype`` (``auto``: 2 bytes
    when bf16 autocast is expected, i.e. ``autocast: bfloat16``, or ``auto`` on a
    ``cuda``/``auto`` device; else 4); ``B`` micro batch,
    ``T`` sequence length, and the student's ``n`` layers, ``h`` hidden, ``q``/``k``
    query/KV heads of width ``d``, ``f`` FFN and ``V`` vocabulary:

    * ``weights = w P_s``, ``grads = w P_s``, ``adamw = 2 w P_s`` (both moments in the
      weights' dtype: 16 bytes per parameter in float32);
    * ``teacher = w_t P_t``;
    * ``activations = a B T (n (7h + 3qd + 3kd + 4f) + h + h_t) + 12 c V``: tensors
      saved for backward without activation checkpointing (norm inputs and outputs, q/k/v
      before and after RoPE, the attention output, the gated MLP), ``a`` = 2 bytes with
      bf16 autocast and 4 otherwise; attention scores are not stored (SDPA's
      flash / memory-efficient kernels); then the final hidden states of student and
      teacher, and the three float32 ``[c, V]`` buffers of the fused loss (``c`` = its
      chunk size);
    * pruning: ``prune = w (P_in + P_s)``, the input model and its pruned copy.

    The result is ``max(prune, weights + grads + adamw + teacher + activations)``; the
    allocator, CUDA context and data add to it.

    With ``ranks = N > 1`` (torchrun + FSDP2, docs/progressive.md, "Large models") it is the
    memory of one rank: the student's weights, gradients and AdamW state and the
    teacher's weights are sharded (``/ N``); each rank also holds the layers being
    gathered (``gathered = 2 w_l (2 L_t + 2 L_s) + 2 L_s``: this layer and the prefetched
    next one of each model in bf16/``w_l`` bytes, plus the student's unsharded layer
    gradient; ``L`` = parameters per layer), the root groups kept gathered (``root = w_l
    (E_t + 2 E_s)``, ``E = V h``, twice when untied) and its own activations; with
    ``activation_checkpointing`` only each layer's input ``a B T h n`` is saved plus one
    layer's activations. Pruning is not sharded (``prune`` stays whole).

    Args:
        student: config of the stage's output.
        teacher: config of its teacher (None: prune only).
        recover: the stage's recovery settings (None: prune only).
        dtype: the weights' dtype (``model.dtype`` of the run).
        device: the run's ``model.device`` (decides what ``autocast: auto`` means).
        prune_input: config of the model the stage prunes.

    Returns:
        Bytes of every term and ``total``.
    """
    w = _DTYPE_BYTES[dtype]
    p_s = count_parameters(student)["total"]
    out = {"prune": w * (p_s + (count_parameters(prune_input)["total"] if prune_input is not None else p_s))}
    if recover is not None and teacher is not None:
        from ..distillation.losses import auto_chunk_size

        b, t = recover.micro_batch_size, recover.data.seq_len
        h, f, n = student.hidden_size, student.intermediate_size, student.num_hidden_layers
        q, k, d = student.num_attention_heads, num_kv_heads(student), head_dim(student)
        vocab = student.vocab_size
        chunk = recover.loss.chunk_size or auto_chunk_size(vocab)
        if recover.autocast == "auto" and device == "cpu":
            from ..hardware import cpu_has_native_bf16

            bf16 = cpu_has_native_bf16()
        else:
            bf16 = recover.autocast == "bfloat16" or (recover.autocast == "auto" and device in ("cuda", "auto"))
        w_t = (2 if bf16 else 4) if recover.teacher_dtype == "auto" else _DTYPE_BYTES[recover.teacher_dtype]
        a = 2 if bf16 else 4
        per_layer = 7 * h + 3 * q * d + 3 * k * d + 4 * f
        saved_layers = n
        if ranks > 1 and recover.activation_checkpointing:
            saved_layers = 1
        p_t = count_parameters(teacher)["total"]
        out.update({
            "weights": w * p_s // ranks, "grads": w * p_s // ranks, "adamw": 2 * w * p_s // ranks,
            "teacher": w_t * p_t // ranks,
            "activations": a * b * t * (saved_layers * per_layer + h + teacher.hidden_size) + 12 * chunk * vocab
            + (a * b * t * h * n if saved_layers != n else 0),
        })
        if ranks > 1:
            w_l = 2 if bf16 else 4

            def embedding(cfg: Any) -> int:
                return cfg.vocab_size * cfg.hidden_size * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)

            e_s, e_t = embedding(student), embedding(teacher)
            layer_s = (p_s - e_s) // max(n, 1)
            layer_t = (p_t - e_t) // max(teacher.num_hidden_layers, 1)
            out["gathered"] = w_l * (2 * layer_t + 2 * layer_s) + w_l * layer_s
            out["root"] = w_l * (e_t + 2 * e_s)
    train = sum(v for key, v in out.items() if key != "prune")
    # per rank: recovery only (a checkpoint larger than memory is pruned with prune --streaming)
    out["total"] = train if ranks > 1 and train else max(out["prune"], train)
    return out


def _stage_target(target: TargetConfig, original_total: int) -> TargetConfig:
    """A run's ``target_params`` ratio is a fraction of the original: make it a count."""
    if target.target_params is not None and target.target_params <= 1:
        return dataclasses.replace(target, target_params=float(round(target.target_params * original_total)))
    return target


def _resized(config: Any, sizes: dict[str, Any]) -> Any:
    """A copy of ``config`` with the sizes of a validated target (for counting and the next stage)."""
    new = copy.deepcopy(config)
    for key in _SHAPE_KEYS:
        setattr(new, key, sizes[key])
    new.head_dim = sizes["head_dim"]
    if getattr(new, "layer_types", None):
        new.layer_types = list(new.layer_types)[: sizes["num_hidden_layers"]]
    return new


def _check_data_sources(key: str, data) -> None:
    """Every local file or folder ``data`` names (its source or each mixture source) exists."""
    if data.mixture:
        for i, (source, _) in enumerate(data.sources()):
            check_local_source(f"{key}.mixture[{i}].source", source, ConfigError)
    elif data.source is not None:
        check_local_source(f"{key}.source", data.source, ConfigError)


def _original_config(config: RunConfig):
    """The original's config from its folder, ``config.json``, the local Hub cache, or (a
    Hub id not in the cache, a built-in not converted yet) the copy shipped in
    ``minicompress/model_configs/``. For checks and estimates only: weights are always
    loaded from the model itself."""
    from ..models import load_config, packaged_config

    source = config.model.source
    hf = load_config(source, trust_remote_code=config.model.trust_remote_code, convert=False)
    shipped = packaged_config(source) if hf is None else None
    if shipped is not None:
        from transformers import AutoConfig

        log.info("dry run: %s is not in the local Hub cache; checking against the config.json shipped with "
                 "minicompress (%s)", source, shipped.name)
        hf = AutoConfig.from_pretrained(str(shipped))
    if hf is None:
        raise MinicompressError(f"model.source: cannot read the config of {config.model.source} without loading "
                                "weights (a GGUF file, or a Hub id not in the local cache); use a model folder or its config.json")
    try:
        get_adapter(hf)
    except MinicompressError as err:
        raise MinicompressError(f"model.source: {err}") from None
    return hf


def dry_run(config: RunConfig, *, ranks: int = 1) -> dict[str, Any]:
    """Check a whole run from configs only and describe every stage; loads no weights.

    The original's ``config.json`` comes from its folder, a ``config.json`` file, the
    local Hub cache, or, for a built-in model not converted yet and for a Hub model that
    a shipped recipe names but the cache lacks, the copy shipped with minicompress
    (``minicompress/model_configs/``). Each stage's target is checked against the shape the previous stage
    produces; after a ``target_params`` stage that shape is only known once its search
    has ranked candidates on real weights, so later explicit targets are checked
    against the original and again at run time.

    Args:
        config: the run.
        ranks: estimate the memory of one rank of a torchrun + FSDP2 run on ``ranks``
            processes (1: a single process).

    Returns:
        ``{"model", "original": describe(original), "stages": [row, ...]}``; each row has
        ``stage``, ``name``, the five shape keys (None when searched at run time),
        ``params``, ``ratio`` (of the original), ``tokens``, ``teacher``, ``note``,
        ``memory_bytes`` and the ``memory`` terms of :func:`estimate_memory`.

    Raises:
        MinicompressError: the first problem, naming ``stages[i] (name)`` and the key.
    """
    _check_data_sources("data", config.data)
    _check_data_sources("eval_data", config.eval_data)
    original = _original_config(config)
    total = count_parameters(original)["total"]
    rows = []
    current, known = original, True
    previous_budget = total
    for i, stage in enumerate(config.stages):
        where = f"stages[{i}] ({stage.name})"
        target = _stage_target(config.stage_target(i), total)
        row: dict[str, Any] = {"stage": i + 1, "name": stage.name}
        try:
            info = validate_target_for_stage(current if known else original, target, known)
        except MinicompressError as err:
            raise MinicompressError(f"{where}: {err}") from None
        if "target_params" in info:
            budget = info["target_params"]
            if budget >= previous_budget:
                raise MinicompressError(f"{where}: target.target_params: {budget:,} parameters is not below the "
                                        f"previous stage's {previous_budget:,}")
            row.update({k: None for k in _SHAPE_KEYS})
            row.update(params=budget, note=f"searched at run time: {info['candidates']} uniform shapes of "
                                           f"{info['min_params']:,}-{info['max_params']:,} parameters")
            student = _resized(original, {**_largest_candidate(original, budget, target.width_multiple),
                                          "head_dim": head_dim(original)})
            known = False
            previous_budget = budget
        elif known:
            student = _resized(current, info)
            row.update({k: info[k] for k in _SHAPE_KEYS}, params=info["params"], note="")
            previous_budget = info["params"]
        else:
            student = _resized(original, info)
            row.update({k: info[k] for k in _SHAPE_KEYS}, params=None,
                       note="input shape comes from an earlier search: checked again at run time")
        row["ratio"] = row["params"] / total if row["params"] else None
        row["tokens"] = stage.tokens
        row["teacher"] = "original" if stage.teacher == "original" or i == 0 else "previous"
        if config.correct and row["teacher"] == "original":
            row["teacher"] = CORRECTED
        recover = None
        teacher_config = None
        if stage.tokens:
            recover = config.stage_recover_config(i, student=ModelConfig(source="student"), teacher=config.model,
                                                  output="stage")
            teacher_config = original if row["teacher"] == "original" else current
        memory = estimate_memory(student, teacher_config, recover, dtype=config.model.dtype,
                                 device=config.model.device, prune_input=current, ranks=ranks)
        row["memory_bytes"] = memory["total"]
        row["memory"] = memory
        rows.append(row)
        current = student
    plan = {"model": config.model.source, "original": describe(original), "stages": rows}
    if config.correct:
        plan["correct"] = _correction_plan(config, original)
    if config.generate:
        gen = config.generate_config(output=GENERATED)
        plan["generate"] = {"tokens": gen.tokens // gen.data.seq_len * gen.data.seq_len, "seq_len": gen.data.seq_len,
                            "prompts": gen.data.source, "output": GENERATED}
        _check_generated_rows(config, gen.tokens // gen.data.seq_len)
    return plan


def _correction_plan(config: RunConfig, original: Any) -> dict[str, Any]:
    """The dry run's line for the ``correct:`` section: tokens (whole steps), lr, folder and the
    memory of fine-tuning the original in one process (weights, gradients, AdamW, activations)."""
    cc = config.correct_config(output=CORRECTED)
    plan = {"tokens": cc.tokens // cc.global_batch_tokens * cc.global_batch_tokens, "lr": cc.lr,
            "output": CORRECTED, "memory_bytes": None}
    if cc.tokens:
        memory = estimate_memory(original, original, cc.recover_config(), dtype="float32", device=config.model.device)
        plan["memory_bytes"] = sum(memory[k] for k in ("weights", "grads", "adamw", "activations"))
    return plan


def _check_generated_rows(config: RunConfig, rows: int) -> None:
    """A data-free run holds out its evaluation rows from the ``rows`` it generates: each
    stage's recovery and each distilled search must have rows left to train on, checked
    here rather than after generating, scoring and pruning.

    Raises:
        MinicompressError: naming the stage and the ``eval_tokens`` key that holds out too much.
    """
    from ..distillation.loop import num_held_out

    seq_len = config.data.seq_len
    for i, stage in enumerate(config.stages):
        held_out = []  # (key, eval_tokens)
        if stage.target.target_params is not None:
            pc = config.stage_prune_config(i, model=config.model)
            if pc.search_distill_candidates:
                where = f"stages[{i}].search" if "eval_tokens" in (stage.search.get("recover") or {}) else "search"
                held_out.append((f"{where}.recover.eval_tokens", pc.search_recover_config().eval_tokens))
        if stage.tokens:
            rc = config.stage_recover_config(i, student=ModelConfig(source="student"), teacher=config.model,
                                             output="stage")
            where = f"stages[{i}].recover" if "eval_tokens" in stage.recover else "recover"
            held_out.append((f"{where}.eval_tokens", rc.eval_tokens))
        for key, eval_tokens in held_out:
            try:
                num_held_out(rows, eval_tokens, seq_len)
            except MinicompressError:
                raise MinicompressError(
                    f"stages[{i}] ({stage.name}): {key}: holding out {eval_tokens:,} tokens "
                    f"({math.ceil(eval_tokens / seq_len)} rows of data.seq_len {seq_len}) leaves none of the {rows} "
                    f"rows generate.tokens makes to train on; lower {key} or raise generate.tokens") from None


def validate_target_for_stage(config: Any, target: TargetConfig, shape_known: bool = True) -> dict[str, Any]:
    """:func:`~minicompress.pruning.plan.validate_target`; with an unknown input shape (after a
    search) only the widths and depth against ``config`` (the original) are checked."""
    from ..pruning.search import validate_target

    if shape_known or target.target_params is not None:
        return validate_target(config, target)
    return validate_target(config, dataclasses.replace(target, drop_layers=()))


def _largest_candidate(config: Any, budget: int, width_multiple: int = 64) -> dict[str, Any]:
    from ..pruning.search import candidate_targets

    best = candidate_targets(config, budget, width_multiple=width_multiple)[0]
    return {k: best[k] for k in _SHAPE_KEYS}


# ----------------------------------------------------------------------------------------
# Running the stages


def _stage_digest(config: RunConfig, index: int) -> str:
    """sha256 of everything that shapes the weights of stage ``index``: the model, data and
    scoring, and for it and every stage before it the name, target, tokens, teacher,
    resolved recovery settings and, for a ``target_params`` stage, the resolved search
    settings (batches, distilled candidates, their tokens and recovery, width multiple)."""
    stages = []
    for i, stage in enumerate(config.stages[: index + 1]):
        entry = {"name": stage.name, "target": to_dict(config.stage_target(i)), "tokens": stage.tokens,
                 "teacher": stage.teacher}
        if stage.target.target_params is not None:
            pc = config.stage_prune_config(i, model=config.model)
            search: dict[str, Any] = {"batches": pc.search_batches, "distill_candidates": pc.search_distill_candidates}
            if pc.search_distill_candidates:
                rc = to_dict(pc.search_recover_config())
                search["distill_tokens"] = pc.search_distill_tokens
                search["recover"] = {k: v for k, v in rc.items() if k not in ("student", "teacher", "data", "output",
                                                                              "resume", "overwrite", "tokens")}
            entry["search"] = search
        if stage.tokens:
            rc = to_dict(config.stage_recover_config(i, student=ModelConfig(source="student"), teacher=config.model,
                                                     output="stage"))
            entry["recover"] = {k: v for k, v in rc.items() if k not in ("student", "teacher", "output", "resume",
                                                                         "overwrite")}
        stages.append(entry)
    basis = {"model": to_dict(config.model), "data": to_dict(config.data), "score": to_dict(config.score),
             "search_batches": config.search_batches, "stages": stages}
    if config.generate:
        basis["generate"] = to_dict(config.generate)
    if config.correct:
        basis["correct"] = to_dict(config.correct)
    return settings_digest(basis)


def _prepare_folder(out: Path, config: RunConfig, plan: dict[str, Any]) -> None:
    if out.exists():
        record = read_provenance(out) if out.is_dir() else None
        if config.overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        elif out.is_dir() and (record or {}).get("command") == "run":
            log.info("run: continuing %s (finished stages are skipped)", out)
        elif not (out.is_dir() and not any(out.iterdir())):
            raise MinicompressError(f"--output: {out} exists and is not a minicompress run folder; "
                                    "pass --overwrite to replace it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    write_provenance(out, provenance("run", config, plan=plan))


def _generate_data(config: RunConfig, out: Path) -> RunConfig:
    """Data-free: the original writes its own text into ``OUTPUT/generated`` (once; an
    interrupted generation resumes), and the run calibrates and trains on it.

    Returns:
        ``config`` with ``data.source`` the generated ``text.jsonl``.

    Raises:
        MinicompressError: a finished ``generated`` folder of other settings.
    """
    from .. import distributed
    from ..distillation.teacher_cache import CACHE_INDEX_FILE
    from .generate import TEXT_FILE, generate, interrupted, same_generation

    folder = out / GENERATED
    gen_config = config.generate_config(output=str(folder))
    # resume an interrupted generation, and only that (a first run is no "--resume" with nothing to resume)
    gen_config = dataclasses.replace(gen_config, resume=interrupted(folder))
    if (folder / CACHE_INDEX_FILE).is_file():
        if not same_generation(folder, gen_config):
            raise MinicompressError(f"generate: {folder} was written with other settings; pass --overwrite to start "
                                    "the run over, or choose another output")
        log.info("data-free: reusing the generated text in %s", folder)
    else:
        if distributed.is_main():
            log.info("data-free: %s writes %s tokens of its own text into %s", config.model.source,
                     f"{gen_config.tokens:,}", folder)
            generate(gen_config)
        distributed.barrier()
    data = dataclasses.replace(config.data, source=str(folder / TEXT_FILE))
    return dataclasses.replace(config, data=data)


def _correct_teacher(config: RunConfig, out: Path) -> dict[str, Any]:
    """Teacher correction first: the original fine-tuned on the run's text into ``OUTPUT/corrected``
    (once; an interrupted correction resumes, a finished one is reused).

    Returns:
        ``{"folder", "status" (done/skipped), "tokens", "before", "after"}``; ``before`` /
        ``after``: the held-out metrics of the correction record.

    Raises:
        MinicompressError: a finished ``corrected`` folder of other settings.
    """
    from ..checkpoint import RESUME_FREE_KEYS, latest_checkpoint, working_folder
    from .correct import correct

    folder = out / CORRECTED
    # resume an interrupted correction, and only that (a first run is no "--resume" with nothing to resume)
    cc = config.correct_config(output=str(folder), resume=latest_checkpoint(working_folder(folder)) is not None)
    record = read_provenance(folder) if folder.is_dir() else None
    status = "skipped"
    if record is not None:
        now = json.loads(json.dumps(to_dict(cc)))
        if {k: v for k, v in record.get("config", {}).items() if k not in RESUME_FREE_KEYS} != \
                {k: v for k, v in now.items() if k not in RESUME_FREE_KEYS}:
            raise MinicompressError(f"correct: {folder} was written with other settings; pass --overwrite to start "
                                    "the run over, or choose another output")
        log.info("teacher correction: reusing %s", folder)
    else:
        log.info("teacher correction: fine-tuning %s on %s tokens of the text into %s", config.model.source,
                 f"{cc.tokens:,}", folder)
        correct(cc)
        record = read_provenance(folder)
        status = "done"
    correction = record["correction"]
    return {"folder": str(folder), "status": status, "tokens": correction["tokens_trained"],
            "before": correction["metrics_before"], "after": correction["metrics_after"]}


def _run_stage(config: RunConfig, index: int, previous: ModelConfig, final: Path, digest: str,
               original_total: int, original_shape: dict[str, Any], original: ModelConfig) -> None:
    """Prune ``previous`` into stage ``index`` and recover it from its teacher: ``original`` (the
    run's model, or its corrected copy) or the previous stage."""
    from .. import distributed
    from ..checkpoint import latest_checkpoint, working_folder
    from .prune import prune
    from .recover import recover

    stage = config.stages[index]
    extra = {"run_stage": {"index": index, "of": len(config.stages), "name": stage.name, "digest": digest,
                           "run": str(final.parent), "original_source": config.model.source,
                           "original": original_shape}}
    if original is not config.model:
        extra["run_stage"]["corrected_teacher"] = original.source
    pruned = final.with_name(final.name + ".pruned") if stage.tokens else final
    if stage.tokens and pruned.exists():
        record = read_provenance(pruned)
        if (record or {}).get("run_stage", {}).get("digest") == digest:
            log.info("stage %d (%s): reusing the finished prune %s", index + 1, stage.name, pruned)
        else:  # left over from other settings: redo it and its recovery
            shutil.rmtree(pruned)
            shutil.rmtree(working_folder(final), ignore_errors=True)
    if not pruned.exists():
        log.info("stage %d (%s): pruning %s", index + 1, stage.name, previous.source)
        prune_config = config.stage_prune_config(  # a search of other settings starts over
            index, model=previous, target=_stage_target(stage.target, original_total), output=str(pruned),
            resume=True, overwrite=True)
        prune(prune_config, record_extra=extra)
    if stage.tokens:
        teacher = original if stage.teacher == "original" or index == 0 else previous
        student = dataclasses.replace(config.model, source=str(pruned))
        # resume an interrupted recovery, and only that: a user's --resume with nothing to resume is
        # warned about; the run's own (every first run of a stage) must be silent
        recover_config = config.stage_recover_config(index, student=student, teacher=teacher, output=str(final),
                                                     resume=latest_checkpoint(working_folder(final)) is not None)
        loss = recover_config.loss
        if config.generate and teacher is config.model and loss.kind == "forward_kl" and not loss.intermediate_weight:
            # the original's own text: its sparse targets were kept as it wrote it (no teacher forward)
            recover_config = dataclasses.replace(recover_config, teacher=None,
                                                 teacher_cache=str(final.parent / GENERATED),
                                                 loss=dataclasses.replace(loss, kind="sampled_kl"))
        log.info("stage %d (%s): recovering on %s tokens from %s", index + 1, stage.name, f"{stage.tokens:,}",
                 teacher.source)
        recover(recover_config)
        distributed.barrier()
        if not config.keep_pruned and distributed.is_main():
            shutil.rmtree(pruned, ignore_errors=True)


def run(config: RunConfig | str | Path, overrides: dict | list[str] | None = None, *,
        on_stage_end: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every stage of a progressive compression, then compare all of them.

    Args:
        config: a :class:`~minicompress.config.RunConfig`, or a YAML file.
        overrides: ``key.sub=value`` overrides of a YAML file.
        on_stage_end: called with each stage's result (``index``, ``name``, ``folder``,
            ``status`` = ``done``/``skipped``, ``seconds``) once the stage is finished; an
            exception from it stops the run, which the same call continues later.

    Returns:
        ``{"output", "plan" (:func:`dry_run`), "corrected", "stages", "report"}``; the report
        (also written as ``report.json``/``.md``/``.png``) has one row per model;
        ``corrected`` (None without a ``correct:`` section) is the corrected teacher's
        ``folder``, ``status``, ``tokens``, ``seconds`` and held-out ``before`` / ``after``.

    Raises:
        MinicompressError: any problem with the config (before anything is loaded), a
            run folder of other settings, or a failure of a stage (named).
    """
    from .. import distributed

    config = load_run_config(config, overrides)
    if config.output is None:
        raise ConfigError("output: a run needs a folder (--output or output: in the YAML)")
    plan = dry_run(config)
    if config.eval_tasks and config.report.enabled:  # a missing lm-eval or unknown task fails now, not after training
        from ..evaluation.tasks import TaskFlags, task_manager

        task_manager(config.eval_tasks, config.eval_include_path,
                     flags=TaskFlags(tasks="eval_tasks", include_path="eval_include_path"))
    out = Path(config.output).expanduser()
    distributed.init_from_env()  # torchrun: every rank prunes and recovers; rank 0 writes and reports
    if config.correct and distributed.world_size() > 1:
        raise MinicompressError("correct: teacher correction runs in one process only, not under torchrun; "
                                "drop torchrun or the correct: section")
    if distributed.is_main():
        _prepare_folder(out, config, plan)
    distributed.barrier()
    if config.generate:
        config = _generate_data(config, out)
    original_total = plan["original"]["parameters"]["total"]
    timings_path = out / TIMINGS
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    corrected = None
    if config.correct:  # Minitron's order: correct the teacher, then prune it and distil from it
        start = time.perf_counter()
        corrected = _correct_teacher(config, out)
        if corrected["status"] == "done":
            timings[CORRECTED] = timings.get(CORRECTED, 0.0) + time.perf_counter() - start
            write_json_atomic(timings_path, timings)
        corrected["seconds"] = timings.get(CORRECTED)
    original = dataclasses.replace(config.model, source=corrected["folder"]) if corrected else config.model
    previous, results = original, []
    for i, stage in enumerate(config.stages):
        final = stage_folder(out, i, stage.name)
        digest = _stage_digest(config, i)
        record = read_provenance(final) if final.is_dir() else None
        if record is not None:
            if (record.get("run_stage") or {}).get("digest") != digest:
                raise MinicompressError(f"stages[{i}] ({stage.name}): {final} was made with other settings; "
                                        "pass --overwrite to start the run over, or choose another output")
            log.info("stage %d (%s): finished earlier, skipped", i + 1, stage.name)
            status = "skipped"
        else:
            start = time.perf_counter()
            try:
                _run_stage(config, i, previous, final, digest, original_total, plan["original"], original)
            except MinicompressError as err:
                raise MinicompressError(f"stages[{i}] ({stage.name}): {err}") from None
            timings[final.name] = timings.get(final.name, 0.0) + time.perf_counter() - start
            if distributed.is_main():
                write_json_atomic(timings_path, timings)
            status = "done"
        result = {"index": i, "name": stage.name, "folder": str(final), "status": status,
                  "seconds": timings.get(final.name), "tokens": stage.tokens}
        results.append(result)
        if on_stage_end is not None:
            on_stage_end(result)
        previous = dataclasses.replace(config.model, source=str(final))
    report = None
    if distributed.is_main() and config.report.enabled:
        report = evaluate_run(config, results, corrected=corrected)
        write_report(out, report)
    distributed.barrier()
    return {"output": str(out), "plan": plan, "corrected": corrected, "stages": results, "report": report}


# ----------------------------------------------------------------------------------------
# The report


def evaluate_run(config: RunConfig, stages: list[dict[str, Any]], *,
                 corrected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the original and every finished stage side by side.

    Perplexity, KL(original || stage) and top-1 agreement on ``eval_data`` (when set;
    the windows of ``minicompress eval``), parameters, weight bytes on disk, greedy
    decode tokens/s (``report.speed``) and the stage's wall time; with ``eval_tasks``, the
    lm-evaluation-harness accuracy of every model (:func:`minicompress.evaluation.tasks.evaluate_tasks`):
    a column ``<task>/acc`` per task after ``top1_agreement``, and every metric in each
    row's ``tasks``.

    Args:
        config: the run.
        stages: the results of :func:`run` (``name``, ``folder``, ``seconds``, ``tokens``).
        corrected: the corrected teacher of a ``correct:`` run (``folder``, ``seconds``,
            ``tokens``): a row ``corrected`` after the original.

    Returns:
        ``{"columns", "rows", "eval_data", "original", "tasks"}`` (``tasks``: the task
        settings, None without ``eval_tasks``).
    """
    from ..models import load_model
    from ..evaluation.perplexity import evaluate_model as evaluate
    from ..evaluation.perplexity import text_windows

    rep = config.report
    teacher, tokenizer = load_model(config.model)
    windows = text_windows(config.eval_data, tokenizer, flag="eval_data.seq_len") \
        if config.eval_data.source is not None else None
    kwargs = dict(batch_size=rep.batch_size, autocast=rep.autocast, speed=rep.speed,
                  prefill_tokens=rep.prefill_tokens, decode_tokens=rep.decode_tokens)
    score_tasks = _task_scorer(config, tokenizer)
    base = evaluate(teacher, tokenizer, windows, source=config.model.source, **kwargs)
    rows = [_report_row("original", base, base["parameters"], kl=0.0 if windows else None,
                        agreement=1.0 if windows else None, tasks=score_tasks(teacher))]
    if corrected is not None:
        model, _ = load_model(dataclasses.replace(config.model, source=corrected["folder"]))
        result = evaluate(model, tokenizer, windows, teacher=teacher, source=corrected["folder"], **kwargs)
        rows.append(_report_row(CORRECTED, result, base["parameters"], kl=result.get("kl_to_teacher"),
                                agreement=result.get("top1_agreement"), seconds=corrected.get("seconds"),
                                tokens=corrected["tokens"], tasks=score_tasks(model)))
        del model
    for stage in stages:
        pruned = Path(stage["folder"]).with_name(Path(stage["folder"]).name + ".pruned")
        if pruned.is_dir():  # kept (keep_pruned): show what recovery brought back
            model, _ = load_model(dataclasses.replace(config.model, source=str(pruned)))
            result = evaluate(model, tokenizer, windows, teacher=teacher, source=str(pruned), **kwargs)
            rows.append(_report_row(f"stage-{stage['index'] + 1}-{stage['name']} pruned", result, base["parameters"],
                                    kl=result.get("kl_to_teacher"), agreement=result.get("top1_agreement"),
                                    tokens=0, tasks=score_tasks(model)))
            del model
        model, _ = load_model(dataclasses.replace(config.model, source=stage["folder"]))
        result = evaluate(model, tokenizer, windows, teacher=teacher, source=stage["folder"], **kwargs)
        rows.append(_report_row(f"stage-{stage['index'] + 1}-{stage['name']}", result, base["parameters"],
                                kl=result.get("kl_to_teacher"), agreement=result.get("top1_agreement"),
                                seconds=stage.get("seconds"), tokens=stage.get("tokens"), tasks=score_tasks(model)))
        del model
    columns = list(REPORT_COLUMNS)
    task_columns = [f"{name}/acc" for name in rows[0].get("tasks") or {}]
    at = columns.index("top1_agreement") + 1
    columns[at:at] = task_columns
    tasks = None
    if config.eval_tasks:
        tasks = {"names": list(config.eval_tasks), "include_path": config.eval_include_path,
                 "num_fewshot": config.eval_num_fewshot, "limit": config.eval_task_limit}
    return {"columns": columns, "rows": rows, "original": config.model.source,
            "eval_data": to_dict(config.eval_data) if windows else None,
            "eval_tokens": base.get("tokens"), "tasks": tasks}


def _task_scorer(config: RunConfig, tokenizer) -> Callable[[Any], dict | None]:
    """``model -> {task: metrics}`` for ``eval_tasks`` (one task index for every model), or ``-> None``."""
    if not config.eval_tasks:
        return lambda model: None
    from ..evaluation.tasks import TaskFlags, evaluate_tasks, task_manager

    flags = TaskFlags(tasks="eval_tasks", include_path="eval_include_path")
    manager = task_manager(config.eval_tasks, config.eval_include_path, flags=flags)
    rep = config.report
    return lambda model: evaluate_tasks(model, tokenizer, config.eval_tasks, include_path=config.eval_include_path,
                                        num_fewshot=config.eval_num_fewshot, limit=config.eval_task_limit,
                                        batch_size=rep.batch_size, autocast=rep.autocast, manager=manager, flags=flags)


def _report_row(name: str, result: dict, original_params: int, *, kl: float | None, agreement: float | None,
                seconds: float | None = None, tokens: int | None = None,
                tasks: dict[str, dict] | None = None) -> dict[str, Any]:
    row = {"model": name, "parameters": result["parameters"], "ratio": result["parameters"] / original_params,
           "size_on_disk_bytes": result.get("size_on_disk_bytes"), "perplexity": result.get("perplexity"),
           "kl_to_original": kl, "top1_agreement": agreement,
           "decode_tokens_per_s": result.get("decode_tokens_per_s"), "wall_time_s": seconds, "tokens": tokens}
    if tasks is not None:
        row.update({f"{task}/acc": metrics.get("acc") for task, metrics in tasks.items()})
        row["tasks"] = tasks
    return row


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "size_on_disk_bytes":
        return f"{value / 2**20:,.1f} MiB"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the table, what it was measured on, and the plot."""
    columns = report["columns"]
    lines = [f"# minicompress run: `{report['original']}`", ""]
    if report.get("eval_data"):
        data = report["eval_data"]
        lines += [f"Held-out text: `{data['source']}` ({_cell('', report.get('eval_tokens'))} scored tokens in "
                  f"windows of {data['seq_len']}); KL and top-1 agreement are against the original model.", ""]
    else:
        lines += ["No `eval_data` was given: perplexity and KL columns are empty.", ""]
    if report.get("tasks"):
        tasks = report["tasks"]
        shots = "each task's default shots" if tasks["num_fewshot"] is None else f"{tasks['num_fewshot']}-shot"
        limit = f", the first {tasks['limit']} documents of each task" if tasks["limit"] else ""
        lines += [f"Task accuracy (`<task>/acc`): lm-evaluation-harness `acc`, {shots}{limit}; every metric "
                  "(`acc_norm`, standard errors, documents) is in `report.json`.", ""]
    if any(row["model"] == CORRECTED for row in report["rows"]):
        lines += [f"`{CORRECTED}`: the original fine-tuned on the run's text first (teacher correction); the stages "
                  "were pruned from it and distilled from it, and KL and agreement stay against the original.", ""]
    lines += ["| " + " | ".join(REPORT_LABELS.get(c, c) for c in columns) + " |",
              "| --- |" + " ---: |" * (len(columns) - 1)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    lines += ["", f"![perplexity vs parameters]({REPORT_PNG})", ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """``report.png``: held-out perplexity against parameters, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("perplexity") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if rows:
        xs = [r["parameters"] / 1e6 for r in rows]
        ys = [r["perplexity"] for r in rows]
        ax.plot(xs, ys, marker="o", linestyle=":")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if max(ys) / max(min(ys), 1e-9) > 10:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no eval_data: no perplexity", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="parameters (millions)", ylabel="held-out perplexity", title=f"minicompress run: {report['original']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    """Write ``report.json``, ``report.md`` and ``report.png`` into the run folder."""
    folder = Path(folder)
    write_json_atomic(folder / REPORT_JSON, report)
    (folder / REPORT_MD).write_text(report_markdown(report))
    plot_report(report, folder / REPORT_PNG)

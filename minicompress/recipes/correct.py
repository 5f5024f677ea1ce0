"""``minicompress correct``: teacher correction before pruning and distillation.

Minitron's second paper (Sreenivas et al., arXiv 2408.11796, sec. 3) distils without the
teacher's original pretraining data: the teacher was never trained on the distillation
text, so it first fine-tunes the unpruned teacher on that text ("teacher correction"),
then prunes the corrected teacher and distils from it; they report it matters when the
distillation data differs from the teacher's. Here the fine-tune is ``recover``'s training
(:func:`minicompress.training.distill_with_checkpoints`) on a copy of the teacher with
next-token cross-entropy and no teacher (:meth:`~minicompress.config.CorrectConfig.recover_config`):
the same schedule, precision policy, checkpoints, resume and metrics. The output is a stock
Hugging Face folder with a ``correction`` record in ``minicompress.json``, which ``prune
--model`` and ``recover --teacher`` take like any model (and which can stand as a second
teacher beside the original).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed
from ..config import CORRECTION_LOSS, CorrectConfig
from ..data.rows import TrainingData, load_training_data
from ..distillation.distill import make_schedule
from ..distillation.loop import StepRuntime, evaluate_on_ranks
from ..errors import MinicompressError
from ..hardware import describe_precision, keep_freed_memory, resolve_compile
from ..models import load_for_flag
from ..outputs import provenance, read_provenance
from ..runtime import model_device
from ..training import (TRAINING_FILES, WorkingFolder, distill_with_checkpoints, finish_metrics, make_working_folder,
                        open_working_folder, write_model_folder)

log = logging.getLogger(__name__)


def _trainable_copy(config: CorrectConfig, teacher: torch.nn.Module | None, tokenizer: Any):
    """``(model, tokenizer)``: the teacher loaded for training, or a float32 copy of an
    in-memory one (the caller's model is never changed); every parameter trainable."""
    if teacher is None:
        model, tokenizer = load_for_flag(config.teacher, "--teacher", for_training=True)
    elif tokenizer is None:
        raise MinicompressError("tokenizer: pass tokenizer= together with an in-memory teacher")
    else:
        model = copy.deepcopy(teacher).to(dtype=torch.float32)
    model.requires_grad_(True)
    model.train()
    return model, tokenizer


def correct(config: CorrectConfig, *, teacher: torch.nn.Module | None = None, tokenizer: Any = None,
            callback: Callable[[dict], None] | None = None) -> dict:
    """Fine-tune a copy of the teacher on ``config.data`` and save it as a HF folder.

    Args:
        config: the correction settings (``output`` required).
        teacher: an in-memory teacher (else loaded from ``config.teacher``); copied, never
            modified.
        tokenizer: its tokenizer (required with an in-memory teacher).
        callback: called with each step's metrics record after the step (and its
            checkpoint); an exception from it stops the run, leaving ``<output>.partial``
            to resume from.

    Returns:
        ``{"output", "teacher", "steps", "tokens", "before", "after", "final_loss", "seconds",
        "tokens_per_s", "resumed_from_step", "metrics"}``; ``before`` / ``after`` are the
        held-out metrics of the teacher on the text's held-out rows (``perplexity``, ``nll``).
        With ``tokens`` 0 nothing is trained: ``after`` is ``before`` and the output holds
        the teacher's weights unchanged.

    Raises:
        MinicompressError: an existing output without ``overwrite``, a stale working folder
            without ``resume``/``overwrite``, a resume with changed settings, a teacher that
            cannot be loaded, too little data, or a run under torchrun (one process only).
    """
    if distributed.init_from_env() > 1:
        raise MinicompressError("correct: runs in one process only, not under torchrun; drop torchrun")
    folder = open_working_folder("correct", config)
    torch.manual_seed(config.seed)
    model, tokenizer = _trainable_copy(config, teacher, tokenizer)
    device = model_device(model)
    precision = describe_precision(config.autocast, device)
    autocast = precision["resolved"]
    log.info("correct: precision %s (%s)", "bf16 autocast" if autocast == "bfloat16" else "float32",
             precision["reason"])
    data = load_training_data(config.data, tokenizer, config.eval_tokens, seed=config.seed)
    if not config.tokens:  # the teacher as it is, in a folder of its own
        before = evaluate_on_ranks(model, data.eval_ids, batch_size=config.eval_batch_size, autocast=autocast)
        result = {"before": before, "after": before, "elapsed": 0.0, "resumed_from_step": None, "steps": 0,
                  "tokens": 0, "metrics": [], "final_loss": None}
        return _write_corrected(config, folder, model, tokenizer, data=data, result=result, precision=precision)
    train = config.recover_config()
    schedule = make_schedule(train, 1, data.num_train)
    if device.type == "cpu":  # a step's big buffers reuse their pages instead of faulting them in again
        precision["allocator"] = keep_freed_memory()
    precision["compile"], precision["compile_reason"] = resolve_compile(
        config.compile, device, tokens=config.tokens, activation_checkpointing=config.activation_checkpointing)
    make_working_folder(folder.work, keep=folder.checkpoint is not None)  # only now: a refusal leaves nothing
    log.info("correct: fine-tuning %s on %s tokens of %s (lr %.1e, cross-entropy)", config.teacher.source,
             f"{schedule.total_steps * schedule.tokens_per_step:,}", config.data.describe(), config.lr)
    result = distill_with_checkpoints(model, None, data, train, schedule, folder=folder, callback=callback,
                                      runtime=StepRuntime(device, autocast, bool(precision["compile"])))
    if result["attention"]:
        precision["attention"] = result["attention"]
    records = finish_metrics(folder)
    last = records[-1]
    result.update(steps=schedule.total_steps, tokens=schedule.total_steps * schedule.tokens_per_step,
                  metrics=records, final_loss=last.get("loss"),
                  after={k[5:]: v for k, v in last.items() if k.startswith("eval_")})
    return _write_corrected(config, folder, model, tokenizer, data=data, result=result, precision=precision)


def _source_provenance(source: str) -> dict[str, Any] | None:
    """The ``minicompress.json`` of a local teacher folder (a pruned or recovered model), or None."""
    path = Path(source).expanduser()
    return read_provenance(path) if path.is_dir() else None


def _write_corrected(config: CorrectConfig, folder: WorkingFolder, model, tokenizer, *, data: TrainingData,
                     result: dict, precision: dict) -> dict:
    """Write the corrected teacher atomically with its ``correction`` record; returns the report."""
    start = time.perf_counter()
    tokens, elapsed = result["tokens"], result["elapsed"]
    correction = {
        "teacher": config.teacher.source, "data": config.data.describe(), "tokens_trained": tokens,
        "tokens_per_source": data.tokens_per_source(tokens // config.data.seq_len, config.data.seq_len),
        "steps": result["steps"], "lr": config.lr, "loss": dict(CORRECTION_LOSS),
        "held_out_sequences": data.eval_ids.shape[0], "train_sequences": data.num_train,
        "metrics_before": result["before"], "metrics_after": result["after"], "precision": precision,
        "final_train_loss": result["final_loss"], "seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9) if tokens else None,
        "resumed_from_step": result["resumed_from_step"],
    }
    record = provenance("correct", config, source_model=config.teacher.source,
                        source_provenance=_source_provenance(config.teacher.source), correction=correction)
    write_model_folder(folder, model, tokenizer, record, overwrite=config.overwrite,
                       files=TRAINING_FILES if tokens else ())
    log.info("correct: wrote %s in %.1f s", folder.output, time.perf_counter() - start)
    return {"output": str(folder.output), "teacher": config.teacher.source, "steps": result["steps"],
            "tokens": tokens, "before": result["before"], "after": result["after"],
            "final_loss": result["final_loss"], "seconds": elapsed, "tokens_per_s": correction["tokens_per_s"],
            "resumed_from_step": result["resumed_from_step"], "metrics": result["metrics"]}

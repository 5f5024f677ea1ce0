"""minicompress: Minitron-style structured pruning and distillation of Hugging Face causal LMs.

Score the importance of heads, neurons, embedding channels and layers on calibration
data; rewrite the model into a smaller stock Hugging Face model; recover it by knowledge
distillation from the original (Muralidharan et al., arXiv 2407.14679; Sreenivas et al.,
arXiv 2408.11796).

The Python API (``import minicompress as mc``) is imported lazily, so ``import
minicompress`` (and the CLI's start-up) loads neither torch nor transformers:

* ``mc.load_model(source)`` -> ``(model, tokenizer)`` (:func:`minicompress.models.load_model`)
* ``mc.score(model, batches)`` -> importance scores (:func:`minicompress.pruning.scoring.score_model`)
* ``mc.make_plan(scores, config, target)`` -> a pure :class:`~minicompress.pruning.plan.PrunePlan`
* ``mc.apply_plan_(model, plan)`` rewrites the model in place
* ``mc.recover(RecoverConfig(...), student=..., teacher=..., tokenizer=...)`` distils
  (:func:`minicompress.recipes.recover.recover`)
* ``mc.correct(CorrectConfig(...))`` fine-tunes a copy of the teacher on the distillation
  text first, Minitron's teacher correction (:func:`minicompress.recipes.correct.correct`)
* ``mc.evaluate(model, tokenizer, "test.txt", teacher=...)`` -> perplexity, KL, size, speed
  (:func:`minicompress.evaluation.perplexity.evaluate_model`)
* ``mc.evaluate_tasks(model, tokenizer, ["arc_easy"])`` -> lm-evaluation-harness accuracy
  (:func:`minicompress.evaluation.tasks.evaluate_tasks`; ``pip install 'minicompress[tasks]'``)
* ``mc.run(RunConfig or "run.yaml")`` runs progressive stages (:func:`minicompress.recipes.run.run`);
  ``mc.dry_run(config)`` checks one without loading weights

plus the configs (``mc.RecoverConfig``, ``mc.RunConfig``, ``mc.build_config`` ...) and
``mc.count_parameters``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": ("models", "load_model"),
    "load_config": ("models", "load_config"),
    "score": ("pruning.scoring", "score_model"),
    "ImportanceScores": ("pruning.scoring", "ImportanceScores"),
    "make_plan": ("pruning.plan", "make_plan"),
    "apply_plan_": ("pruning.plan", "apply_plan_"),
    "validate_target": ("pruning.search", "validate_target"),
    "PrunePlan": ("pruning.plan", "PrunePlan"),
    "recover": ("recipes.recover", "recover"),
    "correct": ("recipes.correct", "correct"),
    "evaluate": ("evaluation.perplexity", "evaluate_model"),
    "evaluate_tasks": ("evaluation.tasks", "evaluate_tasks"),
    "run": ("recipes.run", "run"),
    "dry_run": ("recipes.run", "dry_run"),
    "count_parameters": ("arch", "count_parameters"),
    "build_config": ("config", "build_config"),
    "ModelConfig": ("config", "ModelConfig"),
    "DataConfig": ("config", "DataConfig"),
    "TargetConfig": ("config", "TargetConfig"),
    "PruneConfig": ("config", "PruneConfig"),
    "RecoverConfig": ("config", "RecoverConfig"),
    "CorrectConfig": ("config", "CorrectConfig"),
    "LossConfig": ("config", "LossConfig"),
    "RunConfig": ("config", "RunConfig"),
    "MinicompressError": ("errors", "MinicompressError"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the Python API on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'minicompress' has no attribute {name!r}")
    module_name, attr = _API[name]
    module = importlib.import_module(f".{module_name}", __name__)
    return module if attr is None else getattr(module, attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

"""Task accuracy of an in-memory model through EleutherAI's lm-evaluation-harness.

The pruning literature reports zero-shot accuracy on lm-evaluation-harness tasks next to
perplexity (Gao et al., "A framework for few-shot language model evaluation", Zenodo
10256836, https://github.com/EleutherAI/lm-evaluation-harness): LLM-Pruner (Ma et al.,
arXiv 2305.11627) and the papers that followed it use the seven common-sense tasks of
:data:`PRUNING_TASKS`. A multiple-choice task scores every choice by the summed
log-probability of its tokens after the context (``acc``: the argmax is the gold choice;
``acc_norm``: the same after dividing each sum by the choice's length in characters).

:func:`evaluate_tasks` wraps a loaded model and tokenizer in lm-eval's ``HFLM`` and calls
``lm_eval.simple_evaluate``; nothing is read from or written to disk here except what
lm-eval itself loads: task YAMLs (its own, and those under ``include_path``) and their
data (the Hugging Face Hub for the standard tasks; local JSONL for a task whose YAML says
``dataset_path: json``, see docs/evaluation.md, "Task accuracy").

What the wrapper adds around lm-eval 0.4.x (checked with 0.4.13 and transformers 5):

* precision: ``autocast`` as everywhere in minicompress (``auto``: bf16 autocast where the
  hardware has native bf16), passed as HFLM's ``mixed_precision_dtype``; log-softmax in
  float32 (``softmax_dtype``) either way;
* the tokenizer is copied (HFLM sets a pad token on the one it gets), the model's
  train/eval mode and the global RNG states (lm-eval seeds ``random``, numpy and torch) are
  restored afterwards;
* the task index is built from ``include_path`` alone when it holds every task asked for
  (lm-eval's own index of ~15k task YAMLs takes seconds to scan);
* unknown task names, a missing lm-eval, and task data that cannot be loaded (no Hub
  access) are one-line :class:`~minicompress.errors.MinicompressError`;
* lm-eval's log messages below ERROR are hidden unless the ``minicompress`` logger is at
  DEBUG, its (and datasets') progress bars follow minicompress's (off with
  ``MINICOMPRESS_PROGRESS=0``: ``-q``, tests), and its record of the environment (``git
  describe`` of the working directory, torch's ``collect_env``: seconds of subprocesses
  per call) is skipped.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import MinicompressError
from ..hardware import resolve_autocast

log = logging.getLogger(__name__)

#: The zero-shot tasks of LLM-Pruner (arXiv 2305.11627, Table 1), as lm-eval names them.
PRUNING_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: Install hint named in the error when lm-eval is missing.
INSTALL_HINT = "pip install 'minicompress[tasks]'"
#: Bootstrap resamples for the standard error of metrics without a closed form (lm-eval's
#: default is 100,000 in a process pool; ``acc``/``acc_norm`` use the closed form anyway).
BOOTSTRAP_ITERS = 1000


def choice_task_yaml(name: str, data_file: str | Path, cache_dir: str | Path) -> str:
    """The lm-eval task YAML of a local multiple-choice task: JSONL rows ``{"context",
    "choices", "label"}`` in ``data_file``, scored by ``acc`` and ``acc_norm`` (docs/evaluation.md's
    "Task accuracy" example); ``cache_dir`` is the datasets cache it converts into."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache_dir}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def import_lm_eval(flag: str = "--tasks"):
    """``lm_eval``, or a one-line error naming ``flag`` and the install command.

    Raises:
        MinicompressError: lm-evaluation-harness is not installed.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - the backend we use must import too
    except ImportError as err:
        raise MinicompressError(f"{flag}: task accuracy needs lm-evaluation-harness (lm-eval), which is not "
                                f"installed ({err}); {INSTALL_HINT}") from None
    return lm_eval


def parse_task_names(tasks: str | Iterable[str], flag: str = "--tasks") -> tuple[str, ...]:
    """Task names from ``"hellaswag,arc_easy"`` or a sequence of names (duplicates dropped).

    Raises:
        MinicompressError: no name, or an empty name.
    """
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        name = str(item).strip()
        if not name:
            raise MinicompressError(f"{flag}: empty task name in {tasks!r}; give a comma list such as "
                                    "hellaswag,arc_easy")
        if name not in names:
            names.append(name)
    if not names:
        raise MinicompressError(f"{flag}: no task given; e.g. {','.join(PRUNING_TASKS)}")
    return tuple(names)


@dataclass(frozen=True)
class TaskFlags:
    """The flags (or config keys) the tasks and the include folder came from, named in errors.

    Attributes:
        tasks: where the task names were set (``--tasks``; ``eval_tasks`` in a run config).
        include_path: where the include folder was set (``--include-path``; ``eval_include_path``).
    """

    tasks: str = "--tasks"
    include_path: str = "--include-path"


def task_manager(names: str | Iterable[str], include_path: str | Path | None = None, *,
                 flags: TaskFlags = TaskFlags()):
    """An lm-eval ``TaskManager`` that knows every name in ``names``.

    With ``include_path`` holding all of them, only that folder is indexed; otherwise
    lm-eval's own tasks are indexed too (a few seconds). A name may also be the path of a
    task YAML file.

    Args:
        names: lm-eval task names (or a comma list), or paths of task YAML files.
        include_path: a folder of extra task YAMLs, or None.
        flags: the flags named in errors (:class:`TaskFlags`).

    Raises:
        MinicompressError: no such ``include_path`` folder, or an unknown task (with the
            closest known names and a hint about ``flags.include_path``).
    """
    tasks_flag, include_flag = flags.tasks, flags.include_path
    import_lm_eval(tasks_flag)
    from lm_eval.tasks import TaskManager

    names = [n for n in parse_task_names(names, tasks_flag) if Path(n).suffix.lower() not in (".yaml", ".yml") or not Path(n).is_file()]
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise MinicompressError(f"{include_flag}: no such folder: {folder} (a folder of lm-eval task YAMLs)")
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path is not None else None)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}" if close else ""
            where = (f"neither an lm-eval task nor a task of {include_path}" if include_path is not None
                     else "not an lm-eval task")
            raise MinicompressError(f"{tasks_flag}: unknown task {name!r} ({where}){hint}; for a local task give "
                                    f"{include_flag} DIR holding its YAML (docs/evaluation.md: Task accuracy)")
    return manager


@contextlib.contextmanager
def _restored_state(model: torch.nn.Module):
    """Restore the model's train/eval mode and the RNG states lm-eval seeds."""
    import numpy as np

    training = model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train(training)


#: ``lm_eval.evaluator`` helpers that only describe the environment in a results record we
#: do not keep: ``git describe`` of the working directory and torch's ``collect_env``
#: (subprocesses, seconds per call). Replaced by no-ops while :func:`evaluate_tasks` runs.
_SKIPPED_ENV_INFO = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}


#: lm-eval modules whose ``tqdm`` bars are silenced with minicompress's progress (``-q``, tests).
_TQDM_MODULES = ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task")


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's logs at ERROR (unless minicompress logs at DEBUG), no environment record, and
    without minicompress progress (``MINICOMPRESS_PROGRESS=0``: ``-q``, tests) no lm-eval or
    datasets progress bars either."""
    import importlib

    import datasets.utils
    from lm_eval import evaluator

    from ..progress import progress_enabled

    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not logging.getLogger("minicompress").isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    patched = [(evaluator, name, getattr(evaluator, name), _SKIPPED_ENV_INFO[name])
               for name in _SKIPPED_ENV_INFO if hasattr(evaluator, name)]
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    if not progress_enabled():
        for module in map(importlib.import_module, _TQDM_MODULES):
            if isinstance(getattr(module, "tqdm", None), type):  # disable wins over the caller's disable=...
                patched.append((module, "tqdm", module.tqdm,
                                lambda *args, _tqdm=module.tqdm, **kwargs: _tqdm(*args, **{**kwargs, "disable": True})))
        datasets.utils.disable_progress_bars()
    for module, name, _, replacement in patched:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        logger.setLevel(level)
        for module, name, original, _ in patched:
            setattr(module, name, original)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


def wrap_model(model: torch.nn.Module, tokenizer, *, batch_size: int = 8, autocast: str = "auto"):
    """lm-eval's ``HFLM`` around an in-memory ``*ForCausalLM`` (its device and dtype kept).

    Args:
        model: the model.
        tokenizer: its tokenizer (copied: HFLM sets a pad token on it).
        batch_size: requests per forward.
        autocast: ``auto``, ``none`` or ``bfloat16`` (bf16 autocast of the forward).
    """
    import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    bf16 = resolve_autocast(autocast, device) == "bfloat16"
    return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=int(batch_size),
                mixed_precision_dtype=torch.bfloat16 if bf16 else None, softmax_dtype=torch.float32)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" for a standard error it did not compute
    return None if math.isnan(value) else float(value)


def collect_metrics(output: dict) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value, ..., "n": samples}}`` from ``simple_evaluate``'s output.

    Metric keys are lm-eval's (``acc``, ``acc_stderr``, ``acc_norm``, ...), with its
    ``,none`` filter suffix stripped (other filters stay: ``exact_match,strict-match``).
    ``n`` is the number of documents scored (for a group, the sum over its tasks).
    """
    samples = output.get("n-samples") or {}
    subtasks = output.get("group_subtasks") or {}

    def count(name: str) -> int | None:
        if name in samples:
            return int(samples[name].get("effective", samples[name].get("original")))
        children = [count(child) for child in subtasks.get(name, [])]
        return sum(children) if children and None not in children else None

    out: dict[str, dict[str, Any]] = {}
    for section in ("results", "groups"):
        for name, metrics in (output.get(section) or {}).items():
            entry = out.setdefault(name, {})
            for key, value in metrics.items():
                metric, sep, filt = key.partition(",")
                if not sep:  # alias, name, sample_len, ...
                    continue
                entry[metric if filt == "none" else key] = _number(value)
            entry["n"] = count(name)
    return out


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: str | Iterable[str], *,
                   include_path: str | Path | None = None, num_fewshot: int | None = None,
                   limit: int | None = None, batch_size: int = 8, autocast: str = "auto", manager=None,
                   flags: TaskFlags = TaskFlags()) -> dict[str, dict[str, Any]]:
    """Accuracy of an in-memory model on lm-evaluation-harness tasks.

    Args:
        model: a ``*ForCausalLM`` (any device and dtype; put in eval mode while scoring).
        tokenizer: its tokenizer.
        tasks: lm-eval task names (or a comma list), e.g. ``("arc_easy", "hellaswag")``.
        include_path: a folder of extra task YAMLs (local tasks over JSONL files).
        num_fewshot: examples in each prompt (None: each task's default, 0 for the
            standard multiple-choice tasks).
        limit: score only the first ``limit`` documents of each task (a quick check; the
            numbers are then not comparable to published ones).
        batch_size: requests per forward.
        autocast: ``auto``, ``none`` or ``bfloat16``: the forward's precision, as in
            :func:`minicompress.evaluation.perplexity.evaluate`.
        manager: a :func:`task_manager` for these tasks, built once for several models
            (None: built here).
        flags: the flags or config keys named in errors (:class:`TaskFlags`).

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (tasks that have
        them) ..., "n"}}``: every metric lm-eval reports for the task, named as lm-eval
        names it without the ``,none`` filter suffix; ``n`` documents scored. A group
        (``ai2_arc``) has an entry of its own next to each of its tasks.

    Raises:
        MinicompressError: lm-eval not installed, an unknown task, a missing include
            folder, task data that cannot be loaded, or a bad ``num_fewshot``/``limit``.
    """
    tasks_flag, include_flag = flags.tasks, flags.include_path
    lm_eval = import_lm_eval(tasks_flag)
    names = parse_task_names(tasks, tasks_flag)
    if num_fewshot is not None and num_fewshot < 0:
        raise MinicompressError(f"num_fewshot: must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise MinicompressError(f"task_limit: must be >= 1, got {limit}")
    if manager is None:
        manager = task_manager(names, include_path, flags=flags)
    log.info("lm-eval: %s (%s%s)", ", ".join(names),
             "each task's default shots" if num_fewshot is None else f"{num_fewshot}-shot",
             f", first {limit} documents of each" if limit else "")
    with _restored_state(model), _quiet_lm_eval():
        lm = wrap_model(model, tokenizer, batch_size=batch_size, autocast=autocast)
        try:
            output = lm_eval.simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                             task_manager=manager, log_samples=False,
                                             bootstrap_iters=BOOTSTRAP_ITERS)
        except OSError as err:  # datasets: ConnectionError without the Hub, FileNotFoundError for local files
            text = " ".join(str(err).split())
            offline = isinstance(err, ConnectionError) or "Hub" in text or "offline" in text.lower()
            hint = ("; the standard tasks download their data from the Hugging Face Hub: without Hub access use a "
                    f"local task ({include_flag} DIR, docs/evaluation.md: Task accuracy)") if offline else ""
            raise MinicompressError(f"{tasks_flag}: cannot load the data of {', '.join(names)}: {text}{hint}") from None
    return collect_metrics(output)

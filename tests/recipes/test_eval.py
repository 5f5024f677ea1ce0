"""``minicompress eval --tasks``: lm-eval task accuracy next to (or instead of) perplexity.

A local multiple-choice task (JSONL + YAML in ``tmp_path``) on a saved tiny llama; the
results must equal :func:`minicompress.evaluation.tasks.evaluate_tasks` on the same model.
"""

from __future__ import annotations

import json

import pytest

from conftest import choice_rows, write_choice_task
from minicompress.cli import main

pytest.importorskip("lm_eval")

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture
def task_dir(tmp_path):
    return write_choice_task(tmp_path / "tasks", choice_rows(8, seed=1))


def test_eval_tasks_without_data_writes_accuracy_only(tiny_model_dir, task_dir, tmp_path, capsys):
    from minicompress.models import load_model
    from minicompress.config import ModelConfig
    from minicompress.evaluation.tasks import evaluate_tasks

    model_dir = tiny_model_dir("llama")
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--tasks", "tiny_choice", "--include-path", str(task_dir),
            "--no-speed", "--batch-size", "3", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "task accuracy" in printed and "tiny_choice" in printed
    record = json.loads(out.read_text())
    results = record["results"]
    assert "perplexity" not in results and results["parameters"] > 0
    model, tokenizer = load_model(ModelConfig(source=str(model_dir)))
    expected = evaluate_tasks(model, tokenizer, "tiny_choice", include_path=task_dir, autocast="none")
    assert results["tasks"] == expected
    assert set(expected["tiny_choice"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert expected["tiny_choice"]["n"] == 8
    assert record["config"]["tasks"] == ["tiny_choice"] and record["config"]["include_path"] == str(task_dir)


def test_eval_tasks_with_data_and_limit(tiny_model_dir, task_dir, text_corpus, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_model_dir("llama")), "--data", str(text_corpus), "--seq-len", "16",
            "--tasks", "tiny_choice", "--include-path", str(task_dir), "--task-limit", "3", "--num-fewshot", "0",
            "--no-speed", "--output", str(out), "-q"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["perplexity"] > 1 and results["tasks"]["tiny_choice"]["n"] == 3


@pytest.mark.parametrize("extra, message", [
    ([], "error: data.source: eval needs a text to evaluate on (--data PATH), or --tasks"),
    (["--include-path", "x"], "error: --include-path (include_path): applies to lm-eval tasks; give tasks too"),
    (["--tasks", "a", "--task-limit", "0"], "error: --task-limit (task_limit): must be a number > 0"),
    (["--tasks", "a", "--teacher", "m"], "error: data.source: --teacher needs a text"),
])
def test_eval_task_flag_errors(extra, message, capsys):
    assert main(["eval", "--model", "no-such-model-dir/x", *extra, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(message)


def test_unknown_task_fails_before_the_model_loads(task_dir, tmp_path, capsys, monkeypatch):
    from lm_eval.tasks import TaskManager

    real_init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: real_init(self, *a, **{**kw, "include_defaults": False}))
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "tiny_choice,tiny_choise",
            "--include-path", str(task_dir), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks: unknown task 'tiny_choise'") and "did you mean tiny_choice" in err

"""Task accuracy through lm-evaluation-harness: a local multiple-choice task on a tiny llama.

The task is a few JSONL rows and a YAML in ``tmp_path`` (``dataset_path: json``), so
nothing touches the network; the accuracies are checked against a naive float32
computation of lm-eval's scoring rule: the summed log-probability of each choice's tokens
after the context (``acc``), divided by the choice's length in characters (``acc_norm``).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import choice_rows, make_tiny_model, make_tiny_tokenizer, write_choice_task
from minicompress.errors import MinicompressError

pytest.importorskip("lm_eval")

from minicompress.evaluation import tasks as tasks_module  # noqa: E402
from minicompress.evaluation.tasks import collect_metrics, evaluate_tasks, parse_task_names  # noqa: E402

TASK = "tiny_choice"
pytestmark = pytest.mark.usefixtures("offline_hub")


@torch.no_grad()
def naive_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | context) of each choice, one float32 forward each.

    lm-eval's causal split: the choice follows the context after one space; the context's
    tokens are those of the context alone, the choice's the rest of the whole text's.
    """
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)  # [L, V]
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def expected_metrics(model, tokenizer, rows: list[dict]) -> dict:
    acc, acc_norm = [], []
    for row in rows:
        ll = np.array(naive_loglikelihoods(model, tokenizer, row["context"], row["choices"]))
        acc.append(float(np.argmax(ll) == row["label"]))
        acc_norm.append(float(np.argmax(ll / np.array([len(c) for c in row["choices"]])) == row["label"]))
    n = len(rows)

    def stderr(xs):  # lm-eval's mean_stderr: sample standard deviation / sqrt(n)
        mean = sum(xs) / n
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)

    return {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "acc_stderr": stderr(acc),
            "acc_norm_stderr": stderr(acc_norm), "n": n}


def test_local_multiple_choice_task_matches_naive_scoring(tmp_path):
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    rows = choice_rows(12)
    expected = expected_metrics(model, tokenizer, rows)
    # the task tells the two rules apart, and neither is trivially 0 or 1
    assert expected["acc"] != expected["acc_norm"] and 0 < expected["acc"] < 1 and 0 < expected["acc_norm"] < 1
    folder = write_choice_task(tmp_path / "tasks", rows)
    model.train()
    torch.manual_seed(7)
    state = torch.get_rng_state()

    result = evaluate_tasks(model, tokenizer, TASK, include_path=folder, batch_size=3, autocast="none")

    assert set(result) == {TASK}
    got = result[TASK]
    assert got["n"] == expected["n"]
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    assert model.training and torch.equal(torch.get_rng_state(), state)  # mode and RNG as they were
    assert tokenizer.pad_token == "<pad>"

    limited = evaluate_tasks(model, tokenizer, [TASK], include_path=folder, limit=5, autocast="none")
    first = expected_metrics(model, tokenizer, rows[:5])
    assert limited[TASK]["n"] == 5
    assert limited[TASK]["acc"] == pytest.approx(first["acc"]) and limited[TASK]["acc_norm"] == pytest.approx(first["acc_norm"])


def test_bfloat16_autocast_scores_through_lm_eval(tmp_path, capfd):
    model, tokenizer = make_tiny_model("llama", seed=1), make_tiny_tokenizer()
    rows = choice_rows(6, seed=3)
    folder = write_choice_task(tmp_path / "tasks", rows)
    calls = []
    real_autocast = torch.autocast

    def spy(*args, **kwargs):
        calls.append((kwargs.get("dtype"), kwargs.get("enabled", True)))
        return real_autocast(*args, **kwargs)

    import lm_eval.models.huggingface as hf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf.torch, "autocast", spy)
        result = evaluate_tasks(model, tokenizer, TASK, include_path=folder, autocast="bfloat16")
    assert (torch.bfloat16, True) in calls
    assert result[TASK]["n"] == 6 and 0 <= result[TASK]["acc"] <= 1
    err = capfd.readouterr().err  # MINICOMPRESS_PROGRESS=0 (conftest): no lm-eval or datasets bars
    assert "Running loglikelihood requests" not in err and "Generating test split" not in err


def test_unknown_task_names_the_flag_and_the_include_path(tmp_path, monkeypatch):
    folder = write_choice_task(tmp_path / "tasks", choice_rows(2))
    from lm_eval.tasks import TaskManager

    real_init = TaskManager.__init__

    def local_only(self, *args, **kwargs):  # lm-eval's own index takes seconds to scan: index the folder only
        kwargs["include_defaults"] = False
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "__init__", local_only)
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    with pytest.raises(MinicompressError, match=r"^--tasks: unknown task 'tiny_choise' .*did you mean tiny_choice; "
                                                r".*--include-path DIR"):
        evaluate_tasks(model, tokenizer, "tiny_choise", include_path=folder)
    with pytest.raises(MinicompressError, match=r"^--include-path: no such folder"):
        evaluate_tasks(model, tokenizer, TASK, include_path=tmp_path / "missing")


def test_missing_local_data_is_one_line(tmp_path):
    folder = write_choice_task(tmp_path / "tasks", choice_rows(2))
    (folder / f"{TASK}.jsonl").unlink()
    with pytest.raises(MinicompressError, match=r"^--tasks: cannot load the data of tiny_choice: "):
        evaluate_tasks(make_tiny_model("llama"), make_tiny_tokenizer(), TASK, include_path=folder)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MinicompressError, match=r"^--tasks: .*pip install 'minicompress\[tasks\]'"):
        evaluate_tasks(None, None, "arc_easy")


def test_parse_task_names():
    assert parse_task_names("hellaswag, arc_easy,hellaswag") == ("hellaswag", "arc_easy")
    assert parse_task_names(["boolq"]) == ("boolq",)
    with pytest.raises(MinicompressError, match="--tasks: empty task name"):
        parse_task_names("boolq,,piqa")


def test_collect_metrics_strips_the_none_filter_and_counts_groups():
    output = {
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                                 "acc_norm_stderr,none": "N/A"},
                    "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,none": 0.2}},
        "groups": {"ai2_arc": {"acc,none": 0.4, "alias": "ai2_arc"}},
        "group_subtasks": {"ai2_arc": ["arc_easy", "arc_challenge"]},
        "n-samples": {"arc_easy": {"original": 10, "effective": 4}, "arc_challenge": {"original": 3, "effective": 3},
                      "gsm8k": {"original": 9, "effective": 9}},
    }
    assert collect_metrics(output) == {
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": None, "n": 4},
        "gsm8k": {"exact_match,strict-match": 0.1, "exact_match": 0.2, "n": 9},
        "ai2_arc": {"acc": 0.4, "n": 7},
    }
    assert tasks_module.PRUNING_TASKS[0] == "boolq"

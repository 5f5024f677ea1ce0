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


def _standard_shaped_tasks(folder, rows: list[dict]) -> dict[str, list[dict]]:
    """Local copies of lm-eval's own hellaswag, piqa and arc_easy tasks: their installed YAMLs
    (``process_docs: !function utils.process_docs`` with hellaswag's own ``utils.py``,
    ``doc_to_choice: "choices"`` / ``"{{[sol1, sol2]}}"`` / ``"{{choices.text}}"``,
    ``doc_to_target: "{{choices.label.index(answerKey)}}"``...) with only the dataset lines
    pointing at a local JSONL of documents in each task's own fields (and the task renamed,
    its tags dropped). Returns each task's rows as ``{context, choices, label}`` for the naive
    scoring: what the task's templates must render."""
    import json
    import shutil
    from pathlib import Path

    import lm_eval.tasks

    installed = Path(lm_eval.tasks.__file__).parent
    docs, expected = {}, {}
    # hellaswag: a WikiHow-style activity with bracket artefacts, string labels, four endings
    docs["hellaswag"] = [{"activity_label": r["context"].split()[0], "ctx_a": " ".join(r["context"].split()[1:]) +
                          (" [title] stop" if i == 0 else ""), "ctx_b": "then", "endings": r["choices"],
                          "label": str(r["label"])} for i, r in enumerate(rows[:5])]
    expected["hellaswag"] = [{"context": f"{d['activity_label']}: {d['ctx_a']} Then".replace(" [title]", "."),
                              "choices": d["endings"], "label": int(d["label"])} for d in docs["hellaswag"]]
    # piqa: a goal and two solutions, an integer label
    docs["piqa"] = [{"goal": r["context"], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": r["label"] % 2}
                    for r in rows[5:9]]
    expected["piqa"] = [{"context": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]],
                         "label": d["label"]} for d in docs["piqa"]]
    # arc_easy: lettered choices and an answer key
    docs["arc_easy"] = [{"id": str(i), "question": r["context"], "answerKey": "ABCD"[r["label"]],
                         "choices": {"text": r["choices"], "label": list("ABCD")}} for i, r in enumerate(rows[9:15])]
    expected["arc_easy"] = [{"context": f"Question: {d['question']}\nAnswer:", "choices": d["choices"]["text"],
                             "label": "ABCD".index(d["answerKey"])} for d in docs["arc_easy"]]
    for task, yaml_path, utils in (("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/utils.py"),
                                   ("piqa", "piqa/piqa.yaml", None), ("arc_easy", "arc/arc_easy.yaml", None)):
        sub = folder / task
        sub.mkdir(parents=True)
        data = sub / "docs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[task]))
        if utils:
            shutil.copy(installed / utils, sub / "utils.py")
        lines, skip = [], False
        for line in (installed / yaml_path).read_text().splitlines():
            key = line.split(":")[0]
            skip = key == "tag" or (skip and line.startswith("  - "))
            if skip or key in ("dataset_path", "dataset_name", "training_split", "validation_split", "test_split"):
                continue
            lines.append(f"task: local_{task}" if key == "task" else line)
        lines += ["dataset_path: json", "dataset_kwargs:", "  data_files:", f"    validation: {data}",
                  f"  cache_dir: {folder / 'hf-cache'}", "validation_split: validation"]
        (sub / f"local_{task}.yaml").write_text("\n".join(lines) + "\n")
    return expected


def test_tasks_written_like_lm_evals_own_hellaswag_piqa_and_arc_easy_score_through_eval(tiny_model_dir, tmp_path):
    """'Standard tasks just work': eval --tasks runs the installed YAMLs of hellaswag, piqa and
    arc_easy (process_docs, list and template choices, an answer-key target) on local documents;
    every item is scored, by the rule the naive computation applies to what the templates render."""
    import json

    from minicompress.cli import main
    from minicompress.models import load_model

    model_dir = tiny_model_dir("llama")
    expected_rows = _standard_shaped_tasks(tmp_path / "tasks", choice_rows(15, seed=4))
    names = [f"local_{task}" for task in expected_rows]
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", ",".join(names), "--include-path",
                 str(tmp_path / "tasks"), "--autocast", "none", "--no-speed", "--output", str(out), "-q"]) == 0
    got = json.loads(out.read_text())["results"]["tasks"]
    assert set(got) == set(names)
    model, tokenizer = load_model(str(model_dir))
    for task, rows in expected_rows.items():
        result, expected = got[f"local_{task}"], expected_metrics(model, tokenizer, rows)
        assert result["n"] == len(rows), task
        for key in ("acc", "acc_norm"):
            assert 0 <= result[key] <= 1 and result[key] == pytest.approx(expected[key], abs=1e-12), (task, key)

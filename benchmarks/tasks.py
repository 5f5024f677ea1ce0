"""Task accuracy offline: a next-sentence multiple-choice task built from WikiText-2 test.

The standard zero-shot tasks of the pruning papers (boolq, piqa, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa) come from the Hugging Face Hub, which this machine
cannot reach, and no PyPI package ships their data. This script therefore builds OUR OWN
proxy task from what is here, in HellaSwag's format (a context and four endings), and
scores every ``--models`` entry on it through lm-evaluation-harness
(:func:`minicompress.evaluation.tasks.evaluate_tasks`), exactly as ``minicompress eval --tasks``
would with ``--include-path``:

* **wikitext_next_sentence** (not a standard benchmark; numbers are comparable only
  between models scored by this script with the same settings): WikiText-2 *test*
  paragraphs (held out: never used for calibration or recovery), split into sentences at
  `` . ``. Each question is ``--context-sentences`` consecutive sentences of a paragraph
  (the context) and four candidate next sentences: the true one and three sentences of
  similar length (within 30% in words) drawn from other articles. The gold position is
  drawn at random. Chance is 0.25; the "shortest choice" baseline (what a model that only
  prefers short endings would score on ``acc``) is printed next to it.

Usage::

    python benchmarks/tasks.py --limit 20                 # a quick check: minutes on 2 CPU cores
    python benchmarks/tasks.py                            # 500 questions x 2 models
    python benchmarks/tasks.py --models smollm2-135m runs/students/my-student --questions 1000
    python benchmarks/tasks.py --tasks hellaswag,arc_easy # with Hub access: standard tasks too

Writes ``benchmarks/out/tasks.json`` (and keeps the generated task under ``--task-dir``
when given) and prints a rich table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, OUT, load_average, make_console, run_record, table, write_json

WIKITEXT = DATA / "wikitext2" / "test.txt"
STUDENT = Path("~/.cache/minicompress/runs/students/smollm2-50-searched").expanduser()
TASK = "wikitext_next_sentence"
CHOICES = 4
_HEADING = re.compile(r"^\s*=.*=\s*$")


def articles(text: str) -> list[list[str]]:
    """WikiText paragraphs grouped by article (a top-level ``= Title =`` heading starts one)."""
    out: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if _HEADING.match(stripped):
            if stripped.startswith("= ") and not stripped.startswith("= ="):
                out.append([])
            continue
        if not out:
            out.append([])
        out[-1].append(stripped)
    return [a for a in out if a]


def sentences(paragraph: str) -> list[str]:
    """A WikiText paragraph's sentences (split after `` . ``; the period kept)."""
    parts = [p.strip() for p in paragraph.split(" . ")]
    out = [p + " ." for p in parts[:-1] if p] + ([parts[-1]] if parts[-1] else [])
    return [s for s in out if len(s.split()) >= 4]


def build_questions(text: str, n: int, *, context_sentences: int = 2, seed: int = 0) -> list[dict]:
    """``n`` rows ``{context, choices, label, article}``: the true next sentence and three
    length-matched sentences of other articles, the gold at a random position.

    Questions are spread over the text: one per paragraph with enough sentences, the
    paragraphs taken in a seeded random order.
    """
    rng = random.Random(seed)
    docs = articles(text)
    pool = [(a, s) for a, paragraphs in enumerate(docs) for p in paragraphs for s in sentences(p)]
    by_length: dict[int, list[tuple[int, str]]] = {}
    for a, s in pool:
        by_length.setdefault(len(s.split()), []).append((a, s))
    candidates = [(a, sents) for a, paragraphs in enumerate(docs) for p in paragraphs
                  if len(sents := sentences(p)) > context_sentences]
    rng.shuffle(candidates)
    rows = []
    for a, sents in candidates:
        if len(rows) == n:
            break
        start = rng.randrange(len(sents) - context_sentences)
        context = " ".join(sents[start:start + context_sentences])
        gold = sents[start + context_sentences]
        words = len(gold.split())
        near = [s for length in range(int(words * 0.7), int(words * 1.3) + 1)
                for b, s in by_length.get(length, []) if b != a and s != gold]
        if len(near) < CHOICES - 1:
            continue
        choices = rng.sample(near, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, gold)
        rows.append({"context": context, "choices": choices, "label": label, "article": a})
    if len(rows) < n:
        raise SystemExit(f"error: --questions: the text gives only {len(rows)} questions, fewer than {n}")
    return rows


def write_task(folder: Path, rows: list[dict]) -> Path:
    """The lm-eval task (``<TASK>.jsonl`` + ``<TASK>.yaml``, a local datasets cache) in ``folder``."""
    from minicompress.evaluation.tasks import choice_task_yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(choice_task_yaml(TASK, data, folder / "hf-datasets-cache"))
    return folder


def baselines(rows: list[dict]) -> dict[str, float]:
    """Chance, and the accuracy of always picking the shortest choice (in characters)."""
    shortest = sum(min(range(CHOICES), key=lambda i: len(r["choices"][i])) == r["label"] for r in rows)
    return {"chance": 1 / CHOICES, "shortest_choice": shortest / len(rows)}


def main(argv: list[str] | None = None) -> int:
    """Build the task, score every model, print the table and write JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", str(STUDENT)],
                        help="model sources (built-in names, HF folders, .gguf files); default: SmolLM2-135M and "
                             "the pruned 50%% student")
    parser.add_argument("--data", default=str(WIKITEXT), help="held-out text (default: WikiText-2 test)")
    parser.add_argument("--questions", type=int, default=500, help="questions of the proxy task (default 500)")
    parser.add_argument("--context-sentences", type=int, default=2, help="sentences of context per question")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question draw")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions of each task")
    parser.add_argument("--tasks", default="",
                        help="standard lm-eval tasks to add, comma list (needs Hub access), e.g. hellaswag,arc_easy")
    parser.add_argument("--num-fewshot", type=int, default=None, help="examples per prompt (default: 0 for ours)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--autocast", default="auto", choices=("auto", "none", "bfloat16"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 helps when cores are shared)")
    parser.add_argument("--task-dir", default=None, help="keep the generated task here (default: a temporary folder)")
    parser.add_argument("--output", default=str(OUT / "tasks.json"))
    args = parser.parse_args(argv)

    import torch

    from minicompress.config import ModelConfig
    from minicompress.errors import MinicompressError
    from minicompress.evaluation.perplexity import parameter_summary
    from minicompress.models import load_for_flag
    from minicompress.evaluation.tasks import evaluate_tasks, parse_task_names, task_manager

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")
    console = make_console()
    if not Path(args.data).is_file():
        console.print(f"error: --data: {args.data} not found", style="red")
        return 2
    rows = build_questions(Path(args.data).read_text(encoding="utf-8"), args.questions,
                           context_sentences=args.context_sentences, seed=args.seed)
    scored = rows[: args.limit] if args.limit else rows
    names = (TASK, *parse_task_names(args.tasks)) if args.tasks else (TASK,)
    record = run_record(benchmark="tasks", task={
        "name": TASK, "what": "our own proxy, not a standard benchmark: WikiText-2 test context sentences and the "
                              "true next sentence among 4 length-matched sentences of other articles",
        "data": args.data, "questions": len(rows), "scored": len(scored), "context_sentences": args.context_sentences,
        "seed": args.seed, "baselines": baselines(scored), "example": rows[0]},
        tasks=list(names), num_fewshot=args.num_fewshot, limit=args.limit, autocast=args.autocast, dtype=args.dtype,
        batch_size=args.batch_size, torch_threads=torch.get_num_threads(), loadavg_start=load_average())
    results = []
    with tempfile.TemporaryDirectory(prefix="minicompress-tasks-") as tmp:
        folder = write_task(Path(args.task_dir) if args.task_dir else Path(tmp), rows)
        try:
            manager = task_manager(names, folder)
            for source in args.models:
                model, tokenizer = load_for_flag(ModelConfig(source=source, dtype=args.dtype), "--models")
                start = time.perf_counter()
                metrics = evaluate_tasks(model, tokenizer, names, include_path=folder, num_fewshot=args.num_fewshot,
                                         limit=args.limit, batch_size=args.batch_size, autocast=args.autocast,
                                         manager=manager)
                seconds = time.perf_counter() - start
                results.append({"model": source, "parameters": parameter_summary(model)["total"],
                                "seconds": seconds, "tasks": metrics})
                console.log(f"{source}: " + ", ".join(f"{t} acc {m.get('acc')} acc_norm {m.get('acc_norm')}"
                                                      for t, m in metrics.items()) + f" ({seconds:.0f} s)")
                del model
        except MinicompressError as err:
            console.print(f"error: {err}", style="red", markup=False)
            return 2
    record["loadavg_end"] = load_average()
    record["rows"] = results

    def cell(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    base = record["task"]["baselines"]
    console.print(table(
        f"task accuracy (lm-evaluation-harness; {TASK} is our own proxy: chance {base['chance']:.2f}, "
        f"shortest choice {base['shortest_choice']:.3f})",
        ("model", "parameters", "task", "n", "acc", "± acc", "acc_norm", "± acc_norm", "s"),
        [(r["model"], f"{r['parameters']:,}", task, m.get("n"), cell(m.get("acc")), cell(m.get("acc_stderr")),
          cell(m.get("acc_norm")), cell(m.get("acc_norm_stderr")), f"{r['seconds']:.0f}")
         for r in results for task, m in r["tasks"].items()], left=("model", "task")))
    out = write_json(args.output, record)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

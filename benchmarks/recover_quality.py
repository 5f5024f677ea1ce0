"""Is distillation a scam? Recovery of a pruned SmolLM2 four ways, same token budget.

A pruned SmolLM2-135M student (``--student``, any HF folder) is recovered on
``../shared/data/corpus`` from the SmolLM2-135M teacher with the same data, schedule and
token budget (``--tokens``, default 1M) four ways:

* ``kl``: forward KL on logits, temperature 1 (Minitron's recipe);
* ``kl+ce``: 0.5 forward KL + 0.5 cross-entropy on the labels;
* ``ce``: cross-entropy only (plain continued pre-training; no teacher in the loss);
* ``scratch+kl``: the same architecture from random init, forward KL (does the pruned
  initialisation matter?).

Each is reported on the first 16,384 tokens of WikiText-2 test (windows of 512, the
whole file as one document, never trained on): perplexity and per-token KL(teacher ||
student), before and after; the recovery curves (training loss, held-out perplexity and KL
on the corpus' held-out sequences) go into one PNG.

Run (about 2.2 h per run at the full 1M budget: this 2-core CPU trains the 50% student at
~125 tokens/s with a live teacher, ~210 for CE only):
``python benchmarks/recover_quality.py --student runs/pruned-smollm2 --threads 2``; the
measured run in ``benchmarks/RESULTS.md`` used ``--tokens 131072 --global-batch-tokens 4096
--micro-batch-size 2 --eval-every 8``; smoke test: ``--tokens 16384``. Prints a rich table; writes ``benchmarks/out/recover_quality.json``
and ``benchmarks/out/recover_quality.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")

import argparse
import copy
import datetime as dt
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from minicompress import distill
from minicompress.arch import count_parameters
from minicompress.config import DataConfig, LossConfig, ModelConfig, RecoverConfig
from minicompress.data import bos_token_id, load_token_stream
from minicompress.evaluate import eval_windows, evaluate_perplexity
from minicompress.models import load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"

RUNS = {
    "kl": dict(loss=LossConfig(kl_weight=1.0, ce_weight=0.0), scratch=False),
    "kl+ce": dict(loss=LossConfig(kl_weight=0.5, ce_weight=0.5), scratch=False),
    "ce": dict(loss=LossConfig(kl_weight=0.0, ce_weight=1.0), scratch=False),
    "scratch+kl": dict(loss=LossConfig(kl_weight=1.0, ce_weight=0.0), scratch=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="pruned student HF folder")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA / "corpus"))
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--eval-tokens", type=int, default=16384, help="WikiText-2 test tokens evaluated")
    p.add_argument("--tokens", type=int, default=1_000_000, help="recovery budget per run")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch-tokens", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--held-out-tokens", type=int, default=4096, help="corpus tokens held out for the curves")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: end only)")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--autocast", default="none", choices=("none", "bfloat16"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on 2 shared cores, 2 OpenMP threads can be 10x slower)")
    p.add_argument("--workdir", default=str(OUT / "recover_quality_runs"), help="recovered models go here")
    p.add_argument("--output", default=str(OUT / "recover_quality.json"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def wikitext_windows(path: str, tokenizer, tokens: int, seq_len: int):
    """First ``tokens`` tokens of the file as one document, non-overlapping windows."""
    stream = load_token_stream(DataConfig(source=path, seq_len=seq_len, max_tokens=tokens, shuffle=False,
                                          documents="file"), tokenizer)
    return eval_windows(stream, seq_len, bos_token_id=bos_token_id(tokenizer))


def evaluate(model, windows, teacher, autocast) -> dict:
    was_training = model.training
    model.eval()
    res = evaluate_perplexity(model, windows, teacher=teacher, batch_size=4, autocast=autocast)
    model.train(was_training)
    return {k: res[k] for k in ("perplexity", "nll", "kl_to_teacher", "top1_agreement", "teacher_perplexity")
            if k in res}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, res in results.items():
        recs = res["metrics"]
        train = [r for r in recs if "loss" in r]
        evals = [r for r in recs if "eval_perplexity" in r]
        axes[0].plot([r["tokens"] for r in train], [r["kl"] if r["kl"] else r["ce"] for r in train],
                     label=f"{name} ({'kl' if any(r['kl'] for r in train) else 'ce'})")
        axes[1].plot([r["tokens"] for r in evals], [r["eval_perplexity"] for r in evals], marker="o", label=name)
        axes[2].plot([r["tokens"] for r in evals], [r.get("eval_kl_to_teacher") for r in evals], marker="o",
                     label=name)
    axes[0].set(title="training loss term", xlabel="tokens", yscale="log")
    axes[1].set(title="held-out corpus perplexity", xlabel="tokens", yscale="log")
    axes[2].set(title="held-out KL(teacher || student)", xlabel="tokens", yscale="log")
    for ax in axes:
        ax.legend()
    fig.suptitle("recovery: forward KL vs KL+CE vs CE vs random init + KL (same tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    console = Console(width=160)
    started = time.perf_counter()

    teacher, tokenizer = load_model(args.teacher)
    student0, _ = load_model(args.student, for_training=True)
    windows = wikitext_windows(args.wikitext, tokenizer, args.eval_tokens, args.seq_len)
    console.log(f"WikiText-2: {sum(n for _, n in windows)} scored tokens in {len(windows)} windows")

    base = evaluate(student0, windows, teacher, args.autocast)
    teacher_ppl = base.pop("teacher_perplexity")
    console.log(f"teacher ppl {teacher_ppl:.2f}; pruned student before recovery {base}")

    results: dict = {}
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    for name in args.runs.split(","):
        spec = RUNS[name]
        if spec["scratch"]:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(args.seed)
            student = AutoModelForCausalLM.from_config(student0.config, dtype=torch.float32).train()
            before = evaluate(student, windows, teacher, args.autocast)
            before.pop("teacher_perplexity", None)
        else:
            student, before = copy.deepcopy(student0).train(), dict(base)
        config = RecoverConfig(
            student=ModelConfig(source=args.student), teacher=ModelConfig(source=args.teacher),
            data=DataConfig(source=args.data, seq_len=args.seq_len, seed=args.seed),
            tokens=args.tokens, global_batch_tokens=args.global_batch_tokens,
            micro_batch_size=args.micro_batch_size, lr=args.lr, min_lr=args.min_lr,
            warmup_steps=min(args.warmup_steps, max(args.tokens // args.global_batch_tokens // 10, 0)),
            loss=spec["loss"], autocast=args.autocast, eval_every=args.eval_every,
            eval_tokens=args.held_out_tokens, seed=args.seed,
            output=str(Path(args.workdir) / name.replace("+", "_")), overwrite=True,
        )
        t0 = time.perf_counter()
        rec = distill.recover(config, student=student, teacher=teacher, tokenizer=tokenizer)
        seconds = time.perf_counter() - t0
        after = evaluate(student, windows, teacher, args.autocast)
        after.pop("teacher_perplexity", None)
        results[name] = {"loss": {k: v for k, v in vars(spec["loss"]).items()}, "scratch": spec["scratch"],
                         "steps": rec["steps"], "tokens": rec["tokens"], "seconds": seconds,
                         "train_tokens_per_s": rec["tokens_per_s"], "wikitext_before": before,
                         "wikitext_after": after, "held_out_before": rec["before"], "held_out_after": rec["after"],
                         "final_train_loss": rec["final_loss"], "metrics": rec["metrics"], "output": rec["output"]}
        console.log(f"{name}: {seconds:.0f}s, WikiText ppl {before['perplexity']:.1f} -> {after['perplexity']:.1f}, "
                    f"KL {before['kl_to_teacher']:.3f} -> {after['kl_to_teacher']:.3f}")
        del student
        gc.collect()

    record = {
        "date": dt.date.today().isoformat(), "argv": sys.argv, "teacher": args.teacher, "student": args.student,
        "student_parameters": count_parameters(student0.config)["total"],
        "teacher_parameters": count_parameters(teacher.config)["total"],
        "teacher_wikitext_perplexity": teacher_ppl, "wikitext_scored_tokens": sum(n for _, n in windows),
        "seconds": time.perf_counter() - started, "runs": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))

    table = Table(title=f"Recovery, {args.tokens:,} tokens each; teacher WikiText-2 ppl {teacher_ppl:.2f}")
    for col in ("run", "loss", "steps", "WikiText ppl before", "after", "x teacher", "KL before", "KL after",
                "train tok/s", "minutes"):
        table.add_column(col, justify="left" if col in ("run", "loss") else "right")
    for name, res in results.items():
        loss = res["loss"]
        table.add_row(name, f"kl {loss['kl_weight']:g} ce {loss['ce_weight']:g}", str(res["steps"]),
                      f"{res['wikitext_before']['perplexity']:,.1f}", f"{res['wikitext_after']['perplexity']:,.1f}",
                      f"{res['wikitext_after']['perplexity'] / teacher_ppl:.2f}",
                      f"{res['wikitext_before']['kl_to_teacher']:.3f}", f"{res['wikitext_after']['kl_to_teacher']:.3f}",
                      f"{res['train_tokens_per_s']:.0f}", f"{res['seconds'] / 60:.1f}")
    console.print(table)
    console.log(f"total {record['seconds'] / 60:.1f} min; wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

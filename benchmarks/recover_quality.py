"""Recovery quality of a pruned SmolLM2, several ways at the same token budget, resumable.

A pruned SmolLM2-135M student (``--student``, any HF folder) is recovered on
``../shared/data/corpus`` from the SmolLM2-135M teacher with the same data, schedule and
token budget (``--tokens``). The ways (``--ways``):

* ``kl``: forward KL on logits, temperature 1, live teacher (Minitron's recipe);
* ``kl+ce``: 0.5 forward KL + 0.5 cross-entropy on the labels;
* ``ce``: cross-entropy only (plain continued pre-training; no teacher in the loss);
* ``scratch+kl``: the same architecture from random init, forward KL;
* ``kl-topk``: forward KL to the teacher's cached top-64 logits (``teacher-cache --kind topk``);
* ``kl-sampled``: forward KL to 12 cached draws from the teacher per position
  (``teacher-cache --kind sampled``, Anshumann et al., ACL 2025).

``--sweep key=v1,v2,...`` runs every way once per value of a ``RecoverConfig`` key (e.g.
``lr``, ``global_batch_tokens``, ``data.seq_len``); ``--set key=value`` fixes one for all.

Every run is a plain ``recover`` with checkpoints, so a killed benchmark resumes
where it stopped: run the same command again (runs, checkpoints, caches and curves live under
``--workdir``, default ``~/.cache/minicompress/runs/recover_quality``; finished runs are
skipped). At every evaluation (``--eval-every`` steps, also a checkpoint) the student is
scored on the first 16,384 tokens of WikiText-2 test (windows of 512, the file as one
document, never trained on): perplexity and per-token KL(teacher || student); the held-out
corpus curves come from ``recover`` itself. After every evaluation the JSON and the PNG of
the whole benchmark are rewritten (``benchmarks/out/recover_quality-<tag>.{json,png}``), so a
partial run still has its curves. Prints a rich table.
"""

from __future__ import annotations

import os

os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import torch
from common import DATA, OUT, cpu_facts, versions
from rich.console import Console
from rich.table import Table

from minicompress.recipes import recover as recover_recipe
from minicompress.arch import count_parameters
from minicompress.checkpoint import latest_checkpoint, working_folder
from minicompress.config import (DataConfig, ModelConfig, RecoverConfig, SourceConfig, TeacherCacheConfig,
    build_config, parse_overrides, to_dict)
from minicompress.data.sources import bos_token_id, load_token_stream
from minicompress.evaluation.perplexity import eval_windows, evaluate_perplexity
from minicompress.hardware import describe_precision
from minicompress.distillation.metrics import held_out_kl_key, read_metrics
from minicompress.models import load_model
from minicompress.recipes.teacher_cache import write_teacher_cache

WORKDIR = Path("~/.cache/minicompress/runs/recover_quality").expanduser()

WAYS = {
    "kl": dict(loss=dict(kl_weight=1.0, ce_weight=0.0)),
    "kl+ce": dict(loss=dict(kl_weight=0.5, ce_weight=0.5)),
    "ce": dict(loss=dict(kl_weight=0.0, ce_weight=1.0)),
    "scratch+kl": dict(loss=dict(kl_weight=1.0, ce_weight=0.0), scratch=True),
    "kl-topk": dict(loss=dict(kl_weight=1.0, ce_weight=0.0), cache=dict(kind="topk", top_k=64)),
    "kl-sampled": dict(loss=dict(kl_weight=1.0, ce_weight=0.0), cache=dict(kind="sampled", samples=12)),
    # issue 16: the default loss on the corpus, on the teacher's own text (minicompress generate), and a mix
    "corpus": dict(loss=dict(kl_weight=0.5, ce_weight=0.5)),
    "gen": dict(loss=dict(kl_weight=0.5, ce_weight=0.5), generated=True),
    "gen-kl": dict(loss=dict(kl_weight=1.0, ce_weight=0.0), generated=True),
    "mix": dict(loss=dict(kl_weight=0.5, ce_weight=0.5), mix=True),
    "mix-kl": dict(loss=dict(kl_weight=1.0, ce_weight=0.0), mix=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="pruned student HF folder")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA / "corpus"))
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--wikitext-tokens", type=int, default=16384, help="WikiText-2 test tokens evaluated")
    p.add_argument("--tokens", default="1M", help="recovery budget per run (131072, 1M, 3M ...)")
    p.add_argument("--ways", default="kl,kl+ce,ce,scratch+kl", help=f"comma-separated of {', '.join(WAYS)}")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="RecoverConfig overrides for every run (lr=1e-3, data.seq_len=1024, ...)")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2", help="one run per value of a RecoverConfig key")
    p.add_argument("--eval-every", type=int, default=0,
                   help="optimizer steps between evaluations and checkpoints (0: 8 points per run)")
    p.add_argument("--held-out-tokens", type=int, default=8192, help="corpus tokens held out for the curves")
    p.add_argument("--generated", default=None,
                   help="output of minicompress generate (a sampled teacher cache + text.jsonl) for the gen/mix ways")
    p.add_argument("--mix-weight", type=float, default=0.5, help="corpus weight of the mix ways (generated: the rest)")
    p.add_argument("--tag", default=None, help="name of this benchmark (default: from tokens and sweep)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(WORKDIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", action="store_true", help="only print the table and redraw from the JSON")
    return p.parse_args()


def wikitext_windows(path: str, tokenizer, tokens: int, seq_len: int = 512):
    """First ``tokens`` tokens of the file as one document, non-overlapping windows."""
    stream = load_token_stream(DataConfig(source=path, seq_len=seq_len, max_tokens=tokens, shuffle=False,
                                          documents="file"), tokenizer)
    return eval_windows(stream, seq_len, bos_token_id=bos_token_id(tokenizer))


def corpus_held_out_windows(path: str, tokenizer, tokens: int, seed: int, seq_len: int = 512):
    """The corpus sequences ``recover`` holds out (the first ``ceil(tokens / seq_len)`` of the
    seeded shuffle): the same text in every way, never trained on (a mixture holds out the
    same rows of each source)."""
    from minicompress.data.rows import as_tensor, load_sequences

    n = -(-tokens // seq_len)
    rows = as_tensor(load_sequences(DataConfig(source=path, seq_len=seq_len, seed=seed), tokenizer)[:n])
    return [(row, row.numel() - 1) for row in rows]


def evaluate_wikitext(model, windows, teacher) -> dict:
    was_training = model.training
    model.eval()
    res = evaluate_perplexity(model, windows, teacher=teacher, batch_size=4, autocast="auto", show_progress=False)
    model.train(was_training)
    return {k: res[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement", "teacher_perplexity") if k in res}


def ensure_cache(spec: dict, args, tokenizer, teacher, seq_len: int, need_tokens: int, console: Console) -> Path:
    """The teacher cache of this kind covering ``need_tokens`` (built once, shared by runs)."""
    kind = spec["kind"]
    k = spec.get("top_k") if kind == "topk" else spec.get("samples")
    folder = Path(args.workdir) / "caches" / f"{Path(args.teacher).name}-{kind}{k}-seq{seq_len}-seed{args.seed}-{need_tokens}"
    if not (folder / "teacher_cache.json").is_file():
        console.log(f"building teacher cache {folder.name}")
        t0 = time.perf_counter()
        write_teacher_cache(TeacherCacheConfig(
            teacher=ModelConfig(source=args.teacher), data=DataConfig(source=args.data, seq_len=seq_len, seed=args.seed),
            tokens=need_tokens, micro_batch_size=4, output=str(folder), overwrite=True, **spec),
            teacher=teacher, tokenizer=tokenizer)
        console.log(f"cache {folder.name}: {need_tokens / (time.perf_counter() - t0):.0f} tok/s")
    return folder


def scratch_folder(args, student_source: str) -> Path:
    """The student's architecture at a seeded random init, saved once (so runs resume)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(args.workdir) / f"scratch-{Path(student_source).name}-seed{args.seed}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_source), dtype=torch.float32)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(student_source).save_pretrained(folder)
    return folder


def run_name(way: str, sweep_key: str | None, value: str | None) -> str:
    name = way.replace("+", "_")
    return f"{name}-{sweep_key.replace('.', '_')}{value}" if sweep_key else name


def target_factor(student_parameters: int, teacher_parameters: int) -> float:
    """Issue 9's target: within 1.2x the teacher's perplexity at 70% of its size, 1.5x at 50%."""
    return 1.2 if student_parameters >= 0.6 * teacher_parameters else 1.5


def plot(results: dict, teacher_ppl: float, path: Path, title: str, target: float = 1.5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, res in results.items():
        curve = res["wikitext_curve"]
        held = [r for r in res["metrics"] if "eval_perplexity" in r]
        kl_key = held_out_kl_key(held)
        axes[0].plot([r["tokens"] for r in curve], [r["perplexity"] for r in curve], marker="o", label=name)
        axes[1].plot([r["tokens"] for r in curve], [r["kl_to_teacher"] for r in curve], marker="o", label=name)
        if kl_key:
            axes[2].plot([r["tokens"] for r in held if kl_key in r], [r[kl_key] for r in held if kl_key in r],
                         marker=".", label=f"{name} ({kl_key[5:]})")
    axes[0].axhline(teacher_ppl, color="k", ls="--", lw=1, label=f"teacher {teacher_ppl:.1f}")
    axes[0].axhline(target * teacher_ppl, color="gray", ls=":", lw=1, label=f"{target}x teacher (target)")
    axes[0].set(title="WikiText-2 test perplexity (16k tokens)", xlabel="tokens", yscale="log")
    axes[1].set(title="WikiText-2 KL(teacher || student)", xlabel="tokens", yscale="log")
    axes[2].set(title="held-out corpus KL (as trained against)", xlabel="tokens", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(record: dict, console: Console) -> None:
    teacher_ppl = record["teacher_wikitext_perplexity"]
    table = Table(title=f"Recovery quality ({record['tag']}); teacher WikiText-2 ppl {teacher_ppl:.2f}")
    for col in ("run", "tokens", "done", "WikiText ppl", "x teacher", "KL", "top-1", "held-out KL", "tok/s", "min"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, res in record["runs"].items():
        last = res["wikitext_curve"][-1] if res["wikitext_curve"] else None
        held = [r for r in res["metrics"] if any(k.endswith("kl_to_teacher") for k in r)]
        held_kl = next((v for k, v in held[-1].items() if k.endswith("kl_to_teacher")), None) if held else None
        table.add_row(name, f"{res['tokens_planned']:,}", f"{(last or {}).get('tokens', 0):,}",
                      f"{last['perplexity']:,.1f}" if last else "-",
                      f"{last['perplexity'] / teacher_ppl:.2f}" if last else "-",
                      f"{last['kl_to_teacher']:.3f}" if last else "-",
                      f"{last.get('top1_agreement', 0):.3f}" if last else "-",
                      f"{held_kl:.3f}" if held_kl is not None else "-",
                      f"{res.get('train_tokens_per_s') or 0:.0f}", f"{(res.get('seconds') or 0) / 60:.1f}")
    console.print(table)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    console = Console(width=170)
    tokens = build_config(RecoverConfig, overrides={"tokens": args.tokens, "loss": {"kl_weight": 0, "ce_weight": 1}}).tokens
    sweep_key, sweep_values = (None, [None])
    if args.sweep:
        sweep_key, _, values = args.sweep.partition("=")
        sweep_values = [v for v in values.split(",") if v]
    tag = args.tag or f"{Path(args.student).name}-{tokens}" + (f"-{sweep_key}" if sweep_key else "")
    out_json = OUT / f"recover_quality-{tag}.json"
    if args.render:
        record = json.loads(out_json.read_text())
        render(record, console)
        plot(record["runs"], record["teacher_wikitext_perplexity"], out_json.with_suffix(".png"), record["title"],
             target_factor(record["student_parameters"], record["teacher_parameters"]))
        return
    base_dir = Path(args.workdir) / tag
    base_dir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_facts()
    machine = {"cpu": cpu["model"], "avx512_bf16": cpu["avx512_bf16"], "amx_bf16": cpu["amx_bf16"],
               "threads": args.threads, "torch": torch.__version__, "cpu_facts": cpu, "versions": versions()}

    teacher, tokenizer = load_model(args.teacher)
    precision = describe_precision("auto", "cpu")
    if precision["resolved"] == "bfloat16":
        teacher = teacher.to(torch.bfloat16)  # what recover's teacher_dtype=auto does
    windows = wikitext_windows(args.wikitext, tokenizer, args.wikitext_tokens)
    corpus_windows = corpus_held_out_windows(args.data, tokenizer, args.held_out_tokens, args.seed)
    student0, _ = load_model(args.student)
    base = evaluate_wikitext(student0, windows, teacher)
    corpus_base = evaluate_wikitext(student0, corpus_windows, teacher)
    teacher_ppl = base.pop("teacher_perplexity")
    console.log(f"teacher WikiText-2 ppl {teacher_ppl:.2f}; pruned student {base}")
    student_params = count_parameters(student0.config)["total"]
    del student0

    results: dict = {}
    record = {"tag": tag, "date": dt.date.today().isoformat(), "argv": sys.argv, "machine": machine,
              "precision": precision, "teacher": args.teacher, "student": args.student,
              "student_parameters": student_params, "teacher_parameters": count_parameters(teacher.config)["total"],
              "teacher_wikitext_perplexity": teacher_ppl, "wikitext_scored_tokens": sum(n for _, n in windows),
              "pruned_wikitext": base, "pruned_corpus_held_out": corpus_base,
              "teacher_corpus_perplexity": corpus_base.get("teacher_perplexity"), "runs": results,
              "title": f"{Path(args.student).name}: recovery at {tokens:,} tokens ({tag})"}

    def save_record() -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(record, indent=2) + "\n")
        plot(results, teacher_ppl, out_json.with_suffix(".png"), record["title"],
             target_factor(record["student_parameters"], record["teacher_parameters"]))

    for way in args.ways.split(","):
        spec = WAYS[way]
        for value in sweep_values:
            name = run_name(way, sweep_key, value)
            overrides = parse_overrides(args.set + ([f"{sweep_key}={value}"] if sweep_key else []))
            source = str(scratch_folder(args, args.student)) if spec.get("scratch") else args.student
            output = base_dir / name
            overrides = {**overrides, "loss": {**spec["loss"], **overrides.get("loss", {})},
                         "student": {"source": source}, "teacher": {"source": args.teacher},
                         "data": {**overrides.get("data", {}), "source": args.data, "seed": args.seed},
                         "tokens": tokens, "eval_tokens": args.held_out_tokens, "seed": args.seed,
                         "output": str(output), "resume": True}
            cfg = build_config(RecoverConfig, overrides=overrides)
            eval_every = args.eval_every or max(tokens // cfg.global_batch_tokens // 8, 1)
            cfg = dataclasses.replace(cfg, eval_every=eval_every, save_every=eval_every)
            if spec.get("generated") or spec.get("mix"):
                if not args.generated:
                    raise SystemExit(f"--generated: the {way} way needs the folder minicompress generate wrote")
            if spec.get("generated"):
                cfg = dataclasses.replace(cfg, teacher=None, teacher_cache=args.generated,
                                          loss=dataclasses.replace(cfg.loss, kind="sampled_kl"))
            if spec.get("mix"):
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=None, mixture=(
                    SourceConfig(args.data, args.mix_weight),
                    SourceConfig(str(Path(args.generated) / "text.jsonl"), 1 - args.mix_weight))))
            if spec.get("cache"):
                cache = ensure_cache(spec["cache"], args, tokenizer, teacher, cfg.data.seq_len,
                                     tokens + args.held_out_tokens + cfg.data.seq_len, console)
                cfg = dataclasses.replace(cfg, teacher=None, teacher_cache=str(cache),
                                          loss=dataclasses.replace(cfg.loss, kind="topk_kl"))
            curve_path = base_dir / f"{name}.wikitext.jsonl"
            res = results[name] = {"way": way, "sweep": {sweep_key: value} if sweep_key else {},
                                   "config": to_dict(cfg), "tokens_planned": tokens, "wikitext_curve": [],
                                   "metrics": []}
            if (output / "minicompress.json").is_file():  # finished earlier
                rec = json.loads((output / "minicompress.json").read_text())["recovery"]
                res.update(seconds=rec["seconds"], train_tokens_per_s=rec["tokens_trained"] / max(rec["seconds"], 1e-9),
                           metrics=read_metrics(output / "metrics.jsonl"), wikitext_curve=read_metrics(curve_path))
                console.log(f"{name}: finished earlier, skipped")
                save_record()
                continue
            work = working_folder(output)
            ckpt = latest_checkpoint(work) if work.exists() else None
            done_tokens = json.loads((ckpt / "state.json").read_text())["tokens"] if ckpt else 0
            curve = [r for r in read_metrics(curve_path) if r["tokens"] <= done_tokens]
            if not curve:
                curve = [{"tokens": 0, **base, **{f"corpus_{k}": v for k, v in corpus_base.items()
                                                   if k != "teacher_perplexity"}}] if not spec.get("scratch") else []
            curve_path.write_text("".join(json.dumps(r) + "\n" for r in curve))
            res["wikitext_curve"] = curve
            state = {"student": None}

            def callback(step_record: dict, name=name, curve_path=curve_path, res=res, output=output) -> None:
                res["metrics"] = read_metrics(working_folder(output) / "metrics.jsonl")
                if not any(k.startswith("eval_") for k in step_record):
                    return
                point = {"tokens": step_record["tokens"], **evaluate_wikitext(state["student"], windows, teacher)}
                point.pop("teacher_perplexity", None)
                held = evaluate_wikitext(state["student"], corpus_windows, teacher)
                point.update({f"corpus_{k}": v for k, v in held.items() if k != "teacher_perplexity"})
                res["wikitext_curve"].append(point)
                with curve_path.open("a") as f:
                    f.write(json.dumps(point) + "\n")
                res["seconds"] = step_record.get("elapsed_s")
                res["train_tokens_per_s"] = step_record["tokens"] / max(step_record.get("elapsed_s") or 1e-9, 1e-9)
                save_record()
                console.log(f"{name} @ {point['tokens']:,}: WikiText ppl {point['perplexity']:.1f} "
                            f"({point['perplexity'] / teacher_ppl:.2f}x), KL {point['kl_to_teacher']:.3f}, "
                            f"{res['train_tokens_per_s']:.0f} tok/s")

            student, _ = load_model(cfg.student, for_training=True)
            if spec.get("scratch") and not curve:
                point = {"tokens": 0, **evaluate_wikitext(student, windows, teacher)}
                point.pop("teacher_perplexity", None)
                curve.append(point)
                curve_path.write_text(json.dumps(point) + "\n")
            state["student"] = student
            console.log(f"{name}: {'resuming at ' + format(done_tokens, ',') if done_tokens else 'starting'}"
                        f" ({tokens:,} tokens, eval every {eval_every} steps)")
            t0 = time.perf_counter()
            rec = recover_recipe.recover(cfg, student=student,
                                         teacher=None if spec.get("cache") or spec.get("generated") else teacher,
                                  tokenizer=tokenizer, callback=callback)
            res.update(seconds=rec["seconds"], train_tokens_per_s=rec["tokens_per_s"], metrics=rec["metrics"])
            console.log(f"{name}: done in {(time.perf_counter() - t0) / 60:.1f} min")
            save_record()
            del student, state["student"]

    save_record()
    render(record, console)
    console.log(f"wrote {out_json} and {out_json.with_suffix('.png')}")


if __name__ == "__main__":
    main()

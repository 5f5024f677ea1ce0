"""Issue 30: what each recovery token teaches, variants x tokens, from ``recover_quality.py`` runs.

Every variant is one ``benchmarks/recover_quality.py`` run on the Quickstart's student
(SmolLM2-135M pruned to 576/9/3/768/18) at the same total token budget: the plain default,
Minitron's intermediate-state loss (``--sweep loss.intermediate_weight=...``), a blockwise
stage first (``--sweep blockwise_tokens=...``; its tokens come out of the same budget) and
a repaired start (``minicompress prune --repair ...`` as ``--student``). This script reads
their JSON records (``benchmarks/out/recover_quality-<tag>.json``), puts every evaluation
point on one axis of *total* recovery tokens (a blockwise run's global-stage points are
shifted by its blockwise tokens), prints one table (WikiText-2 perplexity, KL to the
teacher and top-1 agreement on its first 16,384 test tokens; the held-out corpus' perplexity
and KL) and writes it as JSON and as a plot of WikiText-2 perplexity against tokens.

    python benchmarks/recover_signal.py --runs benchmarks/results/recover_quality-sig-61k-s0.json ... \\
        --output benchmarks/results/signal-61k.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import OUT, print_table, write_json


def variant(name: str, run: dict, record: dict) -> str:
    """A readable name: the student's repair (if any), then the swept setting."""
    student = Path(record["student"]).name
    sweep = ", ".join(f"{k}={v}" for k, v in run.get("sweep", {}).items())
    return " ".join(x for x in (student, sweep or run.get("way", name)) if x)


def points(run: dict) -> list[dict]:
    """The run's evaluation points with ``tokens`` counted over both stages."""
    shift = (run.get("config") or {}).get("blockwise_tokens") or 0
    out = []
    for point in run["wikitext_curve"]:
        moved = dict(point)
        if moved["tokens"]:
            moved["tokens"] += shift
        out.append(moved)
    return out


def rows_of(records: list[dict]) -> list[dict]:
    rows = []
    for record in records:
        for name, run in record["runs"].items():
            curve = points(run)
            if not curve:
                continue
            last = curve[-1]
            rows.append({"variant": variant(name, run, record), "seed": (run.get("config") or {}).get("seed"),
                         "tokens": last["tokens"], "tokens_planned": run.get("tokens_planned"),
                         "finished": last["tokens"] >= (run.get("tokens_planned") or 0),
                         "start_wikitext": curve[0]["perplexity"] if curve[0]["tokens"] == 0 else None,
                         "wikitext": last["perplexity"], "kl": last["kl_to_teacher"], "top1": last["top1_agreement"],
                         "corpus": last.get("corpus_perplexity"), "corpus_kl": last.get("corpus_kl_to_teacher"),
                         "curve": [(p["tokens"], p["perplexity"]) for p in curve],
                         "source": record["tag"], "machine": record["machine"]["cpu"],
                         "avx512_bf16": record["machine"]["avx512_bf16"], "amx_bf16": record["machine"]["amx_bf16"],
                         "date": record["date"]})
    return rows


def plot(rows: list[dict], teacher: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        xs, ys = zip(*[(t, p) for t, p in row["curve"] if t > 0]) if len(row["curve"]) > 1 else ((), ())
        ax.plot(xs, ys, marker="o", label=f"{row['variant']} (seed {row['seed']})")
    ax.axhline(teacher, color="black", linestyle="--", label=f"teacher {teacher:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("recovery tokens (all stages)")
    ax.set_ylabel("WikiText-2 perplexity (first 16,384 test tokens)")
    ax.set_title("issue 30: the distillation signal on the Quickstart student")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="recover_quality JSON records")
    p.add_argument("--output", default=str(OUT / "recover_signal.json"))
    args = p.parse_args()
    records = [json.loads(Path(f).read_text()) for f in args.runs]
    rows = rows_of(records)
    rows.sort(key=lambda r: (r["tokens_planned"] or 0, r["wikitext"]))
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    print_table("recovery signal: variants at equal total tokens (WikiText-2: first 16,384 test tokens)",
                ["variant", "seed", "tokens", "start", "WikiText-2", "KL", "top-1", "corpus", "corpus KL", "done"],
                [[r["variant"], r["seed"], f"{r['tokens']:,}", fmt(r["start_wikitext"], ",.1f"),
                  fmt(r["wikitext"], ",.1f"), fmt(r["kl"], ".3f"), fmt(r["top1"], ".3f"), fmt(r["corpus"], ",.1f"),
                  fmt(r["corpus_kl"], ".3f"), "yes" if r["finished"] else "no"] for r in rows])
    out = write_json(args.output, {"rows": rows, "teacher_wikitext": records[0]["teacher_wikitext_perplexity"],
                                   "runs": args.runs})
    plot(rows, records[0]["teacher_wikitext_perplexity"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()

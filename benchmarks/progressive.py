"""One shot vs progressive: SmolLM2-135M to ~45% directly, or through ~70% first (issue 10).

Both arms run ``minicompress.run`` (the same code as ``minicompress run CONFIG.yaml``) with
the same final shape, the same total recovery budget (``--tokens``) and the same recipe:

* ``one-shot``: prune the original to 576/9/3/640/16 (0.447 of the parameters), recover
  with all ``--tokens``;
* ``two-stage``: prune to 576/9/3/1088/24 (0.704), recover with half the tokens, prune that
  to 576/9/3/640/16, recover with the other half; the teacher of both stages is the
  original model (Minitron's finding).

Each arm's run folder (under ``--workdir``, default ``~/.cache/minicompress/runs/progressive``)
resumes where it stopped when the script is run again. The final models are compared on the
first 16,384 tokens of WikiText-2 test (windows of 512, never trained on): perplexity, KL to
the original and top-1 agreement; the run reports of both arms are kept. Prints a rich
table; writes ``benchmarks/out/progressive.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")

import argparse
import logging
import time
from pathlib import Path

import common
import torch
from common import DATA, make_console, run_record, table, write_json

from minicompress.config import build_config, RunConfig
from minicompress.recipes.run import run

OUT = common.OUT / "progressive.json"
WORKDIR = Path("~/.cache/minicompress/runs/progressive").expanduser()

FINAL = {"intermediate_size": 640, "num_hidden_layers": 16}
MIDDLE = {"intermediate_size": 1088, "num_hidden_layers": 24}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=262144, help="total recovery tokens of each arm")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recover.* overrides for both arms")
    p.add_argument("--num-samples", type=int, default=64, help="calibration samples of each prune")
    p.add_argument("--workdir", default=str(WORKDIR))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(OUT))
    return p.parse_args()


def arm_config(name: str, args) -> RunConfig:
    half = args.tokens // 2
    stages = [{"name": "45pct", "target": FINAL, "tokens": args.tokens}] if name == "one-shot" else [
        {"name": "70pct", "target": MIDDLE, "tokens": half},
        {"name": "45pct", "target": FINAL, "tokens": args.tokens - half, "teacher": "original"}]
    recover = {"eval_tokens": 8192}
    for item in args.set:
        key, _, value = item.partition("=")
        recover[key] = value
    return build_config(RunConfig, overrides={
        "model": {"source": "smollm2-135m"},
        "data": {"source": str(DATA / "corpus"), "seq_len": 512},
        "eval_data": {"source": str(DATA / "wikitext2" / "test.txt"), "seq_len": 512, "max_tokens": 16384},
        "output": str(Path(args.workdir) / name),
        "score": {"num_samples": args.num_samples, "loss_samples": 0},
        "recover": recover,
        "stages": stages,
    })


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    console = make_console()
    results = {}
    for name in ("one-shot", "two-stage"):
        t0 = time.perf_counter()
        result = run(arm_config(name, args))
        final = result["report"]["rows"][-1]
        results[name] = {"final": final, "report": result["report"], "stages": result["stages"],
                         "wall_s": time.perf_counter() - t0}
        console.log(f"{name}: {final}")
    original = results["one-shot"]["report"]["rows"][0]
    record = run_record(tokens_per_arm=args.tokens, original=original, arms=results)
    out = write_json(args.output, record)
    rows = []
    for name, res in [("original", {"final": original, "wall_s": 0})] + list(results.items()):
        row = res["final"]
        rows.append((name, f"{row.get('parameters', 0):,}", f"{row.get('perplexity') or 0:.2f}",
                     f"{(row.get('perplexity') or 0) / original['perplexity']:.2f}",
                     f"{row['kl_to_original']:.3f}" if row.get("kl_to_original") is not None else "-",
                     f"{row['top1_agreement']:.3f}" if row.get("top1_agreement") is not None else "-",
                     f"{res['wall_s'] / 60:.1f}"))
    console.print(table(f"SmolLM2-135M to 0.447: one shot vs two stages, {args.tokens:,} recovery tokens each",
                        ("arm", "parameters", "WikiText-2 ppl", "x original", "KL to original", "top-1", "wall min"),
                        rows))
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Teacher correction's learning rate (issue 29): the corrected SmolLM2 teacher at each lr.

Teacher correction (Minitron, Sreenivas et al., arXiv 2408.11796) fine-tunes the unpruned
teacher on the distillation text before pruning. For the ``smollm2-135m`` teacher this
script runs ``minicompress correct`` on ``../shared/data/corpus`` for ``--tokens`` at every
peak learning rate of ``--lrs`` and reports the corrected teacher's perplexity

* on the corpus rows ``correct`` holds out (its ``correction.metrics_before`` / ``_after``:
  the same rows for every lr, never trained on), the domain it is corrected towards;
* on the first ``--wikitext-tokens`` (16,384) tokens of WikiText-2 test (windows of 512, the
  file as one document, never trained on), with KL(original || corrected) and top-1
  agreement there: how much the teacher forgot or drifted.

The first row is the uncorrected teacher. Every run is a plain ``correct`` with checkpoints
under ``--workdir`` (default ``~/.cache/minicompress/runs/correct_lr``): a killed benchmark
resumes where it stopped when run again, and finished runs are skipped. Prints a rich table
and writes the JSON to ``benchmarks/results/correct_lr-<tag>.json``.

    python benchmarks/correct_lr.py --tokens 1M --lrs 3e-6,1e-5,3e-5,1e-4
"""

from __future__ import annotations

import os

os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")

import argparse
import logging
from pathlib import Path

from common import DATA, ROOT, make_console, print_table, run_record, write_json

WORKDIR = Path("~/.cache/minicompress/runs/correct_lr").expanduser()
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m", help="the teacher to correct (default smollm2-135m)")
    p.add_argument("--data", default=str(DATA / "corpus"), help="the distillation text (default the shared corpus)")
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--wikitext-tokens", type=int, default=16384, help="WikiText-2 test tokens evaluated")
    p.add_argument("--tokens", default="1M", help="correction budget per lr (8k, 262144, 1M ...)")
    p.add_argument("--lrs", default="3e-6,1e-5,3e-5,1e-4", help="comma-separated peak learning rates")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384, help="corpus tokens correct holds out")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="CorrectConfig overrides for every run (global_batch_tokens=8192, autocast=none, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(WORKDIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="name of this benchmark (default: from the tokens)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/correct_lr-<tag>.json)")
    return p.parse_args()


def correct_config(args, lr: float, output: Path | None = None):
    """The ``CorrectConfig`` of one lr: the flags here, then ``--set`` on top."""
    from minicompress.config import CorrectConfig, build_config

    items = [f"teacher.source={args.teacher}", f"data.source={args.data}", f"data.seq_len={args.seq_len}",
             f"tokens={args.tokens}", f"lr={lr!r}", f"eval_tokens={args.eval_tokens}", f"seed={args.seed}",
             "save_every=16", f"output={output}" if output else "output=unused"]
    return build_config(CorrectConfig, overrides=items + list(args.set))


def correct_once(args, lr: float, folder: Path) -> dict:
    """``correct`` at ``lr`` into ``folder`` (resumed when killed, skipped when finished);
    returns its ``correction`` record."""
    import dataclasses

    from minicompress.checkpoint import latest_checkpoint, working_folder
    from minicompress.outputs import read_provenance
    from minicompress.recipes.correct import correct

    if read_provenance(folder) is None:
        config = correct_config(args, lr, folder)
        correct(dataclasses.replace(config, resume=latest_checkpoint(working_folder(folder)) is not None))
    return read_provenance(folder)["correction"]


def wikitext(model, windows, teacher) -> dict:
    """Perplexity (and KL / top-1 agreement to the original) on the WikiText-2 windows."""
    from minicompress.evaluation.perplexity import evaluate_perplexity

    res = evaluate_perplexity(model, windows, teacher=teacher, batch_size=4, autocast="auto", show_progress=False)
    return {k: res[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement") if k in res}


def main() -> None:
    args = parse_args()
    import torch

    from minicompress.config import DataConfig, ModelConfig
    from minicompress.evaluation.perplexity import text_windows
    from minicompress.models import load_model

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    tokens = correct_config(args, lrs[0]).tokens  # "8k", "1M": as the command line reads them
    tag = args.tag or f"{tokens}"
    teacher, tokenizer = load_model(ModelConfig(source=args.teacher))
    windows = text_windows(DataConfig(source=args.wikitext, seq_len=512, max_tokens=args.wikitext_tokens,
                                      shuffle=False, documents="file"), tokenizer, flag="--wikitext")
    rows = [{"name": "teacher", "lr": None, "tokens": 0, "corpus_perplexity": None, **{
        f"wikitext_{k}": v for k, v in wikitext(teacher, windows, None).items()}}]
    for lr in lrs:
        folder = Path(args.workdir) / f"{Path(args.teacher).name}-lr{lr:g}-{tokens}-seed{args.seed}"
        record = correct_once(args, lr, folder)
        rows[0]["corpus_perplexity"] = record["metrics_before"].get("perplexity")  # the same rows every lr
        model, _ = load_model(ModelConfig(source=str(folder)))
        rows.append({"name": folder.name, "lr": lr, "tokens": record["tokens_trained"],
                     "corpus_perplexity": record["metrics_after"].get("perplexity"),
                     **{f"wikitext_{k}": v for k, v in wikitext(model, windows, teacher).items()},
                     "seconds": record["seconds"], "tokens_per_s": record["tokens_per_s"], "folder": str(folder)})
        del model
    result = run_record(teacher=args.teacher, data=args.data, wikitext=args.wikitext,
                        wikitext_tokens=args.wikitext_tokens, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                        overrides=args.set, rows=rows)
    out = write_json(args.output or RESULTS / f"correct_lr-{tag}.json", result)

    def cell(value, spec=",.2f"):
        return "" if value is None else format(value, spec)

    print_table(f"teacher correction of {args.teacher} on {Path(args.data).name}, {tokens:,} tokens per lr",
                ("run", "lr", "tokens", "corpus held-out ppl", "WikiText-2 ppl", "KL to original", "top-1",
                 "seconds", "tok/s"),
                [(r["name"], cell(r["lr"], "g"), cell(r["tokens"], ","), cell(r["corpus_perplexity"]),
                  cell(r.get("wikitext_perplexity")), cell(r.get("wikitext_kl_to_teacher"), ".4f"),
                  cell(r.get("wikitext_top1_agreement"), ".3f"), cell(r.get("seconds"), ",.0f"),
                  cell(r.get("tokens_per_s"), ",.0f")) for r in rows], console=make_console())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

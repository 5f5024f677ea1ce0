"""The pruned student as a speculative-decoding draft of SmolLM2-135M: acceptance rate and speedup.

Speculative decoding (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318)
through transformers' assisted generation, measured by
:func:`minicompress.evaluation.draft.measure_draft`: for each draft (``--drafts PATH...``,
default the 50% pruned student ``~/.cache/minicompress/runs/students/smollm2-50-searched``)
and each proposal setting, every prompt is decoded greedily by the teacher alone and then
with the draft (batch 1), back to back, under the precision eval uses (bf16 autocast where
the CPU has native bf16). Prompts are ``--prompts`` runs of ``--prompt-tokens`` tokens at
evenly spaced places of the WikiText-2 test set, as in ``minicompress eval --draft`` with
its defaults (results recorded before issue 28 used the starts of evenly spaced 1024-token
windows instead).

A proposal setting is ``constant:K`` (K draft tokens every round), ``heuristic:K``
(start at K, +2 after a fully accepted round, -1 otherwise) or ``default`` (transformers
5's own default: 20 tokens, constant, and a confidence threshold of 0.4 that ends a round
early; with scikit-learn installed transformers moves that threshold after every round).
``--ablations`` runs ``constant:1..6``, ``heuristic:5`` and ``default``, the comparison behind
``EvalConfig.draft_tokens``; ``--with-self`` adds the teacher as its own draft (every token
accepted: the best case of the mechanism's overhead).

Reported per row: acceptance rate (accepted / proposed draft tokens, counted exactly from
transformers' candidate generator), accepted draft tokens and new tokens per teacher
forward, tokens/s of the plain and the assisted decode, speedup (plain / assisted wall
time), and whether every assisted output equals the plain greedy one.

Timings are wall-clock on whatever else shares the CPU (the load average is recorded);
each row has its own interleaved plain decodes, so the speedup compares like with like.

Run: ``python benchmarks/draft.py [--drafts PATH ...] [--ablations] [--threads 2]``
(defaults: 8 prompts x 64 new tokens, about 2 minutes per row on 2 idle cores).
Prints a rich table; writes ``benchmarks/out/draft.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import DATA, OUT, load_average, print_table, run_record, write_json

WIKITEXT = DATA / "wikitext2" / "test.txt"
STUDENT = Path("~/.cache/minicompress/runs/students/smollm2-50-searched").expanduser()
ABLATIONS = ("constant:1", "constant:2", "constant:3", "constant:4", "constant:5", "constant:6", "heuristic:5",
             "default")


def parse_setting(text: str) -> dict:
    """``constant:K`` / ``heuristic:K`` / ``default`` as ``DraftSettings`` keyword arguments."""
    if text == "default":
        return {"num_assistant_tokens": 20, "schedule": "constant", "confidence_threshold": 0.4}
    schedule, _, k = text.partition(":")
    if schedule not in ("constant", "heuristic") or not k.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected constant:K, heuristic:K or default")
    return {"num_assistant_tokens": int(k), "schedule": schedule, "confidence_threshold": 0.0}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    from minicompress.config import DRAFT_TOKENS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m", help="the model drafted for (default smollm2-135m)")
    parser.add_argument("--drafts", nargs="+", default=[str(STUDENT)], metavar="PATH",
                        help=f"draft model folders (default: {STUDENT})")
    parser.add_argument("--with-self", action="store_true", help="also the teacher as its own draft")
    parser.add_argument("--data", default=str(WIKITEXT), help="text the prompts come from (default: WikiText-2 test)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=[f"constant:{DRAFT_TOKENS}"], metavar="SETTING",
                        help=f"proposal settings: constant:K, heuristic:K, default (default: constant:{DRAFT_TOKENS})")
    parser.add_argument("--ablations", action="store_true", help=f"settings {' '.join(ABLATIONS)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights of both models (default float32, as eval loads them)")
    parser.add_argument("--autocast", default="auto", choices=("auto", "none", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=str(OUT / "draft.json"))
    args = parser.parse_args(argv)
    settings = list(ABLATIONS) if args.ablations else args.settings
    for text in settings:
        parse_setting(text)  # fail before loading anything

    import torch

    from minicompress.config import DataConfig, ModelConfig
    from minicompress.evaluation.perplexity import parameter_summary
    from minicompress.hardware import resolve_autocast
    from minicompress.models import load_for_flag
    from minicompress.data.sources import bos_token_id, load_token_stream
    from minicompress.evaluation.draft import DraftSettings, check_draft, draft_prompts, measure_draft

    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # transformers' own deprecation notices from inside assisted generation
    teacher, tokenizer = load_for_flag(ModelConfig(source=args.teacher, dtype=args.dtype), "--teacher")
    drafts = [(path, *load_for_flag(ModelConfig(source=path, dtype=args.dtype), "--drafts")) for path in args.drafts]
    for path, draft, draft_tokenizer in drafts:
        check_draft(teacher, tokenizer, draft, draft_tokenizer, flag=f"--drafts {path}")
    if args.with_self:
        drafts.append(("(the teacher itself)", teacher, tokenizer))
    stream = load_token_stream(DataConfig(source=args.data, shuffle=False, documents="file"), tokenizer)
    prompts = draft_prompts(stream, args.prompts, args.prompt_tokens, bos_token_id(tokenizer), flag="--prompts")
    from transformers.utils import is_sklearn_available

    adaptive = is_sklearn_available()  # transformers then moves the confidence threshold of "default"
    record = run_record(teacher=args.teacher, teacher_parameters=parameter_summary(teacher)["total"],
                        precision=resolve_autocast(args.autocast, "cpu"), weights=args.dtype,
                        threads=torch.get_num_threads(), data=args.data, prompts=args.prompts,
                        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                        confidence_threshold_adaptive=adaptive, rows=[])
    started = time.perf_counter()
    for path, draft, _ in drafts:
        for text in settings:
            row = {"draft": path, "draft_parameters": parameter_summary(draft)["total"], "setting": text,
                   **measure_draft(teacher, draft, prompts, new_tokens=args.new_tokens, autocast=args.autocast,
                                   settings=DraftSettings(**parse_setting(text))),
                   "load_average": load_average()}
            record["rows"].append(row)
            print(f"{path} {text}: acceptance {row['acceptance_rate']:.3f}, speedup {row['speedup']:.3f}, "
                  f"{row['assisted_tokens_per_s']:.1f} vs {row['plain_tokens_per_s']:.1f} tok/s", flush=True)
    record["seconds"] = time.perf_counter() - started
    print_table(f"{args.teacher} greedy with a draft: {args.prompts} prompts of {args.prompt_tokens} tokens, "
                f"{args.new_tokens} new tokens ({record['precision']}, {record['threads']} threads)",
                ["draft", "setting", "acceptance", "accepted / fwd", "tokens / fwd", "teacher fwds", "plain tok/s",
                 "assisted tok/s", "speedup", "identical"],
                [[Path(r["draft"]).name or r["draft"], r["setting"], f"{r['acceptance_rate']:.3f}",
                  f"{r['accepted_per_forward']:.2f}", f"{r['tokens_per_forward']:.2f}",
                  f"{r['teacher_forwards']} / {r['plain_teacher_forwards']}", f"{r['plain_tokens_per_s']:.1f}",
                  f"{r['assisted_tokens_per_s']:.1f}", f"{r['speedup']:.3f}",
                  f"{r['identical_prompts']}/{r['prompts']}"] for r in record["rows"]], left=2)
    path = write_json(Path(args.output), record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

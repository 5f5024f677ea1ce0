"""Scoring overhead: calibration forward with importance hooks vs a plain forward.

Same model (SmolLM2-135M), same calibration batches from ``../shared/data/corpus``, one
process; plain and hooked passes alternate batch by batch so machine noise hits both
alike. Target: hooks add at most 15%. Prints a rich table and writes
``benchmarks/out/scoring_overhead.json``.

Run: ``python benchmarks/scoring_overhead.py [--batches 6 --batch-size 4 --seq-len 512]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import DATA, OUT, print_table, run_record, write_json

from minicompress.data.rows import calibration_batches
from minicompress.config import DataConfig, ScoreConfig
from minicompress.models import load_model
from minicompress.pruning.scoring import ActivationScorer



@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on shared cores)")
    parser.add_argument("--output", default=str(OUT / "scoring_overhead.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    cfg = ScoreConfig(data=DataConfig(source=str(DATA / "corpus"), seq_len=args.seq_len),
                      num_samples=args.batches * args.batch_size, batch_size=args.batch_size, layer_scores=False)
    batches, _ = calibration_batches(cfg, tokenizer)
    scorer = ActivationScorer(model)
    model.model(input_ids=batches[0][:1], use_cache=False)  # warm-up
    plain, hooked = [], []
    for i, ids in enumerate(batches):
        order = ("plain", "hooked") if i % 2 == 0 else ("hooked", "plain")
        for kind in order:
            t = time.perf_counter()
            if kind == "plain":
                model.model(input_ids=ids, use_cache=False)
                plain.append(time.perf_counter() - t)
            else:
                with scorer.attached():
                    model.model(input_ids=ids, use_cache=False)
                hooked.append(time.perf_counter() - t)
    tokens = args.batch_size * args.seq_len
    result = {
        "model": args.model, "batches": len(batches), "tokens_per_batch": tokens,
        "plain_s_median": statistics.median(plain), "hooked_s_median": statistics.median(hooked),
        "plain_tokens_per_s": tokens / statistics.median(plain),
        "hooked_tokens_per_s": tokens / statistics.median(hooked),
        "overhead": statistics.median(hooked) / statistics.median(plain) - 1,
        "overhead_total": sum(hooked) / sum(plain) - 1,
        "per_batch_ratio": [h / p for h, p in zip(hooked, plain)],
    }
    print_table(f"Scoring overhead on {args.model}: {len(batches)} batches x {tokens} tokens",
                ("pass", "median s/batch", "tokens/s"),
                [("plain forward", f"{result['plain_s_median']:.3f}", f"{result['plain_tokens_per_s']:,.0f}"),
                 ("with importance hooks", f"{result['hooked_s_median']:.3f}", f"{result['hooked_tokens_per_s']:,.0f}"),
                 ("overhead (median / total)", f"{result['overhead']:+.1%}", f"{result['overhead_total']:+.1%}")],
                left=0)
    write_json(args.output, run_record(**result))


if __name__ == "__main__":
    main()

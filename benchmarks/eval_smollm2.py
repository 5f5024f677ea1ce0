"""WikiText-2 perplexity and speed of SmolLM2-135M and Gemma-3-270M in float32 and bfloat16.

One process, side by side: for each model, float32 weights, bfloat16 weights, and float32
weights under bfloat16 autocast, on the WikiText-2 test set (``../shared/data/wikitext2/
test.txt``, whole file as one document, non-overlapping windows of ``--seq-len``), with
eval throughput and prefill/decode tokens/s (batch 1, KV cache). Extra SmolLM2 rows use
the peers' anchor protocol (first 16,384 tokens, 32 windows of 512; the anchor quotes
28.15 with bf16 autocast) so the two protocols can be compared.

Usage::

    python benchmarks/eval_smollm2.py                  # defaults: about 10 minutes on 2 CPU cores
    python benchmarks/eval_smollm2.py --threads 1 --anchor-autocast none bfloat16   # as in RESULTS.md
    python benchmarks/eval_smollm2.py --max-tokens 0   # the whole test set (~302k SmolLM2 tokens; hours)

Writes ``benchmarks/out/eval_smollm2.json`` and prints a rich table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
from common import DATA, OUT, cpu_facts, load_average, make_console, table, versions, write_json

from minicompress.config import DataConfig, ModelConfig
from minicompress.data.sources import bos_token_id, load_token_stream
from minicompress.evaluation.perplexity import eval_windows, evaluate_perplexity, measure_speed
from minicompress.measure import PeakMemory
from minicompress.models import load_model

WIKITEXT = DATA / "wikitext2" / "test.txt"
# (weights dtype, autocast)
VARIANTS = (("float32", "none"), ("bfloat16", "none"), ("float32", "bfloat16"))


def run_one(model, tokenizer, *, name: str, weights: str, autocast: str, stream: torch.Tensor, seq_len: int,
            protocol: str, speed: bool, prefill: int, decode: int, batch_size: int, repeats: int) -> dict:
    """Perplexity (and speed) of one model variant on one protocol."""
    windows = eval_windows(stream, seq_len, None, bos_token_id(tokenizer))
    start = time.perf_counter()
    with PeakMemory("cpu") as mem:
        ppl = evaluate_perplexity(model, windows, batch_size=batch_size, autocast=autocast)
    row = {
        "model": name, "weights": weights, "autocast": autocast, "protocol": protocol,
        "seq_len": seq_len, "windows": ppl["windows"], "tokens": ppl["tokens"],
        "perplexity": ppl["perplexity"], "eval_tokens_per_s": ppl["tokens_per_s"],
        "eval_peak_mib": mem.peak / 2**20, "eval_seconds": time.perf_counter() - start,
    }
    if speed:
        s = measure_speed(model, model.config.vocab_size, prefill_tokens=prefill, decode_tokens=decode,
                          autocast=autocast, repeats=repeats)
        row.update({"prefill_tokens_per_s": s["prefill_tokens_per_s"], "decode_tokens_per_s": s["decode_tokens_per_s"]})
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(WIKITEXT), help="evaluation text (default: WikiText-2 test)")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="tokens of the test set per model (0: all). The default keeps the run near 10 minutes "
                             "on 2 shared AVX2 cores, where bf16 runs at 1/6 of the fp32 speed")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--anchor-tokens", type=int, default=16384,
                        help="tokens of the anchor protocol rows (0: skip them)")
    parser.add_argument("--prefill-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--speed-repeats", type=int, default=1, help="timed repeats of the speed test (median)")
    parser.add_argument("--no-speed", action="store_true", help="skip prefill/decode timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is far faster when other processes "
                             "share the cores)")
    parser.add_argument("--variants", nargs="+", default=[f"{w}/{a}" for w, a in VARIANTS],
                        choices=[f"{w}/{a}" for w, a in VARIANTS],
                        help="weights/autocast variants to run (default: all three)")
    parser.add_argument("--anchor-autocast", nargs="+", default=["none"], choices=("none", "bfloat16"),
                        help="autocast modes of the anchor-protocol rows (the anchor itself used bfloat16, "
                             "which adds about 15 minutes here)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--output", default=str(OUT / "eval_smollm2.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.progress:
        from transformers.utils import logging as hf_logging

        os.environ["MINICOMPRESS_PROGRESS"] = "0"
        hf_logging.disable_progress_bar()
    console = make_console()
    if not Path(args.data).is_file():
        console.print(f"error: --data: {args.data} not found", style="red")
        return 2
    started = time.perf_counter()
    cpu = cpu_facts()
    info = {"cpu": cpu["model"], "cores": os.cpu_count(), "cpu_facts": cpu, "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_average(), "versions": versions(), "argv": sys.argv,
            "data": args.data, "max_tokens": args.max_tokens or None}
    rows = []
    for name in args.models:
        fp32_model, tokenizer = load_model(ModelConfig(source=name, dtype="float32"))
        data = DataConfig(source=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                          documents="file", shuffle=False)
        stream = load_token_stream(data, tokenizer)
        protocol = f"first {stream.numel():,} tok" if args.max_tokens else "full test set"
        for weights, autocast in (tuple(v.split("/")) for v in args.variants):
            model = fp32_model if weights == "float32" else load_model(ModelConfig(source=name, dtype=weights))[0]
            row = run_one(model, tokenizer, name=name, weights=weights, autocast=autocast, stream=stream,
                          seq_len=args.seq_len, protocol=protocol, speed=not args.no_speed,
                          prefill=args.prefill_tokens, decode=args.decode_tokens, batch_size=args.batch_size,
                          repeats=args.speed_repeats)
            rows.append(row)
            console.log(f"{name} {weights} autocast={autocast}: ppl {row['perplexity']:.3f}, "
                        f"{row['eval_tokens_per_s']:.1f} tok/s, {row['eval_seconds']:.0f} s")
            del model
            gc.collect()
        if args.anchor_tokens and name == "smollm2-135m":
            anchor = DataConfig(source=args.data, seq_len=512, max_tokens=args.anchor_tokens, documents="file",
                                shuffle=False)
            anchor_stream = load_token_stream(anchor, tokenizer)
            for autocast in args.anchor_autocast:
                row = run_one(fp32_model, tokenizer, name=name, weights="float32", autocast=autocast,
                              stream=anchor_stream, seq_len=512,
                              protocol=f"anchor: first {anchor_stream.numel():,} tok", speed=False, prefill=0,
                              decode=0, batch_size=args.batch_size, repeats=0)
                rows.append(row)
                console.log(f"{name} anchor autocast={autocast}: ppl {row['perplexity']:.3f}, "
                            f"{row['eval_seconds']:.0f} s")
        del fp32_model
        gc.collect()
    info["loadavg_end"] = load_average()
    info["total_seconds"] = time.perf_counter() - started

    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    console.print(table(
        f"WikiText-2 test perplexity and speed ({info['cpu']}, {info['torch_threads']} threads)",
        ("model", "weights", "autocast", "protocol", "seq", "windows", "ppl", "eval tok/s", "prefill tok/s",
         "decode tok/s", "peak MiB", "s"),
        [(r["model"], r["weights"], r["autocast"], r["protocol"], r["seq_len"], r["windows"], f"{r['perplexity']:.3f}",
          f"{r['eval_tokens_per_s']:.1f}", fmt(r.get("prefill_tokens_per_s"), ".1f"),
          fmt(r.get("decode_tokens_per_s"), ".2f"), f"{r['eval_peak_mib']:.0f}", f"{r['eval_seconds']:.0f}")
         for r in rows], left=4))
    out = write_json(args.output, {"benchmark": "eval_smollm2", **info, "rows": rows})
    console.print(f"wrote {out} in {info['total_seconds']:.0f} s (load average {info['loadavg_start']} -> "
                  f"{info['loadavg_end']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Weight-only quantization (``minicompress quantize``): size on disk, WikiText-2 perplexity and speed.

For each ``--models`` source, side by side in one process: the floating-point model in each
of ``--dtypes`` (float32, bfloat16 weights), and each ``--schemes`` scheme quantized from each
of those dtypes (torchao round-to-nearest, :mod:`minicompress.quantize`; the embeddings,
norms, output head and scales keep the dtype). Every variant goes the way a user's would:
written to a folder under ``--work`` (``minicompress quantize`` for the quantized ones,
``save_pretrained`` for the float ones), loaded back from it as ``minicompress eval`` loads
it, and measured with :func:`minicompress.evaluation.perplexity.evaluate_model`:

* size on disk of the folder's weight files;
* perplexity on the first ``--max-tokens`` tokens of the WikiText-2 test set (whole file as
  one document, non-overlapping windows of ``--seq-len``; default 16,384 tokens = 32
  windows of 512, the anchor protocol of ``eval_smollm2.py``), no autocast: each variant
  computes in its own dtype;
* prefill and greedy-decode tokens/s (batch 1, KV cache; ``--prefill-tokens`` then
  ``--decode-tokens``, median of 3).

Timings are wall-clock on whatever else shares the CPU (the load average is recorded):
run it on an idle machine for numbers worth quoting.

Usage::

    python benchmarks/quantize.py                                  # both default models, ~15 min on 2 idle cores
    python benchmarks/quantize.py --models smollm2-135m PATH/TO/recovered --threads 2
    python benchmarks/quantize.py --models smollm2-135m --dtypes bfloat16 --schemes int4-weight-only \\
        --group-size 64                                             # one cell, another group size

Prints one rich table; writes ``benchmarks/out/quantize.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path

from common import DATA, OUT, load_average, make_console, print_table, run_record, write_json

WIKITEXT = DATA / "wikitext2" / "test.txt"
DEFAULT_MODELS = ["smollm2-135m", str(Path.home() / ".cache" / "minicompress" / "runs" / "students"
                                      / "smollm2-50-searched")]
SCHEMES = ("int8-weight-only", "int4-weight-only")  # minicompress.config.QUANTIZE_SCHEMES (not imported: --help)


def _short(source: str) -> str:
    return Path(source).name if "/" in source else source


def measure_variant(source: str, dtype: str, scheme: str | None, *, group_size: int | None, work: Path, data,
                    prefill: int, decode: int, batch_size: int) -> dict:
    """Write one variant to ``work``, load it back, evaluate it; the folder is removed after.

    Returns:
        One result row: ``model``, ``dtype``, ``scheme``, ``size_on_disk_bytes``, ``perplexity``,
        ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``eval_tokens_per_s``, ``write_seconds``...
    """
    import torch

    from minicompress.config import ModelConfig, QuantizeConfig
    from minicompress.models import load_model
    from minicompress.evaluation.perplexity import evaluate_model
    from minicompress.recipes.quantize import quantize

    folder = work / f"{_short(source)}-{dtype}-{scheme or 'float'}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    extra = {}
    if scheme is None:
        model, tokenizer = load_model(ModelConfig(source=source, dtype=dtype))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
    else:
        report = quantize(QuantizeConfig(model=ModelConfig(source=source, dtype=dtype), scheme=scheme,
                                         group_size=group_size, output=str(folder)))
        extra = {"group_size": report["group_size"], "quantize_seconds": report["seconds"],
                 "quantized_parameters": report["quantized_parameters"]}
    write_seconds = time.perf_counter() - start
    gc.collect()
    try:
        model, tokenizer = load_model(ModelConfig(source=str(folder)))
        with torch.no_grad():
            result = evaluate_model(model, tokenizer, data, batch_size=batch_size, autocast="none", speed=True,
                                    prefill_tokens=prefill, decode_tokens=decode, source=str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    del model
    gc.collect()
    return {"model": source, "dtype": dtype, "scheme": scheme or "float", **extra,
            "size_on_disk_bytes": result["size_on_disk_bytes"], "perplexity": result["perplexity"],
            "tokens": result["tokens"], "windows": result["windows"],
            "prefill_tokens_per_s": result["prefill_tokens_per_s"], "decode_tokens_per_s": result["decode_tokens_per_s"],
            "eval_tokens_per_s": result["eval_tokens_per_s"], "eval_peak_memory_bytes": result["eval_peak_memory_bytes"],
            "write_seconds": write_seconds}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="model sources (built-in names, HF folders); default: smollm2-135m and the searched "
                             "50%% student")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"),
                        help="floating-point rows, and the dtypes the schemes quantize from (default: both)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="input channels per scale (default: per channel for int8, 32 for int4)")
    parser.add_argument("--data", default=str(WIKITEXT), help="evaluation text (default: WikiText-2 test)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens of the text evaluated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward of the perplexity run")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--work", default=None,
                        help="folder for the variants, each removed after its row (default: a temporary folder)")
    parser.add_argument("--output", default=str(OUT / "quantize.json"))
    args = parser.parse_args(argv)
    console = make_console()
    if not Path(args.data).is_file():
        console.print(f"error: --data: {args.data} not found", style="red")
        return 2
    missing = [m for m in args.models if ("/" in m or m.startswith((".", "~"))) and not Path(m).expanduser().is_dir()]
    if missing:
        console.print(f"error: --models: no such folder: {', '.join(missing)}", style="red")
        return 2

    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from minicompress.config import DataConfig
    from minicompress.quantize import quiet_torchao_logs

    os.environ["MINICOMPRESS_PROGRESS"] = "0"
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    quiet_torchao_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = DataConfig(source=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens, documents="file",
                      shuffle=False)
    work = Path(args.work).expanduser() if args.work else Path(tempfile.mkdtemp(prefix="minicompress-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    record = run_record(torch_threads=torch.get_num_threads(), data=args.data, max_tokens=args.max_tokens,
                        seq_len=args.seq_len, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens)
    rows = []
    started = time.perf_counter()
    try:
        for source in args.models:
            for dtype in args.dtypes:
                for scheme in [None, *args.schemes]:
                    row = measure_variant(source, dtype, scheme, group_size=args.group_size, work=work, data=data,
                                          prefill=args.prefill_tokens, decode=args.decode_tokens,
                                          batch_size=args.batch_size)
                    rows.append(row)
                    console.log(f"{_short(source)} {dtype} {row['scheme']}: {row['size_on_disk_bytes'] / 2**20:,.1f} MiB, "
                                f"ppl {row['perplexity']:.3f}, decode {row['decode_tokens_per_s']:.1f} tok/s")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for row in rows:  # against the float32 row of the same model (or the first float row)
        base = next((r for r in rows if r["model"] == row["model"] and r["scheme"] == "float"
                     and r["dtype"] == "float32"), None) or next(r for r in rows if r["model"] == row["model"])
        row["size_ratio"] = row["size_on_disk_bytes"] / base["size_on_disk_bytes"]
        row["perplexity_delta"] = row["perplexity"] - base["perplexity"]
    record.update({"rows": rows, "seconds": time.perf_counter() - started, "load_average_end": load_average()})
    tokens = rows[0]["tokens"] if rows else 0
    print_table(f"weight-only quantization (torchao RTN): WikiText-2, first {tokens:,} scored tokens in windows of "
                f"{args.seq_len}; prefill {args.prefill_tokens} / decode {args.decode_tokens} tokens, batch 1; "
                f"load average {record['cpu']['load_average']} -> {record['load_average_end']}",
                ["model", "weights", "scheme", "group", "size MiB", "size ratio", "ppl", "Δppl", "prefill tok/s",
                 "decode tok/s", "eval tok/s"],
                [[_short(r["model"]), r["dtype"], r["scheme"], "" if r["scheme"] == "float" else r.get("group_size") or "channel",
                  f"{r['size_on_disk_bytes'] / 2**20:,.1f}",
                  f"{r['size_ratio']:.3f}", f"{r['perplexity']:.3f}", f"{r['perplexity_delta']:+.3f}",
                  f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.1f}",
                  f"{r['eval_tokens_per_s']:,.0f}"] for r in rows], left=3, console=console)
    console.print(f"wrote {write_json(args.output, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

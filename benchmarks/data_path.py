"""Data path: tokenising every run (``rows.load_sequences``) vs a memory-mapped token store.

For each ``--repeats R`` the corpus ``../shared/data/corpus/*.txt`` is repeated ``R`` times
in a temporary folder (hard links with distinct names, or symlinks where links fail: no
bytes are copied; each copy is a separate file, read and tokenised again) and tokenised with
SmolLM2's tokenizer (``~/.cache/minicompress/models/smollm2-135m``, or ``--tokenizer``).
Every measurement runs in a fresh subprocess that imports everything and loads the
tokenizer, resets its peak-RSS mark (``/proc/self/clear_refs``), then does the work and
reports its time, its peak resident set above the baseline (``VmHWM``) and the growth of
its anonymous memory (``RssAnon``; memory-mapped file pages are ``RssFile`` and are not in it):

* before: ``rows.load_sequences(DataConfig(source, seq_len, seed=0), tokenizer)``, what
  every command and every torchrun rank does today (skipped above ``--max-before-tokens``);
* build: :func:`minicompress.data.token_store.get_or_build` into an empty cache, with
  ``num_proc=1`` and with ``num_proc=os.cpu_count()`` (tokens/s);
* second run: ``get_or_build`` on the built cache (opens and checks it), then
  ``store.sequences(seq_len)`` and the first micro batch of 4 rows; the batch is compared
  with rows ``[:4]`` of ``load_sequences`` when that ran;
* ``--arrow``: the same with Hugging Face ``datasets`` (documents tokenised with
  ``Dataset.map``, EOS appended, ``save_to_disk``; second run ``load_from_disk`` and the
  flat stream of its ``input_ids`` column), for the memmap-vs-Arrow choice.

Children inherit the environment (Hugging Face tokenizers use all cores unless
``TOKENIZERS_PARALLELISM=false``). Prints a rich table; writes ``benchmarks/out/data_path.json``.

Run: ``python benchmarks/data_path.py --repeats 1,10,100`` (R=100 is ~300M tokens, ~1.4 GB
of text through the tokenizer; its store is 600 MB, and ``--work`` needs room for two).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
MiB = 1 << 20


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _digest(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# child


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from minicompress.data import rows, sources
    from minicompress.data import token_store
    from minicompress.config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    bos = sources.bos_token_id(tokenizer)
    tokenizer("warm up", add_special_tokens=False)
    if args.child.startswith("arrow"):
        import datasets  # before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base_rss, base_anon = _status_kb("VmRSS"), _status_kb("RssAnon")
    out: dict = {}
    start = time.perf_counter()
    if args.child == "before":
        seqs = rows.load_sequences(DataConfig(source=args.corpus, seq_len=args.seq_len, seed=0, token_store=False),
                                   tokenizer)
        out.update(sequences=seqs.shape[0], first_batch=_digest(seqs[:4]))
    elif args.child == "build":
        store = token_store.get_or_build(args.cache, args.corpus, tokenizer, num_proc=args.num_proc, progress=False)
        out.update(tokens=store.num_tokens, store_bytes=store.meta["bytes"], dtype=store.meta["dtype"])
    elif args.child == "open":
        store = token_store.get_or_build(args.cache, args.corpus, tokenizer, progress=False)
        view = store.sequences(args.seq_len, bos, seed=0)
        batch = view[torch.arange(4)]
        out.update(sequences=len(view), first_batch=_digest(batch))
    elif args.child == "arrow-build":
        datasets.disable_progress_bars()
        eos = tokenizer.eos_token_id

        def docs():
            for batch, _ in token_store._iter_documents(args.corpus):
                for doc in batch:
                    yield {"text": doc}

        def tokenize(rows):
            ids = tokenizer(rows["text"], add_special_tokens=False, verbose=False)["input_ids"]
            return {"input_ids": [x + [eos] for x in ids]}

        ds = datasets.Dataset.from_generator(docs, cache_dir=args.cache + "-hf")
        ds = ds.map(tokenize, batched=True, remove_columns=["text"])
        ds.save_to_disk(args.cache)
        out.update(store_bytes=sum(p.stat().st_size for p in Path(args.cache).rglob("*") if p.is_file()),
                   dtype=str(ds.features["input_ids"].feature.dtype))
    elif args.child == "arrow-open":
        ds = datasets.load_from_disk(args.cache)
        column = ds.data.column("input_ids")
        flat = torch.from_numpy(np.asarray(column.combine_chunks().values.to_numpy()))
        packed = sources.pack(flat, args.seq_len, bos)  # a view of the stream
        perm = torch.randperm(packed.shape[0], generator=torch.Generator().manual_seed(0))
        out.update(sequences=packed.shape[0], first_batch=_digest(packed[perm[:4]].long()))
    out.update(seconds=time.perf_counter() - start, peak_mib=(_status_kb("VmHWM") - base_rss) / 1024,
               anon_mib=(_status_kb("RssAnon") - base_anon) / 1024)
    print(json.dumps(out))


def _run_child(kind: str, args: argparse.Namespace, corpus: Path, cache: Path, num_proc: int = 1) -> dict:
    env = dict(os.environ, MINICOMPRESS_PROGRESS="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus), "--cache", str(cache),
           "--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len), "--num-proc", str(num_proc)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# parent


def repeated_corpus(folder: Path, repeats: int) -> tuple[Path, int]:
    """``folder`` holding ``repeats`` links to every corpus file; (folder, bytes of text)."""
    files = sorted(CORPUS.glob("*.txt"))
    if not files:
        raise SystemExit(f"no corpus at {CORPUS}/*.txt")
    folder.mkdir(parents=True)
    total = 0
    for r in range(repeats):
        for f in files:
            link = folder / f"{r:04d}-{f.name}"
            try:
                os.link(f, link)
            except OSError:
                link.symlink_to(f)
            total += f.stat().st_size
    return folder, total


def default_tokenizer() -> str:
    from minicompress.models import cache_dir

    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"SmolLM2's tokenizer is not at {folder} (it appears once `minicompress` has loaded the "
                         "built-in smollm2-135m); pass --tokenizer FOLDER")
    return str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", default="1,10,100", help="comma-separated corpus repeats")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-before-tokens", type=float, default=40e6,
                   help="skip load_sequences above this many tokens")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the built-in SmolLM2's)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="processes of the parallel build")
    p.add_argument("--arrow", action="store_true", help="also measure a Hugging Face datasets (Arrow) cache")
    p.add_argument("--work", default=None, help="folder for corpora and stores (default: a temporary one)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "out" / "data_path.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    args.tokenizer = args.tokenizer or default_tokenizer()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    rows = []
    work = Path(args.work or tempfile.mkdtemp(prefix="data_path-"))
    try:
        for repeats in [int(r) for r in args.repeats.split(",")]:
            corpus, text_bytes = repeated_corpus(work / f"corpus-{repeats}", repeats)
            row: dict = {"repeats": repeats, "text_mib": text_bytes / MiB}
            cache = work / f"cache-{repeats}"
            row["build_1"] = _run_child("build", args, corpus, cache, 1)
            tokens = row["tokens"] = row["build_1"]["tokens"]
            console.log(f"R={repeats}: {tokens:,} tokens; build (1 proc) {row['build_1']['seconds']:.1f} s")
            if args.num_proc > 1:
                other = work / f"cache-{repeats}-np{args.num_proc}"
                row[f"build_{args.num_proc}"] = _run_child("build", args, corpus, other, args.num_proc)
                shutil.rmtree(other, ignore_errors=True)
                seconds = row[f"build_{args.num_proc}"]["seconds"]
                console.log(f"R={repeats}: build ({args.num_proc} procs) {seconds:.1f} s")
            row["open"] = _run_child("open", args, corpus, cache)
            if tokens <= args.max_before_tokens:
                row["before"] = _run_child("before", args, corpus, cache)
                row["same_first_batch"] = row["before"]["first_batch"] == row["open"]["first_batch"]
                console.log(f"R={repeats}: load_sequences {row['before']['seconds']:.1f} s")
            else:
                row["before"] = None
                row["before_skipped"] = f"{tokens:,} tokens > --max-before-tokens {args.max_before_tokens:,.0f}"
            if args.arrow:
                arrow = work / f"arrow-{repeats}"
                row["arrow_build"] = _run_child("arrow-build", args, corpus, arrow)
                row["arrow_open"] = _run_child("arrow-open", args, corpus, arrow)
                row["arrow_same_first_batch"] = row["arrow_open"]["first_batch"] == row["open"]["first_batch"]
                shutil.rmtree(arrow, ignore_errors=True)
                shutil.rmtree(str(arrow) + "-hf", ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(corpus, ignore_errors=True)
            rows.append(row)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    n = args.num_proc
    table = Table(title=f"data path, SmolLM2 tokenizer, seq_len {args.seq_len} (per process; MiB above baseline)")
    cols = ["R", "tokens", "before s", "before peak", "before anon", "build s (1)", "tok/s (1)",
            f"build s ({n})", f"tok/s ({n})", "build peak", "2nd run s", "2nd run anon", "same batch"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        b, o, b1 = r["before"], r["open"], r["build_1"]
        bn = r.get(f"build_{n}")
        table.add_row(str(r["repeats"]), f"{r['tokens']:,}",
                      f"{b['seconds']:.1f}" if b else "skipped", f"{b['peak_mib']:.0f}" if b else "-",
                      f"{b['anon_mib']:.0f}" if b else "-",
                      f"{b1['seconds']:.1f}", f"{r['tokens'] / b1['seconds']:,.0f}",
                      f"{bn['seconds']:.1f}" if bn else "-", f"{r['tokens'] / bn['seconds']:,.0f}" if bn else "-",
                      f"{b1['peak_mib']:.0f}", f"{o['seconds']:.3f}", f"{o['anon_mib']:.1f}",
                      str(r.get("same_first_batch", "-")))
    console.print(table)
    for r in rows:
        if r.get("before_skipped"):
            console.print(f"R={r['repeats']}: 'before' skipped ({r['before_skipped']})")
    if args.arrow:
        arrow = Table(title="the same with a Hugging Face datasets (Arrow) cache")
        for col in ("R", "build s", "disk MiB", "dtype", "2nd run s", "2nd run anon", "store disk MiB", "same batch"):
            arrow.add_column(col, justify="right")
        for r in rows:
            ab, ao = r["arrow_build"], r["arrow_open"]
            arrow.add_row(str(r["repeats"]), f"{ab['seconds']:.1f}", f"{ab['store_bytes'] / MiB:.1f}", ab["dtype"],
                          f"{ao['seconds']:.3f}", f"{ao['anon_mib']:.1f}",
                          f"{r['build_1']['store_bytes'] / MiB:.1f}", str(r["arrow_same_first_batch"]))
        console.print(arrow)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": name, "cpu_count": os.cpu_count(),
                               "load_average": os.getloadavg(), "seq_len": args.seq_len, "num_proc": n,
                               "command": "python benchmarks/data_path.py " + " ".join(sys.argv[1:]),
                               "rows": rows}, indent=2) + "\n")
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()

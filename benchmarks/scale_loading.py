"""Host memory per rank when torchrun loads a real model for FSDP2: rank 0 reads vs every rank reads.

Under ``torchrun`` minicompress reads a checkpoint on rank 0 only
(:func:`minicompress.models.load_model_on_rank0`); the other ranks build the model with its
parameters on the ``meta`` device and receive their FSDP2 shards from rank 0
(:func:`minicompress.distributed.shard_model` with ``from_rank0=True``, i.e.
``set_model_state_dict(..., broadcast_from_rank0=True)``, one tensor at a time). The
baseline is what every rank did before: :func:`minicompress.models.load_model` on every
rank, then ``shard_model``.

The models: the built-ins (float32; their vocabulary embedding is 21% of SmolLM2-135M and
63% of Gemma-3-270M, and one tensor must be whole on every rank while it is broadcast) and
``llama-300m``, a random-weight Llama (1024 / 16 / 4 / 2816 / 24 layers, vocabulary 32,000,
tied) saved as safetensors, shaped like the large models users shard (embedding 11%).
For each model and each way, ``torchrun --nproc-per-node 2`` (gloo, one
thread per rank) runs a child that imports everything, joins the process group, resets its
peak-RSS mark (``/proc/self/clear_refs``), loads and shards the model, and reports its peak
resident set above the RSS at the reset (``VmHWM``; MiB) and its RSS once sharded. The
shards of both ways are compared (``torch.equal``) through the full state dict gathered on
rank 0. Prints a rich table and writes ``benchmarks/out/scale_loading.json``.

Run: ``python benchmarks/scale_loading.py [--models smollm2-135m gemma3-270m]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OUT, ROOT, MiB, free_port, make_console, run_record, status_kib, table, write_json


def _status_mib(key: str) -> float:
    return status_kib(key) / 1024


def child(args: argparse.Namespace) -> None:
    """One rank: load and shard ``args.model`` the ``args.way`` way; write its peaks and a digest."""
    import hashlib

    import torch

    torch.set_num_threads(1)
    from minicompress import distributed
    from minicompress.models import load_model, load_model_on_rank0

    distributed.init_from_env()
    rank = distributed.rank()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if args.way == "rank0":
        model, _, weights = load_model_on_rank0(args.model)
        distributed.shard_model(model, mixed_precision=False, device="cpu", from_rank0=True, weights=weights)
        del weights
    else:
        model, _ = load_model(args.model)
        distributed.shard_model(model, mixed_precision=False, device="cpu")
    seconds = time.perf_counter() - t0
    peak, after = _status_mib("VmHWM") - base, _status_mib("VmRSS") - base
    full = distributed.full_state_dict(model)  # collective; rank 0 holds it
    digest = None
    if rank == 0:
        h = hashlib.sha256()
        for name in sorted(full):
            h.update(name.encode())
            h.update(full[name].contiguous().view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
    out = Path(args.out) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "peak_mib": peak, "after_mib": after, "seconds": seconds,
                               "digest": digest}))


SYNTHETIC = {"llama-300m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                 num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                 tie_word_embeddings=True, max_position_embeddings=2048)}


def synthetic_folder(name: str, work: Path) -> str:
    """Save the random-weight model ``name`` with a copy of SmolLM2's tokenizer; its folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minicompress.models import builtin_folder

    folder = work / name
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SYNTHETIC[name]))
    model.save_pretrained(folder)
    src = builtin_folder("smollm2-135m")
    for f in src.glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    return str(folder)


def run_way(model: str, way: str, work: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINICOMPRESS_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), __file__, "--child", "--model", model, "--way", way, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    return {"model": model, "way": way, "ranks": ranks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "llama-300m"])
    p.add_argument("--output", default=str(OUT / "scale_loading.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--way", choices=("rank0", "every-rank"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from minicompress.arch import count_parameters
    from minicompress.models import load_config

    console = make_console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            source = synthetic_folder(model, Path(tmp)) if model in SYNTHETIC else model
            params = count_parameters(load_config(source))["total"]
            results = {way: run_way(source, way, Path(tmp)) for way in ("every-rank", "rank0")}
            same = results["rank0"]["ranks"][0]["digest"] == results["every-rank"]["ranks"][0]["digest"]
            for way, res in results.items():
                rows.append({**res, "model": model, "parameters": params, "float32_mib": params * 4 / MiB,
                             "same_shards": same})
                console.log(f"{model} / {way}: peaks " + ", ".join(f"{r['peak_mib']:.0f}" for r in res["ranks"])
                            + f" MiB; shards equal: {same}")

    shown = []
    for r in rows:
        r0, r1 = r["ranks"]
        shown.append((r["model"], f"{r['float32_mib']:.0f}", r["way"], f"{r0['peak_mib']:.0f}", f"{r1['peak_mib']:.0f}",
                      f"{r1['after_mib']:.0f}", f"{max(r0['seconds'], r1['seconds']):.1f}", r["same_shards"]))
    console.print(table("loading for FSDP2 on 2 ranks: host memory above the process baseline (MiB)",
                        ("model", "fp32 weights", "way", "rank 0 peak", "rank 1 peak", "rank 1 after", "seconds",
                         "same shards"), shown, left=("model", "way")))
    out = write_json(args.output, run_record(rows=rows))
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()

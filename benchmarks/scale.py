"""Scale: peak memory of ``prune --streaming`` vs the in-memory prune on real checkpoints.

Part ``memory``: for each built-in model (SmolLM2-135M, Gemma-3-270M,
float32 safetensors converted from GGUF), scores are computed once in this process
(few calibration samples from ``../shared/data/corpus``; they only choose the kept
units), a plan is made, and then each path runs in its own fresh subprocess with one
torch thread:

* ``in-memory``: ``load_model`` + ``apply_plan_`` + ``save_pretrained`` (what
  ``minicompress prune`` does);
* ``streaming``: :func:`minicompress.recipes.prune.write_pruned_checkpoint`.

Each subprocess imports everything and builds the model class on the ``meta`` device
first, resets its peak-RSS mark (``/proc/self/clear_refs``), then reports ``VmHWM`` minus
the RSS at that point (mapped file pages count too). Target: the streaming peak is at
most the largest source tensor + 10%. The two outputs are compared tensor by tensor.

Prints a rich table and writes ``benchmarks/out/scale.json`` (and ``scale.md``).

Run: ``python benchmarks/scale.py --part memory [--models smollm2-135m gemma3-270m]``.
Part ``throughput`` runs ``benchmarks/scale_throughput.py``: tokens/s of recovery on 2 gloo
processes vs 1 (torchrun + FSDP2) on a small random-weight Llama.
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

from common import DATA, OUT, MiB, cpu_facts, make_console, run_record, status_kib, table, write_json

CORPUS = DATA / "corpus"
TARGETS = {
    # 576 -> 480 (6 heads of 64 over 2 KV heads), FFN 1536 -> 768, 30 -> 18 layers
    "smollm2-135m": {"hidden_size": 480, "num_attention_heads": 6, "num_key_value_heads": 2,
                     "intermediate_size": 768, "num_hidden_layers": 18},
    # 640 -> 512 (2 heads of 256 over 1 KV head), FFN 2048 -> 1024, 18 -> 12 layers
    "gemma3-270m": {"hidden_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "intermediate_size": 1024, "num_hidden_layers": 12},
}


# ----------------------------------------------------------------------------------------
# child: one measured prune


def child(args: argparse.Namespace) -> None:
    """Run one prune path in this (fresh) process and print its memory as JSON.

    ``ru_maxrss`` is not used: after ``exec`` it still holds the forking parent's peak.
    """
    import torch

    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModelForCausalLM

    from minicompress.models import load_model
    from minicompress.pruning.plan import PrunePlan, apply_plan_
    from minicompress.recipes.prune import write_pruned_checkpoint

    plan = PrunePlan.from_dict(json.loads(Path(args.plan).read_text()))
    with torch.device("meta"):  # import the model class in both paths before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.folder))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    base_kb = status_kib("VmRSS")
    start = time.perf_counter()
    if args.child == "streaming":
        write_pruned_checkpoint(args.folder, plan, args.out)
    else:
        model, tokenizer = load_model(args.folder)
        apply_plan_(model, plan)
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
    seconds = time.perf_counter() - start
    peak_kb = status_kib("VmHWM")
    print(json.dumps({"baseline_mib": base_kb / 1024, "peak_mib": peak_kb / 1024,
                      "peak_above_baseline_mib": (peak_kb - base_kb) / 1024, "seconds": seconds}))


def _run_child(kind: str, folder: Path, plan: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MINICOMPRESS_PROGRESS="0")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", str(folder), "--plan", str(plan),
                           "--out", str(out)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# parent


def _tensor_sizes(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                n = 1
                for d in s.get_shape():
                    n *= d
                sizes[name] = n * {"F32": 4, "BF16": 2, "F16": 2}[s.get_dtype()]
    return sizes


def _identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                out.update({k: path for k in f.keys()})
        return out

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False
    for name in ia:  # one tensor pair at a time
        with safe_open(str(ia[name]), framework="pt") as fa, safe_open(str(ib[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
    return True


def _plan(name: str, folder: Path, args, work: Path) -> tuple[Path, dict]:
    """Score the model on a few calibration samples and write the plan as JSON."""
    import gc

    from transformers import AutoConfig

    from minicompress.arch import count_parameters
    from minicompress.recipes.score import score
    from minicompress.config import DataConfig, ModelConfig, ScoreConfig
    from minicompress.pruning.plan import make_plan

    start = time.perf_counter()
    cfg = ScoreConfig(model=ModelConfig(source=str(folder)),
                      data=DataConfig(source=str(CORPUS), seq_len=args.seq_len),
                      num_samples=args.num_samples, batch_size=4, loss_samples=0)
    scores = score(cfg)
    gc.collect()
    config = AutoConfig.from_pretrained(str(folder))
    plan = make_plan(scores, config, TARGETS[name])
    path = work / f"{name}.plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    params = (count_parameters(config)["total"], count_parameters(plan.new_config(config))["total"])
    return path, {"score_seconds": time.perf_counter() - start, "parameters": params}


def part_memory(args) -> list[dict]:
    import torch

    from minicompress.models import builtin_folder

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for name in args.models:
            folder = builtin_folder(name)
            sizes = _tensor_sizes(folder)
            largest = max(sizes, key=sizes.get)
            plan, info = _plan(name, folder, args, work)
            runs = {}
            for kind in ("in-memory", "streaming"):
                runs[kind] = _run_child(kind, folder, plan, work / f"{name}-{kind}")
            limit = 1.10 * sizes[largest] / MiB
            peak = runs["streaming"]["peak_above_baseline_mib"]
            rows.append({
                "model": name, "target": TARGETS[name], "parameters": info["parameters"],
                "checkpoint_mib": sum(sizes.values()) / MiB, "largest_tensor": largest,
                "largest_tensor_mib": sizes[largest] / MiB, "score_seconds": info["score_seconds"],
                "in_memory": runs["in-memory"], "streaming": runs["streaming"],
                "streaming_limit_mib": limit, "target_met": peak <= limit,
                "identical": _identical(work / f"{name}-in-memory", work / f"{name}-streaming"),
            })
            for kind in ("in-memory", "streaming"):
                for f in (work / f"{name}-{kind}").glob("*.safetensors"):
                    f.unlink()
    return rows


def render(rows: list[dict], cpu: dict):
    return table(f"prune peak memory above baseline (1 thread; {cpu['model']})",
                 ("model", "checkpoint", "largest tensor", "in-memory peak", "streaming peak", "limit (+10%)", "met",
                  "in-mem s", "stream s", "identical"),
                 [(r["model"], f"{r['checkpoint_mib']:.0f} MiB", f"{r['largest_tensor_mib']:.0f} MiB",
                   f"{r['in_memory']['peak_above_baseline_mib']:.0f} MiB",
                   f"{r['streaming']['peak_above_baseline_mib']:.0f} MiB", f"{r['streaming_limit_mib']:.0f} MiB",
                   "yes" if r["target_met"] else "NO", f"{r['in_memory']['seconds']:.1f}",
                   f"{r['streaming']['seconds']:.1f}", r["identical"]) for r in rows], left=0)


def markdown(rows: list[dict], cpu: dict) -> str:
    flags = {f: cpu.get(f) for f in ("avx512_bf16", "amx_bf16", "amx_tile")}
    lines = [f"CPU: {cpu['model']}, {cpu['cpus']} cores, native bf16 flags {flags}; 1 torch thread",
             "", "| model | checkpoint MiB | largest tensor MiB | in-memory peak MiB | streaming peak MiB | "
             "limit MiB | met | in-memory s | streaming s | identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['checkpoint_mib']:.0f} | {r['largest_tensor_mib']:.0f} "
                     f"({r['largest_tensor']}) | {r['in_memory']['peak_above_baseline_mib']:.0f} | "
                     f"{r['streaming']['peak_above_baseline_mib']:.0f} | {r['streaming_limit_mib']:.0f} | "
                     f"{'yes' if r['target_met'] else 'NO'} | {r['in_memory']['seconds']:.1f} | "
                     f"{r['streaming']['seconds']:.1f} | {r['identical']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "throughput"), default="memory",
                        help="memory: streaming vs in-memory prune; throughput: 2-process vs 1-process recovery "
                             "(benchmarks/scale_throughput.py, its flags after --)")
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--num-samples", type=int, default=8, help="calibration samples for the scores")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="where temporary outputs go (default: system temp)")
    parser.add_argument("--output", default=str(OUT / "scale.json"))
    parser.add_argument("--child", choices=("in-memory", "streaming"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.part == "throughput":
        raise SystemExit(subprocess.call([sys.executable, str(Path(__file__).with_name("scale_throughput.py")),
                                          *[a for a in rest if a != "--"]]))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.child:
        child(args)
        return
    os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")
    cpu = cpu_facts()
    parts = {"memory": part_memory}
    rows = parts[args.part](args)
    make_console().print(render(rows, cpu))
    out = write_json(args.output, run_record(part=args.part, rows=rows))
    out.with_suffix(".md").write_text(markdown(rows, cpu))


if __name__ == "__main__":
    main()

"""Recovery throughput on 1 and 2 ranks (torchrun + FSDP2, gloo on the CPU), issue 11.

:func:`recovery_throughput` runs ``minicompress recover`` as a subprocess, either as one
plain process or under ``python -m torch.distributed.run --nproc-per-node N`` (loopback
only), with one torch thread per process, on a random-weight Llama (default hidden 256,
4 layers, FFN 1024, 4 heads, vocab 8,192, tied embeddings; the teacher has the same shape
and another seed) and a corpus of random words of an 8,192-word ``WordLevel`` tokenizer,
so every token id is equally likely. Both runs train on the same global batch
(``--global-batch-tokens``); a rank of an ``N``-rank run processes ``1 / N`` of it and
FSDP2 all-gathers each layer's weights (forward and backward) and reduce-scatters its
gradients.

Throughput is global training tokens per second of an optimizer step (``tokens_per_s``
of ``metrics.jsonl``, measured by rank 0, evaluation excluded): the median over the steps
after the first (warm-up). ``wall_s`` is the whole command (start-up, model loading,
evaluations and the final save included).

On the CPU this measures the cost of sharding and gloo communication: 2 ranks on 2 cores
can at best double the throughput of 1 rank on 1 core; on GPUs the same code uses NCCL.

Run: ``python benchmarks/scale_throughput.py`` (about 2 minutes on 2 cores);
prints a rich table and writes ``benchmarks/out/scale_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import free_port, make_console, run_record, write_json

OUT = common.OUT / "scale_throughput.json"


def prepare(folder: Path, *, hidden: int = 256, layers: int = 4, vocab: int = 8192, words: int = 40_000) -> dict:
    """Write a random teacher and student (HF folders with a word-level tokenizer) and a corpus.

    Args:
        folder: where to write ``teacher/``, ``student/`` and ``corpus.txt``.
        hidden: hidden size (FFN ``4 * hidden``, ``hidden // 64`` heads).
        layers: decoder layers.
        vocab: vocabulary (and tokenizer) size.
        words: words of random text (one token each).

    Returns:
        ``{"teacher", "student", "corpus", "parameters"}`` (paths as strings).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    table = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=2, eos_token_id=3,
                         pad_token_id=1)
    out = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        out[name] = str(folder / name)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(vocab - len(specials))}" for _ in range(100)) for _ in range(words // 100)]
    (folder / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    out["corpus"] = str(folder / "corpus.txt")
    return out


def recovery_throughput(world_size: int, *, models: dict, workdir: Path, steps: int = 8, seq_len: int = 256,
                        micro_batch_size: int = 1, global_batch_tokens: int = 2048, autocast: str = "none") -> dict:
    """Tokens/s of ``minicompress recover`` on ``world_size`` ranks (a plain process for 1).

    Args:
        world_size: ranks (processes), one torch thread each.
        models: from :func:`prepare`.
        workdir: scratch folder (the run writes ``recovered-<world_size>`` there).
        steps: optimizer steps.
        seq_len: tokens per sequence.
        micro_batch_size: sequences per forward on each rank.
        global_batch_tokens: tokens per optimizer step, over all ranks.
        autocast: ``none`` (float32) or ``bfloat16``.

    Returns:
        ``{"world_size", "tokens_per_s", "step_s", "wall_s", "steps", "losses"}``:
        ``tokens_per_s`` is the median global throughput of steps 2.., ``step_s`` the
        median step time.
    """
    output = workdir / f"recovered-{world_size}"
    config = {
        "student": {"source": models["student"]}, "teacher": {"source": models["teacher"]},
        "data": {"source": models["corpus"], "seq_len": seq_len}, "tokens": steps * global_batch_tokens,
        "global_batch_tokens": global_batch_tokens, "micro_batch_size": micro_batch_size, "lr": 1e-3,
        "warmup_steps": 1, "eval_tokens": seq_len, "eval_batch_size": 1, "autocast": autocast,
        "log_every": 1000, "overwrite": True,
    }
    yaml = workdir / f"recover-{world_size}.yaml"
    yaml.write_text(json.dumps(config))
    args = ["-m", "minicompress", "recover", "--config", str(yaml), "--output", str(output), "--threads", "1",
            "--quiet"]
    if world_size > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(world_size), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINICOMPRESS_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"recover on {world_size} ranks failed:\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    timed = train[1:] or train
    return {
        "world_size": world_size,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_s": statistics.median(global_batch_tokens / r["tokens_per_s"] for r in timed),
        "wall_s": wall,
        "steps": len(train),
        "losses": [r["loss"] for r in train],
    }


def render(result: dict):
    """A rich table of a result written by :func:`main`."""
    runs = result["runs"]
    base = next(r for r in runs if r["world_size"] == 1)["tokens_per_s"]
    cfg = result["setup"]
    rows = []
    for r in runs:
        speedup = r["tokens_per_s"] / base
        rows.append((r["world_size"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}", f"{speedup:.2f}x",
                     f"{speedup / r['world_size']:.0%}", f"{r['wall_s']:.1f}", f"{r['losses'][-1]:.5f}"))
    return common.table(f"recover throughput, random Llama {cfg['parameters'] / 1e6:.1f}M params (hidden "
                        f"{cfg['hidden']}, {cfg['layers']} layers, vocab {cfg['vocab']}), {cfg['global_batch_tokens']} "
                        f"tokens/step, seq {cfg['seq_len']}, {cfg['autocast']}, gloo, 1 thread/rank",
                        ("ranks", "tokens/s", "step s", "speed-up", "efficiency", "wall s", "final loss"), rows, left=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--autocast", default="none", choices=("none", "bfloat16"))
    p.add_argument("--output", default=str(OUT))
    p.add_argument("--render", metavar="JSON", help="only print the table of an earlier run's JSON")
    args = p.parse_args()
    console = make_console()
    if args.render:
        console.print(render(json.loads(Path(args.render).read_text())))
        return
    with tempfile.TemporaryDirectory(prefix="scale_throughput-") as tmp:
        workdir = Path(tmp)
        models = prepare(workdir, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                         words=max(40_000, 2 * args.steps * args.global_batch_tokens))
        runs = [recovery_throughput(int(w), models=models, workdir=workdir, steps=args.steps, seq_len=args.seq_len,
                                    micro_batch_size=args.micro_batch_size,
                                    global_batch_tokens=args.global_batch_tokens, autocast=args.autocast)
                for w in args.world_sizes.split(",")]
    result = run_record(
        setup={"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "seq_len": args.seq_len,
               "micro_batch_size": args.micro_batch_size, "global_batch_tokens": args.global_batch_tokens,
               "steps": args.steps, "autocast": args.autocast, "parameters": models["parameters"]},
        runs=runs)
    result["machine"] = {**result["cpu"], **result["versions"]}  # the key earlier results used
    out = write_json(args.output, result)
    console.print(render(result))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Recovery step throughput and extra peak memory: ours vs naive vs Liger-Kernel (issue 4).

One optimizer step of logit distillation (forward KL, temperature 1, AdamW) on the same
batch, side by side in one process, for

* SmolLM2-135M (vocab 49,152) teacher with a student that is a copy of it (or ``--student``);
* Gemma-3-270M (vocab 262,144) teacher with a copy of it as the student.

Variants:

* ``ours``: the library's recovery step, :func:`minicompress.distillation.loop.micro_batch_loss` over
  micro batches of ``--micro-batch-size`` sequences with gradient accumulation (what
  ``minicompress recover --micro-batch-size M`` runs): final hidden states of both models +
  :func:`minicompress.distillation.losses.chunked_distill_loss` (fused lm_head + KL with the closed-form
  gradient, automatic chunk: 1024 tokens at vocab 49,152, 256 at 262,144; never ``[N, V]``);
* ``ours 1 batch``: the same loss on the whole batch in one forward, timed per part (teacher
  forward, student forward, loss, backward, optimizer) for the share of the step;
* ``naive``: HF forward of both models with full logits,
  ``F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True, reduction="batchmean")``;
* ``liger eager`` / ``liger compiled``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``
  with ``beta=0`` (forward KL), ``weight_soft_loss=1``, ``weight_hard_loss=0``, chunk 1024,
  ``compiled=False`` / ``True`` (its pure-PyTorch chunked loss; no triton needed), on the
  whole batch's hidden states.

The student copy gets ``--perturb`` relative Gaussian noise so the KL is not zero.

A step is: zero grads, teacher forward (no grad), student forward, loss, backward, AdamW
step (lr 0, so every variant sees identical weights and the losses must agree). Per model,
the first variant gets one warm-up step (it allocates AdamW's state, which is then part of every
baseline), ``liger compiled`` gets its own (compilation), then ``--repeats`` timed steps
run interleaved across variants (robust to load from other processes); the median
time is reported; the extra peak comes from one more step per variant with the memory
sampler on (a sampling thread slows a 2-thread step by up to 40%, so timed steps run
without it). Extra peak memory is the peak of the bytes
``malloc`` has handed out (glibc ``mallinfo2``, sampled every 5 ms) above the level before
the step, the CPU analogue of ``torch.cuda.max_memory_allocated`` (see
:mod:`minicompress.measure`); ``--memory rss`` samples the resident set size instead.

Run: ``nohup python benchmarks/recover_throughput.py > /tmp/recover_throughput.log 2>&1 &``
Prints a rich table; writes ``benchmarks/out/recover_throughput.json``.

``--mode live`` (issue 18) builds the default live-teacher step up one part at a time in one
process, interleaved: compiled decoder layers (the default before issue 18), then the loss's
compiled chunk kernel, then the student's compiled attention backward; ``--malloc keep`` (what
``recover`` does) or ``default`` (glibc's settings) for the whole process. Writes
``benchmarks/out/recover_live-<malloc>.json``.

``--mode defaults`` (issue 9) instead times the library's *default* recovery step
(:class:`~minicompress.config.RecoverConfig` defaults: ``autocast: auto``, so bf16 on CPUs
with AVX512-BF16/AMX; the teacher in bf16; micro batches of 4) against the previous
default, the float32 live-teacher step (micro batches of 1 and of 8), the bf16 step with
eager layers (the default before ``compile: auto``), and the same fed by a sampled teacher
cache (no teacher forward), eager and compiled, all on ``--student`` in one process,
interleaved (compiled variants use a deep copy of the models whose decoder layers went
through :func:`minicompress.distillation.loop.compile_layers_`, with the loss's compiled chunk kernel and,
for the student, :mod:`minicompress.distillation.attention`'s backward, as ``recover`` runs them since issue
18; same weights, lr 0, so every
variant's loss must agree). It also measures this machine's GEMM rate in bf16 and float32 and
reports each variant's share of the FLOP limit ``(2 N_teacher + 6 N_student)`` per token
(``6 N_student`` with a cache). Writes ``benchmarks/out/recover_defaults.json``.
"""

from __future__ import annotations

import sys

import argparse
import copy
import datetime as dt
import functools
import gc
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import DATA, GiB as GIB, cpu_facts, make_console, run_record, write_json
from rich.console import Console

from minicompress import arch
from minicompress.config import DataConfig
from minicompress.data.rows import as_tensor, load_sequences
from minicompress.config import LossConfig
from minicompress.distillation.loop import (make_optimizer, compile_layers_, count_targets, micro_batch_loss,
    shift_labels)
from minicompress.runtime import autocast_context
from minicompress.distillation.losses import LogitLoss, LossNumerics, TeacherTargets, chunked_distill_loss
from minicompress.measure import PeakMemory, release_free_heap
from minicompress.models import load_model

OUT = common.OUT / "recover_throughput.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", help="student HF folder for the SmolLM2 pair (default: a copy of the teacher)")
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma-separated built-in teachers")
    p.add_argument("--smollm-batch", type=int, default=8, help="sequences per step for SmolLM2 (8 x 512 = 4096 tokens)")
    p.add_argument("--gemma-batch", type=int, default=4, help="sequences per step for Gemma-3 (4 x 512 = 2048 tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per variant (plus one memory step)")
    p.add_argument("--warmup-all", action="store_true", help="a warm-up step for every variant, not just the "
                   "first (which allocates the optimizer state) and compiled ones")
    p.add_argument("--variants", default="ours,ours-1batch,naive,liger-eager,liger-compiled")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward of ``ours``")
    p.add_argument("--memory", default="heap", choices=("heap", "rss"), help="CPU memory counter")
    p.add_argument("--bf16", action="store_true", help="also run ours and naive under bf16 autocast (slow without AMX)")
    p.add_argument("--chunk-size", type=int, default=0,
                   help="tokens per chunk of our loss (0: automatic) and of Liger's (0: 1024)")
    p.add_argument("--ours-chunks", default="", help="extra comma-separated chunk sizes to run ours with")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (use 1 when other jobs share the cores: 2 OpenMP threads then run up to 10x "
                        "slower)")
    p.add_argument("--perturb", type=float, default=0.05,
                   help="relative noise added to a copied student so the KL is not 0 (the variants must agree)")
    p.add_argument("--output", default=str(OUT))
    p.add_argument("--loss-only", action="store_true",
                   help="time only lm_head + loss + backward on fixed hidden states (Liger's own benchmark setup)")
    p.add_argument("--append", action="store_true", help="keep the other models' results already in --output")
    p.add_argument("--render", metavar="JSON", help="only print the table of an earlier run's JSON")
    p.add_argument("--without-bf16", action="store_true",
                   help="--mode defaults: time the defaults of a CPU without native bf16 (autocast resolves to none)")
    p.add_argument("--mode", default="variants", choices=("variants", "defaults", "live"),
                   help="variants: ours vs naive vs Liger (issue 4); defaults: default step vs the float32 step; "
                        "live: what each part of the default live-teacher step buys (issue 18)")
    p.add_argument("--malloc", default="keep", choices=("keep", "default"),
                   help="keep: glibc keeps freed blocks mapped, as recover does (hardware.keep_freed_memory); "
                        "default: glibc's own settings")
    return p.parse_args()


# ----------------------------------------------------------------------------------------
# One optimizer step per variant; each returns {"total", parts..., "loss"}


def step_ours(student, teacher, ids, optimizer, chunk_size, autocast="none") -> dict:
    """Hidden states of both models + the chunked fused lm_head/KL loss, timed per part."""
    labels = shift_labels(ids)
    t = {}
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast_context("cpu", autocast):
        t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    t1 = time.perf_counter()
    with autocast_context("cpu", autocast):
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
    t2 = time.perf_counter()
    loss = chunked_distill_loss(hidden, arch.lm_head_weight(student),
                                TeacherTargets(t_hidden, arch.lm_head_weight(teacher)), labels=labels,
                                loss=LogitLoss(kind="forward_kl", kl_weight=1.0, ce_weight=0.0),
                                numerics=LossNumerics(chunk_size=chunk_size))
    t3 = time.perf_counter()
    loss.backward()
    t4 = time.perf_counter()
    optimizer.step()
    t5 = time.perf_counter()
    t.update(teacher_forward=t1 - t0, student_forward=t2 - t1, loss=t3 - t2, student_backward=t4 - t3,
             optimizer=t5 - t4, total=t5 - t0, value=float(loss))
    return t


def step_library(student, teacher, ids, optimizer, chunk_size, autocast="none", micro_batch_size=1) -> dict:
    """The recovery loop's step: micro batches through :func:`micro_batch_loss`, accumulated."""
    loss_cfg = LossConfig(chunk_size=chunk_size)
    normalizer = count_targets(ids)
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, ids.shape[0], micro_batch_size):
        loss, stats = micro_batch_loss(student, ids[start:start + micro_batch_size], loss=loss_cfg, teacher=teacher,
                                       normalizer=normalizer, autocast=autocast)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return {"total": time.perf_counter() - t0, "value": total}


def _with_chunk(step, chunk, student, teacher, ids, optimizer, _chunk_size, autocast="none") -> dict:
    return step(student, teacher, ids, optimizer, chunk, autocast)


def step_naive(student, teacher, ids, optimizer, chunk_size, autocast="none") -> dict:
    """HF forward with full logits for both models, F.kl_div on full log-softmaxes."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast_context("cpu", autocast):
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    with autocast_context("cpu", autocast):
        s_logits = student(input_ids=ids, use_cache=False).logits
    vocab = s_logits.shape[-1]
    # the last position has no next token: score the same N = B * (L - 1) targets as the others
    s_logp = F.log_softmax(s_logits[:, :-1].float().reshape(-1, vocab), dim=-1)
    t_logp = F.log_softmax(t_logits[:, :-1].float().reshape(-1, vocab), dim=-1)
    loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    loss.backward()
    optimizer.step()
    return {"total": time.perf_counter() - t0, "value": float(loss.detach())}


def make_liger_step(compiled: bool, chunk_size: int):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                      compiled=compiled, chunk_size=chunk_size or 1024)

    def step_liger(student, teacher, ids, optimizer, _chunk_size, autocast="none") -> dict:
        labels = shift_labels(ids)[:, :-1].reshape(-1)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        th = t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1])
        loss = loss_fn(h, arch.lm_head_weight(student), th, arch.lm_head_weight(teacher), labels)
        loss.backward()
        optimizer.step()
        return {"total": time.perf_counter() - t0, "value": float(loss.detach())}

    return step_liger


def make_loss_only_steps(student, teacher, ids, chunk_size: int, extra_chunks: tuple[int, ...] = ()) -> dict:
    """Loss-only variants (``--loss-only``): final hidden states are computed once; a step is
    lm_head + KL + backward to the student's hidden states and lm_head weight, as in
    Liger-Kernel's own loss benchmarks. Returns ``{name: step_fn}`` with the step signature."""
    with torch.no_grad():
        h_s = student.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        h_t = teacher.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    h_s, h_t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    w_s, w_t = arch.lm_head_weight(student), arch.lm_head_weight(teacher)
    labels = ids[:, 1:].reshape(-1)

    def timed(fn):
        def step(_student, _teacher, _ids, optimizer, _chunk_size, _autocast="none") -> dict:
            optimizer.zero_grad(set_to_none=True)
            h = h_s.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = fn(h)
            loss.backward()
            return {"total": time.perf_counter() - t0, "value": float(loss.detach())}
        return step

    def ours(h, chunk=chunk_size):
        return chunked_distill_loss(h, w_s, TeacherTargets(h_t, w_t), labels=labels,
                                    loss=LogitLoss(kind="forward_kl", kl_weight=1.0, ce_weight=0.0),
                                    numerics=LossNumerics(chunk_size=chunk))

    def naive(h):
        s_logp = F.log_softmax(F.linear(h, w_s).float(), dim=-1)
        with torch.no_grad():
            t_logp = F.log_softmax(F.linear(h_t, w_t).float(), dim=-1)
        return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")

    steps = {"ours": timed(ours), "naive": timed(naive)}
    for chunk in extra_chunks:
        steps[f"ours-chunk{chunk}"] = timed(lambda h, chunk=chunk: ours(h, chunk))
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        for compiled in (False, True):
            fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=compiled,
                                         chunk_size=chunk_size or 1024)
            steps["liger-compiled" if compiled else "liger-eager"] = timed(
                lambda h, fn=fn: fn(h, w_s, h_t, w_t, labels))
    except Exception as err:  # report exactly why Liger cannot run here
        steps["liger-error"] = f"{type(err).__name__}: {err}"
    return steps


# ----------------------------------------------------------------------------------------


def release_free_memory() -> None:
    """Collect garbage and return free heap pages to the OS, so memory one variant freed is
    not still resident when the next one runs (without it the Gemma-3 naive step was
    OOM-killed on this 24 GiB machine)."""
    gc.collect()
    release_free_heap()


def load_pair(name: str, student_path: str | None, perturb: float):
    teacher, tokenizer = load_model(name)
    if student_path:
        student, _ = load_model(student_path, for_training=True)
    else:
        student = copy.deepcopy(teacher)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * perturb * p.float().std().nan_to_num(0.0))
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    return teacher, student, tokenizer


def brown_rows(tokenizer, batch: int, seq_len: int) -> torch.Tensor:
    """The first ``batch`` sequences of the corpus' Brown text: ``[batch, seq_len]`` token ids."""
    return as_tensor(load_sequences(DataConfig(source=str(DATA / "corpus" / "brown.txt"), seq_len=seq_len,
                                               max_tokens=batch * seq_len * 4), tokenizer)[:batch])


def bench_model(name: str, args, console: Console) -> dict:
    batch = args.smollm_batch if name.startswith("smollm") else args.gemma_batch
    teacher, student, tokenizer = load_pair(name, args.student if name.startswith("smollm") else None, args.perturb)
    ids = brown_rows(tokenizer, batch, args.seq_len)
    optimizer = make_optimizer([p for p in student.parameters()], lr=0.0, weight_decay=0.0)
    extra_chunks = tuple(int(c) for c in args.ours_chunks.split(",") if c)
    wanted = args.variants.split(",") + [f"ours-chunk{c}" for c in extra_chunks]
    liger_error = None
    if args.loss_only:
        steps = make_loss_only_steps(student, teacher, ids, args.chunk_size, extra_chunks)
        liger_error = steps.pop("liger-error", None)
    else:
        steps = {"ours": functools.partial(step_library, micro_batch_size=args.micro_batch_size),
                 "ours-1batch": step_ours, "naive": step_naive}
        for chunk in extra_chunks:
            steps[f"ours-chunk{chunk}"] = functools.partial(_with_chunk, step_ours, chunk)
        for compiled in (False, True):
            try:
                steps["liger-compiled" if compiled else "liger-eager"] = make_liger_step(compiled, args.chunk_size)
            except Exception as err:  # report exactly why Liger cannot run here
                liger_error = f"{type(err).__name__}: {err}"
    variants = {k: (fn, "none") for k, fn in steps.items() if k in wanted}
    if args.bf16 and not args.loss_only:
        variants["ours bf16"] = (step_ours, "bfloat16")
        variants["naive bf16"] = (step_naive, "bfloat16")

    results = {k: {"times": [], "peaks": [], "parts": []} for k in variants}
    console.log(f"{name}: batch {batch} x {args.seq_len}, variants {list(variants)}")
    for i, (key, (fn, autocast)) in enumerate(list(variants.items())):
        # one warm-up step allocates AdamW's state (so it is in every baseline); compiled
        # variants warm up to compile; the others need none (``--warmup-all`` to force it)
        if i > 0 and not args.warmup_all and "compiled" not in key:
            continue
        release_free_memory()
        t0 = time.perf_counter()
        try:
            fn(student, teacher, ids, optimizer, args.chunk_size, autocast)
        except Exception as err:
            results[key]["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            console.log(f"{name} {key}: failed: {results[key]['error']}")
            del variants[key]
            continue
        results[key]["warmup_s"] = time.perf_counter() - t0
        console.log(f"{name} {key}: warm-up {results[key]['warmup_s']:.1f}s")
    # timed steps run without the memory sampler: a sampling thread waking every few ms
    # preempts one of the two OpenMP threads and made a step 40% slower here; memory is
    # measured in one more step per variant, whose time is not used
    for rep in range(args.repeats + 1):
        measure_memory = rep == args.repeats
        for key, (fn, autocast) in variants.items():
            release_free_memory()
            with PeakMemory("cpu", interval_s=0.005, source=args.memory) if measure_memory else nullcontext() as mem:
                parts = fn(student, teacher, ids, optimizer, args.chunk_size, autocast)
            if measure_memory:
                results[key]["peaks"].append(mem.peak)
            else:
                results[key]["times"].append(parts["total"])
                results[key]["parts"].append(parts)
            with open(f"{args.output}.steps.jsonl", "a") as f:  # raw log, survives a killed run
                f.write(json.dumps({"model": name, "variant": key, "rep": rep, "seconds": parts["total"],
                                    "extra_peak_bytes": mem.peak if measure_memory else None,
                                    "loss": parts["value"]}) + "\n")
            console.log(f"{name} {key} {'memory' if measure_memory else f'rep {rep}'}: {parts['total']:.1f}s"
                        + (f", extra peak {mem.peak / GIB:.2f} GiB" if measure_memory else "")
                        + f", loss {parts['value']:.5f}")

    tokens = ids.numel()
    rows = {}
    for key, res in results.items():
        if not res["times"]:
            rows[key] = {"error": res.get("error", "not run")}
            continue
        step_s = statistics.median(res["times"])
        row = {"step_s": step_s, "tokens_per_s": tokens / step_s, "extra_peak_bytes": max(res["peaks"]),
               "extra_peak_gib": max(res["peaks"]) / GIB, "loss": res["parts"][-1]["value"],
               "warmup_s": res.get("warmup_s"), "times": res["times"], "peaks": res["peaks"]}
        if key.startswith("ours") and "teacher_forward" in res["parts"][0]:
            share = {}
            for part in ("teacher_forward", "student_forward", "loss", "student_backward", "optimizer"):
                share[part] = statistics.median(p[part] for p in res["parts"]) / step_s
            row["share"] = share
        rows[key] = row
    if liger_error:
        rows.setdefault("liger-eager", {"error": liger_error})
        rows.setdefault("liger-compiled", {"error": liger_error})
    student_name = args.student if (args.student and name.startswith("smollm")) else "perturbed copy of the teacher"
    out = {"model": name, "student": student_name, "micro_batch_size": args.micro_batch_size,
           "memory_counter": args.memory, "batch": batch, "seq_len": args.seq_len, "tokens": tokens,
           "vocab_size": arch.lm_head_weight(teacher).shape[0], "mode": "loss only" if args.loss_only else "full step",
           "variants": rows}
    if "ours" in rows and "naive" in rows and "step_s" in rows["ours"] and "step_s" in rows["naive"]:
        out["ours_vs_naive_throughput"] = rows["ours"]["tokens_per_s"] / rows["naive"]["tokens_per_s"]
        out["ours_vs_naive_memory"] = rows["ours"]["extra_peak_bytes"] / max(rows["naive"]["extra_peak_bytes"], 1)
    if "ours" in rows and "step_s" in rows.get("liger-compiled", {}):
        out["ours_vs_liger_compiled_memory"] = (rows["ours"]["extra_peak_bytes"]
                                                / max(rows["liger-compiled"]["extra_peak_bytes"], 1))
    del teacher, student, optimizer
    gc.collect()
    return out


def _ratios(row: dict, naive: dict) -> tuple[str, str]:
    """Throughput and extra-peak ratios of a row against the naive row, formatted."""
    if "tokens_per_s" not in naive:
        return "-", "-"
    return (f"{row['tokens_per_s'] / naive['tokens_per_s']:.2f}",
            f"{row['extra_peak_bytes'] / max(naive['extra_peak_bytes'], 1):.2f}")


def render(results: list[dict]):
    rows = []
    for res in results:
        naive = res["variants"].get("naive", {})
        for key, row in res["variants"].items():
            if "error" in row:
                rows.append((res["model"], res["tokens"], key, "-", "-", "-", "-", row["error"][:60]))
                continue
            x_tp, x_mem = _ratios(row, naive)
            rows.append((res["model"], res["tokens"], key, f"{row['tokens_per_s']:.0f}", x_tp,
                         f"{row['extra_peak_gib']:.2f}", x_mem, f"{row['loss']:.5f}"))
    return common.table("Recovery step: one AdamW step of forward-KL distillation, float32, CPU",
                        ("model", "tokens", "variant", "tokens/s", "x naive", "extra peak GiB", "x naive mem", "loss"),
                        rows, left=("model", "variant"))


def markdown(results: list[dict]) -> str:
    mode = results[0].get("mode", "full step") if results else "full step"
    lines = [f"Mode: {mode}.", "",
             "| model (vocab) | tokens/step | variant | tokens/s | x naive | extra peak GiB | x naive mem | loss |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        naive = res["variants"].get("naive", {})
        for key, row in res["variants"].items():
            label = f"{res['model']} ({res['vocab_size']:,})"
            if "error" in row:
                lines.append(f"| {label} | {res['tokens']} | {key} | - | - | - | - | {row['error'][:80]} |")
                continue
            x_tp, x_mem = _ratios(row, naive)
            lines.append(f"| {label} | {res['tokens']} | {key} | {row['tokens_per_s']:.0f} | {x_tp} | "
                         f"{row['extra_peak_gib']:.2f} | {x_mem} | {row['loss']:.5f} |")
    shares = []
    for res in results:
        ours = res["variants"].get("ours", {})
        if "share" in ours:
            s = ours["share"]
            shares.append(f"- {res['model']}, ours: teacher forward {s['teacher_forward']:.0%}, student forward "
                          f"{s['student_forward']:.0%} + backward {s['student_backward']:.0%}, fused loss "
                          f"(lm_head + KL + its gradients) {s['loss']:.0%}, AdamW {s['optimizer']:.0%}")
    return "\n".join(lines) + ("\n\nShare of our step:\n" + "\n".join(shares) if shares else "") + "\n"


def gemm_rate(dtype: torch.dtype, tokens: int = 2048, d_in: int = 576, d_out: int = 1536, repeats: int = 10) -> float:
    """Measured FLOP/s of ``F.linear`` at a representative shape (SmolLM2's MLP up-projection)."""
    x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
    for _ in range(3):
        F.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, w)
    return 2 * tokens * d_in * d_out * repeats / (time.perf_counter() - t0)


def bench_defaults(args, console: Console) -> dict:
    """The default recovery step vs the previous float32 default, one process, interleaved."""
    from minicompress.config import RecoverConfig
    from minicompress.distillation import attention
    from minicompress.hardware import describe_precision, keep_freed_memory
    from minicompress.models import TORCH_DTYPES

    if args.malloc == "keep":  # what recover does on CPU (issue 18)
        keep_freed_memory()
    defaults = RecoverConfig(teacher=None, loss=LossConfig(kl_weight=0.0, ce_weight=1.0))
    precision = describe_precision("none" if args.without_bf16 else defaults.autocast, "cpu")
    auto = precision["resolved"]
    teacher_dtype = "bfloat16" if auto == "bfloat16" else "float32"
    teacher, student, tokenizer = load_pair("smollm2-135m", args.student, args.perturb)
    teacher_low = copy.deepcopy(teacher).to(TORCH_DTYPES[teacher_dtype]) if teacher_dtype != "float32" else teacher
    batch = args.smollm_batch
    ids = brown_rows(tokenizer, batch, args.seq_len)
    with torch.no_grad():  # the sampled cache's targets for this batch: 12 teacher draws per position
        logp = torch.log_softmax(teacher(ids).logits.float(), dim=-1)
        draws = torch.multinomial(logp.view(-1, logp.shape[-1]).exp(), 12, replacement=True,
                                  generator=torch.Generator().manual_seed(0)).view(*ids.shape, 12)
        cached = (logp.gather(-1, draws).to(torch.bfloat16), draws)
        del logp
    optimizer = make_optimizer([p for p in student.parameters()], lr=0.0, weight_decay=0.0)
    loss_cfg = LossConfig()
    normalizer = count_targets(ids)

    # the same weights again, decoder layers compiled (what recover does by default for >= 262k tokens)
    student_c, teacher_c = copy.deepcopy(student), copy.deepcopy(teacher_low)
    if auto == "bfloat16":  # what recover does with compiled layers in bf16 on CPU (issue 18)
        attention.use_training_attention_(student_c)
    compile_layers_(student_c)
    compile_layers_(teacher_c)
    optimizer_c = make_optimizer([p for p in student_c.parameters()], lr=0.0, weight_decay=0.0)

    def make(autocast, t_model, mb, use_cache=False, compiled=False):
        s_model, opt = (student_c, optimizer_c) if compiled else (student, optimizer)
        t_model = teacher_c if compiled and t_model is teacher_low else t_model

        def step():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for start in range(0, ids.shape[0], mb):
                part = slice(start, start + mb)
                targets = (cached[0][part], cached[1][part], "sampled_kl") if use_cache else None
                loss, _ = micro_batch_loss(s_model, ids[part], loss=loss_cfg, teacher=None if use_cache else t_model,
                                           teacher_topk=targets, normalizer=normalizer, autocast=autocast,
                                           compiled=compiled)
                loss.backward()
                total += float(loss.detach())
            opt.step()
            return time.perf_counter() - t0, total
        return step

    mb = defaults.micro_batch_size
    variants = {
        "float32 live, micro 1 (previous)": (make("none", teacher, 1), "live"),
        "float32 live, micro 8 (previous default)": (make("none", teacher, 8), "live"),
        f"{auto} live, eager (previous default)": (make(auto, teacher_low, mb), "live"),
        f"default live ({auto}, compiled, micro {mb})": (make(auto, teacher_low, mb, compiled=True), "live"),
        f"{auto}, sampled cache, eager": (make(auto, teacher_low, mb, use_cache=True), "cached"),
        f"default, sampled cache ({auto}, compiled, micro {mb})": (make(auto, teacher_low, mb, use_cache=True,
                                                                        compiled=True), "cached"),
    }
    for key, (fn, _) in variants.items():  # warm-up (allocates AdamW's state, the loss buffers)
        fn()
        console.log(f"warm-up {key}")
    times = {k: [] for k in variants}
    for rep in range(args.repeats):
        for key, (fn, _) in variants.items():
            seconds, value = fn()
            times[key].append(seconds)
            console.log(f"{key} rep {rep}: {seconds:.2f}s ({ids.numel() / seconds:.0f} tok/s), loss {value:.4f}")
    rates = {"bfloat16": gemm_rate(torch.bfloat16), "float32": gemm_rate(torch.float32)}
    n_teacher = arch.count_parameters(teacher.config)["total"]  # a tied embedding counted once
    n_student = arch.count_parameters(student.config)["total"]
    rows = {}
    base_key = max(list(variants)[:2], key=lambda k: ids.numel() / statistics.median(times[k]))
    for key, (_, kind) in variants.items():
        step_s = statistics.median(times[key])
        tps = ids.numel() / step_s
        flops = (6 * n_student + (2 * n_teacher if kind == "live" else 0))
        rate = rates["bfloat16" if auto == "bfloat16" and not key.startswith("float32") else "float32"]
        rows[key] = {"tokens_per_s": tps, "step_s": step_s, "times": times[key], "flop_per_token": flops,
                     "flop_limit_tokens_per_s": rate / flops, "share_of_flop_limit": tps * flops / rate}
    for key in rows:
        rows[key]["x_previous"] = rows[key]["tokens_per_s"] / rows[base_key]["tokens_per_s"]
    return {"mode": "defaults", "student": args.student, "tokens": ids.numel(), "batch": batch,
            "seq_len": args.seq_len, "precision": precision, "gemm_flops": rates, "teacher_params": n_teacher,
            "student_params": n_student, "baseline": base_key, "variants": rows,
            "cpu": cpu_facts()}


def bench_live(args, console: Console) -> dict:
    """The default live-teacher step, built up one part at a time, one process, interleaved (issue 18).

    Every variant runs ``micro_batch_loss`` + AdamW over the same batch in bf16 autocast with a
    bf16 teacher and compiled decoder layers (the default before issue 18); then the loss's
    compiled chunk kernel (``compiled=True``); then the student's compiled attention backward
    (:mod:`minicompress.distillation.attention`). Each variant has its own deep copy of the models (lr 0:
    the same weights throughout; the losses must agree). ``--malloc`` applies to the whole
    process: run it once with ``keep`` (what ``recover`` does) and once with ``default``.
    """
    import dataclasses

    from minicompress.distillation import attention
    from minicompress.config import RecoverConfig
    from minicompress.hardware import keep_freed_memory

    allocator = keep_freed_memory() if args.malloc == "keep" else "glibc defaults"
    teacher, student, tokenizer = load_pair("smollm2-135m", args.student, args.perturb)
    teacher = teacher.to(torch.bfloat16)
    ids = brown_rows(tokenizer, args.smollm_batch, args.seq_len)
    normalizer = count_targets(ids)
    loss_cfg = LossConfig()
    mb = next(f.default for f in dataclasses.fields(RecoverConfig) if f.name == "micro_batch_size")  # the default

    def make(loss_kernel: bool, attention_backward: bool):
        s_model, t_model = copy.deepcopy(student), copy.deepcopy(teacher)
        if attention_backward:
            attention.use_training_attention_(s_model)
        compile_layers_(s_model)
        compile_layers_(t_model)
        opt = make_optimizer(list(s_model.parameters()), lr=0.0, weight_decay=0.0)

        def step():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for start in range(0, ids.shape[0], mb):
                loss, _ = micro_batch_loss(s_model, ids[start:start + mb], loss=loss_cfg, teacher=t_model,
                                           normalizer=normalizer, autocast="bfloat16", compiled=loss_kernel)
                loss.backward()
                total += float(loss.detach())
            opt.step()
            return time.perf_counter() - t0, total
        return step

    variants = {
        "compiled layers (the default before issue 18)": make(False, False),
        "+ the loss's compiled chunk kernel": make(True, False),
        "+ the compiled attention backward (default)": make(True, True),
    }
    for key, fn in variants.items():  # warm-up: compiles, allocates AdamW's state and the loss buffers
        fn()
        fn()
        console.log(f"warm-up {key}")
    times, values = {k: [] for k in variants}, {k: [] for k in variants}
    for rep in range(args.repeats):
        for key, fn in variants.items():
            seconds, value = fn()
            times[key].append(seconds)
            values[key].append(value)
            console.log(f"{key} rep {rep}: {seconds:.2f}s ({ids.numel() / seconds:.0f} tok/s), loss {value:.5f}")
    base = statistics.median(times[next(iter(variants))])
    rows = {k: {"tokens_per_s": ids.numel() / statistics.median(t), "step_s": statistics.median(t), "times": t,
                "x_before": base / statistics.median(t), "loss": values[k][-1]} for k, t in times.items()}
    return {"mode": "live", "student": args.student, "tokens": ids.numel(), "micro_batch_size": mb,
            "malloc": args.malloc, "allocator": allocator, "variants": rows, "cpu": cpu_facts()}


def render_live(res: dict, console: Console) -> str:
    lines = [f"malloc: {res['malloc']} ({res['allocator']})", "",
             "| variant | tokens/s | x before | step s | loss |", "| --- | ---: | ---: | ---: | ---: |"]
    rows = []
    for key, row in res["variants"].items():
        cells = (f"{row['tokens_per_s']:.0f}", f"{row['x_before']:.2f}", f"{row['step_s']:.2f}", f"{row['loss']:.5f}")
        rows.append((key, *cells))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    console.print(common.table(f"Default live step, {res['tokens']} tokens/step, malloc {res['malloc']}, "
                               f"{res['cpu']['model']} (avx512_bf16={res['cpu']['avx512_bf16']}, "
                               f"amx={res['cpu']['amx_bf16']})",
                               ("variant", "tokens/s", "x before", "step s", "loss"), rows))
    return "\n".join(lines) + "\n"


def render_defaults(res: dict, console: Console) -> str:
    rows = []
    lines = ["| variant | tokens/s | x previous | MFLOP/token | FLOP-limit tok/s | share of limit |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, row in res["variants"].items():
        cells = (f"{row['tokens_per_s']:.0f}", f"{row['x_previous']:.2f}", f"{row['flop_per_token'] / 1e6:.0f}",
                 f"{row['flop_limit_tokens_per_s']:.0f}", f"{row['share_of_flop_limit']:.0%}")
        rows.append((key, *cells))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    console.print(common.table(f"Default recovery step, {res['tokens']} tokens/step, {res['cpu']['model']} "
                               f"(avx512_bf16={res['cpu']['avx512_bf16']}, amx={res['cpu']['amx_bf16']})",
                               ("variant", "tokens/s", "x previous", "FLOP/token", "FLOP-limit tok/s",
                                "share of limit"), rows))
    rates = res["gemm_flops"]
    lines.append(f"\nGEMM rate (F.linear 2048x576x1536): bf16 {rates['bfloat16'] / 1e12:.2f} TFLOP/s, "
                 f"float32 {rates['float32'] / 1e12:.2f} TFLOP/s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    console = make_console()
    if args.mode in ("live", "defaults"):  # one step, variants side by side: (run, render, JSON name)
        bench, render_mode, name = {"live": (bench_live, render_live, f"recover_live-{args.malloc}.json"),
                                    "defaults": (bench_defaults, render_defaults, "recover_defaults.json")}[args.mode]
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        out = Path(args.output).with_name(name) if args.output == str(OUT) else Path(args.output)
        if args.render:
            res = json.loads(Path(args.render).read_text())
        else:
            res = bench(args, console)
            res.update(date=dt.date.today().isoformat(), argv=sys.argv, torch=torch.__version__,
                       threads=torch.get_num_threads(), versions=common.versions())
            write_json(out, res)
        sys.stdout.write(render_mode(res, console))
        return
    if args.render:
        results = json.loads(Path(args.render).read_text())["results"]
        console.print(render(results))
        sys.stdout.write(markdown(results))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    if args.append and Path(args.output).is_file():  # add models to an earlier run's results
        results = json.loads(Path(args.output).read_text())["results"]
    started = time.perf_counter()
    for name in args.models.split(","):
        results = [r for r in results if r["model"] != name]
        results.append(bench_model(name, args, console))
        record = run_record(argv=sys.argv, torch=torch.__version__, threads=torch.get_num_threads(),
                            seconds=time.perf_counter() - started, results=results)
        write_json(args.output, record)
    console.print(render(results))
    sys.stdout.write(markdown(results))


if __name__ == "__main__":
    main()

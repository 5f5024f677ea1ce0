"""Peers at about 50% of SmolLM2-135M: recovery trainers and pruning methods, resumable (issue 18).

Two parts (``--part``), each a list of rows (``--methods``), every row a resumable run under
``--workdir`` (default ``~/.cache/minicompress/runs/peers``): a finished row is skipped when
the same command runs again, an interrupted recovery resumes from its last checkpoint, and
the JSON (``benchmarks/out/peers.json``) and the PNG (``peers.png``) are rewritten after
every row. Every training run is a child process of its own (``--child``), so its peak
resident memory (``VmHWM``, read right after training, before evaluation) is its own.

**Recovery peers** (``--part recovery``): the same pruned student (``--student``), the same
training rows in the same order (the rows ``minicompress recover`` reads: the seeded shuffle
of ``../shared/data/corpus`` minus its held-out rows), the same token budget (``--tokens``),
the same schedule (AdamW betas 0.9/0.95, lr 1e-3, warmup a tenth of the steps up to 10,
cosine to 0, grad clip 1, 8 x 512 tokens per step as 2 micro batches of 4), bf16 autocast
over float32 master weights where the CPU has native bf16 (as ``autocast: auto``):

* ``ours``: ``minicompress recover`` with 0.5 forward KL + 0.5 CE (its default when these rows
  were measured; live bf16 teacher, decoder layers compiled from 262,144 tokens on);
* ``ours-kl`` (forward KL only, GKD's loss; ``recover``'s default since) and ``ours-ce`` (CE
  only, SFT's loss);
* ``trl-gkd``: TRL 1.16 ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy
  generation), ``beta=0`` (forward KL), temperature 1. Its collator (``DataCollatorForChatML``)
  needs chat messages: each 512-token row becomes ``user`` = its first 64 tokens decoded,
  ``assistant`` = the other 448 decoded, rendered by SmolLM2's chat template (which adds a
  system prompt) and cut by the collator to the last ``max_length=512`` tokens, so every
  example is 512 real tokens (no padding): 62 prompt positions (the last ~57 user tokens and
  the turn markers) and 450 trained ones (the 448 assistant tokens and the closing marker);
* (on-policy GKD, ``lmbda > 0``, and TRL's ``DistillationTrainer`` run from
  ``benchmarks/peers_gkd.py``, beside ``minicompress recover --on-policy``: issue 29);
* ``trl-gkd-liger``: the same with ``use_liger_kernel=True`` (Liger's kernels are Triton: it
  runs from its own environment, ``--liger-python``; on a CPU the row records the error);
* ``trl-sft``: TRL ``SFTTrainer``, cross-entropy only, on the very same token rows
  (``input_ids`` given, no packing, ``max_length=512``);
* ``ours-kl-glibc`` / ``trl-gkd-malloc`` (not in the default set): the allocator ablation.
  ``recover`` keeps freed heap blocks mapped (:func:`minicompress.hardware.keep_freed_memory`);
  the first row runs it with glibc's defaults, the second gives TRL the same setting through
  glibc's ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``.

TRL runs with ``gradient_checkpointing=False`` (its default is True: slower; see
``--trl-gradient-checkpointing``), ``train_sampling_strategy="sequential"`` (the same order as
ours) and HF's cosine schedule (its warmup starts at lr 0, ours at lr/warmup). Tokens/s counts
real tokens (attention mask), not padding; the loss tokens (positions with a label) are
reported too. The training clock sums optimizer steps (data, forward, backward, update) and
leaves out checkpoint writing and evaluation, for TRL and for ours alike.

**Pruning peers** (``--part pruning``), each pruned from the teacher, evaluated, then recovered
by ``minicompress recover`` with the same settings and budget as the ``ours-kl`` row (forward KL
alone, ``recover``'s default):

* ``ours-searched``: ``--student`` (our pruner's searched shape) - its recovery is the ``ours-kl`` run;
* ``ours-fixed``: our activation importance (``--scores``) at the peers' fixed shape;
* ``shortgpt``: ShortGPT (Men et al., arXiv 2403.03853): drop the layers of lowest Block
  Influence ``1 - cos(x_in, x_out)``, computed by minicompress's own scorer (the same BI);
* ``taylor``: LLM-Pruner-style first-order Taylor importance (Ma et al., arXiv 2305.11627):
  ``sum |w * dL/dw|`` per query head (q rows, o columns, its share of k/v rows), FFN neuron
  (gate/up rows, down column) and hidden channel (every weight reading or writing it, the
  norms, the tied embedding), gradients of the LM loss on ``--taylor-samples`` corpus rows; pruned
  uniformly to the fixed shape by minicompress's plan (LLM-Pruner itself prunes per layer and
  does not write a stock HF model);
* ``torch-pruning``: Torch-Pruning 1.6.1's LLM example with ``GroupTaylorImportance``, in its
  own environment (``--tp-python``, see ``benchmarks/peers_torch_pruning.py``), ratio 1/3;
* ``magnitude`` and ``random``: weight-magnitude (group L2) and random importance, floors;
* ``modelopt``: NVIDIA Model Optimizer's Minitron pruning (``mcore_minitron``) needs
  Megatron-Core and Transformer Engine (CUDA); the row records what was tried (``--modelopt-python``).

Install the peers (benchmark-only, never minicompress dependencies)::

    pip install "trl==1.16.*"                       # keeps torch 2.13.0 and transformers 5.24.0
    python -m venv --system-site-packages ~/.cache/minicompress/venvs/liger
    ~/.cache/minicompress/venvs/liger/bin/pip install liger-kernel==0.8.5     # + triton 3.9.0
    python -m venv ~/.cache/minicompress/venvs/torch-pruning
    ~/.cache/minicompress/venvs/torch-pruning/bin/pip install torch==2.13.0 transformers==4.48.3 \\
        torch-pruning==1.6.1 safetensors
    python -m venv --system-site-packages ~/.cache/minicompress/venvs/modelopt     # optional
    ~/.cache/minicompress/venvs/modelopt/bin/pip install nvidia-modelopt==0.47.0 megatron-core

Run: ``python benchmarks/peers.py --part all`` (``--tokens 1M`` for the longer budget);
``--tiny`` runs every path on a tiny random Llama (SmolLM2's tokenizer) and a 60 kB corpus,
20-30 s a row on one core (most of it starting processes), a few minutes for all rows.
Evaluation: the first 16,384 tokens of WikiText-2 test (windows of 512) and the corpus rows
``recover`` holds out (``--held-out-tokens``): perplexity and KL(teacher || student).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import DATA, OUT

WORKDIR = Path("~/.cache/minicompress/runs/peers").expanduser()
VENVS = Path("~/.cache/minicompress/venvs").expanduser()
STUDENT = "~/.cache/minicompress/runs/students/smollm2-50-searched"
SCORES = "~/.cache/minicompress/runs/scores/smollm2-128"

#: glibc's environment for what ``keep_freed_memory`` sets with mallopt: no mmap, never trim
GLIBC_KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}
#: recovery rows: how each trains the student
RECOVERY = {
    "ours": {"kind": "ours", "loss": {"kl_weight": 0.5, "ce_weight": 0.5},
             "what": "minicompress recover, 0.5 KL + 0.5 CE (the default until 2026-12-03)"},
    "ours-kl": {"kind": "ours", "loss": {"kl_weight": 1.0, "ce_weight": 0.0},
                "what": "minicompress recover, forward KL (the default)"},
    "ours-ce": {"kind": "ours", "loss": {"kl_weight": 0.0, "ce_weight": 1.0}, "what": "minicompress recover, CE only"},
    "trl-gkd": {"kind": "gkd", "liger": False, "what": "TRL GKDTrainer lmbda=0 beta=0 (forward KL)"},
    "trl-gkd-liger": {"kind": "gkd", "liger": True, "what": "TRL GKDTrainer lmbda=0 beta=0, use_liger_kernel"},
    "trl-sft": {"kind": "sft", "what": "TRL SFTTrainer (cross-entropy)"},
    # the allocator ablation (issue 18): recover keeps freed blocks mapped (minicompress.hardware.keep_freed_memory);
    # ours with glibc's defaults, and TRL given the same setting through glibc's environment variables
    "ours-kl-glibc": {"kind": "ours", "loss": {"kl_weight": 1.0, "ce_weight": 0.0},
                      "env": {"MINICOMPRESS_MALLOC": "default"},
                      "what": "minicompress recover, forward KL, glibc's malloc defaults (MINICOMPRESS_MALLOC=default)"},
    "trl-gkd-malloc": {"kind": "gkd", "liger": False, "env": GLIBC_KEEP_FREED,
                       "what": "TRL GKDTrainer lmbda=0 beta=0, MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64G"},
}
DEFAULT_RECOVERY = ("ours", "ours-kl", "trl-gkd", "trl-gkd-liger", "trl-sft")
#: pruning rows, in order; each is recovered by ``minicompress recover`` as the ``ours-kl`` row (forward KL)
PRUNING = {
    "ours-searched": "minicompress prune, searched shape (--student)",
    "ours-fixed": "minicompress activation importance, fixed shape",
    "shortgpt": "ShortGPT: drop lowest Block Influence layers",
    "taylor": "LLM-Pruner-style first-order Taylor |w*dL/dw|",
    "torch-pruning": "Torch-Pruning 1.6.1 GroupTaylorImportance (LLM example)",
    "magnitude": "weight magnitude (group L2), floor",
    "random": "random importance, floor",
    "modelopt": "NVIDIA ModelOpt Minitron (mcore_minitron)",
}
#: the peers' fixed uniform shape at ~50% of SmolLM2-135M (Torch-Pruning's r=1/3: 384/6/3/1024/30)
FIXED = {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 1024}
SHORTGPT_LAYERS = 11  # 30 -> 11 layers: 0.500 of the parameters
#: --tiny: a 6-layer 96-wide random Llama with SmolLM2's tokenizer, shapes scaled alike
TINY_TEACHER = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=16)
TINY_FIXED = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
TINY_SEARCHED = {"num_hidden_layers": 4, "intermediate_size": 96}
TINY_SHORTGPT_LAYERS = 2
MODELOPT_REASON = (
    "not run: ModelOpt 0.47.0's mcore_minitron prunes Megatron-Core GPT/Mamba models only (a HF model must first "
    "be converted with Megatron-Bridge); its plugin imports megatron.core (parallel_state, tensor_parallel) and "
    "Transformer Engine's TELayerNormColumnParallelLinear, and without them mtp.prune has no 'mcore_minitron' "
    "mode; Transformer Engine builds against CUDA/cuDNN (pip pulls nvidia-cudnn-frontend and CUTLASS); NVIDIA "
    "runs it in the NeMo container with --gpus all")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("recovery", "pruning", "all"), default="all")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated rows (default: every row of the part but ours-ce): recovery "
                        f"{', '.join(RECOVERY)}; "
                        f"pruning {', '.join(PRUNING)}")
    p.add_argument("--tokens", default=None, help="recovery budget per run (default 262144; --tiny: 4096); 1M ...")
    p.add_argument("--student", default=STUDENT, help="pruned student HF folder (ours-searched)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA / "corpus"))
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--wikitext-tokens", type=int, default=16384)
    p.add_argument("--held-out-tokens", type=int, default=8192,
                   help="held-out corpus tokens evaluated (within recover's eval_tokens rows, never trained on)")
    p.add_argument("--scores", default=SCORES, help="the teacher's activation scores (minicompress score); "
                                                    "computed on --calib-samples rows when missing")
    p.add_argument("--calib-samples", type=int, default=128, help="rows of 512 for activation scores if computed")
    p.add_argument("--taylor-samples", type=int, default=32, help="rows of 512 for the Taylor gradients")
    p.add_argument("--prompt-tokens", type=int, default=64, help="GKD: tokens of each row put in the user turn")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (slower)")
    p.add_argument("--tp-python", default=str(VENVS / "torch-pruning" / "bin" / "python"))
    p.add_argument("--liger-python", default=str(VENVS / "liger" / "bin" / "python"))
    p.add_argument("--modelopt-python", default=str(VENVS / "modelopt" / "bin" / "python"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(WORKDIR))
    p.add_argument("--output", default=None,
                   help="JSON path (default benchmarks/out/peers.json; --tiny: <workdir>/tiny/peers-tiny.json)")
    p.add_argument("--tiny", action="store_true", help="every path on a tiny random Llama and corpus (smoke test)")
    p.add_argument("--render", action="store_true", help="only print the tables and redraw the PNG from the JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# settings shared by the parent and its children


def settings(args) -> dict:
    """The run's numbers: budget, sequence length, evaluation sizes, shapes, folders."""
    from minicompress.config import RecoverConfig, build_config

    tokens = build_config(RecoverConfig, overrides={"tokens": args.tokens or ("4096" if args.tiny else "262144"),
                                                    "loss": {"kl_weight": 0, "ce_weight": 1}}).tokens
    base = Path(args.workdir).expanduser() / ("tiny" if args.tiny else "")
    s = {"tokens": tokens, "seed": args.seed, "threads": args.threads, "base": str(base),
         "runs": str(base / f"runs-{tokens}"), "pruned": str(base / "pruned"), "wikitext": args.wikitext,
         "teacher": args.teacher, "student": str(Path(args.student).expanduser()), "data": args.data,
         "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "tiny": args.tiny}
    if args.tiny:
        s.update(seq_len=64, recover={"global_batch_tokens": 512, "eval_tokens": 256}, held_out_tokens=256,
                 wikitext_tokens=1024, prompt_tokens=16, calib_samples=8, taylor_samples=8, fixed=TINY_FIXED,
                 shortgpt_layers=TINY_SHORTGPT_LAYERS)
    else:
        s.update(seq_len=512, recover={}, held_out_tokens=args.held_out_tokens, wikitext_tokens=args.wikitext_tokens,
                 prompt_tokens=args.prompt_tokens, calib_samples=args.calib_samples,
                 taylor_samples=args.taylor_samples, fixed=FIXED, shortgpt_layers=SHORTGPT_LAYERS)
    return s


def recover_config(spec: dict, output: Path, loss: dict | None = None):
    """The ``RecoverConfig`` every recovery row shares (``minicompress recover``'s defaults)."""
    from minicompress.config import RecoverConfig, build_config

    cfg = build_config(RecoverConfig, overrides={
        **spec["recover"], "student": {"source": spec["student"]}, "teacher": {"source": spec["teacher"]},
        "data": {"source": spec["data"], "seed": spec["seed"], "seq_len": spec["seq_len"]},
        "tokens": spec["tokens"], "seed": spec["seed"], "output": str(output), "resume": True,
        **({"loss": loss} if loss else {})})
    steps = cfg.tokens // cfg.global_batch_tokens
    import dataclasses

    return dataclasses.replace(cfg, save_every=max(steps // 8, 1))


def eval_teacher(source: str):
    """The teacher for evaluation, in bf16 where bf16 autocast runs (what ``recover`` does)."""
    import torch

    from minicompress.hardware import describe_precision
    from minicompress.models import load_model

    teacher, tokenizer = load_model(source)
    if describe_precision("auto", "cpu")["resolved"] == "bfloat16":
        teacher = teacher.to(torch.bfloat16)
    return teacher, tokenizer


class Evaluator:
    """WikiText-2 windows and held-out corpus rows (``recover_quality``'s), scored against the teacher."""

    def __init__(self, spec: dict, teacher=None, tokenizer=None):
        from recover_quality import corpus_held_out_windows, wikitext_windows

        if teacher is None:
            teacher, tokenizer = eval_teacher(spec["teacher"])
        self.teacher = teacher
        self.wikitext = wikitext_windows(spec["wikitext"], tokenizer, spec["wikitext_tokens"], spec["seq_len"])
        self.corpus = corpus_held_out_windows(spec["data"], tokenizer, spec["held_out_tokens"], spec["seed"],
                                              spec["seq_len"])

    def __call__(self, model) -> dict:
        from recover_quality import evaluate_wikitext

        return {"wikitext": evaluate_wikitext(model, self.wikitext, self.teacher),
                "corpus": evaluate_wikitext(model, self.corpus, self.teacher)}


# ---------------------------------------------------------------------------------------
# child: one training run in its own process


def train_ours(spec: dict, out: Path) -> dict:
    """``minicompress recover`` (resumes from ``<out>/model.partial``)."""
    from minicompress.config import to_dict
    from minicompress.recipes import recover as recover_recipe

    cfg = recover_config(spec, out / "model", spec["loss"])
    rec = recover_recipe.recover(cfg)
    rows = rec["tokens"] // cfg.data.seq_len
    return {"model": str(out / "model"), "steps": rec["steps"], "tokens": rec["tokens"], "real_tokens": rec["tokens"],
            "padded_tokens": rec["tokens"], "loss_tokens": rows * (cfg.data.seq_len - 1), "seconds": rec["seconds"],
            "tokens_per_s": rec["tokens"] / max(rec["seconds"], 1e-9), "final_loss": rec["final_loss"],
            "resumed_from_step": rec["resumed_from_step"], "config": to_dict(cfg)}


def chat_rows(rows, tokenizer, prompt_tokens: int) -> list[dict]:
    """Token rows as GKD's chat examples: the first ``prompt_tokens`` tokens decoded as the user
    turn, the rest as the assistant turn (special tokens such as EOS kept as text)."""
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    return [{"messages": [{"role": "user", "content": tokenizer.decode(r[:prompt_tokens], **kw)},
                          {"role": "assistant", "content": tokenizer.decode(r[prompt_tokens:], **kw)}]}
            for r in rows]


def trl_arguments(cfg, output_dir: Path, *, bf16: bool, gradient_checkpointing: bool = False,
                  liger: bool = False) -> dict:
    """TRL / HF ``TrainingArguments`` keys for ``cfg``'s schedule: the same rows per micro batch and
    per step, lr, warmup steps, AdamW betas and eps, weight decay, clip, steps and checkpoints."""
    from minicompress.distillation.loop import ADAM_BETAS, ADAM_EPS, default_warmup_steps

    seq_len, mbs = cfg.data.seq_len, cfg.micro_batch_size
    steps = cfg.tokens // cfg.global_batch_tokens
    return dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=mbs,
                gradient_accumulation_steps=cfg.global_batch_tokens // (mbs * seq_len), learning_rate=cfg.lr,
                lr_scheduler_type="cosine",
                warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup_steps(steps),
                weight_decay=cfg.weight_decay, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
                adam_epsilon=ADAM_EPS, max_grad_norm=cfg.grad_clip, bf16=bf16, use_cpu=True,
                gradient_checkpointing=gradient_checkpointing, max_length=seq_len, train_sampling_strategy="sequential",
                seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_every,
                save_total_limit=1, logging_steps=cfg.log_every, report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, use_liger_kernel=liger)


def new_clock() -> dict:
    """The training clock a TRL run keeps (and writes into each of its checkpoints)."""
    return {"seconds": 0.0, "real_tokens": 0, "padded_tokens": 0, "loss_tokens": 0, "steps": 0, "step_seconds": []}


def clock_callback(clock: dict):
    """A ``TrainerCallback`` that sums optimizer steps (data, generation, forward, backward,
    update) into ``clock``, not checkpoint writing, and writes ``clock`` into each checkpoint."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        t = None

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            clock["seconds"] += now - self.t
            clock.setdefault("step_seconds", []).append(now - self.t)
            clock["steps"] = state.global_step
            self.t = now

        def on_save(self, args, state, control, **kw):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / "peers_clock.json").write_text(json.dumps(clock))
            self.t = time.perf_counter()

    return Clock()


def counting(cls, clock: dict):
    """``cls`` (a TRL trainer) counting what each micro batch trains on into ``clock``; the loss is TRL's own."""

    class Counting(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "completion_ids" in inputs:  # DistillationTrainer: prompt and generated completion apart
                clock["padded_tokens"] += inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
                clock["real_tokens"] += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
                clock["loss_tokens"] += int(inputs["completion_mask"].sum())
            else:
                ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
                clock["padded_tokens"] += ids.numel()
                clock["real_tokens"] += int(mask.sum()) if mask is not None else ids.numel()
                clock["loss_tokens"] += int((labels[:, 1:] != -100).sum()) if labels is not None else 0
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return Counting


def train_trl(spec: dict, out: Path, teacher, tokenizer) -> dict:
    """TRL's GKDTrainer (``spec``'s ``lmbda``, ``beta``, ``max_new_tokens``; 0, 0, 128 unless
    given) or SFTTrainer on the rows ``recover`` trains on, in the same order."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    from minicompress.data.rows import load_training_data
    from minicompress.hardware import describe_precision
    from minicompress.models import load_model
    cfg = recover_config(spec, out / "model")
    bf16 = describe_precision(cfg.autocast, "cpu")["resolved"] == "bfloat16"
    work = out / "trainer"
    common = trl_arguments(cfg, work, bf16=bf16, gradient_checkpointing=spec["trl_gradient_checkpointing"],
                           liger=bool(spec.get("liger")))
    mbs, accum = common["per_device_train_batch_size"], common["gradient_accumulation_steps"]
    steps = common["max_steps"]
    student, _ = load_model(spec["student"], for_training=True)
    data = load_training_data(cfg.data, tokenizer, cfg.eval_tokens, seed=cfg.seed)
    rows = data.rows(torch.arange(steps * accum * mbs)).tolist()
    kind = spec["kind"]
    if kind == "gkd":
        dataset = Dataset.from_list(chat_rows(rows, tokenizer, spec["prompt_tokens"]))
    elif kind == "distillation":  # prompts only: every completion is the student's own (on-policy)
        dataset = Dataset.from_list([{"prompt": r["messages"][:1]}
                                     for r in chat_rows(rows, tokenizer, spec["prompt_tokens"])])
    else:
        dataset = Dataset.from_list([{"input_ids": r} for r in rows])
    ckpt = get_last_checkpoint(str(work)) if work.is_dir() else None
    clock = json.loads((Path(ckpt) / "peers_clock.json").read_text()) if ckpt else new_clock()
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=spec.get("lmbda", 0.0), beta=spec.get("beta", 0.0), temperature=1.0,
                         max_new_tokens=spec.get("max_new_tokens", 128))
        trainer = counting(GKDTrainer, clock)(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                              processing_class=tokenizer, callbacks=[clock_callback(clock)])
    elif kind == "distillation":
        import dataclasses

        from trl import DistillationConfig, DistillationTrainer

        known = {f.name for f in dataclasses.fields(DistillationConfig)}
        tokenizer.padding_side = "left"  # DistillationTrainer generates from left-padded prompts
        args = DistillationConfig(**{k: v for k, v in common.items() if k in known}, beta=spec.get("beta", 0.0),
                                  temperature=1.0, top_k=0, top_p=1.0,
                                  max_completion_length=spec.get("max_new_tokens", 128), shuffle_dataset=False)
        trainer = counting(DistillationTrainer, clock)(model=student, teacher_model=teacher, args=args,
                                                       train_dataset=dataset, processing_class=tokenizer,
                                                       callbacks=[clock_callback(clock)])
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, packing=False)
        trainer = counting(SFTTrainer, clock)(model=student, args=args, train_dataset=dataset,
                                              processing_class=tokenizer, callbacks=[clock_callback(clock)])
    metrics = trainer.train(resume_from_checkpoint=ckpt).metrics
    model_dir = out / "model"
    trainer.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    shutil.rmtree(work, ignore_errors=True)
    return {"model": str(model_dir), "steps": steps, "tokens": steps * cfg.global_batch_tokens, **clock,
            "tokens_per_s": clock["real_tokens"] / max(clock["seconds"], 1e-9),
            "final_loss": losses[-1] if losses else metrics.get("train_loss"),
            "trainer_runtime_s": metrics.get("train_runtime"), "resumed_from": ckpt, "bf16": bf16,
            "warmup_steps": common["warmup_steps"], "gradient_accumulation_steps": accum,
            "peer_versions": {"trl": trl.__version__, "transformers": transformers.__version__}}


def child_main(spec_path: str) -> None:
    """Train one row (unless its ``train_stats.json`` exists), record the peak memory, evaluate."""
    import logging

    import torch

    from common import run_record, status_kib, write_json
    from minicompress.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    out = Path(spec["output"])
    stats_path = out / "train_stats.json"
    teacher = tokenizer = None
    if not stats_path.is_file():
        if spec["kind"] == "ours":
            stats = train_ours(spec, out)
        else:  # only GKD holds a teacher while training (in bf16 where bf16 autocast runs, as ours)
            from transformers import AutoTokenizer

            if spec["kind"] in ("gkd", "distillation"):
                teacher, tokenizer = eval_teacher(spec["teacher"])
            else:
                tokenizer = AutoTokenizer.from_pretrained(spec["student"])
            stats = train_trl(spec, out, teacher, tokenizer)
            if teacher is None:
                tokenizer = None
        import resource

        # VmHWM: this process; compile workers (inductor's C++ builds, ours only) are children, reported apart
        stats.update(peak_rss_mib=status_kib("VmHWM") / 1024,
                     peak_rss_children_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                     method=spec["method"], kind=spec["kind"], student=spec["student"], threads=spec["threads"])
        write_json(stats_path, stats)
    stats = json.loads(stats_path.read_text())
    if spec.get("evaluate") is False:  # the caller evaluates (benchmarks/peers_gkd.py)
        return
    evaluate = Evaluator(spec, teacher, tokenizer)
    model, _ = load_model(stats["model"])
    write_json(out / "result.json", run_record(**stats, **evaluate(model), status="done"))


# ---------------------------------------------------------------------------------------
# parent: pruning, the children, the record


def shape_of(config) -> str:
    from prune_quality import shape_of as shape

    return shape(config)


def make_tiny(base: Path, seed: int) -> dict:
    """A tiny random Llama teacher with SmolLM2's tokenizer, a tiny corpus and a searched-like student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from minicompress.models import resolve_source
    from minicompress.outputs import atomic_folder
    from minicompress.pruning.plan import make_plan, pruned_copy
    from minicompress.pruning.scoring import score_model

    paths = {"teacher": base / "teacher", "student": base / "student", "data": base / "corpus"}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[0])
    if not paths["data"].exists():
        text = (DATA / "corpus" / "brown.txt").read_text()[:60000]
        paths["data"].mkdir(parents=True)
        (paths["data"] / "tiny.txt").write_text(text[:text.rfind("\n\n")])
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                         rope_theta=100000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TINY_TEACHER)
    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if not paths["teacher"].exists():
        with atomic_folder(paths["teacher"]) as tmp:
            teacher.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    if not paths["student"].exists():
        ids = torch.randint(0, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(seed))
        scores = score_model(teacher, [ids[:4], ids[4:]])
        student = pruned_copy(teacher, make_plan(scores, teacher.config, TINY_SEARCHED))
        with atomic_folder(paths["student"]) as tmp:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return {k: str(v) for k, v in paths.items()}


def taylor_scores(model, batches, like):
    """LLM-Pruner-style first-order Taylor importance ``sum |w * dL/dw|`` per unit.

    Args:
        model: a Llama-family ``*ForCausalLM`` (its gradients are cleared after).
        batches: ``[B, T]`` token batches; the gradient is that of the mean LM loss over them.
        like: scores of the same model whose ``block_distance`` is kept (layer drops).

    Returns:
        :class:`~minicompress.pruning.scoring.ImportanceScores`: a query head sums its ``q_proj`` rows
        and ``o_proj`` columns plus an equal share of its KV head's ``k_proj``/``v_proj`` rows
        (``[L, H]``); a neuron its ``gate``/``up`` rows and ``down`` column (``[L, F]``); a hidden
        channel every weight reading or writing it, the RMSNorm weights and the (tied)
        embedding column (``[hidden]``).
    """
    import torch

    from minicompress.arch import decoder_layers, embed_tokens, final_norm, head_dim, num_kv_heads
    from minicompress.pruning.scoring import ImportanceScores

    cfg = model.config
    hd, heads_n, kv = head_dim(cfg), cfg.num_attention_heads, num_kv_heads(cfg)
    group = heads_n // kv
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (model(input_ids=batch, labels=batch).loss / len(batches)).backward()

    def s(p):
        return (p.detach().float() * p.grad.float()).abs()

    emb = embed_tokens(model).weight
    channels = s(emb).sum(0)
    if model.get_output_embeddings().weight is not emb:
        channels = channels + s(model.get_output_embeddings().weight).sum(0)
    heads, neurons = [], []
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        q = s(a.q_proj.weight).view(heads_n, hd, -1).sum((1, 2)) + s(a.o_proj.weight).view(-1, heads_n, hd).sum((0, 2))
        kv_part = (s(a.k_proj.weight) + s(a.v_proj.weight)).view(kv, hd, -1).sum((1, 2))
        heads.append(q + (kv_part / group).repeat_interleave(group))
        neurons.append(s(m.gate_proj.weight).sum(1) + s(m.up_proj.weight).sum(1) + s(m.down_proj.weight).sum(0))
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            channels = channels + s(lin.weight).sum(0)
        for lin in (a.o_proj, m.down_proj):
            channels = channels + s(lin.weight).sum(1)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            channels = channels + s(norm.weight)
    channels = channels + s(final_norm(model).weight)
    model.zero_grad(set_to_none=True)
    return ImportanceScores(heads=torch.stack(heads), neurons=torch.stack(neurons), channels=channels,
                            block_distance=like.block_distance,
                            meta={"kind": "taylor", "rows": sum(b.shape[0] for b in batches)})


class Pruner:
    """Makes the pruning peers' HF folders from the teacher (in this process, except Torch-Pruning)."""

    def __init__(self, s: dict, args, console):
        import torch

        from minicompress.models import load_model

        self.s, self.args, self.console = s, args, console
        self.teacher, self.tokenizer = load_model(s["teacher"])
        self.teacher.float().eval()
        self._scores = self._batches = None
        torch.manual_seed(s["seed"])

    def batches(self):
        """Calibration rows of the corpus: ``[B, L]`` batches of 4."""
        from minicompress.config import DataConfig, ScoreConfig
        from minicompress.data.rows import calibration_batches

        if self._batches is None:
            n = max(self.s["calib_samples"], self.s["taylor_samples"])
            cfg = ScoreConfig(data=DataConfig(source=self.s["data"], seq_len=self.s["seq_len"], seed=self.s["seed"]),
                              num_samples=n, batch_size=4, loss_samples=0)
            self._batches = calibration_batches(cfg, self.tokenizer)[0]
        return self._batches

    def scores(self):
        """The teacher's activation scores: ``--scores`` if it fits the teacher, else computed."""
        from minicompress.errors import MinicompressError
        from minicompress.pruning.scoring import ImportanceScores, score_model

        if self._scores is None:
            folder = Path(self.args.scores).expanduser()
            try:
                if self.s["tiny"]:
                    raise MinicompressError("tiny")
                self._scores = ImportanceScores.load(folder)
                self._scores.check_compatible(self.teacher.config)
                self.console.log(f"activation scores from {folder}")
            except MinicompressError:
                n = self.s["calib_samples"] // 4
                self._scores = score_model(self.teacher, self.batches()[:max(n, 1)])
                self.console.log(f"activation scores computed on {max(n, 1) * 4} rows")
        return self._scores

    def taylor_scores(self):
        batches = self.batches()[:max(self.s["taylor_samples"] // 4, 1)]
        return taylor_scores(self.teacher, batches, self.scores())

    def prune(self, method: str, folder: Path) -> dict:
        """Write ``folder`` (a stock HF model) for ``method``; returns what was done."""
        from prune_quality import magnitude_scores, random_scores

        from minicompress.outputs import atomic_folder
        from minicompress.pruning.plan import make_plan, pruned_copy

        t0 = time.perf_counter()
        if method == "torch-pruning":
            return self.torch_pruning(folder)
        fixed = dict(self.s["fixed"])
        importance, target = {
            "ours-fixed": (self.scores, fixed),
            "shortgpt": (self.scores, {"num_hidden_layers": self.s["shortgpt_layers"], "layer_metric": "bi"}),
            "taylor": (self.taylor_scores, fixed),
            "magnitude": (lambda: magnitude_scores(self.teacher, self.scores()), fixed),
            "random": (lambda: random_scores(self.scores(), self.s["seed"]), fixed),
        }[method]
        plan = make_plan(importance(), self.teacher.config, target)
        small = pruned_copy(self.teacher, plan)
        record = {"method": method, "what": PRUNING[method], "target": target, "layers_kept": list(plan.layers),
                  "seconds": time.perf_counter() - t0}
        with atomic_folder(folder) as tmp:
            small.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "peers_prune.json").write_text(json.dumps(record, indent=2) + "\n")
        return record

    def torch_pruning(self, folder: Path) -> dict:
        """Torch-Pruning in its own environment, on a transformers-4 copy of the teacher."""
        from safetensors.torch import save_file

        from minicompress.models import load_model
        from minicompress.outputs import atomic_folder

        python = Path(self.args.tp_python).expanduser()
        if not python.is_file():
            raise RuntimeError(f"--tp-python: {python} not found; create the venv (see peers_torch_pruning.py)")
        base = Path(self.s["base"])
        legacy = base / "teacher-tf4"
        if not (legacy / "config.json").is_file():
            self.teacher.save_pretrained(legacy)
            config = json.loads((legacy / "config.json").read_text())
            rope = config.pop("rope_parameters", None) or {}
            config.update(rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None,
                          torch_dtype=config.get("dtype", "float32"))
            (legacy / "config.json").write_text(json.dumps(config, indent=2))
        calib = base / "calibration-tp.safetensors"
        ids = self.batches()[:max(self.s["taylor_samples"] // 4, 1)]
        import torch

        save_file({"input_ids": torch.cat(ids).contiguous()}, str(calib))
        raw = base / "pruned-raw-torch-pruning"
        shutil.rmtree(raw, ignore_errors=True)
        ratio = 1 - self.s["fixed"]["hidden_size"] / self.teacher.config.hidden_size
        cmd = [str(python), str(Path(__file__).with_name("peers_torch_pruning.py")), "--model", str(legacy),
               "--calibration", str(calib), "--ratio", f"{ratio:.6f}", "--threads", str(self.s["threads"]),
               "--output", str(raw)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        (base / "torch-pruning.log").write_text(res.stdout + res.stderr)
        if res.returncode:
            raise RuntimeError(f"torch-pruning failed (rc {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
        record = json.loads((raw / "peers_prune.json").read_text())
        self.tokenizer.save_pretrained(raw)
        model, _ = load_model(str(raw))  # transformers 5 reads the transformers-4 folder
        theta = lambda c: (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
        if theta(model.config) != theta(self.teacher.config):
            raise RuntimeError(f"torch-pruning: rope_theta {theta(model.config)} != the teacher's "
                               f"{theta(self.teacher.config)}")
        record.update(what=PRUNING["torch-pruning"], wall_seconds=time.perf_counter() - t0, ratio=ratio)
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "peers_prune.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(raw, ignore_errors=True)
        return record


def child_env(extra: dict | None = None) -> dict:
    return {**os.environ, "MINICOMPRESS_PROGRESS": "0", "TRL_EXPERIMENTAL_SILENCE": "1",
            "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


def run_child(spec: dict, python: str, console) -> dict:
    """Run one row in a child process (skipped when its ``result.json`` exists)."""
    out = Path(spec["output"])
    result = out / "result.json"
    if result.is_file():
        console.log(f"{spec['method']}: finished earlier, skipped")
        return json.loads(result.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    if not Path(python).expanduser().is_file():
        return {"status": "failed", "error": f"{python} not found (see the install lines of peers.py)"}
    console.log(f"{spec['method']}: training {spec['student']} ({spec['tokens']:,} tokens)")
    t0 = time.perf_counter()
    with (out / "child.log").open("a") as log:
        rc = subprocess.run([str(Path(python).expanduser()), str(Path(__file__).resolve()), "--child",
                             str(out / "spec.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(spec.get("env")),
                            cwd=str(Path(__file__).resolve().parent)).returncode
    if rc or not result.is_file():
        tail = (out / "child.log").read_text().strip().splitlines()
        errors = [line for line in tail if "Error" in line or "error" in line]
        return {"status": "failed", "returncode": rc, "error": (errors or tail or ["?"])[-1][-600:],
                "log": str(out / "child.log")}
    res = json.loads(result.read_text())
    console.log(f"{spec['method']}: done in {(time.perf_counter() - t0) / 60:.1f} min, "
                f"{res['tokens_per_s']:.0f} tok/s, WikiText-2 ppl {res['wikitext']['perplexity']:,.1f}")
    return res


def modelopt_probe(python: str, cache: Path) -> dict:
    """What importing ModelOpt's Minitron plugin says here (cached)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    record = {"status": "blocked", "error": MODELOPT_REASON,
              "short": "not run: needs Megatron-Core and Transformer Engine (CUDA GPUs)"}
    if Path(python).expanduser().is_file():
        code = ("import modelopt, megatron.core as mc; print('modelopt', modelopt.__version__, 'megatron-core', "
                "mc.__version__)\ntry:\n import modelopt.torch.prune.plugins.mcore_minitron\nexcept Exception as e:\n"
                " print(type(e).__name__ + ': ' + str(e))")
        res = subprocess.run([str(Path(python).expanduser()), "-c", code], capture_output=True, text=True,
                             env=child_env(), timeout=600)
        record["tried"] = ("in a venv with nvidia-modelopt and megatron-core: import "
                           "modelopt.torch.prune.plugins.mcore_minitron -> "
                           + " | ".join(res.stdout.strip().splitlines()))
    else:
        record["tried"] = f"{python} not found (no ModelOpt environment)"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=2))
    return record


def plot(record: dict, path: Path) -> None:
    """WikiText-2 perplexity against parameters (pruned and recovered), and the recovery peers' speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(17, 5.5), gridspec_kw={"width_ratios": (1.1, 1)})
    teacher = record.get("teacher_eval") or {}
    if teacher.get("perplexity"):  # a line, not a point: the students sit at half its size, far off to the right
        ax.axhline(teacher["perplexity"], color="k", ls="--", lw=1,
                   label=f"teacher {teacher['perplexity']:.1f} ({record['teacher_parameters'] / 1e6:.1f}M)")
    for i, (name, row) in enumerate(record.get("pruning", {}).items()):
        pruned = (row.get("pruned") or {}).get("wikitext", {}).get("perplexity")
        recovered = (row.get("recovered") or {}).get("wikitext", {}).get("perplexity")
        if not row.get("parameters") or pruned is None:
            continue
        color, x = f"C{i % 10}", row["parameters"] / 1e6
        ax.scatter([x], [pruned], facecolors="none", edgecolors=color, s=60)
        if recovered is not None:
            ax.scatter([x], [recovered], color=color, s=60,
                       label=f"{name} {row.get('shape', '')}: {pruned:,.0f} -> {recovered:,.1f}")
            ax.plot([x] * 2, [pruned, recovered], color=color, ls=":", lw=1)
            ax.annotate(name, (x, recovered), xytext=(5, -3), textcoords="offset points", fontsize=7, color=color)
        else:
            ax.scatter([], [], facecolors="none", edgecolors=color, label=f"{name} {pruned:,.0f} (pruned)")
    ax.set(xlabel="parameters, millions (tied embedding once)", ylabel="WikiText-2 perplexity (log)", yscale="log",
           title=f"pruned (hollow) and recovered at {record['tokens']:,} tokens (filled)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    names, speeds, labels = [], [], []
    for name, row in record.get("recovery", {}).items():
        if row.get("status") == "done":
            names.append(name)
            speeds.append(row["tokens_per_s"])
            labels.append(f"ppl {row['wikitext']['perplexity']:,.1f}\n{row['peak_rss_mib']:,.0f} MiB")
    bars = bx.bar(names, speeds, color=[f"C{i}" for i in range(len(names))])
    for bar, label in zip(bars, labels):
        bx.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    bx.set(ylabel="real tokens / s", title=f"recovery of {Path(record['student']).name} at {record['tokens']:,} tokens")
    fig.suptitle(record.get("title", "peers"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(record: dict, console) -> None:
    from common import table

    def f(x, spec=",.1f"):
        return "-" if x is None else format(x, spec)

    def ordered(rows: dict, names) -> list:
        return sorted(rows.items(), key=lambda kv: list(names).index(kv[0]) if kv[0] in names else len(names))

    rows = []
    recovery = record.get("recovery", {})
    ours = (recovery.get("ours-kl") or recovery.get("ours") or {}).get("tokens_per_s")  # the default's row
    for name, r in ordered(recovery, RECOVERY):
        if r.get("status") != "done":
            rows.append((name, RECOVERY[name]["what"], *["-"] * 11, (r.get("error") or "")[:90]))
            continue
        w, c = r["wikitext"], r["corpus"]
        rows.append((name, RECOVERY[name]["what"], f(r["tokens"], ","), f(r["real_tokens"], ","),
                     f(r["loss_tokens"], ","), f(r["tokens_per_s"], ",.0f"),
                     f(ours / r["tokens_per_s"] if ours else None, ".2f"), f(r["peak_rss_mib"], ",.0f"),
                     f(w["perplexity"]), f(w["kl_to_teacher"], ".3f"), f(c["perplexity"]), f(c["kl_to_teacher"], ".3f"),
                     f(r["seconds"] / 60, ".1f"), ""))
    if rows:
        console.print(table(f"Recovery peers: {Path(record['student']).name}, {record['tokens']:,} tokens, "
                            f"{record['threads']} threads",
                            ("row", "how", "tokens", "real tok", "loss tok", "real tok/s", "ours x", "peak MiB",
                             "WikiText ppl",
                             "KL", "corpus ppl", "corpus KL", "min", "note"), rows, left=("row", "how", "note")))
    rows = []
    for name, r in ordered(record.get("pruning", {}), PRUNING):
        pw = ((r.get("pruned") or {}).get("wikitext") or {})
        rw = ((r.get("recovered") or {}).get("wikitext") or {})
        rc = ((r.get("recovered") or {}).get("corpus") or {})
        rows.append((name, PRUNING[name], r.get("shape", "-"), f(r.get("parameters"), ","), f(r.get("ratio"), ".3f"),
                     f(pw.get("perplexity")), f(pw.get("kl_to_teacher"), ".3f"), f(rw.get("perplexity")),
                     f(rw.get("kl_to_teacher"), ".3f"), f(rc.get("perplexity")),
                     (r.get("short") or r.get("error") or "")[:90]))
    if rows:
        console.print(table(f"Pruning peers, then minicompress recover ({record['tokens']:,} tokens); teacher "
                            f"WikiText-2 ppl {f((record.get('teacher_eval') or {}).get('perplexity'))}",
                            ("row", "how", "shape h/q/kv/ffn/L", "params", "ratio", "pruned ppl", "pruned KL",
                             "recovered ppl", "recovered KL", "corpus ppl", "note"), rows,
                            left=("row", "how", "shape h/q/kv/ffn/L", "note")))


def main() -> None:
    args = parse_args()
    if args.child:
        return child_main(args.child)
    from common import make_console, run_record, write_json

    console = make_console(170)
    out_json = Path(args.output or (Path(args.workdir).expanduser() / "tiny" / "peers-tiny.json" if args.tiny
                                    else OUT / "peers.json"))
    if args.render:
        if not out_json.is_file():
            raise SystemExit(f"--render: {out_json} does not exist yet (run the benchmark first)")
        record = json.loads(out_json.read_text())
        render(record, console)
        plot(record, out_json.with_suffix(".png"))
        return
    chosen = args.methods.split(",") if args.methods else None
    for m in chosen or []:
        if m not in RECOVERY and m not in PRUNING:
            raise SystemExit(f"--methods: unknown row {m!r}; choose from {', '.join([*RECOVERY, *PRUNING])}")
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from minicompress.errors import MinicompressError

    try:
        s = settings(args)
    except MinicompressError as err:
        raise SystemExit(f"--{err}") from None
    base = Path(s["base"])
    base.mkdir(parents=True, exist_ok=True)
    if args.tiny:  # the tiny corpus's token store stays in the tiny folder
        os.environ["MINICOMPRESS_TOKEN_CACHE"] = str(base / "tokens")
        s.update(make_tiny(base, args.seed))
    if not (Path(s["student"]) / "config.json").is_file():
        raise SystemExit(f"--student: {s['student']} is not a Hugging Face model folder (no config.json)")
    parts = ("recovery", "pruning") if args.part == "all" else (args.part,)
    recovery = [m for m in (chosen or DEFAULT_RECOVERY) if m in RECOVERY] if "recovery" in parts else []
    pruning = [m for m in (chosen or PRUNING) if m in PRUNING] if "pruning" in parts else []

    from minicompress.arch import count_parameters
    from minicompress.models import load_model

    previous = json.loads(out_json.read_text()) if out_json.is_file() else {}
    same = previous.get("tokens") == s["tokens"] and previous.get("student") == s["student"]
    record = run_record(title=f"Peers at ~50% of SmolLM2-135M{' (tiny smoke run)' if args.tiny else ''}",
                        tokens=s["tokens"], student=s["student"], teacher=s["teacher"], threads=args.threads,
                        settings={k: v for k, v in s.items() if k not in ("base",)},
                        recovery=previous.get("recovery", {}) if same else {},
                        pruning=previous.get("pruning", {}) if same else {},
                        note="timings measured while other jobs shared the CPU are not clean (see load_average)")
    evaluator = None
    cache = base / "eval"

    def evaluate_folder(name: str, folder: str) -> dict:
        nonlocal evaluator
        path = cache / f"{name}.json"
        if path.is_file() and json.loads(path.read_text()).get("folder") == folder:
            return json.loads(path.read_text())
        if evaluator is None:
            evaluator = Evaluator(s)
        model, _ = load_model(folder)
        res = {"folder": folder, **evaluator(model)}
        write_json(path, res)
        return res

    def save() -> None:
        write_json(out_json, record)
        plot(record, out_json.with_suffix(".png"))

    from transformers import AutoConfig

    from minicompress.models import resolve_source

    teacher_params = count_parameters(AutoConfig.from_pretrained(resolve_source(s["teacher"])[0]))["total"]
    record["teacher_parameters"] = teacher_params
    student_eval = evaluate_folder("student", s["student"])
    record["teacher_eval"] = {"perplexity": student_eval["wikitext"].get("teacher_perplexity"),
                              "corpus_perplexity": student_eval["corpus"].get("teacher_perplexity")}
    record["student_eval"] = student_eval

    def spec_for(method: str, kind: str, student: str, loss: dict | None = None, liger: bool = False,
                 env: dict | None = None) -> dict:
        return {**{k: v for k, v in s.items() if k not in ("base", "runs", "pruned")}, "method": method,
                "kind": kind, "student": student, "loss": loss or {}, "liger": liger, "env": env or {},
                "output": str(Path(s["runs"]) / method)}

    for m in recovery:
        row = RECOVERY[m]
        spec = spec_for(m, row["kind"], s["student"], row.get("loss"), row.get("liger", False), row.get("env"))
        python = args.liger_python if row.get("liger") else sys.executable
        record["recovery"][m] = run_child(spec, python, console)
        save()

    pruner = None
    for m in pruning:
        if m == "modelopt":
            record["pruning"][m] = modelopt_probe(args.modelopt_python, base / "modelopt.json")
            save()
            continue
        folder = s["student"] if m == "ours-searched" else str(Path(s["pruned"]) / m)
        row: dict = {"what": PRUNING[m], "folder": folder}
        try:
            if not (Path(folder) / "config.json").is_file():
                if pruner is None:
                    pruner = Pruner(s, args, console)
                console.log(f"{m}: pruning")
                row["prune"] = pruner.prune(m, Path(folder))
            elif (Path(folder) / "peers_prune.json").is_file():
                row["prune"] = json.loads((Path(folder) / "peers_prune.json").read_text())
            config = AutoConfig.from_pretrained(folder)
            params = count_parameters(config)["total"]
            row.update(shape=shape_of(config), parameters=params, ratio=params / teacher_params)
            row["pruned"] = student_eval if m == "ours-searched" else evaluate_folder(m, folder)
            console.log(f"{m}: {row['shape']} ({row['ratio']:.3f}), pruned WikiText-2 ppl "
                        f"{row['pruned']['wikitext']['perplexity']:,.1f}")
        except Exception as err:  # a peer that fails is a row that says so
            row.update(status="failed", error=f"{type(err).__name__}: {err}")
            record["pruning"][m] = row
            console.log(f"{m}: failed: {row['error']}")
            save()
            continue
        record["pruning"][m] = row
        save()
        # the searched student's recovery is the recovery part's "ours-kl" row: reuse it when recorded
        res = record["recovery"].get("ours-kl") if m == "ours-searched" else None
        if not res or res.get("status") != "done":
            name = "ours-kl" if m == "ours-searched" else f"prune-{m}"
            res = run_child(spec_for(name, "ours", folder, RECOVERY["ours-kl"]["loss"]), sys.executable, console)
            if m == "ours-searched":
                record["recovery"]["ours-kl"] = res
        row["recovered"] = res if res.get("status") == "done" else None
        if res.get("status") != "done":
            row.update(status="failed", error=f"recovery: {res.get('error')}")
        save()

    save()
    render(record, console)
    console.log(f"wrote {out_json} and {out_json.with_suffix('.png')}")


if __name__ == "__main__":
    main()

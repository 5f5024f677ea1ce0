"""Torch-Pruning's LLM example with Taylor importance, run in Torch-Pruning's own virtual environment.

A peer of ``benchmarks/peers.py`` (issue 18). Torch-Pruning 1.6.1 hung with transformers
4.57 and ran with 4.48.3, so it runs in its own environment, never in minicompress's::

    python -m venv ~/.cache/minicompress/venvs/torch-pruning
    ~/.cache/minicompress/venvs/torch-pruning/bin/pip install torch==2.13.0 transformers==4.48.3 \\
        torch-pruning==1.6.1 safetensors

(``torch==2.13.0`` resolves to the local ``2.13.0+cpu`` wheel: no CUDA torch is downloaded.)

What it does follows ``examples/LLMs/prune_llm.py`` of Torch-Pruning (VainF/Torch-Pruning):
a ``MetaPruner`` over the whole model with ``num_heads`` of every ``q/k/v_proj``,
``prune_num_heads=True``, ``prune_head_dims=False`` (RoPE stays intact), the same
``pruning_ratio`` for the hidden size, the FFN and the heads, ``lm_head`` ignored as a root,
``round_to=4``, then the example's update of the module attributes and the config. The
importance is ``GroupTaylorImportance`` (first-order Taylor ``|w * dL/dw|``, Molchanov et al.
2019) from the gradient of the LM loss summed over the calibration batches (``--importance
magnitude``: the example's own ``GroupNormImportance(p=2)``). The model is read from a stock
HF folder with a transformers-4 config (``rope_theta``), calibration token ids from a
safetensors file (``input_ids`` ``[N, T]``), and the pruned model is saved with
``save_pretrained`` (safetensors) with a ``peers_prune.json`` describing the run.

Run by ``benchmarks/peers.py`` (``--methods torch-pruning``); by hand::

    VENV/bin/python benchmarks/peers_torch_pruning.py --model TEACHER_DIR --calibration calib.safetensors \\
        --ratio 0.3333 --output OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF folder of the model to prune (transformers-4 config)")
    p.add_argument("--calibration", required=True, help="safetensors file with input_ids [N, T]")
    p.add_argument("--ratio", type=float, required=True, help="pruning ratio of hidden size, FFN and heads")
    p.add_argument("--importance", choices=("taylor", "magnitude"), default="taylor")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per backward")
    p.add_argument("--round-to", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    import torch_pruning as tp
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    cfg = model.config
    cfg.use_cache = False  # the graph is traced from the outputs: no KV cache among them
    ids = load_file(args.calibration)["input_ids"].long()
    before = sum(p.numel() for p in model.parameters())

    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    is_gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    if args.importance == "taylor":
        importance = tp.importance.GroupTaylorImportance()
        model.zero_grad()
        batches = ids.split(args.batch_size)
        for batch in batches:  # the gradient of the mean LM loss over all calibration batches
            loss = model(input_ids=batch, labels=batch).loss / len(batches)
            loss.backward()
    else:
        importance = tp.importance.GroupNormImportance(p=2, group_reduction="mean")
    grad_seconds = time.perf_counter() - t0
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=ids[:1, :16], importance=importance, global_pruning=False,
        pruning_ratio=args.ratio, ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=args.ratio, round_to=args.round_to)
    for group in pruner.step(interactive=True):
        group.prune()

    # the example's update of module attributes and config (transformers 4.48 reads head_dim from the config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            q_heads, kv_heads = m.q_proj.out_features // head_dim, m.k_proj.out_features // head_dim
            m.num_key_value_groups = q_heads // kv_heads
            cfg.num_attention_heads, cfg.num_key_value_heads = q_heads, kv_heads
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    if not is_gqa:
        cfg.num_key_value_heads = cfg.num_attention_heads
    cfg.head_dim = head_dim
    cfg.use_cache = True
    del pruner
    model.zero_grad(set_to_none=True)
    if cfg.tie_word_embeddings:  # pruning replaced the shared tensor by two: they must still agree, then re-tie
        if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
            raise SystemExit("torch-pruning: the tied embedding and lm_head were pruned differently")
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # the pruned model must still run
        logits = model(input_ids=ids[:1, :16]).logits
    if not torch.isfinite(logits).all():
        raise SystemExit("torch-pruning: the pruned model gives non-finite logits")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    after = sum(p.numel() for p in model.parameters())  # a shared tensor once
    record = {"method": "torch-pruning", "importance": args.importance, "ratio": args.ratio,
              "calibration": list(ids.shape), "round_to": args.round_to, "parameters_before": before,
              "parameters_after": after, "seconds": time.perf_counter() - t0, "gradient_seconds": grad_seconds,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "torch_pruning": metadata.version("torch-pruning")},
              "shape": {k: getattr(cfg, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                     "intermediate_size", "num_hidden_layers", "head_dim")}}
    (out / "peers_prune.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

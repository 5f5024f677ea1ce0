"""Pruning quality on SmolLM2-135M, no recovery: Minitron importance vs random and magnitude.

Calibration on ``../shared/data/corpus`` (never the evaluation split); evaluation on the
first 16,384 tokens of WikiText-2 test in windows of 512 (the protocol of
``../shared/ANCHORS.md``). One calibration serves every target. Rows, at about 50% and
70% of the parameters:

* width only (fixed uniform shapes, the anchors' 448/6/3/768 among them) with Minitron
  activation importance, random importance and weight-magnitude importance;
* depth only with Block Importance, per-layer loss increase and the best contiguous block,
  against dropping random layers;
* width + depth chosen by ``--target-params`` search (zero-shot loss on calibration
  batches), with activation importance and, for the same shape, random and magnitude.

Run: ``python benchmarks/prune_quality.py`` (about 30 min on 2 CPU cores). Prints a rich
table, writes ``benchmarks/out/prune_quality.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch
from common import DATA, OUT, run_record, write_json

from minicompress.arch import count_parameters, decoder_layers
from minicompress.config import DataConfig, ScoreConfig
from minicompress.data.rows import calibration_batches
from minicompress.data.sources import load_token_stream
from minicompress.evaluation.perplexity import eval_windows, evaluate_perplexity
from minicompress.models import load_model
from minicompress.pruning.plan import make_plan, pruned_copy
from minicompress.pruning.search import SearchSpace, search_architecture
from minicompress.pruning.scoring import ImportanceScores, score_model



def magnitude_scores(model, like: ImportanceScores) -> ImportanceScores:
    """Weight-magnitude importance (Torch-Pruning style group L2 norms), same layout as ``like``."""
    cfg = model.config
    hd = cfg.head_dim
    heads, neurons = [], []
    channels = model.model.embed_tokens.weight.detach().float().square().sum(0)
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        q = a.q_proj.weight.detach().float().square().view(cfg.num_attention_heads, hd, -1).sum((1, 2))
        o = a.o_proj.weight.detach().float().square().view(-1, cfg.num_attention_heads, hd).sum((0, 2))
        heads.append((q + o).sqrt())
        n = (m.gate_proj.weight.detach().float().square().sum(1) + m.up_proj.weight.detach().float().square().sum(1)
             + m.down_proj.weight.detach().float().square().sum(0))
        neurons.append(n.sqrt())
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            channels = channels + lin.weight.detach().float().square().sum(0)
        for lin in (a.o_proj, m.down_proj):
            channels = channels + lin.weight.detach().float().square().sum(1)
    return ImportanceScores(heads=torch.stack(heads), neurons=torch.stack(neurons), channels=channels.sqrt(),
                            block_distance=like.block_distance, layer_loss=like.layer_loss, meta={"kind": "magnitude"})


def random_scores(like: ImportanceScores, seed: int = 0) -> ImportanceScores:
    """Uniform random importance (random block distances too, for random layer drops)."""
    g = torch.Generator().manual_seed(seed)
    bd = torch.rand(like.block_distance.shape, generator=g)
    return ImportanceScores(heads=torch.rand(like.heads.shape, generator=g),
                            neurons=torch.rand(like.neurons.shape, generator=g),
                            channels=torch.rand(like.channels.shape, generator=g),
                            block_distance=(bd + bd.T) / 2, layer_loss=torch.rand(like.block_distance.shape[0] - 1, generator=g),
                            meta={"kind": "random"})


def shape_of(cfg) -> str:
    return (f"{cfg.hidden_size}/{cfg.num_attention_heads}/{cfg.num_key_value_heads}/"
            f"{cfg.intermediate_size}/{cfg.num_hidden_layers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences of 512 tokens")
    parser.add_argument("--loss-samples", type=int, default=4, help="sequences for the per-layer loss score")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--budgets", default="0.5,0.7", help="comma-separated: which of ~50%% / ~70%% to run")
    parser.add_argument("--only-search", action="store_true", help="skip the fixed width and depth rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on shared cores)")
    parser.add_argument("--scores", default=str(OUT / "smollm2_scores"),
                        help="scores folder: reused if present, else written after scoring")
    parser.add_argument("--output", default=str(OUT / "prune_quality.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = {float(b) for b in args.budgets.split(",")}
    console = common.make_console()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    model, tokenizer = load_model("smollm2-135m")
    total = count_parameters(model.config)["total"]
    score_cfg = ScoreConfig(data=DataConfig(source=str(DATA / "corpus"), seq_len=512), num_samples=args.num_samples,
                            batch_size=8, loss_samples=args.loss_samples)
    batches, loss_batches = calibration_batches(score_cfg, tokenizer)
    scores_dir = Path(args.scores)
    if (scores_dir / "scores.safetensors").is_file():
        scores = ImportanceScores.load(scores_dir)
        score_seconds = scores.meta.get("seconds")
        console.print(f"reusing scores from {scores_dir}")
    else:
        t = time.perf_counter()
        scores = score_model(model, batches, loss_batches=loss_batches)
        score_seconds = time.perf_counter() - t
        scores.meta["seconds"] = score_seconds
        scores_dir.mkdir(parents=True, exist_ok=True)
        scores.save(scores_dir)
        console.print(f"scored {args.num_samples} x 512 tokens in {score_seconds:.0f}s")
    kinds = {"activation": scores, "random": random_scores(scores), "magnitude": magnitude_scores(model, scores)}

    stream = load_token_stream(DataConfig(source=str(DATA / "wikitext2" / "test.txt"), documents="file",
                                          shuffle=False, max_tokens=args.eval_tokens + 1024), tokenizer)
    windows = eval_windows(stream[: args.eval_tokens], 512)
    teacher_ppl = evaluate_perplexity(model, windows, batch_size=8)["perplexity"]
    rows = [{"group": "teacher", "method": "SmolLM2-135M", "shape": shape_of(model.config), "params": total,
             "ratio": 1.0, "ppl": teacher_ppl}]

    def run(group: str, method: str, importance: ImportanceScores, target: dict) -> None:
        # the anchors' fixed shapes (448/6, 512/6) are not valid stock LlamaConfigs (transformers 5 checks
        # hidden_size % num_attention_heads): those rows are evaluated in memory, for comparison only
        plan = make_plan(importance, model.config, target, require_valid_config="searched" in group)
        small = pruned_copy(model, plan)
        params = count_parameters(small.config)["total"]
        ppl = evaluate_perplexity(small, windows, batch_size=8)["perplexity"]
        rows.append({"group": group, "method": method, "shape": shape_of(small.config), "params": params,
                     "ratio": params / total, "ppl": ppl, "layers_kept": list(plan.layers)})
        console.print(f"{group:>14} {method:<28} {shape_of(small.config):<22} {params / total:.3f} {ppl:,.1f}")

    search_batches = [b[:2] for b in batches[:4]]
    searches = {}
    for budget, width, depth in ((0.5, {"hidden_size": 448, "num_attention_heads": 6, "intermediate_size": 768}, 11),
                                 (0.7, {"hidden_size": 512, "num_attention_heads": 6, "intermediate_size": 1152}, 19)):
        if budget not in budgets:
            continue
        tag = f"~{int(budget * 100)}%"
        if not args.only_search:
            for kind, importance in kinds.items():
                run(f"{tag} width", kind, importance, width)
            run(f"{tag} width", "activation, no norm correction", scores, {**width, "norm_correction": False})
            for metric in ("bi", "loss", "contiguous"):
                run(f"{tag} depth", f"activation ({metric})", scores, {"num_hidden_layers": depth, "layer_metric": metric})
            run(f"{tag} depth", "random layers", kinds["random"], {"num_hidden_layers": depth, "layer_metric": "bi"})
        t = time.perf_counter()
        best, table = search_architecture(model, scores, budget + (0.009 if budget == 0.5 else 0.01), search_batches,
                                          space=SearchSpace(tolerance=0.02))
        searches[tag] = {"best": best, "seconds": time.perf_counter() - t, "candidates": table}
        console.print(f"search {tag}: {len(table)} candidates in {searches[tag]['seconds']:.0f}s -> {best}")
        for kind, importance in kinds.items():
            run(f"{tag} searched", kind, importance, best)
    if 0.7 in budgets and not args.only_search:  # the anchors' second fixed width shape, for a direct comparison
        run("~67% width", "activation", scores, {"hidden_size": 512, "num_attention_heads": 6, "intermediate_size": 1024})

    console.print(common.table(
        f"SmolLM2-135M pruned, no recovery: WikiText-2 ppl (first {args.eval_tokens:,} tokens, windows 512)",
        ("group", "importance", "shape h/q/kv/ffn/L", "params", "ratio", "ppl"),
        [(r["group"], r["method"], r["shape"], f"{r['params']:,}", f"{r['ratio']:.3f}", f"{r['ppl']:,.1f}")
         for r in rows], left=3))
    out = write_json(args.output, run_record(rows=rows, searches=searches, score_seconds=score_seconds,
                                             num_samples=args.num_samples, loss_samples=args.loss_samples,
                                             eval_tokens=args.eval_tokens, seconds=time.perf_counter() - t0))
    console.print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()

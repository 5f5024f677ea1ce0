"""Model cards (``README.md``) of prune and recover outputs: Hub metadata, shape table, metrics."""

from __future__ import annotations

import json

import yaml

from minicompress.recipes.prune import prune
from minicompress.config import PruneConfig, RecoverConfig, build_config
from minicompress.recipes.recover import recover
from minicompress.outputs import model_card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_prune_and_recover_write_cards_with_their_numbers(tmp_path, tiny_model_dir, text_corpus):
    source = tiny_model_dir("llama", num_hidden_layers=3)
    pruned = tmp_path / "pruned"
    prune(build_config(PruneConfig, overrides={
        "model": str(source), "data": {"source": str(text_corpus), "seq_len": 16},
        "score": {"num_samples": 8, "batch_size": 4, "loss_samples": 0},
        "target": {"intermediate_size": 48, "num_hidden_layers": 2}, "output": str(pruned)}))
    record = json.loads((pruned / "minicompress.json").read_text())
    card = (pruned / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == str(source) and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"minicompress", "pruned", "llama"} <= set(meta["tags"]) and "distilled" not in meta["tags"]
    params = record["parameters"]
    assert "| intermediate_size | 64 | 48 |" in card and "| num_hidden_layers | 3 | 2 |" in card
    assert f"| parameters | {params['original']:,} | {params['pruned']:,} |" in card
    assert f"(ratio {params['ratio']:.4f})" in card and f"`{text_corpus}`, 8 sequences of 16 tokens" in card

    out = tmp_path / "recovered"
    report = recover(build_config(RecoverConfig, overrides={
        "student": str(pruned), "teacher": str(source), "data": {"source": str(text_corpus), "seq_len": 16},
        "tokens": 128, "global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 32, "output": str(out)}))
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == str(source) and {"pruned", "distilled"} <= set(meta["tags"])
    assert "\n# recovered\n" in card
    assert "- token budget: 128 tokens of" in card and "(2 steps of 64 tokens" in card
    before, after = report["before"]["perplexity"], report["after"]["perplexity"]
    assert f"| perplexity | {before:,.4g} | {after:,.4g} |" in card
    assert "| intermediate_size | 64 | 48 |" in card  # the prune record travels with the student


def test_card_names_the_hub_model_of_a_builtin_and_the_root_of_a_chain():
    shape = {"model_type": "llama", "hidden_size": 8, "parameters": {"total": 10}}
    card = model_card({"source_model": "smollm2-135m", "plan": {}, "original": shape, "pruned": shape,
                       "config": {"output": "out/x"}})
    assert _front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    chained = {"source_model": "out/stage-1", "source_provenance": {"source_model": "gemma3-270m"}, "plan": {},
               "pruned": shape}
    assert _front_matter(model_card(chained))["base_model"] == "google/gemma-3-270m"

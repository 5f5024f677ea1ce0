"""``minicompress score`` / ``prune`` end to end on tiny models: outputs, reuse, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicompress.arch import count_parameters
from minicompress.cli import main
from minicompress.commands import prune
from minicompress.config import PruneConfig, build_config
from minicompress.scoring import ImportanceScores


@pytest.fixture
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama", num_hidden_layers=3)


def _score(tmp_path, model_dir, corpus, name="scores"):
    out = tmp_path / name
    rc = main(["score", "--model", str(model_dir), "--data", str(corpus), "--seq-len", "16", "--num-samples", "8",
               "--batch-size", "4", "--loss-samples", "4", "--output", str(out)])
    assert rc == 0
    return out


def test_score_writes_reusable_scores(tmp_path, tiny_llama, text_corpus):
    out = _score(tmp_path, tiny_llama, text_corpus)
    scores = ImportanceScores.load(out)
    assert scores.heads.shape == (3, 4) and scores.neurons.shape == (3, 64) and scores.channels.shape == (32,)
    assert scores.layer_loss.shape == (3,) and scores.meta["num_samples"] == 8 and scores.meta["seq_len"] == 16
    record = json.loads((out / "minicompress.json").read_text())
    assert record["command"] == "score" and record["scores_digest"] == scores.digest()
    assert record["config"]["num_samples"] == 8 and "torch" in record["versions"]


def test_prune_cli_output_is_a_stock_hf_model(tmp_path, tiny_llama, text_corpus, capsys):
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--seq-len", "16",
               "--scores", str(scores_dir), "--hidden-size", "24", "--num-attention-heads", "2",
               "--intermediate-size", "48", "--num-hidden-layers", "2", "--output", str(out)])
    assert rc == 0
    assert "pruned" in capsys.readouterr().out
    # loads without minicompress importable
    code = ("import sys; sys.modules['minicompress'] = None\n"
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "print(sum(p.numel() for p in m.parameters()))")
    counted = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 8 and config["hidden_size"] == 24 and config["num_hidden_layers"] == 2
    record = json.loads((out / "minicompress.json").read_text())
    assert record["command"] == "prune" and record["source_model"] == str(tiny_llama)
    assert record["scores_digest"] == ImportanceScores.load(scores_dir).digest()
    assert len(record["plan"]["channels"]) == 24 and len(record["plan"]["layers"]) == 2
    assert record["parameters"]["pruned"] == counted
    assert (out / "tokenizer.json").is_file() and (out / "minicompress.yaml").is_file()
    # the same plan from Python gives the same logits
    cfg = build_config(PruneConfig, overrides={"model": {"source": str(tiny_llama)}, "scores": str(scores_dir),
                                               "target": {"hidden_size": 24, "num_attention_heads": 2,
                                                          "intermediate_size": 48, "num_hidden_layers": 2}})
    from minicompress.models import load_model

    model, tok = load_model(cfg.model)
    prune(cfg, model=model, tokenizer=tok)
    ids = torch.randint(4, 200, (2, 10))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_prune_target_params_searches_near_the_budget(tmp_path, tiny_model_dir, text_corpus):
    model_dir = tiny_model_dir("qwen3", num_hidden_layers=4)
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model_dir), "--data", str(text_corpus), "--seq-len", "16",
               "--num-samples", "8", "--loss-samples", "0", "--target-params", "0.7", "--search-batches", "2",
               "--output", str(out)])
    assert rc == 0
    record = json.loads((out / "minicompress.json").read_text())
    assert record["search"] and all("screen_loss" in r for r in record["search"])
    assert abs(record["parameters"]["ratio"] - 0.7) <= 0.03 * 0.7
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert count_parameters(config)["total"] == record["parameters"]["pruned"]


def test_prune_refuses_to_overwrite_and_bad_targets(tmp_path, tiny_llama, text_corpus, capsys):
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--scores", str(scores_dir),
            "--drop-layers", "1", "--output", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert main(args + ["--overwrite"]) == 0
    for bad, match in ((["--num-attention-heads", "3"], "not divisible"),
                       (["--num-hidden-layers", "0"], "num_hidden_layers"),
                       (["--target-params", "0.5", "--hidden-size", "16"], "either target_params"),
                       (["--hidden-size", "64"], "target.hidden_size")):
        capsys.readouterr()
        rc = main(["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--scores", str(scores_dir),
                   "--output", str(tmp_path / "x")] + bad)
        err = capsys.readouterr().err
        assert rc == 2 and match in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()


def test_failed_prune_leaves_nothing_behind(tmp_path, tiny_llama, text_corpus, monkeypatch):
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    out = tmp_path / "pruned"

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", boom)
    with pytest.raises(RuntimeError):
        main(["prune", "--model", str(tiny_llama), "--scores", str(scores_dir), "--drop-layers", "0",
              "--output", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


def test_scores_of_another_model_are_refused(tmp_path, tiny_model_dir, text_corpus, capsys):
    scores_dir = _score(tmp_path, tiny_model_dir("llama", num_hidden_layers=3), text_corpus)
    other = tiny_model_dir("llama", num_hidden_layers=2)
    rc = main(["prune", "--model", str(other), "--scores", str(scores_dir), "--drop-layers", "0",
               "--output", str(tmp_path / "o")])
    assert rc == 2 and "--scores" in capsys.readouterr().err


def test_prune_then_recover_and_teacher_cache_from_the_cli(tmp_path, tiny_llama, text_corpus):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--seq-len", "16",
                 "--num-samples", "8", "--loss-samples", "0", "--hidden-size", "24", "--intermediate-size", "48",
                 "--output", str(pruned)]) == 0
    out = tmp_path / "recovered"
    common = ["--data", str(text_corpus), "--seq-len", "16", "--micro-batch-size", "2"]
    assert main(["recover", "--student", str(pruned), "--teacher", str(tiny_llama), *common, "--tokens", "192",
                 "--global-batch-tokens", "64", "--lr", "1e-3", "--output", str(out), "eval_tokens=64"]) == 0
    record = json.loads((out / "minicompress.json").read_text())
    assert "recovery" in record and record["recovery"]["teacher"] == str(tiny_llama)
    assert record["plan"]["channels"]  # the prune provenance is kept
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.hidden_size == 24
    cache = tmp_path / "cache"
    assert main(["teacher-cache", "--teacher", str(tiny_llama), *common, "--tokens", "128", "--top-k", "8",
                 "--output", str(cache)]) == 0
    assert list(cache.glob("*.safetensors"))

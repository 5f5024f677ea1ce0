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
from minicompress.recipes.prune import prune
from minicompress.config import PruneConfig, build_config
from minicompress.pruning.scoring import ImportanceScores


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
    assert record["repair"]["repairs"] == ["refit"] and record["config"]["repair"] == ["refit"]  # auto, resolved
    # the same plan (and default repair) from Python gives the same logits
    cfg = build_config(PruneConfig, overrides={"model": {"source": str(tiny_llama)}, "scores": str(scores_dir),
                                               "data": {"source": str(text_corpus), "seq_len": 16},
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
               "--search-distill-candidates", "0", "--output", str(out)])
    assert rc == 0
    record = json.loads((out / "minicompress.json").read_text())
    assert record["search"] and all("screen_loss" in r for r in record["search"])
    assert abs(record["parameters"]["ratio"] - 0.7) <= 0.03 * 0.7
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert count_parameters(config)["total"] == record["parameters"]["pruned"]
    # no distillation: the zero-shot best is chosen, and the table is saved beside the model
    assert json.loads((out / "search.json").read_text()) == record["search"]
    (chosen,) = [r for r in record["search"] if r["chosen"]]
    assert chosen["loss"] == min(r["loss"] for r in record["search"] if "loss" in r)
    assert not any("distill_kl" in r for r in record["search"])
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == \
        (chosen["hidden_size"], chosen["intermediate_size"], chosen["num_hidden_layers"])


SEARCH_RECOVER = ["search_recover.global_batch_tokens=64", "search_recover.micro_batch_size=2",
                  "search_recover.eval_tokens=64", "search_recover.lr=1e-3"]
SHAPE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


def test_prune_search_distils_the_best_candidates_and_keeps_the_lowest_kl(tmp_path, tiny_model_dir, text_corpus,
                                                                           capsys):
    model_dir = tiny_model_dir("llama", num_hidden_layers=4)
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(model_dir), "--data", str(text_corpus), "--seq-len", "16",
               "--num-samples", "8", "--batch-size", "4", "--loss-samples", "4", "--target-params", "0.7",
               "--search-batches", "2", "--width-multiple", "8", "--search-distill-candidates", "2",
               "--search-distill-tokens", "128", "--output", str(out), *SEARCH_RECOVER])
    assert rc == 0
    assert "architecture search (by held-out KL after a short distillation)" in capsys.readouterr().out
    record = json.loads((out / "minicompress.json").read_text())
    table = record["search"]
    assert json.loads((out / "search.json").read_text()) == table
    assert all(r["hidden_size"] % 8 == 0 and r["intermediate_size"] % 8 == 0 for r in table)
    distilled = [r for r in table if "distill_kl" in r]
    assert len(distilled) == 2
    finalists = sorted((r for r in table if "loss" in r), key=lambda r: r["loss"])
    assert sorted(r["loss"] for r in distilled) == [r["loss"] for r in finalists[:2]]  # the zero-shot best 2
    for r in distilled:
        assert r["distill_kl"] < r["kl_before"] and r["distill_perplexity"] > 1
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    (chosen,) = [r for r in table if r["chosen"]]
    assert chosen["distill_kl"] == min(r["distill_kl"] for r in distilled)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert tuple(getattr(config, k) for k in SHAPE) == tuple(chosen[k] for k in SHAPE)
    assert record["target"]["layer_metric"] == chosen["layer_metric"]
    assert [i for i in range(4) if i not in record["plan"]["layers"]] == chosen["dropped_layers"]
    assert not list(tmp_path.glob(".search-*"))  # the distilled candidates are not kept


def test_interrupted_search_resumes_and_equals_an_uninterrupted_one(tmp_path, tiny_model_dir, text_corpus,
                                                                     monkeypatch, capsys):
    """Killed during its second candidate's distillation, the search keeps the scores and the
    first candidate in ``<output>.partial``; ``--resume`` scores nothing again, distils only
    the second candidate and writes what an uninterrupted search writes."""
    from safetensors.torch import load_file

    from minicompress.recipes import prune as prune_recipe

    model_dir = tiny_model_dir("llama", num_hidden_layers=4)
    real_recover, real_score = prune_recipe.distill, prune_recipe.score
    calls = {"recover": 0, "score": 0}

    def counting_score(*args, **kwargs):
        calls["score"] += 1
        return real_score(*args, **kwargs)

    def recover(*args, kill_at=None, **kwargs):
        calls["recover"] += 1
        if calls["recover"] == kill_at:
            raise RuntimeError("killed")
        return real_recover(*args, **kwargs)

    monkeypatch.setattr(prune_recipe, "score", counting_score)

    def prune_args(out):
        return ["prune", "--model", str(model_dir), "--data", str(text_corpus), "--seq-len", "16",
                "--num-samples", "8", "--batch-size", "4", "--loss-samples", "4", "--target-params", "0.7",
                "--search-batches", "2", "--width-multiple", "8", "--search-distill-candidates", "2",
                "--search-distill-tokens", "128", "--output", str(out), *SEARCH_RECOVER]

    monkeypatch.setattr(prune_recipe, "distill", recover)
    assert main(prune_args(tmp_path / "whole")) == 0
    assert calls == {"recover": 2, "score": 1} and not (tmp_path / "whole.partial").exists()

    out, calls["recover"], calls["score"] = tmp_path / "resumed", 0, 0
    monkeypatch.setattr(prune_recipe, "distill", lambda *a, **k: recover(*a, kill_at=2, **k))
    with pytest.raises(RuntimeError, match="killed"):
        main(prune_args(out))
    work = tmp_path / "resumed.partial"
    assert not out.exists() and (work / "scores" / "scores.safetensors").is_file()
    assert sum("distill_kl" in r for r in json.loads((work / "search.json").read_text())) == 1
    capsys.readouterr()
    assert main(prune_args(out)) == 2  # neither --resume nor --overwrite
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert main(prune_args(out) + ["--search-batches", "3", "--resume"]) == 2  # other settings
    assert "other settings" in capsys.readouterr().err and (work / "search.json").is_file()

    calls["recover"], calls["score"] = 0, 0
    monkeypatch.setattr(prune_recipe, "distill", recover)
    assert main(prune_args(out) + ["--resume"]) == 0
    assert calls == {"recover": 1, "score": 0} and not work.exists()
    speed = ("prefill_tokens_per_s", "decode_tokens_per_s")
    whole, resumed = (json.loads((tmp_path / name / "search.json").read_text()) for name in ("whole", "resumed"))
    assert [{k: v for k, v in r.items() if k not in speed} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in speed} for r in whole]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    # --overwrite without --resume starts over
    monkeypatch.setattr(prune_recipe, "distill", lambda *a, **k: recover(*a, kill_at=calls["recover"] + 1, **k))
    with pytest.raises(RuntimeError, match="killed"):
        main(prune_args(tmp_path / "again"))
    monkeypatch.setattr(prune_recipe, "distill", recover)
    calls["score"] = 0
    assert main(prune_args(tmp_path / "again") + ["--overwrite"]) == 0 and calls["score"] == 1


def test_search_keeps_the_candidate_with_the_lowest_distilled_kl(tmp_path, tiny_model_dir, text_corpus,
                                                                  monkeypatch):
    """The choice, with the distillation replaced by chosen KLs; 0 candidates: the zero-shot choice."""
    from minicompress.recipes import prune as prune_recipe
    from minicompress.models import load_model

    model_dir = tiny_model_dir("llama", num_hidden_layers=4)
    scores_dir = _score(tmp_path, model_dir, text_corpus)
    calls = []
    kls = iter([0.5, 0.2, 0.9])

    def fake_recover(student, teacher, data, config, schedule, **kwargs):
        calls.append({"shape": tuple(getattr(student.config, k) for k in SHAPE), "teacher": teacher,
                      "teacher_layers": len(teacher.model.layers), "seed": config.seed, "tokens": config.tokens,
                      "data": config.data, "eval_tokens": config.eval_tokens, "teacher_dtype": config.teacher_dtype,
                      "trainable": all(p.requires_grad for p in student.parameters())})
        teacher.requires_grad_(False)  # as the real one does: the prune must undo it
        return {"before": {"kl_to_teacher": 1.0}, "after": {"kl_to_teacher": next(kls), "perplexity": 9.0}}

    monkeypatch.setattr(prune_recipe, "distill", fake_recover)

    def run(k, output):
        cfg = build_config(PruneConfig, overrides=[
            f"model.source={model_dir}", f"data.source={text_corpus}", "data.seq_len=16", f"scores={scores_dir}",
            "target.target_params=0.7", "search_batches=2", f"search_distill_candidates={k}",
            "search_distill_tokens=128", f"output={output}", *SEARCH_RECOVER])
        model, tok = load_model(cfg.model)
        return model, prune(cfg, model=model, tokenizer=tok)

    model, report = run(3, tmp_path / "k3")
    table = report["search"]
    ranked = sorted((r for r in table if "loss" in r), key=lambda r: r["loss"])
    assert [c["shape"] for c in calls] == [tuple(r[k] for k in SHAPE) for r in ranked[:3]]
    assert all(c["teacher"] is model and c["teacher_layers"] == 4 and c["trainable"] for c in calls)
    assert len({(c["seed"], c["tokens"], c["data"], c["eval_tokens"]) for c in calls}) == 1  # a fair comparison
    assert calls[0]["tokens"] == 128 and calls[0]["teacher_dtype"] == "float32"
    assert [r["distill_kl"] for r in ranked[:3]] == [0.5, 0.2, 0.9]
    assert [r["chosen"] for r in ranked[:3]] == [False, True, False] and sum(r["chosen"] for r in table) == 1
    assert report["target"] == {**{k: ranked[1][k] for k in SHAPE}, "layer_metric": ranked[1]["layer_metric"]}
    assert tuple(getattr(model.config, k) for k in SHAPE) == tuple(ranked[1][k] for k in SHAPE)
    assert all(p.requires_grad for p in model.parameters())  # the teacher's flags were restored

    calls.clear()
    model0, report0 = run(0, tmp_path / "k0")
    assert not calls
    assert [(r["screen_loss"], r.get("loss")) for r in report0["search"]] == \
        [(r["screen_loss"], r.get("loss")) for r in table]  # the same zero-shot ranking
    assert report0["target"] == {**{k: ranked[0][k] for k in SHAPE}, "layer_metric": ranked[0]["layer_metric"]}
    assert tuple(getattr(model0.config, k) for k in SHAPE) == tuple(ranked[0][k] for k in SHAPE)


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


@pytest.mark.parametrize("overrides, match", [
    (["search_recover.output=x"], "search_recover.output: set by the prune"),
    (["search_recover.teacher_dtype=bfloat16"], "search_recover.teacher_dtype: set by the prune"),
    (["search_recover.steps=3"], "search_recover.steps: unknown key"),
    (["search_recover.eval_tokens=0"], "search_recover.eval_tokens: the search ranks candidates by held-out KL"),
    (["search_recover.lr=-1"], "search_recover.lr: must be a number > 0"),
    (["search_distill_tokens=1000"], "search_distill_tokens: the budget (1000) is less than one optimizer step"),
    (["search_distill_candidates=-1"], "search_distill_candidates: must be a number >= 0"),
    (["target.width_multiple=0"], "target.width_multiple: must be a number > 0"),
])
def test_search_distillation_settings_are_checked_up_front(overrides, match):
    from minicompress.errors import ConfigError

    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")) as err:
        build_config(PruneConfig, overrides=["target.target_params=0.5", *overrides])
    assert "\n" not in str(err.value)
    # defaults adapt to the sequence length; explicit targets never read search_recover
    cfg = build_config(PruneConfig, overrides=["target.target_params=0.5", "data.seq_len=100"])
    assert cfg.search_recover_config().global_batch_tokens == 4000  # 10 x 4 x 100, nearest 4,096
    build_config(PruneConfig, overrides=["target.hidden_size=16", "search_recover.eval_tokens=0"])


def test_no_norm_correction_flag_reaches_the_plan(tmp_path, tiny_llama, text_corpus):
    """--no-norm-correction keeps every norm weight as it was (scale 1); the default rescales."""
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    plans = {}
    for flag in ([], ["--no-norm-correction"]):
        out = tmp_path / f"pruned{len(flag)}"
        assert main(["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--seq-len", "16",
                     "--scores", str(scores_dir), "--hidden-size", "24", "--output", str(out), *flag]) == 0
        plans[bool(flag)] = json.loads((out / "minicompress.json").read_text())["plan"]
    assert plans[True]["final_norm_scale"] == 1.0
    assert all(s == 1.0 for layer in plans[True]["norm_scales"] for s in layer)
    assert plans[False]["final_norm_scale"] != 1.0


def test_a_search_refused_for_want_of_data_leaves_nothing_and_the_corrected_command_runs(tmp_path, tiny_llama,
                                                                                         text_corpus, capsys):
    """``prune --scores S --target-params`` without ``--data`` is refused before any folder
    exists, saying why the search needs text; the same command with ``--data`` then runs."""
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    out = tmp_path / "searched"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["prune", "--model", str(tiny_llama), "--scores", str(scores_dir), "--target-params", "0.7",
            "--search-batches", "2", "--search-distill-candidates", "0", "--seq-len", "16", "--output", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "a data source is required" in err, err
    assert "ranks the candidate shapes by their loss" in err and "distils the best few" in err
    assert not out.exists() and not (tmp_path / "searched.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # a data file that does not exist: refused up front too
    assert main(args + ["--data", str(tmp_path / "nope.txt")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(args + ["--data", str(text_corpus)]) == 0
    assert (out / "config.json").is_file() and not (tmp_path / "searched.partial").exists()


def test_scoring_without_data_is_refused_before_any_folder(tmp_path, tiny_llama, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_llama), "--hidden-size", "24", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a data source is required" in err and "--scores" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_llama.name]


def test_a_foreign_partial_folder_is_kept_and_refused(tmp_path, tiny_llama, text_corpus, capsys):
    """``<output>.partial`` without the search's marker (here a recovery's checkpoint folder)
    is never deleted, not even with --overwrite: one line names it."""
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    out = tmp_path / "x"
    foreign = tmp_path / "x.partial" / "checkpoint-00000001"
    foreign.mkdir(parents=True)
    (foreign / "state.json").write_text("{}")
    args = ["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--seq-len", "16",
            "--scores", str(scores_dir), "--target-params", "0.7", "--search-batches", "2",
            "--search-distill-candidates", "0", "--output", str(out)]
    capsys.readouterr()
    for extra in ([], ["--overwrite"], ["--resume"], ["--resume", "--overwrite"]):
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(tmp_path / "x.partial") in err and "not the working folder" in err, err
        assert (foreign / "state.json").read_text() == "{}" and not out.exists()
    # an empty leftover folder holds nothing: the search uses it
    (foreign / "state.json").unlink()
    foreign.rmdir()
    assert main(args) == 0 and (out / "config.json").is_file() and not (tmp_path / "x.partial").exists()


def test_a_search_that_failed_before_any_progress_does_not_block_the_next(tmp_path, tiny_llama, text_corpus,
                                                                          monkeypatch, capsys):
    """A search killed while scoring leaves only its marker: the next command starts afresh."""
    from minicompress.recipes import prune as prune_recipe

    out = tmp_path / "s"
    args = ["prune", "--model", str(tiny_llama), "--data", str(text_corpus), "--seq-len", "16", "--num-samples", "8",
            "--loss-samples", "0", "--target-params", "0.7", "--search-batches", "2",
            "--search-distill-candidates", "0", "--output", str(out)]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_recipe, "score", killed)
    assert main(args) == 130
    assert (tmp_path / "s.partial" / "search-state.json").is_file()
    monkeypatch.undo()
    assert main(args) == 0 and (out / "config.json").is_file() and not (tmp_path / "s.partial").exists()


def test_each_distilled_candidate_is_released_before_the_next(tmp_path, tiny_model_dir, text_corpus, monkeypatch):
    """Nothing of a distilled candidate outlives it: its student module is gone (weakref dead
    after gc), the fused loss's workspace is freed and glibc's free heap handed back, before
    the next candidate and at the end."""
    import gc
    import weakref

    from minicompress.distillation import losses
    from minicompress import measure
    from minicompress.recipes import prune as prune_recipe

    real = prune_recipe.distill
    students, checks, trims = [], [], []

    def check(when):
        gc.collect()
        checks.append((when, [ref() is not None for ref in students], dict(losses._WORKSPACE)))

    def tracking_recover(student, *args, **kwargs):
        check(f"before candidate {len(students) + 1}")
        students.append(weakref.ref(student))
        result = real(student, *args, **kwargs)
        assert losses._WORKSPACE  # the distillation used the fused loss's cached buffers
        result["held"] = student  # a report that holds on to the run's objects
        return result

    monkeypatch.setattr(prune_recipe, "distill", tracking_recover)
    monkeypatch.setattr(measure, "release_free_heap", lambda: trims.append(len(students)))
    losses.release_workspace()  # an earlier test's distillation may have left one
    model_dir = tiny_model_dir("llama", num_hidden_layers=4)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--data", str(text_corpus), "--seq-len", "16",
                 "--num-samples", "8", "--batch-size", "4", "--loss-samples", "4", "--target-params", "0.7",
                 "--search-batches", "2", "--width-multiple", "8", "--search-distill-candidates", "3",
                 "--search-distill-tokens", "128", "--output", str(out), *SEARCH_RECOVER]) == 0
    check("end")
    assert len(students) == 3 and [c[0] for c in checks][-1] == "end"
    for when, alive, workspace in checks:
        assert not any(alive), (when, alive)
        assert not workspace, when
    assert trims[:3] == [1, 2, 3]


def test_score_and_a_search_read_a_mixture(tmp_path, tiny_llama, text_corpus, capsys):
    """``--data-mix`` works for ``score`` and for ``prune --target-params`` (calibration rows and the
    search's short distillation both draw by weight); a mixture naming a missing file is refused
    up front with the key, leaving nothing."""
    from conftest import corpus_text

    other = tmp_path / "other.txt"
    other.write_text(corpus_text(12, seed=5) + "\n")
    mix = f"{text_corpus}=0.7,{other}=0.3"
    assert main(["score", "--model", str(tiny_llama), "--data-mix", mix, "--seq-len", "16", "--num-samples", "10",
                 "--batch-size", "5", "--output", str(tmp_path / "s")]) == 0
    scores = ImportanceScores.load(tmp_path / "s")
    assert scores.meta["data"] == mix and scores.meta["num_samples"] == 10
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["prune", "--model", str(tiny_llama), "--target-params", "0.7", "--search-batches", "2",
            "--search-distill-candidates", "1", "--search-distill-tokens", "64", "--seq-len", "16",
            "--output", str(tmp_path / "searched"), *SEARCH_RECOVER]
    capsys.readouterr()
    assert main(args + ["--data-mix", f"{text_corpus}=0.7,{tmp_path / 'nope.txt'}=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data: no such file or folder" in err and "nope.txt" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(args + ["--data-mix", mix]) == 0
    assert (tmp_path / "searched" / "config.json").is_file()


# ---- repair: auto (the default; issue 30) -------------------------------------------------


def test_default_repair_is_the_refit_where_it_can_run_and_none_elsewhere(tmp_path, tiny_llama, text_corpus):
    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    sizes = {"intermediate_size": 40, "num_attention_heads": 2}
    base = {"model": {"source": str(tiny_llama)}, "scores": str(scores_dir), "target": sizes,
            "score": {"num_samples": 40, "batch_size": 4}}
    with_data = {**base, "data": {"source": str(text_corpus), "seq_len": 16}}
    auto = build_config(PruneConfig, overrides=with_data)
    assert auto.repair == ("auto",) and auto.repairs == ("refit",) and auto.repair_ridge == "pruned"
    refit = prune(build_config(PruneConfig, overrides={**with_data, "output": str(tmp_path / "auto")}))
    explicit = prune(build_config(PruneConfig, overrides={**with_data, "output": str(tmp_path / "refit"),
                                                          "repair": ["refit"], "repair_ridge": "pruned"}))
    assert refit["repair"]["repairs"] == ["refit"] and refit["repair"]["ridge"] == "pruned"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "auto").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "refit").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # auto is exactly the explicit refit
    assert explicit["repair"]["layers"] == refit["repair"]["layers"]
    # no calibration text (scores reused, no --data): auto prunes plainly, recorded as none
    plain = prune(build_config(PruneConfig, overrides={**base, "output": str(tmp_path / "plain")}))
    assert plain["repair"] is None
    assert json.loads((tmp_path / "plain" / "minicompress.json").read_text())["config"]["repair"] == ["none"]
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_search_candidates_start_from_the_repair_the_chosen_one_gets(tmp_path, tiny_llama, text_corpus):
    from minicompress.models import load_model
    from minicompress.pruning.plan import make_plan, pruned_copy
    from minicompress.recipes.prune import _apply_plan_and_repair, _candidate, _repair_batches, _score_config

    scores_dir = _score(tmp_path, tiny_llama, text_corpus)
    cfg = build_config(PruneConfig, overrides={"model": {"source": str(tiny_llama)}, "scores": str(scores_dir),
                                               "data": {"source": str(text_corpus), "seq_len": 16},
                                               "score": {"num_samples": 40, "batch_size": 4},
                                               "target": {"intermediate_size": 40}})
    model, tok = load_model(cfg.model)
    scores = ImportanceScores.load(scores_dir)
    plan = make_plan(scores, model.config, {"intermediate_size": 40, "num_attention_heads": 2})
    score_config = _score_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidate = _candidate(cfg, model, plan, _repair_batches(cfg, tok, score_config)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher is untouched
    plain = pruned_copy(model, plan)
    _apply_plan_and_repair(cfg, model, tok, plan, score_config)  # what the chosen one gets
    got, want, unrepaired = candidate.state_dict(), model.state_dict(), plain.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], unrepaired[k]) for k in want if "down_proj" in k)

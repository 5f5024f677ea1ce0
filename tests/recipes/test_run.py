"""``minicompress run``: progressive stages on a tiny llama, restarts, dry runs, shipped configs."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import minicompress.recipes.recover
from minicompress.recipes import run as run_module
from minicompress.cli import main
from minicompress.config import RunConfig, build_config
from minicompress.errors import MinicompressError
from minicompress.evaluation.perplexity import evaluate_model as evaluate
from minicompress.models import load_model
from minicompress.outputs import read_provenance
from minicompress.recipes.run import REPORT_COLUMNS, dry_run, estimate_memory, run

ROOT = Path(__file__).resolve().parents[2]
CONFIG_JSONS = ROOT / "tests" / "fixtures" / "configs"


@pytest.fixture
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama", num_hidden_layers=3)


def _run_config(model_dir, corpus, output, **extra) -> RunConfig:
    data = {
        "model": {"source": str(model_dir)},
        "data": {"source": str(corpus), "seq_len": 16},
        "eval_data": {"source": str(corpus), "seq_len": 16},
        "output": str(output),
        "score": {"num_samples": 8, "batch_size": 4, "loss_samples": 0},
        "recover": {"global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 32, "lr": 1e-3,
                    "warmup_steps": 1, "save_every": 1},
        "report": {"prefill_tokens": 8, "decode_tokens": 2},
        "stages": [
            {"name": "ffn", "target": {"intermediate_size": 48}, "tokens": 192},
            {"name": "width", "target": {"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 2},
             "tokens": 128},
        ],
    }
    for key, value in extra.items():
        data[key] = value
    return build_config(RunConfig, overrides=data)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_llama, text_corpus, monkeypatch):
    full = run(_run_config(tiny_llama, text_corpus, tmp_path / "full"))
    assert [s["status"] for s in full["stages"]] == ["done", "done"]

    config = _run_config(tiny_llama, text_corpus, tmp_path / "killed")

    def kill_after_stage_1(result):
        if result["index"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, on_stage_end=kill_after_stage_1)
    out = tmp_path / "killed"
    assert (out / "stage-1-ffn" / "minicompress.json").is_file() and not (out / "stage-2-width").exists()

    # killed again in the middle of stage 2's recovery (after its first checkpoint)
    real_recover = minicompress.recipes.recover.recover

    def kill_at_step_1(cfg, **kwargs):
        def callback(record):
            if record["step"] == 1:
                raise KeyboardInterrupt
        return real_recover(cfg, callback=callback, **kwargs)

    monkeypatch.setattr(minicompress.recipes.recover, "recover", kill_at_step_1)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    assert (out / "stage-2-width.partial").is_dir() and (out / "stage-2-width.pruned").is_dir()
    monkeypatch.setattr(minicompress.recipes.recover, "recover", real_recover)

    resumed = run(config)
    assert [s["status"] for s in resumed["stages"]] == ["skipped", "done"]
    for stage in ("stage-1-ffn", "stage-2-width"):
        a, b = _weights(tmp_path / "full" / stage), _weights(out / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    record = read_provenance(out / "stage-2-width")
    assert record["recovery"]["config"]["resume"] is True
    assert not (out / "stage-2-width.pruned").exists() and not (out / "stage-2-width.partial").exists()

    # the report: original + 2 stages, real numbers, written three ways
    report = json.loads((out / "report.json").read_text())
    assert report["columns"] == list(REPORT_COLUMNS)
    rows = report["rows"]
    assert [r["model"] for r in rows] == ["original", "stage-1-ffn", "stage-2-width"]
    assert rows[0]["kl_to_original"] == 0.0 and rows[0]["top1_agreement"] == 1.0 and rows[0]["ratio"] == 1.0
    assert rows[2]["parameters"] < rows[1]["parameters"] < rows[0]["parameters"]
    assert all(r["perplexity"] > 1 and r["decode_tokens_per_s"] > 0 and r["size_on_disk_bytes"] > 0 for r in rows)
    assert rows[1]["wall_time_s"] > 0 and rows[2]["tokens"] == 128
    teacher, tok = load_model(str(tiny_llama))
    student, _ = load_model(str(out / "stage-2-width"))
    direct = evaluate(student, tok, str(text_corpus), teacher=teacher, seq_len=16)
    assert rows[2]["kl_to_original"] == pytest.approx(direct["kl_to_teacher"], rel=1e-6)
    assert rows[2]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    markdown = (out / "report.md").read_text()
    assert "| model | parameters | ratio | size on disk | held-out perplexity | KL to original |" in markdown
    assert f"| stage-2-width | {rows[2]['parameters']:,} |" in markdown
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert yaml.safe_load((out / "minicompress.yaml").read_text())["stages"][1]["name"] == "width"
    card = (out / "stage-2-width" / "README.md").read_text()
    assert card.startswith("---\n") and "distilled" in card and "Stage 2 of 2" in card


def test_cli_run_rerun_and_refusals(tmp_path, tiny_llama, text_corpus, capsys):
    config = _run_config(tiny_llama, text_corpus, tmp_path / "r", stages=[
        {"name": "prune", "target": {"intermediate_size": 48}, "tokens": 0}], eval_data={"source": None})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_as_yaml(config)))
    capsys.readouterr()
    assert main(["run", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "stage-1-prune" in out and "no eval_data" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"][1]["perplexity"] is None and report["rows"][1]["parameters"] < report["rows"][0]["parameters"]
    assert read_provenance(tmp_path / "r" / "stage-1-prune")["command"] == "prune"  # tokens 0: prune only
    assert run(config)["stages"][0]["status"] == "skipped"
    changed = _run_config(tiny_llama, text_corpus, tmp_path / "r", stages=[
        {"name": "prune", "target": {"intermediate_size": 40}, "tokens": 0}], eval_data={"source": None})
    with pytest.raises(MinicompressError, match=r"stages\[0\] \(prune\): .* other settings; pass --overwrite"):
        run(changed)
    assert run(dataclasses.replace(changed, overwrite=True))["stages"][0]["status"] == "done"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    capsys.readouterr()
    assert main(["run", str(path), "--output", str(tmp_path / "other")]) == 2
    assert "is not a minicompress run folder" in capsys.readouterr().err
    assert (tmp_path / "other" / "precious.txt").is_file()
    # report.enabled=false (models that do not fit one device): the stages, no report
    silent = run(dataclasses.replace(config, output=str(tmp_path / "silent"),
                                     report=dataclasses.replace(config.report, enabled=False)))
    assert silent["report"] is None and silent["stages"][0]["status"] == "done"
    assert not (tmp_path / "silent" / "report.json").exists()


def _as_yaml(config: RunConfig) -> dict:
    from minicompress.config import to_dict

    return to_dict(config)


def test_dry_run_prints_every_stage_without_loading_weights(tmp_path, tiny_llama, text_corpus, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("dry run loaded weights")

    monkeypatch.setattr("minicompress.models.load_model", no_weights)
    config = _run_config(tiny_llama, text_corpus, tmp_path / "d", stages=[
        {"name": "a", "target": {"intermediate_size": 48}, "tokens": 192},
        {"name": "b", "target": {"target_params": 0.5}, "tokens": 0},
        {"name": "c", "target": {"num_hidden_layers": 1}, "tokens": 64},
    ])
    plan = dry_run(config)
    a, b, c = plan["stages"]
    assert (a["intermediate_size"], a["num_hidden_layers"], a["tokens"]) == (48, 3, 192)
    total = plan["original"]["parameters"]["total"]
    assert b["hidden_size"] is None and "searched at run time" in b["note"] and b["params"] == round(0.5 * total)
    assert c["params"] is None and "run time" in c["note"]
    assert a["memory"]["weights"] + a["memory"]["grads"] + a["memory"]["adamw"] == 16 * a["params"]
    assert a["memory"]["teacher"] == 4 * total and a["memory_bytes"] >= 16 * a["params"] + 4 * total
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_as_yaml(config)))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32/4/2/48/3" in out and "search" in out and "memory" in out and not (tmp_path / "d").exists()


@pytest.mark.parametrize("stages, fragment", [
    ([{"name": "a", "target": {"intermediate_size": 5000}}], r"stages[0] (a): target.intermediate_size: must be"),
    ([{"name": "a", "target": {"num_attention_heads": 3}}], "3 is not divisible by the model's 2 KV heads"),
    ([{"name": "a", "target": {"hidden_size": 30}}], "target.hidden_size: llama configs need hidden_size divisible"),
    ([{"name": "a", "target": {"intermediate_size": 48}}, {"name": "b", "target": {"intermediate_size": 56}}],
     r"stages[1] (b): target.intermediate_size: must be between 1 and the model's 48"),
    ([{"name": "a", "target": {"target_params": 1.5}}], "1.5 is neither a ratio in (0, 1] nor a whole"),
    ([{"name": "a", "target": {"target_params": 1e9}}], "is not below the model's"),
    ([{"name": "a", "target": {"num_hidden_layers": 4}}], "target.num_hidden_layers: must be between 1 and 3"),
    ([{"name": "a", "target": {"hidden_size": 16}, "tokens": 10}], "stages[0].tokens: the budget (10)"),
    ([{"name": "a", "target": {"hidden_size": 16}, "foo": 1}], "stages[0].foo: unknown key"),
    ([{"name": "a", "target": {"hidden_size": 16}, "tokens": 64, "recover": {"output": "x"}}],
     "stages[0].recover.output: set by the run"),
    ([{"name": "a", "target": {}}], "stages[0].target: nothing to prune"),
])
def test_dry_run_errors_are_one_line(tmp_path, tiny_llama, text_corpus, capsys, stages, fragment):
    path = tmp_path / "run.yaml"
    config = {"model": str(tiny_llama), "data": {"source": str(text_corpus), "seq_len": 16},
              "recover": {"global_batch_tokens": 64, "micro_batch_size": 2}, "stages": stages}
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


def test_missing_data_is_reported_by_the_dry_run(tmp_path, tiny_llama, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_llama), "data": str(tmp_path / "nope.txt"),
                                    "stages": [{"name": "a", "target": {"hidden_size": 16}}]}))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "data.source: no such file or folder" in capsys.readouterr().err


_SOURCES = {"smollm2-135m": "smollm2-135m", "gemma3-270m": "gemma3-270m", "meta-llama/Llama-3.1-8B": "llama31-8b",
            "Qwen/Qwen3-8B": "qwen3-8b", "meta-llama/Llama-3.1-70B": "llama31-70b"}


def _expected_params(name: str, original: int) -> float:
    """A stage name states its target: ``50pct`` (of the original) or ``4.5b`` / ``30b`` (parameters)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(pct|b|m)", name)
    assert match, f"stage name {name!r} does not state its parameter target"
    value = float(match[1])
    return {"pct": value / 100 * original, "b": value * 1e9, "m": value * 1e6}[match[2]]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_dry_run_to_the_size_in_their_names(path, text_corpus, tmp_path):
    raw = yaml.safe_load(path.read_text())
    source = raw["model"]["source"]
    overrides = {"model": {"source": str(CONFIG_JSONS / f"{_SOURCES[source]}.json")},
                 "data": {"source": str(text_corpus)}, "eval_data": {"source": str(text_corpus)},
                 "output": str(tmp_path / "out")}
    plan = dry_run(build_config(RunConfig, path, overrides))
    original = plan["original"]["parameters"]["total"]
    for row in plan["stages"]:
        expected = _expected_params(row["name"], original)
        assert abs(row["params"] - expected) <= 0.03 * expected, (row["name"], row["params"], expected)
        assert row["memory_bytes"] > 0
    # the file name states the last stage's target too: "-50" (percent) or "-to-6b" / "-13b" (parameters;
    # "to-4b" is Minitron's 4.5B model, named 4B after its non-embedding size, hence the looser bound)
    last = plan["stages"][-1]
    percent = re.search(r"-(\d+)$", path.stem)
    billions = re.search(r"-(\d+(?:\.\d+)?)b$", path.stem)
    if percent:
        assert abs(last["ratio"] - int(percent[1]) / 100) <= 0.03 * int(percent[1]) / 100
    elif billions:
        assert abs(last["params"] / 1e9 - float(billions[1])) <= 0.15 * float(billions[1])


def test_estimate_memory_prune_only_is_input_plus_output():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(CONFIG_JSONS / "smollm2-135m.json"))
    memory = estimate_memory(config, None, None, dtype="bfloat16", prune_input=config)
    assert memory == {"prune": 2 * 2 * 134_515_008, "total": 2 * 2 * 134_515_008}


def test_api_is_lazy_and_callable():
    import subprocess

    import minicompress as mc

    code = ("import sys, minicompress as mc, minicompress.cli\n"
            "mc.__all__, mc.__version__\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert mc.make_plan.__name__ == "make_plan" and mc.score.__name__ == "score_model"
    assert mc.run is run and mc.dry_run is dry_run and mc.evaluate is evaluate
    assert mc.recover.__module__ == "minicompress.recipes.recover"


def _search_run(model_dir, corpus, output, search=None, stage_search=None) -> RunConfig:
    stage = {"name": "s", "target": {"target_params": 0.7}, "tokens": 0}
    if stage_search is not None:
        stage["search"] = stage_search
    extra = {"stages": [stage, {"name": "e", "target": {"intermediate_size": 32}, "tokens": 0}]}
    if search is not None:
        extra["search"] = search
    return _run_config(model_dir, corpus, output, **extra)


def test_search_settings_reach_the_stage_prune_and_its_digest(tmp_path, tiny_llama, text_corpus, monkeypatch):
    from minicompress.recipes import prune as prune_recipe

    search = {"batches": 2, "distill_candidates": 2, "distill_tokens": "128", "width_multiple": 8,
              "recover": {"global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 64, "lr": 1e-3}}
    config = _search_run(tiny_llama, text_corpus, tmp_path / "r", search=search)
    pc = config.stage_prune_config(0, model=config.model)
    assert (pc.search_batches, pc.search_distill_candidates, pc.search_distill_tokens, pc.target.width_multiple) == \
        (2, 2, 128, 8)
    assert pc.search_recover == search["recover"] and pc.data == config.data and pc.score == config.score
    # a stage's own search section wins over the run's
    override = _search_run(tiny_llama, text_corpus, tmp_path / "r", search=search,
                           stage_search={"distill_candidates": 1})
    assert override.stage_prune_config(0, model=config.model).search_distill_candidates == 1
    # the run's repair reaches every stage's prune: auto by default, none when asked
    assert pc.repair == ("auto",) and pc.repairs == ("refit",)
    plain = _run_config(tiny_llama, text_corpus, tmp_path / "r", repair=["none"],
                        stages=[{"name": "e", "target": {"intermediate_size": 32}, "tokens": 0}])
    assert plain.stage_prune_config(0, model=config.model).repairs == ()

    seen = []
    monkeypatch.setattr(prune_recipe, "prune", lambda cfg, **kw: seen.append(cfg) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(config)
    (used,) = seen
    assert (used.search_batches, used.search_distill_candidates, used.search_distill_tokens,
            used.target.width_multiple, used.search_recover) == (2, 2, 128, 8, search["recover"])
    assert used.target.target_params > 1 and used.resume and used.output.endswith("stage-1-s")

    # every search setting is in the digest of the search stage and of the stages after it
    digest = run_module._stage_digest
    base = [digest(config, 0), digest(config, 1)]
    for change in ({"batches": 3}, {"distill_candidates": 1}, {"distill_tokens": 192}, {"width_multiple": 16},
                   {"recover": {**search["recover"], "lr": 2e-3}}):
        changed = _search_run(tiny_llama, text_corpus, tmp_path / "r", search={**search, **change})
        assert digest(changed, 0) != base[0] and digest(changed, 1) != base[1], change
    per_stage = _search_run(tiny_llama, text_corpus, tmp_path / "r", search=search, stage_search={"batches": 3})
    assert digest(per_stage, 0) != base[0]
    assert digest(_search_run(tiny_llama, text_corpus, tmp_path / "r", search=dict(search)), 0) == base[0]


def test_explicit_stage_digests_ignore_search_settings(tmp_path, tiny_llama, text_corpus):
    """A run of explicit sizes only keeps its digests (and finished stages) when search settings change."""
    plain = _run_config(tiny_llama, text_corpus, tmp_path / "r")
    searched = _run_config(tiny_llama, text_corpus, tmp_path / "r", search={"distill_candidates": 1})
    assert [run_module._stage_digest(plain, i) for i in (0, 1)] == \
        [run_module._stage_digest(searched, i) for i in (0, 1)]


def test_a_resumed_run_with_other_search_settings_is_refused(tmp_path, tiny_llama, text_corpus):
    search = {"batches": 2, "distill_candidates": 0, "width_multiple": 8}
    config = _search_run(tiny_llama, text_corpus, tmp_path / "r", search=search)
    config = dataclasses.replace(config, stages=config.stages[:1], report=dataclasses.replace(config.report,
                                                                                              enabled=False))
    assert run(config)["stages"][0]["status"] == "done"
    assert run(config)["stages"][0]["status"] == "skipped"
    changed = dataclasses.replace(config, search={**search, "batches": 3})
    with pytest.raises(MinicompressError, match=r"stages\[0\] \(s\): .* other settings; pass --overwrite"):
        run(changed)


@pytest.mark.parametrize("search, stage_search, fragment", [
    ({"foo": 1}, None, "search.foo: unknown key; allowed keys of search: batches, distill_candidates"),
    ({"recover": {"lr": -1}}, None, "search.recover.lr: must be a number > 0"),
    (None, {"distill_tokens": 10}, "stages[0].search.distill_tokens: the budget (10) is less than one optimizer step"),
    ({"batches": 0}, None, "search.batches: must be a number > 0"),
    ({"recover": {"output": "x"}}, None, "search.recover.output: set by the prune"),
    (None, {"width_multiple": "x"}, "stages[0].search.width_multiple: expected int"),
])
def test_search_setting_errors_name_the_key(tmp_path, tiny_llama, text_corpus, capsys, search, stage_search, fragment):
    config = {"model": str(tiny_llama), "data": {"source": str(text_corpus), "seq_len": 16},
              "stages": [{"name": "a", "target": {"target_params": 0.5}, **({"search": stage_search} if stage_search
                                                                            else {})}]}
    if search is not None:
        config["search"] = search
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err



_DRY_RUN_EACH = """
import sys
from minicompress.cli import main
for line in sys.stdin.read().splitlines():
    args = line.split("\\t")
    print(f"=== {args[1]}", flush=True)
    if main(args) != 0:
        sys.exit(f"failed: {args[1]}")
"""


def test_shipped_configs_dry_run_from_the_command_line_with_no_hub_cache(tmp_path, text_corpus):
    """``minicompress run configs/X.yaml --dry-run`` as the README gives it, offline, with an empty
    Hub cache and no converted built-in: the configs shipped in the package stand in. One fresh
    process dry-runs every shipped config through the CLI's ``main`` (one interpreter start, not one
    per config: the suite's time)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                                                             "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MINICOMPRESS_CACHE=str(tmp_path / "mc"),
               MINICOMPRESS_PROGRESS="0", OMP_NUM_THREADS="1")
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 8
    lines = []
    for path in paths:
        raw = yaml.safe_load(path.read_text())
        overrides = []  # a local corpus this checkout lacks (../shared/data/...): the test's own text
        for key in ("data", "eval_data"):
            source = (raw.get(key) or {}).get("source", "")
            if source.startswith((".", "/", "~")) and not (ROOT / source).exists():
                overrides.append(f"{key}.source={text_corpus}")
        lines.append("\t".join(["run", str(path.relative_to(ROOT)), "--dry-run", *overrides]))
    result = subprocess.run([sys.executable, "-c", _DRY_RUN_EACH], input="\n".join(lines), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in paths:  # every config printed its own dry run
        section = result.stdout.split(f"=== {path.relative_to(ROOT)}\n", 1)[1].split("\n=== ", 1)[0]
        assert "dry run of" in section, (path.name, section[-2000:])
    assert not (tmp_path / "hf" / "hub").exists()


def _data_free_config(model_dir, output, generate=None, **extra) -> RunConfig:
    return build_config(RunConfig, overrides={
        "model": {"source": str(model_dir)}, "data": {"seq_len": 16}, "output": str(output),
        "generate": generate or {"tokens": 12 * 16, "batch_size": 4, "shard_tokens": 64, "autocast": "none",
                                 "workers": 1},
        "score": {"num_samples": 4, "batch_size": 4, "loss_samples": 0},
        "recover": {"global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 32, "warmup_steps": 1},
        "report": {"enabled": False},
        "stages": [{"name": "ffn", "target": {"intermediate_size": 48}, "tokens": 128}], **extra})


def test_a_data_free_run_calibrates_and_recovers_on_the_originals_own_text(tmp_path, tiny_llama):
    config = _data_free_config(tiny_llama, tmp_path / "r")
    run(config)
    generated = tmp_path / "r" / "generated"
    assert read_provenance(generated)["command"] == "generate"
    assert len((generated / "text.jsonl").read_text().splitlines()) == 12
    record = read_provenance(tmp_path / "r" / "stage-1-ffn")
    assert record["config"]["data"]["source"] == str(generated / "text.jsonl")  # scored on the generated text
    recovery = record["recovery"]
    # the original is the teacher: its sparse targets, kept as it wrote, replace a teacher forward
    assert recovery["teacher_cache"] == str(generated) and recovery["loss"]["kind"] == "sampled_kl"
    assert recovery["config"]["teacher"] is None and recovery["tokens_trained"] == 128
    before = _weights(tmp_path / "r" / "stage-1-ffn")
    run(config)  # finished: the same config skips everything, the generated text included
    torch.testing.assert_close(_weights(tmp_path / "r" / "stage-1-ffn"), before, rtol=0, atol=0)
    other = _data_free_config(tiny_llama, tmp_path / "r", generate={"tokens": 12 * 16, "batch_size": 4,
                                                                    "shard_tokens": 64, "autocast": "none",
                                                                    "temperature": 0.7})
    with pytest.raises(MinicompressError, match="generate: .* other settings"):
        run(other)


def test_a_first_run_resumes_nothing_without_a_resume_warning(tmp_path, tiny_llama, caplog, monkeypatch):
    """run resumes an interrupted generation or recovery itself: a fresh run has none, and the
    '--resume, but ...' warnings are for a user who typed --resume, not for it."""
    from minicompress.recipes import generate as generate_module

    real_write = generate_module._write_shard

    def killed_at_shard_1(teacher, starts, shard, *args):
        if shard == 1:
            raise KeyboardInterrupt
        return real_write(teacher, starts, shard, *args)

    config = _data_free_config(tiny_llama, tmp_path / "r")
    with caplog.at_level(logging.WARNING, logger="minicompress"):
        monkeypatch.setattr(generate_module, "_write_shard", killed_at_shard_1)
        with pytest.raises(KeyboardInterrupt):
            run(config)
        first_shard = tmp_path / "r" / "generated.partial" / "shard-00000.safetensors"
        written = first_shard.stat().st_mtime_ns
        monkeypatch.setattr(generate_module, "_write_shard", real_write)
        run(config)  # resumes the generation (its first shard is kept), then a first recovery
    assert (tmp_path / "r" / "generated" / "shard-00000.safetensors").stat().st_mtime_ns == written
    assert (tmp_path / "r" / "stage-1-ffn" / "model.safetensors").is_file()
    resumes = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
    assert resumes == []
    record = read_provenance(tmp_path / "r" / "stage-1-ffn")
    assert record["recovery"]["config"]["resume"] is False  # nothing was there to resume


def test_a_generate_budget_the_held_out_rows_use_up_is_refused_before_anything(tmp_path, tiny_llama):
    """generate: {tokens: 192} (12 rows of 16) with recover: {eval_tokens: 4096} (256 rows held out)
    failed only after generating, scoring and pruning: the dry run's stage checks refuse it,
    and a search that distils its candidates on the generated text is checked the same way."""
    config = _data_free_config(tiny_llama, tmp_path / "r",
                               recover={"global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 4096})
    with pytest.raises(MinicompressError, match=r"^stages\[0\] \(ffn\): recover.eval_tokens: holding out 4,096 tokens "
                                                r"\(256 rows of data.seq_len 16\) leaves none of the 12 rows "
                                                r"generate.tokens makes to train on"):
        run(config)
    assert not (tmp_path / "r").exists()
    search = _data_free_config(tiny_llama, tmp_path / "r", stages=[
        {"name": "s", "target": {"target_params": 0.7}, "tokens": 0,
         "search": {"distill_candidates": 1, "distill_tokens": 64,
                    "recover": {"global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 192}}}])
    with pytest.raises(MinicompressError, match=r"^stages\[0\] \(s\): stages\[0\].search.recover.eval_tokens: "
                                                r"holding out 192 tokens"):
        dry_run(search)
    assert not (tmp_path / "r").exists()
    dry_run(_data_free_config(tiny_llama, tmp_path / "r"))  # 2 of 12 rows held out: fine


def test_a_run_without_text_or_generate_section_is_refused(tmp_path, tiny_llama):
    from minicompress.errors import ConfigError

    with pytest.raises(ConfigError, match="data.source: .*generate"):
        build_config(RunConfig, overrides={"model": str(tiny_llama), "output": str(tmp_path / "r"),
                                           "stages": [{"name": "a", "target": {"intermediate_size": 48}}]})
    for bad, fragment in (({"teacher": "x"}, "generate.teacher: set by the run"),
                          ({"tokens": 8}, "generate.tokens: 8 is less than one sequence"),
                          ({"top_kk": 5}, "generate.top_kk: unknown key")):
        with pytest.raises(ConfigError, match=fragment):
            _data_free_config(tiny_llama, tmp_path / "r", generate=bad)
    assert not (tmp_path / "r").exists()


def test_run_report_has_a_task_accuracy_column_per_task(tmp_path, tiny_llama, text_corpus, capsys, offline_hub):
    pytest.importorskip("lm_eval")
    from conftest import choice_rows, write_choice_task
    from minicompress.evaluation.tasks import evaluate_tasks

    tasks = write_choice_task(tmp_path / "tasks", choice_rows(6, seed=2))
    config = _run_config(tiny_llama, text_corpus, tmp_path / "r", stages=[
        {"name": "prune", "target": {"intermediate_size": 48}, "tokens": 0}], eval_data={"source": None},
        eval_tasks=["tiny_choice"], eval_include_path=str(tasks), report={"speed": False})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_as_yaml(config)))
    assert main(["run", str(path), "-q"]) == 0
    printed = "".join(capsys.readouterr().out.split())  # the title wraps (at spaces or hyphens) with the path
    assert "taskcolumns:lm-evalacc" in printed and "tiny_ch" in printed, printed  # a narrow console cuts headers
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    columns = list(REPORT_COLUMNS)
    columns.insert(columns.index("top1_agreement") + 1, "tiny_choice/acc")
    assert report["columns"] == columns and report["tasks"]["names"] == ["tiny_choice"]
    for row, folder in zip(report["rows"], (tiny_llama, tmp_path / "r" / "stage-1-prune")):
        model, tokenizer = load_model(str(folder))
        expected = evaluate_tasks(model, tokenizer, "tiny_choice", include_path=tasks, autocast="none")
        assert row["tasks"] == expected and row["tiny_choice/acc"] == expected["tiny_choice"]["acc"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| top-1 agreement | tiny_choice/acc | decode tok/s |" in markdown and "lm-evaluation-harness `acc`" in markdown
    with pytest.raises(MinicompressError, match=r"^eval_tasks: unknown task 'nope' .*eval_include_path DIR"):
        run(dataclasses.replace(config, eval_tasks=("nope",), eval_include_path=None, output=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_a_dry_run_checks_every_source_of_a_mixture(tmp_path, tiny_llama, text_corpus):
    config = build_config(RunConfig, overrides={
        "model": {"source": str(tiny_llama)}, "output": str(tmp_path / "r"),
        "data": {"seq_len": 16, "mixture": [{"source": str(text_corpus), "weight": 0.7},
                                            {"source": str(tmp_path / "nope.txt"), "weight": 0.3}]},
        "recover": {"global_batch_tokens": 64, "micro_batch_size": 2},
        "stages": [{"name": "ffn", "target": {"intermediate_size": 48}, "tokens": 128}]})
    with pytest.raises(MinicompressError, match=r"^data.mixture\[1\].source: no such file or folder: .*nope.txt$"):
        dry_run(config)
    other = tmp_path / "other.txt"
    other.write_text(text_corpus.read_text())
    ok = dataclasses.replace(config, data=dataclasses.replace(
        config.data, mixture=(config.data.mixture[0], dataclasses.replace(config.data.mixture[1], source=str(other)))))
    assert [row["name"] for row in dry_run(ok)["stages"]] == ["ffn"]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- teacher correction (correct:)

_CORRECT = {"tokens": 128, "global_batch_tokens": 64, "micro_batch_size": 2, "eval_tokens": 32, "lr": 1e-3,
            "warmup_steps": 1, "autocast": "none"}


def test_a_correct_section_corrects_first_then_prunes_and_distils_from_the_corrected_teacher(
        tmp_path, tiny_llama, text_corpus, capsys):
    config = _run_config(tiny_llama, text_corpus, tmp_path / "r", correct=_CORRECT, report={"speed": False},
                         stages=[{"name": "ffn", "target": {"intermediate_size": 48}, "tokens": 64},
                                 {"name": "prev", "target": {"intermediate_size": 40}, "tokens": 64,
                                  "teacher": "previous"}])
    plan = dry_run(config)
    assert plan["correct"]["tokens"] == 128 and plan["correct"]["output"] == "corrected"
    assert plan["correct"]["memory_bytes"] >= 16 * plan["original"]["parameters"]["total"]
    assert [row["teacher"] for row in plan["stages"]] == ["corrected", "previous"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_as_yaml(config)))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "teacher correction: the original is first fine-tuned on 128 tokens" in \
        " ".join(capsys.readouterr().out.split())

    result = run(config)
    corrected = tmp_path / "r" / "corrected"
    assert result["corrected"]["folder"] == str(corrected) and result["corrected"]["status"] == "done"
    correction = read_provenance(corrected)["correction"]
    assert correction["tokens_trained"] == 128 and correction["teacher"] == str(tiny_llama)
    assert correction["metrics_after"]["perplexity"] < correction["metrics_before"]["perplexity"]
    first, second = read_provenance(tmp_path / "r" / "stage-1-ffn"), read_provenance(tmp_path / "r" / "stage-2-prev")
    assert first["source_model"] == str(corrected)  # stage 1 prunes the corrected teacher ...
    assert first["recovery"]["teacher"] == str(corrected)  # ... and distils from it
    assert first["run_stage"]["corrected_teacher"] == str(corrected)
    assert first["run_stage"]["original_source"] == str(tiny_llama)
    assert second["recovery"]["teacher"] == str(tmp_path / "r" / "stage-1-ffn")
    rows = result["report"]["rows"]
    assert [r["model"] for r in rows] == ["original", "corrected", "stage-1-ffn", "stage-2-prev"]
    assert rows[1]["tokens"] == 128 and rows[1]["parameters"] == rows[0]["parameters"] and rows[1]["kl_to_original"] > 0
    assert "teacher correction" in (tmp_path / "r" / "report.md").read_text()
    assert "corrected" in json.loads((tmp_path / "r" / "timings.json").read_text())

    again = run(config)  # finished: nothing is trained again
    assert again["corrected"]["status"] == "skipped" and [s["status"] for s in again["stages"]] == ["skipped"] * 2
    other = _run_config(tiny_llama, text_corpus, tmp_path / "r", correct={**_CORRECT, "lr": 2e-3},
                        report={"speed": False}, stages=config.stages)
    with pytest.raises(MinicompressError, match="correct: .* other settings"):
        run(other)


def test_a_correct_section_changes_the_stage_digests_and_bad_keys_are_refused(tmp_path, tiny_llama, text_corpus):
    from minicompress.errors import ConfigError

    plain = _run_config(tiny_llama, text_corpus, tmp_path / "r")
    corrected = _run_config(tiny_llama, text_corpus, tmp_path / "r", correct=_CORRECT)
    assert run_module._stage_digest(plain, 0) != run_module._stage_digest(corrected, 0)
    for bad, fragment in (({"teacher": "x"}, "correct.teacher: set by the run"),
                          ({"tokens": -1}, "correct.tokens: must be a number >= 0"),
                          ({"lrr": 1}, "correct.lrr: unknown key")):
        with pytest.raises(ConfigError, match=fragment):
            _run_config(tiny_llama, text_corpus, tmp_path / "r", correct=bad)
    with pytest.raises(ConfigError, match="correct: a data-free run"):
        _data_free_config(tiny_llama, tmp_path / "r", correct=_CORRECT)
    assert not (tmp_path / "r").exists()


def test_an_interrupted_correction_resumes_to_the_uninterrupted_teacher(tmp_path, tiny_llama, text_corpus,
                                                                        monkeypatch):
    import minicompress.recipes.correct

    def config(output):
        return _run_config(tiny_llama, text_corpus, output, correct={**_CORRECT, "save_every": 1},
                           report={"enabled": False},
                           stages=[{"name": "ffn", "target": {"intermediate_size": 48}, "tokens": 0}])

    run(config(tmp_path / "full"))
    real_correct = minicompress.recipes.correct.correct

    def killed_at_step_1(cfg, **kwargs):
        def callback(record):
            if record["step"] == 1:
                raise KeyboardInterrupt
        return real_correct(cfg, callback=callback, **kwargs)

    monkeypatch.setattr(minicompress.recipes.correct, "correct", killed_at_step_1)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "killed"))
    assert (tmp_path / "killed" / "corrected.partial").is_dir() and not (tmp_path / "killed" / "corrected").exists()
    monkeypatch.setattr(minicompress.recipes.correct, "correct", real_correct)
    resumed = run(config(tmp_path / "killed"))
    assert resumed["corrected"]["status"] == "done"
    assert read_provenance(tmp_path / "killed" / "corrected")["correction"]["resumed_from_step"] == 1
    a, b = _weights(tmp_path / "full" / "corrected"), _weights(tmp_path / "killed" / "corrected")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _weights(tmp_path / "full" / "stage-1-ffn"), _weights(tmp_path / "killed" / "stage-1-ffn")
    assert all(torch.equal(a[k], b[k]) for k in a)

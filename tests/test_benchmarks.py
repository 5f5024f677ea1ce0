"""``benchmarks/``: every script still starts (``--help``) and the shared helpers work."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common as module

    return module


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


#: scripts still being written elsewhere (the token store's data-path benchmark), not yet on common.py
NOT_YET_ON_COMMON = {"data_path.py"}


def test_no_script_keeps_its_own_copy_of_the_shared_helpers():
    for script in (s for s in SCRIPTS if s.name not in NOT_YET_ON_COMMON):
        text = script.read_text()
        assert "def _free_port" not in text and '["lscpu"]' not in text and "lscpu |" not in text, script.name


def test_shared_helpers(common, tmp_path, capsys):
    port = common.free_port()
    with socket.socket() as sock:  # free now
        sock.bind(("127.0.0.1", port))
    facts = common.cpu_facts()
    assert set(facts) >= {"model", "cpus", "avx512_bf16", "amx_bf16", "amx_tile", "native_bf16", "load_average"}
    assert isinstance(facts["model"], str) and facts["cpus"] >= 1
    record = common.run_record(rows=[1])
    assert record["rows"] == [1] and {"torch", "transformers"} <= set(record["versions"])
    out = common.write_json(tmp_path / "out" / "r.json", record)
    assert json.loads(out.read_text())["cpu"]["model"] == facts["model"]
    common.print_table("title", ("name", "value"), [("a", 1.5), ("b", None)])
    printed = capsys.readouterr().out
    assert "title" in printed and "1.5" in printed
    assert common.status_kib("VmRSS") > 0


# ---------------------------------------------------------------------------------------
# benchmarks/distill_variants.py (issue 29): variants, equal-time arithmetic, the teacher's NLL


@pytest.fixture
def variants(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("distill_variants", None)
    import distill_variants as module

    return module


def test_presets_spell_issue_29s_variants_with_the_cli_flags(variants):
    from types import SimpleNamespace

    args = SimpleNamespace(correction_tokens=[65536, 262144], teacher_weights=[0.3, 0.7], lambdas=[0.0, 0.25],
                           jsd_beta=0.5)
    corr = variants.preset_variants("correction", args)
    assert corr == {"orig": [], "corr64Ki": ["--teacher", "{corrected:65536}"],
                    "corr256Ki": ["--teacher", "{corrected:262144}"],
                    "both256Ki-w0.3": ["--teacher", "{teacher}", "--teacher", "{corrected:262144}",
                                       "--teacher-weights", "0.3,0.7"],
                    "both256Ki-w0.7": ["--teacher", "{teacher}", "--teacher", "{corrected:262144}",
                                       "--teacher-weights", "0.7,0.3"]}
    assert variants.corrections_in(corr["both256Ki-w0.3"]) == [262144]
    assert variants.resolve_flags(corr["both256Ki-w0.3"], "T", {262144: "/c"})[:4] == ["--teacher", "T", "--teacher", "/c"]
    onp = variants.preset_variants("onpolicy", args)
    assert onp["fkl-l25"] == ["--on-policy", "0.25", "--divergence", "forward"]
    assert onp["jsd-l0"] == ["--on-policy", "0", "--divergence", "jsd", "--jsd-beta", "0.5"]
    assert variants.gkd_settings(onp["jsd-l0"]) == {"lmbda": 0.0, "divergence": "jsd", "beta": 0.5}
    assert variants.gkd_settings([]) == {"lmbda": 0.0, "divergence": "forward", "beta": 0.0}
    assert variants.parse_variant("both=--teacher a --teacher-weights '0.5,0.5'") == (
        "both", ["--teacher", "a", "--teacher-weights", "0.5,0.5"])
    assert variants.parse_variant("base=") == ("base", [])
    with pytest.raises(ValueError, match="LABEL=FLAGS"):
        variants.parse_variant("--on-policy 0.5")
    with pytest.raises(ValueError, match="correction-tokens"):
        variants.preset_variants("correction", SimpleNamespace(correction_tokens=[]))


def test_equal_time_arithmetic(variants):
    assert variants.flag_value(["--on-policy", "0.25", "--on-policy=0.5"], "--on-policy") == "0.5"
    # elapsed_s is cumulative; the first step (compilation) is left out; step-0 and untimed records ignored
    records = [{"step": 0, "tokens": 0, "eval_perplexity": 9.0}, {"step": 1, "elapsed_s": 10.0},
               {"step": 2, "elapsed_s": 12.5}, {"step": 3, "elapsed_s": 14.0}, {"step": 4, "elapsed_s": 16.0}]
    assert variants.seconds_per_step(records) == pytest.approx(2.0)
    assert variants.seconds_per_step(records, skip=0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="probe-steps"):
        variants.seconds_per_step(records[:2])
    assert [variants.steps_in_budget(b, 2.0) for b in (10.0, 9.99, 0.5)] == [5, 4, 1]
    assert variants.steps_in_budget(0.3, 0.1) == 3  # no float floor off by one
    points = [(0.0, 10.0), (4.0, 6.0), (8.0, 5.0)]
    assert variants.value_at(points, 2.0) == pytest.approx(8.0)
    assert variants.value_at(points, 8.0) == pytest.approx(5.0)
    assert variants.value_at(points, 9.0) is None
    assert variants.short_tokens(65536) == "64Ki" and variants.short_tokens(1_000_000) == "1M"


def test_teacher_nll_matches_a_float64_reference(variants, make_tiny_model):
    import torch

    teacher = make_tiny_model("llama", seed=1)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    got = variants.teacher_nll(teacher, ids, 4, rows_per_forward=2, autocast="none")
    ref = torch.zeros(3, 7, dtype=torch.float64)
    double = make_tiny_model("llama", seed=1).double()
    with torch.no_grad():
        logits = double(input_ids=ids).logits
    for b in range(3):
        for t in range(4, 11):  # the token at t given everything before it
            ref[b, t - 4] = -torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    assert variants.distinct_bigrams(torch.tensor([[1, 2, 1, 2, 1], [1, 2, 3, 4, 5]])) == pytest.approx(0.75)


def test_free_generation_is_seeded_and_scores_the_generated_tokens(variants, make_tiny_model):
    import torch

    student, teacher = make_tiny_model("llama", seed=2), make_tiny_model("llama", seed=3)
    prompts = torch.randint(0, student.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    first = variants.free_generation(student, teacher, prompts, 6, seed=7)
    again = variants.free_generation(student, teacher, prompts, 6, seed=7)
    assert first == again and (first["rows"], first["new_tokens"]) == (2, 6)
    assert first["teacher_ppl"] == pytest.approx(torch.tensor(first["teacher_nll"]).exp().item(), rel=1e-6)
    assert 0 < first["distinct_bigrams"] <= 1 and not student.training

"""``minicompress generate``: teacher-written recovery data as a teacher cache plus JSONL."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from minicompress.cli import main
from minicompress.config import DataConfig, GenerateConfig, ModelConfig, RecoverConfig
from minicompress.errors import ConfigError, MinicompressError
from minicompress.recipes import generate as generate_recipe
from minicompress.recipes.recover import recover
from minicompress.runtime import final_hidden
from minicompress.distillation.teacher_cache import TeacherCache
from minicompress import arch

SEQ = 16


def _config(out, **kw) -> GenerateConfig:
    kw = {"tokens": 6 * SEQ, "workers": 1, **kw}
    return GenerateConfig(teacher=ModelConfig(), data=DataConfig(seq_len=SEQ), batch_size=2,
                          shard_tokens=2 * SEQ, autocast="none", output=str(out), **kw)


def test_generate_writes_a_teacher_cache_whose_targets_are_the_teachers(tmp_path, tiny_tokenizer):
    teacher = make_tiny_model("llama")
    report = generate_recipe.generate(_config(tmp_path / "gen"), teacher=teacher, tokenizer=tiny_tokenizer)
    assert report["rows"] == 6 and report["tokens"] == 6 * SEQ and report["shards"] == 3
    cache = TeacherCache(tmp_path / "gen")
    assert cache.kind == "sampled" and cache.top_k == 12 and len(cache) == 6 and cache.seq_len == SEQ
    assert not (tmp_path / "gen.partial").exists()
    lines = (tmp_path / "gen" / "text.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(isinstance(json.loads(line)["text"], str) for line in lines)
    index = json.loads((tmp_path / "gen" / "teacher_cache.json").read_text())
    assert index["generated"]["top_k"] == 50 and index["generated"]["temperature"] == 1.0
    # the stored log-probs are the teacher's: one full forward of the generated rows
    values, indices, kind = cache.targets(torch.arange(6))
    with torch.no_grad():
        logp = torch.log_softmax(arch.compute_logits(teacher, final_hidden(teacher, cache.input_ids)).float(), -1)
    expected = logp.gather(-1, indices)
    assert kind == "sampled_kl"
    torch.testing.assert_close(values.float(), expected, atol=2e-2, rtol=1e-2)  # stored as bf16


def test_a_killed_generate_resumes_to_the_same_output(tmp_path, tiny_tokenizer, monkeypatch):
    teacher = make_tiny_model("llama")
    generate_recipe.generate(_config(tmp_path / "whole"), teacher=teacher, tokenizer=tiny_tokenizer)
    real, calls = generate_recipe.sample_batch, {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_recipe, "sample_batch", dies_on_third_batch)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        generate_recipe.generate(_config(out), teacher=teacher, tokenizer=tiny_tokenizer)
    assert not out.exists() and (tmp_path / "resumed.partial" / "shard-00001.safetensors").is_file()
    with pytest.raises(MinicompressError, match="--resume"):
        generate_recipe.generate(_config(out), teacher=teacher, tokenizer=tiny_tokenizer)
    monkeypatch.setattr(generate_recipe, "sample_batch", real)
    report = generate_recipe.generate(_config(out, resume=True), teacher=teacher, tokenizer=tiny_tokenizer)
    assert report["resumed_shards"] == 2
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        a = load_file(str(tmp_path / "whole" / f"{shard}.safetensors"))
        b = load_file(str(out / f"{shard}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "text.jsonl").read_text() == (tmp_path / "whole" / "text.jsonl").read_text()


def test_worker_processes_write_what_one_process_writes(tmp_path, tiny_tokenizer):
    teacher = make_tiny_model("llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: bitwise the same arithmetic
    try:
        one = generate_recipe.generate(_config(tmp_path / "one"), teacher=teacher, tokenizer=tiny_tokenizer)
        two = generate_recipe.generate(_config(tmp_path / "two", workers=2), teacher=teacher, tokenizer=tiny_tokenizer)
    finally:
        torch.set_num_threads(threads)
    assert one["workers"] == 1 and two["workers"] == 2 and two["tokens"] == 6 * SEQ
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        a = load_file(str(tmp_path / "one" / f"{shard}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"{shard}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), shard
    assert (tmp_path / "two" / "text.jsonl").read_text() == (tmp_path / "one" / "text.jsonl").read_text()
    assert json.loads((tmp_path / "two" / "minicompress.json").read_text())["workers"] == 2


def test_plan_workers_uses_one_process_per_core_on_a_cpu(monkeypatch):
    monkeypatch.setattr(generate_recipe.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    cpu = torch.device("cpu")
    assert generate_recipe.plan_workers(0, cpu, pending=10) == (4, 1)
    assert generate_recipe.plan_workers(0, cpu, pending=3) == (3, 1)  # never more processes than shards
    assert generate_recipe.plan_workers(2, cpu, pending=10) == (2, 2)
    assert generate_recipe.plan_workers(0, torch.device("cuda"), pending=10)[0] == 1


def test_recover_trains_on_generated_text(tmp_path, tiny_tokenizer):
    teacher = make_tiny_model("llama")
    generate_recipe.generate(_config(tmp_path / "gen", tokens=12 * SEQ), teacher=teacher, tokenizer=tiny_tokenizer)
    student = make_tiny_model("llama", seed=1)
    result = recover(RecoverConfig(teacher_cache=str(tmp_path / "gen"), data=DataConfig(seq_len=SEQ),
                                   tokens=4 * 2 * SEQ, global_batch_tokens=2 * SEQ, micro_batch_size=2,
                                   eval_tokens=2 * SEQ, lr=1e-2, autocast="none", compile=False,
                                   output=str(tmp_path / "student")), student=student, tokenizer=tiny_tokenizer)
    assert result["after"]["sampled_kl_to_teacher"] < result["before"]["sampled_kl_to_teacher"]


def test_bad_generate_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(ConfigError, match="tokens"):
        GenerateConfig(tokens=10, data=DataConfig(seq_len=SEQ))
    model = tiny_model_dir("llama")
    out = tmp_path / "gen"
    assert main(["generate", "--teacher", str(model), "--tokens", "8", "--seq-len", str(SEQ),
                 "--output", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --tokens") and "one sequence" in last
    assert main(["generate", "--teacher", str(model), "--tokens", "64", "--seq-len", str(SEQ), "--top-p", "0",
                 "--output", str(out)]) == 2
    assert "top_p" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "gen.partial").exists()


def test_generate_cli_from_prompt_text(tmp_path, tiny_model_dir, text_corpus):
    model = tiny_model_dir("llama")
    out = tmp_path / "gen"
    assert main(["generate", "--teacher", str(model), "--data", str(text_corpus), "--tokens", str(4 * SEQ),
                 "--seq-len", str(SEQ), "--prompt-tokens", "3", "--batch-size", "2", "--autocast", "none",
                 "--output", str(out)]) == 0
    cache = TeacherCache(out)
    assert len(cache) == 4 and (out / "minicompress.json").is_file()

"""``minicompress correct``: teacher correction (Sreenivas et al., arXiv 2408.11796) on tiny llamas.

A few optimizer steps of 64 tokens each; the teacher is a saved tiny model folder or an
in-memory one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import corpus_text, make_tiny_model
from minicompress import checkpoint
from minicompress.cli import main
from minicompress.config import CorrectConfig, DataConfig, LossConfig, ModelConfig, RecoverConfig
from minicompress.data.rows import load_training_data
from minicompress.errors import MinicompressError
from minicompress.outputs import read_provenance
from minicompress.recipes.correct import correct
from minicompress.recipes.recover import recover

SEQ = 16


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text(40) + "\n")
    return path


def _config(corpus, output, **kw) -> CorrectConfig:
    base = dict(teacher=ModelConfig(source="in-memory"), data=DataConfig(source=str(corpus), seq_len=SEQ),
                tokens=4 * 64, global_batch_tokens=64, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                eval_tokens=2 * SEQ, autocast="none", compile=False, output=str(output))
    base.update(kw)
    return CorrectConfig(**base)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zero_tokens_writes_the_teacher_unchanged(tiny_model_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher_dir = tiny_model_dir("llama")
    out = tmp_path / "corrected"
    result = correct(_config(corpus, out, teacher=ModelConfig(source=str(teacher_dir)), tokens=0))
    assert result["tokens"] == 0 and result["steps"] == 0 and result["after"] == result["before"]
    original = AutoModelForCausalLM.from_pretrained(teacher_dir)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(4, 200, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)
    record = read_provenance(out)
    assert record["command"] == "correct" and record["source_model"] == str(teacher_dir)
    assert record["correction"]["tokens_trained"] == 0 and record["correction"]["steps"] == 0
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert "teacher-correction" in (out / "README.md").read_text()
    assert not (out / "metrics.jsonl").exists() and not checkpoint.working_folder(out).exists()


def test_a_few_steps_lower_the_held_out_loss_as_recover_with_cross_entropy_would(corpus, tiny_tokenizer, tmp_path):
    """Correction is recover's training with next-token CE and no teacher: the same weights;
    the caller's teacher is copied, never touched; ``before`` is the teacher's held-out
    perplexity, pinned against a float64 reference."""
    teacher = make_tiny_model("llama")
    teacher.requires_grad_(False)
    untouched = _state(teacher)
    config = _config(corpus, tmp_path / "corrected")
    result = correct(config, teacher=teacher, tokenizer=tiny_tokenizer)
    assert result["steps"] == 4 and result["tokens"] == 256
    assert result["after"]["perplexity"] < result["before"]["perplexity"] - 1
    assert all(r["kl"] == 0 for r in result["metrics"] if "loss" in r)
    assert all(torch.equal(v, untouched[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())

    eval_ids = load_training_data(config.data, tiny_tokenizer, config.eval_tokens).eval_ids
    with torch.no_grad():
        logits = teacher(eval_ids).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), eval_ids[:, 1:].reshape(-1))
    assert result["before"]["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)

    student = make_tiny_model("llama")
    recover(RecoverConfig(student=ModelConfig(source="in-memory"), teacher=None, data=config.data, tokens=256,
                          global_batch_tokens=64, micro_batch_size=2, lr=1e-2, warmup_steps=1, eval_tokens=2 * SEQ,
                          autocast="none", compile=False, loss=LossConfig(kl_weight=0.0, ce_weight=1.0),
                          output=str(tmp_path / "recovered")), student=student, tokenizer=tiny_tokenizer)
    corrected = load_file(str(tmp_path / "corrected" / "model.safetensors"))
    recovered = load_file(str(tmp_path / "recovered" / "model.safetensors"))
    assert corrected.keys() == recovered.keys() and all(torch.equal(corrected[k], recovered[k]) for k in corrected)
    record = read_provenance(tmp_path / "corrected")["correction"]
    assert record["tokens_trained"] == 256 and record["loss"] == {"kl_weight": 0.0, "ce_weight": 1.0}
    assert record["metrics_after"] == result["after"] and record["precision"]["master_weights"] == "float32"
    assert (tmp_path / "corrected" / "metrics.jsonl").is_file() and (tmp_path / "corrected" / "curves.png").is_file()


def test_kill_and_resume_equals_the_uninterrupted_run(corpus, tiny_tokenizer, tmp_path):
    common = dict(tokens=6 * 64, eval_every=2)
    teacher = make_tiny_model("llama")
    full = correct(_config(corpus, tmp_path / "full", save_every=2, **common), teacher=teacher,
                   tokenizer=tiny_tokenizer)

    class Killed(RuntimeError):
        pass

    def kill_after_3(record):
        if record["step"] == 3:
            raise Killed

    output = tmp_path / "resumed"
    with pytest.raises(Killed):
        correct(_config(corpus, output, save_every=1, checkpoint_keep=2, **common), teacher=teacher,
                tokenizer=tiny_tokenizer, callback=kill_after_3)
    assert not output.exists() and checkpoint.working_folder(output).is_dir()
    with pytest.raises(MinicompressError, match="resume"):  # a stale checkpoint is never silently dropped
        correct(_config(corpus, output, **common), teacher=teacher, tokenizer=tiny_tokenizer)
    resumed = correct(_config(corpus, output, resume=True, **common), teacher=teacher, tokenizer=tiny_tokenizer)
    assert resumed["resumed_from_step"] == 3
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in resumed["metrics"]] == list(range(7))
    assert resumed["after"] == pytest.approx(full["after"])
    assert not checkpoint.working_folder(output).exists()


@pytest.mark.parametrize("case", ["negative tokens", "unknown teacher", "output exists", "too little data",
                                  "all held out", "less than a step"])
def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(case, tiny_model_dir, corpus, tmp_path, capsys):
    teacher, data, out = str(tiny_model_dir("llama")), str(corpus), tmp_path / "corrected"
    extra, fragment = [], None
    if case == "negative tokens":
        extra, fragment = ["--tokens", "-1"], "error: --tokens (tokens): must be a number >= 0, got -1"
    elif case == "unknown teacher":
        teacher, fragment = str(tmp_path / "no-teacher"), "error: --teacher: no such file or folder"
    elif case == "output exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        fragment = f"error: --output: {out} already exists; pass --overwrite"
    elif case == "too little data":
        (tmp_path / "short.txt").write_text("the a of")
        data = str(tmp_path / "short.txt")
        fragment = "error: --data: only"
    elif case == "all held out":
        extra, fragment = ["--eval-tokens", "100000"], "error: --eval-tokens (eval_tokens): holding out"
    else:
        extra = ["--tokens", "32"]
        fragment = "error: --tokens (tokens): the budget (32) is less than one optimizer step"
    argv = ["correct", "--teacher", teacher, "--data", data, "--seq-len", str(SEQ), "--global-batch-tokens", "64",
            "--micro-batch-size", "2", "--tokens", "128", "--autocast", "none", "--output", str(out), "-q", *extra]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(fragment), lines
    if case == "output exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not checkpoint.working_folder(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_the_cli_output_loads_and_recover_takes_it_as_its_teacher(tiny_model_dir, corpus, tmp_path, capsys,
                                                                  tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "corrected"
    argv = ["correct", "--teacher", str(tiny_model_dir("llama")), "--data", str(corpus), "--seq-len", str(SEQ),
            "--global-batch-tokens", "64", "--micro-batch-size", "2", "--tokens", "128", "--lr", "1e-3",
            "--eval-tokens", "32", "--autocast", "none", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity before" in printed and "held-out perplexity after" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    record = json.loads((out / "minicompress.json").read_text())
    assert record["correction"]["tokens_trained"] == 128 and record["config"]["lr"] == 1e-3

    student = make_tiny_model("llama", seed=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    result = recover(RecoverConfig(student=ModelConfig(source="in-memory"), teacher=ModelConfig(source=str(out)),
                                   data=DataConfig(source=str(corpus), seq_len=SEQ), tokens=64,
                                   global_batch_tokens=64, micro_batch_size=2, eval_tokens=2 * SEQ, autocast="none",
                                   compile=False, output=str(tmp_path / "student")),
                     student=student, tokenizer=tiny_tokenizer)
    assert result["before"]["kl_to_teacher"] > 0
    assert read_provenance(tmp_path / "student")["recovery"]["teacher"] == str(out)

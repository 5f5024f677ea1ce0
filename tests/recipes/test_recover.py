"""The ``recover`` recipe says what it does when that differs from what was asked."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import corpus_text, make_tiny_model, make_tiny_tokenizer
from minicompress.checkpoint import working_folder
from minicompress.config import DataConfig, LossConfig, ModelConfig, RecoverConfig
from minicompress.errors import MinicompressError
from minicompress.recipes.recover import recover

SEQ = 16


def _run(tmp_path, tokenizer, **kw):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(40) + "\n")
    config = RecoverConfig(student=ModelConfig(source="in-memory"), teacher=ModelConfig(source="in-memory"),
                           data=DataConfig(source=str(corpus), seq_len=SEQ), global_batch_tokens=64,
                           micro_batch_size=2, lr=1e-2, warmup_steps=1, eval_tokens=2 * SEQ, autocast="none",
                           compile=False, output=str(tmp_path / "out"), **kw)
    torch.set_num_threads(1)
    return recover(config, student=make_tiny_model("llama", seed=1), teacher=make_tiny_model("llama"),
                   tokenizer=tokenizer)


def test_a_token_budget_that_is_not_whole_steps_is_stated(tmp_path, tiny_tokenizer, caplog):
    """``--tokens 200`` with 64-token steps trains 192: the log says so, and the report agrees."""
    with caplog.at_level(logging.INFO, logger="minicompress"):
        result = _run(tmp_path, tiny_tokenizer, tokens=200)
    assert result["tokens"] == 192 and result["steps"] == 3
    said = [r.getMessage() for r in caplog.records if "not the" in r.getMessage()]
    assert said == ["recover: training 192 tokens (3 steps of 64), not the 200 asked: tokens are whole optimizer "
                    "steps of global_batch_tokens"]


def test_whole_steps_say_nothing_about_the_budget(tmp_path, tiny_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="minicompress"):
        _run(tmp_path, tiny_tokenizer, tokens=128)
    assert not [r for r in caplog.records if "not the" in r.getMessage()]


def test_resume_with_nothing_to_resume_says_so_and_starts_fresh(tmp_path, tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="minicompress"):
        result = _run(tmp_path, tiny_tokenizer, tokens=128, resume=True)
    assert result["resumed_from_step"] is None and result["steps"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--resume, but" in w and "holds no checkpoint to resume; starting from step 0" in w for w in warned)


def _on_policy_config(tmp_path, output, **kw) -> RecoverConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(40) + "\n")
    settings = dict(student=ModelConfig(source="in-memory"), teacher=ModelConfig(source="in-memory"),
                    data=DataConfig(source=str(corpus), seq_len=SEQ), tokens=4 * 64, global_batch_tokens=64,
                    micro_batch_size=2, lr=1e-2, warmup_steps=1, eval_tokens=2 * SEQ, autocast="none", compile=False,
                    output=str(tmp_path / output), on_policy=0.5, on_policy_prompt_tokens=4,
                    loss=LossConfig(kind="jsd", beta=0.3))
    return RecoverConfig(**{**settings, **kw})


def _recover(config, callback=None):
    torch.set_num_threads(1)
    student = make_tiny_model("llama", seed=1)
    report = recover(config, student=student, teacher=make_tiny_model("llama"), tokenizer=make_tiny_tokenizer(),
                     callback=callback)
    return report, student


def test_an_on_policy_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, caplog):
    """The student's rows are seeded by (seed, step, rank, micro batch): the resumed run writes the rows
    the uninterrupted one wrote, and trains to the same weights; the record states the on-policy run."""
    full, reference = _recover(_on_policy_config(tmp_path, "full"))

    class Killed(RuntimeError):
        pass

    def kill_after_2(record):
        if record["step"] == 2:
            raise Killed

    with pytest.raises(Killed):
        _recover(_on_policy_config(tmp_path, "resumed", save_every=1), callback=kill_after_2)
    assert not (tmp_path / "resumed").exists() and working_folder(tmp_path / "resumed").is_dir()
    with caplog.at_level(logging.INFO, logger="minicompress"):
        resumed, student = _recover(_on_policy_config(tmp_path, "resumed", resume=True))
    assert resumed["resumed_from_step"] == 2
    for (name, a), b in zip(reference.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in resumed["metrics"][1:]] == [r["loss"] for r in full["metrics"][1:]]

    steps = [r for r in full["metrics"] if r["step"]]
    assert all(r["gen_seconds"] > 0 and r["train_seconds"] > 0 for r in steps)
    assert full["generation_seconds"] == pytest.approx(sum(r["gen_seconds"] for r in steps))
    record = json.loads((tmp_path / "full" / "minicompress.json").read_text())["recovery"]["on_policy"]
    assert record["on_policy"] == 0.5 and record["prompt_tokens"] == 4 and record["divergence"] == "jsd"
    assert record["beta"] == 0.3 and record["generated_rows_per_step"] == 2 and record["rows_per_step"] == 4
    assert record["generation_seconds"] == full["generation_seconds"]
    assert any(" gen " in r.getMessage() and " train " in r.getMessage() for r in caplog.records
               if r.getMessage().startswith("step 4/4"))


def test_an_on_policy_prompts_file_prompts_the_student(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the a of the and", "of the", "tr sta")))
    report, _ = _recover(_on_policy_config(tmp_path, "out", tokens=2 * 64, on_policy_prompts=str(prompts)))
    assert report["steps"] == 2 and report["generation_seconds"] > 0
    missing = _on_policy_config(tmp_path, "other", on_policy_prompts=str(tmp_path / "none.jsonl"))
    with pytest.raises(MinicompressError, match="^on_policy_prompts: no such file"):
        _recover(missing)
    assert not (tmp_path / "other").exists() and not working_folder(tmp_path / "other").exists()


def test_on_policy_under_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Decoding from an FSDP2-sharded student would all-gather every layer for every token: refused."""
    from minicompress import distributed

    monkeypatch.setattr(distributed, "init_from_env", lambda: 2)
    with pytest.raises(MinicompressError, match="^on_policy: on-policy distillation runs in one process only"):
        _recover(_on_policy_config(tmp_path, "out"))
    assert not (tmp_path / "out").exists() and not working_folder(tmp_path / "out").exists()

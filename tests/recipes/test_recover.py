"""The ``recover`` recipe says what it does when that differs from what was asked."""

from __future__ import annotations

import logging

import torch

from conftest import corpus_text, make_tiny_model
from minicompress.config import DataConfig, ModelConfig, RecoverConfig
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

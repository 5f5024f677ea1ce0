"""``minicompress eval --draft``: the student as a speculative-decoding draft, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from minicompress.cli import main
from minicompress.config import DataConfig, EvalConfig, ModelConfig
from minicompress.errors import ConfigError, MinicompressError
from minicompress.models import load_model
from minicompress.data.sources import load_token_stream
from minicompress.evaluation.draft import DraftSettings, draft_prompts, measure_draft


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def draft_args(model, draft, data, out, *extra):
    return ["eval", "--model", str(model), "--draft", str(draft), "--data", str(data), "--seq-len", "32",
            "--no-speed", "--draft-prompts", "3", "--draft-prompt-tokens", "8", "--draft-new-tokens", "6",
            "--draft-tokens", "2", "--output", str(out), "-q", *extra]


def test_eval_with_a_draft_writes_the_draft_keys(tiny_model_dir, text_corpus, tmp_path, capsys):
    teacher, student = tiny_model_dir("llama"), tiny_model_dir("llama", seed=0, num_hidden_layers=1)
    out = tmp_path / "eval.json"
    assert main(draft_args(teacher, student, text_corpus, out)) == 0
    results = json.loads(out.read_text())["results"]
    assert results["perplexity"] > 1 and results["parameters"] > results["draft_parameters"] > 0
    # the same prompts through the library give the same exact counts
    model, tokenizer = load_model(ModelConfig(source=str(teacher)))
    draft, _ = load_model(ModelConfig(source=str(student)))
    stream = load_token_stream(DataConfig(source=str(text_corpus), shuffle=False, documents="file"), tokenizer)
    prompts = draft_prompts(stream, 3, 8)
    direct = measure_draft(model, draft, prompts, new_tokens=6, settings=DraftSettings(num_assistant_tokens=2),
                           warmup=False)
    assert results["acceptance_rate"] == direct["acceptance_rate"]
    for key in ("accepted_tokens", "proposed_tokens", "teacher_forwards", "plain_teacher_forwards",
                "outputs_identical"):
        assert results[f"draft_{key}"] == direct[key], key
    assert results["draft_prompts"] == 3 and results["draft_tokens"] == 2 and results["draft_generated_tokens"] == 18
    assert results["draft_speedup"] == pytest.approx(results["draft_plain_seconds"] / results["draft_assisted_seconds"])
    assert results["draft_outputs_identical"] is True
    assert results["draft_plain_tokens_per_s"] > 0 and results["draft_assisted_tokens_per_s"] > 0
    shown = capsys.readouterr().out
    assert f"draft {student.name} for {teacher.name}" in shown
    assert "acceptance_rate" in shown and "draft_speedup" in shown


def test_the_model_as_its_own_draft_is_accepted_every_time(tiny_model_dir, text_corpus, tmp_path):
    teacher = tiny_model_dir("qwen3")
    out = tmp_path / "eval.json"
    assert main(draft_args(teacher, teacher, text_corpus, out)) == 0
    results = json.loads(out.read_text())["results"]
    assert results["acceptance_rate"] == 1.0 and results["draft_accepted_tokens"] > 0
    # 6 new tokens per prompt, 2 drafted + 1 of the teacher per forward: 3 + 3
    assert results["draft_teacher_forwards"] == 3 * 2 and results["draft_plain_teacher_forwards"] == 3 * 6


def test_draft_prompts_come_from_evenly_spaced_places_of_the_text():
    stream = torch.arange(100)
    prompts = draft_prompts(stream, 3, 4)
    assert [p.tolist() for p in prompts] == [[0, 1, 2, 3], [33, 34, 35, 36], [66, 67, 68, 69]]
    assert [p.tolist() for p in draft_prompts(stream, 2, 4, bos_token_id=2)] == [[2, 0, 1, 2], [2, 50, 51, 52]]
    assert len(draft_prompts(stream, 10, 10)) == 10  # exactly the text, no overlap
    with pytest.raises(MinicompressError, match="--draft-prompts: the text has 100 tokens, fewer than 11 prompts of "
                                                "10 tokens"):
        draft_prompts(stream, 11, 10)


def test_eval_draft_on_a_text_of_one_window_still_gets_its_prompts(tiny_model_dir, text_corpus, tmp_path):
    """--max-tokens that leaves one evaluation window refused the draft test (its prompts were
    window starts): the prompts come from the text, which holds 8 of them."""
    teacher = tiny_model_dir("llama")
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(teacher), "--draft", str(teacher), "--data", str(text_corpus), "--seq-len", "96",
            "--max-tokens", "128", "--no-speed", "--draft-prompts", "8", "--draft-prompt-tokens", "16",
            "--draft-new-tokens", "2", "--output", str(out), "-q"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["tokens"] == 95 and results["draft_prompts"] == 8  # one window of 96: 95 scored tokens
    assert results["acceptance_rate"] == 1.0


def test_config_checks_the_draft_settings():
    data = DataConfig(source="t.txt", seq_len=32)
    assert EvalConfig(data=data, draft=ModelConfig(source="s")).draft_prompt_tokens == 64  # prompts are not windows
    with pytest.raises(ConfigError, match="draft_tokens: must be a number > 0, got 0"):
        EvalConfig(data=data, draft_prompt_tokens=8, draft_tokens=0)
    with pytest.raises(ConfigError, match="draft.dtype: 'float32' differs from model.dtype 'bfloat16'"):
        EvalConfig(data=data, draft_prompt_tokens=8, model=ModelConfig(dtype="bfloat16"), draft=ModelConfig())
    assert EvalConfig(data=data, draft_prompt_tokens=8, draft=ModelConfig(source="s")).draft.source == "s"


def test_another_vocabulary_is_refused_before_any_weights_load(tiny_model_dir, text_corpus, tmp_path, capsys,
                                                               monkeypatch):
    """A draft (or teacher) of another vocabulary was refused only after both models' weights
    had loaded (20 s with real models): their config.json files decide it first."""
    import minicompress.recipes.eval as eval_recipe

    teacher, other_vocab = tiny_model_dir("llama"), tiny_model_dir("llama", vocab_size=300)
    loaded = []
    monkeypatch.setattr(eval_recipe, "load_for_flag", lambda cfg, flag="--model": loaded.append(flag))
    out = tmp_path / "o.json"
    assert main(draft_args(teacher, other_vocab, text_corpus, out)) == 2
    assert error_line(capsys) == ("error: --draft: vocabulary size 300 differs from the model's 256; a draft must "
                                  "share the model's tokenizer")
    argv = ["eval", "--model", str(teacher), "--teacher", str(other_vocab), "--data", str(text_corpus), "-q",
            "--output", str(out)]
    assert main(argv) == 2
    assert error_line(capsys) == ("error: --teacher: vocabulary size 300 differs from the model's 256; KL needs the "
                                  "same tokenizer")
    assert main(draft_args(teacher, tmp_path / "no-draft", text_corpus, out)) == 2
    assert error_line(capsys).startswith("error: --draft: no such file or folder")
    assert loaded == [] and not out.exists()


def test_draft_errors_name_the_draft_flags(tiny_model_dir, text_corpus, tmp_path, capsys):
    teacher = tiny_model_dir("llama")
    out = tmp_path / "o.json"
    other_vocab = tiny_model_dir("llama", vocab_size=300)
    assert main(draft_args(teacher, other_vocab, text_corpus, out)) == 2
    assert error_line(capsys).startswith("error: --draft: vocabulary size 300 differs from the model's 256")
    assert main(draft_args(teacher, tmp_path / "no-draft", text_corpus, out)) == 2
    assert error_line(capsys).startswith("error: --draft: no such file or folder")
    argv = ["eval", "--model", str(teacher), "--data", str(text_corpus), "--seq-len", "32", "--draft-prompts", "2",
            "-q"]
    assert main(argv) == 2
    assert error_line(capsys) == "error: --draft-prompts: needs --draft SOURCE"
    argv = ["eval", "--model", str(teacher), "--data", str(text_corpus), "--draft-dtype", "bfloat16", "-q"]
    assert main(argv) == 2
    assert error_line(capsys).startswith("error: --draft: --draft-dtype")
    assert main(draft_args(teacher, teacher, text_corpus, out, "--draft-prompts", "9999")) == 2
    assert error_line(capsys).startswith("error: --draft-prompts: the text has")
    assert main(draft_args(teacher, teacher, text_corpus, out, "--draft-prompt-tokens", "4000")) == 2
    assert error_line(capsys).startswith("error: --draft-prompts: the text has")
    assert not out.exists()

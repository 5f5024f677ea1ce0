"""The ``recover`` recipe says what it does when that differs from what was asked; several teachers."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import corpus_text, make_tiny_model, make_tiny_tokenizer
from minicompress.checkpoint import check_resumable, working_folder
from minicompress.config import (DataConfig, LossConfig, ModelConfig, RecoverConfig, SourceConfig, TeacherCacheConfig,
                                 TeacherConfig, to_dict)
from minicompress.data.rows import load_training_data
from minicompress.errors import MinicompressError
from minicompress.recipes.recover import recover
from minicompress.recipes.teacher_cache import write_teacher_cache

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


# ---------------------------------------------------------------- several teachers


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus_text(40, seed=1) + "\n")
    b.write_text(corpus_text(40, seed=2) + "\n")
    return a, b


def _teacher_config(tmp_path, teacher, teachers, **kw):
    base = dict(student=ModelConfig(source="in-memory"), teacher=ModelConfig(source=str(teacher)),
                teachers=tuple(teachers), data=DataConfig(source=str(_texts(tmp_path)[0]), seq_len=SEQ),
                tokens=3 * 64, global_batch_tokens=64, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                eval_tokens=2 * SEQ, autocast="none", compile=False, output=str(tmp_path / "out"))
    return RecoverConfig(**{**base, **kw})


def _mixture_kl(student, teachers, weights, ids):
    """Naive float64 forward KL of the student from ``sum_j weights[:, j] softmax(teacher_j)``, per target."""
    with torch.no_grad():
        q = torch.log_softmax(student(ids).logits.double(), dim=-1)[:, :-1]
        p = sum(w[:, None, None] * torch.softmax(t(ids).logits.double(), dim=-1)[:, :-1]
                for t, w in zip(teachers, weights.double().t()))
    return float((p * (p.log() - q)).sum(-1).mean())


def test_two_teachers_and_a_source_of_its_own_teacher_end_to_end(tmp_path, tiny_model_dir, tiny_tokenizer, one_thread):
    """``teacher`` A and ``teachers`` [B] at 0.7 / 0.3 over a data mixture whose second source is distilled
    from B alone: the held-out KL to the mixture before training equals the naive float64 one, training
    lowers it, and the output is a stock folder whose record names both teachers, their weights and the
    source's teacher."""
    from transformers import AutoModelForCausalLM

    a_dir = tiny_model_dir("llama", seed=0)
    b_dir = tiny_model_dir("llama", seed=2, hidden_size=24, intermediate_size=48)
    a_txt, b_txt = _texts(tmp_path)
    data = DataConfig(seq_len=SEQ, mixture=(SourceConfig(str(a_txt), 0.5), SourceConfig(str(b_txt), 0.5, str(b_dir))))
    config = _teacher_config(tmp_path, a_dir, [TeacherConfig(source=str(b_dir))], teacher_weights=(0.7, 0.3),
                             data=data, tokens=4 * 64)
    student = make_tiny_model("llama", seed=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    held_out = load_training_data(data, tiny_tokenizer, config.eval_tokens, seed=config.seed)
    weights = torch.tensor([[0.7, 0.3], [0.0, 1.0]])[held_out.eval_sources]
    teachers = [AutoModelForCausalLM.from_pretrained(d).eval() for d in (a_dir, b_dir)]
    expected = _mixture_kl(student, teachers, weights, held_out.eval_ids)
    expected_first = _mixture_kl(student, teachers[:1], torch.ones(len(weights), 1), held_out.eval_ids)

    result = recover(config, student=student, tokenizer=tiny_tokenizer)
    assert result["before"]["kl_to_teachers"] == pytest.approx(expected, rel=1e-4)
    assert result["before"]["kl_to_teacher"] == pytest.approx(expected_first, rel=1e-4)  # still the first teacher
    assert result["after"]["kl_to_teachers"] < result["before"]["kl_to_teachers"]
    out = tmp_path / "out"
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 16
    record = json.loads((out / "minicompress.json").read_text())["recovery"]
    assert record["teachers"] == [{"teacher": str(a_dir), "cache": None, "weight": pytest.approx(0.7)},
                                  {"teacher": str(b_dir), "cache": None, "weight": pytest.approx(0.3)}]
    assert record["source_teachers"] == {str(b_txt): 1}
    assert record["config"]["teachers"][0]["source"] == str(b_dir) and record["config"]["teacher_weights"] == [0.7, 0.3]
    assert "kl_to_teachers" in (out / "README.md").read_text()
    assert not working_folder(out).exists()


def test_two_identical_teachers_train_as_one(tmp_path, tiny_model_dir, tiny_tokenizer, one_thread):
    a_dir = tiny_model_dir("llama", seed=0)
    runs = []
    for name, teachers in (("one", []), ("two", [TeacherConfig(source=str(a_dir))])):
        config = _teacher_config(tmp_path, a_dir, teachers, output=str(tmp_path / name),
                                 teacher_weights=(0.4, 0.6) if teachers else ())
        runs.append(recover(config, student=make_tiny_model("llama", seed=1, hidden_size=16, num_hidden_layers=1),
                            tokenizer=tiny_tokenizer))
    one, two = runs
    assert [r["loss"] for r in two["metrics"] if "loss" in r] == pytest.approx(
        [r["loss"] for r in one["metrics"] if "loss" in r], rel=1e-4)
    assert two["after"]["kl_to_teacher"] == pytest.approx(one["after"]["kl_to_teacher"], rel=1e-4)
    assert two["after"]["kl_to_teachers"] == pytest.approx(one["after"]["kl_to_teacher"], rel=1e-4)


def _cache(tmp_path, name, teacher, tokenizer, kind="topk"):
    folder = tmp_path / name
    write_teacher_cache(TeacherCacheConfig(teacher=ModelConfig(source="in-memory"),
                                           data=DataConfig(source=str(_texts(tmp_path)[0]), seq_len=SEQ),
                                           tokens=24 * SEQ, kind=kind, top_k=16, samples=4, values_dtype="float32",
                                           output=str(folder)), teacher=teacher, tokenizer=tokenizer)
    return folder


def test_a_live_teacher_and_a_cached_one_train_on_the_caches_rows(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                   one_thread):
    a_dir = tiny_model_dir("llama", seed=0)
    cache = _cache(tmp_path, "cache-b", make_tiny_model("llama", seed=2), tiny_tokenizer)
    config = _teacher_config(tmp_path, a_dir, [TeacherConfig(cache=str(cache))], loss=LossConfig(ce_weight=0.2))
    result = recover(config, student=make_tiny_model("llama", seed=1, hidden_size=16, num_hidden_layers=1),
                     tokenizer=tiny_tokenizer)
    assert result["after"]["kl_to_teachers"] < result["before"]["kl_to_teachers"]
    assert {"kl_to_teacher", "kl_to_teachers"} <= set(result["after"])
    record = json.loads((tmp_path / "out" / "minicompress.json").read_text())["recovery"]
    assert record["teachers"][1]["cache"] == str(cache) and record["tokens_per_source"] == {str(cache): 3 * 64}


def _nothing_written(tmp_path, before):
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "out").exists() and not working_folder(tmp_path / "out").exists()


def test_teachers_of_another_tokenizer_vocabulary_or_a_sampled_cache_are_refused(tmp_path, tiny_model_dir,
                                                                               tiny_tokenizer, one_thread):
    a_dir = tiny_model_dir("llama", seed=0)
    wide = tiny_model_dir("llama", seed=2, vocab_size=300)
    other = tiny_model_dir("llama", seed=3)
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(["zzzextra"])
    tokenizer.save_pretrained(other)
    sampled = _cache(tmp_path, "sampled", make_tiny_model("llama", seed=2), tiny_tokenizer, kind="sampled")
    student = make_tiny_model("llama", seed=1, hidden_size=16, num_hidden_layers=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    n = len(tiny_tokenizer.get_vocab())
    for teachers, message in (
            ([TeacherConfig(source=str(other))], f"--teacher {other}: its tokenizer differs from the student's "
                                                 f"({n + 1} vs {n} tokens)"),
            ([TeacherConfig(source=str(wide))], f"--teacher {wide}: its vocabulary size 300 differs from the "
                                                "student's 256"),
            ([TeacherConfig(cache=str(sampled))], f"teachers[0].cache: {sampled} holds sampled tokens")):
        with pytest.raises(MinicompressError) as info:
            recover(_teacher_config(tmp_path, a_dir, teachers), student=student, tokenizer=tiny_tokenizer)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
        _nothing_written(tmp_path, before)
    # the first teacher of several is checked too, before its weights are read
    with pytest.raises(MinicompressError, match=f"^--teacher {other}: its tokenizer differs"):
        recover(_teacher_config(tmp_path, other, [TeacherConfig(source=str(a_dir))]), student=student,
                tokenizer=tiny_tokenizer)
    _nothing_written(tmp_path, before)


@pytest.mark.parametrize("weights,message", [
    ("0.7,abc", "error: --teacher-weights (teacher_weights): expected float, got 'abc'"),
    ("0.7,0", "error: --teacher-weights (teacher_weights): must be numbers > 0, got [0.7, 0.0]"),
    ("0.7,-1", "error: --teacher-weights (teacher_weights): must be numbers > 0"),
    ("1", "error: --teacher-weights (teacher_weights): 1 weight for 2 teachers; give one per teacher"),
    ("0.2,0.3,0.5", "error: --teacher-weights (teacher_weights): 3 weights for 2 teachers"),
])
def test_bad_teacher_weights_are_one_line_naming_the_flag_and_write_nothing(tmp_path, monkeypatch, capsys, weights,
                                                                            message):
    from minicompress.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("hello world\n")
    assert main(["recover", "--student", "s", "--teacher", "t1", "--teacher", "t2", "--teacher-weights", weights,
                 "--data", "a.txt", "--output", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_checkpoint_from_before_several_teachers_resumes():
    """A checkpoint's config saved before ``teachers``, ``teacher_weights`` and a source's ``teacher`` existed
    is the same run as one with none of them."""
    config = RecoverConfig(teacher=ModelConfig(source="t"), data=DataConfig(
        seq_len=SEQ, mixture=(SourceConfig("a.txt"), SourceConfig("b.txt"))), global_batch_tokens=64,
        micro_batch_size=2)
    saved = to_dict(config)
    del saved["teachers"], saved["teacher_weights"]
    for part in saved["data"]["mixture"]:
        del part["teacher"]
    check_resumable(saved, config)
    with pytest.raises(MinicompressError, match="^resume: teachers differs"):
        check_resumable(saved, RecoverConfig(**{**config.__dict__, "teachers": (TeacherConfig(source="u"),)}))
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

"""Tests for minicompress.distillation.loop: the recovery loop, checkpoints, teacher cache, outputs.

Tiny float32 models from conftest (vocab 256, hidden 32); a few optimizer steps each.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from minicompress import checkpoint
from minicompress.distillation import teacher_cache, loop as train
from minicompress.recipes import recover as recover_recipe
from minicompress.recipes import teacher_cache as teacher_cache_recipe
from minicompress.config import DataConfig, LossConfig, ModelConfig, RecoverConfig, TeacherCacheConfig
from minicompress.data.rows import as_tensor, load_sequences
from minicompress.errors import ConfigError, MinicompressError
from minicompress.hardware import cpp_compiler
from minicompress.outputs import provenance, write_provenance

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def models(make_tiny_model):
    """``(teacher, student)``: a 2-layer teacher and a narrower 1-layer student, same vocab."""
    teacher = make_tiny_model("llama", seed=0)
    student = make_tiny_model("llama", seed=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    return teacher, student


def _config(corpus, output, **kw) -> RecoverConfig:
    base = dict(
        student=ModelConfig(source="in-memory"), teacher=ModelConfig(source="in-memory"),
        data=DataConfig(source=str(corpus), seq_len=SEQ), tokens=4 * 64, global_batch_tokens=64,
        micro_batch_size=2, lr=1e-2, warmup_steps=1, eval_tokens=4 * SEQ, output=str(output),
    )
    base.update(kw)
    return RecoverConfig(**base)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_three_steps_lower_loss_and_leave_teacher_untouched(corpus, models, tiny_tokenizer, tmp_path):
    teacher, student = models
    # 1 held-out + 2 training sequences; every step trains on the same (fixed) batch of 2
    config = _config(corpus, tmp_path / "out", data=DataConfig(source=str(corpus), seq_len=SEQ, max_tokens=3 * SEQ),
                     eval_tokens=SEQ, global_batch_tokens=2 * SEQ, tokens=3 * 2 * SEQ, warmup_steps=0)
    batch = as_tensor(load_sequences(config.data, tiny_tokenizer)[1:])
    teacher_before = _state(teacher)
    with torch.no_grad():
        loss_before, _ = train.micro_batch_loss(student, batch, loss=config.loss, teacher=teacher)
    result = recover_recipe.recover(config, student=student, teacher=teacher, tokenizer=tiny_tokenizer)
    with torch.no_grad():
        loss_after, _ = train.micro_batch_loss(student, batch, loss=config.loss, teacher=teacher)
    assert result["steps"] == 3
    assert loss_after < loss_before - 0.05
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_lr_schedule_closed_form():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=4, total_steps=20)
    assert train.lr_at(0, **kw) == pytest.approx(2.5e-4)
    assert train.lr_at(3, **kw) == pytest.approx(1e-3)
    assert train.lr_at(4, **kw) == pytest.approx(1e-3)
    for step in (5, 12, 19):
        p = (step - 4) / 16
        assert train.lr_at(step, **kw) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * p)) * 9e-4)
    assert train.lr_at(12, **kw) == pytest.approx(5.5e-4)  # half way: the mean of lr and min_lr
    assert train.lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=4) == 1.0


def test_batch_indices_walk_epochs_and_partition_ranks():
    n, mbs, accum = 10, 2, 1
    first_epoch = torch.cat([train.batch_indices(n, s, 0, micro_batch_size=mbs, accum_steps=accum) for s in range(5)])
    assert first_epoch.tolist() == list(range(10))  # epoch 0 keeps load_sequences' (seeded) order
    second = torch.cat([train.batch_indices(n, s, 0, micro_batch_size=mbs, accum_steps=accum, seed=3)
                        for s in range(5, 10)])
    assert sorted(second.tolist()) == list(range(10)) and second.tolist() != list(range(10))
    ranks = [train.batch_indices(16, 0, m, micro_batch_size=2, accum_steps=2, rank=r, world_size=2)
             for m in range(2) for r in range(2)]
    assert sorted(torch.cat(ranks).tolist()) == list(range(8))  # ranks x micro steps tile the step


@pytest.mark.parametrize("loss", [LossConfig(), LossConfig(kl_weight=1.0, ce_weight=0.5, kind="jsd")])
def test_gradient_accumulation_equals_one_big_batch(models, loss):
    teacher, student = models
    ids = torch.randint(4, 200, (4, SEQ), generator=torch.Generator().manual_seed(0))

    student.zero_grad()
    big, _ = train.micro_batch_loss(student, ids, loss=loss, teacher=teacher)
    big.backward()
    grads_big = {n: p.grad.clone() for n, p in student.named_parameters()}

    student.zero_grad()
    normalizer = train.count_targets(ids)
    for half in ids.split(2):
        part, _ = train.micro_batch_loss(student, half, loss=loss, teacher=teacher, normalizer=normalizer)
        part.backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads_big[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_each_row_is_distilled_from_the_teachers_its_source_names(models, make_tiny_model, kind):
    """Rows of a source with a teacher of its own are distilled from it alone (its forward runs on those
    rows only), the other rows from the weighted mixture: the loss and its gradient equal the naive float64
    per-row targets."""
    teacher, student = models
    other = make_tiny_model("llama", seed=5, hidden_size=24, intermediate_size=48)
    teachers = train.Teachers((teacher, other), (None, None), (0.25, 0.75), by_source=(None, 1, 0))
    ids = torch.randint(4, 200, (3, SEQ), generator=torch.Generator().manual_seed(1))
    weights = teachers.row_weights(torch.tensor([0, 1, 2]))
    assert weights.tolist() == [[0.25, 0.75], [0.0, 1.0], [1.0, 0.0]]
    calls = []
    hook = other.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    loss = LossConfig(kind=kind, temperature=2.0)
    student.zero_grad()
    value, stats = train.micro_batch_loss(student, ids, loss=loss, teacher=teachers,
                                          teacher_topk=train.MixtureBatch((None, None), weights))
    value.backward()
    hook.remove()
    assert calls == [2]  # the second teacher saw the two rows that weigh it
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}

    student.zero_grad()
    tau = 2.0
    q = torch.log_softmax(student(ids).logits.double()[:, :-1] / tau, dim=-1)
    with torch.no_grad():
        p = sum(w[:, None, None] * torch.softmax(t(ids).logits.double()[:, :-1] / tau, dim=-1)
                for t, w in zip((teacher, other), weights.double().t()))
    if kind == "forward_kl":
        ref = (p * (p.log() - q)).sum(-1).mean() * tau**2
    else:  # JSD(0.5)
        m = 0.5 * p + 0.5 * q.exp()
        ref = (0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q.exp() * (q - m.log())).sum(-1)).mean() * tau**2
    ref.backward()
    assert stats["kl"] == pytest.approx(float(ref.detach()), rel=1e-5)
    for name, param in student.named_parameters():
        torch.testing.assert_close(grads[name].double(), param.grad.double(), rtol=1e-4, atol=1e-6, msg=name)


def test_kill_and_resume_reproduces_the_uninterrupted_run(corpus, make_tiny_model, tiny_tokenizer, tmp_path):
    def pair():
        return (make_tiny_model("llama", seed=0),
                make_tiny_model("llama", seed=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1))

    common = dict(tokens=6 * 64, eval_every=2, loss=LossConfig(kl_weight=1.0, ce_weight=0.3))
    teacher, student = pair()
    full = recover_recipe.recover(_config(corpus, tmp_path / "full", save_every=2, **common),
                           student=student, teacher=teacher, tokenizer=tiny_tokenizer)
    reference = _state(student)

    class Killed(RuntimeError):
        pass

    def kill_after_3(record):
        if record["step"] == 3:
            raise Killed

    teacher, student = pair()
    output = tmp_path / "resumed"
    with pytest.raises(Killed):
        recover_recipe.recover(_config(corpus, output, save_every=1, checkpoint_keep=2, **common),
                        student=student, teacher=teacher, tokenizer=tiny_tokenizer, callback=kill_after_3)
    assert not output.exists() and checkpoint.working_folder(output).is_dir()
    with pytest.raises(MinicompressError, match="resume"):  # a stale checkpoint is never silently dropped
        recover_recipe.recover(_config(corpus, output, **common), student=student, teacher=teacher, tokenizer=tiny_tokenizer)

    teacher, student = pair()  # a fresh process: models re-initialised, state comes from the checkpoint
    resumed = recover_recipe.recover(_config(corpus, output, resume=True, **common),
                              student=student, teacher=teacher, tokenizer=tiny_tokenizer)
    assert resumed["resumed_from_step"] == 3
    for key, value in student.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert [r["step"] for r in resumed["metrics"]] == list(range(7))
    assert resumed["after"] == pytest.approx(full["after"])
    assert not checkpoint.working_folder(output).exists()


def test_teacher_cache_round_trip_and_recover_from_cache(corpus, models, tiny_tokenizer, tmp_path):
    teacher, student = models
    data = DataConfig(source=str(corpus), seq_len=SEQ)
    cache_dir = tmp_path / "cache"
    summary = teacher_cache_recipe.write_teacher_cache(
        TeacherCacheConfig(teacher=ModelConfig(source="in-memory"), data=data, tokens=20 * SEQ, kind="topk", top_k=8,
                           micro_batch_size=3, shard_tokens=8 * SEQ, values_dtype="float32", output=str(cache_dir)),
        teacher=teacher, tokenizer=tiny_tokenizer)
    assert summary["rows"] == 20 and summary["shards"] == 3

    cache = teacher_cache.TeacherCache(cache_dir)
    expected_ids = as_tensor(load_sequences(data, tiny_tokenizer)[:20])
    assert torch.equal(cache.input_ids, expected_ids)
    rows = torch.tensor([0, 7, 8, 19])
    values, indices = cache.topk(rows)
    with torch.no_grad():
        ref_values, ref_indices = teacher(expected_ids[rows]).logits.topk(8, dim=-1)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, ref_indices)

    config = _config(corpus, tmp_path / "out", teacher=None, teacher_cache=str(cache_dir),
                     loss=LossConfig(kind="topk_kl"), tokens=5 * 64)
    result = recover_recipe.recover(config, student=student, tokenizer=tiny_tokenizer)
    assert result["after"]["topk_kl_to_teacher"] < result["before"]["topk_kl_to_teacher"]
    losses = [r["loss"] for r in result["metrics"] if "loss" in r]
    assert losses[-1] < losses[0]


def test_final_folder_is_a_stock_hf_model_with_recovery_record(corpus, make_tiny_model, tiny_model_dir,
                                                               tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = tiny_model_dir("llama", seed=1, hidden_size=16, num_hidden_layers=1)
    write_provenance(student_dir, provenance("prune", RecoverConfig(loss=LossConfig(kl_weight=0, ce_weight=1)),
                                             pruned={"hidden_size": 16}))
    teacher = make_tiny_model("llama", seed=0)
    output = tmp_path / "recovered"
    config = _config(corpus, output, student=ModelConfig(source=str(student_dir)), tokens=2 * 64)
    result = recover_recipe.recover(config, teacher=teacher)

    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.hidden_size == 16
    AutoTokenizer.from_pretrained(output)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "minicompress.json", "metrics.jsonl", "curves.png"):
        assert (output / name).is_file(), name
    record = json.loads((output / "minicompress.json").read_text())
    assert record["command"] == "prune" and record["pruned"] == {"hidden_size": 16}  # the student's history
    recovery = record["recovery"]
    assert recovery["command"] == "recover" and recovery["steps"] == 2 and recovery["tokens_trained"] == 128
    assert recovery["loss"]["kind"] == "forward_kl"
    assert set(recovery["metrics_before"]) >= {"perplexity", "kl_to_teacher"}
    assert recovery["metrics_after"]["perplexity"] == pytest.approx(result["after"]["perplexity"])
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert {"lr", "loss", "kl", "ce", "grad_norm", "tokens_per_s", "eval_perplexity"} <= set(lines[-1])
    assert (output / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_existing_output_without_overwrite(corpus, models, tiny_tokenizer, tmp_path):
    teacher, student = models
    output = tmp_path / "exists"
    output.mkdir()
    with pytest.raises(MinicompressError, match="--output.*overwrite"):
        recover_recipe.recover(_config(corpus, output), student=student, teacher=teacher, tokenizer=tiny_tokenizer)
    with pytest.raises(MinicompressError, match="--output"):
        teacher_cache_recipe.write_teacher_cache(TeacherCacheConfig(data=DataConfig(source=str(corpus)), output=str(output)),
                                    teacher=teacher, tokenizer=tiny_tokenizer)
    recover_recipe.recover(_config(corpus, output, tokens=64, overwrite=True), student=student, teacher=teacher,
                    tokenizer=tiny_tokenizer)
    assert (output / "config.json").is_file()


def test_ce_only_needs_no_teacher(corpus, models, tiny_tokenizer, tmp_path):
    _, student = models
    config = _config(corpus, tmp_path / "ce", teacher=None, loss=LossConfig(kl_weight=0.0, ce_weight=1.0))
    result = recover_recipe.recover(config, student=student, tokenizer=tiny_tokenizer)
    assert "kl_to_teacher" not in result["after"]
    assert result["after"]["perplexity"] < result["before"]["perplexity"]
    assert all(r["kl"] == 0.0 for r in result["metrics"] if "loss" in r)


def test_intermediate_state_loss_trains_its_projection(corpus, models, tiny_tokenizer, tmp_path):
    teacher, student = models
    config = _config(corpus, tmp_path / "is", tokens=2 * 64,
                     loss=LossConfig(kl_weight=1.0, ce_weight=0.0, intermediate_weight=1.0))
    result = recover_recipe.recover(config, student=student, teacher=teacher, tokenizer=tiny_tokenizer)
    train = [r for r in result["metrics"] if "loss" in r]
    assert all(r["is"] > 0 and r["loss"] == pytest.approx(2 * r["kl"], rel=1e-4) for r in train)


def test_config_errors_name_the_key(corpus):
    with pytest.raises(ConfigError, match="loss.kind"):
        RecoverConfig(teacher=ModelConfig(), loss=LossConfig(kind="topk_kl"))
    with pytest.raises(ConfigError, match="tokens"):
        RecoverConfig(teacher=ModelConfig(), tokens=100, global_batch_tokens=4096, micro_batch_size=8,
                      data=DataConfig(seq_len=512))
    with pytest.raises(ConfigError, match="teacher"):
        RecoverConfig()
    with pytest.raises(ConfigError, match="values_dtype"):
        TeacherCacheConfig(values_dtype="int8")


def test_sampled_teacher_cache_holds_teacher_draws_and_trains(corpus, models, tiny_tokenizer, tmp_path):
    """kind=sampled stores k draws from the teacher per position with their exact log-probs;
    recovery from it lowers the (unbiased) held-out KL estimate."""
    teacher, student = models
    data = DataConfig(source=str(corpus), seq_len=SEQ)
    cache_dir = tmp_path / "sampled"
    summary = teacher_cache_recipe.write_teacher_cache(
        TeacherCacheConfig(teacher=ModelConfig(source="in-memory"), data=data, tokens=20 * SEQ, kind="sampled",
                           samples=64, values_dtype="float32", output=str(cache_dir)),
        teacher=teacher, tokenizer=tiny_tokenizer)
    assert summary["kind"] == "sampled" and summary["top_k"] == 64
    cache = teacher_cache.TeacherCache(cache_dir)
    rows = torch.tensor([0, 3, 19])
    values, indices, kind = cache.targets(rows)
    assert kind == "sampled_kl" and values.shape == indices.shape == (3, SEQ, 64)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(cache.input_ids[rows]).logits.float(), dim=-1)
    torch.testing.assert_close(values, logp.gather(-1, indices), rtol=1e-5, atol=1e-5)
    # draws follow the teacher: the empirical mean log-prob estimates -H(p) per position
    entropy = -(logp.exp() * logp).sum(-1)
    assert abs(float(values.mean(-1).mean() + entropy.mean())) < 0.1 * float(entropy.mean())

    config = _config(corpus, tmp_path / "out", teacher=None, teacher_cache=str(cache_dir), tokens=5 * 64)
    result = recover_recipe.recover(config, student=student, tokenizer=tiny_tokenizer)
    assert result["after"]["sampled_kl_to_teacher"] < result["before"]["sampled_kl_to_teacher"]


def test_default_warmup_is_a_tenth_of_the_run_between_1_and_10():
    assert [train.default_warmup_steps(n) for n in (1, 9, 16, 50, 122, 10_000)] == [1, 1, 1, 5, 10, 10]


def test_bf16_recovery_trains_and_leaves_an_in_memory_teacher_as_it_was(corpus, models, tiny_tokenizer, tmp_path):
    """autocast bfloat16 with teacher_dtype auto: the caller's float32 teacher is not cast or
    changed, the student still learns, and the precision is recorded."""
    teacher, student = models
    before = _state(teacher)
    result = recover_recipe.recover(_config(corpus, tmp_path / "out", autocast="bfloat16"), student=student,
                             teacher=teacher, tokenizer=tiny_tokenizer)
    assert next(teacher.parameters()).dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert next(student.parameters()).dtype == torch.float32  # master weights stay float32
    assert result["after"]["kl_to_teacher"] < result["before"]["kl_to_teacher"]
    record = json.loads((tmp_path / "out" / "minicompress.json").read_text())["recovery"]["precision"]
    assert record["resolved"] == "bfloat16" and record["teacher_dtype"] == "float32"


@pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler for inductor's CPU backend")
def test_compiled_recovery_equals_eager_and_is_undone(corpus, make_tiny_model, tiny_tokenizer, tmp_path):
    """``compile=true`` (decoder layers through inductor, the loss's compiled chunk kernel) trains
    the same numbers as eager (float32: per-step losses to 1e-4, weights to 1e-4), records the
    choice, and leaves the in-memory models uncompiled; ``auto`` stays eager for a short run."""
    results = {}
    for mode in (False, True):
        teacher = make_tiny_model("llama", seed=0)
        student = make_tiny_model("llama", seed=1, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
        out = tmp_path / f"compile-{mode}"
        recover_recipe.recover(_config(corpus, out, compile=mode, tokens=3 * 64), student=student, teacher=teacher,
                        tokenizer=tiny_tokenizer)
        assert all(layer._compiled_call_impl is None for layer in [*student.model.layers, *teacher.model.layers])
        record = json.loads((out / "minicompress.json").read_text())["recovery"]["precision"]
        assert record["compile"] is mode
        assert record.get("attention") is None  # float32: the flash backward stays (attention is bf16 only)
        assert student.config._attn_implementation == "sdpa"
        results[mode] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                         _state(student))
    (eager, w_eager), (compiled, w_compiled) = results[False], results[True]
    assert [r["step"] for r in compiled] == [r["step"] for r in eager]
    for a, b in zip(compiled, eager):
        for key in ("loss", "eval_nll"):  # step 0 has no loss; only evaluation steps have eval_nll
            assert (key in a) == (key in b), (a["step"], key)
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    for name, value in w_eager.items():
        torch.testing.assert_close(w_compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(cpp_compiler() is None, reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_bf16_recovery_trains_with_the_attention_backward_and_gives_sdpa_back(corpus, make_tiny_model,
                                                                                        tiny_tokenizer, tmp_path):
    """bf16 + compile on CPU: the student trains with minicompress.distillation.attention's backward (recorded),
    its losses stay within bf16 rounding of the eager bf16 run's, and it leaves with sdpa."""
    losses = {}
    for mode in (False, True):
        teacher = make_tiny_model("llama", seed=0)
        student = make_tiny_model("llama", seed=1, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
        out = tmp_path / f"bf16-{mode}"
        recover_recipe.recover(_config(corpus, out, compile=mode, autocast="bfloat16", tokens=3 * 64),
                               student=student, teacher=teacher, tokenizer=tiny_tokenizer)
        record = json.loads((out / "minicompress.json").read_text())["recovery"]["precision"]
        assert record.get("attention") == ("minicompress_causal" if mode else None)
        assert student.config._attn_implementation == "sdpa"
        losses[mode] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_compile_auto_decides_by_run_and_hardware():
    from minicompress.hardware import COMPILE_MIN_TOKENS, resolve_compile

    assert resolve_compile("auto", "cpu", tokens=COMPILE_MIN_TOKENS - 1)[0] is False
    assert resolve_compile("auto", "cpu", tokens=COMPILE_MIN_TOKENS, world_size=2)[0] is False
    assert resolve_compile("auto", "cpu", tokens=COMPILE_MIN_TOKENS, activation_checkpointing=True)[0] is False
    assert resolve_compile(True, "cpu", tokens=1) == (True, "compile=true (forced)")
    assert resolve_compile(False, "cpu", tokens=10**9)[0] is False
    with pytest.raises(ConfigError, match="compile: must be auto, true or false"):
        RecoverConfig(teacher=ModelConfig(source="x"), compile="yes")

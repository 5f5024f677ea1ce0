"""``distill``: the one in-memory distillation that ``recover`` and the architecture search share."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from minicompress.config import DataConfig, ModelConfig, RecoverConfig, SourceConfig
from minicompress.data.rows import load_training_data
from minicompress.distillation.distill import distill, make_schedule, micro_batches
from minicompress.distillation.loop import MixtureBatch, StepRuntime, Teachers
from minicompress.recipes.recover import recover

SEQ = 16


def _config(tmp_path, corpus, **kw) -> RecoverConfig:
    return RecoverConfig(student=ModelConfig(source="in-memory"), teacher=ModelConfig(source="in-memory"),
                         data=DataConfig(source=str(corpus), seq_len=SEQ), tokens=192, global_batch_tokens=64,
                         micro_batch_size=2, lr=1e-2, warmup_steps=1, eval_tokens=2 * SEQ, autocast="none",
                         compile=False, output=str(tmp_path / "out"), **kw)


def _in_memory(config, tokenizer, **kw):
    torch.manual_seed(config.seed)
    student, teacher = make_tiny_model("llama", seed=1).train(), make_tiny_model("llama").eval().requires_grad_(False)
    data = load_training_data(config.data, tokenizer, config.eval_tokens, seed=config.seed)
    schedule = make_schedule(config, 1, data.num_train)
    result = distill(student, teacher, data, config, schedule, runtime=StepRuntime(torch.device("cpu")), **kw)
    return student, result


def test_distill_in_memory_equals_the_recover_recipe(tmp_path, corpus, tiny_tokenizer):
    """Same rows, schedule and seed: the in-memory call trains the very weights ``recover`` writes,
    and reports the same held-out metrics before and after."""
    torch.set_num_threads(1)
    config = _config(tmp_path, corpus)
    student, result = _in_memory(config, tiny_tokenizer)
    report = recover(config, student=make_tiny_model("llama", seed=1), teacher=make_tiny_model("llama"),
                     tokenizer=tiny_tokenizer)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    mine = student.state_dict()
    assert sorted(written) == sorted(k for k in mine if k in written)
    assert all(torch.equal(written[k], mine[k]) for k in written)
    assert result["before"] == report["before"] and result["after"] == report["after"]
    assert result["after"]["kl_to_teacher"] < result["before"]["kl_to_teacher"]
    assert result["start_step"] == 0 and not result["compiled"] and result["attention"] is None


def test_hooks_see_every_step_and_a_restore_skips_the_first_evaluation(tmp_path, corpus, tiny_tokenizer):
    config = _config(tmp_path, corpus, eval_every=2)
    steps = []
    _, result = _in_memory(config, tiny_tokenizer, on_step=lambda record, state: steps.append(dict(record)))
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert [sorted(k for k in r if k.startswith("eval_")) != [] for r in steps] == [True, False, True, True]
    assert steps[-1]["elapsed_s"] == result["elapsed"] > 0

    def restore(state):  # as a checkpoint would: step 2 of 3, metrics before already known
        state.start_step, state.elapsed, state.before = 2, 1.5, {"kl_to_teacher": 9.0}

    steps.clear()
    _, resumed = _in_memory(config, tiny_tokenizer, restore=restore,
                            on_step=lambda record, state: steps.append(record["step"]))
    assert steps == [3] and resumed["before"] == {"kl_to_teacher": 9.0} and resumed["elapsed"] > 1.5


def test_micro_batches_of_several_teachers_weigh_each_row_by_its_source(tmp_path, corpus, tiny_tokenizer):
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    data = load_training_data(DataConfig(seq_len=SEQ, mixture=(SourceConfig(str(corpus)), SourceConfig(str(other)))),
                              tiny_tokenizer, 2 * SEQ)
    teachers = Teachers((None, None), (None, None), (0.5, 0.5), by_source=(None, 1))
    batches = micro_batches(data, None, micro_batch_size=4, accum_steps=2, seed=0, teachers=teachers)
    plain = micro_batches(data, None, micro_batch_size=4, accum_steps=2, seed=0)
    for step in (0, 3):
        for (ids, batch), (same, none), m in zip(batches(step), plain(step), range(2)):
            assert torch.equal(ids, same) and none is None and isinstance(batch, MixtureBatch)
            positions = torch.arange(4) + (step * 2 + m) * 4
            sources = data.row_sources(positions)
            assert batch.row_weights.tolist() == [[0.5, 0.5] if s == 0 else [0.0, 1.0] for s in sources.tolist()]
    # without a source of its own teacher every row takes the global weights
    assert micro_batches(data, None, micro_batch_size=4, accum_steps=1, seed=0,
                         teachers=Teachers((None, None), (None, None), (0.5, 0.5)))(0)[0][1].row_weights is None

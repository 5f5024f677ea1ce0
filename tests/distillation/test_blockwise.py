"""Blockwise local distillation (Puzzle, arXiv 2411.19146): the block map, the loss, the
loop, and the blockwise stage of ``recover`` (outputs, resume, refusals).

Tiny float32 models from conftest; a few optimizer steps each.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_model
from minicompress import checkpoint
from minicompress.cli import main
from minicompress.config import (DataConfig, LossConfig, ModelConfig, PruneConfig, RecoverConfig, RunConfig, StageConfig,
                                 TargetConfig)
from minicompress.distillation import blockwise
from minicompress.distillation.loop import Schedule, make_optimizer
from minicompress.errors import ConfigError, MinicompressError
from minicompress.outputs import provenance, read_provenance, write_provenance
from minicompress.pruning.plan import apply_plan_, make_plan
from minicompress.pruning.scoring import score_model
from minicompress.recipes import recover as recover_recipe

SEQ = 16
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(seed=0, shape=(2, 24)):
    return torch.randint(4, 256, shape, generator=torch.Generator().manual_seed(seed))


def _pruned(model_type="llama", target=None, **overrides):
    """``(teacher, student, plan)``: a 4-layer tiny teacher and its pruned copy (default: layers 1 and 2 dropped)."""
    teacher = make_tiny_model(model_type, num_hidden_layers=4, **overrides)
    scores = score_model(teacher, [_ids(1), _ids(2)], loss_batches=[_ids(3)])
    plan = make_plan(scores, teacher.config, target or {"drop_layers": [1, 2]})
    student = apply_plan_(copy.deepcopy(teacher), plan).train()
    return teacher, student, plan


def _steps(student, teacher, bmap, n, rows=None, lr=1e-2):
    """``n`` steps of two micro batches (of ``rows``, or fresh random rows each step), no weight decay."""
    params = [p for layer in student.model.layers for p in layer.parameters()]
    records = []
    batches = (lambda step: list(rows.split(2))) if rows is not None else \
        (lambda step: [_ids(10 + step, (2, SEQ)), _ids(20 + step, (2, SEQ))])
    blockwise.train_blocks(student, teacher, bmap, batches, make_optimizer(params, lr, 0.0),
                           Schedule(lr, 0.0, 1, n, 4 * SEQ), records.append, device=CPU)
    return records


# ----------------------------------------------------------------------------------------
# The component


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_a_block_that_equals_its_parent_is_unchanged(model_type):
    """Student = teacher, identity map: every block's loss is exactly 0, so are its gradients,
    and AdamW without weight decay leaves every weight as it was (Gemma's sliding-window
    layers get their own mask: the sequence is 3x the window)."""
    teacher = make_tiny_model(model_type)
    student = copy.deepcopy(teacher).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    bmap = blockwise.block_map(student.config, teacher.config)
    assert bmap.layers == tuple(range(teacher.config.num_hidden_layers)) and bmap.channels is None
    assert blockwise.evaluate_blocks(student, teacher, bmap, _ids()) == [0.0] * len(bmap.layers)
    records = _steps(student, teacher, bmap, 3)
    assert [r["nmse_blocks"] for r in records] == [[0.0] * len(bmap.layers)] * 3
    assert all(r["grad_norm"] == 0.0 and r["stage"] == "blockwise" for r in records)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_teacher_states_are_the_residual_stream_at_the_span_boundaries():
    """Inputs are HF's ``hidden_states[layers[i]]``; the last target is the last layer's output
    before the final norm (HF's ``hidden_states[-1]`` is after it)."""
    teacher, student, plan = _pruned()
    bmap = blockwise.block_map(student.config, teacher.config, provenance={"plan": plan.to_dict()})
    assert bmap.layers == (0, 3) and bmap.spans() == [(0, 3), (3, 4)]
    ids = _ids()
    states = blockwise.teacher_states(teacher, ids, bmap, device=CPU)
    with torch.no_grad():
        out = teacher.model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(states[0], out.hidden_states[0]) and torch.equal(states[1], out.hidden_states[3])
    assert not torch.allclose(states[2], out.hidden_states[-1])
    with torch.no_grad():
        torch.testing.assert_close(teacher.model.norm(states[2]), out.last_hidden_state)


def test_normalized_mse_is_puzzles():
    y = torch.randn(2, 5, 8)
    o = y + 0.1 * torch.randn(2, 5, 8)
    assert float(blockwise.normalized_mse(o, y)) == pytest.approx(float(((o - y) ** 2).mean() / (y ** 2).mean()))
    assert float(blockwise.normalized_mse(3 * o, 3 * y)) == pytest.approx(float(blockwise.normalized_mse(o, y)))
    assert float(blockwise.normalized_mse(y, y)) == 0.0


def test_blocks_of_a_depth_pruned_student_learn_their_spans():
    """Layers 1-2 of 4 dropped: block 1 is the teacher's own layer 3 on its own input (loss 0,
    nothing to learn); block 0 replaces layers 0-2 and its loss falls (8 steps on the same rows)."""
    teacher, student, plan = _pruned()
    bmap = blockwise.block_map(student.config, teacher.config, provenance={"plan": plan.to_dict()})
    rows = _ids(99, (4, SEQ))
    first = blockwise.evaluate_blocks(student, teacher, bmap, rows)
    assert first[0] > 0.1 and first[1] == 0.0
    records = _steps(student, teacher, bmap, 8, rows=rows)
    after = blockwise.evaluate_blocks(student, teacher, bmap, rows)
    assert after[0] < 0.6 * first[0] and after[1] == 0.0
    assert records[0]["nmse_blocks"][0] == pytest.approx(first[0], rel=0.05)  # the mean of two micro batches' ratios
    assert all(a["nmse"] > b["nmse"] for a, b in zip(records, records[1:]))
    assert all(set(r) == {"stage", "step", "tokens", "lr", "nmse", "nmse_blocks", "grad_norm", "tokens_per_s",
                          "step_seconds"} for r in records)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_width_pruned_student_sees_the_kept_channels(model_type):
    """Hidden 32 -> 24: inputs and targets are the teacher's stream in the kept channels (times
    ``sqrt(24/32)`` for Gemma, whose scaled embedding shrinks the student's stream by that)."""
    teacher, student, plan = _pruned(model_type, {"hidden_size": 24, "drop_layers": [1, 2]})
    bmap = blockwise.block_map(student.config, teacher.config, provenance={"plan": plan.to_dict()})
    assert bmap.channels == plan.channels and len(bmap.channels) == 24
    assert bmap.scale == (pytest.approx((24 / 32) ** 0.5) if model_type == "gemma3_text" else 1.0)
    ids = _ids()
    states = blockwise.teacher_states(teacher, ids, bmap, device=CPU)
    with torch.no_grad():
        hidden = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states
        student_embedding = student.model.embed_tokens(ids)
    torch.testing.assert_close(states[1], hidden[3][..., list(plan.channels)] * bmap.scale)
    torch.testing.assert_close(states[0], student_embedding)  # block 0 reads what the student's layer 0 reads
    rows = _ids(99, (4, SEQ))
    first = blockwise.evaluate_blocks(student, teacher, bmap, rows)
    _steps(student, teacher, bmap, 6, rows=rows)
    after = blockwise.evaluate_blocks(student, teacher, bmap, rows)
    assert all(a < b for a, b in zip(after, first))


def test_the_block_map_composes_the_plans_of_a_run_up_to_the_teacher():
    """A stage-2 student pruned from a stage-1 student: its plan's layers index stage 1's, and
    the map to the original composes both plans; to stage 1 (``teacher: previous``) it is the last."""
    teacher = make_tiny_model("llama", num_hidden_layers=6)
    scores = score_model(teacher, [_ids(1)], loss_batches=[_ids(3)])
    plan1 = make_plan(scores, teacher.config, {"drop_layers": [1], "hidden_size": 24})
    stage1 = apply_plan_(copy.deepcopy(teacher), plan1)
    scores2 = score_model(stage1, [_ids(1)], loss_batches=[_ids(3)])
    plan2 = make_plan(scores2, stage1.config, {"drop_layers": [2, 3], "hidden_size": 16})
    stage2 = apply_plan_(copy.deepcopy(stage1), plan2)
    record = {"plan": plan2.to_dict(), "source_provenance": {"plan": plan1.to_dict(), "recovery": {},
                                                             "source_provenance": None}}
    to_original = blockwise.block_map(stage2.config, teacher.config, provenance=record)
    assert to_original.layers == tuple(plan1.layers[j] for j in plan2.layers) == (0, 2, 5)
    assert to_original.channels == tuple(plan1.channels[c] for c in plan2.channels)
    to_stage1 = blockwise.block_map(stage2.config, stage1.config, provenance=record)
    assert to_stage1.layers == plan2.layers and to_stage1.channels == plan2.channels


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(layers=(0, 1, 3)), r"blockwise_layers: 3 teacher layers given for a student of 2 layers"),
    (dict(layers=(0, 4)), r"blockwise_layers: \[0, 4\] must be strictly increasing teacher layer indices in 0\.\.3"),
    (dict(layers=(2, 1)), r"blockwise_layers: \[2, 1\] must be strictly increasing"),
    (dict(), r"blockwise_layers: no pruning plan .* maps its 2 layers to the teacher's 4; give --blockwise-layers"),
])
def test_a_layer_map_that_does_not_fit_is_refused_in_one_line(kwargs, match):
    teacher, student, _ = _pruned()
    with pytest.raises(MinicompressError, match=match) as err:
        blockwise.block_map(student.config, teacher.config, **kwargs)
    assert "\n" not in str(err.value)
    assert blockwise.block_map(student.config, teacher.config, layers=(0, 2)).spans() == [(0, 2), (2, 4)]
    narrow = make_tiny_model("llama", hidden_size=16, num_hidden_layers=2)
    with pytest.raises(MinicompressError, match=r"blockwise_layers: the student's hidden size 16 differs"):
        blockwise.block_map(narrow.config, teacher.config, layers=(0, 2))


# ----------------------------------------------------------------------------------------
# The stage of ``recover``


@pytest.fixture
def pruned_dirs(tmp_path, tiny_tokenizer):
    """``(teacher folder, student folder)``: a 4-layer tiny llama and its depth-pruned copy with
    the plan in its ``minicompress.json``, as ``minicompress prune`` writes it."""
    teacher, student, plan = _pruned()
    t_dir, s_dir = tmp_path / "teacher", tmp_path / "pruned"
    teacher.save_pretrained(t_dir)
    student.save_pretrained(s_dir)
    for folder in (t_dir, s_dir):
        tiny_tokenizer.save_pretrained(folder)
    write_provenance(s_dir, provenance("prune", PruneConfig(), plan=plan.to_dict()))
    return t_dir, s_dir


def _config(corpus, dirs, output, **kw) -> RecoverConfig:
    base = dict(student=ModelConfig(source=str(dirs[1])), teacher=ModelConfig(source=str(dirs[0])),
                data=DataConfig(source=str(corpus), seq_len=SEQ), tokens=5 * 64, blockwise_tokens=3 * 64,
                global_batch_tokens=64, micro_batch_size=2, lr=1e-2, warmup_steps=1, eval_tokens=4 * SEQ,
                autocast="none", compile=False, output=str(output))
    base.update(kw)
    return RecoverConfig(**base)


def test_recover_with_a_blockwise_stage_writes_a_stock_folder(corpus, pruned_dirs, tmp_path):
    """3 blockwise + 2 global steps: the blocks learn, the record says so, and the folder reloads
    in plain ``transformers`` to the same logits as the student in memory."""
    from transformers import AutoModelForCausalLM

    from minicompress.models import load_model

    output = tmp_path / "out"
    student, tokenizer = load_model(ModelConfig(source=str(pruned_dirs[1])), for_training=True)
    seen = []
    result = recover_recipe.recover(_config(corpus, pruned_dirs, output), student=student, tokenizer=tokenizer,
                                    callback=seen.append)
    assert [(r.get("stage"), r["step"]) for r in seen] == [("blockwise", 1), ("blockwise", 2), ("blockwise", 3),
                                                          (None, 1), (None, 2)]
    assert result["steps"] == 2 and result["tokens"] == 5 * 64
    stage = result["blockwise"]
    assert stage["steps"] == 3 and stage["tokens"] == 3 * 64 and stage["map"]["layers"] == [0, 3]
    assert stage["nmse_after"][0] < stage["nmse_before"][0] and stage["nmse_before"][1] == 0.0
    assert stage["metrics_before"] == result["before"] and stage["tokens_per_s"] > 0
    assert stage["metrics_after"]["kl_to_teacher"] < stage["metrics_before"]["kl_to_teacher"]

    record = read_provenance(output)
    assert record["command"] == "prune" and record["recovery"]["blockwise"]["nmse_after"] == stage["nmse_after"]
    assert record["recovery"]["tokens_trained"] == 5 * 64
    lines = [json.loads(x) for x in (output / recover_recipe.BLOCKWISE_METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert [r["step"] for r in result["metrics"]] == [0, 1, 2]  # metrics.jsonl: the global stage
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    student.eval()
    ids = _ids(5)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)
    assert not checkpoint.working_folder(output).exists()


def test_a_run_killed_in_either_stage_resumes_to_the_uninterrupted_weights(corpus, pruned_dirs, tmp_path):
    """Killed at blockwise step 2 (checkpoint every step): the stage resumes at step 2; killed at
    global step 1: the stage is not run again and the global stage resumes."""
    full = recover_recipe.recover(_config(corpus, pruned_dirs, tmp_path / "full"))
    reference = read_provenance(tmp_path / "full")["recovery"]

    class Killed(RuntimeError):
        pass

    def kill_at(stage, step):
        def callback(record):
            if record.get("stage") == stage and record["step"] == step:
                raise Killed
        return callback

    output = tmp_path / "killed"
    with pytest.raises(Killed):
        recover_recipe.recover(_config(corpus, pruned_dirs, output, save_every=1), callback=kill_at("blockwise", 2))
    work = checkpoint.working_folder(output)
    assert not output.exists() and checkpoint.latest_checkpoint(work / recover_recipe.BLOCKWISE_DIR) is not None
    with pytest.raises(MinicompressError, match="resume"):  # a stale stage is never silently dropped
        recover_recipe.recover(_config(corpus, pruned_dirs, output))
    with pytest.raises(Killed):
        recover_recipe.recover(_config(corpus, pruned_dirs, output, save_every=1, resume=True),
                               callback=kill_at(None, 1))
    assert (work / recover_recipe.BLOCKWISE_DONE).is_file() and checkpoint.latest_checkpoint(work) is not None
    seen = []
    resumed = recover_recipe.recover(_config(corpus, pruned_dirs, output, resume=True), callback=seen.append)
    assert [(r.get("stage"), r["step"]) for r in seen] == [(None, 2)] and resumed["resumed_from_step"] == 1
    assert resumed["blockwise"]["resumed_from_step"] == 2
    a, b = _weights(tmp_path / "full"), _weights(output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["blockwise"]["nmse_after"] == pytest.approx(reference["blockwise"]["nmse_after"])
    assert resumed["after"] == pytest.approx(full["after"])
    lines = [json.loads(x) for x in (output / recover_recipe.BLOCKWISE_METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]


def test_killed_before_the_first_global_checkpoint_resumes_from_the_stage_s_weights(corpus, pruned_dirs, tmp_path):
    recover_recipe.recover(_config(corpus, pruned_dirs, tmp_path / "full"))

    class Killed(RuntimeError):
        pass

    def kill(record):
        if record.get("stage") is None and record["step"] == 1:
            raise Killed

    output = tmp_path / "killed"
    with pytest.raises(Killed):  # no save_every: the global stage has no checkpoint yet
        recover_recipe.recover(_config(corpus, pruned_dirs, output), callback=kill)
    assert checkpoint.latest_checkpoint(checkpoint.working_folder(output)) is None
    resumed = recover_recipe.recover(_config(corpus, pruned_dirs, output, resume=True))
    assert resumed["resumed_from_step"] is None
    a, b = _weights(tmp_path / "full"), _weights(output)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_map_that_does_not_fit_the_student_writes_nothing(corpus, pruned_dirs, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(MinicompressError, match=r"^blockwise_layers: 3 teacher layers given for a student of 2"):
        recover_recipe.recover(_config(corpus, pruned_dirs, output, blockwise_layers=(0, 1, 2)))
    assert not output.exists() and not checkpoint.working_folder(output).exists()


@pytest.mark.parametrize(("argv", "match"), [
    (["--tokens", "256", "--blockwise-tokens", "512"], "--blockwise-tokens (blockwise_tokens): 512 is larger than "
                                                       "tokens (256)"),
    (["--tokens", "256", "--blockwise-tokens", "256"], "--blockwise-tokens (blockwise_tokens): 256 is larger than"),
    (["--tokens", "256", "--blockwise-tokens", "128", "--blockwise-layers", "0,1,2"],
     "blockwise_layers: 3 teacher layers given for a student of 2 layers"),
    (["--tokens", "256", "--blockwise-tokens", "128", "--blockwise-layers", "3,1"],
     "blockwise_layers): [3, 1] must be strictly increasing"),
])
def test_bad_blockwise_input_is_one_line_naming_the_flag_and_writes_nothing(argv, match, corpus, pruned_dirs,
                                                                             tmp_path, capsys):
    output = tmp_path / "out"
    status = main(["recover", "--student", str(pruned_dirs[1]), "--teacher", str(pruned_dirs[0]), "--data",
                   str(corpus), "--seq-len", str(SEQ), "--global-batch-tokens", "64", "--micro-batch-size", "2",
                   "--eval-tokens", "32", "--autocast", "none", "--output", str(output), *argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and match in errors[0], errors
    assert not output.exists() and not checkpoint.working_folder(output).exists()


def test_config_refusals_name_the_key():
    base = dict(teacher=ModelConfig(), tokens=16384, global_batch_tokens=4096)
    assert RecoverConfig(**base, blockwise_tokens=12288).blockwise_tokens == 12288
    with pytest.raises(ConfigError, match=r"^blockwise_tokens: 2048 is less than one optimizer step"):
        RecoverConfig(**base, blockwise_tokens=2048)
    with pytest.raises(ConfigError, match=r"^blockwise_tokens: the blockwise stage needs a live --teacher"):
        RecoverConfig(tokens=16384, blockwise_tokens=4096, teacher_cache="cache")
    with pytest.raises(ConfigError, match=r"^blockwise_tokens: the blockwise stage needs a live --teacher"):
        RecoverConfig(tokens=16384, blockwise_tokens=4096, loss=LossConfig(kl_weight=0.0, ce_weight=1.0))
    with pytest.raises(ConfigError, match=r"^blockwise_lr: must be a number > 0"):
        RecoverConfig(**base, blockwise_lr=0.0)


def test_a_run_passes_its_recover_section_through(tmp_path):
    """``run``'s ``recover: {blockwise_tokens: N}`` (or a stage's) reaches each stage's RecoverConfig;
    a budget larger than the stage's names the section's key."""
    stage = StageConfig(name="s", target=TargetConfig(num_hidden_layers=1), tokens=4096 * 4,
                        recover={"blockwise_lr": 3e-4})
    run = RunConfig(data=DataConfig(source="x"), recover={"blockwise_tokens": 8192}, stages=(stage,))
    config = run.stage_recover_config(0, student=ModelConfig(source="student"), teacher=run.model, output="o")
    assert config.blockwise_tokens == 8192 and config.blockwise_lr == 3e-4 and config.tokens == 16384
    with pytest.raises(ConfigError, match=r"^recover\.blockwise_tokens: 16384 is larger than tokens"):
        RunConfig(data=DataConfig(source="x"), recover={"blockwise_tokens": 16384}, stages=(stage,))


def test_the_prune_search_refuses_a_blockwise_setting_it_would_ignore():
    with pytest.raises(ConfigError, match=r"search_recover\.blockwise_tokens: the search's short distillations run no"):
        PruneConfig(target=TargetConfig(target_params=0.5), search_distill_candidates=2,
                    search_recover={"blockwise_tokens": 4096})

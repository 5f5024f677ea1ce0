"""On-policy distillation (minicompress.distillation.onpolicy): the student writes a share of each step's rows.

Tiny float32 llama models from conftest (vocab 256); rows of 16 tokens, prompts of 4.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from minicompress.config import DataConfig, LossConfig
from minicompress.data.mixture import source_epoch_index
from minicompress.data.rows import load_training_data
from minicompress.distillation import attention, onpolicy
from minicompress.distillation.distill import micro_batches
from minicompress.distillation.loop import (IGNORE_INDEX, Schedule, StepRuntime, make_optimizer, micro_batch_loss,
                                            shift_labels, train)
from minicompress.distillation.onpolicy import OnPolicy, Prompts, on_policy_batches
from minicompress.distillation.sampling import SamplingConfig

SEQ, PROMPT = 16, 4
CPU = StepRuntime(torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(corpus, tiny_tokenizer):
    return load_training_data(DataConfig(source=str(corpus), seq_len=SEQ), tiny_tokenizer, 2 * SEQ)


def _models():
    return make_tiny_model("llama", seed=1).train(), make_tiny_model("llama").eval().requires_grad_(False)


def _data_batches(data):
    return micro_batches(data, None, micro_batch_size=2, accum_steps=2, seed=0)


def _policy(share, **kw):
    return OnPolicy(share, PROMPT, **kw)


def _run(data, share: float | None, steps: int = 3):
    """``steps`` optimizer steps of 2 x 2 rows; ``share=None``: the data batches unwrapped (today's loop)."""
    student, teacher = _models()
    batches = _data_batches(data)
    if share is not None:
        batches = on_policy_batches(batches, student, _policy(share), runtime=CPU)
    optimizer = make_optimizer([p for p in student.parameters()], 1e-2, 0.0)
    schedule = Schedule(lr=1e-2, min_lr=0.0, warmup_steps=1, total_steps=steps, tokens_per_step=4 * SEQ, accum_steps=2)
    records = []
    train(student, teacher, batches, optimizer, schedule, records.append, loss=LossConfig(), runtime=CPU)
    return student, records


def _numbers(records):
    timing = ("tokens_per_s", "gen_seconds", "train_seconds", "step_seconds")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def test_lambda_zero_is_todays_step_exactly(data):
    """The wrapper at share 0 hands the data rows through: weights and records equal the plain loop's, bit for bit."""
    plain, plain_records = _run(data, None)
    wrapped, wrapped_records = _run(data, 0.0)
    assert _numbers(plain_records) == _numbers(wrapped_records)
    for (name, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(r["gen_seconds"] >= 0 and r["train_seconds"] > 0 for r in wrapped_records)


def test_rows_generated_is_round_half_up_of_the_share():
    assert [onpolicy.generated_rows(s, 8) for s in (0.0, 0.0625, 0.1, 0.25, 0.5, 0.99, 1.0)] == [0, 1, 1, 2, 4, 8, 8]
    assert onpolicy.generated_rows(0.5, 3) == 2 and onpolicy.generated_rows(1 / 6, 3) == 1


def test_lambda_one_rows_start_with_their_prompt_and_only_the_generated_tokens_are_scored(data):
    student, teacher = _models()
    step = 1
    rows = [ids for ids, _ in _data_batches(data)(step)]
    micro = on_policy_batches(_data_batches(data), student, _policy(1.0), runtime=CPU)(step)
    assert student.training
    for (ids, targets, labels), original in zip(micro, rows):
        assert targets is None and ids.shape == original.shape
        assert torch.equal(ids[:, :PROMPT], original[:, :PROMPT])  # the data rows' first P tokens
        assert not torch.equal(ids[:, PROMPT:], original[:, PROMPT:])  # the rest is the student's
        expected = shift_labels(ids)
        expected[:, :PROMPT - 1] = IGNORE_INDEX
        assert torch.equal(labels, expected)

    ids, _, labels = micro[0]
    with torch.no_grad():
        value, stats = micro_batch_loss(student, ids, loss=LossConfig(), teacher=teacher, labels=labels)
        s_logp = torch.log_softmax(student(ids).logits.double(), -1)[:, PROMPT - 1:-1]
        t_logp = torch.log_softmax(teacher(ids).logits.double(), -1)[:, PROMPT - 1:-1]
    naive = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()  # forward KL over the generated tokens only
    assert stats["targets"] == 2 * (SEQ - PROMPT)
    assert float(value) == pytest.approx(float(naive), rel=1e-5)
    with torch.no_grad():
        every, _ = micro_batch_loss(student, ids, loss=LossConfig(), teacher=teacher)
    assert float(every) != pytest.approx(float(naive), rel=1e-3)  # the prompt positions would change it


def test_greedy_continuation_equals_naive_decoding(data):
    """top_k=1 is argmax: the KV-cache sampler's rows equal full-sequence argmax decoding of the student."""
    student, _ = _models()
    policy = _policy(0.5, sampling=SamplingConfig(greedy_tokens=0, top_k=1, samples=0))
    ids, _, labels = on_policy_batches(_data_batches(data), student, policy, runtime=CPU)(0)[0]
    rows = ids[:2]  # 0.5 of 4 rows: micro batch 0 is generated, micro batch 1 is data
    naive = rows[:, :PROMPT].clone()
    with torch.no_grad():
        for _ in range(SEQ - PROMPT):
            naive = torch.cat([naive, student.eval()(naive).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(rows, naive)


def test_generations_are_a_pure_function_of_seed_and_step(data):
    student, _ = _models()

    def rows(step, seed=0):
        micro = on_policy_batches(_data_batches(data), student, _policy(0.75, seed=seed), runtime=CPU)(step)
        return torch.cat([ids for ids, _, _ in micro])

    first = rows(2)
    assert torch.equal(first, rows(2))  # the same step again: the same rows
    assert not torch.equal(first[:3], rows(2, seed=1)[:3])
    generated = onpolicy.generated_rows(0.75, 4)
    assert torch.equal(first[generated:], torch.cat([ids for ids, _ in _data_batches(data)(2)])[generated:])


def test_prompts_file_rows_in_order_each_with_its_own_length(tiny_tokenizer, data):
    prompts = onpolicy.tokenize_prompts(["the a of the and to in", "of", "", "tr sta the"], tiny_tokenizer, PROMPT,
                                        bos_token_id=2)
    assert prompts.ids.shape == (3, PROMPT) and prompts.lengths.tolist()[1] == 2  # BOS + "of"; the empty one dropped
    assert (prompts.ids[:, 0] == 2).all() and prompts.lengths.tolist()[0] == PROMPT
    policy = _policy(0.5, prompts=prompts)
    rows = [ids for ids, _ in _data_batches(data)(1)]
    plan = onpolicy.step_prompts(policy, 1, rows)
    assert plan[1] is None
    taken, lengths = plan[0]
    # step 1 with k = 2 generated rows takes stream positions 2 and 3: prompt 2 (file order), then epoch 1's first
    chosen = source_epoch_index(torch.tensor([2, 3]), 3, seed=0)
    assert chosen[0] == 2 and torch.equal(taken, prompts.ids[chosen]) and torch.equal(lengths, prompts.lengths[chosen])
    student, _ = _models()
    ids, _, labels = on_policy_batches(_data_batches(data), student, policy, runtime=CPU)(1)[0]
    for row, label, prompt, length in zip(ids, labels, taken, lengths.tolist()):
        assert torch.equal(row[:length], prompt[:length])
        assert (label[:length - 1] == IGNORE_INDEX).all() and (label[length - 1:-1] != IGNORE_INDEX).all()


def test_sampling_runs_compiled_layers_plain_and_restores_the_student(data):
    """Compiled layers decode with their plain forward, the CPU training attention gives way to the
    decode attention; both come back, and the train mode too."""
    student, _ = _models()
    layers = list(student.model.layers)

    def compiled_forward(*args, **kwargs):
        raise AssertionError("the compiled forward ran while sampling")

    for layer in layers:
        layer._compiled_call_impl = compiled_forward
    assert attention.use_training_attention_(student)
    on_policy_batches(_data_batches(data), student, _policy(1.0), runtime=CPU, compiled=layers)(0)
    assert all(layer._compiled_call_impl is compiled_forward for layer in layers)
    assert student.config._attn_implementation == attention.NAME and student.training
    attention.restore_attention_(student)
    for layer in layers:
        layer._compiled_call_impl = None


def test_no_sparse_draws_gives_the_continuation_alone(make_tiny_model):
    """``samples=0``: only ``input_ids``; greedy rows equal those of a run that keeps its draws."""
    from minicompress.distillation.sampling import sample_batch

    model = make_tiny_model("llama")
    prompts = torch.tensor([[5, 6, 7], [40, 41, 42]])
    bare = sample_batch(model, prompts, 10, generator=torch.Generator().manual_seed(0),
                        sampling=SamplingConfig(greedy_tokens=10, samples=0))
    full = sample_batch(model, prompts, 10, generator=torch.Generator().manual_seed(0),
                        sampling=SamplingConfig(greedy_tokens=10, samples=3))
    assert set(bare) == {"input_ids"} and torch.equal(bare["input_ids"], full["input_ids"])


def test_prompts_with_no_token_are_refused(tiny_tokenizer):
    with pytest.raises(Exception, match="on_policy_prompts"):
        onpolicy.tokenize_prompts(["", ""], tiny_tokenizer, PROMPT)
    assert isinstance(onpolicy.tokenize_prompts(["the"], tiny_tokenizer, PROMPT), Prompts)

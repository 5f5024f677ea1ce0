"""Tests for minicompress.evaluation.draft: exact draft-token counts against a naive speculative loop."""

from __future__ import annotations

import copy

import pytest
import torch

from minicompress.evaluation import draft as speculative
from minicompress.errors import MinicompressError
from minicompress.evaluation.draft import DraftSettings, measure_draft

from conftest import EOS_ID, make_tiny_model


def perturbed(model, scale: float, seed: int = 7):
    """A copy of ``model`` with Gaussian noise of ``scale`` times each tensor's std added:
    a draft that agrees with the teacher part of the time (tiny random models are near
    uniform, so two independent ones almost never agree)."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return draft


def prompts_of(n: int, length: int = 10) -> list[torch.Tensor]:
    return [torch.randint(4, 256, (length,), generator=torch.Generator().manual_seed(s)) for s in range(n)]


@torch.no_grad()
def next_token(model, ids: list[int]) -> torch.Tensor:
    """Full no-cache forward: probabilities of the token after ``ids``."""
    return model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)


@torch.no_grad()
def naive_greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    ids = prompt.tolist()
    out = []
    while len(out) < new_tokens:
        token = int(next_token(model, ids + out).argmax())
        out.append(token)
        if token == EOS_ID:
            break
    return out


@torch.no_grad()
def naive_speculative(teacher, draft, prompts, new_tokens: int, k: int, schedule: str = "constant",
                      threshold: float = 0.0) -> dict:
    """Speculative greedy decoding written out: each round the draft proposes up to ``k``
    tokens one full forward at a time (stopping after EOS, or after a token it gives less
    than ``threshold`` probability), the teacher scores them in one forward, the longest
    agreeing prefix is kept plus the teacher's own next token (cut after EOS)."""
    proposed = accepted = rounds = 0
    outputs = []
    for prompt in prompts:
        ids = prompt.tolist()
        limit = len(ids) + new_tokens
        while len(ids) < limit:
            budget = min(k, limit - len(ids) - 1)  # the teacher's bonus token must fit too
            candidates = []
            while len(candidates) < budget:
                probs = next_token(draft, ids + candidates)
                token = int(probs.argmax())
                candidates.append(token)
                if token == EOS_ID or probs[token] < threshold:
                    break
            choice = teacher(torch.tensor([ids + candidates])).logits[0, len(ids) - 1:].argmax(-1).tolist()
            n = 0
            while n < len(candidates) and candidates[n] == choice[n]:
                n += 1
            valid = candidates[:n] + [choice[n]]
            if EOS_ID in valid:
                valid = valid[:valid.index(EOS_ID) + 1]
            proposed += len(candidates)
            accepted += len(valid) - 1
            rounds += 1
            if schedule == "heuristic":
                k = k + 2 if n == len(candidates) else max(1, k - 1)
            ids += valid
            if valid[-1] == EOS_ID:
                break
        outputs.append(ids[len(prompt):])
    return {"proposed": proposed, "accepted": accepted, "rounds": rounds, "outputs": outputs}


def captured_outputs(monkeypatch) -> list:
    """Record the new tokens of every timed decode: ``[(assisted?, tokens)]``."""
    seen = []
    decode = speculative._decode

    def spy(teacher, prompt, config, draft=None):
        tokens, seconds = decode(teacher, prompt, config, draft)
        seen.append((draft is not None, tokens.tolist()))
        return tokens, seconds

    monkeypatch.setattr(speculative, "_decode", spy)
    return seen


def test_the_teacher_as_its_own_draft_accepts_every_token(monkeypatch):
    teacher = make_tiny_model("llama", seed=0)
    prompts = prompts_of(3)
    seen = captured_outputs(monkeypatch)
    result = measure_draft(teacher, teacher, prompts, new_tokens=23, settings=DraftSettings(num_assistant_tokens=4),
                           autocast="none", warmup=False)
    ref = naive_speculative(teacher, teacher, prompts, 23, 4)
    assert result["acceptance_rate"] == 1.0 and result["accepted_tokens"] == result["proposed_tokens"]
    assert (result["accepted_tokens"], result["teacher_forwards"]) == (ref["accepted"], ref["rounds"])
    assert result["outputs_identical"] and result["identical_prompts"] == 3
    # plain and assisted outputs are the teacher's greedy decode, written out
    greedy = [naive_greedy(teacher, p, 23) for p in prompts]
    assert [tokens for assisted, tokens in seen if not assisted] == greedy
    assert [tokens for assisted, tokens in seen if assisted] == greedy == ref["outputs"]
    n = sum(map(len, greedy))
    assert result["new_tokens"] == result["plain_teacher_forwards"] == n
    assert result["teacher_forwards"] < n / 4  # up to 5 tokens per teacher forward
    assert result["tokens_per_forward"] == pytest.approx(n / ref["rounds"])
    assert result["accepted_per_forward"] == pytest.approx(ref["accepted"] / ref["rounds"])
    assert result["speedup"] == pytest.approx(result["plain_seconds"] / result["assisted_seconds"])


@pytest.mark.parametrize("model_type,k,scale", [("llama", 1, 0.05), ("llama", 3, 0.05), ("llama", 3, 0.02),
                                                ("qwen3", 5, 0.05), ("llama", 3, None)])
def test_counts_equal_a_naive_speculative_loop(monkeypatch, model_type, k, scale):
    teacher = make_tiny_model(model_type, seed=0)
    # a noisy copy agrees part of the time; an independent random model (scale None) almost never
    draft = perturbed(teacher, scale) if scale is not None else make_tiny_model(model_type, seed=1)
    prompts = prompts_of(3)
    seen = captured_outputs(monkeypatch)
    result = measure_draft(teacher, draft, prompts, new_tokens=20, settings=DraftSettings(num_assistant_tokens=k),
                           autocast="none", warmup=False)
    ref = naive_speculative(teacher, draft, prompts, 20, k)
    assert (result["accepted_tokens"], result["proposed_tokens"], result["teacher_forwards"]) == (
        ref["accepted"], ref["proposed"], ref["rounds"])
    assert result["acceptance_rate"] == ref["accepted"] / ref["proposed"] < 1.0
    if scale is not None:
        assert result["acceptance_rate"] > 0.1
    greedy = [naive_greedy(teacher, p, 20) for p in prompts]
    assert [tokens for assisted, tokens in seen if assisted] == greedy == ref["outputs"]
    assert result["outputs_identical"]


@pytest.mark.parametrize("schedule,threshold", [("heuristic", 0.0), ("constant", 0.05)])
def test_heuristic_schedule_and_confidence_threshold_match_the_loop(monkeypatch, schedule, threshold):
    from transformers.generation import candidate_generator

    # with scikit-learn installed transformers moves the threshold after every round (an ROC fit);
    # the loop checks the fixed threshold
    monkeypatch.setattr(candidate_generator, "is_sklearn_available", lambda: False)
    teacher = make_tiny_model("llama", seed=0)
    draft = perturbed(teacher, 0.02)
    prompts = prompts_of(3)
    result = measure_draft(teacher, draft, prompts, new_tokens=20, settings=DraftSettings(
        num_assistant_tokens=2, schedule=schedule, confidence_threshold=threshold), autocast="none", warmup=False)
    ref = naive_speculative(teacher, draft, prompts, 20, 2, schedule=schedule, threshold=threshold)
    assert (result["accepted_tokens"], result["proposed_tokens"], result["teacher_forwards"]) == (
        ref["accepted"], ref["proposed"], ref["rounds"])
    assert result["outputs_identical"]
    # the settings changed what was proposed: a constant 2 per round would propose this many
    constant = naive_speculative(teacher, draft, prompts, 20, 2)
    assert ref["proposed"] != constant["proposed"]


def test_draft_generation_config_is_restored_and_warmup_is_untimed(monkeypatch):
    teacher, draft = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    own = draft.generation_config
    seen = captured_outputs(monkeypatch)
    result = measure_draft(teacher, draft, prompts_of(2), new_tokens=12,
                           settings=DraftSettings(num_assistant_tokens=2, schedule="heuristic"), autocast="none")
    assert draft.generation_config is own and own.num_assistant_tokens is None
    assert "_get_candidate_generator" not in vars(teacher)
    assert [len(tokens) for _, tokens in seen[:2]] == [8, 8]  # the warm-up: 8 tokens both ways
    assert result["prompts"] == 2 and len(seen) == 2 + 4


def test_both_decodes_run_under_the_requested_autocast():
    teacher, draft = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    states = {"teacher": set(), "draft": set()}
    for name, model in (("teacher", teacher), ("draft", draft)):
        model.register_forward_hook(lambda m, a, o, name=name: states[name].add(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    measure_draft(teacher, draft, prompts_of(1), new_tokens=6, settings=DraftSettings(num_assistant_tokens=2),
                  autocast="bfloat16", warmup=False)
    assert states == {"teacher": {(True, torch.bfloat16)}, "draft": {(True, torch.bfloat16)}}
    states = {"teacher": set(), "draft": set()}
    measure_draft(teacher, draft, prompts_of(1), new_tokens=6, settings=DraftSettings(num_assistant_tokens=2),
                  autocast="none", warmup=False)
    assert {s for s, _ in states["teacher"] | states["draft"]} == {False}


def test_a_differing_output_is_flagged_or_raised(monkeypatch, caplog):
    teacher = make_tiny_model("llama", seed=0)
    decode = speculative._decode

    def corrupt(model, prompt, config, draft=None):
        tokens, seconds = decode(model, prompt, config, draft)
        if draft is not None:
            tokens = tokens.clone()
            tokens[5] = (tokens[5] + 1) % 256
        return tokens, seconds

    monkeypatch.setattr(speculative, "_decode", corrupt)
    result = measure_draft(teacher, teacher, prompts_of(2), new_tokens=10, autocast="none", warmup=False)
    assert result["outputs_identical"] is False and result["identical_prompts"] == 0
    assert "from new token 5 on" in caplog.text
    with pytest.raises(MinicompressError, match="prompt 0 differs .* from new token 5 on"):
        measure_draft(teacher, teacher, prompts_of(2), new_tokens=10, autocast="none", warmup=False, strict=True)


def test_bad_inputs_raise_one_line_errors():
    teacher = make_tiny_model("llama", seed=0)
    other_vocab = make_tiny_model("llama", seed=1, vocab_size=300)
    with pytest.raises(MinicompressError, match="draft: vocabulary size 300 differs from the teacher's 256"):
        measure_draft(teacher, other_vocab, prompts_of(1), new_tokens=4)
    with pytest.raises(MinicompressError, match="schedule: 'dynamic' is not allowed"):
        measure_draft(teacher, teacher, prompts_of(1), new_tokens=4, settings=DraftSettings(schedule="dynamic"))
    with pytest.raises(MinicompressError, match="prompts: need at least one"):
        measure_draft(teacher, teacher, [], new_tokens=4)
    with pytest.raises(MinicompressError, match="num_assistant_tokens: must be >= 1"):
        measure_draft(teacher, teacher, prompts_of(1), new_tokens=4, settings=DraftSettings(num_assistant_tokens=0))
    with pytest.raises(MinicompressError, match=r"prompts: each must be \[L\]"):
        measure_draft(teacher, teacher, [torch.zeros(2, 3, dtype=torch.long)], new_tokens=4)

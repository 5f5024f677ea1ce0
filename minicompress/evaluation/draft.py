"""The student as a speculative-decoding draft: acceptance rate and speedup of assisted greedy decoding.

Speculative decoding (Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding", arXiv 2211.17192; Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling", arXiv 2302.01318) lets a small draft model propose ``k`` tokens that
the large model checks in one forward pass; under greedy decoding the draft's tokens are
kept up to the first one the large model would not have picked, followed by the large
model's own token at that position, so the output is the large model's greedy output.
transformers implements it as assisted generation (``model.generate(...,
assistant_model=draft)``, ``transformers/generation/utils.py`` ``_assisted_decoding`` and
``candidate_generator.py`` ``AssistedCandidateGenerator``; blog post
https://huggingface.co/blog/assisted-generation).

:func:`measure_draft` runs, prompt by prompt (assisted generation needs batch size 1), the
teacher's own greedy decode and the assisted greedy decode, and reports how often the
teacher accepts the draft's tokens and what that is worth in wall time. Draft tokens are
counted exactly by wrapping the candidate generator's ``update_candidate_strategy(input_ids,
scores, num_matches)``, which transformers calls once per teacher forward with
``scores [1, proposed + 1, V]`` (the teacher's logits at the proposed positions and the one
after) and ``num_matches`` accepted draft tokens.

How many tokens the draft proposes per round (:class:`DraftSettings`) is set on the draft's
generation config (transformers reads it from ``assistant_model.generation_config``):

* ``schedule="constant"``: exactly ``num_assistant_tokens`` per round (fewer only near
  the end of the budget or after the draft emits EOS);
* ``schedule="heuristic"``: start at ``num_assistant_tokens``, +2 after a round where all
  were accepted, -1 otherwise (carried across prompts; transformers' default before 4.45);
* ``confidence_threshold > 0``: the draft also stops a round after its first token whose
  probability is below the threshold (transformers 5's default is 20 tokens, constant,
  threshold 0.4; 0 switches it off). Where scikit-learn is installed, transformers moves
  the threshold after every round to the best point of an ROC curve of the draft's
  probabilities against acceptance, so the proposals then depend on that package.

What a draft is worth: if the teacher accepts each draft token with probability ``a`` and
a draft forward costs ``c`` teacher forwards, a round of ``k`` drafts yields
``(1 - a**(k+1)) / (1 - a)`` tokens for ``k * c + v`` teacher forwards, where ``v``, the
cost of verifying ``k + 1`` tokens at once, is about 1 on a CPU at batch 1 for ``k <= 4``
(measured on SmolLM2-135M: 0.92-0.99). With ``k = 1`` the speedup is ``(1 + a) / (1 + c)``:
a draft pays off only when it agrees with the teacher more often than its relative cost.
A 50% pruned SmolLM2 student costs ``c`` of about 0.55, so ``k = 1`` is the best constant
unless ``a`` exceeds about 0.8 (the measured choice of :data:`DEFAULT_DRAFT_TOKENS`).

Nothing here loads or writes anything: :func:`draft_prompts` takes a token stream that the
``eval`` recipe (:mod:`minicompress.recipes.eval`) read.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..config import DRAFT_TOKENS
from ..errors import MinicompressError
from ..measure import synchronize
from ..runtime import autocast_context, model_device

log = logging.getLogger(__name__)

#: Proposal schedules of transformers' assisted generation (``num_assistant_tokens_schedule``).
SCHEDULES = ("constant", "heuristic", "heuristic_transient")
#: Draft tokens per round by default (``EvalConfig.draft_tokens``): the fastest setting measured with
#: the pruned SmolLM2 student drafting for SmolLM2-135M (``benchmarks/draft.py --ablations``:
#: constant 1 > 2 > heuristic > 3, 4 > transformers' default of 20 with a confidence threshold).
DEFAULT_DRAFT_TOKENS = DRAFT_TOKENS


@dataclass(frozen=True)
class DraftSettings:
    """How many tokens the draft proposes per round: transformers' assisted-generation
    settings (``num_assistant_tokens``, ``num_assistant_tokens_schedule``,
    ``assistant_confidence_threshold`` of ``GenerationConfig``), set on the draft's
    generation config for the decodes of :func:`measure_draft`.

    Attributes:
        num_assistant_tokens: draft tokens per round (the start value for a heuristic schedule).
        schedule: ``constant``, ``heuristic`` or ``heuristic_transient`` (see the module docstring).
        confidence_threshold: end a round after a draft token whose probability is below
            this (0: off).

    Raises:
        MinicompressError: ``num_assistant_tokens < 1``, an unknown schedule or a threshold
            outside ``[0, 1)``.
    """

    num_assistant_tokens: int = DEFAULT_DRAFT_TOKENS
    schedule: str = "constant"
    confidence_threshold: float = 0.0

    def __post_init__(self):
        if self.num_assistant_tokens < 1:
            raise MinicompressError(f"num_assistant_tokens: must be >= 1, got {self.num_assistant_tokens}")
        if self.schedule not in SCHEDULES:
            raise MinicompressError(f"schedule: {self.schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise MinicompressError(f"confidence_threshold: must be in [0, 1), got {self.confidence_threshold}")


class _RoundCounter:
    """Counts proposed and accepted draft tokens of every verification round of one ``generate``."""

    def __init__(self):
        self.rounds = 0
        self.proposed = 0
        self.accepted = 0
        self.per_round: list[tuple[int, int]] = []

    def wrap(self, generator) -> None:
        """Wrap ``generator.update_candidate_strategy`` (called once per teacher forward)."""
        update = generator.update_candidate_strategy

        def counted(input_ids: torch.Tensor, scores: torch.Tensor, num_matches) -> None:
            proposed, accepted = scores.shape[1] - 1, int(num_matches)
            self.rounds += 1
            self.proposed += proposed
            self.accepted += accepted
            self.per_round.append((proposed, accepted))
            return update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = counted


@contextlib.contextmanager
def _counting_rounds(teacher: torch.nn.Module, counter: _RoundCounter):
    """Make ``teacher``'s next assisted ``generate`` report its rounds to ``counter``."""
    make = teacher._get_candidate_generator

    def make_counted(*args, **kwargs):
        generator = make(*args, **kwargs)
        counter.wrap(generator)
        return generator

    teacher._get_candidate_generator = make_counted  # an instance attribute shadows the method
    try:
        yield counter
    finally:
        del teacher._get_candidate_generator


@contextlib.contextmanager
def _draft_settings(draft: torch.nn.Module, generation_config, settings: DraftSettings):
    """Give ``draft`` a fresh generation config with the proposal settings; restore its own after."""
    own = draft.generation_config
    config = copy.deepcopy(generation_config)
    config.num_assistant_tokens = settings.num_assistant_tokens
    config.num_assistant_tokens_schedule = settings.schedule
    config.assistant_confidence_threshold = settings.confidence_threshold
    draft.generation_config = config
    try:
        yield
    finally:
        draft.generation_config = own


def greedy_config(model: torch.nn.Module, new_tokens: int):
    """A plain greedy ``GenerationConfig`` of ``new_tokens`` with ``model``'s special tokens
    (nothing else of the model's own generation config: no sampling, no penalties)."""
    from transformers import GenerationConfig

    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else model.config.eos_token_id
    pad = own.pad_token_id if own.pad_token_id is not None else model.config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=eos,
                            pad_token_id=pad, bos_token_id=own.bos_token_id)


def _decode(teacher, prompt: torch.Tensor, config, draft=None) -> tuple[torch.Tensor, float]:
    """One greedy ``generate`` of ``prompt [1, L]``: the new tokens ``[N]`` and the wall time."""
    device = model_device(teacher)
    synchronize(device)
    start = time.perf_counter()
    out = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                           assistant_model=draft)
    synchronize(device)
    return out[0, prompt.shape[1]:].cpu(), time.perf_counter() - start


@torch.no_grad()
def measure_draft(teacher: torch.nn.Module, draft: torch.nn.Module, prompts: Sequence[torch.Tensor], *,
                  new_tokens: int, settings: DraftSettings = DraftSettings(), autocast: str = "auto",
                  warmup: bool = True, strict: bool = False,
                  on_prompt: Callable[[int], None] | None = None) -> dict:
    """Acceptance rate and speedup of ``draft`` drafting for ``teacher`` under greedy decoding.

    For every prompt (batch size 1, as assisted generation requires) the teacher's plain
    greedy decode and the assisted one run back to back, both under the same precision
    (:func:`~minicompress.runtime.autocast_context`); their new tokens are compared.

    Args:
        teacher: the model whose greedy output is produced (a ``*ForCausalLM``).
        draft: the draft with the teacher's vocabulary, on the same device.
        prompts: token ids, each ``[L]`` or ``[1, L]``.
        new_tokens: tokens generated per prompt (fewer if the teacher emits EOS).
        settings: draft tokens per round, their schedule and the confidence threshold
            (:class:`DraftSettings`).
        autocast: ``auto``, ``none`` or ``bfloat16``.
        warmup: first decode a few tokens of the first prompt both ways, untimed.
        strict: raise when an assisted output differs from the plain greedy one (default:
            report it in ``outputs_identical`` and log a warning; bf16 rounding can differ
            between a one-token and a ``k+1``-token forward and flip a near tie).
        on_prompt: called with the number of prompts done after each one (progress).

    Returns:
        ``acceptance_rate`` (accepted / proposed draft tokens), ``accepted_tokens``,
        ``proposed_tokens``, ``teacher_forwards`` (assisted: one per round),
        ``plain_teacher_forwards`` (one per generated token), ``accepted_per_forward``
        (accepted draft tokens per teacher forward), ``tokens_per_forward`` (new tokens per
        teacher forward, the bonus token included), ``plain_seconds``,
        ``assisted_seconds``, ``speedup`` (plain / assisted time), ``plain_tokens_per_s``,
        ``assisted_tokens_per_s``, ``new_tokens`` (generated by the assisted decodes),
        ``prompts``, ``identical_prompts``, ``outputs_identical``, ``num_assistant_tokens``,
        ``schedule``, ``confidence_threshold``.

    Raises:
        MinicompressError: no prompts, ``new_tokens < 1``, different vocabularies or devices, or
            (``strict``) an assisted output that differs from plain greedy.
    """
    if not prompts:
        raise MinicompressError("prompts: need at least one prompt")
    if new_tokens < 1:
        raise MinicompressError(f"new_tokens: must be >= 1, got {new_tokens}")
    t_vocab, d_vocab = teacher.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    if t_vocab != d_vocab:
        raise MinicompressError(f"draft: vocabulary size {d_vocab} differs from the teacher's {t_vocab}; "
                                "a draft must share the teacher's tokenizer")
    device = model_device(teacher)
    if model_device(draft) != device:
        raise MinicompressError(f"draft: on {model_device(draft)}, the teacher on {device}; put both on one device")
    batch = [(p if p.dim() == 2 else p[None]).to(device) for p in prompts]
    if any(p.shape[0] != 1 or p.shape[1] < 1 for p in batch):
        raise MinicompressError("prompts: each must be [L] or [1, L] token ids with L >= 1")

    config = greedy_config(teacher, new_tokens)
    counter = _RoundCounter()
    plain_s = assisted_s = 0.0
    plain_n = assisted_n = identical = 0
    with autocast_context(device, autocast), _draft_settings(draft, config, settings):
        if warmup:
            short = greedy_config(teacher, min(new_tokens, 8))
            _decode(teacher, batch[0], short)
            _decode(teacher, batch[0], short, draft)
        for i, prompt in enumerate(batch):
            plain, seconds = _decode(teacher, prompt, config)
            plain_s += seconds
            plain_n += plain.numel()
            before = counter.accepted + counter.rounds
            with _counting_rounds(teacher, counter):
                assisted, seconds = _decode(teacher, prompt, config, draft)
            assisted_s += seconds
            assisted_n += assisted.numel()
            # every round adds its accepted draft tokens and one token of the teacher's own
            if counter.accepted + counter.rounds - before != assisted.numel():
                raise MinicompressError(f"draft: counted {counter.accepted + counter.rounds - before} tokens of "
                                        f"prompt {i} from the rounds, generated {assisted.numel()}")
            if plain.numel() == assisted.numel() and torch.equal(plain, assisted):
                identical += 1
            else:
                diff = (plain[:assisted.numel()] != assisted[:plain.numel()]).nonzero()
                where = int(diff[0]) if diff.numel() else min(plain.numel(), assisted.numel())
                message = (f"draft: the assisted decode of prompt {i} differs from the teacher's greedy decode "
                           f"from new token {where} on")
                if strict:
                    raise MinicompressError(message)
                log.warning("%s (rounding of the verification forward can flip a near tie)", message)
            if on_prompt is not None:
                on_prompt(i + 1)
    return {
        "acceptance_rate": counter.accepted / counter.proposed if counter.proposed else 0.0,
        "accepted_tokens": counter.accepted,
        "proposed_tokens": counter.proposed,
        "teacher_forwards": counter.rounds,
        "plain_teacher_forwards": plain_n,
        "accepted_per_forward": counter.accepted / counter.rounds,
        "tokens_per_forward": assisted_n / counter.rounds,
        "plain_seconds": plain_s,
        "assisted_seconds": assisted_s,
        "speedup": plain_s / assisted_s,
        "plain_tokens_per_s": plain_n / plain_s,
        "assisted_tokens_per_s": assisted_n / assisted_s,
        "new_tokens": assisted_n,
        "prompts": len(batch),
        "identical_prompts": identical,
        "outputs_identical": identical == len(batch),
        "num_assistant_tokens": settings.num_assistant_tokens,
        "schedule": settings.schedule,
        "confidence_threshold": settings.confidence_threshold,
    }


def draft_prompts(stream, count: int, prompt_tokens: int, bos_token_id: int | None = None,
                  flag: str = "--draft-prompts") -> list:
    """``count`` prompts of ``prompt_tokens`` tokens from evenly spaced places of a text (the draft test's prompts).

    The prompts come from the text itself, not from the perplexity windows: a text of one
    or two windows still gives every prompt the test asks for.

    Args:
        stream: the text's ``[T]`` token stream (:func:`~minicompress.data.sources.load_token_stream`).
        count: number of prompts.
        prompt_tokens: tokens per prompt (BOS included when ``bos_token_id`` is given).
        bos_token_id: put first in every prompt (tokenizers that add one), as in the windows.
        flag: named in the error.

    Returns:
        ``count`` token tensors ``[prompt_tokens]``: prompt ``i`` starts at token ``i * T // count``,
        so they never overlap and keep the text's order.

    Raises:
        MinicompressError: the text has fewer than ``count * prompt_tokens`` tokens.
    """
    body = prompt_tokens - (1 if bos_token_id is not None else 0)
    total = stream.numel()
    if total < count * max(body, 1):
        raise MinicompressError(f"{flag}: the text has {total:,} tokens, fewer than {count} prompts of "
                                f"{body} tokens; ask for fewer or shorter prompts (--draft-prompt-tokens) or "
                                "give a longer text")
    prompts = []
    for i in range(count):
        begin = i * total // count
        prompt = stream[begin:begin + body]
        if bos_token_id is not None:
            prompt = torch.cat([torch.tensor([bos_token_id], dtype=stream.dtype), prompt])
        prompts.append(prompt.clone())
    return prompts


#: ``measure_draft`` keys renamed in eval's results (the others get a ``draft_`` prefix).
_DRAFT_KEYS = {"acceptance_rate": "acceptance_rate", "prompts": "draft_prompts", "new_tokens": "draft_generated_tokens",
               "num_assistant_tokens": "draft_tokens"}


def check_draft(model, tokenizer, draft, draft_tokenizer, flag: str = "--draft") -> None:
    """Refuse a draft whose vocabulary differs from the model's (size, or the tokenizers' vocabularies).

    Raises:
        MinicompressError: naming ``flag``.
    """
    size, draft_size = model.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size
    if size != draft_size:
        raise MinicompressError(f"{flag}: vocabulary size {draft_size} differs from the model's {size}; "
                                "a draft must share the model's tokenizer")
    if tokenizer is not None and draft_tokenizer is not None and tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise MinicompressError(f"{flag}: its tokenizer's vocabulary differs from the model's; a draft must share "
                                "the model's tokenizer")


def evaluate_draft(model, draft, prompts: list, *, new_tokens: int, draft_tokens: int, autocast: str = "auto") -> dict:
    """:func:`minicompress.evaluation.draft.measure_draft` of ``draft`` for ``model``, as eval's flat keys.

    Returns:
        ``acceptance_rate``, ``draft_speedup``, ``draft_plain_tokens_per_s``,
        ``draft_assisted_tokens_per_s``, ``draft_outputs_identical`` ... (``measure_draft``'s
        keys prefixed with ``draft_``; ``prompts``, ``new_tokens`` and ``num_assistant_tokens``
        become ``draft_prompts``, ``draft_generated_tokens`` and ``draft_tokens``) and
        ``draft_parameters``.
    """
    from ..progress import progress_bar
    from .perplexity import parameter_summary

    log.info("draft test: %d prompts of %d tokens, %d new tokens each, draft tokens per teacher forward: %d",
             len(prompts), prompts[0].numel(), new_tokens, draft_tokens)
    with progress_bar("draft", len(prompts), unit="prompt") as bar:
        result = measure_draft(model, draft, prompts, new_tokens=new_tokens,
                               settings=DraftSettings(num_assistant_tokens=draft_tokens), autocast=autocast,
                               on_prompt=lambda done: bar.advance(1))
    out = {_DRAFT_KEYS.get(key, f"draft_{key}"): value for key, value in result.items()}
    out["draft_parameters"] = parameter_summary(draft)["total"]
    return out

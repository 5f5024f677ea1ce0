"""Frozen, validated configuration for every minicompress command.

Every command is driven by one frozen dataclass built from (in increasing priority) its
defaults, an optional YAML file, and ``key.sub=value`` overrides. Each dataclass checks
its own fields once in ``__post_init__``; :func:`build_config` adds the dotted path of the
offending key to the one-line :class:`~minicompress.errors.ConfigError`. The resolved
config is written next to every output (see :mod:`minicompress.outputs`).

Knobs use Hugging Face vocabulary (``hidden_size``, ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``).

A knob lives here only: its field, its line in the class's ``Attributes:`` docstring and,
for a fixed set of values, :func:`choice`. The command line generates its flag from them
(``--seq-len`` for ``data.seq_len``, the docstring line as its help; :mod:`minicompress.flags`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")
AUTOCAST = ("auto", "none", "bfloat16")
DOCUMENT_MODES = ("split", "file")
AGGREGATIONS = ("mean", "l2", "var")
LAYER_METRICS = ("bi", "loss", "contiguous")
#: Logit divergences of ``loss.kind`` (the one list: :mod:`minicompress.distillation.losses` imports it).
LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "topk_kl", "sampled_kl")
#: Kinds whose teacher is a sparse target per token, read from a teacher cache.
SPARSE_LOSS_KINDS = ("topk_kl", "sampled_kl")
STAGE_TEACHERS = ("original", "previous")
#: ``quantize --scheme`` values (the one list: :mod:`minicompress.quantize` imports it).
QUANTIZE_SCHEMES = ("int8-weight-only", "int4-weight-only")
#: Draft tokens per teacher forward of eval's draft test (:mod:`minicompress.evaluation.draft` imports it):
#: 1 was the fastest constant with the pruned SmolLM2-135M student (``benchmarks/draft.py``).
DRAFT_TOKENS = 1
#: RecoverConfig keys a run sets for each stage (not allowed in ``recover:`` sections).
RUN_SETS_RECOVER_KEYS = ("student", "teacher", "teacher_cache", "data", "tokens", "output", "overwrite", "resume")
#: keys of a run's ``search:`` section (and a stage's): PruneConfig's ``search_batches``,
#: ``search_distill_candidates``, ``search_distill_tokens``, ``search_recover``, and ``target.width_multiple``.
RUN_SEARCH_KEYS = ("batches", "distill_candidates", "distill_tokens", "recover", "width_multiple")
#: GenerateConfig keys a run sets for its ``generate:`` section (the rest are the section's keys)
RUN_SETS_GENERATE_KEYS = ("teacher", "data", "output", "overwrite", "resume")
#: CorrectConfig keys a run sets for its ``correct:`` section (the rest are the section's keys)
RUN_SETS_CORRECT_KEYS = ("teacher", "data", "output", "overwrite", "resume")
#: RecoverConfig keys the prune's search sets for its short distillations (not allowed in ``search_recover``):
#: the teacher is the original in memory, which must keep its dtype and device.
PRUNE_SETS_SEARCH_RECOVER_KEYS = RUN_SETS_RECOVER_KEYS + ("eval_every", "teacher_dtype", "teacher_device")
#: ``prune --repair`` names, in the order they run (the one list: :mod:`minicompress.pruning.repair` imports it).
REPAIRS = ("none", "refit", "refit_o", "flap", "replaceme")
#: ``prune --repair auto`` (the default): what it runs where it can (:attr:`PruneConfig.repairs`).
REPAIR_AUTO = ("refit",)
#: ``prune --repair-ridge``: the centre of a refit's ridge penalty, zero or the pruned weight.
REPAIR_RIDGES = ("zero", "pruned")
#: ``prune --repair-damping-scale``: a refit's ridge relative to the mean input energy, or to each input's own.
REPAIR_DAMPING_SCALES = ("mean", "diagonal")


def choice(default: Any, choices: tuple) -> Any:
    """A dataclass field whose values are ``choices`` (``metadata["choices"]``): the CLI
    offers them (:mod:`minicompress.flags`); ``__post_init__`` still checks the value."""
    return field(default=default, metadata={"choices": tuple(choices)})


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check_positive(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}: must be a number {bound}, got {value!r}")


def check_sampling(top_k: int, top_p: float, temperature: float, *, prefix: str = "",
                   error: type[Exception] = ConfigError) -> None:
    """The continuation's sampling knobs, Hugging Face ``GenerationConfig``'s names: ``top_k >= 0``
    (0: all), ``top_p`` in ``(0, 1]`` (1: all), ``temperature > 0``. One check for ``generate``,
    ``recover --on-policy`` (keys ``on_policy_*``, ``prefix="on_policy_"``) and
    :class:`~minicompress.distillation.sampling.SamplingConfig` (``error=ValueError``)."""
    if top_k is None or top_k < 0:
        raise error(f"{prefix}top_k: must be a number >= 0 (0: all tokens), got {top_k!r}")
    if top_p is None or not 0 < top_p <= 1:
        raise error(f"{prefix}top_p: must be in (0, 1], got {top_p!r}")
    if temperature is None or not temperature > 0:
        raise error(f"{prefix}temperature: must be a number > 0, got {temperature!r}")


def _check_tasks(name: str, tasks: tuple, include_path: str | None, num_fewshot: int | None, limit: int | None,
                 keys: tuple[str, str, str]) -> None:
    """lm-eval task settings: non-empty names; the other three only with tasks (named by ``keys``)."""
    if any(not str(t).strip() for t in tasks):
        raise ConfigError(f"{name}: task names must be non-empty, got {list(tasks)}")
    if not tasks:
        for key, value in zip(keys, (include_path, num_fewshot, limit)):
            if value is not None:
                raise ConfigError(f"{key}: applies to lm-eval tasks; give {name} too")
    _check_positive(keys[1], num_fewshot, allow_none=True, allow_zero=True)
    _check_positive(keys[2], limit, allow_none=True)


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from and how it is materialised.

    Attributes:
        source: a Hugging Face folder, a ``.gguf`` file, a Hub id, or a built-in name
            (``smollm2-135m``, ``gemma3-270m``).
        dtype: weight dtype after loading (``float32``, ``bfloat16``, ``float16``).
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available).
        trust_remote_code: allow custom code from the model's repository (transformers'
            ``trust_remote_code``); off unless the user asks.
    """

    source: str = "smollm2-135m"
    dtype: str = choice("float32", DTYPES)
    device: str = choice("cpu", DEVICES)
    trust_remote_code: bool = False

    def __post_init__(self):
        if not self.source or not str(self.source).strip():
            raise ConfigError("source: must name a model folder, .gguf file, Hub id or built-in name")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("device", self.device, DEVICES)


def _source_key(source: str) -> str:
    """What makes two text sources the same: a local path's resolved location (``a.txt`` and
    ``./a.txt``), else the text itself (a Hub dataset)."""
    path = Path(str(source).strip()).expanduser()
    return str(path.resolve()) if path.exists() else os.path.normpath(str(path))


@dataclass(frozen=True)
class SourceConfig:
    """One source of a data mixture and its sampling weight.

    Attributes:
        source: a text source as :attr:`DataConfig.source` (file, folder, Hub dataset).
        weight: its share of the training sequences (> 0; weights are normalised).
        teacher: ``recover`` only: the one teacher this source's rows are distilled from, by
            index (0: ``teacher`` / ``teacher_cache``, 1 on: ``teachers``) or by its source or
            cache as written there; None (default): the weighted mixture of all teachers.
    """

    source: str = ""
    weight: float = 1.0
    teacher: str | None = None

    def __post_init__(self):
        if not self.source or not str(self.source).strip():
            raise ConfigError("source: must name a file, folder or Hub dataset")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"weight: must be a number > 0, got {self.weight!r}")
        if self.teacher is not None and not str(self.teacher).strip():
            raise ConfigError("teacher: must name a teacher: its index or its source")

    @classmethod
    def parse(cls, text: str) -> "SourceConfig":
        """``PATH=WEIGHT`` (or ``PATH``, weight 1), the ``--data-mix`` form."""
        path, sep, weight = str(text).strip().rpartition("=")
        return cls(source=path, weight=float(weight)) if sep else cls(source=weight)


@dataclass(frozen=True)
class DataConfig:
    """A text source, tokenised, EOS-joined and packed into fixed-length sequences.

    Attributes:
        source: ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder of them,
            or a Hub dataset ``name[:config][@split]``.
        text_field: the field holding the text in json/jsonl/parquet/Hub rows.
        seq_len: tokens per packed sequence.
        max_tokens: cap on the number of tokens read (None: all).
        seed: seed of the deterministic shuffle of sequences.
        shuffle: shuffle packed sequences (evaluation keeps file order).
        documents: ``split`` treats blank-line separated blocks of a ``.txt`` file as
            documents (EOS between them); ``file`` keeps each file as one document, the
            standard protocol for WikiText perplexity.
        mixture: several sources drawn by weight instead of ``source`` (YAML: ``data:`` as
            a list of ``{source, weight}``; flag: ``--data-mix PATH=W,PATH=W``). Each
            optimizer step draws its sequences by weight, deterministically
            (:mod:`minicompress.data.mixture`).
        token_store: tokenise a source once into a memory-mapped token store under
            ``$MINICOMPRESS_TOKEN_CACHE`` (default ``~/.cache/minicompress/tokens``) and
            reuse it in every later run and on every rank (:mod:`minicompress.data.token_store`);
            false: tokenise in memory every time.
    """

    source: str | None = None
    text_field: str = "text"
    seq_len: int = 1024
    max_tokens: int | None = None
    seed: int = 0
    shuffle: bool = True
    documents: str = choice("split", DOCUMENT_MODES)
    mixture: tuple[SourceConfig, ...] = ()
    token_store: bool = True

    def __post_init__(self):
        if self.mixture and self.source is not None:
            raise ConfigError("mixture: give either source or a mixture of sources, not both")
        seen: dict[str, int] = {}
        for i, part in enumerate(self.mixture):
            key = _source_key(part.source)
            if key in seen:
                raise ConfigError(f"mixture: {part.source} is given twice (sources {seen[key] + 1} and {i + 1}); "
                                  "give each source once, with its whole weight")
            seen[key] = i
        _check_positive("seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be at least 2, got {self.seq_len}")
        _check_positive("max_tokens", self.max_tokens, allow_none=True)
        _check_choice("documents", self.documents, DOCUMENT_MODES)
        if not self.text_field:
            raise ConfigError("text_field: must be a non-empty field name")

    def sources(self) -> list[tuple[str, float]]:
        """``[(source, weight), ...]``: the mixture, or ``[(source, 1.0)]`` (empty without a source)."""
        if self.mixture:
            return [(m.source, float(m.weight)) for m in self.mixture]
        return [] if self.source is None else [(self.source, 1.0)]

    def describe(self) -> str | None:
        """The source, or the mixture in ``--data-mix`` form (``a=0.7,b=0.3``); None without either."""
        if self.mixture:
            return ",".join(f"{src}={w:g}" for src, w in self.sources())
        return self.source


@dataclass(frozen=True)
class EvalConfig:
    """``minicompress eval``: perplexity, teacher agreement, size and speed.

    Attributes:
        model: the model to evaluate.
        data: the evaluation text (default: whole files, no shuffle).
        teacher: optional reference model for KL(teacher || student) and top-1 agreement.
        stride: sliding-window stride in tokens (None: non-overlapping windows).
        batch_size: windows per forward pass.
        autocast: ``auto`` (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere; ``none`` or ``bfloat16`` force it.
        speed: also measure prefill and decode tokens/s.
        prefill_tokens: prompt length for the speed test.
        decode_tokens: generated tokens for the speed test.
        draft: a draft model for speculative decoding of ``model`` (the student drafting for
            its teacher): acceptance rate and speedup of assisted greedy decoding
            (:mod:`minicompress.evaluation.draft`); same vocabulary, dtype and device as ``model``.
        draft_prompts: prompts of the draft test, taken at evenly spaced places of ``data``'s
            text (not bound to its evaluation windows).
        draft_prompt_tokens: tokens per prompt.
        draft_new_tokens: tokens generated per prompt.
        draft_tokens: draft tokens proposed per teacher forward (a constant schedule).
        tasks: lm-evaluation-harness tasks to score (``--tasks hellaswag,arc_easy``; needs
            ``pip install 'minicompress[tasks]'``, :mod:`minicompress.evaluation.tasks`); with tasks,
            ``data.source`` may be empty (no perplexity).
        include_path: a folder of extra lm-eval task YAMLs (local tasks over JSONL files).
        num_fewshot: examples per prompt of every task (None: each task's default).
        task_limit: score only the first this many documents of each task (a quick check).
        compare: more models evaluated the same way, one table row each beside ``model``
            (``--compare pruned/,recovered/,quantized/``): the teacher, pruned, recovered and
            quantized side by side; each loads with ``model``'s dtype and device and is
            released before the next.
        output: JSON file for the results (None: print only).
        overwrite: replace an existing output.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(shuffle=False, documents="file"))
    teacher: ModelConfig | None = None
    stride: int | None = None
    batch_size: int = 4
    autocast: str = choice("auto", AUTOCAST)
    speed: bool = True
    prefill_tokens: int = 256
    decode_tokens: int = 32
    draft: ModelConfig | None = None
    draft_prompts: int = 8
    draft_prompt_tokens: int = 64
    draft_new_tokens: int = 64
    draft_tokens: int = DRAFT_TOKENS
    tasks: tuple[str, ...] = ()
    include_path: str | None = None
    num_fewshot: int | None = None
    task_limit: int | None = None
    compare: tuple[str, ...] = ()
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check_tasks("tasks", self.tasks, self.include_path, self.num_fewshot, self.task_limit,
                     ("include_path", "num_fewshot", "task_limit"))
        if any(not str(c).strip() for c in self.compare):
            raise ConfigError("compare: each entry must name a model (folder, .gguf file, Hub id or built-in name)")
        if self.compare and self.data.source is None:
            raise ConfigError("data.source: --compare needs a text to evaluate on (--data PATH)")
        if self.data.source is None:
            if not self.tasks:
                raise ConfigError("data.source: eval needs a text to evaluate on (--data PATH), or --tasks for "
                                  "task accuracy only")
            for key in ("teacher", "draft"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"data.source: --{key} needs a text to evaluate on (--data PATH)")
        for key in ("draft_prompts", "draft_prompt_tokens", "draft_new_tokens", "draft_tokens"):
            _check_positive(key, getattr(self, key))
        if self.draft is not None:
            for key in ("dtype", "device"):
                if getattr(self.draft, key) != getattr(self.model, key):
                    raise ConfigError(f"draft.{key}: {getattr(self.draft, key)!r} differs from model.{key} "
                                      f"{getattr(self.model, key)!r}; the draft runs beside the model, give it the same "
                                      f"(--draft-{key})")
        _check_positive("stride", self.stride, allow_none=True)
        if self.stride is not None and self.stride > self.data.seq_len:
            raise ConfigError(f"stride: must be <= data.seq_len ({self.data.seq_len}), got {self.stride}")
        _check_positive("batch_size", self.batch_size)
        _check_choice("autocast", self.autocast, AUTOCAST)
        _check_positive("prefill_tokens", self.prefill_tokens)
        _check_positive("decode_tokens", self.decode_tokens)


@dataclass(frozen=True)
class ScoreConfig:
    """``minicompress score``: activation importance on calibration data (Minitron sec. 2).

    Attributes:
        model: the model to score (never modified).
        data: calibration text (never the evaluation split).
        num_samples: calibration sequences.
        batch_size: sequences per forward.
        batch_aggregation: how per-sequence scores combine (``mean``, ``l2``, ``var``).
        sequence_aggregation: how per-token activations combine (``mean``, ``l2``, ``var``).
        layer_scores: also compute Block Importance and per-layer loss increase.
        loss_samples: calibration sequences used for the per-layer loss-drop score.
        autocast: ``auto`` (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere; ``none`` or ``bfloat16`` force it.
        output: folder for scores (safetensors + JSON).
        overwrite: replace an existing output.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    num_samples: int = 1024
    batch_size: int = 8
    batch_aggregation: str = choice("l2", AGGREGATIONS)
    sequence_aggregation: str = choice("mean", AGGREGATIONS)
    layer_scores: bool = True
    loss_samples: int = 32
    autocast: str = choice("auto", AUTOCAST)
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check_positive("num_samples", self.num_samples)
        _check_positive("batch_size", self.batch_size)
        _check_choice("batch_aggregation", self.batch_aggregation, AGGREGATIONS)
        _check_choice("sequence_aggregation", self.sequence_aggregation, AGGREGATIONS)
        _check_positive("loss_samples", self.loss_samples, allow_zero=True)
        _check_choice("autocast", self.autocast, AUTOCAST)


@dataclass(frozen=True)
class TargetConfig:
    """The size a pruned model should have.

    Either explicit HF sizes (any subset; the rest stay as they are), and/or layers to
    drop, or ``target_params`` (an absolute count > 1, or a ratio in (0, 1]) that lets the
    pruner search uniform architectures near that size.

    Attributes:
        hidden_size: new embedding width.
        intermediate_size: new FFN width (every layer).
        num_attention_heads: new query heads per layer.
        num_key_value_heads: new KV heads per layer.
        num_hidden_layers: new depth (layers chosen by ``layer_metric``).
        drop_layers: explicit layer indices to drop.
        target_params: parameter budget: count (> 1) or ratio of the original (<= 1).
        layer_metric: how layers are chosen for dropping: ``bi`` (Block Importance),
            ``loss`` (LM-loss increase when dropped), ``contiguous`` (best block of k).
        norm_correction: rescale kept norm weights so each RMSNorm output keeps its
            calibration scale after embedding channels are removed.
        width_multiple: ``target_params`` search only: hidden and FFN sizes of the
            candidates are multiples of this (fast kernels; 1: the plain search grid).
            Widths under 4x the multiple (tiny models) use the plain grid.
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_hidden_layers: int | None = None
    drop_layers: tuple[int, ...] = ()
    target_params: float | None = None
    layer_metric: str = choice("bi", LAYER_METRICS)
    norm_correction: bool = True
    width_multiple: int = 64

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "num_hidden_layers"):
            _check_positive(name, getattr(self, name), allow_none=True)
        _check_positive("target_params", self.target_params, allow_none=True)
        if self.target_params is not None and self.target_params > 1 and self.target_params != int(self.target_params):
            raise ConfigError(f"target_params: {self.target_params} is neither a ratio in (0, 1] nor a whole "
                              "parameter count; use e.g. 0.5 or 70M")
        _check_choice("layer_metric", self.layer_metric, LAYER_METRICS)
        _check_positive("width_multiple", self.width_multiple)
        if any(i < 0 for i in self.drop_layers):
            raise ConfigError(f"drop_layers: layer indices must be >= 0, got {list(self.drop_layers)}")


@dataclass(frozen=True)
class PruneConfig:
    """``minicompress prune``: score (or reuse scores), plan, rewrite, save.

    Attributes:
        model: the model to prune.
        data: calibration text (used for scoring and for ranking candidates).
        scores: folder written by ``minicompress score`` to reuse (None: score now).
        score: scoring settings when scoring now.
        target: the size to reach.
        search_batches: calibration batches for ranking candidate architectures.
        output: folder for the pruned HF model.
        overwrite: replace an existing output.
        resume: continue an interrupted ``target_params`` search from ``<output>.partial``
            (its scores and every candidate distilled before the interruption).
        streaming: prune a local safetensors checkpoint one tensor at a time without
            loading the model (needs ``scores`` and explicit sizes / ``drop_layers``).
        search_distill_candidates: ``target_params`` only: distil this many of the best
            zero-shot candidates briefly from the original and keep the one with the
            lowest held-out KL (Minitron sec. 4; 0: keep the best zero-shot candidate).
        search_distill_tokens: training tokens of each candidate's short distillation.
        search_recover: recovery settings of those distillations: keys of
            :class:`RecoverConfig` except those the prune sets
            (:data:`PRUNE_SETS_SEARCH_RECOVER_KEYS`); unset keys keep its defaults, but
            ``global_batch_tokens`` defaults to the multiple of ``micro_batch_size *
            data.seq_len`` nearest the default (4,096).
        repair: closed-form repairs of the pruned model on calibration activations
            (:mod:`minicompress.pruning.repair`), comma-separated (``--repair refit,flap``);
            ``auto`` (the default), ``none`` or any of: ``refit``: ridge least-squares refit of the
            kept columns of every ``down_proj`` so that, on the pruned student's own input,
            it adds what the original full FFN adds (layers in order, each on the output of
            the repaired ones before it); ``refit_o``: the same for ``o_proj`` against the
            original attention with all heads; ``flap``: FLAP's bias compensation (the mean
            of what is lost becomes a bias of ``down_proj`` / ``o_proj``; llama only, it
            sets ``mlp_bias`` / ``attention_bias`` in the config); ``replaceme``: each
            span of dropped layers becomes a linear map (least squares on the original
            model) folded into the ``down_proj`` of the layer before it (not if layer 0 is
            dropped; not gemma3). Calibration rows are the scoring's (``score.num_samples``
            x ``data.seq_len``), so ``data`` is needed even with ``scores``. Not with
            ``streaming``. ``auto`` runs ``refit`` (with the ``pruned`` ridge) wherever it
            can run (not with ``streaming``, under torchrun, without calibration text, or
            where the family or the token count refuses it) and nothing elsewhere, saying
            why: measured after distillation on the Quickstart student (SmolLM2-135M to
            576/9/3/768/18), it lowered WikiText-2 perplexity by 5-10% in three paired runs
            (61,440 tokens, two seeds; 131,072 tokens) and the held-out corpus, KL and
            top-1 with it (``benchmarks/RESULTS.md``, issue 30).
        repair_damping: relative ridge of the refits, ``lambda = repair_damping *
            mean(diag(X^T X))`` (0: plain least squares); several comma-separated values
            (``0.001,0.01,0.1``): each linear uses the one with the lowest error on held-out
            calibration batches (every 8th). ``replaceme`` uses the first value, damped
            towards the identity map. Default 0.01.
        repair_tokens: calibration tokens the repairs read (whole rows of ``data.seq_len``
            from the scoring's rows, so at most ``score.num_samples * data.seq_len``); at
            least as many as the widest refit solves for (kept neurons for ``refit``, kept
            heads x head_dim for ``refit_o``, the hidden size for ``replaceme``). Default 16384
            (the measured setting).
        repair_keep_scale: after a refit, rescale each row of the new weight to the norm
            of the same row of the plainly pruned weight (least squares grows the weights
            that compensate the dropped ones).
        repair_ridge: centre of the refit's ridge penalty: ``pruned`` (the default,
            ``lambda ||W - W_pruned||^2``: the refit as a damped correction of the plain prune,
            which a large damping gives back) or ``zero`` (classic ridge, ``lambda ||W||^2``,
            which shrank ``down_proj`` to 0.16-0.52x its norm in SmolLM2's massive-activation
            layers and lost to the plain start after distillation).
        repair_damping_scale: what ``repair_damping`` is relative to: ``mean`` (GPTQ's
            ``lambda I``, ``lambda = repair_damping * mean(diag(X^T X))``) or ``diagonal``
            (``repair_damping * diag(X^T X)``: each kept input damped relative to its own
            energy). On SmolLM2-135M one massive-activation neuron holds 86-90% of
            ``diag(X^T X)`` in some layers, so ``mean`` damps every other neuron about ten
            times its own energy and shrinks its weights towards zero (``zero`` ridge).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    scores: str | None = None
    score: ScoreConfig = field(default_factory=lambda: ScoreConfig(num_samples=256))
    target: TargetConfig = field(default_factory=TargetConfig)
    search_batches: int = 4
    output: str | None = None
    overwrite: bool = False
    resume: bool = False
    streaming: bool = False
    search_distill_candidates: int = 4
    search_distill_tokens: int = 65536
    search_recover: dict[str, Any] = field(default_factory=dict)
    repair: tuple[str, ...] = ("auto",)
    repair_damping: tuple[float, ...] = (0.01,)
    repair_tokens: int = 16384
    repair_keep_scale: bool = False
    repair_ridge: str = choice("pruned", REPAIR_RIDGES)
    repair_damping_scale: str = choice("mean", REPAIR_DAMPING_SCALES)

    def __post_init__(self):
        self._check_repair()
        _check_positive("search_batches", self.search_batches)
        _check_positive("search_distill_candidates", self.search_distill_candidates, allow_zero=True)
        _check_positive("search_distill_tokens", self.search_distill_tokens)
        if self.target.target_params is not None and self.search_distill_candidates:
            self.search_recover_config()  # fails early, naming the key

    @property
    def repair_is_auto(self) -> bool:
        """Whether ``repair`` is ``auto``: the recipe runs :data:`REPAIR_AUTO` only where it can."""
        return [str(r).strip().lower() for r in self.repair] == ["auto"]

    @property
    def repairs(self) -> tuple[str, ...]:
        """The repairs to run, in :data:`REPAIRS` order (empty for ``none``); ``auto`` is
        :data:`REPAIR_AUTO`, empty with ``streaming`` (the recipe drops it where it cannot run)."""
        if self.repair_is_auto:
            return () if self.streaming else REPAIR_AUTO
        names = [str(r).strip().lower() for r in self.repair]
        return tuple(r for r in REPAIRS if r in names and r != "none")

    def _check_repair(self) -> None:
        names = [str(r).strip().lower() for r in self.repair]
        for name in names:
            if name not in REPAIRS + ("auto",):
                raise ConfigError(f"repair: {name!r} is not a repair; choose auto, or from {', '.join(REPAIRS)} "
                                  "(comma-separated, e.g. refit,refit_o)")
        for alone in ("none", "auto"):
            if alone in names and len(names) > 1:
                raise ConfigError(f"repair: '{alone}' cannot be combined with other repairs")
        if len(set(names)) != len(names):
            raise ConfigError(f"repair: a repair is named twice in {','.join(names)}")
        repairs = self.repairs
        if not self.repair_damping:
            raise ConfigError("repair_damping: give at least one value >= 0, e.g. 0.01")
        for value in self.repair_damping:
            _check_positive("repair_damping", value, allow_zero=True)
        _check_positive("repair_tokens", self.repair_tokens)
        _check_choice("repair_ridge", self.repair_ridge, REPAIR_RIDGES)
        _check_choice("repair_damping_scale", self.repair_damping_scale, REPAIR_DAMPING_SCALES)
        if not repairs:
            return
        if self.streaming and not self.repair_is_auto:
            raise ConfigError("repair: a repair runs the loaded pruned model on calibration text; --streaming never "
                              "loads it; drop --repair or --streaming")
        if self.repair_keep_scale and not {"refit", "refit_o"} & set(repairs):
            raise ConfigError("repair_keep_scale: applies to the refits; add refit or refit_o to --repair")

    def search_recover_config(self, teacher_dtype: str = "auto") -> "RecoverConfig":
        """The :class:`RecoverConfig` of one candidate's short distillation in the search.

        Student and teacher are passed in memory (the configs only name ``model``); the
        data is the prune's (read up to ``2 * (tokens + eval_tokens)`` or 1M tokens when
        ``data.max_tokens`` is unset), with its seed, so every candidate sees the same
        batches and the same held-out split.

        Args:
            teacher_dtype: the original's dtype (the candidates are distilled in memory from
                the original as it is).

        Raises:
            ConfigError: a key the prune sets, an unknown key, an invalid value, no
                held-out tokens, or a token budget below one step; the message names
                ``search_recover.<key>`` or ``search_distill_tokens``.
        """
        allowed = [f.name for f in dataclasses.fields(RecoverConfig) if f.name not in PRUNE_SETS_SEARCH_RECOVER_KEYS]
        for key in self.search_recover:
            if key in PRUNE_SETS_SEARCH_RECOVER_KEYS:
                raise ConfigError(f"search_recover.{key}: set by the prune for every candidate; remove it")
            if key.startswith("blockwise_"):
                raise ConfigError(f"search_recover.{key}: the search's short distillations run no blockwise stage; "
                                  "remove it")
            if key in ("teachers", "teacher_weights"):
                raise ConfigError(f"search_recover.{key}: the search distils every candidate from the original "
                                  "alone; remove it")
            if key == "on_policy_prompts":
                raise ConfigError("search_recover.on_policy_prompts: the search's short distillations prompt from "
                                  "their data rows; remove it")
            if key not in allowed:
                raise ConfigError(f"search_recover.{key}: unknown key; allowed keys: {', '.join(allowed)}")
        merged = dict(self.search_recover)
        for key in ("micro_batch_size", "eval_tokens"):
            merged[key] = _coerce(merged.get(key, getattr(RecoverConfig, key)), int, f"search_recover.{key}")
        if "global_batch_tokens" not in merged:
            per_micro = max(1, merged["micro_batch_size"] * self.data.seq_len)
            merged["global_batch_tokens"] = per_micro * max(1, round(RecoverConfig.global_batch_tokens / per_micro))
        data = self.data
        if data.max_tokens is None:
            data = dataclasses.replace(data, max_tokens=max(2 * (self.search_distill_tokens + merged["eval_tokens"]),
                                                            1 << 20))
        merged.update(student=self.model, teacher=self.model, data=data, tokens=self.search_distill_tokens,
                      output=None, overwrite=False, resume=False, eval_every=0, teacher_dtype=teacher_dtype)
        try:
            recover = _build(RecoverConfig, merged)
        except ConfigError as err:
            key = str(err).partition(":")[0].split(".")[0]
            if key == "tokens":
                raise ConfigError(f"search_distill_{err}") from None
            raise ConfigError(f"search_recover.{err}") from None
        if not recover.eval_tokens:
            raise ConfigError("search_recover.eval_tokens: the search ranks candidates by held-out KL; must be > 0")
        return recover


@dataclass(frozen=True)
class LossConfig:
    """Distillation loss: weighted sum of logit KL, label CE and intermediate states.

    Attributes:
        kind: logit divergence (``forward_kl``, ``reverse_kl``, ``jsd``, ``topk_kl``, ``sampled_kl``).
        temperature: softmax temperature tau (the KL is scaled by tau^2).
        beta: the generalised JSD interpolation weight.
        kl_weight: weight of the logit divergence.
        ce_weight: weight of cross-entropy on the labels. The default is forward KL alone
            (``kl_weight=1``, ``ce_weight=0``), Minitron's choice: on the 50% SmolLM2 student
            after 262,144 tokens it beat 0.5 KL + 0.5 CE on three of four domains in
            perplexity (WikiText-2 122.7 vs 131.3, teacher-generated text 37.6 vs 41.4,
            Python docstrings 96.1 vs 102.1) and on all four in KL to the teacher; the CE
            half only helps the recovery text's own domain (held-out corpus 76.6 vs 81.4).
            At 1M tokens of one corpus 0.5 / 0.5 reached 9% lower WikiText-2 perplexity
            at the same KL (``benchmarks/RESULTS.md``).
        intermediate_weight: weight of the Minitron intermediate-state cosine loss
            (0: off). It scales the paper's dynamic weight: the total is
            ``L_logits + intermediate_weight * (L_logits / L_is) * L_is`` (1.0: the paper).
        chunk_size: tokens per chunk of the fused vocabulary loss (0: from the vocabulary
            size, 1024 for SmolLM2 and 256 for Gemma-3).
    """

    kind: str = choice("forward_kl", LOSS_KINDS)
    temperature: float = 1.0
    beta: float = 0.5
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    intermediate_weight: float = 0.0
    chunk_size: int = 0

    def __post_init__(self):
        _check_choice("kind", self.kind, LOSS_KINDS)
        _check_positive("temperature", self.temperature)
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta: must be in [0, 1], got {self.beta}")
        for name in ("kl_weight", "ce_weight", "intermediate_weight"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ConfigError("kl_weight: kl_weight and ce_weight cannot both be 0")
        _check_positive("chunk_size", self.chunk_size, allow_zero=True)


@dataclass(frozen=True)
class TeacherConfig:
    """One more teacher of ``recover`` after its first (multi-teacher distillation).

    Attributes:
        source: the teacher model (a Hugging Face folder, a ``.gguf`` file, a Hub id or a
            built-in name), loaded like ``teacher`` in ``teacher_dtype`` on ``teacher_device``;
            its tokenizer must be the student's.
        cache: this teacher's top-k teacher cache (``minicompress teacher-cache --kind topk``)
            instead of ``source``; its rows must be those of every other cache of the run.
        trust_remote_code: allow custom code from the model's repository.
    """

    source: str | None = None
    cache: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if (self.source is None) == (self.cache is None):
            raise ConfigError("source: give the teacher's model (source) or its teacher cache (cache), one of the two")
        if not str(self.name).strip():
            raise ConfigError(f"{'source' if self.source is not None else 'cache'}: must not be empty")

    @property
    def name(self) -> str:
        """``source``, or ``cache`` for a cached teacher."""
        return self.source if self.source is not None else self.cache


def _teacher_index(text: str, names: list[str], where: str) -> int:
    """The index of the teacher ``text`` names: an index, or a name of ``names`` (a path spelled
    another way is the same teacher)."""
    text = str(text).strip()
    if not names:
        raise ConfigError(f"{where}: names teacher {text!r}, but the run has no teacher (--teacher)")
    if re.fullmatch(r"\d+", text):
        if int(text) >= len(names):
            raise ConfigError(f"{where}: teacher {text} does not exist; the teachers are 0-{len(names) - 1}")
        return int(text)
    for i, name in enumerate(names):
        if text == name or _source_key(text) == _source_key(name):
            return i
    raise ConfigError(f"{where}: {text!r} names no teacher; give an index 0-{len(names) - 1} or one of "
                      f"{', '.join(names)}")


@dataclass(frozen=True)
class RecoverConfig:
    """``minicompress recover``: knowledge distillation from a frozen teacher.

    Attributes:
        student: the (pruned) model to train.
        teacher: the frozen teacher (None with ``teacher_cache``, or for CE-only); give
            ``--teacher`` again for each further teacher (``teachers``).
        teacher_cache: folder written by ``minicompress teacher-cache``.
        teachers: more teachers after the first (``teacher`` or ``teacher_cache``), each a
            model (``source``) or its top-k teacher cache (``cache``): the target is then the
            mixture of all teachers' distributions, weighted by ``teacher_weights``
            (``kl_to_teacher`` keeps measuring the first; ``kl_to_teachers`` the mixture).
            One process, no intermediate-state loss. A repeated ``--teacher`` adds one.
        teacher_weights: one weight > 0 per teacher, the first teacher's first
            (``--teacher-weights 0.7,0.3``), normalised to sum 1; empty (default): equal
            weights. A ``data`` mixture source with its own ``teacher`` is distilled from
            that teacher alone.
        data: training text.
        tokens: training budget in tokens.
        global_batch_tokens: tokens per optimizer step (gradient accumulation fills it); 4,096
            (8 sequences of 512) beat 8,192 and 16,384 at 131k tokens (benchmarks/RESULTS.md).
        micro_batch_size: sequences per forward.
        lr: peak learning rate (1e-3: the best of 1e-4, 3e-4, 1e-3, 2e-3 and 4e-3 at 131k tokens,
            benchmarks/RESULTS.md; Minitron's 1e-4 was for billions of tokens).
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warmup steps (None, the default: a tenth of the steps, between 1
            and 10).
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (0: off).
        loss: the distillation loss.
        autocast: ``auto`` (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere; ``none`` or ``bfloat16`` force it.
        teacher_dtype: dtype of the frozen teacher's weights; ``auto`` (default): bfloat16 when
            ``autocast`` resolves to bf16 (the teacher has no master weights to keep, and
            its forward runs 1.4x faster than under autocast with float32 weights on an
            AMX CPU), else float32; a teacher passed in memory keeps its own dtype.
        teacher_device: device of the teacher (None: the student's).
        activation_checkpointing: recompute each decoder layer's activations in backward
            instead of keeping them (about a third more compute, activation memory of one
            ``[B, L, H]`` per layer).
        compile: ``torch.compile`` each decoder layer of the student and the teacher (one
            graph per layer shape, its elementwise ops fused). ``auto`` (default): on for
            runs of at least 262,144 tokens in one process where a compiler backend exists
            (CUDA, or a C++ compiler for CPU), without activation checkpointing; ``true`` /
            ``false`` force it. Compiling costs about 25 s once. With it the fused
            vocabulary loss runs each chunk as one compiled kernel
            (``LossNumerics(compiled=True)`` of ``chunked_distill_loss``) and, on CPU, the student's attention
            backward runs as compiled bf16 GEMMs (:mod:`minicompress.distillation.attention`).
        reshard_after_forward: under torchrun, free each FSDP2 layer's gathered weights
            after its forward and gather them again in backward (least memory); False
            keeps them until backward (fewer all-gathers, more memory). Under torchrun,
            mixed precision follows ``autocast``: bf16 resolved on CUDA means FSDP2
            gathers bf16 weights and reduces gradients in float32, over float32 master
            weights and AdamW state.
        eval_every: optimizer steps between evaluations (0: only at the end).
        eval_tokens: held-out tokens for evaluation.
        save_every: optimizer steps between checkpoints (0: only at the end).
        checkpoint_keep: checkpoints kept in the working folder ``<output>.partial``.
        log_every: optimizer steps between log lines (``metrics.jsonl`` gets every step).
        eval_batch_size: held-out sequences per evaluation forward.
        resume: continue from the last checkpoint in ``<output>.partial`` (a fresh
            start when there is none).
        seed: seeds data order, init of projections and RNG.
        output: folder for the recovered HF model.
        overwrite: replace an existing output.
        blockwise_tokens: tokens of a blockwise local distillation stage before the global
            one, taken from ``tokens`` (the global stage gets the rest; 0: off). Each student
            layer learns to reproduce its teacher span's output from the teacher's input
            (Puzzle, arXiv 2411.19146; :mod:`minicompress.distillation.blockwise`), one
            block at a time, without the vocabulary head. Needs a live ``teacher``, one process.
        blockwise_lr: peak learning rate of the blockwise stage (None: ``lr``).
        blockwise_layers: the teacher layer each student layer starts at, for a student
            without a pruning plan (empty, the default: the kept layers of the plan in the
            student's ``minicompress.json``, or every layer for a student of the teacher's depth).
        on_policy: share of each step's sequences the student writes itself (on-policy
            distillation, GKD's lambda; 0: off, 1: all): they start from the first
            ``on_policy_prompt_tokens`` tokens of their data rows (or ``on_policy_prompts``),
            are continued by the current student and scored by the teacher on the generated
            tokens only (:mod:`minicompress.distillation.onpolicy`). Needs a live ``teacher``;
            one process.
        on_policy_prompt_tokens: tokens of a row that prompt the student's continuation (64,
            the default: a paragraph's worth of the data's context, and 7/8 of a 512-token row
            left for the student to write).
        on_policy_prompts: a text file (blank-line separated prompts in ``.txt``; one record
            per line in ``.jsonl``, field ``data.text_field``) whose prompts replace the data
            rows' starts, each cut to ``on_policy_prompt_tokens`` (None, the default: the rows').
        on_policy_temperature: sampling temperature of the student's continuation; 1 samples
            its own distribution, as GKD does.
        on_policy_top_k: the continuation samples from the ``top_k`` most likely tokens (0,
            the default: all).
        on_policy_top_p: nucleus mass of the continuation's sampling (1.0, the default: off).
    """

    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = field(default=None, metadata={"repeat": "teachers"})  # --teacher A --teacher B
    teacher_cache: str | None = None
    teachers: tuple[TeacherConfig, ...] = ()
    teacher_weights: tuple[float, ...] = ()
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    tokens: int = 1_000_000
    global_batch_tokens: int = 4096
    micro_batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)
    autocast: str = choice("auto", AUTOCAST)
    teacher_dtype: str = choice("auto", ("auto",) + DTYPES)
    teacher_device: str | None = choice(None, DEVICES)
    activation_checkpointing: bool = False
    compile: bool | str = choice("auto", ("auto", "true", "false"))
    reshard_after_forward: bool = True
    eval_every: int = 0
    eval_tokens: int = 16384
    save_every: int = 0
    checkpoint_keep: int = 1
    log_every: int = 10
    eval_batch_size: int = 4
    resume: bool = False
    seed: int = 0
    output: str | None = None
    overwrite: bool = False
    blockwise_tokens: int = 0
    blockwise_lr: float | None = None
    blockwise_layers: tuple[int, ...] = ()
    on_policy: float = 0.0
    on_policy_prompt_tokens: int = 64
    on_policy_prompts: str | None = None
    on_policy_temperature: float = 1.0
    on_policy_top_k: int = 0
    on_policy_top_p: float = 1.0

    def __post_init__(self):
        _check_positive("tokens", self.tokens)
        _check_positive("eval_tokens", self.eval_tokens, allow_zero=True)
        _check_positive("checkpoint_keep", self.checkpoint_keep)
        _check_positive("log_every", self.log_every)
        _check_positive("eval_batch_size", self.eval_batch_size)
        _check_positive("global_batch_tokens", self.global_batch_tokens)
        _check_positive("micro_batch_size", self.micro_batch_size)
        _check_positive("lr", self.lr)
        _check_positive("min_lr", self.min_lr, allow_zero=True)
        _check_positive("warmup_steps", self.warmup_steps, allow_zero=True, allow_none=True)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("grad_clip", self.grad_clip, allow_zero=True)
        _check_choice("autocast", self.autocast, AUTOCAST)
        _check_choice("teacher_dtype", self.teacher_dtype, ("auto",) + DTYPES)
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"compile: must be auto, true or false, got {self.compile!r}")
        if self.teacher_device is not None:
            _check_choice("teacher_device", self.teacher_device, DEVICES)
        _check_positive("eval_every", self.eval_every, allow_zero=True)
        _check_positive("save_every", self.save_every, allow_zero=True)
        if self.loss.kl_weight > 0 and self.teacher is None and self.teacher_cache is None:
            raise ConfigError("teacher: KL recovery needs --teacher or --teacher-cache (or set loss.kl_weight=0)")
        if self.loss.intermediate_weight > 0 and self.teacher is None:
            raise ConfigError("loss.intermediate_weight: the intermediate-state loss needs --teacher")
        if self.loss.kl_weight > 0 and self.loss.kind in SPARSE_LOSS_KINDS and not any(self.teacher_caches()):
            raise ConfigError(f"loss.kind: {self.loss.kind} needs --teacher-cache; use forward_kl with a live teacher")
        if self.teacher_cache is not None:
            if self.data.mixture:
                raise ConfigError("data.mixture: --teacher-cache trains on the cache's own rows; a mixture needs a "
                                  "live --teacher (give the generated text as a mixture source instead)")
            if self.loss.kind not in ("forward_kl",) + SPARSE_LOSS_KINDS:
                raise ConfigError(f"loss.kind: {self.loss.kind} needs full teacher logits; "
                                  "--teacher-cache supports forward_kl / topk_kl / sampled_kl only")
            if self.loss.intermediate_weight > 0:
                raise ConfigError("loss.intermediate_weight: needs a live --teacher, not --teacher-cache")
        tokens_per_micro = self.micro_batch_size * self.data.seq_len
        if self.global_batch_tokens % tokens_per_micro:
            raise ConfigError(
                f"global_batch_tokens: must be a multiple of micro_batch_size * data.seq_len ({tokens_per_micro}), "
                f"got {self.global_batch_tokens}"
            )
        if self.tokens < self.global_batch_tokens:
            raise ConfigError(
                f"tokens: the budget ({self.tokens}) is less than one optimizer step "
                f"(global_batch_tokens={self.global_batch_tokens})"
            )
        self._check_blockwise()
        self._check_teachers()
        self._check_on_policy()

    def _check_teachers(self) -> None:
        """More teachers than one: their weights, what a mixture of them allows, the data sources' teachers."""
        count = len(self.teacher_names())
        if self.teachers and self.teacher is None and self.teacher_cache is None:
            raise ConfigError("teachers: more teachers need a first one (--teacher or --teacher-cache)")
        if any(isinstance(w, bool) or not math.isfinite(w) or w <= 0 for w in self.teacher_weights):
            raise ConfigError(f"teacher_weights: must be numbers > 0, got {list(self.teacher_weights)}")
        if self.teacher_weights and len(self.teacher_weights) != count:
            n = len(self.teacher_weights)
            raise ConfigError(f"teacher_weights: {n} weight{'s' if n != 1 else ''} for {count} teacher"
                              f"{'s' if count != 1 else ''}; give one per teacher, the first teacher's first")
        if self.teachers:
            cached = [c for c in self.teacher_caches() if c is not None]
            if self.loss.intermediate_weight > 0:
                raise ConfigError("loss.intermediate_weight: the intermediate-state loss follows one teacher; "
                                  "drop the further teachers or set it to 0")
            if self.loss.kind == "sampled_kl":
                raise ConfigError("loss.kind: sampled_kl estimates one teacher's KL from its draws and cannot mix "
                                  "teachers; use forward_kl with top-k caches or live teachers")
            if cached and self.loss.kind not in ("forward_kl", "topk_kl"):
                raise ConfigError(f"loss.kind: {self.loss.kind} needs full teacher logits; a mixture with a teacher "
                                  "cache supports forward_kl only")
            if cached and self.data.mixture:
                raise ConfigError("data.mixture: a teacher cache trains on the cache's own rows; a mixture of "
                                  "sources needs live teachers")
        self.source_teachers()

    def teacher_names(self) -> list[str]:
        """Each teacher's name, the first first: its ``teacher_cache`` (which wins over ``teacher``)
        or ``teacher`` source, then each of ``teachers``; empty without a teacher."""
        if self.teacher is None and self.teacher_cache is None:
            return []
        first = self.teacher_cache if self.teacher_cache is not None else self.teacher.source
        return [first] + [t.name for t in self.teachers]

    def teacher_caches(self) -> tuple[str | None, ...]:
        """Each teacher's cache folder (None for a live teacher), in :meth:`teacher_names`' order."""
        if self.teacher is None and self.teacher_cache is None:
            return ()
        return (self.teacher_cache,) + tuple(t.cache for t in self.teachers)

    def mixture_weights(self) -> tuple[float, ...]:
        """Each teacher's weight in the mixture, normalised to sum 1 (equal without ``teacher_weights``)."""
        raw = self.teacher_weights or (1.0,) * len(self.teacher_names())
        return tuple(w / sum(raw) for w in raw)

    def source_teachers(self) -> tuple[int | None, ...]:
        """Per ``data.mixture`` source, the index of the teacher its rows are distilled from alone,
        or None (the weighted mixture).

        Raises:
            ConfigError: ``data.mixture[i].teacher`` names no teacher.
        """
        names = self.teacher_names()
        return tuple(None if part.teacher is None else _teacher_index(part.teacher, names, f"data.mixture[{i}].teacher")
                     for i, part in enumerate(self.data.mixture))

    def _check_on_policy(self) -> None:
        """On-policy distillation's share, prompts and sampling (:mod:`minicompress.distillation.onpolicy`)."""
        if self.on_policy is None or not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"on_policy: must be in [0, 1] (the share of each step's sequences the student "
                              f"generates), got {self.on_policy!r}")
        _check_positive("on_policy_prompt_tokens", self.on_policy_prompt_tokens)
        check_sampling(self.on_policy_top_k, self.on_policy_top_p, self.on_policy_temperature, prefix="on_policy_")
        if not self.on_policy:
            if self.on_policy_prompts is not None:
                raise ConfigError("on_policy_prompts: prompts the student's own samples; give on_policy > 0 too")
            return
        if any(c is not None for c in self.teacher_caches()):
            raise ConfigError("on_policy: the teacher must score the student's own samples, which a --teacher-cache "
                              "cannot hold; give a live --teacher instead")
        if self.teacher is None:
            raise ConfigError("on_policy: the student's samples are scored by a live --teacher; give one")
        if self.loss.kl_weight == 0:
            raise ConfigError("on_policy: the student's samples are scored by the teacher's divergence; set "
                              "loss.kl_weight > 0")
        if self.on_policy_prompt_tokens >= self.data.seq_len:
            raise ConfigError(f"on_policy_prompt_tokens: must be below data.seq_len ({self.data.seq_len}) so the "
                              f"student writes at least one token, got {self.on_policy_prompt_tokens}")

    def _check_blockwise(self) -> None:
        """The blockwise stage's budget and needs (:mod:`minicompress.distillation.blockwise`)."""
        _check_positive("blockwise_tokens", self.blockwise_tokens, allow_zero=True)
        _check_positive("blockwise_lr", self.blockwise_lr, allow_none=True)
        if any(i < 0 for i in self.blockwise_layers) or any(b <= a for a, b in zip(self.blockwise_layers,
                                                                                     self.blockwise_layers[1:])):
            raise ConfigError(f"blockwise_layers: {list(self.blockwise_layers)} must be strictly increasing teacher "
                              "layer indices >= 0, one per student layer")
        if not self.blockwise_tokens:
            return
        step = self.global_batch_tokens
        if self.blockwise_tokens > self.tokens - step:
            raise ConfigError(f"blockwise_tokens: {self.blockwise_tokens} is larger than tokens ({self.tokens}) less "
                              f"one global step ({step}): the global stage gets tokens - blockwise_tokens; give at "
                              f"most {max(self.tokens - step, 0)}")
        if self.blockwise_tokens < step:
            raise ConfigError(f"blockwise_tokens: {self.blockwise_tokens} is less than one optimizer step "
                              f"(global_batch_tokens={step})")
        if self.teacher is None or self.teacher_cache is not None:
            raise ConfigError("blockwise_tokens: the blockwise stage needs a live --teacher (its hidden states), "
                              "not --teacher-cache")


#: The loss of teacher correction: next-token cross-entropy on the text, no teacher.
CORRECTION_LOSS = {"kl_weight": 0.0, "ce_weight": 1.0}


@dataclass(frozen=True)
class CorrectConfig:
    """``minicompress correct``: teacher correction, a short fine-tune of the unpruned teacher.

    Minitron (Sreenivas et al., arXiv 2408.11796) first fine-tunes the teacher on the
    distillation text when its own pretraining data is not available, then prunes and
    distils from the corrected teacher. The fine-tune is ``recover``'s training with
    cross-entropy on the text and no teacher (:meth:`recover_config`): same schedule,
    checkpoints, resume and metrics.

    Attributes:
        teacher: the teacher to correct; every parameter is trained, as float32 master weights.
        data: the distillation text (the text ``prune`` and ``recover`` will read).
        tokens: fine-tuning budget in tokens (0: the teacher unchanged, written as a stock folder).
        global_batch_tokens: tokens per optimizer step (gradient accumulation fills it).
        micro_batch_size: sequences per forward.
        lr: peak learning rate (1e-4: on SmolLM2-135M corrected for 32,768 corpus tokens it
            took the held-out corpus from 37.2 to 32.5 and WikiText-2 from 28.4 to 26.2, where
            1e-5 reached 36.2 and 27.9; ``benchmarks/correct_lr.py``, RESULTS.md).
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warmup steps (None, the default: a tenth of the steps, between 1
            and 10).
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (0: off).
        autocast: ``auto`` (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere; ``none`` or ``bfloat16`` force it.
        activation_checkpointing: recompute each decoder layer's activations in backward
            instead of keeping them.
        compile: ``torch.compile`` each decoder layer; ``auto`` (default) as ``recover``'s
            (runs of at least 262,144 tokens where a compiler backend exists); ``true`` /
            ``false`` force it.
        eval_every: optimizer steps between evaluations (0: only at the end).
        eval_tokens: held-out tokens of the text for the perplexity before and after.
        save_every: optimizer steps between checkpoints (0: only at the end).
        checkpoint_keep: checkpoints kept in the working folder ``<output>.partial``.
        log_every: optimizer steps between log lines (``metrics.jsonl`` gets every step).
        eval_batch_size: held-out sequences per evaluation forward.
        resume: continue from the last checkpoint in ``<output>.partial`` (a fresh
            start when there is none).
        seed: seeds data order and RNG.
        output: folder for the corrected teacher (a stock HF folder).
        overwrite: replace an existing output.
    """

    teacher: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    tokens: int = 1_000_000
    global_batch_tokens: int = 4096
    micro_batch_size: int = 4
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    autocast: str = choice("auto", AUTOCAST)
    activation_checkpointing: bool = False
    compile: bool | str = choice("auto", ("auto", "true", "false"))
    eval_every: int = 0
    eval_tokens: int = 16384
    save_every: int = 0
    checkpoint_keep: int = 1
    log_every: int = 10
    eval_batch_size: int = 4
    resume: bool = False
    seed: int = 0
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check_positive("tokens", self.tokens, allow_zero=True)
        if self.teacher.dtype != "float32":
            raise ConfigError(f"teacher.dtype: correct trains float32 master weights; got {self.teacher.dtype!r}, "
                              "set float32 (bf16 autocast follows --autocast)")
        self._recover_config(max(self.tokens, self.global_batch_tokens))  # the training settings, checked once
        if 0 < self.tokens < self.global_batch_tokens:
            raise ConfigError(f"tokens: the budget ({self.tokens}) is less than one optimizer step "
                              f"(global_batch_tokens={self.global_batch_tokens}); give 0 for the teacher unchanged")

    def _recover_config(self, tokens: int) -> "RecoverConfig":
        names = {f.name for f in dataclasses.fields(RecoverConfig)}
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in names and f.name not in ("teacher", "tokens")}
        return RecoverConfig(student=self.teacher, teacher=None, tokens=tokens, loss=LossConfig(**CORRECTION_LOSS),
                             **same)

    def recover_config(self) -> "RecoverConfig":
        """The fine-tune as ``recover`` settings: the teacher is the student, no teacher, the
        loss cross-entropy on the text alone (:data:`CORRECTION_LOSS`).

        Raises:
            ConfigError: ``tokens`` is 0 (nothing to train).
        """
        if not self.tokens:
            raise ConfigError("tokens: 0 trains nothing; there are no training settings")
        return self._recover_config(self.tokens)


@dataclass(frozen=True)
class TeacherCacheConfig:
    """``minicompress teacher-cache``: the teacher's top-k logits for a dataset, offline.

    Attributes:
        teacher: the teacher model.
        data: the text to run the teacher on (same settings as the later ``recover``).
        tokens: number of tokens to cache.
        kind: ``sampled`` (default): ``samples`` tokens drawn from the teacher per position
            with their log-probs, an unbiased estimate of the full KL (Anshumann et al.,
            ACL 2025); ``topk``: the ``top_k`` largest logits (biased: the tail is dropped).
        top_k: logits kept per token (``kind="topk"``).
        samples: tokens drawn per position (``kind="sampled"``).
        micro_batch_size: sequences per forward.
        shard_tokens: tokens per safetensors shard.
        values_dtype: dtype of the stored top-k logit values (``bfloat16`` or ``float32``);
            indices are always int32.
        autocast: ``auto`` (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere; ``none`` or ``bfloat16`` force it.
        output: folder for the shards.
        overwrite: replace an existing output.
    """

    teacher: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    tokens: int = 1_000_000
    kind: str = choice("sampled", ("sampled", "topk"))
    top_k: int = 64
    samples: int = 12
    micro_batch_size: int = 8
    shard_tokens: int = 262144
    values_dtype: str = choice("bfloat16", ("bfloat16", "float32"))
    autocast: str = choice("auto", AUTOCAST)
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check_positive("tokens", self.tokens)
        _check_choice("kind", self.kind, ("sampled", "topk"))
        _check_positive("top_k", self.top_k)
        _check_positive("samples", self.samples)
        _check_choice("values_dtype", self.values_dtype, ("bfloat16", "float32"))
        _check_positive("micro_batch_size", self.micro_batch_size)
        _check_positive("shard_tokens", self.shard_tokens)
        _check_choice("autocast", self.autocast, AUTOCAST)


@dataclass(frozen=True)
class GenerateConfig:
    """``minicompress generate``: recovery data sampled from the teacher (data-free distillation).

    LLM-QAT (Liu et al., arXiv 2305.17888) generated its training text from the model
    itself: one start token per vocabulary id, the next few tokens greedy, the rest sampled
    (top-k 50, temperature 1). With ``data.source`` set, the rows start from the first
    ``prompt_tokens`` tokens of that text's sequences instead.

    Attributes:
        teacher: the model that writes the text.
        data: ``seq_len`` of every generated row; ``source`` (optional): a text whose
            sequences' first ``prompt_tokens`` tokens start the rows.
        tokens: tokens to generate (whole rows of ``data.seq_len``).
        prompt_tokens: tokens of a user text's sequence that start a row (with ``data.source``).
        greedy_tokens: generated tokens after the start taken greedily (LLM-QAT: 2-4).
        top_k: sampling keeps the ``top_k`` most likely tokens (0: all).
        top_p: nucleus sampling mass (1: off).
        temperature: sampling temperature of the continuation (the stored targets are
            always the temperature-1 distribution).
        samples: sparse targets kept per position: tokens drawn from the teacher's full
            distribution with their log-probs (the ``sampled`` teacher-cache kind).
        batch_size: rows decoded together (the KV cache grows with it).
        shard_tokens: tokens per safetensors shard (a killed run resumes at a shard).
        workers: processes that write shards side by side (0: ``auto``, one single-threaded
            process per CPU core, up to 8: batched decoding on a CPU gains nothing from a
            second thread but nearly 2x from a second process; 1 on an accelerator). The
            output does not depend on it.
        seed: seeds the start tokens and every shard's sampling.
        autocast: ``auto`` (default): bf16 where the hardware has native bf16; ``none`` or
            ``bfloat16`` force it.
        output: the folder: a teacher cache (``recover --teacher-cache``) plus ``text.jsonl``.
        overwrite: replace an existing output.
        resume: continue an interrupted run from ``<output>.partial``.
    """

    teacher: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    tokens: int = 1_000_000
    prompt_tokens: int = 4
    greedy_tokens: int = 3
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    samples: int = 12
    batch_size: int = 64
    shard_tokens: int = 262144
    workers: int = 0
    seed: int = 0
    autocast: str = choice("auto", AUTOCAST)
    output: str | None = None
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        _check_positive("tokens", self.tokens)
        if self.tokens < self.data.seq_len:
            raise ConfigError(f"tokens: {self.tokens} is less than one sequence of data.seq_len={self.data.seq_len}")
        _check_positive("prompt_tokens", self.prompt_tokens)
        if self.prompt_tokens >= self.data.seq_len:
            raise ConfigError(f"prompt_tokens: must be below data.seq_len ({self.data.seq_len}), got {self.prompt_tokens}")
        _check_positive("greedy_tokens", self.greedy_tokens, allow_zero=True)
        check_sampling(self.top_k, self.top_p, self.temperature)
        _check_positive("samples", self.samples)
        _check_positive("batch_size", self.batch_size)
        _check_positive("shard_tokens", self.shard_tokens)
        _check_positive("workers", self.workers, allow_zero=True)
        _check_choice("autocast", self.autocast, AUTOCAST)
        if self.data.mixture:
            raise ConfigError("data.mixture: generate starts rows from one text; give data.source")


@dataclass(frozen=True)
class QuantizeConfig:
    """``minicompress quantize``: round-to-nearest weight-only quantization with torchao.

    Attributes:
        model: the floating-point model to quantize (``dtype`` is kept for the parts that
            stay in floating point: embeddings, norms, the output head, the scales).
        scheme: ``int8-weight-only`` (symmetric, per output channel) or
            ``int4-weight-only`` (asymmetric, per group of ``group_size`` input channels).
        group_size: input channels sharing one scale (None: per output channel for int8,
            32 for int4); must divide the input width of every linear layer.
        output: folder for the quantized Hugging Face model.
        overwrite: replace an existing output.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    scheme: str = choice("int8-weight-only", QUANTIZE_SCHEMES)
    group_size: int | None = None
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        _check_choice("scheme", self.scheme, QUANTIZE_SCHEMES)
        _check_positive("group_size", self.group_size, allow_none=True)


@dataclass(frozen=True)
class StageConfig:
    """One stage of ``minicompress run``: prune the previous stage's model, then recover it.

    Attributes:
        name: names the stage's folder ``OUTPUT/stage-<i>-<name>`` (letters, digits,
            ``.``, ``_``, ``-``).
        target: the size to reach (explicit HF sizes / ``drop_layers``, or
            ``target_params``). In a run a ``target_params`` ratio is a fraction of the
            *original* model (``0.7`` then ``0.45``), not of the previous stage.
        tokens: distillation budget in tokens (0: prune only).
        teacher: ``original`` (default; Minitron found distilling from the original
            model best) or ``previous`` (the previous stage's output).
        recover: overrides of the run's ``recover`` defaults for this stage (keys of
            :class:`RecoverConfig`, e.g. ``lr``, ``loss: {ce_weight: 0.1}``).
        search: overrides of the run's ``search`` settings for this stage (keys of
            :data:`RUN_SEARCH_KEYS`, e.g. ``distill_candidates: 2``).
    """

    name: str = ""
    target: TargetConfig = field(default_factory=TargetConfig)
    tokens: int = 0
    teacher: str = "original"
    recover: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(self.name)):
            raise ConfigError(f"name: each stage needs a name of letters, digits, '.', '_' or '-' (it names the "
                              f"folder stage-<i>-<name>), got {self.name!r}")
        _check_positive("tokens", self.tokens, allow_zero=True)
        _check_choice("teacher", self.teacher, STAGE_TEACHERS)
        t = self.target
        explicit = any(getattr(t, k) is not None for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                            "num_key_value_heads", "num_hidden_layers"))
        if t.target_params is not None and (explicit or t.drop_layers):
            raise ConfigError("target.target_params: give either target_params or explicit sizes / drop_layers, "
                              "not both")
        if t.target_params is None and not explicit and not t.drop_layers:
            raise ConfigError("target: nothing to prune; set target_params, explicit sizes or drop_layers")


@dataclass(frozen=True)
class ReportConfig:
    """The end-of-run comparison of the original and every stage (``report.*``).

    Attributes:
        enabled: write the report at the end of the run (it loads the original and each
            stage whole, one at a time, in rank 0's process: turn it off for models that
            do not fit one device).
        batch_size: evaluation windows per forward.
        autocast: ``auto`` (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere; ``none`` or ``bfloat16`` force it.
        speed: measure greedy-decode tokens/s (batch 1, KV cache).
        prefill_tokens: prompt length of the speed test.
        decode_tokens: generated tokens of the speed test.
    """

    enabled: bool = True
    batch_size: int = 4
    autocast: str = "auto"
    speed: bool = True
    prefill_tokens: int = 256
    decode_tokens: int = 32

    def __post_init__(self):
        _check_positive("batch_size", self.batch_size)
        _check_choice("autocast", self.autocast, AUTOCAST)
        _check_positive("prefill_tokens", self.prefill_tokens)
        _check_positive("decode_tokens", self.decode_tokens)


@dataclass(frozen=True)
class RunConfig:
    """``minicompress run``: progressive prune + distil stages from one config.

    Attributes:
        model: the original model (stage 1 prunes it; the default teacher).
        data: calibration and training text (scoring, architecture search, recovery).
        eval_data: held-out text for the final report only (e.g. WikiText-2 test; no
            ``source``: the report has no perplexity / KL columns). Read as whole files
            without shuffling, like ``minicompress eval``.
        eval_tasks: lm-evaluation-harness tasks the report scores every model on (a
            column of ``acc`` per task; ``pip install 'minicompress[tasks]'``), e.g.
            ``[arc_easy, hellaswag]``.
        eval_include_path: a folder of extra lm-eval task YAMLs (local tasks).
        eval_num_fewshot: examples per prompt of every task (None: each task's default).
        eval_task_limit: score only the first this many documents of each task.
        score: scoring settings of every stage (its ``model``/``data`` are the run's).
        search_batches: calibration batches ranking candidate shapes (``target_params``;
            ``search: {batches: ...}`` says the same and wins).
        recover: recovery defaults of every stage: keys of :class:`RecoverConfig`
            except those the run sets (:data:`RUN_SETS_RECOVER_KEYS`).
        repair: the prune's closed-form repairs of every stage (:attr:`PruneConfig.repair`;
            ``auto``, the default, refits ``down_proj`` wherever it can run: not under
            torchrun, whose explicit-size stages prune tensor by tensor; ``none`` prunes plainly).
        search: architecture-search settings of every ``target_params`` stage (a stage's
            own ``search:`` overrides them), keys of :data:`RUN_SEARCH_KEYS`:
            ``batches``, ``distill_candidates``, ``distill_tokens`` and ``recover`` (the
            :class:`PruneConfig` fields ``search_batches``, ``search_distill_candidates``,
            ``search_distill_tokens``, ``search_recover``) and ``width_multiple`` (the
            stage's ``target.width_multiple``). They are part of each stage's digest.
        stages: the stages, in order; each prunes the previous stage's output.
        generate: data-free distillation (empty: off): keys of :class:`GenerateConfig`
            except those the run sets (:data:`RUN_SETS_GENERATE_KEYS`), e.g. ``{tokens: 1M}``.
            Before stage 1 the original writes that many tokens of its own text into
            ``OUTPUT/generated`` (rows of ``data.seq_len``; started from ``data.source``'s
            first tokens when given, else from LLM-QAT start tokens); every stage then
            calibrates on that text, and a stage whose teacher is the original recovers
            from its sparse targets (the ``sampled`` cache: no teacher forward).
        correct: teacher correction (empty: off): keys of :class:`CorrectConfig` except those
            the run sets (:data:`RUN_SETS_CORRECT_KEYS`), e.g. ``{tokens: 1M, lr: 3e-5}``.
            Before stage 1 the original is fine-tuned on ``data`` into ``OUTPUT/corrected``
            (Minitron's order, Sreenivas et al., arXiv 2408.11796); stage 1 prunes the
            corrected teacher and every stage whose teacher is the original distils from it.
        report: settings of the end-of-run evaluation.
        keep_pruned: keep each stage's pruned-but-not-recovered folder
            ``stage-<i>-<name>.pruned`` after its recovery finished.
        output: the run folder.
        overwrite: start over, replacing an existing run folder (without it a run
            folder of the same config is continued: finished stages are skipped and an
            interrupted recovery resumes).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=512))
    eval_data: DataConfig = field(default_factory=lambda: DataConfig(shuffle=False, documents="file"))
    eval_tasks: tuple[str, ...] = ()
    eval_include_path: str | None = None
    eval_num_fewshot: int | None = None
    eval_task_limit: int | None = None
    score: ScoreConfig = field(default_factory=lambda: ScoreConfig(num_samples=256))
    search_batches: int = 4
    recover: dict[str, Any] = field(default_factory=dict)
    repair: tuple[str, ...] = ("auto",)
    search: dict[str, Any] = field(default_factory=dict)
    stages: tuple[StageConfig, ...] = ()
    generate: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, Any] = field(default_factory=dict)
    report: ReportConfig = field(default_factory=ReportConfig)
    keep_pruned: bool = False
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.generate:
            self.generate_config(output="generated")  # checks the section, naming generate.<key>
        elif self.data.source is None and not self.data.mixture:
            raise ConfigError("data.source: a run needs calibration / training text (never the evaluation split), "
                              "or a generate: section (data-free: the original writes its own)")
        if self.correct:
            if self.generate:
                raise ConfigError("correct: a data-free run (generate:) trains on the original's own text, which needs "
                                  "no correction; drop one of the two sections")
            self.correct_config(output="corrected")  # checks the section, naming correct.<key>
        _check_tasks("eval_tasks", self.eval_tasks, self.eval_include_path, self.eval_num_fewshot,
                     self.eval_task_limit, ("eval_include_path", "eval_num_fewshot", "eval_task_limit"))
        _check_positive("search_batches", self.search_batches)
        if not self.stages:
            raise ConfigError("stages: a run needs at least one stage (a list of {name, target, tokens})")
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ConfigError(f"stages[{i}].name: {stage.name!r} is also the name of stages[{seen[stage.name]}]; "
                                  "stage names must be unique")
            seen[stage.name] = i
        for i, stage in enumerate(self.stages):
            if stage.tokens:
                self.stage_recover_config(i, student=ModelConfig(source="student"), teacher=self.model,
                                          output="stage")
            self.stage_prune_config(i, model=self.model)  # checks the search settings, naming the key

    def generate_config(self, *, output: str) -> "GenerateConfig":
        """The :class:`GenerateConfig` of the ``generate:`` section: the original writes rows
        of ``data.seq_len`` into ``output``, started from ``data.source`` when given.

        Raises:
            ConfigError: a key the run sets, an unknown key or an invalid value, named
                ``generate.<key>``.
        """
        if not isinstance(self.generate, dict):
            raise ConfigError(f"generate: expected a mapping of GenerateConfig keys, got {self.generate!r}")
        allowed = [f.name for f in dataclasses.fields(GenerateConfig) if f.name not in RUN_SETS_GENERATE_KEYS]
        for key in self.generate:
            if key in RUN_SETS_GENERATE_KEYS:
                raise ConfigError(f"generate.{key}: set by the run (the original, data.seq_len / data.source, "
                                  "OUTPUT/generated); remove it")
            if key not in allowed:
                raise ConfigError(f"generate.{key}: unknown key; allowed keys of generate: {', '.join(allowed)}")
        if self.data.mixture:
            raise ConfigError("data.mixture: a generate: run starts its rows from one text (data.source) or none")
        merged = dict(self.generate)
        merged.update(teacher=self.model, data=self.data, output=output, resume=True, overwrite=False)
        try:
            return _build(GenerateConfig, merged)
        except ConfigError as err:
            raise ConfigError(f"generate.{err}") from None

    def correct_config(self, *, output: str, resume: bool = False) -> "CorrectConfig":
        """The :class:`CorrectConfig` of the ``correct:`` section: the original (as float32
        master weights) fine-tuned on ``data`` into ``output``.

        Raises:
            ConfigError: a key the run sets, an unknown key or an invalid value, named
                ``correct.<key>``.
        """
        if not isinstance(self.correct, dict):
            raise ConfigError(f"correct: expected a mapping of CorrectConfig keys, got {self.correct!r}")
        allowed = [f.name for f in dataclasses.fields(CorrectConfig) if f.name not in RUN_SETS_CORRECT_KEYS]
        for key in self.correct:
            if key in RUN_SETS_CORRECT_KEYS:
                raise ConfigError(f"correct.{key}: set by the run (the original, data, OUTPUT/corrected); remove it")
            if key not in allowed:
                raise ConfigError(f"correct.{key}: unknown key; allowed keys of correct: {', '.join(allowed)}")
        merged = dict(self.correct)
        merged.update(teacher=dataclasses.replace(self.model, dtype="float32"), data=self.data, output=output,
                      resume=resume, overwrite=False)
        try:
            return _build(CorrectConfig, merged)
        except ConfigError as err:
            raise ConfigError(f"correct.{err}") from None

    def _stage_search(self, index: int) -> tuple[dict[str, Any], dict[str, str]]:
        """The merged ``search`` settings of stage ``index`` and where each key came from."""
        stage = self.stages[index]
        for where, mapping in (("search", self.search), (f"stages[{index}].search", stage.search)):
            if not isinstance(mapping, dict):
                raise ConfigError(f"{where}: expected a mapping of {', '.join(RUN_SEARCH_KEYS)}, got {mapping!r}")
            for key in mapping:
                if key not in RUN_SEARCH_KEYS:
                    raise ConfigError(f"{where}.{key}: unknown key; allowed keys of {where}: "
                                      f"{', '.join(RUN_SEARCH_KEYS)}")
        merged = _merge(dict(self.search), dict(stage.search))
        origin = {key: f"stages[{index}].search" if key in stage.search else "search" for key in merged}
        if "recover" in merged and not isinstance(merged["recover"], dict):
            raise ConfigError(f"{origin['recover']}.recover: expected a mapping of RecoverConfig keys, "
                              f"got {merged['recover']!r}")
        return merged, origin

    def stage_target(self, index: int) -> TargetConfig:
        """Stage ``index``'s target, with ``search.width_multiple`` applied to a ``target_params`` stage.

        Raises:
            ConfigError: ``width_multiple`` given both in the stage's target and in ``search``.
        """
        stage = self.stages[index]
        target = stage.target
        merged, origin = self._stage_search(index)
        if target.target_params is None or "width_multiple" not in merged:
            return target
        where = f"{origin['width_multiple']}.width_multiple"
        value = _coerce(merged["width_multiple"], int, where)
        if target.width_multiple != TargetConfig.width_multiple and target.width_multiple != value:
            raise ConfigError(f"{where}: {value} differs from stages[{index}].target.width_multiple "
                              f"({target.width_multiple}); give it once")
        try:
            return dataclasses.replace(target, width_multiple=value)
        except ConfigError as err:
            raise ConfigError(f"{origin['width_multiple']}.{err}") from None

    def stage_prune_config(self, index: int, *, model: ModelConfig, target: TargetConfig | None = None,
                           output: str | None = None, resume: bool = False, overwrite: bool = False) -> PruneConfig:
        """The :class:`PruneConfig` of stage ``index``: the run's data and scoring, the stage's
        target and the ``search`` settings (the run's, then the stage's own).

        Args:
            index: the stage.
            model: the model the stage prunes.
            target: the target to use (default :meth:`stage_target`; a run passes it with a
                ``target_params`` ratio turned into a count of the original's parameters);
                ``search.width_multiple`` is applied to it.
            output: the pruned model's folder.
            resume: continue an interrupted search in ``<output>.partial``.
            overwrite: replace an existing output (and a search of other settings).

        Raises:
            ConfigError: an unknown or invalid search setting, naming ``search.<key>`` or
                ``stages[i].search.<key>``.
        """
        merged, origin = self._stage_search(index)
        resolved = self.stage_target(index)
        if target is None:
            target = resolved
        elif target.target_params is not None:
            target = dataclasses.replace(target, width_multiple=resolved.width_multiple)
        data: dict[str, Any] = {"model": model, "data": self.data, "score": self.score, "target": target,
                                "search_batches": merged.get("batches", self.search_batches), "output": output,
                                "resume": resume, "overwrite": overwrite, "repair": self.repair}
        for key, name in (("distill_candidates", "search_distill_candidates"),
                          ("distill_tokens", "search_distill_tokens"), ("recover", "search_recover")):
            if key in merged:
                data[name] = merged[key]
        try:
            return _build(PruneConfig, data)
        except ConfigError as err:
            key, sep, rest = str(err).partition(":")
            short = {"search_batches": "batches", "search_distill_candidates": "distill_candidates",
                     "search_distill_tokens": "distill_tokens"}.get(key)
            if short is None and key.startswith("search_recover."):
                short = "recover." + key[len("search_recover."):]
            if short is None:
                raise
            if short == "batches" and "batches" not in merged:
                raise ConfigError(f"search_batches:{rest}") from None
            raise ConfigError(f"{origin.get(short.split('.')[0], 'search')}.{short}:{rest}") from None

    def stage_recover_config(self, index: int, *, student: ModelConfig, teacher: ModelConfig, output: str,
                             resume: bool = False) -> "RecoverConfig":
        """The :class:`RecoverConfig` of stage ``index``: ``recover`` defaults, the stage's
        overrides, and what the run sets (student, teacher, data, tokens, output).

        Raises:
            ConfigError: a key the run sets, an unknown key, or an invalid value; the
                message names ``recover.<key>`` or ``stages[i].recover.<key>``.
        """
        stage = self.stages[index]
        allowed = [f.name for f in dataclasses.fields(RecoverConfig) if f.name not in RUN_SETS_RECOVER_KEYS]
        for where, mapping in (("recover", self.recover), (f"stages[{index}].recover", stage.recover)):
            for key in mapping:
                if key in RUN_SETS_RECOVER_KEYS:
                    raise ConfigError(f"{where}.{key}: set by the run for every stage; remove it")
                if key not in allowed:
                    raise ConfigError(f"{where}.{key}: unknown key; allowed keys of {where}: {', '.join(allowed)}")
        merged = _merge(dict(self.recover), dict(stage.recover))
        merged.update(student=student, teacher=teacher, data=self.data, tokens=stage.tokens, output=output,
                      resume=resume, overwrite=False)
        try:
            return _build(RecoverConfig, merged)
        except ConfigError as err:
            key = str(err).partition(":")[0].split(".")[0]
            if key == "tokens":
                raise ConfigError(f"stages[{index}].{err}") from None
            where = f"stages[{index}].recover" if key in stage.recover else "recover"
            raise ConfigError(f"{where}.{err}") from None


# ----------------------------------------------------------------------------------------
# Building configs from YAML + overrides


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the field type ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{path}: must not be empty")
    if typing.get_origin(inner) in (Union, types.UnionType) and set(typing.get_args(inner)) == {bool, str}:
        text = str(value).strip().lower()  # bool | str ("auto" or a switch): true / false become bools
        return value if isinstance(value, bool) else {"true": True, "false": False}.get(text, str(value))
    if _is_dataclass_type(inner):
        if isinstance(value, inner):
            return value
        if isinstance(value, str) and hasattr(inner, "parse"):  # --data-mix PATH=WEIGHT
            try:
                return inner.parse(value)
            except ValueError:
                raise ConfigError(f"{path}: expected PATH=WEIGHT, got {value!r}") from None
            except ConfigError as err:
                raise ConfigError(f"{path}.{err}") from None
        if isinstance(value, str) and "source" in {f.name for f in dataclasses.fields(inner)}:
            value = {"source": value}
        if inner is DataConfig and isinstance(value, (list, tuple)):  # data: [{source, weight}, ...]
            value = {"mixture": list(value)}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {inner.__name__} keys, got {value!r}")
        return _build(inner, value, path)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            text = str(value).replace("_", "").strip()
            mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:].lower())
            if mult:
                return int(float(text[:-1]) * mult)
            return int(text)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            text = str(value).replace("_", "").strip()
            mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:].lower())
            if mult:
                return float(text[:-1]) * mult
            return float(text)
        if inner is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if inner is dict or typing.get_origin(inner) is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if typing.get_origin(inner) is tuple:
            (item_tp, *_rest) = typing.get_args(inner)
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            indexed = _is_dataclass_type(item_tp)
            return tuple(_coerce(v, item_tp, f"{path}[{i}]" if indexed else path) for i, v in enumerate(value))
    except (TypeError, ValueError):
        name = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"{path}: expected {name}, got {value!r}") from None
    return value


def _build(cls: type, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key; allowed keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix:
            raise ConfigError(f"{prefix}.{err}") from None
        raise


def _merge(base: dict, extra: dict, path: str = "") -> dict:
    """``extra`` over ``base``, nested dicts merged key by key. A dict of index keys over a list
    (``stages.0.tokens=32k`` parses to ``{"stages": {"0": {"tokens": "32k"}}}``) merges into
    that item of the list and keeps the others.

    Raises:
        ConfigError: an index outside the list, or a key of a non-empty list without an index.
    """
    out = dict(base)
    for key, value in extra.items():
        where = f"{path}{key}"
        if isinstance(value, list) and isinstance(out.get(key), dict) and "mixture" in out[key]:
            value = {"mixture": value, "source": None}  # data: [{source, weight}, ...] keeps the other data keys
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}.")
        elif isinstance(value, dict) and value and isinstance(out.get(key), (list, tuple)) \
                and all(isinstance(k, str) and k.isdigit() for k in value):
            items = list(out[key])
            for index, item in value.items():
                i = int(index)
                if i >= len(items):
                    raise ConfigError(f"{where}.{index}: no such item; {where} has {len(items)} "
                                      f"(indices 0 to {len(items) - 1})")
                items[i] = (_merge(items[i], item, f"{where}.{index}.")
                            if isinstance(item, dict) and isinstance(items[i], dict) else item)
            out[key] = items
        elif isinstance(value, dict) and value and isinstance(out.get(key), (list, tuple)) and out[key]:
            sub = next(iter(value))
            raise ConfigError(f"{where}.{sub}: {where} is a list; address one item by its index "
                              f"({where}.0.{sub}=...)")
        else:
            out[key] = value
    return out


def _defaults_as_dict(cls: type) -> dict:
    """The defaults of ``cls`` as a nested dict, so overrides of a nested key keep the
    other defaults of that nested dataclass (e.g. eval's ``data.shuffle=False``)."""
    return to_dict(_instantiate_defaults(cls))


def declared_defaults(cls: type) -> dict[str, Any]:
    """``{field: default}`` of the fields of config class ``cls`` that declare one (factories called)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            values[f.name] = f.default_factory()  # type: ignore[misc]
    return values


def _instantiate_defaults(cls: type):
    obj = object.__new__(cls)
    for key, value in declared_defaults(cls).items():
        object.__setattr__(obj, key, value)
    return obj


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": "1"}, "c": "x"}``.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def build_config(cls: type, config_file: str | Path | None = None, overrides: dict | list[str] | None = None):
    """Build a frozen config from defaults, an optional YAML file and overrides.

    Args:
        cls: the config dataclass (e.g. :class:`EvalConfig`).
        config_file: YAML file with a (nested) mapping of keys.
        overrides: nested dict, or ``key.sub=value`` strings; they win over the file.

    Returns:
        An instance of ``cls``, validated.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value.
    """
    data = _defaults_as_dict(cls)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of keys, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        data = _merge(data, overrides)
    return _build(cls, data)


def to_dict(config: Any) -> Any:
    """A JSON/YAML-ready nested dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    return config

"""Blockwise local distillation: each student block learns its teacher span from the teacher's activations.

Puzzle (Bercovich et al., arXiv 2411.19146, sec. 3) trains every child block on the parent's
activations to reproduce the parent block's output ("blockwise local distillation", BLD)
with the normalized MSE :func:`normalized_mse`, then distils the assembled child globally.
Here the child is a (depth-)pruned student and the stage runs before the global logit
distillation of ``recover`` (``blockwise_tokens``):

* the block map (:class:`BlockMap`, :func:`block_map`): student layer ``i`` replaces the
  teacher span ``[layers[i], layers[i+1])`` (the last one to the end), where ``layers``
  are the teacher layers the pruning plan kept (``minicompress.json``, composed over a
  run's stages; an explicit ``blockwise_layers``; the identity for a student of the
  teacher's depth). The first span starts at teacher layer 0 whatever ``layers[0]``: the
  student's first layer always reads the embedding, so the spans tile the teacher.
* data of a block: its input is the teacher's residual stream entering its span, its
  target the stream leaving it (the last span: the last layer's output, before the final
  norm), restricted to the plan's kept hidden channels (times ``sqrt(H_s / H_t)`` for
  Gemma's scaled embeddings, the factor the student's own stream carries).
* a step: one teacher forward per micro batch (no LM head, no grad) gives every block's
  input and target; the blocks are then streamed one at a time, forward and backward of
  block ``i`` on its detached input before block ``i + 1``, so activation memory is one
  block's and the vocabulary head and its loss are never computed. Only the decoder
  layers train (embeddings, final norm and head are untouched); each block's gradient is
  clipped on its own (the blocks are independent problems). Rotary embeddings and masks
  are what the student's own forward hands each layer (:func:`layer_kwargs`), so
  sliding-window layers (Gemma 3, Qwen 2) get theirs.

Nothing here reads or writes disk or knows ranks; :mod:`minicompress.recipes.recover`
places the models, checkpoints the stage and records it (``recovery.blockwise``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .. import arch
from ..config import RecoverConfig
from ..data.rows import TrainingData
from ..errors import MinicompressError
from ..measure import synchronize
from ..runtime import autocast_context, model_device
from .loop import Schedule, StepRuntime, batch_positions, default_warmup_steps, evaluate_on_ranks, make_optimizer

#: The shape keys of a pruning plan's ``original`` (the model a plan was made from).
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "num_hidden_layers", "head_dim")


# ----------------------------------------------------------------------------------------
# The block map


@dataclass(frozen=True)
class BlockMap:
    """Which teacher layers each student layer replaces, and how the residual streams relate.

    Attributes:
        layers: for each student layer, the teacher layer its span starts at (strictly
            increasing; the plan's kept layers); span ``i`` is ``[layers[i], layers[i+1])``,
            the first starts at 0 and the last ends at ``teacher_layers``.
        teacher_layers: the teacher's depth.
        channels: the teacher hidden channels the student's stream keeps (None: all).
        scale: the student's stream is ``scale * teacher_stream[..., channels]`` (Gemma's
            ``sqrt(hidden_size)`` embedding scale after a hidden-size prune; else 1).
    """

    layers: tuple[int, ...]
    teacher_layers: int
    channels: tuple[int, ...] | None = None
    scale: float = 1.0

    def spans(self) -> list[tuple[int, int]]:
        """``[(start, stop)]`` teacher layers of each student block (they tile ``[0, teacher_layers)``)."""
        starts = (0,) + tuple(self.layers[1:])
        stops = tuple(self.layers[1:]) + (self.teacher_layers,)
        return list(zip(starts, stops))

    def to_dict(self) -> dict:
        """JSON-ready (the provenance record of the stage)."""
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["channels"] = None if self.channels is None else len(self.channels)
        out["spans"] = [list(s) for s in self.spans()]
        return out


def _shape(config: Any) -> dict[str, int]:
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": arch.num_kv_heads(config),
            "num_hidden_layers": config.num_hidden_layers, "head_dim": arch.head_dim(config)}


def _plan_to_teacher(provenance: dict | None, teacher_shape: dict) -> tuple[list[int], list[int]] | None:
    """Kept teacher layers and channels, composed over the chain of pruning plans in
    ``provenance`` (each ``source_provenance`` is the pruned model's source) up to the plan
    made from a model of the teacher's shape; None when no plan reaches it."""
    layers = channels = None
    record = provenance
    while isinstance(record, dict) and isinstance(record.get("plan"), dict):
        plan = record["plan"]
        layers = list(plan["layers"]) if layers is None else [plan["layers"][j] for j in layers]
        channels = list(plan["channels"]) if channels is None else [plan["channels"][c] for c in channels]
        if {k: plan["original"].get(k) for k in _SHAPE_KEYS} == teacher_shape:
            return layers, channels
        record = record.get("source_provenance")
    return None


def block_map(student_config: Any, teacher_config: Any, *, provenance: dict | None = None,
              layers: tuple[int, ...] | list[int] = ()) -> BlockMap:
    """The :class:`BlockMap` of a student and its teacher.

    Args:
        student_config: the student's transformers config.
        teacher_config: the teacher's.
        provenance: the student's ``minicompress.json`` (its ``plan`` and the plans of its
            sources name the kept teacher layers and hidden channels), or None.
        layers: ``blockwise_layers``: the teacher layer each student layer starts at (empty:
            from the plan, or the identity for a student of the teacher's depth).

    Raises:
        MinicompressError: ``layers`` that do not fit the student or the teacher, or no way
            to map the student to the teacher; one line naming ``blockwise_layers``.
    """
    n, t = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    hs, ht = student_config.hidden_size, teacher_config.hidden_size
    found = _plan_to_teacher(provenance, _shape(teacher_config))
    plan_layers, channels = found if found is not None else (None, None)
    if layers:
        layers = [int(i) for i in layers]
        if len(layers) != n:
            raise MinicompressError(f"blockwise_layers: {len(layers)} teacher layers given for a student of {n} "
                                    f"layers; give one teacher layer index per student layer")
        if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= t:
            raise MinicompressError(f"blockwise_layers: {layers} must be strictly increasing teacher layer indices "
                                    f"in 0..{t - 1} (the teacher has {t} layers)")
    elif plan_layers is not None:
        layers = plan_layers
    elif n == t:
        layers = list(range(t))
    else:
        raise MinicompressError(f"blockwise_layers: no pruning plan in the student's minicompress.json maps its {n} "
                                f"layers to the teacher's {t}; give --blockwise-layers (the teacher layer each "
                                "student layer starts at)")
    if hs != ht and channels is None:
        raise MinicompressError(f"blockwise_layers: the student's hidden size {hs} differs from the teacher's {ht} "
                                "and no pruning plan in the student's minicompress.json names the kept channels")
    if channels is not None and len(channels) != hs:
        raise MinicompressError(f"blockwise_layers: the pruning plan keeps {len(channels)} hidden channels, the "
                                f"student has {hs}")
    if channels is not None and channels == list(range(ht)):
        channels = None
    scale = math.sqrt(hs / ht) if arch.get_adapter(student_config).scaled_embeddings else 1.0
    return BlockMap(tuple(layers), t, None if channels is None else tuple(channels), scale)


# ----------------------------------------------------------------------------------------
# The loss and the activations


def normalized_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Puzzle's normalized MSE of a block: ``mean((output - target)^2) / mean(target^2)``.

    ``MSE(o_child, o_parent) / MSE(o_parent, 0)`` over every element of the micro batch
    (Bercovich et al., arXiv 2411.19146, sec. 3), where the outputs are the residual stream
    leaving the block: scale-free, so blocks deep in the stream (larger norms) weigh as
    much as early ones. 0 when the block reproduces its target.

    Args:
        output: ``[B, L, H]`` the student block's output.
        target: ``[B, L, H]`` the teacher span's output.

    Returns:
        A float32 scalar.
    """
    output, target = output.float(), target.float()
    return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _hidden(out: Any) -> torch.Tensor:
    """A decoder layer's output hidden states (transformers 5 returns the tensor; older a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_kwargs(model: torch.nn.Module, input_ids: torch.Tensor, autocast: str = "none") -> list[tuple[tuple, dict]]:
    """The extra arguments each decoder layer of ``model`` receives in its own forward.

    One no-grad forward of ``model.model`` with a pre-hook on every layer records what
    transformers passes besides the hidden states (``position_embeddings`` from
    ``rotary_emb``, the causal or sliding-window mask of the layer's type, ``position_ids``,
    ``cache=None``), so a layer called alone computes what it computes inside the model.
    They depend on the shape of ``input_ids``, not its tokens.

    Args:
        model: a ``*ForCausalLM``.
        input_ids: ``[B, L]`` on the model's device.
        autocast: ``none`` or ``bfloat16``.

    Returns:
        ``[(args after the hidden states, kwargs)]``, one per decoder layer.
    """
    layers = arch.decoder_layers(model)
    seen: list[tuple[tuple, dict] | None] = [None] * len(layers)

    def record(i):
        def hook(module, args, kwargs):
            seen[i] = (tuple(args[1:]), dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), autocast_context(input_ids.device, autocast):
            model.model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def teacher_states(teacher: torch.nn.Module, input_ids: torch.Tensor, bmap: BlockMap, *, device: torch.device,
                   autocast: str = "none") -> list[torch.Tensor]:
    """The teacher's residual stream at the block boundaries, in the student's channels.

    One no-grad forward of ``teacher.model`` (no LM head) with hooks on the layers that
    start a span and on the last layer (its output, before the final norm).

    Args:
        teacher: the frozen teacher ``*ForCausalLM``.
        input_ids: ``[B, L]``.
        bmap: the block map.
        device: where the states go (the student's device).
        autocast: ``none`` or ``bfloat16``.

    Returns:
        ``n + 1`` float32 tensors ``[B, L, H_student]``: entry ``i`` is block ``i``'s input
        and entry ``i + 1`` its target.
    """
    spans = bmap.spans()
    starts = {start: i for i, (start, _) in enumerate(spans)}
    layers = arch.decoder_layers(teacher)
    states: list[torch.Tensor | None] = [None] * (len(spans) + 1)
    channels = None if bmap.channels is None else torch.tensor(bmap.channels, device=device)

    def keep(h: torch.Tensor) -> torch.Tensor:
        h = h.detach().to(device=device, dtype=torch.float32)
        if channels is not None:
            h = h.index_select(-1, channels)
        return h * bmap.scale if bmap.scale != 1.0 else h

    def entering(i):
        def hook(module, args, kwargs):
            states[i] = keep(args[0] if args else kwargs["hidden_states"])
        return hook

    def leaving(module, args, kwargs, out):
        states[-1] = keep(_hidden(out))

    handles = [layers[j].register_forward_pre_hook(entering(i), with_kwargs=True) for j, i in starts.items()]
    handles.append(layers[bmap.teacher_layers - 1].register_forward_hook(leaving, with_kwargs=True))
    t_device = model_device(teacher)
    try:
        with torch.no_grad(), autocast_context(t_device, autocast):
            teacher.model(input_ids=input_ids.to(t_device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return states


def _check_maps(student: torch.nn.Module, teacher: torch.nn.Module, bmap: BlockMap) -> None:
    n, t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if len(bmap.layers) != n or bmap.teacher_layers != t:
        raise MinicompressError(f"blockwise_layers: the block map is for {len(bmap.layers)} student and "
                                f"{bmap.teacher_layers} teacher layers, the models have {n} and {t}")


@torch.no_grad()
def evaluate_blocks(student: torch.nn.Module, teacher: torch.nn.Module, bmap: BlockMap, rows: torch.Tensor, *,
                    batch_size: int = 4, autocast: str = "none") -> list[float]:
    """Each block's normalized MSE on ``rows``, every block fed the teacher's input.

    Summed over batches before dividing (``sum (o - y)^2 / sum y^2``), so the number does
    not depend on ``batch_size``.

    Args:
        student: the student (mode restored afterwards).
        teacher: the frozen teacher.
        bmap: the block map.
        rows: ``[E, L]`` held-out sequences.
        batch_size: sequences per forward.
        autocast: ``none`` or ``bfloat16``.

    Returns:
        ``[n]`` floats (empty without rows).
    """
    if rows is None or rows.shape[0] == 0:
        return []
    _check_maps(student, teacher, bmap)
    device = model_device(student)
    layers = arch.decoder_layers(student)
    err = torch.zeros(len(layers), dtype=torch.float64)
    norm = torch.zeros(len(layers), dtype=torch.float64)
    was_training = student.training
    student.eval()
    try:
        for batch in rows.split(batch_size):
            ids = batch.to(device)
            states = teacher_states(teacher, ids, bmap, device=device, autocast=autocast)
            extra = layer_kwargs(student, ids, autocast)
            for i, layer in enumerate(layers):
                with autocast_context(device, autocast):
                    out = _hidden(layer(states[i], *extra[i][0], **extra[i][1])).float()
                err[i] += float((out - states[i + 1]).pow(2).sum())
                norm[i] += float(states[i + 1].pow(2).sum())
    finally:
        student.train(was_training)
    return (err / norm.clamp_min(1e-12)).tolist()


# ----------------------------------------------------------------------------------------
# The loop


def blockwise_schedule(config: RecoverConfig) -> Schedule:
    """The stage's :class:`~minicompress.distillation.loop.Schedule`: ``blockwise_tokens`` in
    steps of ``global_batch_tokens``, peak ``blockwise_lr`` (default ``lr``), warmup a tenth
    of its steps (1 to 10), cosine to ``min_lr``."""
    total = config.blockwise_tokens // config.global_batch_tokens
    return Schedule(lr=config.blockwise_lr if config.blockwise_lr is not None else config.lr, min_lr=config.min_lr,
                    warmup_steps=default_warmup_steps(total), total_steps=total,
                    tokens_per_step=config.global_batch_tokens, grad_clip=config.grad_clip)


def train_blocks(student: torch.nn.Module, teacher: torch.nn.Module, bmap: BlockMap,
                 batches: Callable[[int], list[torch.Tensor]], optimizer: torch.optim.Optimizer, schedule: Schedule,
                 on_step: Callable[[dict], None] | None = None, *, device: torch.device, start_step: int = 0,
                 autocast: str = "none") -> None:
    """Train every student block on its teacher span for ``schedule.total_steps - start_step`` steps.

    Each step: set the learning rate; for each micro batch, one teacher forward gives the
    block boundaries (:func:`teacher_states`), then block by block the forward on the
    detached teacher input, :func:`normalized_mse` to the target divided by the micro
    batches of the step, backward, and the block's activations are freed; then each
    block's gradient is clipped to ``schedule.grad_clip`` on its own and AdamW steps.

    Args:
        student: the student in train mode (one process).
        teacher: the frozen teacher.
        bmap: the block map (:func:`block_map`).
        batches: ``batches(step)`` -> the step's micro batches ``[[B, L] int64]``, a pure
            function of the step.
        optimizer: AdamW over the student's decoder-layer parameters.
        schedule: learning rate and step arithmetic.
        on_step: called after every step with its record: ``stage`` (``blockwise``),
            ``step``, ``tokens``, ``lr``, ``nmse`` (the mean over blocks), ``nmse_blocks``,
            ``grad_norm`` (the largest block's, before clipping), ``tokens_per_s``,
            ``step_seconds``.
        device: the student's device.
        start_step: the first step to run (a resumed stage's checkpoint step).
        autocast: ``none`` or ``bfloat16``.

    Raises:
        MinicompressError: maps that do not fit the models, or a non-finite gradient norm.
    """
    _check_maps(student, teacher, bmap)
    layers = arch.decoder_layers(student)
    block_params = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
    extra: dict[tuple, list] = {}  # layer arguments per input shape (they do not depend on the tokens)
    max_norm = schedule.grad_clip if schedule.grad_clip > 0 else float("inf")
    for step in range(start_step, schedule.total_steps):
        t0 = time.perf_counter()
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = batches(step)
        sums = [0.0] * len(layers)
        for ids in micro:
            ids = ids.to(device)
            key = tuple(ids.shape)
            if key not in extra:
                extra[key] = layer_kwargs(student, ids, autocast)
            states = teacher_states(teacher, ids, bmap, device=device, autocast=autocast)
            for i, layer in enumerate(layers):  # streamed: one block's activations at a time
                with autocast_context(device, autocast):
                    out = _hidden(layer(states[i], *extra[key][i][0], **extra[key][i][1]))
                loss = normalized_mse(out, states[i + 1])
                if loss.requires_grad:
                    (loss / len(micro)).backward()
                sums[i] += float(loss.detach()) / len(micro)
                del out, loss
            del states
        norms = [float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0 for params in block_params]
        if not all(math.isfinite(v) for v in norms):
            raise MinicompressError(f"blockwise_lr: the gradient norm of a block is not finite at step {step + 1}; "
                                    "lower blockwise_lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = time.perf_counter() - t0
        if on_step is not None:
            on_step({"stage": "blockwise", "step": step + 1, "tokens": (step + 1) * schedule.tokens_per_step, "lr": lr,
                     "nmse": sum(sums) / len(sums), "nmse_blocks": sums, "grad_norm": max(norms),
                     "tokens_per_s": schedule.tokens_per_step / seconds, "step_seconds": seconds})


@dataclass
class BlockwiseState:
    """What the stage's hooks read and restore.

    Attributes:
        optimizer: AdamW over the student's decoder-layer parameters.
        start_step: the first step to run (a restored checkpoint's step).
        elapsed: training seconds so far.
        before: ``{"nmse_blocks", "metrics"}`` measured before the stage (restored on resume).
    """

    optimizer: torch.optim.Optimizer
    start_step: int = 0
    elapsed: float = 0.0
    before: dict | None = None


def blockwise_batches(data: TrainingData, *, micro_batch_size: int, accum_steps: int,
                      offset: int) -> Callable[[int], list[torch.Tensor]]:
    """The stage's micro batches: the training stream from position ``offset`` on.

    The recipe passes the positions the global stage reads (``global steps * accum_steps *
    micro_batch_size``), so the global stage reads exactly the rows a run without the
    stage reads and the blocks learn from the rows after them.
    """

    def batches(step: int) -> list[torch.Tensor]:
        return [data.rows(batch_positions(step, m, micro_batch_size=micro_batch_size, accum_steps=accum_steps)
                          + offset) for m in range(accum_steps)]

    return batches


def blockwise_distill(student: torch.nn.Module, teacher: torch.nn.Module, data: TrainingData, config: RecoverConfig,
                      bmap: BlockMap, *, runtime: StepRuntime, offset: int, accum_steps: int,
                      restore: Callable[[BlockwiseState], None] | None = None,
                      on_step: Callable[[dict, BlockwiseState], None] | None = None) -> dict:
    """The blockwise stage in memory: evaluate, :func:`train_blocks`, evaluate.

    Args:
        student: the placed student in train mode (one process); its decoder layers train.
        teacher: the placed, frozen teacher.
        data: held-out and training rows.
        config: the recovery settings (``blockwise_tokens``, ``blockwise_lr``, ``lr``,
            ``weight_decay``, ``micro_batch_size``, ``eval_batch_size``, ``loss.chunk_size``).
        bmap: the block map.
        runtime: the student's device and autocast (``none`` or ``bfloat16``).
        offset: the stream position of the stage's first row (:func:`blockwise_batches`).
        accum_steps: micro batches per step.
        restore: called once the optimizer exists; loads a checkpoint into ``state`` and
            sets ``start_step``, ``elapsed`` and ``before``.
        on_step: called with each step's record and the state.

    Returns:
        ``{"before": {"nmse_blocks", "metrics"}, "nmse_after", "elapsed", "start_step",
        "steps"}``: per-block normalized MSE on the held-out rows before and after and the
        held-out metrics of the student before the stage (perplexity, KL to the teacher).
    """
    params = [p for layer in arch.decoder_layers(student) for p in layer.parameters() if p.requires_grad]
    if not params:
        raise MinicompressError("blockwise_tokens: the student's decoder layers have no trainable parameters")
    schedule = blockwise_schedule(config)
    state = BlockwiseState(optimizer=make_optimizer(params, schedule.lr, config.weight_decay))
    eval_ids = data.eval_ids

    def blocks() -> list[float]:
        return evaluate_blocks(student, teacher, bmap, eval_ids, batch_size=config.eval_batch_size,
                               autocast=runtime.autocast)

    if restore is not None:
        restore(state)
    if state.before is None:
        metrics = evaluate_on_ranks(student, eval_ids, teacher=teacher, batch_size=config.eval_batch_size,
                                    autocast=runtime.autocast, chunk_size=config.loss.chunk_size)
        state.before = {"nmse_blocks": blocks(), "metrics": metrics}

    def step_done(record: dict) -> None:
        state.elapsed += record.pop("step_seconds")
        record["elapsed_s"] = state.elapsed
        if on_step is not None:
            on_step(record, state)

    batches = blockwise_batches(data, micro_batch_size=config.micro_batch_size, accum_steps=accum_steps,
                                offset=offset)
    train_blocks(student, teacher, bmap, batches, state.optimizer, schedule, step_done, device=runtime.device,
                 start_step=state.start_step, autocast=runtime.autocast)
    return {"before": state.before, "nmse_after": blocks(), "elapsed": state.elapsed,
            "start_step": state.start_step, "steps": schedule.total_steps}

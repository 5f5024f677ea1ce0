"""Activation-based importance of heads, neurons, embedding channels and layers.

Implements the importance estimation of Minitron (Muralidharan et al., "Compact Language
Models via Pruning and Knowledge Distillation", arXiv 2407.14679, sec. 2.2) on a small
calibration set, with forward hooks only (the model is never modified):

* attention head ``h`` of layer ``l``: the L2 norm of the head's attention output (the
  slice of ``o_proj``'s input that belongs to head ``h``), per token;
* FFN neuron ``i``: the magnitude of the activation entering ``down_proj``
  (``act(gate) * up``), per token;
* embedding channel ``c``: the magnitude of channel ``c`` at the output of every norm
  that feeds a block (attention and MLP input norms), summed over layers;
* layers: Block Importance (ShortGPT, arXiv 2403.03853), ``1 - cos(input, output)`` of a
  block, the angular distance between every pair of block boundaries (to find the best
  contiguous block of ``k`` layers, Gromov et al., arXiv 2403.17887), and the increase of
  the LM loss when one layer is skipped.

Per-token values are aggregated over the sequence and then over the batch with ``mean``,
``l2`` or ``var``; the default is the paper's best (sequence mean, batch L2). Statistics
are running float32 sums, so no activation is stored across batches; padding positions
(``attention_mask == 0``) are excluded; hooks are always removed, also on error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import compute_logits, decoder_layers, get_adapter, head_dim
from ..distributed import run_in_root
from ..errors import MinicompressError

SCORES_FILE = "scores.safetensors"
META_FILE = "scores.json"


def reduce_sequence(values: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Reduce ``|values|`` over the sequence axis per sample, ignoring masked tokens.

    Args:
        values: ``[B, T, D]`` activations (the importance of a token is ``|value|``).
        mask: ``[B, T]`` 1 for real tokens, or None.
        how: ``mean`` (mean of ``|x|``), ``l2`` (L2 norm) or ``var`` (variance of ``|x|``).

    Returns:
        ``[B, D]`` float32.
    """
    x = values.float()
    if mask is None:
        n = torch.full((x.shape[0], 1), float(x.shape[1]), device=x.device)
    else:
        m = mask.to(x.device, x.dtype)
        x = x * m[..., None]
        n = m.sum(1, keepdim=True).clamp_min(1.0)
    if how == "l2":
        return torch.linalg.vector_norm(x, ord=2, dim=1)
    mean = torch.linalg.vector_norm(x, ord=1, dim=1) / n
    if how == "mean":
        return mean
    return (torch.linalg.vector_norm(x, ord=2, dim=1).square() / n - mean.square()).clamp_min(0.0)


class RunningAggregate:
    """Two-level (sequence, then batch) aggregation with running sums.

    ``update`` takes per-token values ``[B, T, D]`` and a mask ``[B, T]``; each sample's
    tokens are reduced with ``sequence`` (mean, l2, var), and the per-sample vectors are
    accumulated as count, sum and sum of squares, so ``result`` can apply ``batch``
    (mean, l2, var) at the end.
    """

    def __init__(self, sequence: str = "mean", batch: str = "l2"):
        self.sequence, self.batch = sequence, batch
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch of per-token magnitudes.

        Args:
            values: ``[B, T, D]`` per-token activations; their absolute value is the
                per-token importance (never materialised: fused norms reduce ``T``).
            mask: ``[B, T]`` 1 for real tokens (None: all real).
        """
        self.add_samples(reduce_sequence(values, mask, self.sequence))

    def add_samples(self, per_sample: torch.Tensor) -> None:
        """Add already sequence-reduced values ``[B, D]``."""
        per_sample = per_sample.float()
        s, sq = per_sample.sum(0), per_sample.square().sum(0)
        if self.sum is None:
            self.sum, self.sumsq = s, sq
        else:
            self.sum += s
            self.sumsq += sq
        self.count += per_sample.shape[0]

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum ``count``, ``sum`` and ``sumsq`` over ranks (every rank has seen a batch).

        All three batch aggregations are functions of these sums, so :meth:`result`
        then equals one process's over the batches of all ranks.
        """
        self.sum, self.sumsq = reduce(self.sum), reduce(self.sumsq)
        self.count = int(reduce(torch.tensor(float(self.count), dtype=torch.float64)))

    def result(self) -> torch.Tensor:
        """``[D]`` float32 aggregated importance."""
        if self.sum is None:
            raise MinicompressError("scoring: no calibration batch was seen")
        if self.batch == "mean":
            out = self.sum / self.count
        elif self.batch == "l2":
            out = self.sumsq.sqrt()
        else:
            out = (self.sumsq / self.count - (self.sum / self.count).square()).clamp_min(0.0)
        return out.cpu()


@dataclass
class ImportanceScores:
    """Importance of every prunable unit of a model.

    Attributes:
        heads: ``[L, num_attention_heads]`` per-layer query-head importance.
        neurons: ``[L, intermediate_size]`` per-layer FFN neuron importance.
        channels: ``[hidden_size]`` embedding channel importance.
        block_distance: ``[L+1, L+1]`` mean angular distance ``1 - cos`` between the
            residual stream at block boundaries ``i`` and ``j`` (boundary ``i`` is the
            input of layer ``i``); Block Importance of layer ``i`` is ``[i, i+1]``.
        layer_loss: ``[L]`` LM loss increase when layer ``i`` alone is skipped (or None).
        base_loss: LM loss of the full model on the loss samples (or None).
        norm_energy: ``[L, K, hidden_size]`` mean share of each channel in the squared
            norm of the input of each of the ``K`` hidden-size norms of a layer
            (``adapter.all_layer_norms`` order); used to keep RMSNorm outputs at their
            original scale after channel pruning.
        final_norm_energy: ``[hidden_size]`` the same for the final norm.
        meta: JSON-able facts: model type, sizes, samples, aggregation.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    channels: torch.Tensor
    block_distance: torch.Tensor
    layer_loss: torch.Tensor | None = None
    base_loss: float | None = None
    norm_energy: torch.Tensor | None = None
    final_norm_energy: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def block_importance(self) -> torch.Tensor:
        """``[L]`` Block Importance ``1 - cos(input, output)`` of each layer."""
        n = self.block_distance.shape[0] - 1
        return torch.stack([self.block_distance[i, i + 1] for i in range(n)])

    def contiguous_block(self, k: int) -> tuple[int, float]:
        """The block of ``k`` consecutive layers whose removal changes the stream least.

        Returns:
            ``(start, distance)``: layers ``start .. start+k-1``, and ``1 - cos`` between
            the stream before and after that block.
        """
        n = self.block_distance.shape[0] - 1
        if not 0 < k <= n:
            raise MinicompressError(f"num_hidden_layers: cannot drop a block of {k} of {n} layers")
        dist = torch.stack([self.block_distance[i, i + k] for i in range(n - k + 1)])
        start = int(dist.argmin())
        return start, float(dist[start])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"heads": self.heads, "neurons": self.neurons, "channels": self.channels,
               "block_distance": self.block_distance}
        for key in ("layer_loss", "norm_energy", "final_norm_energy"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {k: v.float().contiguous() for k, v in out.items()}

    def digest(self) -> str:
        """sha256 of the score tensors (recorded in a pruned model's provenance)."""
        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def save(self, folder: str | Path) -> None:
        """Write ``scores.safetensors`` and ``scores.json`` into ``folder``."""
        folder = Path(folder)
        save_file(self.tensors(), str(folder / SCORES_FILE))
        meta = dict(self.meta, base_loss=self.base_loss, digest=self.digest())
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ImportanceScores":
        """Read scores written by :meth:`save`.

        Raises:
            MinicompressError: the folder has no scores.
        """
        folder = Path(folder)
        if not (folder / SCORES_FILE).is_file() or not (folder / META_FILE).is_file():
            raise MinicompressError(f"--scores: {folder} has no {SCORES_FILE} / {META_FILE} (run minicompress score)")
        t = load_file(str(folder / SCORES_FILE))
        meta = json.loads((folder / META_FILE).read_text())
        return cls(heads=t["heads"], neurons=t["neurons"], channels=t["channels"],
                   block_distance=t["block_distance"], layer_loss=t.get("layer_loss"),
                   norm_energy=t.get("norm_energy"), final_norm_energy=t.get("final_norm_energy"),
                   base_loss=meta.pop("base_loss", None), meta=meta)

    def check_compatible(self, config: Any) -> None:
        """Raise if these scores were not computed for a model of ``config``'s shape."""
        expected = (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size, config.hidden_size)
        found = (self.heads.shape[0], self.heads.shape[1], self.neurons.shape[1], self.channels.shape[0])
        if expected != found:
            raise MinicompressError(
                f"--scores: scores are for (layers, heads, ffn, hidden) = {found}, the model has {expected}"
            )


@contextlib.contextmanager
def removing_hooks() -> Iterator[list]:
    """A list to append hook handles to; every handle is removed on exit, also on error."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


class ActivationScorer:
    """Accumulates Minitron activation importance over calibration batches.

    Use :func:`score_model` for the whole procedure; this class is the reusable part:
    ``with scorer.attached(model): model.model(ids)`` adds one batch.
    """

    def __init__(self, model: nn.Module, sequence: str = "mean", batch: str = "l2"):
        self.model = model
        self.adapter = get_adapter(model)
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.head_dim = head_dim(cfg)
        self.heads = [RunningAggregate(sequence, batch) for _ in range(self.num_layers)]
        self.neurons = [RunningAggregate(sequence, batch) for _ in range(self.num_layers)]
        self.channels = RunningAggregate(sequence, batch)
        self._channel_sum: torch.Tensor | None = None
        self._unit: torch.Tensor | None = None  # [B*T, L+1, H] normalised residual at block boundaries
        self._boundary_batch = 0
        self._boundaries_seen = 0
        self.distance_sum = torch.zeros(self.num_layers + 1, self.num_layers + 1)
        self.distance_count = 0
        n_norms = len(self.adapter.all_layer_norms)
        self.energy_sum = torch.zeros(self.num_layers, n_norms, cfg.hidden_size)
        self.final_energy_sum = torch.zeros(cfg.hidden_size)
        self.energy_tokens = 0.0
        self.mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self, mask: torch.Tensor | None = None) -> Iterator[None]:
        """Register the hooks for one forward pass; always removes them."""
        self.mask = mask
        self._channel_sum = None
        layers = decoder_layers(self.model)
        with removing_hooks() as handles:
            for i, layer in enumerate(layers):
                attn = getattr(layer, self.adapter.attn)
                mlp = getattr(layer, self.adapter.mlp)
                o_proj, down_proj = getattr(attn, self.adapter.o_proj), getattr(mlp, self.adapter.down_proj)
                handles.append(o_proj.register_forward_pre_hook(self._head_hook(i)))
                handles.append(down_proj.register_forward_pre_hook(self._neuron_hook(i)))
                for norm_name in self.adapter.input_norms:
                    handles.append(getattr(layer, norm_name).register_forward_hook(self._channel_hook))
                for k, norm_name in enumerate(self.adapter.all_layer_norms):
                    handles.append(getattr(layer, norm_name).register_forward_pre_hook(self._energy_hook(i, k)))
                handles.append(layer.register_forward_hook(self._boundary_hook(i), with_kwargs=True))
            handles.append(self.model.model.norm.register_forward_pre_hook(self._energy_hook(None, 0)))
            yield
        self._finish_batch()

    def _head_hook(self, i: int):
        def hook(module, args):
            x = args[0].detach()  # [B, T, heads * head_dim]
            per_head = torch.linalg.vector_norm(x.float().unflatten(-1, (self.num_heads, self.head_dim)), dim=-1)
            self.heads[i].update(per_head, self.mask)
        return hook

    def _neuron_hook(self, i: int):
        def hook(module, args):
            self.neurons[i].update(args[0].detach(), self.mask)
        return hook

    def _channel_hook(self, module, args, output):
        value = output.detach()
        if self.channels.sequence == "mean":  # linear: summing per-layer sequence means is exact
            value = reduce_sequence(value, self.mask, "mean")
        else:
            value = value.float().abs()
        self._channel_sum = value if self._channel_sum is None else self._channel_sum + value

    def _energy_hook(self, i: int | None, k: int):
        def hook(module, args):
            x2 = args[0].detach().float().square()  # [B, T, H]
            weight = 1.0 / x2.sum(-1).clamp_min(1e-30)  # [B, T]: each token's shares sum to 1
            if self.mask is not None:
                weight = weight * self.mask.to(weight.device, weight.dtype)
                tokens = float(self.mask.sum())
            else:
                tokens = float(weight.numel())
            total = torch.einsum("btc,bt->c", x2, weight).cpu()
            if i is None:
                self.final_energy_sum += total
                self.energy_tokens += tokens
            else:
                self.energy_sum[i, k] += total
        return hook

    def _boundary_hook(self, i: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            if i == 0:
                b, t, h = hidden_in.shape
                self._unit = torch.empty(b * t, self.num_layers + 1, h, device=hidden_in.device)
                self._unit[:, 0] = F.normalize(hidden_in.detach().float().reshape(b * t, h), dim=-1)
                self._boundary_batch = b
            self._unit[:, i + 1] = F.normalize(hidden_out.detach().float().reshape(-1, hidden_out.shape[-1]), dim=-1)
            self._boundaries_seen = i + 1
        return hook

    def _finish_batch(self) -> None:
        if self._channel_sum is not None:
            if self.channels.sequence == "mean":
                self.channels.add_samples(self._channel_sum)
            else:
                self.channels.update(self._channel_sum, self.mask)
        if self._unit is not None and self._boundaries_seen == self.num_layers:
            unit, batch = self._unit, self._boundary_batch  # [N, L+1, H] unit vectors
            m = None if self.mask is None else self.mask.reshape(-1).to(unit.device).float()
            n_tok = unit.shape[0] if m is None else float(m.sum().clamp_min(1))
            total = torch.zeros(unit.shape[1], unit.shape[1])
            for start in range(0, unit.shape[0], 1024):
                gram = torch.bmm(unit[start:start + 1024], unit[start:start + 1024].transpose(1, 2))  # cosines
                dist = 1.0 - gram
                if m is not None:
                    dist = dist * m[start:start + 1024, None, None]
                total += dist.sum(0).cpu()
            # each sample contributes its token-mean distance, weighted like a sample
            self.distance_sum += total / n_tok * batch
            self.distance_count += batch
        self._unit = None
        self._boundaries_seen = 0
        self._channel_sum = None

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every running statistic over ranks (``reduce`` sums a tensor in place).

        Per-sample sums and sums of squares, the sample-weighted block distances and the
        token-weighted norm energies are all additive, so after this :meth:`result`
        equals one process's over the batches of all ranks (up to float rounding).
        """
        for aggregate in [*self.heads, *self.neurons, self.channels]:
            aggregate.all_reduce(reduce)
        for name in ("distance_sum", "energy_sum", "final_energy_sum"):
            setattr(self, name, reduce(getattr(self, name)))
        counts = reduce(torch.tensor([self.distance_count, self.energy_tokens], dtype=torch.float64))
        self.distance_count, self.energy_tokens = int(counts[0]), float(counts[1])

    def result(self, meta: dict | None = None) -> ImportanceScores:
        """The accumulated :class:`ImportanceScores` (layer-loss fields left empty)."""
        dist = self.distance_sum / max(self.distance_count, 1)
        dist.fill_diagonal_(0.0)
        return ImportanceScores(
            heads=torch.stack([a.result() for a in self.heads]),
            neurons=torch.stack([a.result() for a in self.neurons]),
            channels=self.channels.result(),
            block_distance=dist,
            norm_energy=self.energy_sum / max(self.energy_tokens, 1.0),
            final_norm_energy=self.final_energy_sum / max(self.energy_tokens, 1.0),
            meta=dict(meta or {}),
        )


def lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            chunk_tokens: int = 2048) -> tuple[float, int]:
    """Summed next-token NLL and token count, with logits computed in chunks.

    Args:
        model: a supported ``*ForCausalLM``.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` (None: all tokens real).
        chunk_tokens: tokens per vocabulary chunk.

    Returns:
        ``(sum of NLL over scored targets, number of targets)``.
    """
    # a model sharded with FSDP2 gathers its root group (embedding, final norm, lm_head) for the call
    return run_in_root(model, lambda: _lm_loss(model, input_ids, attention_mask, chunk_tokens), reshard=True)


def _lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             chunk_tokens: int) -> tuple[float, int]:
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    valid = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].reshape(-1).bool()
    total, count = 0.0, 0
    for start in range(0, h.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        logits = compute_logits(model, h[sl]).float()
        nll = F.cross_entropy(logits, targets[sl], reduction="none")
        total += float(nll[valid[sl]].sum())
        count += int(valid[sl].sum())
    return total, count


@contextlib.contextmanager
def skip_layer(model: nn.Module, index: int) -> Iterator[None]:
    """Temporarily make decoder layer ``index`` return its input (weights untouched)."""
    layer = decoder_layers(model)[index]

    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        return (hidden_in,) + tuple(output[1:]) if isinstance(output, tuple) else hidden_in

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def count_score_forwards(batches: list, loss_batches: list | None, num_hidden_layers: int) -> int:
    """Sequences :func:`score_model` runs through the model, what its ``progress`` counts to.

    Args:
        batches: the calibration batches (``None`` entries, a sharded rank's padding, not counted).
        loss_batches: the layer-loss batches (None or empty: no layer-loss score).
        num_hidden_layers: decoder layers; the layer-loss score runs its samples once whole and
            once with each layer skipped.

    Returns:
        The activation pass's samples plus ``(num_hidden_layers + 1)`` x the layer-loss samples.
    """
    def samples(bs) -> int:
        return sum((b[0] if isinstance(b, tuple) else b).shape[0] for b in bs or () if b is not None)

    return samples(batches) + (num_hidden_layers + 1) * samples(loss_batches)


@torch.no_grad()
def score_model(model: nn.Module, batches: list[torch.Tensor], *, sequence_aggregation: str = "mean",
                batch_aggregation: str = "l2", loss_batches: list[torch.Tensor] | None = None,
                autocast: str = "none", progress=None, meta: dict | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ImportanceScores:
    """Score every head, neuron, channel and layer of ``model`` on calibration batches.

    Args:
        model: a supported ``*ForCausalLM`` (not modified; eval mode recommended).
        batches: ``[B, T]`` token batches (optionally ``(input_ids, attention_mask)`` tuples).
        sequence_aggregation: ``mean`` / ``l2`` / ``var`` over tokens of a sample.
        batch_aggregation: ``mean`` / ``l2`` / ``var`` over samples.
        loss_batches: batches for the per-layer loss increase (None or empty: skip).
        autocast: ``none`` or ``bfloat16``.
        progress: optional object with ``advance(n)`` and ``update(description=...)`` (a
            progress bar), advanced by each batch's samples: ``len(batches)`` samples, then
            ``(num_hidden_layers + 1) x`` the ``loss_batches`` samples of the layer-loss score.
        meta: extra JSON-able facts to store with the scores.
        reduce: for several ranks (torchrun), a function that sums a tensor over the
            ranks in place (:func:`minicompress.distributed.all_reduce_sum`). Each rank
            passes its own share of ``batches`` (at least one) and of ``loss_batches``
            (possibly empty; None skips the layer-loss score on every rank); the running
            sums are reduced before the batch aggregation, so every rank gets the scores
            of one process over all the batches.

    A model sharded with FSDP2 (:func:`minicompress.distributed.shard_model`) is scored
    the same way; every rank must then make the same number of forwards, so a rank with
    fewer batches pads its lists with ``None``: each ``None`` is a forward of one sample
    of its first batch whose activations and loss are discarded.

    Returns:
        :class:`ImportanceScores`.
    """
    from ..runtime import autocast_context, model_device

    device = model_device(model)
    scorer = ActivationScorer(model, sequence_aggregation, batch_aggregation)
    samples = 0
    real = [b for b in batches if b is not None]
    if not real:
        raise MinicompressError("num_samples: no calibration batch to score")
    idle = real[0][0][:1] if isinstance(real[0], tuple) else real[0][:1]  # [1, T]: an idle rank's forward
    for batch in batches:
        if batch is None:
            with autocast_context(device, autocast):
                run_in_root(model, lambda: model.model(input_ids=idle.to(device), use_cache=False), reshard=True)
            continue
        ids, mask = batch if isinstance(batch, tuple) else (batch, None)
        ids = ids.to(device)
        mask = mask.to(device) if mask is not None else None
        with scorer.attached(mask), autocast_context(device, autocast):
            run_in_root(model, lambda: model.model(input_ids=ids, attention_mask=mask, use_cache=False), reshard=True)
        samples += ids.shape[0]
        if progress is not None:
            progress.advance(ids.shape[0])
    if reduce is not None:
        scorer.all_reduce(reduce)
        samples = int(reduce(torch.tensor(float(samples), dtype=torch.float64)))
    cfg = model.config
    info = {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "intermediate_size": cfg.intermediate_size,
        "num_samples": samples,
        "seq_len": int(idle.shape[-1]),
        "sequence_aggregation": sequence_aggregation,
        "batch_aggregation": batch_aggregation,
        **(meta or {}),
    }
    scores = scorer.result(info)
    if loss_batches or (reduce is not None and loss_batches is not None):
        if progress is not None:
            progress.update(description="score (layer loss)")
        scores.base_loss, scores.layer_loss = layer_loss_increase(model, loss_batches, autocast=autocast,
                                                                  progress=progress, reduce=reduce, idle=idle)
        scores.meta["loss_samples"] = sum(b.shape[0] for b in loss_batches if b is not None)
        if reduce is not None:
            scores.meta["loss_samples"] = int(reduce(torch.tensor(float(scores.meta["loss_samples"]),
                                                                  dtype=torch.float64)))
    return scores


@torch.no_grad()
def layer_loss_increase(model: nn.Module, batches: list[torch.Tensor], autocast: str = "none",
                        progress=None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        idle: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """LM loss of the full model and the increase when each single layer is skipped.

    With ``reduce`` (several ranks, each with its share of ``batches``) the summed NLL
    and target counts are summed over ranks before dividing. A ``None`` in ``batches``
    (a sharded model's padding, see :func:`score_model`) runs ``idle`` ``[1, T]`` and
    discards its loss. ``progress`` (optional, with ``advance(n)``) advances by each real
    batch's samples, ``num_hidden_layers + 1`` times in all.

    Returns:
        ``(base_loss, [L] increase)``.
    """
    from ..runtime import autocast_context, model_device

    device = model_device(model)

    def mean_loss() -> float:
        total, count = 0.0, 0
        for ids in batches:
            if ids is None and idle is None:
                raise ValueError("layer_loss_increase: a None batch needs idle=")
            with autocast_context(device, autocast):
                s, c = lm_loss(model, (idle if ids is None else ids).to(device))
            if ids is not None:
                total, count = total + s, count + c
                if progress is not None:
                    progress.advance(ids.shape[0])
        if reduce is not None:
            total, count = reduce(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / count

    base = mean_loss()
    increase = []
    for i in range(model.config.num_hidden_layers):
        with skip_layer(model, i):
            increase.append(mean_loss() - base)
    return base, torch.tensor(increase, dtype=torch.float32)


def perplexity_from_loss(loss: float) -> float:
    """``exp(loss)``, capped to avoid overflow."""
    return math.exp(min(loss, 700.0))

"""Repairs of a freshly pruned model: closed-form weight refits on calibration activations.

Structured pruning (:mod:`minicompress.pruning.plan`) drops whole heads, FFN neurons and
layers; what the dropped parts added to the residual stream is simply lost. A repair
refits a few kept weights in closed form so that each pruned sublayer reproduces what the
original one added, before any distillation:

* ``refit`` (down_proj) and ``refit_o`` (o_proj): ridge least squares of the kept input
  columns of a linear, ``W' = argmin ||X W^T - Y||^2 + lambda ||W - W_0||^2``, with
  ``X`` the pruned student's own kept activations and ``Y`` what the original sublayer
  (all neurons / all heads) adds given the student's same input. Layers are repaired in
  order, each on the input the already repaired layers before it produce (sequential, as
  SparseGPT / GPTQ and SlimGPT do), so errors do not compound unseen. ``lambda`` is
  relative, ``damping * mean(diag(X^T X))`` (GPTQ's "percdamp"), or per input
  ``damping * (X^T X)_ii`` (``scale="diagonal"``: a few massive activations, which hold
  most of ``diag(X^T X)`` in some layers, then do not over-damp every other input, Sun et
  al., arXiv 2402.17762); ``W_0`` is zero (classic ridge) or the pruned weight (the refit
  as a damped correction of the plain prune: ``damping -> inf`` gives the plain prune
  back). Structured compensation of this kind: SlimGPT (Ling et al., arXiv 2412.18110),
  FLAP (An et al., arXiv 2312.11983, which keeps weights and adds a bias); the damping
  and the sequential order follow GPTQ (Frantar et al., arXiv 2210.17323) and SparseGPT
  (arXiv 2301.00774).
* ``flap``: FLAP's bias compensation (arXiv 2312.11983, sec. 3.3): the dropped columns'
  mean contribution becomes a bias. Here it is the least-squares intercept, ``b = mean(Y)
  - W mean(X)``, which with the student's input equal to the teacher's is exactly FLAP's
  ``W_dropped @ mean(x_dropped)``; combined with a refit, weights and intercept are solved
  jointly (centred statistics, the intercept undamped). Only families whose stock config
  can carry the bias get it: llama (``mlp_bias``, ``attention_bias``; the zero biases that
  these keys also give gate/up and q/k/v are written as zeros). llama.cpp's llama graph
  loads these optional biases, so the output still converts to GGUF.
* ``replaceme``: ReplaceMe (Shopkhoev et al., arXiv 2505.02819): each contiguous span of
  dropped layers ``s..e`` becomes a linear map ``T [H, H]`` folded into the ``down_proj``
  of the kept layer ``k = s - 1`` before it. With ``h_k = Y_k + M_k`` the output of layer
  ``k`` (``Y_k``: its residual after attention, ``M_k``: its MLP output) and ``L`` the
  output of layer ``e``, ``T = argmin ||M_k T - (L - Y_k)||^2`` (ridge towards the identity,
  which is plain dropping); the fold ``W_down' = T^T W_down`` (``b' = T^T b``) is exact:
  the new layer ``k`` outputs ``Y_k + M_k T``. What it approximates: the span's output
  ``L`` by ``Y_k + M_k T``, i.e. the span as identity on the attention residual ``Y_k``
  plus a linear map of layer ``k``'s MLP output (not ``h_k @ T``: the residual stream
  cannot carry a map of ``Y_k`` through a fold). Computed on the original model, as the
  paper does, before the plan is applied; a following refit targets the folded MLP.

The pure part (:class:`GramAccumulator`, :func:`refit_linear`, :func:`fold_span_map`,
:func:`dropped_spans`, :func:`check_repairs`) is tensor math on what it is given. The
gathering part (:func:`span_maps`, :func:`teacher_weights`, :func:`refit_layers_`) runs a
model on calibration batches it is given, with hooks, as :mod:`.scoring` does; it never
loads data or touches disk. Every weight is decided first (float64 solves) and written by
one in-place function (:func:`fold_span_maps_`, :func:`add_biases_`, ``_write_linear_``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter, decoder_layers, get_adapter, head_dim
from ..errors import MinicompressError
from .plan import PrunePlan, slice_parameter
from .scoring import removing_hooks

#: families whose stock config can give down_proj / o_proj a bias, and the key that does
BIAS_KEYS: dict[str, dict[str, str]] = {"llama": {"down_proj": "mlp_bias", "o_proj": "attention_bias"}}


# ----------------------------------------------------------------------------------------
# Solving (pure tensor math)


class GramAccumulator:
    """Streaming float64 statistics of the least-squares problem ``Y ≈ X W^T + b``.

    Holds ``G = X^T X [in, in]``, ``C = X^T Y [in, out]``, the column sums of ``X`` and
    ``Y``, ``sum ||y||^2`` and the token count, so memory is ``[in, in]`` whatever the
    number of calibration tokens.

    Args:
        in_features: width of ``x`` (the linear's input).
        out_features: width of ``y`` (the linear's output).
        device: where the statistics live (the activations' device).
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(in_features, in_features, **f64)
        self.cross = torch.zeros(in_features, out_features, **f64)
        self.x_sum = torch.zeros(in_features, **f64)
        self.y_sum = torch.zeros(out_features, **f64)
        self.y_square = 0.0
        self.count = 0

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @property
    def out_features(self) -> int:
        return self.cross.shape[1]

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens.

        Args:
            x: ``[..., in]`` inputs (any float dtype; accumulated in float64).
            y: ``[..., out]`` targets, the same leading shape.
        """
        x = x.reshape(-1, self.in_features).to(self.gram.device, torch.float64)
        y = y.reshape(-1, self.out_features).to(self.gram.device, torch.float64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"GramAccumulator.update: {x.shape[0]} inputs but {y.shape[0]} targets")
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(x.T, y)
        self.x_sum += x.sum(0)
        self.y_sum += y.sum(0)
        self.y_square += float(y.square().sum())
        self.count += x.shape[0]

    def merged(self, other: "GramAccumulator") -> "GramAccumulator":
        """A new accumulator holding the tokens of both."""
        out = copy.copy(self)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.x_sum, out.y_sum = self.x_sum + other.x_sum, self.y_sum + other.y_sum
        out.y_square, out.count = self.y_square + other.y_square, self.count + other.count
        return out

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """Relative squared error ``||X W^T + b - Y||^2 / ||Y||^2`` over the tokens seen.

        Args:
            weight: ``[out, in]``.
            bias: ``[out]`` or None.
        """
        w = weight.to(self.gram.device, torch.float64)
        sq = float((w @ self.gram * w).sum()) - 2.0 * float((w * self.cross.T).sum()) + self.y_square
        if bias is not None:
            b = bias.to(self.gram.device, torch.float64)
            sq += 2.0 * float(b @ (w @ self.x_sum)) + self.count * float(b @ b) - 2.0 * float(b @ self.y_sum)
        return max(sq, 0.0) / max(self.y_square, 1e-300)

    def top_input_share(self) -> float:
        """The largest input's share of the input energy, ``max(diag(X^T X)) / tr(X^T X)``
        (near 1: one massive activation dominates the mean that ``scale="mean"`` damps with)."""
        diag = self.gram.diagonal()
        return float(diag.max() / diag.sum().clamp_min(1e-300))

    def solve(self, weight: torch.Tensor, *, damping: float = 0.01, refit: bool = True, bias: bool = False,
              keep_scale: bool = False, prior: torch.Tensor | None = None, scale: str = "mean",
              name: str = "linear") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The repaired weight (and intercept).

        ``W' = argmin ||X W^T + b - Y||^2 + ||(W - P) Lambda^(1/2)||^2`` (statistics
        centred when ``bias``; the intercept is not damped): ``W'^T = (G + Lambda)^{-1}
        (C + Lambda P^T)``, solved in float64 by Cholesky. ``Lambda = damping *
        mean(diag(G)) I`` (``scale="mean"``, GPTQ's relative damping) or ``damping *
        diag(G)`` (``scale="diagonal"``: each input damped relative to its own energy, the
        ridge of the standardised inputs; a few massive activations, which dominate the
        mean of ``diag(G)``, then do not over-damp every other input).

        Args:
            weight: ``[out, in]`` the current weight (kept as is when ``refit`` is False;
                the row norms ``keep_scale`` restores).
            damping: relative ridge (>= 0).
            refit: solve for the weight (False: only the intercept, FLAP).
            bias: fit an intercept ``b [out]``.
            keep_scale: rescale each row of the solution to the norm of the same row of
                ``weight``.
            prior: ``[out, in]`` the ridge centre ``P`` (None: zero).
            scale: ``mean`` or ``diagonal`` (above).
            name: what is solved, for the error message.

        Returns:
            ``(weight [out, in] float64, bias [out] float64 or None)``.

        Raises:
            MinicompressError: the system is singular (damping 0 on rank-deficient inputs).
        """
        if not refit and not bias:
            return weight.to(self.gram.device, torch.float64).clone(), None
        if self.count == 0:
            raise MinicompressError(f"repair_tokens: no calibration tokens reached {name}")
        gram, cross = self.gram, self.cross
        x_mean, y_mean = self.x_sum / self.count, self.y_sum / self.count
        if bias:
            gram = gram - self.count * torch.outer(x_mean, x_mean)
            cross = cross - self.count * torch.outer(x_mean, y_mean)
        w = weight.to(self.gram.device, torch.float64)
        if refit:
            diag = gram.diagonal()
            if scale == "diagonal":  # a floor keeps dead inputs (zero energy) at their prior
                lam = damping * diag.clamp_min(1e-12 * float(diag.mean().clamp_min(1e-300)))
            else:
                lam = torch.full_like(diag, damping * float(diag.mean()))
            rhs = cross if prior is None or damping == 0 else cross + lam[:, None] * prior.to(cross).T
            chol, info = torch.linalg.cholesky_ex(gram + torch.diag(lam))
            if int(info) != 0:
                raise MinicompressError(f"repair_damping: the calibration Gram matrix of {name} is singular at "
                                        f"damping {damping:g} (fewer independent inputs than its {self.in_features} "
                                        "columns); use a damping above 0 or more --repair-tokens")
            new = torch.cholesky_solve(rhs, chol).T.contiguous()
            if not torch.isfinite(new).all():
                raise MinicompressError(f"repair_damping: the refit of {name} is not finite at damping {damping:g}; "
                                        "use a larger damping")
            if keep_scale:
                old = torch.linalg.vector_norm(w, dim=1, keepdim=True)
                cur = torch.linalg.vector_norm(new, dim=1, keepdim=True)
                new = new * torch.where(cur > 0, old / cur.clamp_min(1e-300), torch.ones_like(cur))
        else:
            new = w.clone()
        return new, (y_mean - new @ x_mean) if bias else None


def refit_linear(x_student: torch.Tensor, y_target: torch.Tensor, weight: torch.Tensor, *, damping: float,
                 keep_scale: bool = False, prior: torch.Tensor | None = None, scale: str = "mean") -> torch.Tensor:
    """Ridge least-squares refit of one linear, on tokens given at once.

    ``W' = argmin ||X W^T - Y||^2 + lambda ||W - P||^2``, ``lambda = damping *
    mean(diag(X^T X))``, solved in float64 (:meth:`GramAccumulator.solve`).

    Args:
        x_student: ``[N, in]`` (or ``[..., in]``) the student's inputs of the linear.
        y_target: ``[N, out]`` what the linear should output for them.
        weight: ``[out, in]`` the current weight (its row norms for ``keep_scale``).
        damping: relative ridge (>= 0).
        keep_scale: keep each row's norm from ``weight``.
        prior: ``[out, in]`` ridge centre (None: zero).
        scale: ``mean`` (``lambda I``) or ``diagonal`` (``damping * diag(X^T X)``).

    Returns:
        ``[out, in]`` the new weight, in ``weight``'s dtype.
    """
    acc = GramAccumulator(weight.shape[1], weight.shape[0], device=weight.device)
    acc.update(x_student, y_target)
    new, _ = acc.solve(weight, damping=damping, keep_scale=keep_scale, prior=prior, scale=scale)
    return new.to(weight.dtype)


def span_map(acc: GramAccumulator, *, damping: float) -> torch.Tensor:
    """ReplaceMe's map ``T [H, H]`` of one dropped span from its statistics.

    ``acc`` holds ``x = M_k`` (the MLP output of the kept layer before the span) and
    ``y = L - Y_k`` (the span's output minus that layer's attention residual); ``T =
    argmin ||M_k T - (L - Y_k)||^2 + lambda ||T - I||^2`` (ridge towards the identity,
    plain dropping).

    Returns:
        ``T`` ``[H, H]`` float64, acting on row vectors (``m @ T``).
    """
    eye = torch.eye(acc.in_features, dtype=torch.float64, device=acc.gram.device)
    weight, _ = acc.solve(eye, damping=damping, prior=eye, name="the span map")
    return weight.T.contiguous()


def fold_span_map(down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``down_proj`` with the span map folded in: ``W' = T^T W``, ``b' = T^T b``.

    The MLP output ``a W^T + b`` becomes ``(a W^T + b) T`` exactly.

    Args:
        down_weight: ``[H, I]``.
        down_bias: ``[H]`` or None.
        t: ``[H, H]`` from :func:`span_map`.

    Returns:
        ``(weight [H, I], bias [H] or None)`` in the inputs' dtypes.
    """
    t64 = t.to(down_weight.device, torch.float64)
    weight = (t64.T @ down_weight.double()).to(down_weight.dtype)
    bias = None if down_bias is None else (t64.T @ down_bias.double()).to(down_bias.dtype)
    return weight, bias


def dropped_spans(plan: PrunePlan) -> list[tuple[int, int, int]]:
    """Contiguous runs of dropped layers (original indices).

    Returns:
        ``[(previous_kept, first_dropped, last_dropped), ...]``; ``previous_kept`` is -1
        when the run starts at layer 0.
    """
    kept = set(plan.layers)
    spans, start = [], None
    for i in range(plan.original["num_hidden_layers"] + 1):
        if i < plan.original["num_hidden_layers"] and i not in kept:
            start = i if start is None else start
        elif start is not None:
            spans.append((start - 1, start, i - 1))
            start = None
    return spans


def check_repairs(repairs: Sequence[str], config: Any, plan: PrunePlan | None = None, *,
                  sizes: dict[str, Any] | None = None, tokens: int | None = None,
                  token_key: str = "repair_tokens") -> None:
    """Refuse repairs the model or the plan cannot take, in one line naming the key.

    Args:
        repairs: names of :data:`~minicompress.config.REPAIRS` (``PruneConfig.repairs``).
        config: the original model's transformers config.
        plan: the plan; before it is made, ``sizes`` (or nothing) stands in for it.
        sizes: the pruned ``intermediate_size``, ``num_attention_heads`` and whether layers
            are dropped (``drops_layers``), when known before the plan.
        tokens: calibration tokens available to the repairs (None: not checked).
        token_key: the config key that bounds ``tokens`` (named in the error).

    Raises:
        MinicompressError: ``flap`` on a family without the bias keys, ``replaceme`` on
            sandwich-norm families, without dropped layers or with a dropped span at
            layer 0, or fewer calibration tokens than a refit solves for.
    """
    adapter = get_adapter(config)
    if "flap" in repairs and adapter.model_type not in BIAS_KEYS:
        raise MinicompressError(f"repair: flap adds a bias to down_proj / o_proj, which only {', '.join(BIAS_KEYS)} "
                                f"configs can carry (mlp_bias, attention_bias); {adapter.model_type} has none; "
                                "leave flap out")
    if "replaceme" in repairs and adapter.output_norms:
        raise MinicompressError(f"repair: replaceme folds a linear map into down_proj, which {adapter.model_type}'s "
                                "post-feedforward norm makes inexact; leave replaceme out")
    if plan is not None:
        spans = dropped_spans(plan)
        sizes = {"intermediate_size": plan.config["intermediate_size"],
                 "num_attention_heads": plan.config["num_attention_heads"], "drops_layers": bool(spans)}
        if "replaceme" in repairs and spans and spans[0][0] < 0:
            raise MinicompressError(f"repair: replaceme folds each dropped span into the down_proj of the layer "
                                    f"before it; layers {spans[0][1]}-{spans[0][2]} start at layer 0, which has none; "
                                    "keep layer 0 or leave replaceme out")
    if sizes is None:
        return
    if "replaceme" in repairs and sizes.get("drops_layers") is False:
        raise MinicompressError("repair: replaceme maps dropped layers and this prune drops none; give "
                                "--num-hidden-layers or --drop-layers, or leave replaceme out")
    if tokens is None:
        return
    widths = {}
    if "refit" in repairs and sizes.get("intermediate_size"):
        widths["down_proj (the kept neurons)"] = sizes["intermediate_size"]
    if "refit_o" in repairs and sizes.get("num_attention_heads"):
        widths["o_proj (kept heads x head_dim)"] = sizes["num_attention_heads"] * head_dim(config)
    if "replaceme" in repairs and sizes.get("drops_layers"):
        widths["the span map (the hidden size)"] = config.hidden_size
    for what, width in widths.items():
        if tokens < width:
            raise MinicompressError(f"{token_key}: {tokens:,} calibration tokens are fewer than the {width:,} inputs "
                                    f"of {what} that a repair solves for; give at least {width:,}")


# ----------------------------------------------------------------------------------------
# Gathering (a model run on given batches, with hooks; never loads data)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclasses.dataclass
class SpanMap:
    """ReplaceMe's map of one dropped span (original layer indices).

    Attributes:
        into: the kept layer whose ``down_proj`` takes the map.
        first, last: the dropped span.
        t: ``[H, H]`` float64, acting on row vectors.
        error_before: relative error of plain dropping (``T = I``).
        error_after: relative error with ``T``.
    """

    into: int
    first: int
    last: int
    t: torch.Tensor
    error_before: float
    error_after: float

    def record(self) -> dict[str, Any]:
        return {"layers": [self.first, self.last], "into_layer": self.into, "error_before": self.error_before,
                "error_after": self.error_after}


def span_maps(model: nn.Module, plan: PrunePlan, batches: Sequence[torch.Tensor], *,
              damping: float) -> list[SpanMap]:
    """ReplaceMe's maps of every dropped span, from the original (unpruned) model.

    Runs ``model`` on ``batches`` with hooks (the model is not changed): for the span
    ``s..e`` after kept layer ``k``, ``x = M_k`` (layer ``k``'s MLP output) and ``y = L -
    (h_k - M_k)`` (layer ``e``'s output minus layer ``k``'s attention residual).

    Args:
        model: the original model, matching ``plan.original``.
        plan: the plan (its dropped layers).
        batches: ``[B, T]`` token ids.
        damping: relative ridge towards the identity.

    Returns:
        One :class:`SpanMap` per span (empty without dropped layers).
    """
    adapter = get_adapter(model)
    spans = dropped_spans(plan)
    if not spans:
        return []
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    device = _device(model)
    accs = [GramAccumulator(hidden, hidden, device) for _ in spans]
    last_needed = max(e for _, _, e in spans)
    with _eval_mode(model):
        for batch in batches:
            seen: dict[str, torch.Tensor] = {}
            with removing_hooks() as handles:
                for n, (k, _, e) in enumerate(spans):
                    def mlp_hook(module, args, out, k=k):
                        seen[f"m{k}"] = _output(out)

                    def layer_hook(module, args, out, k=k):
                        seen[f"h{k}"] = _output(out)

                    def end_hook(module, args, out, n=n, k=k, e=e):
                        m = seen[f"m{k}"].double()
                        accs[n].update(m, _output(out).double() - (seen[f"h{k}"].double() - m))
                        if e == last_needed:
                            raise _Stop

                    handles.append(getattr(layers[k], adapter.mlp).register_forward_hook(mlp_hook))
                    handles.append(layers[k].register_forward_hook(layer_hook))
                    handles.append(layers[e].register_forward_hook(end_hook))
                try:
                    model.model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
    out = []
    eye = torch.eye(hidden, dtype=torch.float64, device=device)
    for (k, s, e), acc in zip(spans, accs):
        t = span_map(acc, damping=damping)
        out.append(SpanMap(k, s, e, t, acc.error(eye), acc.error(t.T)))
    return out


@torch.no_grad()
def fold_span_maps_(model: nn.Module, maps: Sequence[SpanMap]) -> None:
    """Fold each map into its layer's ``down_proj`` in place (:func:`fold_span_map`)."""
    adapter = get_adapter(model)
    layers = decoder_layers(model)
    for m in maps:
        down = getattr(getattr(layers[m.into], adapter.mlp), adapter.down_proj)
        weight, bias = fold_span_map(down.weight, down.bias, m.t)
        _write_linear_(down, weight, bias)


def teacher_weights(model: nn.Module, plan: PrunePlan) -> dict[int, dict[str, torch.Tensor]]:
    """References to the original attention and MLP weights of every kept layer.

    Taken before :func:`~minicompress.pruning.plan.apply_plan_`, which replaces the
    parameters by sliced copies; keeping these references (no copy) keeps the original
    tensors alive, so the peak memory of a repaired prune is the original model plus the
    pruned one, as during ``apply_plan_`` itself.

    Returns:
        ``{new layer index: {parameter name (original numbering): tensor}}``.
    """
    adapter = get_adapter(model)
    layers = decoder_layers(model)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for j, i in enumerate(plan.layers):
        out[j] = {}
        for part in (adapter.attn, adapter.mlp):
            for name, param in getattr(layers[i], part).named_parameters():
                out[j][f"model.layers.{i}.{part}.{name}"] = param.data
    return out


def _full_plan(plan: PrunePlan) -> PrunePlan:
    """``plan`` with every head, KV head and neuron kept: slices the channels only."""
    o = plan.original
    n = len(plan.layers)
    return dataclasses.replace(plan, heads=(tuple(range(o["num_attention_heads"])),) * n,
                               kv_heads=(tuple(range(o["num_key_value_heads"])),) * n,
                               neurons=(tuple(range(o["intermediate_size"])),) * n)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return lin


def _full_module(module: nn.Module, part: str, layer: int, teacher: dict[str, torch.Tensor],
                 projections: Sequence[str], full_plan: PrunePlan, adapter: ArchAdapter) -> nn.Module:
    """A copy of the student's ``module`` (attention or MLP of one layer) with the
    original projections: every head / neuron, the student's embedding channels."""
    full = copy.deepcopy(module)
    for leaf in projections:
        sliced = {}
        for kind in ("weight", "bias"):
            name = f"model.layers.{layer}.{part}.{leaf}.{kind}"
            if name in teacher:
                sliced[kind] = slice_parameter(name, teacher[name], full_plan, adapter)[1]
        setattr(full, leaf, _linear(sliced["weight"], sliced.get("bias")))
    return full


@torch.no_grad()
def _write_linear_(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The only write of a repair: ``linear``'s weight (and bias) in place."""
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.dtype))


@torch.no_grad()
def add_biases_(model: nn.Module, linears: Sequence[str]) -> None:
    """Give ``model`` the stock config keys that put a bias on ``linears`` (``down_proj``,
    ``o_proj``), and zero biases on every linear those keys cover (llama: ``mlp_bias`` is
    gate/up/down, ``attention_bias`` is q/k/v/o).

    Raises:
        MinicompressError: the family has no such key (:data:`BIAS_KEYS`).
    """
    adapter = get_adapter(model)
    keys = BIAS_KEYS.get(adapter.model_type)
    if keys is None:
        raise MinicompressError(f"repair: flap needs a bias on {', '.join(linears)}; {adapter.model_type} has none")
    groups = {"down_proj": (adapter.mlp, (adapter.gate_proj, adapter.up_proj, adapter.down_proj)),
              "o_proj": (adapter.attn, (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj))}
    for linear in linears:
        setattr(model.config, keys[linear], True)
        part, leaves = groups[linear]
        for layer in decoder_layers(model):
            for leaf in leaves:
                lin = getattr(getattr(layer, part), leaf)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device),
                                            requires_grad=lin.weight.requires_grad)


def _layer_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first layer's input of every batch and the keyword arguments every layer gets
    (position embeddings, masks: they do not depend on the hidden states)."""
    layers = decoder_layers(model)
    device = _device(model)
    hiddens: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []
    for batch in batches:
        per_layer: list[dict] = [{} for _ in layers]
        with removing_hooks() as handles:
            for i, layer in enumerate(layers):
                def pre_hook(module, args, kw, i=i):
                    kw = dict(kw)
                    if i == 0:
                        hiddens.append(args[0] if args else kw["hidden_states"])
                    kw.pop("hidden_states", None)
                    per_layer[i] = kw
                    if i == len(layers) - 1:
                        raise _Stop
                handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            try:
                model.model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
        kwargs.append(per_layer)
    return hiddens, kwargs


def _sublayer_pass(layer: nn.Module, hiddens: Sequence[torch.Tensor], kwargs: Sequence[dict], module: nn.Module,
                   full: nn.Module, proj: str, acc: GramAccumulator, held: GramAccumulator | None) -> None:
    """Run the student ``layer`` on every batch; for its sublayer ``module`` accumulate
    ``x`` = the student's ``proj`` input, ``y`` = ``full`` (the original sublayer) on the
    same sublayer input, its ``proj`` applied in float64."""
    target_proj = getattr(full, proj)
    w = target_proj.weight.double()
    b = None if target_proj.bias is None else target_proj.bias.double()
    state: dict[str, torch.Tensor] = {}
    held_out = _held_out(len(hiddens)) if held is not None else set()

    def student_in(mod, args, kw):
        with removing_hooks() as inner:
            inner.append(target_proj.register_forward_pre_hook(lambda m, a: state.__setitem__("full", a[0])))
            full(*args, **kw)

    def student_proj(mod, args):
        state["x"] = args[0]

    with removing_hooks() as handles:
        handles.append(module.register_forward_pre_hook(student_in, with_kwargs=True))
        handles.append(getattr(module, proj).register_forward_pre_hook(student_proj))
        for n, (h, kw) in enumerate(zip(hiddens, kwargs)):
            layer(h, **kw)
            y = torch.nn.functional.linear(state.pop("full").double(), w, b)
            (held if n in held_out else acc).update(state.pop("x"), y)


def _held_out(num_batches: int) -> set[int]:
    """Batches held out to choose the damping: every 8th, or the last of fewer than 8.

    Raises:
        MinicompressError: a single batch (nothing to hold out).
    """
    if num_batches < 2:
        raise MinicompressError("repair_damping: choosing among several dampings holds out calibration batches; "
                                "there is only one; give one damping, or more --repair-tokens")
    return {n for n in range(num_batches) if n % 8 == 7} or {num_batches - 1}


def _choose_damping(train: GramAccumulator, held: GramAccumulator | None, weight: torch.Tensor,
                    grid: Sequence[float], solve: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """The damping of ``grid`` with the lowest error on the held-out tokens (one value:
    that value)."""
    if len(grid) == 1 or held is None:
        return grid[0], None
    errors = {}
    for d in grid:
        try:
            w, b = train.solve(weight, damping=d, **solve)
            errors[f"{d:g}"] = held.error(w, b)
        except MinicompressError:
            errors[f"{d:g}"] = math.inf
    best = min(grid, key=lambda d: errors[f"{d:g}"])
    return best, errors


@dataclasses.dataclass(frozen=True)
class RefitSettings:
    """What :func:`refit_layers_` fits, and how (``prune --repair`` and its ``repair_*`` keys).

    Attributes:
        refit: refit ``down_proj``'s weight.
        refit_o: refit ``o_proj``'s weight.
        bias: the linears (``down_proj``, ``o_proj``) whose bias is fitted (FLAP), with
            or without their weight.
        damping: relative ridge; several values: per linear, the one with the lowest
            error on every 8th batch (held out) is used, then it is solved on all.
        keep_scale: keep the row norms of the pruned weight.
        ridge: ridge centre, ``zero`` or ``pruned`` (:data:`~minicompress.config.REPAIR_RIDGES`).
        damping_scale: ``mean`` or ``diagonal`` (:meth:`GramAccumulator.solve`).
        skip_unpruned: leave linears whose inputs lost nothing (False: solve them too,
            which at damping 0 must give them back: a check of the gathering).
    """

    refit: bool = True
    refit_o: bool = False
    bias: Sequence[str] = ()
    damping: Sequence[float] = (0.01,)
    keep_scale: bool = False
    ridge: str = "zero"
    damping_scale: str = "mean"
    skip_unpruned: bool = True


def refit_layers_(model: nn.Module, teacher: dict[int, dict[str, torch.Tensor]], plan: PrunePlan,
                  batches: Sequence[torch.Tensor], settings: RefitSettings = RefitSettings()) -> list[dict[str, Any]]:
    """Repair the pruned ``model`` layer by layer, in place, on its own activations.

    For each kept layer in order: (``refit_o``) ``o_proj`` is refit so that,
    on the student's attention input, it outputs what the original attention with all
    heads adds; then (``refit``) ``down_proj`` so that, on the student's MLP
    input, it outputs what the original MLP with all neurons adds (the original's
    projections with the student's embedding channels, so a hidden-size prune compares
    like with like); the next layer's input is the repaired layer's output. Each layer's
    original weights are released from ``teacher`` once it is repaired. A linear whose
    inputs lost nothing (every head, or every neuron, kept) is left as it is: its weight
    is already the exact optimum, which any damping would only move away from.

    Args:
        model: the pruned model (after ``apply_plan_``; with :func:`add_biases_` for
            ``bias``).
        teacher: from :func:`teacher_weights`, taken before ``apply_plan_``.
        plan: the applied plan.
        batches: ``[B, T]`` token ids.
        settings: what is fitted and how (:class:`RefitSettings`).

    Returns:
        One record per layer: for each repaired linear the relative error
        ``||X W^T + b - Y||^2 / ||Y||^2`` before and after, the damping used, the
        Frobenius norm ratio new / pruned, and the largest input's share of the input
        energy (:meth:`GramAccumulator.top_input_share`).
    """
    refit, refit_o, bias, damping = settings.refit, settings.refit_o, settings.bias, settings.damping
    keep_scale, ridge, damping_scale = settings.keep_scale, settings.ridge, settings.damping_scale
    skip_unpruned = settings.skip_unpruned
    adapter = get_adapter(model)
    full_plan = _full_plan(plan)
    layers = decoder_layers(model)
    jobs = []
    if refit_o or adapter.o_proj in bias:
        jobs.append((adapter.attn, adapter.o_proj, (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj),
                     refit_o, lambda j: len(plan.heads[j]) < plan.original["num_attention_heads"]))
    if refit or adapter.down_proj in bias:
        jobs.append((adapter.mlp, adapter.down_proj, (adapter.gate_proj, adapter.up_proj, adapter.down_proj), refit,
                     lambda j: len(plan.neurons[j]) < plan.original["intermediate_size"]))
    groups = plan.original["num_attention_heads"] // plan.original["num_key_value_heads"]
    records = []
    with _eval_mode(model):
        hiddens, kwargs = _layer_inputs(model, batches)
        for j, layer in enumerate(layers):
            record: dict[str, Any] = {"layer": j, "original_layer": plan.layers[j]}
            weights = teacher.pop(j)
            for part, proj, projections, fit_weight, pruned_inputs in jobs:
                if skip_unpruned and not pruned_inputs(j):
                    record[proj] = {"skipped": "no input was pruned"}
                    continue
                module = getattr(layer, part)
                full = _full_module(module, part, plan.layers[j], weights, projections, full_plan, adapter)
                if part == adapter.attn and hasattr(full, "num_key_value_groups"):
                    full.num_key_value_groups = groups
                linear = getattr(module, proj)
                acc = GramAccumulator(linear.in_features, linear.out_features, linear.weight.device)
                held = GramAccumulator(linear.in_features, linear.out_features, linear.weight.device) \
                    if fit_weight and len(damping) > 1 else None
                _sublayer_pass(layer, hiddens, [kw[j] for kw in kwargs], module, full, proj, acc, held)
                del full
                pruned = linear.weight.detach()
                solve = dict(refit=fit_weight, bias=proj in bias, keep_scale=keep_scale and fit_weight,
                             prior=pruned if ridge == "pruned" else None, scale=damping_scale,
                             name=f"layer {j} {proj}")
                chosen, grid_errors = _choose_damping(acc, held, pruned, damping, solve)
                if held is not None:
                    acc = acc.merged(held)
                old_bias = None if linear.bias is None else linear.bias.detach()
                before = acc.error(pruned, old_bias)
                weight, new_bias = acc.solve(pruned, damping=chosen, **solve)
                entry = {"error_before": before, "error_after": acc.error(weight, new_bias),
                         "weight": fit_weight, "bias": proj in bias, "damping": chosen if fit_weight else None,
                         "norm_ratio": float(torch.linalg.norm(weight)
                                             / torch.linalg.norm(pruned.double()).clamp_min(1e-300)),
                         "top_input_share": acc.top_input_share(), "tokens": acc.count}
                if grid_errors is not None:
                    entry["held_out_errors"] = grid_errors
                record[proj] = entry
                _write_linear_(linear, weight, new_bias)
            del weights
            hiddens = [_output(layer(h, **kw[j])) for h, kw in zip(hiddens, kwargs)]
            records.append(record)
    return records

"""Structured pruning: a pure, serialisable plan, then one in-place rewrite.

The Minitron recipe (Muralidharan et al., arXiv 2407.14679, sec. 2) ranks every axis by
activation importance (:mod:`minicompress.pruning.scoring`) and trims the least important heads,
FFN neurons, embedding channels and layers, producing a smaller model *of the same
family* that recovers by distillation (:mod:`minicompress.distillation.loop`).

* :func:`make_plan` (pure) turns scores and a target into a :class:`PrunePlan` of kept
  indices and the new config values; it is JSON-serialisable and stored with the model.
* :func:`slice_parameter` maps one ``(name, tensor)`` of the original checkpoint to its
  pruned counterpart; it is the only place that knows how each weight is sliced, so
  pruning checkpoints larger than memory one safetensors tensor at a time can reuse it.
* :func:`apply_plan_` is the only function that rewrites weights (in place).
* :func:`search_architecture` picks a uniform shape near a parameter budget by zero-shot
  LM loss on a few calibration batches (the pruner never loads data: batches are given);
  :func:`minicompress.recipes.prune.prune` may then distil the best few briefly and keep the
  one with the lowest held-out KL (the pruner never imports distillation).

GQA is handled by ranking query heads inside each KV group and keeping the same number
per group; dropping KV groups removes their query heads too. Gemma-3 multiplies
embeddings by ``sqrt(hidden_size)``: after a hidden-size prune the sandwich post-norms
are rescaled by ``sqrt(H_new / H_old)`` so the residual stream keeps the original scale
relative to every sublayer (RMSNorm is scale-invariant), and the pruned model, saved and
reloaded by stock transformers, computes exactly what the in-memory one does.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter, count_parameters, decoder_layers, get_adapter, head_dim, num_kv_heads
from ..errors import MinicompressError
from .scoring import ImportanceScores

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class PrunePlan:
    """What to keep, in original indices, and the resulting config values.

    Attributes:
        model_type: the HF ``model_type`` the plan was made for.
        original: original sizes (``hidden_size``, ``intermediate_size``, heads, KV heads, layers).
        channels: kept embedding channels, sorted.
        layers: kept decoder layers (original indices), sorted.
        heads: for each kept layer, kept query heads (original numbering), sorted.
        kv_heads: for each kept layer, kept KV heads (original numbering), sorted.
        neurons: for each kept layer, kept FFN neurons, sorted.
        config: new config values (``hidden_size``, ``intermediate_size``,
            ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``,
            ``head_dim`` and, where the family has it, ``layer_types``).
        norm_scales: for each kept layer, a factor per hidden-size norm
            (``adapter.all_layer_norms`` order) applied to ``offset + weight`` so the
            norm's output keeps its calibration scale after channel pruning (empty: none).
        final_norm_scale: the same for the final norm.
    """

    model_type: str
    original: dict[str, Any]
    channels: tuple[int, ...]
    layers: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    config: dict[str, Any] = field(default_factory=dict)
    norm_scales: tuple[tuple[float, ...], ...] = ()
    final_norm_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        out = asdict(self)
        for key in ("channels", "layers"):
            out[key] = list(out[key])
        for key in ("heads", "kv_heads", "neurons", "norm_scales"):
            out[key] = [list(v) for v in out[key]]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        """Inverse of :meth:`to_dict`."""
        return cls(
            model_type=data["model_type"],
            original=dict(data["original"]),
            channels=tuple(data["channels"]),
            layers=tuple(data["layers"]),
            heads=tuple(tuple(v) for v in data["heads"]),
            kv_heads=tuple(tuple(v) for v in data["kv_heads"]),
            neurons=tuple(tuple(v) for v in data["neurons"]),
            config=dict(data["config"]),
            norm_scales=tuple(tuple(v) for v in data.get("norm_scales", ())),
            final_norm_scale=float(data.get("final_norm_scale", 1.0)),
        )

    def new_config(self, config: Any) -> Any:
        """A deep copy of ``config`` rewritten to the pruned sizes (``head_dim`` explicit)."""
        new = copy.deepcopy(config)
        for key, value in self.config.items():
            setattr(new, key, list(value) if isinstance(value, (list, tuple)) else value)
        return new

    @property
    def embedding_scale_ratio(self) -> float:
        """``sqrt(H_new / H_old)``: how much a scaled embedding (Gemma) shrinks."""
        return math.sqrt(len(self.channels) / self.original["hidden_size"])


# ----------------------------------------------------------------------------------------
# Deciding (pure)


def _resolve_sizes(config: Any, target: Any) -> dict[str, int]:
    get = (lambda k: target.get(k)) if isinstance(target, dict) else (lambda k: getattr(target, k, None))
    heads, kv = config.num_attention_heads, num_kv_heads(config)
    sizes = {
        "hidden_size": get("hidden_size") or config.hidden_size,
        "intermediate_size": get("intermediate_size") or config.intermediate_size,
        "num_attention_heads": get("num_attention_heads") or heads,
        "num_key_value_heads": get("num_key_value_heads"),
        "num_hidden_layers": get("num_hidden_layers"),
    }
    q = sizes["num_attention_heads"]
    if sizes["num_key_value_heads"] is None:  # keep the KV heads if the query heads still fill them
        if q % kv == 0:
            sizes["num_key_value_heads"] = kv
        elif q < kv:
            sizes["num_key_value_heads"] = q  # one query head per kept KV group
        else:
            raise MinicompressError(
                f"target.num_attention_heads: {q} is not divisible by the model's {kv} KV heads; choose a multiple "
                f"of {kv}, or fewer query heads than {kv}, or set num_key_value_heads"
            )
    for key, limit in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                       ("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if not 0 < sizes[key] <= limit:
            raise MinicompressError(f"target.{key}: must be between 1 and the model's {limit}, got {sizes[key]}")
    q, k = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if q % k:
        raise MinicompressError(
            f"target.num_attention_heads: {q} is not divisible by num_key_value_heads {k}; choose a multiple of {k}"
        )
    if q // k > heads // kv:
        raise MinicompressError(
            f"target.num_attention_heads: {q} query heads over {k} KV heads needs {q // k} per group, "
            f"the model has only {heads // kv}; use at most {k * (heads // kv)} query heads for {k} KV heads"
        )
    return sizes


def _check_layers(num_layers: int, drop: tuple[int, ...], keep_n: int | None, metric: str) -> int:
    """Validate the depth part of a target; return the number of layers kept."""
    bad = [i for i in drop if i >= num_layers]
    if bad:
        raise MinicompressError(f"target.drop_layers: layer {bad[0]} does not exist (the model has {num_layers})")
    dropped = len(set(drop))
    if keep_n is not None:
        if not 0 < keep_n <= num_layers:
            raise MinicompressError(f"target.num_hidden_layers: must be between 1 and {num_layers}, got {keep_n}")
        if num_layers - keep_n - dropped < 0:
            raise MinicompressError(
                f"target.num_hidden_layers: {keep_n} layers kept but drop_layers already removes {dropped}"
            )
        if metric == "contiguous" and dropped and keep_n < num_layers - dropped:
            raise MinicompressError("target.layer_metric: contiguous cannot be combined with drop_layers")
        return keep_n
    if dropped >= num_layers:
        raise MinicompressError("target.num_hidden_layers: cannot drop every layer (zero layers left)")
    return num_layers - dropped


def layers_to_drop(scores: ImportanceScores, num_layers: int, drop: tuple[int, ...], keep_n: int | None,
                    metric: str) -> list[int]:
    _check_layers(num_layers, drop, keep_n, metric)
    dropped = set(drop)
    if keep_n is not None:
        extra = num_layers - keep_n - len(dropped)
        if extra:
            if metric == "contiguous":
                start, _ = scores.contiguous_block(extra)
                dropped |= set(range(start, start + extra))
            else:
                if metric == "loss":
                    if scores.layer_loss is None:
                        raise MinicompressError("target.layer_metric: 'loss' needs scores with layer_loss "
                                                "(score with layer_scores=true and loss_samples > 0)")
                    values = scores.layer_loss
                else:
                    values = scores.block_importance
                order = [i for i in values.argsort().tolist() if i not in dropped]
                dropped |= set(order[:extra])
    if len(dropped) >= num_layers:
        raise MinicompressError("target.num_hidden_layers: cannot drop every layer (zero layers left)")
    return sorted(dropped)


def _top(values: torch.Tensor, k: int) -> tuple[int, ...]:
    # stable: ties keep the lower index
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    return tuple(sorted(order[:k]))


def _select_heads(head_scores: torch.Tensor, num_kv: int, new_q: int, new_kv: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kept query heads and KV heads of one layer, GQA-consistent.

    Query head ``i`` reads KV head ``i // group`` (transformers' ``repeat_kv``). Inside each
    KV group the best ``new_q // new_kv`` query heads are kept; KV groups are ranked by the
    summed importance of the query heads they would keep.
    """
    group = head_scores.numel() // num_kv
    per_group = new_q // new_kv
    best_in_group = []
    for g in range(num_kv):
        local = head_scores[g * group:(g + 1) * group]
        keep = [g * group + i for i in _top(local, per_group)]
        best_in_group.append((float(sum(head_scores[i] for i in keep)), g, keep))
    chosen = sorted(best_in_group, key=lambda t: (-t[0], t[1]))[:new_kv]
    kv = tuple(sorted(g for _, g, _ in chosen))
    q = tuple(sorted(i for _, _, keep in chosen for i in keep))
    return q, kv


def _check_sizes(config: Any, target: Any, require_valid_config: bool = True) -> dict[str, int]:
    """The resolved widths of an explicit target, checked against ``config`` (no scores)."""
    adapter = get_adapter(config)
    sizes = _resolve_sizes(config, target)
    h, q = sizes["hidden_size"], sizes["num_attention_heads"]
    if require_valid_config and adapter.hidden_divisible_by_heads and h % q:
        lower, upper = (h // q) * q, (h // q + 1) * q
        raise MinicompressError(
            f"target.hidden_size: {config.model_type} configs need hidden_size divisible by num_attention_heads "
            f"(transformers rejects {h} with {q} heads on save); use e.g. {lower} or {upper}, or other heads"
        )
    return sizes


def check_target_params(config: Any, target_params: float) -> int:
    """The parameter budget of ``target_params`` for ``config``, or a one-line error.

    A value in (0, 1] is a ratio of the model's closed-form size; a larger value is a
    whole parameter count that must be below the model's size.

    Returns:
        The budget as a parameter count.

    Raises:
        MinicompressError: not a ratio in (0, 1] nor a whole count below the model's size.
    """
    total = count_parameters(config)["total"]
    if not target_params > 0:
        raise MinicompressError(f"target.target_params: must be a ratio in (0, 1] or a parameter count, "
                                f"got {target_params}")
    if target_params <= 1:
        return int(round(target_params * total))
    if target_params != int(target_params):
        raise MinicompressError(f"target.target_params: {target_params} is neither a ratio in (0, 1] nor a whole "
                                f"parameter count; use e.g. 0.5 or {total // 2:,}")
    if target_params >= total:
        raise MinicompressError(f"target.target_params: {int(target_params):,} is not below the model's "
                                f"{total:,} parameters; give a smaller count or a ratio in (0, 1]")
    return int(target_params)


def make_plan(scores: ImportanceScores, config: Any, target: Any, *, require_valid_config: bool = True) -> PrunePlan:
    """Decide what to keep. Pure: reads scores and config, returns a plan.

    Args:
        scores: importance of the model described by ``config``.
        config: the original transformers config.
        target: a :class:`~minicompress.config.TargetConfig` or a dict of the same keys
            (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``num_hidden_layers``, ``drop_layers``, ``layer_metric``).
            ``target_params`` is handled by :func:`search_architecture`, not here.
        require_valid_config: refuse shapes the family's transformers config rejects on
            save (``hidden_size`` not a multiple of the heads for llama / gemma3). Only
            in-memory experiments should turn this off.

    Returns:
        A :class:`PrunePlan`.

    Raises:
        MinicompressError: an impossible target (larger than the model, heads not
            divisible into KV groups, zero layers, unknown layers) or mismatched scores.
    """
    scores.check_compatible(config)
    sizes = _check_sizes(config, target, require_valid_config)
    get = (lambda k, d=None: target.get(k, d)) if isinstance(target, dict) else (lambda k, d=None: getattr(target, k, d))
    num_layers = config.num_hidden_layers
    dropped = layers_to_drop(scores, num_layers, tuple(get("drop_layers", ()) or ()),
                              sizes["num_hidden_layers"], get("layer_metric", "bi") or "bi")
    kept_layers = tuple(i for i in range(num_layers) if i not in dropped)

    kv = num_kv_heads(config)
    heads, kv_heads, neurons = [], [], []
    for i in kept_layers:
        q_keep, kv_keep = _select_heads(scores.heads[i], kv, sizes["num_attention_heads"], sizes["num_key_value_heads"])
        heads.append(q_keep)
        kv_heads.append(kv_keep)
        neurons.append(_top(scores.neurons[i], sizes["intermediate_size"]))
    new_values: dict[str, Any] = {
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "num_hidden_layers": len(kept_layers),
        "head_dim": head_dim(config),
    }
    channels = _top(scores.channels, sizes["hidden_size"])
    norm_scales: tuple = ()
    final_scale = 1.0
    correct = get("norm_correction", True)
    if correct and sizes["hidden_size"] < config.hidden_size and scores.norm_energy is not None:
        idx = torch.tensor(channels, dtype=torch.long)
        ratio = config.hidden_size / sizes["hidden_size"]

        def factor(energy: torch.Tensor) -> float:
            # RMS over the kept channels vs over all: x_c / rms_kept = (x_c / rms_all) / sqrt(rho * H / H')
            kept = float(energy[idx].sum()) / max(float(energy.sum()), 1e-30)
            return math.sqrt(kept * ratio)

        norm_scales = tuple(tuple(factor(scores.norm_energy[i, k]) for k in range(scores.norm_energy.shape[1]))
                            for i in kept_layers)
        final_scale = factor(scores.final_norm_energy)
    if getattr(config, "layer_types", None):
        new_values["layer_types"] = [config.layer_types[i] for i in kept_layers]
    if getattr(config, "max_window_layers", None) is not None:
        new_values["max_window_layers"] = sum(1 for i in kept_layers if i < config.max_window_layers)
    return PrunePlan(
        model_type=config.model_type,
        original={
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": kv,
            "num_hidden_layers": num_layers,
            "head_dim": head_dim(config),
        },
        channels=channels,
        layers=kept_layers,
        heads=tuple(heads),
        kv_heads=tuple(kv_heads),
        neurons=tuple(neurons),
        config=new_values,
        norm_scales=norm_scales,
        final_norm_scale=final_scale,
    )


def plan_parameters(plan: PrunePlan, config: Any) -> int:
    """Closed-form parameter count of the model a plan produces."""
    return count_parameters(plan.new_config(config))["total"]


# ----------------------------------------------------------------------------------------
# Slicing one tensor (shared by the in-memory rewrite and a future streaming rewrite)


def _head_rows(heads: tuple[int, ...], dim: int) -> torch.Tensor:
    return torch.tensor([h * dim + j for h in heads for j in range(dim)], dtype=torch.long)


def slice_parameter(name: str, tensor: torch.Tensor, plan: PrunePlan,
                    adapter: ArchAdapter | None = None) -> tuple[str, torch.Tensor] | None:
    """The pruned version of one checkpoint tensor.

    Args:
        name: parameter name in the original model (``model.layers.3.mlp.up_proj.weight``).
        tensor: its value.
        plan: the plan.
        adapter: the family adapter (default: from ``plan.model_type``).

    Returns:
        ``(new_name, new_tensor)`` (layer indices renumbered), or None for a parameter of
        a dropped layer.

    Raises:
        MinicompressError: a parameter name the family's rules do not cover.
    """
    adapter = adapter or get_adapter(plan.model_type)
    ch = torch.tensor(plan.channels, dtype=torch.long)
    hd = plan.original["head_dim"]
    m = _LAYER.match(name)
    if m is None:
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            return name, tensor.index_select(1, ch).clone()
        if name.endswith("norm.weight"):
            return name, _scale_norm(tensor.index_select(0, ch), plan.final_norm_scale, adapter.norm_offset)
        if name.endswith("norm.bias"):
            return name, tensor.index_select(0, ch).clone()
        if name == "lm_head.bias":
            return name, tensor.clone()
        raise MinicompressError(f"pruning: no slicing rule for parameter {name!r} of {plan.model_type}")
    old = int(m["idx"])
    if old not in plan.layers:
        return None
    j = plan.layers.index(old)
    new_name = f"{m['prefix']}.{j}.{m['rest']}"
    rest = m["rest"]
    q_rows = _head_rows(plan.heads[j], hd)
    kv_rows = _head_rows(plan.kv_heads[j], hd)
    nr = torch.tensor(plan.neurons[j], dtype=torch.long)
    module, _, kind = rest.rpartition(".")
    leaf = module.rpartition(".")[2]
    a = adapter
    if leaf in (a.q_proj, a.k_proj, a.v_proj):
        rows = q_rows if leaf == a.q_proj else kv_rows
        out = tensor.index_select(0, rows)
        return new_name, (out.index_select(1, ch) if kind == "weight" else out).clone()
    if leaf == a.o_proj:
        if kind == "weight":
            return new_name, tensor.index_select(0, ch).index_select(1, q_rows).clone()
        return new_name, tensor.index_select(0, ch).clone()
    if leaf in (a.q_norm, a.k_norm):
        return new_name, tensor.clone()
    if leaf in (a.gate_proj, a.up_proj):
        out = tensor.index_select(0, nr)
        return new_name, (out.index_select(1, ch) if kind == "weight" else out).clone()
    if leaf == a.down_proj:
        out = tensor.index_select(0, ch)
        return new_name, (out.index_select(1, nr) if kind == "weight" else out).clone()
    if leaf in adapter.all_layer_norms:
        scale = plan.norm_scales[j][adapter.all_layer_norms.index(leaf)] if plan.norm_scales else 1.0
        if leaf in adapter.output_norms and adapter.scaled_embeddings:
            scale *= plan.embedding_scale_ratio
        return new_name, _scale_norm(tensor.index_select(0, ch), scale, adapter.norm_offset)
    raise MinicompressError(f"pruning: no slicing rule for parameter {name!r} of {plan.model_type}")


def _scale_norm(weight: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """Norm weight whose effective multiplier ``offset + w`` is scaled by ``scale``."""
    if scale == 1.0:
        return weight.clone()
    return ((weight.double() + offset) * scale - offset).to(weight.dtype)


# ----------------------------------------------------------------------------------------
# Rewriting (the only mutation)


def _set_param(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=requires_grad))


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Rewrite ``model`` in place to the pruned architecture.

    Every parameter is replaced by :func:`slice_parameter`'s output, dropped layers are
    removed and the rest renumbered, ``model.config`` is rewritten (``head_dim``
    explicit, per-layer ``layer_types`` re-indexed), cached module attributes are
    synchronised, and the result is checked against a fresh model of the new config.

    Args:
        model: a supported ``*ForCausalLM`` matching ``plan.original``.
        plan: from :func:`make_plan`.

    Returns:
        The same ``model`` object, now pruned.

    Raises:
        MinicompressError: the model does not match the plan.
    """
    adapter = get_adapter(model)
    cfg = model.config
    found = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": num_kv_heads(cfg),
             "num_hidden_layers": cfg.num_hidden_layers, "head_dim": head_dim(cfg)}
    if found != plan.original:
        raise MinicompressError(f"pruning: the plan is for {plan.original}, the model is {found}")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, param in list(model.named_parameters()):
        if tied and name == "lm_head.weight":
            continue
        result = slice_parameter(name, param.data, plan, adapter)
        if result is not None:
            _set_param(model, name, result[1], param.requires_grad)
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in plan.layers])
    for key, value in plan.config.items():
        setattr(cfg, key, list(value) if isinstance(value, (list, tuple)) else value)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    _sync_module_attributes(model, adapter, plan)
    _check_against_config(model)
    return model


def _sync_module_attributes(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> None:
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
    for j, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = groups
            if isinstance(getattr(module, "hidden_size", None), int):
                module.hidden_size = cfg.hidden_size
            if isinstance(getattr(module, "intermediate_size", None), int):
                module.intermediate_size = cfg.intermediate_size
    embed = model.model.embed_tokens
    if adapter.scaled_embeddings and hasattr(embed, "embed_scale"):
        scale = cfg.hidden_size ** 0.5
        embed.scalar_embed_scale = scale
        embed.embed_scale.fill_(scale)


def check_shapes_match_config(config: Any, shapes: dict[str, tuple[int, ...]], message: str) -> None:
    """Refuse parameter shapes that a stock model built from ``config`` would not have.

    Args:
        config: the (pruned) transformers config.
        shapes: parameter name -> shape, as ``named_parameters()`` lists them (a tied
            ``lm_head`` appears once, as the embedding).
        message: the error's text before the first differing entries.

    Raises:
        MinicompressError: names up to three differing ``(name, shape)`` entries.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    want = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    if want != shapes:
        diff = sorted(set(want.items()) ^ set(shapes.items()))[:3]
        raise MinicompressError(f"{message}: {diff}")


def _check_against_config(model: nn.Module) -> None:
    check_shapes_match_config(model.config, {n: tuple(p.shape) for n, p in model.named_parameters()},
                              "pruning: rewritten model does not match its config")


def pruned_copy(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A pruned deep copy of ``model`` (the original is untouched)."""
    return apply_plan_(copy.deepcopy(model), plan)


# ----------------------------------------------------------------------------------------
# Choosing an architecture for a parameter budget


def target_parameter_count(config: Any, target: dict[str, Any]) -> int:
    new = copy.copy(config)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        setattr(new, key, target[key])
    new.head_dim = head_dim(config)
    return count_parameters(new)["total"]


#: The shape keys of a candidate target (HF names).
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")



"""``minicompress info``: architecture and parameter breakdown of a model source."""

from __future__ import annotations

import logging

from ..errors import MinicompressError
from ..models import load_for_flag

log = logging.getLogger(__name__)




PARAM_COMPONENTS = ("embedding", "lm_head", "attention", "mlp", "norms", "total", "non_embedding")


def model_info(source: str, *, trust_remote_code: bool = False, count: bool = True) -> dict:
    """Architecture summary and parameter breakdown of a model source.

    Args:
        source: model folder, ``.gguf`` file, Hub id or built-in name.
        trust_remote_code: allow custom model code.
        count: also load the weights and count unique parameters.

    Returns:
        ``{"source", "architecture", "parameters": [{component, count, percent}],
        "closed_form_total", "counted_total", "counted_matches_closed_form"}``.
    """
    from ..arch import describe, get_adapter
    from ..config import ModelConfig

    model_config = ModelConfig(source=source, trust_remote_code=trust_remote_code)
    from ..models import load_config

    config = load_config(source, trust_remote_code=trust_remote_code)
    model = None
    if config is not None:
        try:
            get_adapter(config)
        except MinicompressError as err:
            raise MinicompressError(f"--model {source}: {err}") from None
    if config is None or count:
        model, _ = load_for_flag(model_config, "--model")
        config = model.config
    summary = describe(config)
    closed = summary.pop("parameters")
    total = closed["total"]
    rows = [{"component": k, "count": closed[k], "percent": 100.0 * closed[k] / total if total else 0.0}
            for k in PARAM_COMPONENTS]
    out = {"source": source, "architecture": summary, "parameters": rows, "closed_form_total": total}
    if model is not None:
        seen, counted = set(), 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counted += p.numel()
        out["counted_total"] = counted
        out["counted_matches_closed_form"] = counted == total
    return out

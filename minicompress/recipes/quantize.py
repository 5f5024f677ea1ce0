"""``minicompress quantize``: a model's linear weights as int8 or int4, saved as a Hugging Face folder.

The how is :mod:`minicompress.quantize` (torchao round-to-nearest weight-only quantization);
here the model is loaded, quantized in memory, and written with ``save_pretrained``
(safetensors, with torchao's metadata and a ``TorchAoConfig`` in ``config.json``) and its
tokenizer into a temporary sibling folder that is renamed into place at the end, with the
provenance record ``minicompress.json``. The folder loads with plain
``AutoModelForCausalLM.from_pretrained`` (torchao installed) and with ``minicompress eval``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..config import QuantizeConfig
from ..errors import MinicompressError
from ..models import load_for_flag, size_on_disk
from ..outputs import atomic_folder, check_output, provenance, read_provenance, write_provenance
from ..quantize import is_quantized, quantize_, require_torchao

log = logging.getLogger(__name__)


def _source_provenance(source: str) -> dict[str, Any] | None:
    """The ``minicompress.json`` of a local source folder (a pruned or recovered model), or None."""
    path = Path(source).expanduser()
    return read_provenance(path) if path.is_dir() else None


def quantize(config: QuantizeConfig) -> dict[str, Any]:
    """Quantize ``config.model`` with ``config.scheme`` and write it to ``config.output``.

    Everything that can refuse the command (torchao missing, an existing output without
    ``overwrite``, a ``group_size`` that does not divide a layer, an already quantized model)
    is checked before anything is written; the output appears whole or not at all.

    Args:
        config: the settings (``output`` required).

    Returns:
        ``{"output", "source", "scheme", "group_size", "quantized_linears",
        "quantized_parameters", "torchao", "size_before_bytes", "size_after_bytes",
        "size_ratio", "seconds"}``; sizes count the weight files (None for a Hub id).

    Raises:
        MinicompressError: any of the refusals above, or a model that cannot be loaded.
    """
    require_torchao()
    out = check_output(config.output, config.overwrite)
    model, tokenizer = load_for_flag(config.model, "--model")
    if is_quantized(model):
        raise MinicompressError(f"--model {config.model.source}: it is quantized already (torchao); quantize its "
                                "floating-point original")
    start = time.perf_counter()
    report = quantize_(model, config.scheme, config.group_size)
    seconds = time.perf_counter() - start
    before = size_on_disk(config.model.source)
    with atomic_folder(out, config.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        after = size_on_disk(str(tmp))
        result = {"output": str(out), "source": config.model.source, **report, "size_before_bytes": before,
                  "size_after_bytes": after, "size_ratio": after / before if before else None, "seconds": seconds}
        write_provenance(tmp, provenance("quantize", config, source_model=config.model.source,
                                         source_provenance=_source_provenance(config.model.source), **result))
    log.info("wrote %s (%s, %.1f MiB of weights)", out, config.scheme, after / 2**20)
    return result

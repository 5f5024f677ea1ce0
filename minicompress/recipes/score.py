"""``minicompress score``: Minitron activation importance on calibration text (arXiv 2407.14679, sec. 2).

The recipe loads the model (sharded with FSDP2 under torchrun), reads the calibration
text and writes the scores; :mod:`minicompress.pruning.scoring` computes them without touching
disk or ranks.
"""

from __future__ import annotations

import logging
import time


from .. import distributed
from ..config import ScoreConfig
from ..data.rows import calibration_batches
from ..errors import MinicompressError
from ..hardware import resolve_autocast
from ..models import load_model, load_model_on_rank0, resolve_device
from ..outputs import atomic_folder, check_output, provenance, write_provenance
from ..progress import progress_bar
from ..pruning.scoring import ImportanceScores, count_score_forwards, score_model

log = logging.getLogger(__name__)



def score(config: ScoreConfig, *, model=None, tokenizer=None) -> ImportanceScores:
    """Score a model on calibration data; write the scores if ``config.output`` is set.

    Args:
        config: the score configuration.
        model: an already loaded model (else ``config.model`` is loaded).
        tokenizer: its tokenizer.

    Under torchrun the model is sharded with FSDP2 (rank 0 alone reads the weights, every
    rank keeps ``1 / world_size`` of them, a layer is gathered only while it runs), each rank
    scores every ``world_size``-th calibration batch and the running sums are all-reduced
    (``score_model(reduce=...)``), so each rank holds the single-process scores; rank 0
    alone writes them. A model too large for one device is scored this way. An in-memory
    ``model`` is scored whole on every rank (data parallel only).

    Returns:
        :class:`~minicompress.pruning.scoring.ImportanceScores`.
    """
    world = distributed.init_from_env()
    if config.output is not None:
        check_output(config.output, config.overwrite)
    if not config.data.sources():
        raise MinicompressError("--data: scoring needs calibration text (never the evaluation split)")
    sharded = model is None and world > 1
    if sharded:
        model, tokenizer, weights = load_model_on_rank0(config.model)
        device = resolve_device(config.model.device)
        distributed.shard_model(model, device=device, from_rank0=True, weights=weights,
                                mixed_precision=resolve_autocast(config.autocast, device) == "bfloat16")
        del weights
    elif model is None:
        model, tokenizer = load_model(config.model)
    batches, loss_batches = calibration_batches(config, tokenizer)
    reduce = None
    if world > 1:  # this rank's share; None: no layer-loss score on any rank
        if len(batches) < world:
            n = sum(b.shape[0] for b in batches)
            raise MinicompressError(f"num_samples: {n} samples make {len(batches)} batches of batch_size "
                                    f"{config.batch_size}, fewer than the {world} ranks; lower batch_size")
        rank = distributed.rank()
        shares = [batches[rank::world], loss_batches[rank::world] if loss_batches else None]
        if sharded:  # the same number of forwards on every rank: pad the shorter shares with idle ones
            for share, whole in zip(shares, (batches, loss_batches)):
                if share is not None:
                    share += [None] * (-(-len(whole) // world) - len(share))
        batches, loss_batches = shares
        reduce = distributed.all_reduce_sum
    forwards = count_score_forwards(batches, loss_batches, model.config.num_hidden_layers)
    start = time.perf_counter()
    with progress_bar("score", forwards, unit="seq") as bar:
        scores = score_model(model, batches, sequence_aggregation=config.sequence_aggregation,
                             batch_aggregation=config.batch_aggregation, loss_batches=loss_batches,
                             autocast=config.autocast, progress=bar,
                             meta={"source": config.model.source, "data": config.data.describe()}, reduce=reduce)
    scores.meta["seconds"] = round(time.perf_counter() - start, 2)
    scores.meta.update(world_size=world, fsdp=sharded)
    if config.output is not None and distributed.is_main():
        with atomic_folder(config.output, config.overwrite) as tmp:
            scores.save(tmp)
            write_provenance(tmp, provenance("score", config, scores_digest=scores.digest()))
    distributed.barrier()  # torchrun: every rank returns once the scores are written
    return scores

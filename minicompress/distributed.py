"""Several processes on one problem: torchrun ranks, FSDP2 sharding and rank-0-only output.

``torchrun --nproc-per-node N -m minicompress recover ...`` starts ``N`` copies of the
command with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment
(https://pytorch.org/docs/stable/elastic/run.html). :func:`init_from_env` turns them into
a process group (NCCL for CUDA tensors plus gloo for CPU tensors on GPUs, gloo alone on
CPUs); a single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) creates none and every
helper here is then a no-op, so the single-process code path is unchanged.

Sharding is PyTorch's own FSDP2, ``torch.distributed.fsdp.fully_shard`` (Zhao et al.,
"PyTorch FSDP", arXiv 2304.11277; https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html):
each decoder layer is one FSDP unit (all-gathered just before its forward and backward,
resharded after), and the root unit holds the rest (embedding, final norm, ``lm_head``,
tied or not: a tied parameter is one parameter of the root group, managed once).

The fused distillation loss (:func:`minicompress.distillation.losses.chunked_distill_loss`) reads
``lm_head.weight`` outside any ``forward``. Between forwards FSDP2 registers the sharded
``DTensor`` on the module, so :func:`run_in_root` runs a callable *as a forward of the
root*: FSDP's pre-forward all-gathers the root group and registers the unsharded
parameters on the modules, the callable reads them with
:func:`minicompress.arch.lm_head_weight`, and FSDP's pre-backward / post-backward hooks
(registered on the callable's outputs) reduce-scatter their gradients into the sharded
parameters exactly as for a module forward
(``torch.distributed.fsdp.register_fsdp_forward_method``).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
import types
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist

from .arch import decoder_layers, tied_groups

log = logging.getLogger(__name__)

_ROOT_CALL = "_minicompress_root_call"


def init_from_env() -> int:
    """Join the process group described by torchrun's environment, once.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR`` /
    ``MASTER_PORT``). With ``WORLD_SIZE > 1`` it selects ``cuda:LOCAL_RANK`` when CUDA is
    available and initialises the default process group (``cuda:nccl,cpu:gloo`` on GPUs,
    ``gloo`` on CPUs); ranks other than 0 turn off progress bars and log warnings only.
    A single process creates no process group. Calling it again is a no-op.

    Returns:
        The world size (1 for a single process).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return world_size()
    rank_ = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank_)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("cuda:nccl,cpu:gloo", rank=rank_, world_size=world,
                                device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", rank=rank_, world_size=world)
    atexit.register(_destroy)
    if rank_ != 0:
        os.environ["MINICOMPRESS_PROGRESS"] = "0"
        logging.getLogger("minicompress").setLevel(logging.WARNING)
    log.info("distributed: rank %d of %d (%s)", rank_, world, dist.get_backend())
    return world


def finish() -> None:
    """Leave the process group together after a command succeeded (every rank calls it).

    A gloo peer that exits while another still holds its connections (or pending work)
    can make the other's gloo threads abort it at teardown ("terminate called without an
    active exception", SIGABRT after a finished run). So every rank waits for the others
    (barrier), tears its group down, then counts itself out on the rendezvous store and
    leaves only when every rank has (at most 60 s). ``minicompress`` calls it when a
    command returns 0; Python callers under torchrun call it at the end of their script.
    A failed rank must not call it: the barrier would wait for peers that are still in
    the collective the failed rank left (the ``atexit`` hook only tears down instead).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
        dist.barrier()
        dist.destroy_process_group()
        store.add(_EXIT_KEY, 1)
        deadline = time.monotonic() + 60
        while store.add(_EXIT_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # noqa: BLE001 - a peer already gone (or the store with it): nothing left to wait for
        _destroy()


def _destroy() -> None:
    """At exit: tear the process group down without waiting for anyone.

    Reached after :func:`finish` (then a no-op) or on a failed rank, which must exit at
    once so that torchrun sees the failure and stops the other ranks (a barrier here would
    hang them all until the collective timeout).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_EXIT_KEY = "minicompress/exited"


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files, logs and draws progress bars (rank 0)."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process).

    Args:
        tensor: any shape; CPU or the rank's CUDA device.

    Returns:
        ``tensor``, now holding the sum.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small records only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``DTensor.full_tensor()`` (an all-gather) for a DTensor, else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Uses the Hugging Face hook (non-reentrant ``torch.utils.checkpoint``), active in
    train mode only: the activation memory of a layer drops to its input ``[B, L, H]``
    at the cost of one more forward per layer (about a third more compute).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_model(model: torch.nn.Module, *, mixed_precision: bool, reshard_after_forward: bool = True,
                activation_checkpointing: bool = False, device: torch.device | str | None = None,
                from_rank0: bool = False, weights: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Shard a ``*ForCausalLM`` over the ranks with FSDP2 ``fully_shard``, in place.

    Each decoder layer (``model.model.layers[i]``) becomes an FSDP unit, then the root
    (embedding, final norm, ``lm_head``; a tied ``lm_head`` is the embedding parameter,
    sharded once). Every rank keeps ``1 / world_size`` of each parameter (and later of
    its gradient and optimizer state). Gradients are *summed* over ranks
    (``set_gradient_divide_factor(1.0)`` with a SUM reduce-scatter), not averaged: minicompress divides each rank's
    loss by the target count of the whole global batch, so the sum is the gradient of one
    process on that batch. A model without trainable parameters (the frozen teacher) is
    sharded the same way and only ever all-gathered.

    Args:
        model: a supported ``*ForCausalLM`` on the rank's device (modified in place).
        mixed_precision: on CUDA, all-gather parameters and compute in bf16 and reduce
            gradients in float32 (``MixedPrecisionPolicy(param_dtype=bfloat16,
            reduce_dtype=float32)``); the sharded float32 master weights are what AdamW
            updates. Ignored on CPU (gloo reduces bf16 poorly): parameters stay float32 and
            ``autocast`` alone picks the matmul precision.
        reshard_after_forward: free each layer's gathered parameters after its forward
            and gather them again for backward (ZeRO-3, least memory); False keeps them
            from forward to backward (one all-gather fewer per layer and step, ZeRO-2-like
            memory for the layers).
        activation_checkpointing: recompute layer activations in backward
            (:func:`enable_activation_checkpointing`).
        device: where the shards live (``cuda`` means this rank's GPU; None: where the
            model is). A model in host memory moves one FSDP unit at a time, so a GPU
            never holds more than one whole layer of it.
        from_rank0: ``model``'s parameters are on the ``meta`` device on every rank
            (:func:`minicompress.models.load_model_on_rank0`) and rank 0 has ``weights``.
            After sharding, each rank allocates its shards (``to_empty``, its buffers
            kept) and takes its rows of every tensor rank 0 broadcasts, one tensor at a
            time (:func:`broadcast_weights_`).
        weights: on rank 0 with ``from_rank0``, state-dict names to full tensors (any
            ``Mapping``, e.g. a lazy :class:`minicompress.models.SafetensorsWeights`).

    Returns:
        ``model`` (now an ``FSDPModule``; parameters are ``DTensor`` shards).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        enable_activation_checkpointing(model)
    empty = any(p.is_meta for p in model.parameters())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if empty != from_rank0:
        raise ValueError("shard_model: from_rank0=True goes with parameters on the meta device, and only with them")
    if from_rank0 and is_main() and weights is None:
        raise ValueError("shard_model: from_rank0=True needs rank 0's weights=")
    if device.type == "meta":
        raise ValueError("shard_model: pass device= for a model whose parameters are on the meta device")
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()} if from_rank0 else {}
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy()
    if mixed_precision and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root keeps its group gathered until backward
    if from_rank0:  # allocate this rank's shards (to_empty also blanks the buffers: put them back), then fill them
        model.to_empty(device=device)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
        broadcast_weights_(model, weights)
    if any(p.requires_grad for p in model.parameters()):
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):  # a plain SUM: no PREMUL_SUM (gloo has none)
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    setattr(model, _ROOT_CALL, types.MethodType(lambda self, fn: fn(), model))
    register_fsdp_forward_method(model, _ROOT_CALL)
    return model


#: largest block of a tensor broadcast at once (a [V, H] embedding goes in row blocks)
BROADCAST_BLOCK_BYTES = 64 << 20


@torch.no_grad()
def broadcast_weights_(model: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None,
                       block_bytes: int | None = None) -> None:
    """Fill a sharded model with rank 0's tensors, one block of rows at a time.

    For each state-dict entry (tied names once, read under whichever name ``weights``
    has), rank 0 reads a block of at most ``block_bytes`` (whole rows of dim 0), casts it
    to the parameter's dtype and broadcasts it; every rank copies the rows of the block
    that fall in its shard. FSDP2 shards dim 0 as ``torch.chunk`` does: rank ``r`` of
    ``N`` holds rows ``[r c, r c + c)`` with ``c = ceil(rows / N)``. A rank's extra memory
    is one block; with a lazy mapping that has ``read_rows`` and ``shape``
    (:class:`minicompress.models.SafetensorsWeights`) rank 0 reads only that block, and
    from a plain ``dict`` each entry is dropped once sent.

    Args:
        model: sharded with FSDP2 (parameters are ``DTensor`` shards on their device).
        weights: rank 0: state-dict names to full tensors; other ranks: ignored.
        block_bytes: the largest block broadcast at once (default :data:`BROADCAST_BLOCK_BYTES`).

    Raises:
        KeyError: (rank 0) a tensor is missing from ``weights``.
        ValueError: (rank 0) a tensor of another shape.
    """
    from torch.distributed.tensor import DTensor

    main, me, world = is_main(), rank(), world_size()
    block_bytes = block_bytes or BROADCAST_BLOCK_BYTES
    state = model.state_dict(keep_vars=True)
    for names in tied_groups(model):
        target = state[names[0]]
        local = target.to_local() if isinstance(target, DTensor) else target
        source = None
        if main:
            source = next((n for n in names if n in weights), None)
            if source is None:
                raise KeyError(f"shard_model: no tensor {' or '.join(names)} in rank 0's weights")
            shape = weights.shape(source) if hasattr(weights, "shape") else tuple(weights[source].shape)
            if tuple(shape) != tuple(target.shape):
                raise ValueError(f"shard_model: {source} has shape {tuple(shape)}, the model's is {tuple(target.shape)}")
        if target.dim() == 0:
            blocks, mine = [(None, None)], (None, None)
        else:
            rows = target.shape[0]
            row_bytes = max(math.prod(target.shape[1:]) * target.element_size(), 1)
            step = max(block_bytes // row_bytes, 1)
            blocks = [(a, min(a + step, rows)) for a in range(0, rows, step)]
            mine = (0, rows)
            if isinstance(target, DTensor):
                chunk = -(-rows // world)
                first = min(me * chunk, rows)
                mine = (first, first + local.shape[0])
                if local.shape[0] != min(chunk, rows - first):
                    raise AssertionError(f"shard_model: {names[0]} shard of {local.shape[0]} rows, "
                                         f"expected {min(chunk, rows - first)}")
        for a, b in blocks:
            if main:
                if a is None:
                    block = weights[source]
                elif hasattr(weights, "read_rows"):
                    block = weights.read_rows(source, a, b)
                else:
                    block = weights[source][a:b]
                block = block.to(device=local.device, dtype=target.dtype)
            else:
                shape = target.shape if a is None else (b - a, *target.shape[1:])
                block = torch.empty(shape, dtype=target.dtype, device=local.device)
            dist.broadcast(block, src=0)
            if a is None:
                local.copy_(block)
                continue
            lo, hi = max(a, mine[0]), min(b, mine[1])  # the rows of this block in this rank's shard
            if lo < hi:
                local[lo - mine[0]:hi - mine[0]].copy_(block[lo - a:hi - a])
            del block
        if main and isinstance(weights, dict):
            for name in names:  # a tied lm_head's entry too
                weights.pop(name, None)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on rank 0's CPU (empty on other ranks).

    A collective: every rank must call it
    (``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write a stock Hugging Face folder of ``model`` (weights and config).

    Without ``state_dict`` this is ``model.save_pretrained(folder)``. With the
    :func:`full_state_dict` of a sharded model (on rank 0), a plain copy of the model is
    built on the ``meta`` device, takes the gathered tensors without copying
    (``load_state_dict(assign=True)``), re-ties its embeddings and is saved, so the folder
    loads with ``AutoModelForCausalLM.from_pretrained`` like any other.
    """
    if state_dict is None:
        model.save_pretrained(folder)
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state_dict, assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder)


def run_in_root(model: torch.nn.Module | None, fn: Callable[[], Any], *, reshard: bool = False) -> Any:
    """``fn()`` run as a forward of ``model``'s FSDP root (just ``fn()`` for a plain model).

    Inside, the root group is gathered: ``model.model.embed_tokens`` and
    ``arch.lm_head_weight(model)`` are ordinary tensors, layers gather themselves, and
    gradients of tensors that ``fn`` returns flow back into the sharded parameters.
    Every rank must make the same calls in the same order (they all-gather).

    Args:
        model: a model sharded by :func:`shard_model`, a plain model, or None.
        fn: a callable without arguments.
        reshard: free the root group's gathered parameters afterwards (use it after
            ``no_grad`` work; after a training forward the backward reshards).

    Returns:
        What ``fn`` returns.
    """
    method = getattr(model, _ROOT_CALL, None) if model is not None else None
    if method is None:
        return fn()
    out = method(fn)
    if reshard:
        model.reshard()
    return out

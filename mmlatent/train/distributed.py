"""Data-parallel training under ``torchrun``: the process group, DistributedDataParallel or FSDP2 around the module
a run's loss calls, and the few collectives the Trainer needs (docs/design.md, "Distributed training").

A run started by ``torchrun --nproc_per_node N -m mmlatent.cli train --config ...`` reads its rank and world size
from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins
one process group: NCCL on CUDA devices, gloo on CPUs. Every collective runs under the group's timeout
(``train.dist_timeout_s``): a rank that dies or stops answering makes the others fail with
:class:`DistributedError`, naming the rank and the timeout, instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn

PARALLEL = ("ddp", "fsdp")
# transformers' names for the lists of repeated blocks FSDP2 shards one by one
_BLOCK_LISTS = ("layers", "layer", "block", "blocks", "h")


class DistributedError(RuntimeError):
    """A collective of a data-parallel run failed: another rank died, or did not answer within the timeout."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes single-file checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment (torchrun sets it), got {value!r}") \
            from None


def current_world() -> World:
    """The world of an initialised process group, else the one torchrun's environment describes (one process
    when it describes none)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK / WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got {rank} / {size}")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def init_distributed(timeout_s: float = 600.0) -> World:
    """Joins the process group torchrun's environment describes (once; a no-op in one process or when a group
    exists) and, on CUDA, selects this rank's device. Returns the :class:`World`."""
    import torch.distributed as dist
    world = current_world()
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        world = current_world()
    return world


def close_distributed(world: World, timeout_s: float, wait: bool = True) -> None:
    """Leaves the process group at the end of a run: with ``wait``, a last barrier first, so that no rank tears
    its connections down while another still uses them; then ``destroy_process_group`` (a process that exits with
    its gloo group open can abort in the group's threads, "terminate called without an active exception"). A
    no-op in one process. Pass ``wait=False`` on the way out of an error, where the others may be gone."""
    import torch.distributed as dist
    if not (world.distributed and dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            barrier(world, "the barrier at the end of the run", timeout_s)
    finally:
        dist.destroy_process_group()


def rank_device(world: World) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def collective(what: str, world: World, timeout_s: float) -> Iterator[None]:
    """Turns a failed collective into a :class:`DistributedError` that says what was being reduced and why it
    can fail (a dead rank, or one slower than the timeout)."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo and NCCL report a lost peer or a timeout as RuntimeError subclasses
        raise DistributedError(f"rank {world.rank} of {world.size}: {what} failed; another rank died or did not "
                               f"answer within train.dist_timeout_s = {timeout_s:g} s ({err})") from err


def all_reduce_sum(values: Sequence[float], world: World, device: torch.device, what: str,
                   timeout_s: float) -> List[float]:
    """The sums over ranks of ``values`` (one collective, float64); in one process, ``values``."""
    if not world.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    with collective(what, world, timeout_s):
        dist.all_reduce(buffer)
    return buffer.tolist()


def barrier(world: World, what: str, timeout_s: float) -> None:
    """Waits for every rank (a no-op in one process)."""
    if world.distributed:
        import torch.distributed as dist
        with collective(what, world, timeout_s):
            dist.barrier()


def gather_objects(value: object, world: World, what: str, timeout_s: float) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist
    gathered: list = [None] * world.size
    with collective(what, world, timeout_s):
        dist.all_gather_object(gathered, value)
    return gathered


def map_shards(fn: Callable[[list], list], items: Sequence, world: Optional[World], what: str,
               timeout_s: float = 600.0) -> list:
    """``fn(items)`` computed data-parallel: rank ``r`` of ``world`` maps ``items[r::size]``, and every rank gets
    the whole list back in the order of ``items`` (one all-gather of picklable values). ``fn`` returns one value
    per item it is given; in one process (``world`` None or of size 1) this is ``fn(items)``. Every rank must call
    it with the same ``items``; ``fn`` itself must not run collectives whose number depends on its shard (under
    FSDP2, run it in :func:`gathered`)."""
    items = list(items)
    if world is None or not world.distributed:
        return _checked_map(fn, items, what)
    mine = _checked_map(fn, items[world.rank::world.size], what)
    shards = gather_objects(mine, world, f"gathering the ranks' shares of {what}", timeout_s)
    merged: List[Any] = [None] * len(items)
    for rank, shard in enumerate(shards):
        merged[rank::world.size] = shard
    return merged


def _checked_map(fn: Callable[[list], list], items: list, what: str) -> list:
    values = list(fn(items)) if items else []
    if len(values) != len(items):
        raise RuntimeError(f"{what}: expected one value per item, got {len(values)} for {len(items)}")
    return values


@contextlib.contextmanager
def gathered(root: nn.Module, world: World, timeout_s: float) -> Iterator[None]:
    """Inside, every FSDP2 module below the root ``root`` holds its whole parameters and forwards make no
    collective: for work whose forwards differ in number between ranks (generating each rank's share of the
    evaluation records, GRPO's rollouts of different lengths), which the per-block all-gathers of a sharded
    forward would deadlock. Costs the model's full size in memory on every rank while inside. Enter it within the
    root's forward (``LossForward(None, run=...)``), which has gathered the root's own parameters; a module that
    is not FSDP2's passes through. Gradients are not for inside: this is inference."""
    from torch.distributed.fsdp import FSDPModule
    blocks = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    with collective("gathering the FSDP2 blocks for inference", world, timeout_s):
        for block in blocks:  # the same blocks in the same order on every rank, so the all-gathers pair up
            block.unshard()
            block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)
            block.reshard()


def transformer_blocks(module: nn.Module) -> List[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the modules of the classes a transformers model names in
    ``_no_split_modules``, else the entries of its block lists (``layers``, ``block``, ``h``).

    Only transformers models' blocks: a diffusers UNet or VAE runs only for the samples that have an image, and
    FSDP2 needs every rank to gather the same blocks in the same order, so their parameters stay with the root,
    gathered whole at the start of every forward."""
    from transformers import PreTrainedModel
    names = set()
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            names.update(getattr(sub, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names] if names else []
    if blocks:
        return blocks
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
            blocks.extend(child for child in sub if any(p.requires_grad for p in child.parameters()))
    return blocks


def wrap_module(module: nn.Module, parallel: str, world: World, device: torch.device, bf16: bool) -> nn.Module:
    """``module`` made data-parallel: ``DistributedDataParallel`` around it (``ddp``; unused parameters allowed,
    since a method's batch may skip a part, as DPMM-CoT's UNet on a batch without images), or FSDP2's
    ``fully_shard`` on each transformer block and then on the module itself (``fsdp``, in place; with ``bf16``
    parameters are gathered in bfloat16 and gradients reduced in float32)."""
    if parallel not in PARALLEL:
        raise ValueError(f"train.parallel: expected one of {', '.join(PARALLEL)}, got {parallel!r}")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in reversed(transformer_blocks(module)):  # nested blocks are sharded children first
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, parallel: Optional[str], sync: bool) -> Iterator[None]:
    """Inside, gradients are reduced across ranks only when ``sync`` (the last micro-batch of an accumulation
    window): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if parallel == "ddp" and not sync:
        with wrapped.no_sync():
            yield
    elif parallel == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A parameter or state tensor whole: an FSDP2 DTensor gathered (a collective), any other tensor itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


__all__ = ["World", "PARALLEL", "DistributedError", "current_world", "init_distributed", "close_distributed",
           "rank_device", "all_reduce_sum", "barrier", "gather_objects", "map_shards", "gathered",
           "transformer_blocks", "wrap_module", "gradient_sync", "full_tensor", "collective"]

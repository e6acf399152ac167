"""Data-parallel reductions for multi-task steps, on ``torch.distributed``.

Under ``DistributedDataParallel`` every rank holds a shard of the global batch. A multi-task step
is exact -- the same update as one process on the global batch -- when three things hold, and this
module provides the collectives for each (the methods' base classes insert them; nothing here
knows a method):

1. **The losses a method reads are global.** Task k's global loss is the labelled-count weighted
   mean of the ranks' losses, ``L_k = sum_r c_rk L_rk / C_k`` (``C_k = sum_r c_rk``): one
   all-reduce of 2K numbers (:meth:`DataParallel.global_losses`). Each rank back-propagates its own
   loss times its *share* ``s_rk = R c_rk / C_k``, so that the average over ranks of the local
   gradients is the global gradient, also when labels are missing unevenly.
2. **The solve sees global per-task information.** A representation-level Gramian is a sum over
   samples, so the ranks' local K x K matrices summed (and divided by ``R^2``, the shares' scale)
   give the global one; a parameter-level Gramian needs the per-task gradients themselves averaged
   (K x d, in buckets), or the mean of the ranks' local Gramians as a named approximation.
3. **The written gradient is averaged** across ranks (:meth:`DataParallel.average_gradients`, in
   flat buckets like DDP's own reducer), except what a step already wrote from global quantities.

Loss weightings back-propagate once through the DDP wrapper with its reducer on, so DDP's own
bucketed, overlapped all-reduce averages their gradient (:attr:`DataParallel.native`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlkit.errors import DistributedError

#: Bucket size of the explicit gradient all-reduce: DDP's default ``bucket_cap_mb``.
DEFAULT_BUCKET_BYTES = 25 << 20


def is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def process_rank() -> int:
    """This process's rank in the default group (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank of the default group (nothing without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Destroy the default process group once every rank is done with it (nothing when none).

    A gloo rank that tears its connections down while a peer still completes the last collective
    makes that peer abort (SIGABRT). ``dist.barrier()`` alone leaves that window open: a rank can
    leave the barrier before its peer has received the barrier's last message. So each rank, after
    the barrier, also checks in through the group's store (its own connection, outside gloo) and
    waits until all have checked in: by then no rank has a collective in flight. Wrappers held only
    by reference cycles are collected first, so they do not keep the group's threads alive into the
    interpreter's shutdown.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world > 1:
        dist.barrier()
        store = dist.distributed_c10d._get_default_store()
        store.set(f"mtlkit/left/{rank}", "1")
        store.wait([f"mtlkit/left/{r}" for r in range(world)])
    dist.destroy_process_group()


@dataclass(frozen=True)
class DataParallel:
    """The process group of a data-parallel step and how its reductions are done.

    Attributes:
        group: the ``torch.distributed`` process group (``None``: the default group).
        world_size: the number of ranks in it (> 1).
        native: DDP's reducer averages the model's gradients during the backward (the wrapper's
            forward ran with gradient sync on); otherwise the step averages them itself.
        prepared: for a method run inside another method's step: the global losses and active
            flags, already computed (the losses given are then already multiplied by the shares).
        reduce: whether the step averages the gradients it wrote (``False`` inside another
            method's step, whose own reduction covers them).
        reduced: ids of the parameters whose gradient this step wrote from global quantities.
        deferred: what runs once the gradients are averaged (a clip of the shared gradient).

    One object serves one step (the last two fields are that step's bookkeeping); a method run
    inside another method's step shares them with it.
    """

    group: Any
    world_size: int
    native: bool = False
    prepared: tuple[Tensor, Tensor] | None = None
    reduce: bool = True
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    reduced: set[int] = field(default_factory=set)
    deferred: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def of(cls, model: Any) -> DataParallel | None:
        """The data-parallel context of a DDP-wrapped model with more than one rank (else ``None``)."""
        if not is_ddp(model) or not dist.is_available() or not dist.is_initialized():
            return None
        group = getattr(model, "process_group", None)
        world = dist.get_world_size(group)
        if world < 2:
            return None
        return cls(group, world, native=bool(model.require_backward_grad_sync))

    def inner(self, losses: Tensor, active: Tensor) -> DataParallel:
        """The context for a method run inside this step: losses prepared, no reduction of its own."""
        return replace(self, prepared=(losses, active), reduce=False, native=False)

    # -- collectives ------------------------------------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place (sum over ranks) and return it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Average tensors across ranks in place, in flat buckets of at most ``bucket_bytes`` per
        dtype and device (one collective per bucket, as DDP's reducer does)."""
        for bucket in _buckets(tensors, self.bucket_bytes):
            if len(bucket) == 1 and bucket[0].is_contiguous():
                self.sum_(bucket[0]).div_(self.world_size)
                continue
            flat = torch.cat([t.reshape(-1) for t in bucket])
            self.sum_(flat).div_(self.world_size)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather(self, t: Tensor, dim: int) -> Tensor:
        """The ranks' tensors concatenated along ``dim`` (rank order), differentiable: the backward
        gives each rank the sum over ranks of the gradient of its own slice (a statistic of the
        global batch computed on every rank, then back-propagated on every rank). Shards must have
        the same size along ``dim`` (``DistributedSampler`` pads them so)."""
        sizes = torch.tensor([t.shape[dim]], device=t.device)
        every = [torch.empty_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(every, sizes, group=self.group)
        if any(int(n) != t.shape[dim] for n in every):
            raise DistributedError(
                f"A batch statistic needs equal shards on every rank; got sizes {[int(n) for n in every]} "
                "along the batch dimension (use DistributedSampler, which pads the last batch)."
            )
        return _Gather.apply(t, self, dim)

    def global_losses(self, losses: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(global losses, global active flags, shares)`` from this rank's (K,) losses and
        labelled counts (zero for a task without a labelled entry here), in one all-reduce."""
        k = losses.shape[0]
        c = counts.to(torch.float64)
        buf = torch.cat([losses.detach().to(torch.float64) * c, c])
        self.sum_(buf)
        total = buf[k:]
        active = total > 0
        denom = total.clamp(min=1.0)
        global_losses = (buf[:k] / denom).to(losses.dtype)
        shares = torch.where(active, self.world_size * c / denom, torch.zeros_like(c))
        return global_losses, active, shares

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Average ``.grad`` of ``params`` (except those in :attr:`reduced`) across ranks.

        A parameter with a gradient on some rank and none on another is averaged with zeros there;
        one without a gradient on any rank keeps ``None`` (as in one process on the global batch).
        The union is agreed in one small all-reduce of presence flags.
        """
        todo = [p for p in params if p.requires_grad and id(p) not in self.reduced]
        if not todo:
            return
        device = todo[0].device
        present = torch.tensor([p.grad is not None for p in todo], dtype=torch.float32, device=device)
        self.sum_(present)
        grads = []
        for p, anywhere in zip(todo, present.tolist(), strict=True):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.average_(grads)


def _buckets(tensors: Sequence[Tensor], limit: int) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        buckets = groups.setdefault(key, [[]])
        if buckets[-1] and sizes.get(key, 0) + nbytes > limit:
            buckets.append([])
            sizes[key] = 0
        buckets[-1].append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [b for buckets in groups.values() for b in buckets if b]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, parallel: DataParallel, dim: int) -> Tensor:
        parts = [
            torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(parallel.world_size)
        ]
        dist.all_gather(parts, t.contiguous(), group=parallel.group)
        ctx.parallel, ctx.dim, ctx.size = parallel, dim, t.shape[dim]
        ctx.rank = dist.get_rank(parallel.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        total = ctx.parallel.sum_(grad.contiguous().clone())
        return total.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None

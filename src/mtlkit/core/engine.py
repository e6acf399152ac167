"""The gradient engine: the one place in mtlkit that computes per-task gradients.

Three paths behind one object, all fed with *separate scalar task losses* (never elements of a
stacked loss vector back-propagated one at a time, which makes every backward visit all K heads):

(a) :meth:`GradientEngine.parameter_gramian` -- the K x K Gramian ``G = J J^T`` of the per-task
    gradients w.r.t. the shared parameters. Each task's gradient is written straight into a
    reused K x d buffer (per-parameter views ``J_p``, no concatenation), and ``G`` is accumulated
    column chunk by column chunk into a float64 matrix, never from a float64 copy of ``J``. The K
    gradients must all be alive to form ``G`` (inherent to a parameter-level Gramian); they stay
    in the model's dtype and are reused for ``J^T w``, which is cheaper than a second backward.
    Chunk products are exact float64 (``precision="float64"``) or taken in float32 and
    accumulated in float64 (``"mixed"``, the default); see :func:`accumulate_gramian`.
(b) :meth:`GradientEngine.representation_gramian` -- the Gramian of the gradients w.r.t. the shared
    representation ``z`` (Sener & Koltun, NeurIPS 2018, "MGDA-UB"): K cheap head backwards to ``z``,
    the elementwise Gramian over all B x r entries, then ONE trunk backward with the cotangent
    ``sum_k w_k dL_k/dz``.
(c) :meth:`GradientEngine.jacobian` -- the per-parameter Jacobian blocks, for methods that need
    ``J`` itself (e.g. elementwise aggregators).

Per-task gradients come from one of two strategies, chosen in :func:`default_strategy`:
``"loop"`` (one ``torch.autograd.grad`` per task; measured fastest on CPU) or ``"batched"``
(one vmapped backward with ``is_grads_batched=True``).

Parameters that are not shared ("task-specific": heads, gates) receive either their own task's
gradient (``head_grad="own"``) or the weighted one (``head_grad="weighted"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.errors import EngineError

Strategy = Literal["auto", "loop", "batched"]
HeadGrad = Literal["own", "weighted"]
TaskParams = Mapping[str, Sequence[Tensor]] | Sequence[Tensor] | None

#: Bytes of one float64 chunk (K x columns) when accumulating a Gramian: about a core's L2 cache,
#: where the cast and the product run fastest (measured: benchmarks/results/step_cost.md).
DEFAULT_CHUNK_BYTES = 1 << 20
GramianPrecision = Literal["float64", "mixed"]


def default_strategy(device: torch.device) -> Literal["loop", "batched"]:
    """The per-task gradient strategy for a device, chosen by measurement.

    CPU: a plain loop of ``autograd.grad`` calls (measured 137-153 ms against 143-171 ms
    for the vmapped Jacobian at K = 40). CUDA: one batched VJP, which took 0.95x / 0.69x / 0.96x the
    loop's step time at K = 2 / 10 / 40 on an H200
    (benchmarks/results/device_check_h200_strategy.json: ``mtlkit:mgda`` = loop, ``-batched``).
    """
    return "batched" if device.type == "cuda" else "loop"


def as_param_list(params: Iterable[Tensor] | None) -> list[Tensor]:
    """Trainable tensors of ``params`` as a list (generators are consumed once), deduplicated."""
    if params is None:
        return []
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def accumulate_gramian(
    blocks: Iterable[Tensor],
    k: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    precision: GramianPrecision = "float64",
) -> Tensor:
    """``sum_b B_b B_b^T`` over blocks of shape (K, ...), accumulated chunk by chunk in float64.

    ``precision="float64"``: each column chunk is cast to float64 before its product (exact
    products; the cast dominates the cost for float32 gradients). ``"mixed"``: each chunk's
    product is taken in float32 (the gradients' own dtype, or float32 for float16/bfloat16
    gradients, which would overflow or round) and added to the float64 accumulator, so only
    the sum over at most ``chunk_bytes / (8 K)`` columns is rounded in float32 (relative error
    about ``sqrt(columns) * 6e-8`` of ``||g_i|| ||g_j||``), at half the cost. Float64 gradients
    give identical results either way. The transient memory is one chunk.
    """
    gram: Tensor | None = None
    cols = max(1, chunk_bytes // (8 * max(k, 1)))
    for block in blocks:
        flat = block.reshape(k, -1)
        for start in range(0, flat.shape[1], cols):
            chunk = flat[:, start : start + cols]
            if precision == "float64":
                chunk = chunk.to(torch.float64)
            elif chunk.dtype in (torch.float16, torch.bfloat16):  # autocast representations
                chunk = chunk.float()
            prod = (chunk @ chunk.T).to(torch.float64)
            gram = prod if gram is None else gram.add_(prod)
    if gram is None:
        raise EngineError("Cannot form a Gramian from no gradient blocks.")
    return gram


def combine_blocks(weights: Tensor, block: Tensor) -> Tensor:
    """``sum_k weights_k * block[k]`` for a (K, ...) block, in the block's dtype."""
    return torch.tensordot(weights.to(block.dtype), block, dims=1)


def _add_grad(param: Tensor, grad: Tensor, fresh: bool = True) -> None:
    """Accumulate into ``.grad`` like ``backward`` does; ``fresh`` tensors are adopted, not copied."""
    if param.grad is None:
        param.grad = grad.detach() if fresh else grad.detach().clone()
    else:
        param.grad.add_(grad)


@dataclass
class HeadGradients:
    """Gradients of the task-specific parameters, kept sparsely: ``grads[i]`` lists the
    ``(task index, gradient)`` pairs of ``params[i]`` (a head usually serves one task, so a dense
    K x shape block per head would cost O(K^2) memory and time)."""

    params: list[Tensor]
    grads: list[list[tuple[int, Tensor]]]

    def write(self, weights: Tensor | None) -> None:
        """Add each parameter's own-task gradients (``weights=None``) or their weighted sum."""
        cast: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        for p, pairs in zip(self.params, self.grads, strict=True):
            if not pairs:
                continue
            if weights is None:
                total = pairs[0][1] if len(pairs) == 1 else torch.stack([g for _, g in pairs]).sum(0)
            else:
                key = (p.device, p.dtype)
                if key not in cast:
                    cast[key] = weights.to(device=p.device, dtype=p.dtype)
                w = cast[key]
                total = sum((w[k] * g for k, g in pairs[1:]), w[pairs[0][0]] * pairs[0][1])
            _add_grad(p, total)  # autograd's own output or a new sum: nothing else holds it


@dataclass
class DeferredHeadGradients:
    """Task-specific gradients obtained after the solve by one backward of ``sum_k c_k L_k``
    restricted to the task-specific parameters (it never enters the trunk). Used with the batched
    strategy, whose vmapped backward would otherwise build a dense K x shape block per head."""

    params: list[Tensor]
    losses: list[Tensor]

    def write(self, weights: Tensor | None) -> None:
        if not self.params:
            return
        terms = [
            loss if weights is None else weights[k].to(loss.dtype) * loss
            for k, loss in enumerate(self.losses)
            if loss.requires_grad
        ]
        if terms:
            torch.autograd.backward(torch.stack(terms).sum(), inputs=self.params)


@dataclass
class ParameterJacobian:
    """Per-task gradients w.r.t. the shared parameters, as one (K, *shape) block per parameter,
    plus the task-specific parameters' gradients.

    With the loop strategy the blocks are views into one K x d ``matrix`` (rows padded so that
    they never start at the same cache set), which lets the Gramian and ``J^T w`` run as single
    matrix products instead of one per parameter.
    """

    shared: list[Tensor]
    blocks: list[Tensor]
    heads: HeadGradients | DeferredHeadGradients
    matrix: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.blocks[0].shape[0]

    def shared_blocks(self) -> list[Tensor]:
        """The tensors that hold the shared-parameter gradients, contiguous (the engine's padded
        buffer, whose padding is zero, or the blocks): what a data-parallel step averages."""
        if self.matrix is not None and self.matrix._base is not None and self.matrix._base.is_contiguous():
            return [self.matrix._base]
        if self.matrix is not None:
            return [self.matrix]
        return list(self.blocks)

    def flat(self) -> Tensor:
        """The K x d Jacobian as one matrix (a copy; only for methods that need it whole)."""
        return torch.cat([b.reshape(self.num_tasks, -1) for b in self.blocks], dim=1)

    def gramian(
        self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, precision: GramianPrecision = "float64"
    ) -> Tensor:
        blocks = [self.matrix] if self.matrix is not None else self.blocks
        return accumulate_gramian(blocks, self.num_tasks, chunk_bytes, precision)

    def write_shared(self, directions: Sequence[Tensor]) -> None:
        """Add one direction per shared parameter into ``.grad``."""
        for p, d in zip(self.shared, directions, strict=True):
            _add_grad(p, d, fresh=False)

    def rows(self) -> Tensor:
        """The K x d Jacobian: the engine's matrix itself (no copy) with the loop strategy, else
        a concatenation of the blocks."""
        return self.matrix if self.matrix is not None else self.flat()

    def write_shared_flat(self, direction: Tensor) -> None:
        """Add a flat d-vector direction into the shared parameters' ``.grad`` (copied, so the
        caller may keep ``direction``)."""
        offset = 0
        for p in self.shared:
            n = p.numel()
            _add_grad(p, direction[offset : offset + n].view(p.shape).to(p.dtype), fresh=False)
            offset += n

    def write_shared_weighted(self, weights: Tensor) -> None:
        """Add ``J^T w`` into the shared parameters' ``.grad``."""
        if self.matrix is None:
            for p, b in zip(self.shared, self.blocks, strict=True):
                _add_grad(p, combine_blocks(weights, b))
            return
        combined = combine_blocks(weights, self.matrix)  # one pass over J
        offset = 0
        for p in self.shared:
            _add_grad(p, combined[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()

    def write_heads(self, weights: Tensor | None) -> None:
        """Task-specific parameters: own gradients (``weights=None``) or the weighted ones."""
        self.heads.write(weights)


@dataclass
class RepresentationGradients:
    """Per-task gradients w.r.t. the shared representation and the task-specific parameters.

    ``features`` holds one tensor (every task reads it) or one per task (task k's gradient in
    ``rep_grads[k]`` is w.r.t. ``features[k]``).
    """

    features: list[Tensor]
    rep_grads: Tensor  # (K, *z.shape)
    heads: HeadGradients
    #: the parameters the trunk backward writes (``None``: every leaf below the representation)
    shared: list[Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        return self.rep_grads.shape[0]

    def gramian(
        self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, precision: GramianPrecision = "float64"
    ) -> Tensor:
        """Elementwise Gramian: inner products over all B x r entries (the official MGDA-UB)."""
        return accumulate_gramian([self.rep_grads], self.num_tasks, chunk_bytes, precision)

    def cotangents(self, weights: Tensor) -> list[Tensor]:
        """``sum_k w_k dL_k/dz`` (per-task representations: ``w_k dL_k/dz_k`` for each ``z_k``)."""
        if len(self.features) == 1:
            return [combine_blocks(weights, self.rep_grads)]
        w = weights.to(self.rep_grads.dtype)
        return [w[k] * g for k, g in enumerate(self.rep_grads)]

    def backward_shared(self, weights: Tensor) -> None:
        """One trunk backward with the cotangent ``sum_k w_k dL_k/dz`` (per-task representations:
        ``w_k dL_k/dz_k`` into each ``z_k``, in the same single backward); frees the graph."""
        self.backward_cotangents(self.cotangents(weights))

    def backward_cotangents(self, cotangents: list[Tensor]) -> None:
        """Back-propagate one cotangent per feature tensor into the shared parameters; frees the
        graph. Task-specific parameters below the representation (MTAN's attention, PLE's task
        experts under a per-task representation) are left alone: their own gradient, which runs
        through the representation, was taken with the head gradients."""
        if self.shared is not None and not self.shared:
            return
        torch.autograd.backward(self.features, grad_tensors=cotangents, inputs=self.shared)

    def write_heads(self, weights: Tensor | None) -> None:
        self.heads.write(weights)


class GradientEngine:
    """Computes per-task gradients; see the module docstring.

    Args:
        strategy: ``"loop"``, ``"batched"`` or ``"auto"`` (per device, :func:`default_strategy`).
        precision: how Gramian chunks are multiplied (:func:`accumulate_gramian`): ``"mixed"``
            (default: products of cache-sized chunks in the gradients' dtype, accumulated in
            float64; about 2x faster for float32 gradients, as accurate as the float32 gradients
            themselves) or ``"float64"`` (every chunk cast first: exact products).
        chunk_bytes: size of one float64 chunk while a Gramian is accumulated.
        reuse_buffers: keep the (K, *shape) gradient buffers between calls (faster; the blocks of
            a returned Jacobian are then valid only until the engine's next call; methods that
            keep gradients across steps must copy them).
    """

    def __init__(
        self,
        strategy: Strategy = "auto",
        precision: GramianPrecision = "mixed",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        reuse_buffers: bool = True,
    ) -> None:
        if strategy not in ("auto", "loop", "batched"):
            raise EngineError(f"Unknown engine strategy {strategy!r}; use 'auto', 'loop' or 'batched'.")
        if precision not in ("float64", "mixed"):
            raise EngineError(f"Unknown Gramian precision {precision!r}; use 'float64' or 'mixed'.")
        self.strategy = strategy
        self.precision = precision
        self.chunk_bytes = chunk_bytes
        self.reuse_buffers = reuse_buffers
        self._workspace: dict[tuple, Tensor] = {}
        self._verified_splits: set[tuple] = set()
        #: representation gradients computed ahead (by :meth:`representation_saliency`) for the
        #: next :meth:`representation_gradients` call on the same losses and representation
        self._prepared: tuple[tuple[int, ...], RepresentationGradients] | None = None

    def _matrix(
        self, slot: int, targets: list[Tensor], k: int, reuse: bool = True
    ) -> tuple[Tensor, list[Tensor]]:
        """A K x d matrix for the gradients of ``targets`` and its (K, *shape) views per target.

        Rows are padded so that consecutive rows start 64 bytes apart modulo 4 KiB: with a
        power-of-two row length (a 512 x 512 weight, say) every row would map to the same cache
        sets and the column chunks of the Gramian would thrash (measured 1.5x slower at K = 40).
        The buffer is reused across calls when ``reuse_buffers`` (no K x d allocation and page
        faults per step); the views are then valid until the engine's next call.
        """
        like = targets[0]
        numels = [t.numel() for t in targets]
        d = sum(numels)
        item = like.element_size()
        pad = ((64 - d * item) % 4096) // item
        shape = (k, d + pad)
        key = (slot, shape, like.dtype, like.device)
        reuse = reuse and self.reuse_buffers
        buf = self._workspace.get(key) if reuse else None
        if buf is None:
            buf = like.new_empty(shape)
            buf[:, d:].zero_()  # the padding is never written: zeros, so the whole buffer can be reduced
            if reuse:
                if len(self._workspace) > 64:  # shapes keep changing (e.g. varying batch sizes)
                    self._workspace.clear()
                self._workspace[key] = buf
        matrix = buf[:, :d]
        views, offset = [], 0
        for t, n in zip(targets, numels, strict=True):
            views.append(matrix[:, offset : offset + n].view(k, *t.shape))
            offset += n
        return matrix, views

    def _strategy_for(self, device: torch.device) -> str:
        return default_strategy(device) if self.strategy == "auto" else self.strategy

    # -- inputs -------------------------------------------------------------------------------
    def task_specific_lists(
        self,
        names: Sequence[str] | None,
        task_specific: TaskParams,
        losses: Sequence[Tensor],
        exclude: Sequence[Tensor],
    ) -> tuple[list[Tensor], list[list[int]]]:
        """All task-specific parameters and, per task, the indices of those whose gradient it is
        asked for.

        ``task_specific`` may map task names to their parameters (a parameter listed under several
        tasks gets the gradients of all of them), list them all (every task is asked for every
        one), or be ``None``: then the leaf tensors reachable from the losses that are not in
        ``exclude`` are found by walking the autograd graph (without walking past ``exclude``).

        A map is verified once per engine and split: a parameter listed only under task a but read
        by task b's loss would silently miss b's gradient, so it raises :class:`EngineError` (list
        it under every task that reads it, or among the shared parameters). Asking every task for
        every parameter instead would cost K x (number of task parameters) autograd inputs per step
        (measured +15% for MGDA-UB at K = 40).
        """
        excluded = {id(p) for p in exclude}
        if isinstance(task_specific, Mapping):
            order = list(names) if names is not None else list(task_specific)
            unknown = set(task_specific) - set(order)
            if unknown:
                raise EngineError(f"task_specific names unknown tasks {sorted(unknown)}; tasks are {order}.")
            params: list[Tensor] = []
            index: dict[int, int] = {}
            per_task: list[list[int]] = []
            for name in order:
                idx = []
                for p in as_param_list(task_specific.get(name, ())):
                    if id(p) in excluded:
                        continue
                    if id(p) not in index:
                        index[id(p)] = len(params)
                        params.append(p)
                    idx.append(index[id(p)])
                per_task.append(idx)
            self._verify_split(order, losses, params, per_task)
            return params, per_task
        if task_specific is None:
            stops = {id(t.grad_fn) for t in exclude if t.grad_fn is not None}
            params = [p for p in reachable_leaves(losses, stops) if id(p) not in excluded]
        else:
            params = [p for p in as_param_list(task_specific) if id(p) not in excluded]
        every = list(range(len(params)))
        return params, [every for _ in losses]

    def _verify_split(
        self,
        names: list[str],
        losses: Sequence[Tensor],
        params: list[Tensor],
        per_task: list[list[int]],
    ) -> None:
        key = (tuple(id(p) for p in params), tuple(tuple(idx) for idx in per_task))
        if key in self._verified_splits:
            return
        owners: dict[int, set[int]] = {}
        for task, idx in enumerate(per_task):
            for i in idx:
                owners.setdefault(id(params[i]), set()).add(task)
        # the walk goes below a representation too: task-specific parameters may lie there
        for task, loss in enumerate(losses):
            if not loss.requires_grad:
                continue
            for p in reachable_leaves([loss], set()):
                holders = owners.get(id(p))
                if holders is not None and task not in holders:
                    listed = ", ".join(repr(names[t]) for t in sorted(holders))
                    raise EngineError(
                        f"A task-specific parameter of shape {tuple(p.shape)} is listed under task(s) "
                        f"{listed} but task {names[task]!r} reads it too; its gradient would be lost. "
                        "List it under every task that reads it (task_parameters()), or among the "
                        "shared parameters." + _compiled_hint([loss])
                    )
        self._verified_splits.add(key)

    def _per_task_loop(
        self,
        losses: Sequence[Tensor],
        targets: list[Tensor],
        heads: list[Tensor],
        per_task: list[list[int]],
        keep_graph: bool,
        owned: bool = False,
        unreached: list[int] | None = None,
    ) -> tuple[Tensor | None, list[Tensor], HeadGradients]:
        """One ``autograd.grad`` per task: the targets' gradients (a K x d matrix when the targets
        share dtype and device, and its (K, *shape) views), and the head gradients. The last call
        frees the graph unless ``keep_graph``. ``owned``: a fresh matrix that the engine never
        reuses (for callers that keep the gradients beyond the engine's next call)."""
        k = len(losses)
        same_kind = all(t.dtype == targets[0].dtype and t.device == targets[0].device for t in targets)
        if same_kind:  # representation and parameter buffers never alias (slots 0 and 1)
            matrix, blocks = self._matrix(0 if keep_graph else 1, targets, k, reuse=not owned)
        else:
            matrix, blocks = None, [t.new_empty((k, *t.shape)) for t in targets]
        head_grads: list[list[tuple[int, Tensor]]] = [[] for _ in heads]
        n = len(targets)
        for task, loss in enumerate(losses):
            idx = per_task[task]
            grads = _task_grad(loss, targets + [heads[i] for i in idx], keep_graph or task < k - 1)
            if unreached is not None and loss.requires_grad and all(g is None for g in grads[:n]):
                unreached.append(task)
            for b, g in zip(blocks, grads[:n], strict=True):
                if g is None:
                    b[task].zero_()
                else:
                    b[task].copy_(g)
            for i, g in zip(idx, grads[n:], strict=True):
                if g is not None:
                    head_grads[i].append((task, g))
        return matrix, blocks, HeadGradients(heads, head_grads)

    # -- path (a) and (c) ------------------------------------------------------------------------
    def jacobian(
        self,
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        task_specific: TaskParams = None,
        *,
        names: Sequence[str] | None = None,
        owned: bool = False,
    ) -> ParameterJacobian:
        """Per-task gradients w.r.t. ``shared`` (and task-specific parameters), kept as blocks.

        The autograd graph is freed; ``.grad`` is not touched. With ``owned`` the blocks are in
        memory that the engine never reuses, so the caller may keep them across steps.
        """
        shared = as_param_list(shared)
        if not shared:
            raise EngineError("No trainable shared parameters were given to the gradient engine.")
        heads, per_task = self.task_specific_lists(names, task_specific, losses, shared)
        if self._strategy_for(shared[0].device) == "batched":
            grads = _batched_task_grads(
                losses, shared, retain_graph=bool(heads)
            )  # heads come after the solve
            return ParameterJacobian(shared, list(grads), DeferredHeadGradients(heads, list(losses)))
        matrix, blocks, head_grads = self._per_task_loop(losses, shared, heads, per_task, False, owned)
        return ParameterJacobian(shared, blocks, head_grads, matrix)

    def parameter_gramian(
        self,
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        task_specific: TaskParams = None,
        *,
        names: Sequence[str] | None = None,
    ) -> tuple[Tensor, ParameterJacobian]:
        """``(G, J)``: the float64 Gramian of the shared-parameter gradients, and the blocks."""
        jac = self.jacobian(losses, shared, task_specific, names=names)
        return jac.gramian(self.chunk_bytes, self.precision), jac

    def task_gradient_norms(self, losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """``||dL_k/dparams||_2`` for each task as a float64 (K,) tensor; the graph is kept.

        K vector-Jacobian products that stop at ``params`` (GradNorm's chosen shared layer): each
        traverses only the part of the graph between the loss and those parameters. Nothing is
        stored but the norms, and ``.grad`` is not touched. A task whose loss does not depend on
        ``params`` (or has no labelled sample) gets norm 0. Each block's norm is reduced in the
        gradient's own precision (float32 reductions are accurate to ~1e-6 relative, plenty for a
        weighting; an upcast copy of every block cost more than the VJP's weight product) and the
        blocks are combined in float64.
        """
        params = as_param_list(params)
        if not params:
            raise EngineError("task_gradient_norms() got no parameters.")
        k = len(losses)
        device = params[0].device
        live = [i for i, loss in enumerate(losses) if loss.requires_grad]
        if not live:
            return torch.zeros(k, dtype=torch.float64, device=device)
        if self._strategy_for(device) == "batched" and len(live) > 1:
            grads = _batched_task_grads([losses[i] for i in live], params, retain_graph=True)
            sq = sum(
                torch.linalg.vector_norm(g.reshape(len(live), -1), dim=1).double().square() for g in grads
            )
            live_norms = sq.sqrt()
        else:
            per_task = []
            for i in live:
                grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
                blocks = [g for g in grads if g is not None]
                if not blocks:
                    per_task.append(torch.zeros((), dtype=torch.float64, device=device))
                    continue
                norms = (
                    torch.stack(torch._foreach_norm(blocks))
                    if len(blocks) > 1
                    else torch.linalg.vector_norm(blocks[0])[None]
                )
                per_task.append(torch.linalg.vector_norm(norms.double()))
            live_norms = torch.stack(per_task)
        if len(live) == k:
            return live_norms
        out = torch.zeros(k, dtype=torch.float64, device=device)
        out[live] = live_norms
        return out

    def task_gradients(self, losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """Every task's gradient w.r.t. ``params`` as one flat (K, d) matrix; the graph is kept and
        ``.grad`` is not touched (zeros for a task that does not reach ``params``). For a
        statistic that needs the gradients themselves, e.g. averaged across data-parallel ranks
        before their norms are taken."""
        params = as_param_list(params)
        if not params:
            raise EngineError("task_gradients() got no parameters.")
        rows = params[0].new_zeros((len(losses), sum(p.numel() for p in params)))
        for task, loss in enumerate(losses):
            offset = 0
            for p, g in zip(params, _task_grad(loss, params, True), strict=True):
                if g is not None:
                    rows[task, offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
        return rows

    # -- path (b) ---------------------------------------------------------------------------------
    def representation_gradients(
        self,
        losses: Sequence[Tensor],
        representation: Tensor | Mapping[str, Tensor],
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
        shared: Sequence[Tensor] | None = None,
    ) -> RepresentationGradients:
        """K head backwards to the shared representation; the trunk graph is kept.

        ``representation`` is one tensor that every task reads, or ``{task: tensor}`` (per-task
        representations of one shape; task k's gradient is taken w.r.t. its own entry, and task
        k's loss must not read another task's entry).

        With ``task_specific`` given as ``{task: [parameters]}`` and ``shared`` given, a
        task-specific parameter may also lie below the representation: it gets its own gradient
        (through the representation) with the heads, and the trunk backward writes ``shared`` only.
        """
        names = list(names) if names is not None else [str(i) for i in range(len(losses))]
        restrict = (
            as_param_list(shared) if shared is not None and isinstance(task_specific, Mapping) else None
        )
        prepared, self._prepared = self._prepared, None
        if prepared is not None and not isinstance(representation, Mapping):
            key, ready = prepared
            if key == _key(losses, representation):  # computed ahead: no backward pass at all
                ready.shared = restrict
                return ready
        if isinstance(representation, Mapping):
            rep = self._per_task_representation_gradients(losses, representation, names, task_specific)
        else:
            _check_representation(representation, "the shared representation")
            heads, per_task = self.task_specific_lists(names, task_specific, losses, [representation])
            unreached: list[int] = []
            _, blocks, head_grads = self._per_task_loop(
                losses, [representation], heads, per_task, True, unreached=unreached
            )
            live = [k for k, loss in enumerate(losses) if loss.requires_grad]
            if live and len(unreached) == len(live):
                raise EngineError(
                    "No task loss reaches the shared representation through the autograd graph, so its "
                    "per-task gradients do not exist." + _compiled_hint(losses)
                )
            rep = RepresentationGradients([representation], blocks[0], head_grads)
        rep.shared = restrict
        return rep

    def _per_task_representation_gradients(
        self,
        losses: Sequence[Tensor],
        representation: Mapping[str, Tensor],
        names: list[str],
        task_specific: TaskParams,
    ) -> RepresentationGradients:
        missing = [n for n in names if n not in representation]
        if missing or len(representation) != len(names):
            raise EngineError(
                f"A per-task representation needs one entry per task: tasks {names}, entries "
                f"{sorted(representation)}."
            )
        zs = [representation[n] for n in names]
        for n, z in zip(names, zs, strict=True):
            _check_representation(z, f"representation[{n!r}]")
        if any(z.shape != zs[0].shape for z in zs):
            raise EngineError(
                "Per-task representations must share one shape (their gradients are compared "
                f"position by position); got {[tuple(z.shape) for z in zs]}."
            )
        heads, per_task = self.task_specific_lists(names, task_specific, losses, zs)
        k = len(losses)
        rep_grads = zs[0].new_zeros((k, *zs[0].shape))
        head_grads: list[list[tuple[int, Tensor]]] = [[] for _ in heads]
        for task, loss in enumerate(losses):
            idx = per_task[task]
            grads = _task_grad(loss, zs + [heads[i] for i in idx], True)
            for j, g in enumerate(grads[:k]):
                if g is None:
                    continue
                if j != task:
                    raise EngineError(
                        f"The loss of task {names[task]!r} reads representation[{names[j]!r}]: with "
                        "per-task representations each task must read only its own entry. Return "
                        "one shared tensor instead."
                    )
                rep_grads[task].copy_(g)
            for i, g in zip(idx, grads[k:], strict=True):
                if g is not None:
                    head_grads[i].append((task, g))
        return RepresentationGradients(zs, rep_grads, HeadGradients(heads, head_grads))

    def representation_saliency(
        self,
        losses: Sequence[Tensor],
        representation: Tensor,
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
        *,
        prepare: bool = False,
    ) -> Tensor:
        """Per-task gradients w.r.t. the shared representation, ``(K, *z.shape)``, as a
        differentiable function of the model (``create_graph``): a regulariser of them (Rep-MTL's
        saliency) back-propagates into the heads and the trunk. A task whose loss does not reach
        the representation gets zeros. The forward graph is kept.

        With ``prepare`` the heads' gradients are taken in the same passes and the detached
        result is kept for the next :meth:`representation_gradients` call on these losses and this
        representation, which then costs no backward pass (a representation-level method after
        the regulariser).
        """
        _check_representation(representation, "the shared representation")
        names = list(names) if names is not None else [str(i) for i in range(len(losses))]
        heads: list[Tensor] = []
        per_task: list[list[int]] = [[] for _ in losses]
        if prepare:
            heads, per_task = self.task_specific_lists(names, task_specific, losses, [representation])
        rows: list[Tensor] = []
        head_grads: list[list[tuple[int, Tensor]]] = [[] for _ in heads]
        for task, loss in enumerate(losses):
            idx = per_task[task]
            if not loss.requires_grad:
                rows.append(torch.zeros_like(representation))
                continue
            grads = torch.autograd.grad(
                loss, [representation] + [heads[i] for i in idx], create_graph=True, allow_unused=True
            )
            rows.append(grads[0] if grads[0] is not None else torch.zeros_like(representation))
            for i, g in zip(idx, grads[1:], strict=True):
                if g is not None:
                    head_grads[i].append((task, g.detach()))
        saliency = torch.stack(rows)
        if prepare:
            ready = RepresentationGradients(
                [representation], saliency.detach(), HeadGradients(heads, head_grads)
            )
            self._prepared = (_key(losses, representation), ready)
        return saliency

    def representation_gramian(
        self,
        losses: Sequence[Tensor],
        representation: Tensor | Mapping[str, Tensor],
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
        shared: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, RepresentationGradients]:
        rep = self.representation_gradients(losses, representation, names, task_specific, shared)
        return rep.gramian(self.chunk_bytes, self.precision), rep


def _key(losses: Sequence[Tensor], representation: Tensor) -> tuple[int, ...]:
    # the losses reach a method as fresh views of the same tensors, so only their number is
    # compared; a prepared result is used once, by the very next call
    return (id(representation), len(losses))


def _compiled_hint(roots: Sequence[Tensor]) -> str:
    """A hint for errors whose cause may be a whole-model ``torch.compile`` (one opaque graph node
    that outputs the representation and every prediction)."""
    if any(type(node).__name__.startswith("CompiledFunction") for node in _graph_nodes(roots, set())):
        return (
            " The model looks compiled as a whole (torch.compile(model)): one compiled graph hides "
            "which part each loss reads. Compile its parts instead: mtlkit.models.compile_parts(model)."
        )
    return ""


def _check_representation(z: Tensor, what: str) -> None:
    if not isinstance(z, Tensor) or not z.requires_grad or z.grad_fn is None:
        raise EngineError(
            f"The representation level needs {what} as a non-leaf tensor that requires grad (from "
            "model(x, full_output=True).representation after a forward in training mode)."
        )


def _batched_task_grads(
    losses: Sequence[Tensor], inputs: list[Tensor], retain_graph: bool
) -> tuple[Tensor, ...]:
    """Every task's gradient w.r.t. ``inputs`` in one vmapped backward: block i has shape
    ``(K, *inputs[i].shape)`` (zeros where a loss does not reach an input)."""
    stacked = torch.stack([loss.to(torch.promote_types(loss.dtype, torch.float32)) for loss in losses])
    return torch.autograd.grad(
        stacked,
        inputs,
        grad_outputs=torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device),
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )


def _task_grad(loss: Tensor, inputs: list[Tensor], retain_graph: bool) -> tuple[Tensor | None, ...]:
    if not loss.requires_grad:  # a task with no labelled sample, or a constant loss
        return tuple(None for _ in inputs)
    return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)


def reachable_leaves(roots: Sequence[Tensor], stops: set[int]) -> list[Tensor]:
    """Leaf tensors that require grad and are reachable from ``roots`` in the autograd graph,
    without walking past the nodes whose ids are in ``stops`` (the shared representation)."""
    leaves: list[Tensor] = []
    leaf_ids: set[int] = set()
    for node in _graph_nodes(roots, stops):
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in leaf_ids:
            leaf_ids.add(id(var))
            leaves.append(var)
    return leaves


def _graph_nodes(roots: Sequence[Tensor], stops: set[int]) -> Iterator[Any]:
    """Every autograd node reachable from ``roots``, once, without walking past the nodes whose
    ids are in ``stops``."""
    seen: set[int] = set(stops)
    alive: list[object] = []  # keeps visited nodes alive so their ids stay unique during the walk
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)

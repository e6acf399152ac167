"""The gradient engine: the one place in mtlkit that computes per-task gradients.

Three paths behind one object, all fed with *separate scalar task losses* (never elements of a
stacked loss vector back-propagated one at a time, which makes every backward visit all K heads):

(a) :meth:`GradientEngine.parameter_gramian` -- the K x K Gramian ``G = J J^T`` of the per-task
    gradients w.r.t. the shared parameters. Each task's gradient is written into per-parameter
    blocks ``J_p`` (K x shape_p); ``G`` is accumulated block by block and column chunk by column
    chunk in float64, so neither a concatenated K x d matrix nor a float64 copy of ``J`` exists.
    (The K gradients themselves must all be alive to form ``G``; they are kept in float32 in the
    model's dtype and reused for the final combination, which is cheaper than a second backward.)
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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mtlkit.errors import EngineError

Strategy = Literal["auto", "loop", "batched"]
HeadGrad = Literal["own", "weighted"]
TaskParams = Mapping[str, Sequence[Tensor]] | Sequence[Tensor] | None

#: Columns per chunk times K: bounds the transient float64 copy used to accumulate a Gramian.
DEFAULT_CHUNK_NUMEL = 1 << 22


def default_strategy(device: torch.device) -> Literal["loop", "batched"]:
    """The per-task gradient strategy for a device.

    On CPU a plain loop of ``autograd.grad`` calls measured fastest (anchors spec §5.3: 137-153 ms vs
    143-171 ms for the vmapped Jacobian at K = 40). GPUs are also served by the loop until a
    measurement on the device shows the batched VJP to win (see benchmarks/results/step_cost.md).
    """
    return "loop"


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


def accumulate_gramian(blocks: Iterable[Tensor], k: int, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> Tensor:
    """``sum_b B_b B_b^T`` in float64 over blocks of shape (K, ...), chunked over columns.

    Only one chunk is ever held in float64, so the transient memory is at most ``chunk_numel``
    float64 numbers whatever the number of parameters.
    """
    gram: Tensor | None = None
    cols = max(1, chunk_numel // max(k, 1))
    for block in blocks:
        flat = block.reshape(k, -1)
        for start in range(0, flat.shape[1], cols):
            chunk = flat[:, start : start + cols].to(torch.float64)
            prod = chunk @ chunk.T
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
class ParameterJacobian:
    """Per-task gradients w.r.t. the shared parameters, as one (K, *shape) block per parameter.

    ``head_grads[i]`` is the (K, *shape) block of task-specific parameter ``heads[i]`` (row k =
    dL_k/dphi; zero for tasks that do not use it).
    """

    shared: list[Tensor]
    blocks: list[Tensor]
    heads: list[Tensor]
    head_grads: list[Tensor]

    @property
    def num_tasks(self) -> int:
        return self.blocks[0].shape[0] if self.blocks else self.head_grads[0].shape[0]

    def flat(self) -> Tensor:
        """The K x d Jacobian as one matrix (allocates; only for methods that need it whole)."""
        return torch.cat([b.reshape(self.num_tasks, -1) for b in self.blocks], dim=1)

    def gramian(self, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> Tensor:
        return accumulate_gramian(self.blocks, self.num_tasks, chunk_numel)

    def write_shared(self, directions: Sequence[Tensor]) -> None:
        """Add one direction per shared parameter into ``.grad``."""
        for p, d in zip(self.shared, directions, strict=True):
            _add_grad(p, d, fresh=False)

    def write_shared_weighted(self, weights: Tensor) -> None:
        """Add ``J^T w`` into the shared parameters' ``.grad``."""
        for p, b in zip(self.shared, self.blocks, strict=True):
            _add_grad(p, combine_blocks(weights, b))

    def write_heads(self, weights: Tensor | None) -> None:
        """Add each task-specific parameter's gradient: own (``weights=None``) or weighted."""
        for p, g in zip(self.heads, self.head_grads, strict=True):
            _add_grad(p, g.sum(0) if weights is None else combine_blocks(weights, g))


@dataclass
class RepresentationGradients:
    """Per-task gradients w.r.t. the shared representation ``z`` and the task-specific parameters."""

    features: Tensor
    rep_grads: Tensor  # (K, *z.shape)
    heads: list[Tensor]
    head_grads: list[Tensor]

    @property
    def num_tasks(self) -> int:
        return self.rep_grads.shape[0]

    def gramian(self, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> Tensor:
        """Elementwise Gramian: inner products over all B x r entries (the official MGDA-UB)."""
        return accumulate_gramian([self.rep_grads], self.num_tasks, chunk_numel)

    def backward_shared(self, weights: Tensor) -> None:
        """One trunk backward with the cotangent ``sum_k w_k dL_k/dz``; frees the graph."""
        cotangent = combine_blocks(weights, self.rep_grads)
        torch.autograd.backward(self.features, grad_tensors=cotangent)

    def write_heads(self, weights: Tensor | None) -> None:
        for p, g in zip(self.heads, self.head_grads, strict=True):
            _add_grad(p, g.sum(0) if weights is None else combine_blocks(weights, g))


class GradientEngine:
    """Computes per-task gradients; see the module docstring.

    Args:
        strategy: ``"loop"``, ``"batched"`` or ``"auto"`` (per device, :func:`default_strategy`).
        chunk_numel: bound on the transient float64 chunk used to accumulate Gramians.
    """

    def __init__(self, strategy: Strategy = "auto", chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> None:
        if strategy not in ("auto", "loop", "batched"):
            raise EngineError(f"Unknown engine strategy {strategy!r}; use 'auto', 'loop' or 'batched'.")
        self.strategy = strategy
        self.chunk_numel = chunk_numel

    def _strategy_for(self, device: torch.device) -> str:
        return default_strategy(device) if self.strategy == "auto" else self.strategy

    # -- inputs -------------------------------------------------------------------------------
    @staticmethod
    def task_specific_lists(
        names: Sequence[str], task_specific: TaskParams, losses: Sequence[Tensor], exclude: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[list[int]]]:
        """All task-specific parameters and, per task, the indices of those it may reach.

        ``task_specific`` may map task names to their parameters, list them all, or be ``None``,
        in which case the leaf tensors reachable from the losses that are not in ``exclude``
        are found by walking the autograd graph.
        """
        excluded = {id(p) for p in exclude}
        if isinstance(task_specific, Mapping):
            unknown = set(task_specific) - set(names)
            if unknown:
                raise EngineError(
                    f"task_specific names unknown tasks {sorted(unknown)}; tasks are {list(names)}."
                )
            params: list[Tensor] = []
            index: dict[int, int] = {}
            per_task: list[list[int]] = []
            for name in names:
                idx = []
                for p in as_param_list(task_specific.get(name, ())):
                    if id(p) in excluded:
                        continue
                    if id(p) not in index:
                        index[id(p)] = len(params)
                        params.append(p)
                    idx.append(index[id(p)])
                per_task.append(idx)
            return params, per_task
        if task_specific is None:
            stops = {id(t.grad_fn) for t in exclude if t.grad_fn is not None}
            params = [p for p in _reachable_leaves(losses, stops) if id(p) not in excluded]
        else:
            params = [p for p in as_param_list(task_specific) if id(p) not in excluded]
        all_idx = list(range(len(params)))
        return params, [all_idx for _ in names]

    # -- path (a) and (c) ------------------------------------------------------------------------
    def jacobian(
        self,
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
    ) -> ParameterJacobian:
        """Per-task gradients w.r.t. ``shared`` (and task-specific parameters), kept as blocks.

        The autograd graph is freed at the end; ``.grad`` is not touched.
        """
        names = list(names) if names is not None else [str(i) for i in range(len(losses))]
        shared = as_param_list(shared)
        if not shared:
            raise EngineError("No trainable shared parameters were given to the gradient engine.")
        heads, per_task = self.task_specific_lists(names, task_specific, losses, shared)
        k = len(losses)
        strategy = self._strategy_for(shared[0].device)
        if strategy == "batched":
            inputs = shared + heads
            grads = torch.autograd.grad(
                torch.stack(list(losses)),
                inputs,
                grad_outputs=torch.eye(k, dtype=losses[0].dtype, device=losses[0].device),
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
            blocks = list(grads[: len(shared)])
            head_grads = list(grads[len(shared) :])
            return ParameterJacobian(shared, blocks, heads, head_grads)

        blocks = [p.new_empty((k, *p.shape)) for p in shared]
        head_grads = [p.new_zeros((k, *p.shape)) for p in heads]
        for t, loss in enumerate(losses):
            head_idx = per_task[t]
            inputs = shared + [heads[i] for i in head_idx]
            grads = _task_grad(loss, inputs, retain_graph=t < k - 1)
            for b, g in zip(blocks, grads[: len(shared)], strict=True):
                if g is None:
                    b[t].zero_()
                else:
                    b[t].copy_(g)
            for i, g in zip(head_idx, grads[len(shared) :], strict=True):
                if g is not None:
                    head_grads[i][t].copy_(g)
        return ParameterJacobian(shared, blocks, heads, head_grads)

    def parameter_gramian(
        self,
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
    ) -> tuple[Tensor, ParameterJacobian]:
        """``(G, J)``: the float64 Gramian of the shared-parameter gradients, and the blocks."""
        jac = self.jacobian(losses, shared, names, task_specific)
        return jac.gramian(self.chunk_numel), jac

    # -- path (b) ---------------------------------------------------------------------------------
    def representation_gradients(
        self,
        losses: Sequence[Tensor],
        features: Tensor,
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
    ) -> RepresentationGradients:
        """K head backwards to the shared representation ``features``; the trunk graph is kept."""
        if not isinstance(features, Tensor) or not features.requires_grad or features.grad_fn is None:
            raise EngineError(
                "The representation level needs the shared representation as a non-leaf tensor that "
                "requires grad (e.g. model.last_features after a forward in training mode)."
            )
        names = list(names) if names is not None else [str(i) for i in range(len(losses))]
        heads, per_task = self.task_specific_lists(names, task_specific, losses, [features])
        k = len(losses)
        rep_grads = features.new_empty((k, *features.shape))
        head_grads = [p.new_zeros((k, *p.shape)) for p in heads]
        for t, loss in enumerate(losses):
            head_idx = per_task[t]
            grads = _task_grad(loss, [features] + [heads[i] for i in head_idx], retain_graph=True)
            if grads[0] is None:
                rep_grads[t].zero_()
            else:
                rep_grads[t].copy_(grads[0])
            for i, g in zip(head_idx, grads[1:], strict=True):
                if g is not None:
                    head_grads[i][t].copy_(g)
        return RepresentationGradients(features, rep_grads, heads, head_grads)

    def representation_gramian(
        self,
        losses: Sequence[Tensor],
        features: Tensor,
        names: Sequence[str] | None = None,
        task_specific: TaskParams = None,
    ) -> tuple[Tensor, RepresentationGradients]:
        rep = self.representation_gradients(losses, features, names, task_specific)
        return rep.gramian(self.chunk_numel), rep


def _task_grad(loss: Tensor, inputs: list[Tensor], retain_graph: bool) -> tuple[Tensor | None, ...]:
    if not loss.requires_grad:  # a task with no labelled sample, or a constant loss
        return tuple(None for _ in inputs)
    return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)


def _reachable_leaves(roots: Sequence[Tensor], stops: set[int]) -> list[Tensor]:
    """Leaf tensors that require grad and are reachable from ``roots`` in the autograd graph,
    without walking past the nodes whose ids are in ``stops`` (the shared representation)."""
    seen: set[int] = set(stops)
    alive: list[object] = []  # keeps visited nodes alive so their ids stay unique
    leaves: list[Tensor] = []
    leaf_ids: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in leaf_ids:
            leaf_ids.add(id(var))
            leaves.append(var)
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves

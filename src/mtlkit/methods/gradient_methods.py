"""The gradient families: methods that need per-task gradients from the engine, either their
Gramian (:class:`GramianWeighting`) or the gradients themselves (:class:`JacobianAggregator`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mtlkit.core.distributed import DataParallel
from mtlkit.core.engine import (
    DeferredHeadGradients,
    GradientEngine,
    HeadGrad,
    HeadGradients,
    reachable_leaves,
)
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import DistributedError, EngineError, NonFiniteGradientError
from mtlkit.methods.base import Method, StepInfo, StepInputs
from mtlkit.methods.hparams import hparam, instance_of, none, number, one_of

Level = Literal["parameter", "representation"]


def gradient_statistics(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task gradient norms and pairwise cosines from a Gramian (zero norms give cosine 0)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return norms, cos


class GradientMethod(Method):
    """Shared options of the methods that need per-task gradients from the engine."""

    level: Level = hparam(
        "parameter",
        one_of("parameter", "representation"),
        "where the task gradients are taken: the shared parameters, or the shared representation",
    )
    head_grad: HeadGrad = hparam(
        "weighted",
        one_of("own", "weighted"),
        "task-specific parameters get their own or the weighted gradient",
    )
    engine: GradientEngine | None = hparam(
        None, instance_of(GradientEngine) | one_of(None), "the gradient engine", config=False
    )

    @property
    def needs_representation(self) -> bool:
        return self.level == "representation"

    def _dispatch(self, inputs: StepInputs) -> StepInfo:
        if inputs.knows_shared and not inputs.shared:
            return self._nothing_shared_step(inputs)
        return self._step(inputs)

    def _nothing_shared_step(self, inputs: StepInputs) -> StepInfo:
        """A model with no shared parameter (soft parameter sharing): there is nothing to combine,
        so every task's parameters get their own gradient, whatever the method."""
        if not self.__dict__.get("_warned_nothing_shared"):
            self.__dict__["_warned_nothing_shared"] = True
            warnings.warn(
                f"{type(self).__name__}: the model has no shared parameters, so there is nothing to "
                "combine; every task's parameters get their own gradient (as with EW).",
                stacklevel=4,
            )
        live = [v for k, v in enumerate(inputs.values) if v.requires_grad and bool(inputs.active[k])]
        if live:
            torch.stack(live).sum().backward()
        w = inputs.active.to(torch.float64)
        return StepInfo(inputs.names, w, inputs.losses, level=self.level, extras={"nothing_shared": True})

    def _engine(self) -> GradientEngine:
        if self.engine is None:
            self.__dict__["engine"] = GradientEngine()
        return self.engine  # type: ignore[return-value]

    def _max_norm(self) -> float | None:
        """The ``max_norm`` a subclass declares (the norm the shared update is clipped to)."""
        return getattr(self, "max_norm", None)

    def _representation(self, inputs: StepInputs) -> Any:
        rep = inputs.output.representation if inputs.output is not None else None
        if rep is None:
            raise EngineError(
                f"{type(self).__name__}(level='representation') needs the shared representation: pass "
                "output=model(x, full_output=True) to backward()."
            )
        return rep

    def _shared(self, inputs: StepInputs) -> list[Tensor]:
        if not inputs.knows_shared:
            raise EngineError(
                f"{type(self).__name__} needs the shared parameters: pass the model (or shared=) to backward()."
            )
        return inputs.shared


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite, in one reduction (``isfinite(t).all()`` writes a K x d mask:
    25x slower at K = 40 on the benchmark model); NaN and infinities reach the min or the max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def clip_factor(norm: Tensor | float, max_norm: float | None) -> Tensor | float:
    """The factor ``min(1, max_norm / norm)`` of ``torch.nn.utils.clip_grad_norm_`` (1 when
    ``max_norm`` is ``None``); ``norm`` may be a tensor (no host sync)."""
    if max_norm is None:
        return 1.0
    if isinstance(norm, Tensor):
        return (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return min(1.0, max_norm / (norm + 1e-6))


def clipped_trunk_backward(
    features: list[Tensor],
    cotangents: list[Tensor],
    shared: list[Tensor],
    max_norm: float,
    inputs: StepInputs,
) -> None:
    """Back-propagate representation cotangents into the shared parameters with the norm of the
    resulting (unscaled) gradient clipped to ``max_norm``; frees the graph. Under DDP the gradient
    is averaged across ranks first, so the clip sees the global norm."""
    grads = torch.autograd.grad(
        features,
        shared,
        grad_outputs=cotangents,
        allow_unused=True,
        materialize_grads=inputs.parallel is not None,
    )
    inputs.average_now([g for g in grads if g is not None], shared)
    present = [g for g in grads if g is not None]
    if not present:
        return
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in present]))
    factor = clip_factor(norm / inputs.scale, max_norm)
    for p, g in zip(shared, grads, strict=True):
        if g is not None:
            g = (g * factor).to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)


def active_subset(active: Tensor) -> Tensor | None:
    """Indices of the active tasks (a host sync), or ``None`` when every task is active."""
    flags = active.detach().cpu()
    return None if bool(flags.all()) else flags.nonzero().squeeze(1)


class GramianWeighting(GradientMethod):
    """A method whose shared direction is ``J^T w`` with ``w = f(G)`` (G = J J^T).

    Subclasses implement :meth:`weights` on the Gramian of the active tasks (those with a labelled
    sample); tasks without one get weight 0. During the call ``self.active_index`` holds the
    indices of those tasks in the task list (for methods with per-task state, e.g. a warm start).

    Shared by every Gramian method:

    - ``update_every=n`` solves for new weights every n-th step only and reuses them in between,
      where a step costs one ordinary backward of ``sum_k w_k L_k`` (no per-task gradients).
      Nash-MTL's ``update_weights_every``, offered for every method. A task that was inactive at
      the last solve keeps weight 0 until the next one.
    - A subclass that declares a ``max_norm`` hyper-parameter has the norm of the shared update
      clipped to it, as ``torch.nn.utils.clip_grad_norm_`` on the shared parameters after the
      weighted backward does in the official Nash-MTL / FairGrad / DiBS-MTL code: the factor is
      computed from the Gramian (``||J^T w|| = sqrt(w^T G w)``) and applied to the shared
      weights only; heads are not clipped.
    """

    update_every: int = hparam(
        1,
        number(ge=1, integer=True),
        "solve for new weights every n steps; in between, reuse them with one ordinary backward",
    )
    task_sample: int | None = hparam(
        None,
        number(ge=1, integer=True) | none(),
        "an approximation for many tasks: each solve uses a random subset of this many tasks (the "
        "others get weight 0 in the shared update that step and train their own parameters only)",
    )
    task_sample_seed: int = hparam(0, number(integer=True), "seed of the task sampler")
    ddp_gramian: Literal["exact", "local"] = hparam(
        "exact",
        one_of("exact", "local"),
        "under DDP at the parameter level: average the per-task gradients across ranks (exact; K x d "
        "per solve) or the ranks' local Gramians (an approximation that overestimates the Gramian "
        "by the between-rank variance; K x K per solve)",
    )
    active_index: Tensor | None = None
    reused_weights: Tensor

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """float64 weights (A,) from the float64 A x A Gramian of the active tasks and their
        unscaled losses."""
        raise NotImplementedError

    # -- family state ------------------------------------------------------------------------------
    def _build_family(self, tasks: TaskSet) -> None:
        self._steps = 0
        self.register_buffer("reused_weights", torch.zeros(len(tasks), dtype=torch.float64))
        self._sampler = torch.Generator().manual_seed(int(self.task_sample_seed))

    def _family_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": getattr(self, "_steps", 0)}
        if hasattr(self, "_sampler"):
            state["sampler"] = self._sampler.get_state()
        return state

    def _load_family_state(self, state: dict[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
        if "sampler" in state and hasattr(self, "_sampler"):
            self._sampler.set_state(state["sampler"])

    # -- the step ------------------------------------------------------------------------------------
    def _solve(self, gram: Tensor, inputs: StepInputs) -> Tensor:
        names = inputs.names
        if not bool(torch.isfinite(gram).all()):
            if inputs.loss_scale is not None:  # fp16 overflow: NaN weights make the GradScaler skip
                return torch.full((len(names),), float("nan"), dtype=torch.float64, device=gram.device)
            bad = [n for n, ok in zip(names, torch.isfinite(gram.diagonal()).tolist(), strict=True) if not ok]
            raise NonFiniteGradientError(
                f"Non-finite gradient for task(s) {bad or names} although the losses are finite; "
                "nothing was updated. Lower the learning rate or clip the inputs."
            )
        idx = active_subset(inputs.active)
        losses = inputs.losses.to(gram.device, torch.float64)
        positions = inputs.index if inputs.index is not None else torch.arange(len(names))
        try:
            if idx is None:
                self.active_index = positions
                return self.weights(gram, losses).to(torch.float64)
            w = torch.zeros(len(names), dtype=torch.float64, device=gram.device)
            if len(idx):
                self.active_index = positions[idx]
                sub = idx.to(gram.device)
                w[sub] = self.weights(gram[sub][:, sub], losses[sub]).to(torch.float64)
            return w
        finally:
            self.active_index = None  # valid during the call only

    def _step(self, inputs: StepInputs) -> StepInfo:
        reuse = self.update_every > 1 and self._steps % self.update_every != 0
        self._steps += 1
        if reuse:
            return self._reuse_step(inputs)
        self.__dict__["_reported"] = {}
        try:
            return self._solve_and_write(inputs)
        finally:
            self.__dict__["_reported"] = {}

    def _solve_and_write(self, inputs: StepInputs) -> StepInfo:
        pick = self._sample_tasks(inputs)
        if pick is None:
            w, gram = self._solve_step(inputs)
        else:
            left_out = [k for k in inputs.active.nonzero().squeeze(1).tolist() if k not in set(pick.tolist())]
            self._own_head_gradients(inputs, left_out)  # first: the engine frees the graph
            w_sampled, gram_sampled = self._solve_step(inputs.subset(pick))
            w = torch.zeros(len(inputs.names), dtype=torch.float64, device=w_sampled.device)
            w[pick.to(w.device)] = w_sampled
            gram = torch.full((len(w), len(w)), float("nan"), dtype=torch.float64, device=w.device)
            gram[pick.to(w.device)[:, None], pick.to(w.device)[None, :]] = gram_sampled
        if self.update_every > 1:
            self.reused_weights = w.detach().to(self.reused_weights.device).clone()
        norms, cos = gradient_statistics(gram)
        extras = self.step_extras()
        if pick is not None:
            extras["sampled_tasks"] = pick
        return StepInfo(
            inputs.names,
            w.detach(),
            inputs.losses,
            level=self.level,
            grad_norms=norms,
            cosines=cos,
            gramian=gram,
            extras=extras,
        )

    def _sample_tasks(self, inputs: StepInputs) -> Tensor | None:
        """The sorted indices of the tasks this solve uses, or ``None`` for every task."""
        if self.task_sample is None:
            return None
        active = inputs.active.detach().cpu().nonzero().squeeze(1)
        if len(active) <= self.task_sample:
            return None
        order = torch.randperm(len(active), generator=self._sampler)[: self.task_sample]
        return active[order].sort().values

    def _heads_of(self, inputs: StepInputs, tasks: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """The task-specific parameters of ``tasks``, and the tensors they stop at (the shared
        parameters, or the representation at the representation level)."""
        if self.level == "representation":
            rep = self._representation(inputs)
            exclude = list(rep.values()) if isinstance(rep, Mapping) else [rep]
        else:
            exclude = self._shared(inputs)
        heads, _ = self._engine().task_specific_lists(
            [inputs.names[k] for k in tasks],
            _live_task_params(inputs, tasks),
            [inputs.values[k] for k in tasks],
            exclude,
        )
        return heads, exclude

    def _own_head_gradients(self, inputs: StepInputs, tasks: list[int]) -> None:
        """Task-specific parameters of ``tasks`` get their own gradient (graph kept)."""
        if not tasks:
            return
        values = [inputs.values[k] for k in tasks]
        heads, _ = self._heads_of(inputs, tasks)
        if not heads:
            return
        grads = torch.autograd.grad(torch.stack(values).sum(), heads, retain_graph=True, allow_unused=True)
        for p, g in zip(heads, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    def _solve_step(self, inputs: StepInputs) -> tuple[Tensor, Tensor]:
        """Per-task gradients, the weights, and the shared and head gradients written."""
        engine = self._engine()
        own = self.head_grad == "own"
        rep = jac = None
        parallel = inputs.parallel
        if self.level == "representation":
            gram, rep = engine.representation_gramian(
                inputs.values,
                self._representation(inputs),
                inputs.names,
                inputs.task_specific,
                self._shared(inputs),
            )
            if parallel is not None:  # a sum over samples; each rank's rows carry its share R c/C
                gram = parallel.sum_(gram) / parallel.world_size**2
        else:
            jac = engine.jacobian(
                inputs.values, self._shared(inputs), inputs.task_specific, names=inputs.names
            )
            exact = self.ddp_gramian == "exact"
            if exact:  # J itself is global from here on, and so is J^T w
                inputs.average_now(jac.shared_blocks(), jac.shared)
            gram = jac.gramian(engine.chunk_bytes, engine.precision)
            if parallel is not None and not exact:
                gram = parallel.sum_(gram) / parallel.world_size
        gram = gram / inputs.scale**2
        w = self._solve(gram, inputs)
        shared_w = w
        max_norm = self._max_norm()
        if max_norm is not None and self.level == "parameter":
            shared_w = w * clip_factor((w @ gram @ w).clamp_min(0).sqrt(), max_norm)
        if rep is not None:
            if max_norm is None:
                rep.backward_shared(w)
            else:
                clipped_trunk_backward(
                    rep.features, rep.cotangents(w), self._shared(inputs), max_norm, inputs
                )
            rep.write_heads(None if own else w)
        elif jac is not None:
            jac.write_shared_weighted(shared_w)
            jac.write_heads(None if own else w)
        return w, gram

    def step_extras(self) -> dict[str, Any]:
        """Diagnostics of the last solve for ``StepInfo.extras`` (e.g. a solver residual); by
        default what :meth:`report` recorded during the step."""
        return dict(self.__dict__.get("_reported", {}))

    def report(self, **values: Any) -> None:
        """Record diagnostics from inside :meth:`weights` for this step's ``StepInfo.extras``."""
        self.__dict__.setdefault("_reported", {}).update(values)

    def _reuse_step(self, inputs: StepInputs) -> StepInfo:
        """A step between solves: the stored weights, one backward, no per-task gradients."""
        device = inputs.values[0].device
        w = torch.where(inputs.active, self.reused_weights.to(device), 0.0)
        self._weighted_backward(inputs, w)
        return StepInfo(inputs.names, w, inputs.losses, level=self.level, extras={"reused_weights": True})

    def _weighted_backward(self, inputs: StepInputs, w: Tensor, own_heads_scale: float | None = None) -> None:
        """Shared parameters get ``J^T w`` (clipped to ``max_norm``) from one backward of
        ``sum_k w_k L_k``; heads get the weighted gradient, or their own times
        ``own_heads_scale`` (default 1) with ``head_grad="own"`` or when it is given."""
        live = [k for k, v in enumerate(inputs.values) if v.requires_grad and bool(inputs.active[k])]
        if not live:
            return
        weighted = torch.stack([inputs.values[k] * w[k].to(inputs.values[k].dtype) for k in live]).sum()
        max_norm = self._max_norm()
        own = self.head_grad == "own" or own_heads_scale is not None
        if not own and max_norm is None:
            weighted.backward()
            return
        live_values = [inputs.values[k] for k in live]
        heads, exclude = self._heads_of(inputs, live)
        head_ids = {id(h) for h in heads}
        if self.level == "representation":
            shared = [p for p in reachable_leaves(live_values, set()) if id(p) not in head_ids]
        else:
            shared = exclude
        grads = torch.autograd.grad(
            weighted,
            shared + heads,
            retain_graph=own,
            allow_unused=True,
            materialize_grads=inputs.parallel is not None,
        )
        shared_grads, head_grads = grads[: len(shared)], grads[len(shared) :]
        if max_norm is not None:
            inputs.average_now([g for g in shared_grads if g is not None], shared)  # clip the global gradient
            present = [g for g in shared_grads if g is not None]
            if present:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
                factor = clip_factor(norm / inputs.scale, max_norm)
                shared_grads = tuple(None if g is None else g * factor for g in shared_grads)
        if own and heads:
            plain = torch.stack(live_values).sum() * (1.0 if own_heads_scale is None else own_heads_scale)
            head_grads = torch.autograd.grad(plain, heads, allow_unused=True)
        for p, g in zip(shared + heads, tuple(shared_grads) + tuple(head_grads), strict=True):
            if g is not None:
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.dtype))


def _live_task_params(inputs: StepInputs, live: list[int]) -> Any:
    spec = inputs.task_specific
    if isinstance(spec, Mapping):
        keep = {inputs.names[k] for k in live}
        return {n: v for n, v in spec.items() if n in keep}
    return spec


class JacobianAggregator(GradientMethod):
    """A method that needs the per-task gradients themselves: ``d = direction(J, losses)``.

    Subclasses implement :meth:`direction` on the A x d matrix of the active tasks' gradient rows
    (unscaled): at the parameter level d is the number of shared parameters; at the
    representation level (``level="representation"``, for methods that declare it) a row is a
    task's gradient w.r.t. the whole shared representation (B x r entries, flattened) and the
    direction is back-propagated through the trunk once. The rows live in the engine's reused
    buffer and are valid during the call only; a method that keeps gradients across steps
    (GradVac, MoCo) sets ``keeps_gradients = True`` and then receives rows it owns.

    Task-specific parameters get their own gradient; a method whose heads get scaled gradients
    (DB-MTL: the log-loss gradient) overrides :meth:`head_weights`. A subclass that declares a
    ``max_norm`` hyper-parameter has the norm of the shared direction clipped to it.
    """

    head_grad: HeadGrad = hparam("own", one_of("own"), "task-specific parameters get their own gradient")
    level: Level = hparam("parameter", one_of("parameter"), "per-task gradients of the shared parameters")
    keeps_gradients: ClassVar[bool] = False
    #: at the representation level the direction of a sample's entries depends on other samples
    #: only through sums over the batch, which the method all-reduces itself through
    #: :attr:`parallel` (GradDrop's purity statistic); then each rank serves its own samples under
    #: DDP. Other rules refuse the representation level under DDP, where no rank holds the whole row.
    shards_samples: ClassVar[bool] = False
    #: the data-parallel context during :meth:`direction` (``None`` in one process)
    parallel: DataParallel | None = None
    #: names of K x d state buffers (EMA, accumulators) whose width d is known only at the first
    #: step: register them in ``_build`` as K x 0 and read them with :meth:`state_rows`.
    lazy_buffers: ClassVar[tuple[str, ...]] = ()
    active_index: Tensor | None = None
    #: at the representation level, the representation tensor whose flattened gradients are the
    #: rows of the Jacobian (valid during :meth:`direction` only; GradDrop reads its signs)
    features: Tensor | None = None

    # -- family state: the number of updates a method has taken (its schedules' t) -----------
    def _build_family(self, tasks: TaskSet) -> None:
        #: updates taken so far; a method counts the steps that changed its state (DB-MTL's and
        #: MoCo's decaying step sizes), and the count is saved with the state
        self.updates = 0

    def _family_state(self) -> dict[str, Any]:
        return {"updates": getattr(self, "updates", 0)}

    def _load_family_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))

    def state_rows(self, name: str, like: Tensor) -> Tensor:
        """The K x d state buffer ``name``, created in full width at the first step (in the wider
        of its placeholder's and the gradients' dtype)."""
        buf: Tensor = getattr(self, name)
        width = like.shape[1]
        if buf.shape[1] != width:
            if buf.shape[1]:
                raise EngineError(
                    f"{type(self).__name__} keeps per-task state for {buf.shape[1]} shared parameter "
                    f"entries; this step has {width}. Use one method object per model (or load a "
                    "matching state)."
                )
            dtype = torch.promote_types(buf.dtype, like.dtype)
            buf = torch.zeros(buf.shape[0], width, dtype=dtype, device=buf.device)
            self.register_buffer(name, buf)
        return buf

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a state saved after the first step loads into a method that has not taken one (and back)
        for name in self.lazy_buffers:
            saved, buf = state_dict.get(prefix + name), getattr(self, name, None)
            if not (isinstance(saved, Tensor) and isinstance(buf, Tensor) and saved.dim() == 2):
                continue  # not ours to fix: load_state_dict reports it
            if saved.shape != buf.shape and saved.shape[0] == buf.shape[0]:
                dtype = torch.promote_types(buf.dtype, saved.dtype)
                self.register_buffer(name, torch.zeros(saved.shape, dtype=dtype, device=buf.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        """The shared update direction (d,) from the (A, d) unscaled task gradients and the
        active tasks' unscaled losses (A,)."""
        raise NotImplementedError

    def head_weights(self, losses: Tensor, active: Tensor) -> Tensor | None:
        """Per-task factors (K,) for the task-specific gradients, or ``None`` for their own."""
        return None

    def _step(self, inputs: StepInputs) -> StepInfo:
        engine = self._engine()
        rep = None
        heads: HeadGradients | DeferredHeadGradients
        parallel = inputs.parallel
        # under DDP a rank's representation rows are 1/R of the global batch's rows (its shares
        # carry R); entrywise rules see them at the global scale and the cotangent goes back x R
        rank_factor = 1.0
        if self.level == "representation":
            if parallel is not None:
                if not self.shards_samples:
                    raise DistributedError(
                        f"{type(self).__name__}(level='representation') needs every sample's row at "
                        "once, which no rank holds under DDP; use level='parameter'."
                    )
                rank_factor = float(parallel.world_size)
            z = self._representation(inputs)
            if isinstance(z, Mapping):
                raise EngineError(
                    f"{type(self).__name__}(level='representation') needs one shared representation "
                    "tensor; this model returns one per task. Use level='parameter' (or, for the "
                    "gated-expert models, representation='stacked')."
                )
            rep = engine.representation_gradients(
                inputs.values, z, inputs.names, inputs.task_specific, self._shared(inputs)
            )
            rows = rep.rep_grads.reshape(len(inputs.names), -1)
            if self.keeps_gradients:
                rows = rows.clone()
            heads = rep.heads
        else:
            jac = engine.jacobian(
                inputs.values,
                self._shared(inputs),
                inputs.task_specific,
                names=inputs.names,
                owned=self.keeps_gradients,
            )
            inputs.average_now(jac.shared_blocks(), jac.shared)  # every rank aggregates the global J
            rows = jac.rows()
            heads = jac.heads
        idx = active_subset(inputs.active)
        self.active_index = torch.arange(len(inputs.names)) if idx is None else idx
        self.features = rep.features[0] if rep is not None else None
        self.parallel = parallel
        active_rows = rows if idx is None else rows[idx.to(rows.device)]
        if inputs.loss_scale is not None or rank_factor != 1.0:
            active_rows = active_rows / (inputs.scale * rank_factor)
        losses = inputs.losses if idx is None else inputs.losses[idx.to(inputs.losses.device)]
        try:
            direction = self.direction(active_rows, losses.to(torch.float64))
        finally:
            self.active_index = None
            self.features = None
            self.parallel = None
        if not bool(torch.isfinite(direction).all()) and inputs.loss_scale is None:
            raise NonFiniteGradientError(
                f"{type(self).__name__} produced a non-finite direction; nothing was updated."
            )
        max_norm = self._max_norm()
        if rep is not None:
            cotangent = (direction * (inputs.scale * rank_factor)).to(rows.dtype).view(rep.features[0].shape)
            if max_norm is None:
                rep.backward_cotangents([cotangent])
            else:
                clipped_trunk_backward(rep.features, [cotangent], self._shared(inputs), max_norm, inputs)
        else:
            if max_norm is not None:
                direction = direction * clip_factor(torch.linalg.vector_norm(direction.double()), max_norm)
            jac.write_shared_flat(direction * inputs.scale)
        hw = self.head_weights(inputs.losses.to(torch.float64), inputs.active)
        heads.write(None if hw is None else torch.where(inputs.active, hw.to(inputs.active.device), 0.0))
        norms = torch.linalg.vector_norm(rows, dim=1).double() / (
            inputs.scale * rank_factor
        )  # (a float64 copy of J: 25x slower); under DDP at the representation level: this rank's
        return StepInfo(inputs.names, None, inputs.losses, level=self.level, grad_norms=norms)

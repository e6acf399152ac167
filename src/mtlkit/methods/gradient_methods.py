"""The gradient families: methods that need per-task gradients from the engine, either their
Gramian (:class:`GramianWeighting`) or the gradients themselves (:class:`JacobianAggregator`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mtlkit.core.engine import GradientEngine, HeadGrad
from mtlkit.errors import EngineError, NonFiniteGradientError
from mtlkit.methods.base import Method, StepInfo, StepInputs
from mtlkit.methods.hparams import hparam, instance_of, one_of

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

    def _engine(self) -> GradientEngine:
        if self.engine is None:
            self.__dict__["engine"] = GradientEngine()
        return self.engine  # type: ignore[return-value]

    def _representation(self, inputs: StepInputs) -> Any:
        rep = inputs.output.representation if inputs.output is not None else None
        if rep is None:
            raise EngineError(
                f"{type(self).__name__}(level='representation') needs the shared representation: pass "
                "output=model(x, full_output=True) to backward()."
            )
        return rep

    def _shared(self, inputs: StepInputs) -> list[Tensor]:
        if not inputs.shared:
            raise EngineError(
                f"{type(self).__name__} needs the shared parameters: pass the model (or shared=) to backward()."
            )
        return inputs.shared


def active_subset(active: Tensor) -> Tensor | None:
    """Indices of the active tasks (a host sync), or ``None`` when every task is active."""
    flags = active.detach().cpu()
    return None if bool(flags.all()) else flags.nonzero().squeeze(1)


class GramianWeighting(GradientMethod):
    """A method whose shared direction is ``J^T w`` with ``w = f(G)`` (G = J J^T).

    Subclasses implement :meth:`weights` on the Gramian of the active tasks (those with a labelled
    sample); tasks without one get weight 0. During the call ``self.active_index`` holds the
    indices of those tasks in the task list (for methods with per-task state, e.g. a warm start).
    """

    active_index: Tensor | None = None

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """float64 weights (A,) from the float64 A x A Gramian of the active tasks and their
        unscaled losses."""
        raise NotImplementedError

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
        try:
            if idx is None:
                self.active_index = torch.arange(len(names))
                return self.weights(gram, losses).to(torch.float64)
            w = torch.zeros(len(names), dtype=torch.float64, device=gram.device)
            if len(idx):
                self.active_index = idx
                sub = idx.to(gram.device)
                w[sub] = self.weights(gram[sub][:, sub], losses[sub]).to(torch.float64)
            return w
        finally:
            self.active_index = None  # valid during the call only

    def _step(self, inputs: StepInputs) -> StepInfo:
        engine = self._engine()
        own = self.head_grad == "own"
        if self.level == "representation":
            gram, rep = engine.representation_gramian(
                inputs.values, self._representation(inputs), inputs.names, inputs.task_specific
            )
            gram = gram / inputs.scale**2
            w = self._solve(gram, inputs)
            rep.backward_shared(w)
            rep.write_heads(None if own else w)
        else:
            gram, jac = engine.parameter_gramian(
                inputs.values, self._shared(inputs), inputs.task_specific, names=inputs.names
            )
            gram = gram / inputs.scale**2
            w = self._solve(gram, inputs)
            jac.write_shared_weighted(w)
            jac.write_heads(None if own else w)
        norms, cos = gradient_statistics(gram)
        return StepInfo(
            inputs.names,
            w.detach(),
            inputs.losses,
            level=self.level,
            grad_norms=norms,
            cosines=cos,
            gramian=gram,
        )


class JacobianAggregator(GradientMethod):
    """A method that needs the per-task gradients themselves: ``d = direction(J)``.

    Subclasses implement :meth:`direction` on the A x d matrix of the active tasks' gradient rows
    (unscaled; at the parameter level d is the number of shared parameters). The rows live in the
    engine's reused buffer and are valid during the call only; a method that keeps gradients
    across steps (GradVac, MoCo) sets ``keeps_gradients = True`` and then receives rows it owns.
    Task-specific parameters get their own gradient by default.
    """

    head_grad: HeadGrad = hparam(
        "own", one_of("own", "weighted"), "task-specific parameters get their own or the weighted gradient"
    )
    level: Level = hparam("parameter", one_of("parameter"), "per-task gradients of the shared parameters")
    keeps_gradients: ClassVar[bool] = False
    active_index: Tensor | None = None

    def direction(self, jacobian: Tensor) -> Tensor:
        """The shared update direction (d,) from the (A, d) unscaled task gradients."""
        raise NotImplementedError

    def _step(self, inputs: StepInputs) -> StepInfo:
        jac = self._engine().jacobian(
            inputs.values,
            self._shared(inputs),
            inputs.task_specific,
            names=inputs.names,
            owned=self.keeps_gradients,
        )
        rows = jac.rows()
        idx = active_subset(inputs.active)
        self.active_index = torch.arange(len(inputs.names)) if idx is None else idx
        active_rows = rows if idx is None else rows[idx.to(rows.device)]
        if inputs.loss_scale is not None:
            active_rows = active_rows / inputs.scale
        try:
            direction = self.direction(active_rows)
        finally:
            self.active_index = None
        if not bool(torch.isfinite(direction).all()) and inputs.loss_scale is None:
            raise NonFiniteGradientError(
                f"{type(self).__name__} produced a non-finite direction; nothing was updated."
            )
        jac.write_shared_flat(direction * inputs.scale)
        weights = inputs.active.to(torch.float64)
        jac.write_heads(None if self.head_grad == "own" else weights)
        norms = torch.linalg.vector_norm(rows.double(), dim=1) / inputs.scale
        return StepInfo(inputs.names, None, inputs.losses, level="parameter", grad_norms=norms)

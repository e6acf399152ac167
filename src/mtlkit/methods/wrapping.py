"""Schemes that wrap another method (F-MTL, Rep-MTL): the base is named in the registry, built
once the tasks are known, and follows the wrapper's epochs."""

from __future__ import annotations

from typing import Any

from mtlkit.core.tasks import TaskLosses, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.base import Method, StepInfo, StepInputs
from mtlkit.methods.hparams import hparam, instance_of
from mtlkit.methods.registry import METHODS


class WrapsMethod(Method):
    """A method whose step runs a base method (a registry name plus options) inside a scheme.

    Subclasses list their base copies in :meth:`parts`; begin/abort/end of an epoch reach every
    copy, so a base with an epoch hook (DWA) keeps its own lifecycle checks.
    """

    base: str = hparam("ew", instance_of(str), "the base method (a registry name)")
    base_options: dict[str, Any] = hparam({}, instance_of(dict), "options of the base method")

    def make_base(self) -> Method:
        """A new base method from ``base`` and ``base_options`` (unknown names raise the
        registry's error with close matches; a scheme cannot wrap itself)."""
        base = METHODS.create(self.base.lower(), **self.base_options)
        if isinstance(base, type(self)):
            raise ConfigError(
                f"{type(self).__name__} cannot wrap {type(self).__name__}; choose another base method."
            )
        if base.needs_closure or base.batches_per_step != 1:
            raise ConfigError(
                f"{type(self).__name__}'s base {self.base!r} re-runs the model or uses several batches per "
                "step; it cannot run inside this scheme."
            )
        return base

    def base_backward(self, base: Method, inputs: StepInputs) -> StepInfo:
        """``base.backward`` on this step's losses, with the tasks that had no label still
        unlabelled and without the model's auxiliary losses (the scheme's own ``backward``
        writes those once)."""
        losses = TaskLosses(dict(zip(inputs.names, inputs.values, strict=True)), inputs.active.long())
        output = inputs.output._replace(aux_losses=None) if inputs.output is not None else None
        return base.backward(
            losses,
            inputs._model,
            output,
            shared=inputs._shared if inputs._model is None else None,
            loss_scale=inputs.loss_scale,
            data_parallel=inputs.parallel.inner(inputs.losses, inputs.active) if inputs.parallel else None,
        )

    def parts(self) -> list[Method]:
        """The base copies this scheme runs (empty before setup)."""
        return []

    def setup_parts(self, tasks: TaskSet) -> None:
        for part in self.parts():
            part.setup(tasks)

    def begin_epoch(self) -> None:
        super().begin_epoch()
        for part in self.parts():
            part.begin_epoch()

    def abort_epoch(self) -> None:
        super().abort_epoch()
        for part in self.parts():
            part.abort_epoch()

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        for part in self.parts():
            part.on_epoch_end()

"""FULLER: multi-level gradient calibration for multi-modality multi-task learning."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from torch import nn

from mtlkit.core.contract import unwrap
from mtlkit.core.gradient_calibration import ModalityGradientCalibration
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError, EngineError
from mtlkit.methods.base import Method, StepInfo, StepInputs
from mtlkit.methods.gradient_methods import GradientMethod
from mtlkit.methods.hparams import hparam, instance_of
from mtlkit.methods.registry import METHODS, register
from mtlkit.methods.wrapping import WrapsMethod


@register("fuller")
class FULLER(WrapsMethod):
    """FULLER: Huang, Lin, Liu, Luo, Ye, Xu, Chang, Liang, "FULLER: Unified Multi-modality
    Multi-task 3D Perception via Multi-level Gradient Calibration", ICCV 2023.

    Two calibrations in one step:

    1. inter-gradient (task level): the task gradients are taken at the last shared layer (the
       model's representation) and balanced by a gradient method there (``base``, IMTL-G by
       default: the combined gradient has equal projections on every unit task gradient), then
       back-propagated once through the trunk;
    2. intra-gradient (modality level): in that single trunk backward, the gradient reaching
       each modality branch is rescaled to a common magnitude at the model's
       :class:`~mtlkit.core.gradient_calibration.ModalityGradientCalibration` (the mean of the
       branch norms by default), so no modality dominates.

    The model must carry the calibration where its branches meet
    (:class:`~mtlkit.models.ModalityFusion` does); the method switches it on only around its own
    trunk backward, so the per-task passes are never calibrated one by one.

    **Reconstruction.** No code for FULLER is public; the task-level rule (IMTL-G), the target
    magnitude (the mean norm, keeping the total) and the placement (the branch outputs at the
    fusion) are the project's spec's choices where the paper's text is all there is. Any
    representation-level gradient method may replace IMTL-G (``base``). The lightweight task
    heads of the paper are architecture, not part of the method. Missing labels: the base
    leaves unlabelled tasks out of the task-level solve.
    """

    base: str = hparam("imtl_g", instance_of(str), "the task-level gradient method (at the representation)")
    base_options: dict[str, Any] = hparam({}, instance_of(dict), "options of the task-level method")
    model_requirement = (
        "a ModalityGradientCalibration where the modality branches meet (mk.models.ModalityFusion)"
    )

    def make_base(self) -> Method:
        options = {**self.base_options}
        if options.get("level", "representation") != "representation":
            raise ConfigError(
                "FULLER balances the task gradients at the last shared layer: the base runs at "
                f"level='representation', not {options['level']!r}."
            )
        try:
            base = METHODS.create(self.base.lower(), **{**options, "level": "representation"})
        except ConfigError as exc:
            raise ConfigError(
                f"FULLER's base {self.base!r} must be a gradient method that works at the shared "
                f"representation (imtl_g, mgda, upgrad, nash_mtl, ...): {exc}"
            ) from exc
        if not isinstance(base, GradientMethod):
            raise ConfigError(f"FULLER's base {self.base!r} is not a gradient method.")
        return base

    def _validate(self) -> None:
        self.make_base()

    @property
    def needs_representation(self) -> bool:
        return True

    def _build(self, tasks: TaskSet) -> None:
        self.task_level = self.make_base()
        self.setup_parts(tasks)

    def parts(self) -> list[Method]:
        part = getattr(self, "task_level", None)
        return [part] if part is not None else []

    def _step(self, inputs: StepInputs) -> StepInfo:
        calibrations = _calibrations(inputs._model)
        if not calibrations:
            raise EngineError(
                "FULLER calibrates the modality branches, but the model has no "
                "ModalityGradientCalibration where they meet: use mk.models.ModalityFusion, or place "
                "one (mtlkit.core.gradient_calibration) on the branch outputs before the fusion."
            )
        with ExitStack() as stack:
            for cal in calibrations:
                stack.enter_context(cal.active(inputs.parallel))
                cal.last_norms = None
            info = self.base_backward(self.task_level, inputs)
        norms = [cal.last_norms for cal in calibrations if cal.last_norms is not None]
        if norms:
            info.extras = {**info.extras, "branch_norms": norms[0][0], "calibrated_norms": norms[0][1]}
        return info


def _calibrations(model: nn.Module | None) -> list[ModalityGradientCalibration]:
    if model is None:
        return []
    return [m for m in unwrap(model).modules() if isinstance(m, ModalityGradientCalibration)]

"""Coordinate-wise trimmed mean of the task gradients (Yin et al., 2018)."""

from __future__ import annotations

from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods.gradient_methods import JacobianAggregator, Level
from mtlkit.methods.hparams import hparam, number, one_of
from mtlkit.methods.registry import register


def trimmed_mean(jacobian: Tensor, trim: int) -> Tensor:
    """Per column of the (A, d) matrix: drop the ``trim`` largest and ``trim`` smallest entries,
    average the other ``A - 2 trim`` (needs ``A > 2 trim``)."""
    a = jacobian.shape[0]
    if a <= 2 * trim:
        raise ConfigError(f"A trimmed mean with trim_number={trim} needs more than {2 * trim} rows; got {a}.")
    if trim == 0:
        return jacobian.mean(dim=0)
    return jacobian.sort(dim=0).values[trim : a - trim].mean(dim=0)


@register("trimmed_mean")
class TrimmedMean(JacobianAggregator):
    """Coordinate-wise trimmed mean: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018 (as an aggregator of task
    gradients, as in TorchJD's ``TrimmedMean``).

    For every coordinate of the shared parameters, the ``b = trim_number`` largest and ``b``
    smallest task-gradient entries are removed and the remaining ``A - 2b`` are averaged: up to
    ``b`` arbitrary (adversarial) rows cannot move any coordinate outside the range of the
    honest ones. The direction is not a combination of whole task gradients (no weights in the
    step info). Scale: the mean, as in the paper and TorchJD (multiply the learning rate by K to
    compare with the summed loss). Heads get their own gradient.

    ``trim_number`` counts rows removed from each end (TorchJD's convention; the paper's
    fraction ``beta`` is ``b / A``). Default 0, the plain mean (TorchJD requires the value): set
    it to the number of tasks you want to tolerate. ``K > 2b`` is required at setup
    (``ConfigError``), and a step in which only ``2b`` or fewer tasks have a labelled sample
    raises ``ConfigError`` before anything is updated. TorchJD requires ``A >= 2b + 1`` as well;
    otherwise this is the same computation.
    """

    level: Level = hparam(
        "parameter",
        one_of("parameter", "representation"),
        "coordinates of the shared parameters, or of the shared representation (B x r entries)",
    )
    trim_number: int = hparam(
        0, number(ge=0, integer=True), "b: entries removed from each end of every coordinate (0: mean)"
    )

    def _build(self, tasks: TaskSet) -> None:
        if len(tasks) <= 2 * self.trim_number:
            raise ConfigError(
                f"TrimmedMean: trim_number={self.trim_number} removes {2 * self.trim_number} of "
                f"{len(tasks)} task gradients per coordinate; it needs more than {2 * self.trim_number} "
                f"tasks. Use trim_number <= {(len(tasks) - 1) // 2}."
            )

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        a = len(jacobian)
        if a <= 2 * self.trim_number:
            raise ConfigError(
                f"TrimmedMean: trim_number={self.trim_number} needs more than {2 * self.trim_number} "
                f"tasks with a labelled sample in the batch; this batch has {a}. Nothing was updated."
            )
        return trimmed_mean(jacobian, self.trim_number)

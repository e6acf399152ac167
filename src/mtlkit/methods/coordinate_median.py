"""Coordinate-wise median of the task gradients (Yin et al., 2018)."""

from __future__ import annotations

from torch import Tensor

from mtlkit.methods.gradient_methods import JacobianAggregator, Level
from mtlkit.methods.hparams import hparam, one_of
from mtlkit.methods.registry import register


def coordinate_median(jacobian: Tensor) -> Tensor:
    """Per column of the (A, d) matrix, the median; for even A the mean of the two middle
    entries (as ``numpy.median``)."""
    a = jacobian.shape[0]
    if a == 1:
        return jacobian[0].clone()
    ordered = jacobian.sort(dim=0).values
    lo, hi = (a - 1) // 2, a // 2
    if lo == hi:
        return ordered[lo].clone()
    return ordered[lo] * 0.5 + ordered[hi] * 0.5  # no overflow for entries near the dtype's max


@register("coordinate_median")
class CoordinateMedian(JacobianAggregator):
    """Coordinate-wise median: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018 (as an aggregator of task gradients).

    Every coordinate of the shared update is the median of the task gradients' entries there:
    fewer than half of the tasks, however large or adversarial their gradients, cannot move it
    outside the range of the others. For an even number of tasks it is the mean of the two
    middle entries (the usual median, ``numpy.median``; ``torch.median`` would return the lower
    one); with one or two tasks it is the mean. It equals the trimmed mean with the largest
    possible trim, ``(A - 1) // 2``. Scale: one gradient's (the mean convention of the robust
    aggregators; multiply the learning rate by K to compare with the summed loss). Heads get
    their own gradient. No options; TorchJD has no median aggregator.
    """

    level: Level = hparam(
        "parameter",
        one_of("parameter", "representation"),
        "coordinates of the shared parameters, or of the shared representation (B x r entries)",
    )

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        return coordinate_median(jacobian)

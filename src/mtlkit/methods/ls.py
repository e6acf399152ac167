"""Linear scalarisation with a settable preference: the loss of Pareto hypernetworks' PHN-LS."""

from __future__ import annotations

from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.preferences import HasPreference
from mtlkit.methods.registry import register


@register("ls")
class LinearScalarization(HasPreference, LossWeighting):
    """Linear scalarisation ``sum_k r_k L_k`` for a preference ``r`` on the simplex, which
    :meth:`set_preference` may change between steps: the loss of PHN-LS (Navon, Shamsian, Chechik,
    Fetaya, "Learning the Pareto Front with Hypernetworks", ICLR 2021), which draws ``r`` per step,
    and the one-model-per-preference baseline of the Pareto-front papers. With the default uniform
    preference it is :class:`~mtlkit.methods.EW` divided by the number of tasks. Minimisers of a
    linear scalarisation lie on the convex hull of the front only: a concave part of the front has
    no preference that reaches it (the reason for EPO and PMTL).
    """

    def _build(self, tasks: TaskSet) -> None:
        self._build_preference(len(tasks))

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        return self.preference_vector.to(losses.device, losses.dtype)

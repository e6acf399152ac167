"""COSMOS: the preference-conditioned loss with a cosine penalty (Ruchte & Grabocka, ICDM 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.core.tasks import TaskSet
from mtlkit.methods.hparams import hparam, number
from mtlkit.methods.loss_weighting import LossWeighting
from mtlkit.methods.preferences import HasPreference
from mtlkit.methods.registry import register


def cosmos_weights(losses: Tensor, preference: Tensor, penalty: float) -> Tensor:
    """The gradient of ``sum_k r_k L_k - penalty * cos(r, L)`` with respect to the losses:
    ``r_k - penalty * (r_k / (|r| |L|) - (r . L) L_k / (|r| |L|^3))``, so one backward of
    ``sum_k w_k L_k`` with these weights is the gradient of the COSMOS loss."""
    r = preference.to(torch.float64)
    loss = losses.detach().to(torch.float64)
    norm_r, norm_l = r.norm(), loss.norm().clamp_min(1e-12)
    dcos = r / (norm_r * norm_l) - (r @ loss) * loss / (norm_r * norm_l**3)
    return r - penalty * dcos


@register("cosmos")
class COSMOS(HasPreference, LossWeighting):
    """The loss of COSMOS: Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning", ICDM 2021.

    ``L = sum_k r_k L_k - penalty * cos(r, L)`` for the step's preference ``r`` (drawn from a
    Dirichlet distribution per batch and also fed to the model as an input, see
    :class:`~mtlkit.models.PreferenceConditioned` and :mod:`mtlkit.pareto`). The cosine term pulls
    the loss vector towards the ray of ``r`` (so a larger ``r_k`` then means a LARGER ``L_k``, the
    opposite of the linear term; with the official penalty 2 and cross-entropy losses near 0.3 the
    cosine term wins). It is back-propagated as ``sum_k w_k L_k`` with the exact partial
    derivatives as weights (:func:`cosmos_weights`), the same gradient as the official
    ``backward`` of the loss itself. Official defaults: penalty 2 on MultiMNIST and Multi-Fashion,
    8 on Multi-(Fashion+MNIST), 0.01 on the tabular fairness data; the Dirichlet concentration
    (1.2 on the image data) belongs to the sampler. The losses are not normalised, as in the
    official code; a zero loss vector has no direction, so its cosine term is dropped that step.
    """

    penalty: float = hparam(2.0, number(ge=0), "weight lambda of the cosine term (official 2 on MultiMNIST)")

    def _build(self, tasks: TaskSet) -> None:
        self._build_preference(len(tasks))

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        r = self.preference_vector.to(losses.device)
        masked = torch.where(active, losses.to(torch.float64), 0.0)
        if not bool(masked.norm() > 0):
            return r.to(losses.dtype)
        return cosmos_weights(masked, r, self.penalty).to(losses.dtype)

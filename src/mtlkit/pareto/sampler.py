"""The Trainer callback that draws a preference per step for preference-conditioned training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from mtlkit.core.contract import unwrap
from mtlkit.core.preferences import dirichlet
from mtlkit.errors import ConfigError
from mtlkit.methods.preferences import PreferenceMethod
from mtlkit.models.preference_input import TakesPreference
from mtlkit.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlkit.train.trainer import Trainer


class PreferenceSampler(Callback):
    """Before every training step, draw ``r ~ Dir(alpha, ..., alpha)`` and give it to the model
    (:class:`~mtlkit.models.PreferenceConditioned`, :class:`~mtlkit.models.ParetoHyperNetwork`) and
    to the method (``cosmos``, ``ls``, ``epo``): one preference per batch, as COSMOS and PHN do.
    Official concentrations: 1.2 for COSMOS on the image data, 0.2 for PHN.

    The generator is the callback's own (seeded; its state is in every checkpoint, so a resumed run
    draws the same preferences). At least one of the model and the method must take a preference.
    The Trainer's per-epoch validation runs at the last drawn preference; evaluate a front with
    :func:`~mtlkit.pareto.evaluate_front`.
    """

    def __init__(self, alpha: float = 0.2, seed: int = 0) -> None:
        if not alpha > 0:
            raise ConfigError(f"PreferenceSampler: alpha must be > 0, got {alpha}.")
        self.alpha, self.seed = float(alpha), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last: torch.Tensor | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        model, method = unwrap(trainer.model), trainer.method
        if not isinstance(model, TakesPreference) and not isinstance(method, PreferenceMethod):
            raise ConfigError(
                "PreferenceSampler: neither the model nor the method takes a preference; use a "
                "preference-conditioned model (preference_conditioned, pareto_hypernetwork) or a "
                "preference method (cosmos, ls, epo)."
            )

    def on_train_batch_start(self, trainer: Trainer, batch: Any) -> None:
        r = dirichlet(len(trainer.tasks), self.alpha, self.generator)
        model = unwrap(trainer.model)
        if isinstance(model, TakesPreference):
            model.set_preference(r)
        if isinstance(trainer.method, PreferenceMethod):
            trainer.method.set_preference(r)
        self.last = r

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

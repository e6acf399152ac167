"""Learn a trade-off front with any approach: one preference-conditioned model, or one model per
preference, trained by the Trainer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.core.preferences import check_preference, circle_rays, simplex_lattice
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import ConfigError
from mtlkit.methods import create as create_method
from mtlkit.models.base import MODELS
from mtlkit.pareto.approaches import Approach, get_approach
from mtlkit.pareto.front import Front, evaluate_front
from mtlkit.pareto.sampler import PreferenceSampler
from mtlkit.train.callbacks import Callback
from mtlkit.train.trainer import Trainer

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: the wrappers' names for the wrapped model and its options
_WRAPPER_KEYS = {
    "preference_conditioned": ("base", "base_options"),
    "pareto_hypernetwork": ("target", "target_options"),
}


def training_preferences(tasks: int, count: int) -> Tensor:
    """``count`` evenly spread preferences: on the quarter circle for two tasks (the official
    scripts' rays, normalised to sum 1), else the interior simplex lattice with the fewest
    divisions that gives at least ``count`` (all of its points)."""
    if count < 1:
        raise ConfigError(f"need at least one preference, got {count}.")
    if tasks == 2:
        return circle_rays(count)
    divisions = 1
    while len(simplex_lattice(tasks, divisions)) < count:
        divisions += 1
    return simplex_lattice(tasks, divisions)


def pmtl_references(preferences: Tensor) -> list[list[float]]:
    """PMTL's reference vectors for preferences ``r``: ``u ~ 1/r`` at unit norm (a larger
    preference allows a smaller loss, as in EPO, COSMOS and linear scalarisation). For two tasks
    and the circle rays this is the official PMTL set in reverse order, as EPO's scripts pair them."""
    inverse = 1.0 / preferences.clamp_min(1e-12)
    return (inverse / inverse.norm(dim=1, keepdim=True)).tolist()


@dataclass
class FrontRun:
    """The trained model(s) of a front-learning run.

    Attributes:
        approach: how the front was learned.
        tasks: the task set.
        models: one preference-conditioned model, or one model per training preference.
        preferences: the training preferences of the one-model-per-preference approaches.
        seconds: wall time of the training (all models).
    """

    approach: Approach
    tasks: TaskSet
    models: list[nn.Module]
    preferences: Tensor | None
    seconds: float

    def front(
        self,
        loader: Iterable[Any],
        preferences: Tensor | Sequence[Sequence[float]] | None = None,
        device: str | torch.device = "cpu",
    ) -> Front:
        """The front on ``loader``: a conditioned model at ``preferences`` (required), or each
        per-preference model at its own preference."""
        if self.approach.conditioned:
            if preferences is None:
                raise ConfigError(
                    f"{self.approach.name}: give the preferences at which to evaluate the front."
                )
            return evaluate_front(self.models[0], self.tasks, loader, preferences, device)
        assert self.preferences is not None
        return evaluate_front(self.models, self.tasks, loader, self.preferences, device)


def learn_front(
    approach: str,
    *,
    model: str,
    in_features: int | Sequence[int],
    tasks: TaskSet,
    train_loader: Iterable[Any],
    epochs: int,
    model_options: Mapping[str, Any] | None = None,
    optimizer: OptimizerFactory | None = None,
    preferences: int | Tensor | Sequence[Sequence[float]] = 5,
    alpha: float | None = None,
    method_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
) -> FrontRun:
    """Train the model(s) of ``approach`` (``cosmos``, ``phn_ls``, ``phn_epo``: one conditioned
    model; ``ls``, ``epo``, ``pmtl``: one per preference) on ``train_loader`` for ``epochs``.

    Args:
        approach: a name from :data:`~mtlkit.pareto.APPROACHES`.
        model: the registry name of the model (COSMOS conditions it, PHN generates its weights).
        in_features: its input width or image shape.
        tasks: the task set.
        train_loader: batches for the Trainer.
        epochs: epochs per model.
        model_options: the model's options (``out_features`` included).
        optimizer: ``params -> optimizer`` (default Adam, lr 1e-3).
        preferences: training preferences of the per-preference approaches (a count, or the
            vectors); ignored by the conditioned ones, which draw one per step.
        alpha: Dirichlet concentration of the conditioned approaches (default: the paper's).
        method_options: options of the loss method over the approach's defaults.
        seed: seed of the models' initialisation, the Trainer and the preference draws.
    """
    spec = get_approach(approach)
    if epochs < 1:
        raise ConfigError(f"learn_front: epochs must be >= 1, got {epochs}.")
    make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
    options = dict(model_options or {})
    k = len(tasks)

    def fit(net: nn.Module, method: Any, with_callbacks: list[Callback]) -> None:
        trainer = Trainer(
            net,
            tasks,
            method,
            make_optimizer(net.parameters()),
            device=device,
            callbacks=with_callbacks,
            seed=seed,
            progress=progress,
            tensorboard=False,
        )
        trainer.fit(train_loader, epochs=epochs)

    start = time.perf_counter()
    if spec.conditioned:
        assert spec.model is not None
        wrapped, wrapped_options = _WRAPPER_KEYS[spec.model]
        out_features = options.pop("out_features", 1)
        torch.manual_seed(seed)
        net = MODELS.create(
            spec.model,
            in_features=in_features,
            tasks=tasks,
            out_features=out_features,
            **{wrapped: model, wrapped_options: options},
        )
        method = create_method(spec.method, **{**spec.method_options, **dict(method_options or {})})
        sampler = PreferenceSampler(alpha if alpha is not None else float(spec.alpha or 1.0), seed=seed)
        fit(net, method, [sampler, *callbacks])
        return FrontRun(spec, tasks, [net], None, time.perf_counter() - start)
    rays = (
        training_preferences(k, preferences)
        if isinstance(preferences, int)
        else torch.stack([check_preference(list(map(float, r)), tasks=k) for r in preferences])
    )
    models = []
    for i, r in enumerate(rays):
        torch.manual_seed(seed)  # every preference starts from the same initialisation
        net = MODELS.create(model, in_features=in_features, tasks=tasks, **options)
        extra: dict[str, Any] = (
            {"references": pmtl_references(rays), "index": i}
            if spec.method == "pmtl"
            else {"preference": r.tolist()}
        )
        method = create_method(spec.method, **{**spec.method_options, **extra, **dict(method_options or {})})
        fit(net, method, list(callbacks))
        models.append(net)
    return FrontRun(spec, tasks, models, rays, time.perf_counter() - start)

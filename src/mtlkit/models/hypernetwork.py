"""Pareto hypernetworks: a network that maps a preference to the weights of a multi-task model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from mtlkit.core.contract import MultiTaskOutput
from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError
from mtlkit.models.base import MODELS, MultiTaskModule, register
from mtlkit.models.preference_input import TakesPreference


@register("pareto_hypernetwork")
class ParetoHyperNetwork(TakesPreference, MultiTaskModule):
    """Pareto hypernetwork (PHN): Navon, Shamsian, Chechik, Fetaya, "Learning the Pareto Front with
    Hypernetworks", ICLR 2021.

    A ray MLP embeds the preference ``r`` (``K -> h -> h -> h``, ReLU after the first two layers,
    ``h = ray_hidden = 100``), and a linear map of the embedding gives every tensor of the target
    model. The official LeNet hypernetwork has one linear head per weight and per bias; those heads
    are the row blocks of this one map, with the same initialisation (PyTorch's default for a fan-in
    of ``h``). The target (any registered model, built with ``target_options``) runs functionally
    with the generated tensors, so its own initial weights are never used (they are frozen and only
    give the shapes). Trained over preferences drawn per step (PHN-LS with the ``ls`` loss, PHN-EPO
    with ``epo``; :mod:`mtlkit.pareto`), one hypernetwork returns the whole front:
    :meth:`set_preference`, then a forward pass.

    Every parameter of the hypernetwork is shared: a task's loss reaches all of them through the
    generated tensors (its tower's tensors come from the same embedding), so the Gramian of a
    gradient method is over all hypernetwork parameters, as PHN-EPO's official one. The
    representation is the flat vector of generated target tensors: the losses reach the
    hypernetwork only through it, and ``level="representation"`` gives the gradients with respect
    to the target network's weights (one backward through the hypernetwork instead of ``K``). The
    official target is a LeNet without the ReLU after its shared fully connected layer and with one
    linear layer per task; the image benchmark uses mtlkit's MultiLeNet (that ReLU kept;
    ``target_options={"tower_dims": []}`` gives one-layer heads).

    Args:
        in_features: the target's input width or image shape.
        tasks: the task set (or task names).
        target: the registry name of the target model.
        out_features: outputs per task, or a map, passed to the target.
        ray_hidden: width of the ray MLP (official 100).
        target_options: further options of the target.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        target: str = "shared_bottom",
        out_features: int | Mapping[str, int] = 1,
        ray_hidden: int = 100,
        target_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        if ray_hidden < 1:
            raise ConfigError(f"pareto_hypernetwork: ray_hidden must be positive, got {ray_hidden}.")
        k = len(self.task_names)
        self._init_preference(k)
        self.in_features = in_features if isinstance(in_features, int) else tuple(in_features)
        net = MODELS.create(
            target,
            in_features=in_features,
            tasks=tasks,
            out_features=out_features,
            **dict(target_options or {}),
        )
        if not isinstance(net, MultiTaskModule):
            raise ConfigError(f"pareto_hypernetwork: target {target!r} is not an mtlkit MultiTaskModule.")
        net.requires_grad_(False)
        self.target = net
        self.ray_mlp = nn.Sequential(
            nn.Linear(k, ray_hidden),
            nn.ReLU(),
            nn.Linear(ray_hidden, ray_hidden),
            nn.ReLU(),
            nn.Linear(ray_hidden, ray_hidden),
        )
        self._names = [name for name, _ in net.named_parameters()]
        self._shapes = [p.shape for _, p in net.named_parameters()]
        self.weights_head = nn.Linear(ray_hidden, sum(p.numel() for p in net.parameters()))

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.ray_mlp, self.weights_head]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return []

    def flat_weights(self) -> Tensor:
        """The target's tensors for the current preference, flattened and concatenated."""
        return self.weights_head(self.ray_mlp(self.preference.to(self.weights_head.weight.dtype)))

    def generated(self, flat: Tensor | None = None) -> dict[str, Tensor]:
        """The target's tensors (from ``flat``, or for the current preference) by parameter name."""
        flat = self.flat_weights() if flat is None else flat
        pieces = flat.split([s.numel() for s in self._shapes])
        return {n: v.reshape(s) for n, v, s in zip(self._names, pieces, self._shapes, strict=True)}

    def forward_tasks(self, x: Any, tasks: list[str]) -> MultiTaskOutput:
        flat = self.flat_weights()
        out = functional_call(self.target, self.generated(flat), (x,), {"full_output": True})
        return MultiTaskOutput({t: out.predictions[t] for t in tasks}, flat, aux_losses=out.aux_losses)

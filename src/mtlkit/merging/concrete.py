"""Concrete subspace learning: one shared mask over the task vectors, learned at test time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.merging.adaptive import (
    CoefficientMerger,
    TaskVectorModel,
    check_choice,
    total_loss,
    training_loop,
)
from mtlkit.merging.base import register

#: the mask the merge keeps: a relaxed sample (the official default) or a Bernoulli one
MASKS = ("continuous", "discrete")

Streams = list[Iterator[tuple[Tensor, Tensor | None]]]


class ConcreteMask:
    """Mask logits ``s`` per entry of each masked tensor and their samples (Maddison et al.'s binary
    Concrete: ``sigmoid((s + log u - log(1 - u)) / temperature)``, reparameterised), each sample
    divided by its mean so the expected scale of the masked task vectors is kept. The uniform draws
    come from a seeded generator, so a merge is reproducible."""

    def __init__(self, model: TaskVectorModel, initial_logits: float, temperature: float, seed: int) -> None:
        self.logits = {
            n: torch.full_like(model.base[n], initial_logits, requires_grad=True)
            for n in model.parameter_names()
        }
        if not self.logits:
            raise ConfigError("concrete: the model has no parameter to mask.")
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, kind: str = "continuous") -> dict[str, Tensor]:
        out = {}
        for n, s in self.logits.items():
            u = torch.rand(s.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6)
            if kind == "continuous":
                m = torch.sigmoid((s + torch.log(u) - torch.log1p(-u)) / self.temperature)
            else:
                m = (u < torch.sigmoid(s)).to(s.dtype)
            mean = m.mean()
            out[n] = m / mean if float(mean.detach()) > 0 else m  # an all-zero discrete mask stays zero
        return out

    def kept_share(self) -> float:
        """The share of entries whose keep probability ``sigmoid(s)`` is above 1/2."""
        kept = sum(int((s > 0).sum()) for s in self.logits.values())
        return kept / sum(s.numel() for s in self.logits.values())


class ConcreteMerger(CoefficientMerger):
    """What the Concrete mergers share: the mask's settings, checked once, and the mask itself."""

    def __init__(
        self,
        granularity: str,
        objective: str,
        steps: int,
        lr: float,
        temperature: float,
        initial_logits: float,
        eval_mask: str,
        seed: int,
    ) -> None:
        super().__init__(granularity, objective)
        if steps < 0 or not lr > 0 or not temperature > 0:
            raise ConfigError(
                f"concrete: need steps >= 0, lr > 0 and temperature > 0; got {steps}, {lr}, {temperature}."
            )
        self.eval_mask = check_choice(eval_mask, MASKS, "eval_mask")
        self.steps, self.lr = int(steps), float(lr)
        self.temperature, self.initial_logits, self.seed = (
            float(temperature),
            float(initial_logits),
            int(seed),
        )

    def new_mask(self, model: TaskVectorModel) -> ConcreteMask:
        return ConcreteMask(model, self.initial_logits, self.temperature, self.seed)


@register("concrete_ta")
class ConcreteTaskArithmetic(ConcreteMerger):
    """Concrete Task Arithmetic (Tang, Shen, Luo, Du, Tao, "Concrete Subspace Learning based
    Interference Elimination for Multi-task Model Fusion", arXiv 2312.06173, 2023).

    ``theta = theta_0 + scaling * sum_t (m * tau_t)`` with one mask ``m`` shared by every task,
    sampled from Concrete distributions whose logits (start ``initial_logits`` 0, temperature 0.5)
    take ``steps`` Adam steps (lr 1e-3; FusionBench: 2000 steps) on the summed test-time objective
    (entropy, as the paper; ``objective`` as in :class:`~mtlkit.merging.adaptive.AdaMerging`). The
    merge keeps one last sample, ``eval_mask="continuous"`` (the default) or ``"discrete"``, rescaled
    by its mean. The mask covers the model's parameters (not its buffers), as the official mask model
    does; ``seed`` fixes the samples. Needs ``data=`` as AdaMerging.
    """

    def __init__(
        self,
        scaling: float = 0.3,
        steps: int = 2000,
        lr: float = 1e-3,
        temperature: float = 0.5,
        initial_logits: float = 0.0,
        eval_mask: str = "continuous",
        objective: str = "entropy",
        seed: int = 0,
    ) -> None:
        super().__init__("task", objective, steps, lr, temperature, initial_logits, eval_mask, seed)
        self.scaling = float(scaling)

    def fit(self, model: TaskVectorModel, streams: Streams) -> tuple[Tensor, dict[str, Tensor] | None]:
        mask = self.new_mask(model)
        coefficients = torch.full((model.tasks, 1), self.scaling)
        history = training_loop(
            list(mask.logits.values()),
            self.lr,
            self.steps,
            lambda: total_loss(
                model, model.merged(coefficients, mask.sample()), self._names, streams, self.objective
            ),
        )
        with torch.no_grad():
            final = mask.sample(self.eval_mask)
        self._extras = {"first_loss": history[:1], "last_loss": history[-1:], "kept_share": mask.kept_share()}
        return coefficients, final


@register("concrete_adamerging")
class ConcreteAdaMerging(ConcreteMerger):
    """Concrete AdaMerging (Tang et al., arXiv 2312.06173, 2023), as the official code does it.

    Stage 1 (``steps`` 1000, the mask meta-learned): each step samples one mask; (i) with the mask
    detached and the merging coefficients reset to ``init`` (0.3), one Adam step on the coefficients
    (lr ``base_lr`` 1, the optimiser's moments kept across steps) on the summed objective; (ii) with
    the mask attached and the stepped coefficients fixed, one Adam step on the mask logits (lr 1e-3)
    on the objective of fresh batches (a first-order approximation of the bi-level problem: no
    gradient through step (i)). Stage 2: one mask is drawn (``eval_mask``) and frozen, and plain
    AdaMerging (``granularity`` task or layer, from ``init``, lr ``adamerging_lr`` 1e-3,
    ``adamerging_steps`` 1000) runs on the masked task vectors. Needs ``data=`` as AdaMerging.
    """

    def __init__(
        self,
        granularity: str = "layer",
        steps: int = 1000,
        lr: float = 1e-3,
        base_lr: float = 1.0,
        adamerging_steps: int = 1000,
        adamerging_lr: float = 1e-3,
        init: float = 0.3,
        temperature: float = 0.5,
        initial_logits: float = 0.0,
        eval_mask: str = "continuous",
        objective: str = "entropy",
        seed: int = 0,
    ) -> None:
        super().__init__(granularity, objective, steps, lr, temperature, initial_logits, eval_mask, seed)
        if adamerging_steps < 0 or not base_lr > 0 or not adamerging_lr > 0:
            raise ConfigError("concrete_adamerging: need adamerging_steps >= 0 and positive learning rates.")
        self.base_lr, self.adamerging_steps = float(base_lr), int(adamerging_steps)
        self.adamerging_lr, self.init = float(adamerging_lr), float(init)

    def fit(self, model: TaskVectorModel, streams: Streams) -> tuple[Tensor, dict[str, Tensor] | None]:
        mask = self.new_mask(model)
        coefficients = torch.full(self.coefficient_shape(model), self.init, requires_grad=True)
        inner = torch.optim.Adam([coefficients], lr=self.base_lr)
        outer = torch.optim.Adam(list(mask.logits.values()), lr=self.lr)
        history = []
        for _ in range(self.steps):
            sample = mask.sample()
            with torch.no_grad():
                coefficients.fill_(self.init)
            inner.zero_grad()
            detached = {n: m.detach() for n, m in sample.items()}
            total_loss(
                model, model.merged(coefficients, detached), self._names, streams, self.objective
            ).backward()
            inner.step()
            outer.zero_grad()
            loss = total_loss(
                model, model.merged(coefficients.detach(), sample), self._names, streams, self.objective
            )
            loss.backward()
            outer.step()
            history.append(float(loss.detach()))
        with torch.no_grad():
            final = mask.sample(self.eval_mask)
            coefficients.fill_(self.init)
        adapted = training_loop(
            [coefficients],
            self.adamerging_lr,
            self.adamerging_steps,
            lambda: total_loss(
                model, model.merged(coefficients, final), self._names, streams, self.objective
            ),
        )
        self._extras = {
            "first_loss": history[:1],
            "mask_last_loss": history[-1:],
            "last_loss": adapted[-1:],
            "kept_share": mask.kept_share(),
        }
        return coefficients.detach(), final

"""The adapt-then-combine diffusion of Byzantine-resilient multi-task learning, agent by agent.

Per step ``i`` every agent ``k``: adapt, ``psi_k = w_k - mu grad l_k(w_k; batch_k(i))`` (no step
when its data stream gives no batch this step: data-poor agents); send ``psi_k`` (a Byzantine agent
sends its attack instead); combine, ``w_k = sum_l c_kl psi_l`` over its neighbours with its rule
(the loss rule first scores every neighbour's ``psi_l`` on its own batch). Byzantine agents never
combine. :class:`DecentralizedNetwork` runs all agents in one process (each step's messages are
gathered first, so the result equals the multi-process run); :mod:`mtlkit.decentralized.processes`
runs one agent per ``torch.distributed`` process with the same two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mtlkit.decentralized.attacks import Attack
from mtlkit.decentralized.rules import Rule, make_rule
from mtlkit.errors import ConfigError

LossFn = Callable[[Tensor, Any], Tensor]


@dataclass
class Agent:
    """One agent: ``loss(w, batch)`` on its flat parameters, ``data(step)`` its batch of that step
    (None: no data this step), its initial model ``w0``, and an ``attack`` if it is Byzantine.
    ``score(w, batch)``, when given, is what the loss-based rule evaluates its neighbours' models
    with (default: ``loss``; the paper's localisation agents adapt on a pseudo-measurement of the
    target and score on the measurement residual)."""

    loss: LossFn
    data: Callable[[int], Any]
    w0: Tensor
    attack: Attack | None = None
    score: LossFn | None = None

    @property
    def byzantine(self) -> bool:
        return self.attack is not None


@dataclass
class StepRecord:
    """Per normal agent: its combination weights over its neighbours (None for rules without
    weights) at one step."""

    step: int
    weights: dict[int, Tensor | None] = field(default_factory=dict)


class DecentralizedNetwork:
    """Agents on ``graph`` (neighbour lists containing the agent itself) with step size ``mu`` and
    the combination ``rule`` (:mod:`mtlkit.decentralized.rules`; ``rule_options`` such as ``nu``,
    ``r0``, ``f``)."""

    def __init__(
        self,
        agents: Sequence[Agent],
        graph: Sequence[Sequence[int]],
        mu: float,
        rule: str = "loss",
        seed: int = 0,
        **rule_options: Any,
    ) -> None:
        n = len(agents)
        if n == 0 or len(graph) != n:
            raise ConfigError(
                f"The graph must list neighbours for each of the {n} agents, got {len(graph)} lists."
            )
        for k, nb in enumerate(graph):
            if k not in nb or any(not (0 <= j < n) for j in nb) or len(set(nb)) != len(nb):
                raise ConfigError(
                    f"Agent {k}'s neighbours {list(nb)} must be distinct agents including itself."
                )
        if not mu > 0:
            raise ConfigError(f"mu must be > 0, got {mu!r}.")
        sizes = {a.w0.numel() for a in agents}
        if len(sizes) != 1:
            raise ConfigError("Every agent's model must have the same number of parameters.")
        self.agents, self.graph, self.mu = list(agents), [list(nb) for nb in graph], float(mu)
        self.w = [a.w0.detach().clone() for a in agents]
        self.rules: dict[int, Rule] = {
            k: make_rule(rule, len(self.graph[k]), self.graph[k].index(k), **rule_options)
            for k, a in enumerate(agents)
            if not a.byzantine
        }
        self.generators = [torch.Generator().manual_seed(seed * 100_003 + k) for k in range(n)]
        self.batches: dict[int, Any] = {}

    # the two halves of a step, shared with the multi-process runner -----------------------------
    def adapt(self, k: int, step: int) -> Tensor:
        """Agent ``k``'s message of this step: its adapted model, or its attack."""
        agent = self.agents[k]
        batch = agent.data(step)
        self.batches[k] = batch
        w = self.w[k]
        if batch is None:
            psi = w.clone()
        else:
            x = w.detach().requires_grad_(True)
            loss = agent.loss(x, batch)
            if not bool(torch.isfinite(loss)):
                raise ConfigError(f"Agent {k}'s loss is not finite at step {step}.")
            (grad,) = torch.autograd.grad(loss, x)
            psi = (w - self.mu * grad).detach()
        return agent.attack(psi, self.generators[k]) if agent.attack is not None else psi

    def combine(self, k: int, messages: Tensor) -> Tensor | None:
        """Agent ``k`` combines the messages of all agents (rows, only its neighbours' are read);
        returns its weights over its neighbours."""
        if self.agents[k].byzantine:
            self.w[k] = messages[k].clone()
            return None
        nb = self.graph[k]
        psis = messages[nb]
        rule = self.rules[k]
        losses = None
        batch = self.batches.get(k)
        if rule.needs_losses and batch is not None:
            score = self.agents[k].score or self.agents[k].loss
            with torch.no_grad():
                losses = torch.stack([score(p, batch).detach() for p in psis])
        weights, self.w[k] = rule.combine(psis, losses, self.w[k])
        return weights

    # one process ----------------------------------------------------------------------------------
    def step(self, step: int) -> StepRecord:
        messages = torch.stack([self.adapt(k, step) for k in range(len(self.agents))])
        record = StepRecord(step)
        for k in range(len(self.agents)):
            weights = self.combine(k, messages)
            if not self.agents[k].byzantine:
                record.weights[k] = weights
        return record

    def run(self, steps: int) -> list[StepRecord]:
        return [self.step(i) for i in range(steps)]

    # one agent's state, for checkpoints ------------------------------------------------------------
    def agent_state(self, k: int) -> dict[str, Any]:
        """Everything agent ``k`` carries from step to step: its model, its rule's accumulators and
        its attack generator (its data stream must be a function of the step to resume exactly)."""
        rule = self.rules.get(k)
        return {
            "w": self.w[k].clone(),
            "rule": rule.state_dict() if rule is not None else {},
            "generator": self.generators[k].get_state(),
        }

    def load_agent_state(self, k: int, state: dict[str, Any]) -> None:
        """Restore what :meth:`agent_state` returned."""
        w = state["w"]
        if not isinstance(w, Tensor) or w.shape != self.w[k].shape:
            raise ConfigError(
                f"Agent {k}'s saved model does not fit its model of shape {tuple(self.w[k].shape)}."
            )
        rule = self.rules.get(k)
        if rule is not None:
            rule.load_state_dict(state["rule"])
        self.w[k] = w.to(self.w[k]).clone()
        self.generators[k].set_state(state["generator"])

    # metrics ----------------------------------------------------------------------------------------
    def weight_on(self, record: StepRecord, group: set[int], k: int) -> float:
        """The weight agent ``k`` put on the agents of ``group`` at that step."""
        w = record.weights.get(k)
        if w is None:
            raise ConfigError(f"Agent {k}'s rule has no weights.")
        return float(sum(w[i] for i, j in enumerate(self.graph[k]) if j in group))

    def mean_squared_deviation(self, targets: dict[int, Tensor]) -> float:
        """Mean over the given (normal) agents of ``||w_k - w*_k||^2``."""
        return float(
            torch.stack([(self.w[k] - t.to(self.w[k])).pow(2).sum() for k, t in targets.items()]).mean()
        )

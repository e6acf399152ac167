"""Real processes: four agents as four gloo ranks end with the single-process run's models."""

from __future__ import annotations

import torch

from mtlkit.decentralized import Agent, DecentralizedNetwork, complete_graph, make_attack
from mtlkit.decentralized.processes import spawn


def _loss(w, batch):
    x, y = batch
    return (x @ w - y).pow(2).mean()


def _stream(k: int, truth: torch.Tensor):
    def data(step: int):
        gen = torch.Generator().manual_seed(10_000 * k + step)  # the same batch in any process
        x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        return x, x @ truth + 0.3 * torch.randn(8, generator=gen, dtype=torch.float64)

    return data


def build(rank: int = 0, world: int = 4) -> DecentralizedNetwork:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    truths = [a, a, b, b]
    agents = [
        Agent(
            _loss,
            _stream(k, truths[k]),
            torch.zeros(3, dtype=torch.float64),
            make_attack("fixed_point") if k == 3 else None,
        )
        for k in range(4)
    ]
    return DecentralizedNetwork(agents, complete_graph(4), mu=0.05, rule="loss", nu=0.1, r0=1.0, seed=0)


def test_four_processes_match_one_process():
    steps = 60
    results = spawn(build, world_size=4, steps=steps)
    single = build()
    records = single.run(steps)
    for k in range(4):
        assert torch.equal(results[k]["w"], single.w[k])
    for k in range(3):
        assert torch.equal(results[k]["weights"][-1], records[-1].weights[k])
    assert float(results[0]["weights"][-1][3]) == 0.0  # the Byzantine rank gets no weight

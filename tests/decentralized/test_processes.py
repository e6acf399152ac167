"""Real processes: four agents as four gloo ranks end with the single-process run's models, also
after an agent process is killed and the job resumed from the committed checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

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


def _dies(rank: int, world: int) -> DecentralizedNetwork:
    """The network of :func:`build` in which agent 2's process is killed at step 35."""
    network = build(rank, world)
    agent = network.agents[2]
    data = agent.data

    def dying(step: int):
        if rank == 2 and step == 35:
            os._exit(3)  # no clean-up, as a killed process
        return data(step)

    agent.data = dying
    return network


def test_a_killed_agent_and_a_resumed_job_end_with_the_uninterrupted_models(tmp_path):
    steps = 60
    whole = build()  # the uninterrupted run: one process gives the multi-process models bit for bit
    whole.run(steps)
    with pytest.raises(mp.ProcessExitedException):
        spawn(_dies, world_size=4, steps=steps, checkpoint_dir=tmp_path / "broken", every=10)
    assert (tmp_path / "broken" / "committed").read_text() == "30"  # the last step all agents saved
    # one state file per agent is kept: the committed one
    assert sorted(p.name for p in (tmp_path / "broken").glob("agent*")) == [
        f"agent{k:05d}-step000000030.pt" for k in range(4)
    ]
    resumed = spawn(build, world_size=4, steps=steps, checkpoint_dir=tmp_path / "broken", every=10)
    for k in range(4):
        assert torch.equal(resumed[k]["w"], whole.w[k])
        assert len(resumed[k]["weights"]) == steps - 30  # it ran from the committed step only


def _d1_network(rank: int, world: int) -> DecentralizedNetwork:
    from tests.decentralized.test_network import setup

    return setup("loss", nu=0.1, r0=1.0)[0]


@pytest.mark.slow
def test_d1_and_d2_thresholds_hold_with_one_process_per_agent():
    from tests.decentralized.test_network import BYZANTINE, TASK_A, TASK_B, setup

    results = spawn(_d1_network, world_size=10, steps=600)
    for k in TASK_A | TASK_B:
        weights = results[k]["weights"]
        assert max(float(w[list(BYZANTINE)].sum()) for w in weights[200:]) < 1e-3  # D1
    _, targets = setup("loss", nu=0.1, r0=1.0)
    msd = float(torch.stack([(results[k]["w"] - t).pow(2).sum() for k, t in targets.items()]).mean())
    none, _ = setup("none")
    none.run(600)
    assert msd <= 1.05 * none.mean_squared_deviation(targets)  # D2 (here far below)

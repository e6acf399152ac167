"""RLW: weights on the simplex, uniform in expectation, reproducible and resumable draws."""

import math

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import CheckpointError


def test_rlw_weights_are_on_the_simplex_and_uniform_in_expectation():
    active = torch.ones(4, dtype=torch.bool)
    for dist in ("normal", "uniform", "dirichlet"):
        method = mk.methods.RLW(distribution=dist, seed=3)
        ws = torch.stack([method.loss_weights(torch.ones(4), active) for _ in range(20000)])
        torch.testing.assert_close(ws.sum(1), torch.ones(20000))
        assert (ws > 0).all()
        stderr = float(ws.std(0).max()) / math.sqrt(len(ws))
        torch.testing.assert_close(ws.mean(0), torch.full((4,), 0.25), atol=5 * stderr, rtol=0)


def test_rlw_is_reproducible_and_resumes_its_stream():
    fixed = [torch.tensor(1.0, requires_grad=True) for _ in range(3)]
    a = mk.methods.RLW(seed=11)
    first = [a.backward(fixed).weights for _ in range(5)]
    state = a.state_dict()
    later = [a.backward(fixed).weights for _ in range(5)]
    b = mk.methods.RLW(seed=11)
    assert all(
        torch.equal(u, v) for u, v in zip(first, [b.backward(fixed).weights for _ in range(5)], strict=True)
    )
    with pytest.raises(CheckpointError, match="seed"):  # another configuration: refused
        mk.methods.RLW(seed=999).load_state_dict(state)
    c = mk.methods.RLW(seed=11)
    c.load_state_dict(state)
    assert all(
        torch.equal(u, v) for u, v in zip(later, [c.backward(fixed).weights for _ in range(5)], strict=True)
    )
    torch.manual_seed(5)
    d1 = mk.methods.RLW().backward(fixed).weights
    torch.manual_seed(5)
    assert torch.equal(d1, mk.methods.RLW().backward(fixed).weights)  # seed=None follows torch.manual_seed

"""Corrupted task vectors and the robust merge: the noise's signal-to-noise ratio, the adversaries'
definitions, Task Arithmetic recovered by the plain mean, and each robust aggregate resisting one
bad contributor where the sum does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlkit as mk


def _family(tasks: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).state_dict()
    # the honest task vectors share a direction plus their own noise, as related fine-tunes do
    common = {k: torch.randn_like(v) for k, v in base.items()}
    experts = {
        f"t{t}": {k: v + 0.1 * (common[k] + 0.3 * torch.randn_like(v)) for k, v in base.items()}
        for t in range(tasks)
    }
    return base, experts


def _distance(a, b) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def test_gaussian_noise_has_the_asked_signal_to_noise_ratio_and_spares_the_others():
    base, experts = _family()
    noisy = mk.merging.gaussian_corruption(base, experts, snr_db=10.0, seed=1, which=["t0"])
    big = {"w": torch.zeros(200, 200)}  # per tensor: measured on 40,000 entries
    torch.manual_seed(0)
    tau = torch.randn(200, 200)
    received = mk.merging.gaussian_corruption(big, {"a": {"w": tau}}, snr_db=10.0, seed=1)["a"]["w"]
    signal, noise = float(tau.pow(2).mean()), float((received - tau).pow(2).mean())
    assert 10 * torch.log10(torch.tensor(signal / noise)) == pytest.approx(10.0, abs=0.1)
    assert all(torch.equal(noisy["t1"][k], experts["t1"][k]) for k in base)
    again = mk.merging.gaussian_corruption(base, experts, snr_db=10.0, seed=1, which=["t0"])
    assert all(torch.equal(again["t0"][k], noisy["t0"][k]) for k in base)


def test_the_adversaries_send_what_they_are_defined_to_send():
    base, experts = _family()
    flipped = mk.merging.adversarial_contributor(base, experts, "t0", "sign_flip", scale=2.0)
    torch.testing.assert_close(
        flipped["t0"]["0.weight"] - base["0.weight"], -2 * (experts["t0"]["0.weight"] - base["0.weight"])
    )
    cancel = mk.merging.adversarial_contributor(base, experts, "t0", "cancel")
    summed = mk.merging.merge(base, cancel, "task_arithmetic", scaling=1.0).state_dict
    for k in base:  # the adversary erases every other task vector from the sum
        torch.testing.assert_close(summed[k], base[k], atol=1e-6, rtol=0)
    noise = mk.merging.adversarial_contributor(base, experts, "t0", "noise", scale=3.0)
    tau = torch.cat([(experts["t0"][k] - base[k]).reshape(-1) for k in base])
    sent = torch.cat([(noise["t0"][k] - base[k]).reshape(-1) for k in base])
    assert float(sent.norm()) == pytest.approx(3 * float(tau.norm()), rel=0.05)


def test_the_plain_mean_is_task_arithmetic():
    base, experts = _family()
    robust = mk.merging.merge(base, experts, "robust_ta", aggregate="trimmed_mean", trim=0).state_dict
    ta = mk.merging.merge(base, experts, "task_arithmetic", scaling=0.3).state_dict
    for k in ta:
        torch.testing.assert_close(robust[k], ta[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("aggregate", ["median", "trimmed_mean", "norm_clip", "krum"])
def test_each_robust_aggregate_resists_one_bad_contributor_where_the_sum_does_not(aggregate):
    base, experts = _family(tasks=5)
    clean = mk.merging.merge(base, experts, "task_arithmetic").state_dict
    attacked = mk.merging.adversarial_contributor(base, experts, "t0", "sign_flip", scale=10.0)
    plain = mk.merging.merge(base, attacked, "task_arithmetic").state_dict
    robust = mk.merging.merge(base, attacked, "robust_ta", aggregate=aggregate).state_dict
    assert _distance(robust, clean) < 0.5 * _distance(plain, clean)


def test_bad_settings_are_named():
    base, experts = _family()
    with pytest.raises(mk.errors.UnknownNameError):
        mk.merging.merge(base, experts, "robust_ta", aggregate="mode")
    with pytest.raises(mk.errors.UnknownNameError):
        mk.merging.adversarial_contributor(base, experts, "t0", "replace")
    with pytest.raises(mk.errors.ConfigError, match="no expert"):
        mk.merging.adversarial_contributor(base, experts, "t9")
    with pytest.raises(mk.errors.ConfigError, match="no experts"):
        mk.merging.gaussian_corruption(base, experts, 10.0, which=["t9"])
    with pytest.raises(mk.errors.ConfigError, match="more than"):
        mk.merging.merge(
            base, {"a": experts["t0"], "b": experts["t1"]}, "robust_ta", aggregate="trimmed_mean"
        )

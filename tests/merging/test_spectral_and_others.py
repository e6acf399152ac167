"""Breadcrumbs, MetaGPT, TSV-M, Iso-C/CTS, SLERP and Model Stock: their defining identities."""

from __future__ import annotations

import math

import pytest
import torch

import mtlkit as mk
from mtlkit.errors import ConfigError
from mtlkit.merging.breadcrumbs import breadcrumb_mask
from mtlkit.merging.isotropic import common_split


def vectors(tasks: int, shape=(6, 4), seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(shape, generator=gen, dtype=torch.float64),
        "b": torch.randn(shape[0], generator=gen, dtype=torch.float64),
    }
    experts = {
        f"t{i}": {k: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
        for i in range(tasks)
    }
    return base, experts


def merged_tau(base, experts, method, **options):
    out = mk.merging.merge(base, experts, method, **options).state_dict
    return {k: out[k] - base[k] for k in base}


def test_breadcrumbs_drops_the_smallest_and_largest_magnitudes():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, 4.0, -3.0, 0.6])
    keep = breadcrumb_mask(tau, bottom=0.2, top=0.1)
    assert keep.tolist() == [False, False, True, True, True, True, False, True, True, True]
    base, experts = vectors(3)
    plain = merged_tau(base, experts, "breadcrumbs", bottom=0.0, top=0.0, scaling=0.5)
    ta = merged_tau(base, experts, "task_arithmetic", scaling=0.5)
    for k in base:
        torch.testing.assert_close(plain[k], ta[k])
    with pytest.raises(ConfigError, match="leave something"):
        mk.merging.merge(base, experts, "breadcrumbs", bottom=0.6, top=0.5)


@pytest.mark.parametrize("norms", ["model", "tensor"])
def test_metagpt_weights_task_vectors_by_their_squared_norms(norms):
    base, experts = vectors(2)
    experts["t1"] = {k: base[k] + 3 * (v - base[k]) for k, v in experts["t0"].items()}  # 3x the first
    tau = merged_tau(base, experts, "metagpt", norms=norms)
    # lambda = (1, 9) / 10, so tau_m = (0.1 + 0.9 * 3) tau_0 = 2.8 tau_0
    for k in base:
        torch.testing.assert_close(tau[k], 2.8 * (experts["t0"][k] - base[k]))
    one = merged_tau(base, {"t0": experts["t0"]}, "metagpt", norms=norms)
    for k in base:
        torch.testing.assert_close(one[k], experts["t0"][k] - base[k])


def test_tsv_with_one_task_keeps_its_task_vector():
    base, experts = vectors(1)
    tau = merged_tau(base, experts, "tsv")
    for k in base:
        torch.testing.assert_close(tau[k], experts["t0"][k] - base[k])


@pytest.mark.parametrize(("tasks", "rank"), [(2, 6), (3, 6), (4, 4), (7, 6)])
def test_tsv_keeps_r_over_t_directions_per_task_in_orthonormal_stacks(tasks, rank):
    # rank 6 split over T tasks: floor(6/T) directions each (at least one), so the merged update
    # has rank min(T * k, 6): 2 x 3, 3 x 2, 4 x 1, and 7 x 1 capped at 6
    base, experts = vectors(tasks, shape=(8, 6))
    tau = merged_tau(base, experts, "tsv")["w"]
    assert int(torch.linalg.matrix_rank(tau)) == rank
    # non-matrices take the mean task vector
    torch.testing.assert_close(
        merged_tau(base, experts, "tsv")["b"], sum(e["b"] - base["b"] for e in experts.values()) / tasks
    )


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vector():
    base, experts = vectors(3)
    tau = merged_tau(base, experts, "iso_c")["w"]
    total = sum(e["w"] - base["w"] for e in experts.values())
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    got = torch.linalg.svdvals(tau)
    torch.testing.assert_close(got, torch.full_like(got, float(s.mean())))
    torch.testing.assert_close(tau, s.mean() * u @ vh)


def test_iso_cts_has_a_flat_spectrum_and_is_iso_c_with_only_common_directions():
    base, experts = vectors(3, shape=(10, 8))
    tau = merged_tau(base, experts, "iso_cts")["w"]
    sv = torch.linalg.svdvals(tau)
    torch.testing.assert_close(sv, torch.full_like(sv, float(sv[0])))
    only_common = merged_tau(base, experts, "iso_cts", common_fraction=1.0)
    iso_c = merged_tau(base, experts, "iso_c")
    for k in base:
        torch.testing.assert_close(only_common[k], iso_c[k])
    assert common_split(8, 3, 0.8) == (5, 1)  # int(6.4) = 6, then 2 left round to 3: 5 common
    assert common_split(768, 8, 0.8) == (616, 19)


def test_slerp_ends_and_angle():
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"w": torch.tensor([0.0, 2.0], dtype=torch.float64)}
    assert torch.equal(mk.merging.merge(None, {"a": a, "b": b}, "slerp", t=0.0).state_dict["w"], a["w"])
    torch.testing.assert_close(
        mk.merging.merge(None, {"a": a, "b": b}, "slerp", t=1.0).state_dict["w"], b["w"]
    )
    mid = mk.merging.merge(None, {"a": a, "b": b}, "slerp", t=0.5).state_dict["w"]
    # 90 degrees: weights sin(45)/sin(90) on each unnormalised tensor
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)], dtype=torch.float64))
    parallel = mk.merging.merge(None, {"a": a, "b": {"w": 3 * a["w"]}}, "slerp", t=0.5).state_dict["w"]
    torch.testing.assert_close(parallel, 2 * a["w"])
    with pytest.raises(ConfigError, match="exactly two"):
        mk.merging.merge(None, vectors(3)[1], "slerp")


def test_model_stock_moves_toward_the_average_by_the_task_vectors_angle():
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    same = {
        "a": {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)},
        "b": {"w": torch.tensor([2.0, 2.0], dtype=torch.float64)},
    }
    torch.testing.assert_close(
        mk.merging.merge(base, same, "model_stock").state_dict["w"],
        torch.tensor([1.5, 1.5], dtype=torch.float64),
    )
    orth = {
        "a": {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)},
        "b": {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)},
    }
    torch.testing.assert_close(mk.merging.merge(base, orth, "model_stock").state_dict["w"], base["w"])
    # cos = 0.5, k = 2: t = 1 / 1.5 = 2/3 of the average
    half = {
        "a": {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)},
        "b": {"w": torch.tensor([0.5, math.sqrt(0.75)], dtype=torch.float64)},
    }
    avg = (half["a"]["w"] + half["b"]["w"]) / 2
    torch.testing.assert_close(mk.merging.merge(base, half, "model_stock").state_dict["w"], 2 / 3 * avg)


def test_della_keeps_large_entries_more_often_and_is_unbiased_with_exact_rescale():
    from mtlkit.merging.della import keep_probabilities

    tau = torch.tensor([[0.1, -3.0, 2.0], [5.0, 0.2, -1.0]], dtype=torch.float64)
    p = keep_probabilities(tau, 0.5, 0.1)
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.5], [0.6, 0.4, 0.5]], dtype=torch.float64))
    base = {"w": torch.zeros(4000, dtype=torch.float64)}
    t = torch.randn(4000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    runs = [mk.merging.merge(base, {"e": {"w": t}}, "della", seed=s).state_dict["w"] for s in range(30)]
    for run in runs:  # about half the entries survive, each rescaled by 1/p
        assert abs(float((run != 0).double().mean()) - 0.5) < 0.05
    mean = torch.stack(runs).mean(0)
    assert float((mean - t).abs().mean()) < 0.35 * float(t.abs().mean())
    with pytest.raises(ConfigError, match="density - epsilon"):
        mk.merging.merge(base, {"e": {"w": t}}, "della", density=0.1, epsilon=0.2)
    # density 1 (mergekit's default) keeps every entry, whatever epsilon
    full = mk.merging.merge(base, {"e": {"w": t}}, "della", density=1.0, epsilon=0.15).state_dict["w"]
    torch.testing.assert_close(full, t)


def test_wudi_is_exact_for_one_task_and_lowers_its_loss():
    from mtlkit.merging.wudi import wudi_loss

    base, experts = vectors(1)
    tau = merged_tau(base, experts, "wudi")
    torch.testing.assert_close(tau["w"], experts["t0"]["w"] - base["w"])
    assert torch.equal(tau["b"], torch.zeros_like(tau["b"]))  # not 2-D: the pretrained value
    base, experts = vectors(3)
    taus = [e["w"] - base["w"] for e in experts.values()]
    start = float(wudi_loss(torch.stack(taus).sum(0), taus))
    merged = merged_tau(base, experts, "wudi", steps=200, lr=1e-2)["w"]
    assert float(wudi_loss(merged, taus)) < 0.5 * start
    mean = merged_tau(base, experts, "wudi", steps=0, others="mean")
    torch.testing.assert_close(
        mean["b"], sum(taus_b := [e["b"] - base["b"] for e in experts.values()]) / len(taus_b)
    )
    only = merged_tau(base, experts, "wudi", select=r"^w$", steps=0, others="mean")
    torch.testing.assert_close(only["w"], sum(taus))  # selected: starts (and with 0 steps ends) at the sum
    with pytest.raises(ConfigError, match="no tensor was optimised"):
        merged_tau(base, experts, "wudi", select=r"^b$", steps=0)  # b is 1-D: WUDI would do nothing


def test_wudi_closed_form_gradient_follows_the_autograd_trajectory():
    from mtlkit.merging.wudi import wudi_loss, wudi_quadratic

    base, experts = vectors(3)
    taus = [e["w"] - base["w"] for e in experts.values()] + [torch.zeros_like(base["w"])]
    gram, target = wudi_quadratic(taus)
    point = torch.randn_like(taus[0]).requires_grad_(True)
    wudi_loss(point, taus).backward()
    torch.testing.assert_close(2 * (point.detach() @ gram - target), point.grad)
    # the official loop: Adam on the autograd gradient of the loss, from the sum of task vectors
    merged = torch.stack(taus).sum(0).requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        wudi_loss(merged, taus).backward()
        optimizer.step()
    ours = merged_tau(base, experts, "wudi", steps=50, lr=1e-2)["w"]
    torch.testing.assert_close(ours, merged.detach(), rtol=1e-9, atol=1e-9)


def test_emr_rebuilds_each_expert_exactly_when_the_tasks_never_conflict():
    base = {"w": torch.zeros(6, dtype=torch.float32), "n": torch.tensor(3)}
    a = {"w": torch.tensor([1.5, -2.0, 0.0, 0.0, 0.0, 0.25]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([0.0, 0.0, 3.0, -0.5, 0.0, 0.0]), "n": torch.tensor(9)}
    result = mk.merging.merge(base, {"a": a, "b": b}, "emr")
    for name, expert in (("a", a), ("b", b)):
        sd = result.for_task(name)
        assert torch.equal(sd["w"], expert["w"]) and sd["w"].dtype == torch.float32
        assert sd["n"] == 3  # integer tensors as in the merged model
    assert result.extras["modulators"].scales == {"a": 1.0, "b": 1.0}
    with pytest.raises(ConfigError, match="No modulator"):
        result.for_task("c")
    with pytest.raises(ConfigError, match="one model for every task"):
        mk.merging.merge(base, {"a": a, "b": b}, "task_arithmetic").for_task("a")


def test_emr_elects_the_largest_agreeing_magnitude_and_rescales_by_mean_magnitudes():
    base = {"w": torch.zeros(3, dtype=torch.float64)}
    a = {"w": torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)}
    b = {"w": torch.tensor([1.0, -3.0, -2.0], dtype=torch.float64)}
    result = mk.merging.merge(base, {"a": a, "b": b}, "emr")
    # sums 3, -2, -3: signs +, -, -; unified = (2, -3, -2)
    assert result.state_dict["w"].tolist() == [2.0, -3.0, -2.0]
    mods = result.extras["modulators"]
    assert [m.tolist() for m in mods.masks["w"]] == [[True, False, True], [True, True, True]]
    # r_a = mean(2, 1, 1) / mean(2, 0, 2) = (4/3) / (4/3); r_b = (6/3) / (7/3)
    assert mods.scales["a"] == pytest.approx(1.0) and mods.scales["b"] == pytest.approx(6 / 7)
    torch.testing.assert_close(
        result.for_task("b")["w"], 6 / 7 * torch.tensor([2.0, -3.0, -2.0], dtype=torch.float64)
    )


def test_emr_keeps_tied_tensors_tied_and_a_reused_instance_starts_afresh():
    from torch import nn

    def tied(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
        m[1].weight = m[0].weight
        return m

    result = mk.merging.merge(tied(0), {"a": tied(1), "b": tied(2)}, "emr")
    sd = result.for_task("a")
    assert sd["0.weight"] is sd["1.weight"]
    method = mk.merging.EMR()
    base = {"w": torch.zeros(2)}
    bad = {"x": {"w": torch.tensor([1.0, float("nan")])}, "y": {"w": torch.ones(2)}}
    with pytest.raises(mk.errors.NonFiniteLossError):
        mk.merging.merge(base, bad, method)
    good = {"x": {"w": torch.tensor([1.0, -1.0])}, "y": {"w": torch.ones(2)}}
    fresh = mk.merging.merge(base, good, "emr").extras["modulators"].scales
    assert mk.merging.merge(base, good, method).extras["modulators"].scales == fresh


def test_regmean_plusplus_with_named_blocks():
    from collections import OrderedDict

    from torch import nn

    def named(seed):
        torch.manual_seed(seed)
        return nn.Sequential(OrderedDict(fc1=nn.Linear(3, 4), act=nn.Tanh(), fc2=nn.Linear(4, 2))).double()

    models = {"a": named(0), "b": named(1)}
    data = {n: [torch.randn(10, 3, dtype=torch.float64)] for n in models}
    plus = mk.merging.merge(None, models, "regmean_plusplus", data=data).state_dict
    plain = mk.merging.merge(None, models, "regmean", data=data).state_dict
    mean = (models["a"].fc1.weight + models["b"].fc1.weight).detach() / 2
    torch.testing.assert_close(plus["fc1.weight"], plain["fc1.weight"])
    assert not torch.allclose(plus["fc1.weight"], mean)


def test_outputs_never_alias_the_callers_tensors():
    base, experts = vectors(2)
    out = mk.merging.merge(base, experts, "wudi", steps=0).state_dict
    assert out["b"].data_ptr() != base["b"].data_ptr()
    with pytest.raises(ConfigError, match="batchnorm='pretrained' needs"):
        mk.merging.merge(None, experts, "average", batchnorm="pretrained")


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_one_by_one_convolutions_are_merged_as_the_matrices_they_are(method):
    base, experts = vectors(3, shape=(6, 4))
    as_conv = lambda sd: {"w": sd["w"].reshape(6, 4, 1, 1), "b": sd["b"]}  # noqa: E731
    dense = merged_tau(base, experts, method)
    conv = merged_tau(as_conv(base), {k: as_conv(v) for k, v in experts.items()}, method)
    torch.testing.assert_close(conv["w"], dense["w"].reshape(6, 4, 1, 1))
    torch.testing.assert_close(conv["b"], dense["b"])

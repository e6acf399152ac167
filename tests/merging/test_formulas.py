"""Tier-0 formula tests of the data-free merging methods (merging spec §3.3): exact identities on
small models built here, hand-computed TIES examples, DARE's unbiasedness, permutation
invariance, preserved dtypes and integer buffers, and streaming from safetensors equal to the
in-memory merge bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mtlkit as mk
from mtlkit.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    ShapeMismatchError,
    UnknownNameError,
)
from mtlkit.merging.ties import TIES, elect_and_merge, keep_count, keep_threshold


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def family(tasks: int = 3) -> tuple[dict, dict[str, dict]]:
    """A pretrained state dict and fine-tunes of it (small perturbations, one BatchNorm)."""
    base = net(0).state_dict()
    experts = {}
    for t in range(tasks):
        gen = torch.Generator().manual_seed(100 + t)
        sd = {}
        for k, v in base.items():
            if torch.is_floating_point(v):
                sd[k] = v + 0.1 * torch.randn(v.shape, generator=gen)
            else:
                sd[k] = v + t + 1  # num_batches_tracked differs per expert
        experts[f"task{t}"] = sd
    return base, experts


def test_task_arithmetic_with_one_task_and_scale_one_returns_that_model():
    base, experts = family(1)
    out = mk.merging.merge(base, experts, "task_arithmetic", scaling=1.0).state_dict
    for k, v in experts["task0"].items():
        if torch.is_floating_point(v):
            assert torch.equal(out[k], v), k


def test_task_arithmetic_formula_and_weights():
    base, experts = family(3)
    out = mk.merging.merge(base, experts, "task_arithmetic", scaling=0.4, weights=[1.0, 2.0, 0.5]).state_dict
    k = "0.weight"
    tau = sum(w * (experts[f"task{i}"][k].double() - base[k].double()) for i, w in enumerate([1.0, 2.0, 0.5]))
    torch.testing.assert_close(out[k], (base[k].double() + 0.4 * tau).float())


def test_weight_averaging_is_task_arithmetic_with_scale_one_over_t():
    base, experts = family(4)
    avg = mk.merging.merge(None, experts, "average").state_dict
    ta = mk.merging.merge(base, experts, "task_arithmetic", scaling=0.25).state_dict
    for k in avg:
        if torch.is_floating_point(avg[k]):
            torch.testing.assert_close(avg[k], ta[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("trim_scope", ["global", "per_tensor"])
def test_ties_with_one_task_and_everything_kept_returns_that_model(trim_scope):
    base, experts = family(1)
    out = mk.merging.merge(base, experts, "ties", density=1.0, scaling=1.0, trim_scope=trim_scope).state_dict
    for k, v in experts["task0"].items():
        if torch.is_floating_point(v):
            assert torch.equal(out[k], v), k


def test_ties_sign_election_and_disjoint_merges_by_hand():
    taus = [
        torch.tensor([2.0, -1.0, 0.0, 3.0]),
        torch.tensor([-1.0, -2.0, 4.0, -1.0]),
        torch.tensor([0.0, 1.0, 1.0, -1.0]),
    ]
    w = [1.0, 1.0, 1.0]
    # mass: sums 1, -2, 5, 1 -> signs +, -, +, +
    torch.testing.assert_close(
        elect_and_merge(taus, w, "mass", "disjoint_mean"), torch.tensor([2.0, -1.5, 2.5, 3.0])
    )
    torch.testing.assert_close(
        elect_and_merge(taus, w, "mass", "disjoint_sum"), torch.tensor([2.0, -3.0, 5.0, 3.0])
    )
    torch.testing.assert_close(elect_and_merge(taus, w, "mass", "max"), torch.tensor([2.0, -2.0, 4.0, 3.0]))
    # count: votes +1-1+0=0 -> +, -1-1+1=-1 -> -, 0+1+1 -> +, +1-1-1=-1 -> -
    torch.testing.assert_close(
        elect_and_merge(taus, w, "count", "disjoint_mean"), torch.tensor([2.0, -1.5, 2.5, -1.0])
    )


def test_ties_trims_the_top_density_globally_or_per_tensor():
    assert keep_threshold(torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0]), 0.4) == 4.0
    assert keep_threshold(torch.tensor([1.0, 2.0]), 1.0) == float("-inf")
    # 0.3 of 5 entries: ceil keeps 2, mergekit's floor 1, the TIES code's kthvalue int + 1 = 2;
    # 0.4 of 5 (a whole 2): ceil 2, floor 2, the TIES code 3
    values = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0])
    assert [keep_count(5, 0.3, r) for r in ("ceil", "floor", "ties_code")] == [2, 1, 2]
    assert [keep_threshold(values, 0.4, r) for r in ("ceil", "floor", "ties_code")] == [4.0, 4.0, 3.0]
    assert keep_count(5, 1.0, "ties_code") == 5 and keep_count(5, 0.01, "floor") == 1
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    expert = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    glob = mk.merging.merge(base, {"e": expert}, "ties", density=0.25, trim_scope="global").state_dict
    # 25% of the model's 8 entries: the two largest, both in "b"
    assert glob["a"].tolist() == [0, 0, 0, 0] and glob["b"].tolist() == [0, 0, 30, 40]
    per = mk.merging.merge(base, {"e": expert}, "ties", density=0.25, trim_scope="per_tensor").state_dict
    assert per["a"].tolist() == [0, 0, 0, 4] and per["b"].tolist() == [0, 0, 0, 40]


def test_dare_is_unbiased_and_keeps_the_expected_fraction():
    base = {"w": torch.zeros(20_000)}
    tau = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    means = []
    for seed in range(40):
        out = mk.merging.merge(
            base, {"e": {"w": tau}}, "dare", drop_rate=0.7, scaling=1.0, seed=seed
        ).state_dict["w"]
        kept = (out != 0).double().mean()
        assert abs(float(kept) - 0.3) < 0.02
        torch.testing.assert_close(out[out != 0], (tau / 0.3)[out != 0])
        means.append(out.double())
    average = torch.stack(means).mean(0)
    assert float((average - tau).abs().mean()) < 0.25 * float(tau.abs().mean())
    assert abs(float(average.sum() - tau.sum())) < 0.02 * float(tau.abs().sum())


def test_dare_l1_rescale_restores_each_tensors_l1_norm():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = mk.merging.merge(
        {"w": torch.zeros(1000)}, {"e": {"w": tau}}, "dare", drop_rate=0.5, scaling=1.0, rescale="l1"
    ).state_dict["w"]
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("average", {}),
        ("task_arithmetic", {}),
        ("ties", {}),
        ("ties", {"trim_scope": "per_tensor", "sign_rule": "count", "aggregate": "max"}),
        ("dare", {"combine": "ties"}),
        ("breadcrumbs", {}),
        ("metagpt", {}),
        ("metagpt", {"norms": "tensor"}),
        ("tsv", {}),
        ("iso_c", {}),
        ("iso_cts", {}),
        ("model_stock", {}),
        ("emr", {}),
        ("wudi", {"steps": 20, "lr": 1e-3}),
    ],
)
def test_merges_are_invariant_to_the_order_of_the_experts(method, options):
    base, experts = family(3)
    ref = mk.merging.merge(base, experts, method, **options).state_dict
    if method == "dare":  # DARE's masks follow the expert's position: a permutation reseeds them
        options = {**options, "drop_rate": 0.0}
        ref = mk.merging.merge(base, experts, method, **options).state_dict
    for order in itertools.permutations(experts):
        out = mk.merging.merge(base, {k: experts[k] for k in order}, method, **options).state_dict
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=0)


def test_integer_buffers_are_copied_and_dtypes_kept():
    base, experts = family(2)
    base = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in base.items()}
    experts = {
        n: {k: (v.half() if torch.is_floating_point(v) else v) for k, v in sd.items()}
        for n, sd in experts.items()
    }
    out = mk.merging.merge(base, experts, "task_arithmetic").state_dict
    assert out["1.num_batches_tracked"] == base["1.num_batches_tracked"]
    assert all(out[k].dtype == base[k].dtype for k in base)
    result = mk.merging.merge(base, experts, "task_arithmetic", batchnorm="pretrained")
    assert torch.equal(result.state_dict["1.running_mean"], base["1.running_mean"])
    assert any("BatchNorm" in n for n in result.notes)


def test_tied_weights_are_merged_once_and_stay_tied():
    def tied(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
        m[1].weight = m[0].weight
        return m

    out = mk.merging.merge(tied(0), {"a": tied(1), "b": tied(2)}, "task_arithmetic").state_dict
    assert out["0.weight"] is out["1.weight"]
    model = tied(3)
    mk.merging.MergeResult(out, "ta", {}, [], True).load_into(model)
    assert model[0].weight.data_ptr() == model[1].weight.data_ptr()


DATA_FREE = [m for m in mk.merging.available() if not mk.merging.MERGERS.get(m).requires]


@pytest.mark.parametrize("method", DATA_FREE)
def test_streaming_from_safetensors_equals_the_in_memory_merge_bit_for_bit(tmp_path, method):
    base, experts = family(2 if method == "slerp" else 3)

    def plain(sd):  # safetensors stores no aliases; BatchNorm's counter is an int64 tensor
        return {k: v.contiguous() for k, v in sd.items()}

    save_file(plain(base), str(tmp_path / "base.safetensors"))
    files = {}
    for i, (name, sd) in enumerate(experts.items()):
        if i == 0:  # one expert as a sharded folder with an index, as the hub writes them
            folder = tmp_path / name
            folder.mkdir()
            keys = list(sd)
            half = len(keys) // 2
            shards = {
                "model-00001-of-00002.safetensors": keys[:half],
                "model-00002-of-00002.safetensors": keys[half:],
            }
            weight_map = {}
            for shard, ks in shards.items():
                save_file(plain({k: sd[k] for k in ks}), str(folder / shard))
                weight_map.update(dict.fromkeys(ks, shard))
            import json

            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
            files[name] = folder
        else:
            save_file(plain(sd), str(tmp_path / f"{name}.safetensors"))
            files[name] = tmp_path / f"{name}.safetensors"
    memory = mk.merging.merge(base, experts, method).state_dict
    streamed = mk.merging.merge(tmp_path / "base.safetensors", files, method).state_dict
    assert memory.keys() == streamed.keys()
    for k in memory:
        assert torch.equal(memory[k], streamed[k]), k


def test_bad_inputs_are_named_and_nothing_is_returned(tmp_path):
    base, experts = family(2)
    wrong = dict(experts)
    wrong["task1"] = {**experts["task1"], "0.weight": torch.zeros(3, 3)}
    with pytest.raises(ShapeMismatchError, match=r"0\.weight.*expert 'task1'"):
        mk.merging.merge(base, wrong, "task_arithmetic")
    missing = {"task0": {k: v for k, v in experts["task0"].items() if k != "3.bias"}}
    with pytest.raises(ShapeMismatchError, match=r"missing tensors \['3\.bias'\]"):
        mk.merging.merge(base, missing, "task_arithmetic")
    nan = {"task0": {**experts["task0"], "3.bias": torch.full((3,), float("nan"))}}
    with pytest.raises(NonFiniteLossError, match=r"3\.bias.*task0"):
        mk.merging.merge(base, nan, "ties")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        mk.merging.merge(base, {"x": tmp_path / "bad.safetensors"}, "task_arithmetic")
    with pytest.raises(CheckpointError, match="no such file"):
        mk.merging.merge(base, {"x": tmp_path / "absent.safetensors"}, "task_arithmetic")
    with pytest.raises(UnknownNameError, match="Did you mean 'ties'"):
        mk.merging.merge(base, experts, "tiez")
    with pytest.raises(UnknownNameError, match="trim_scope"):
        mk.merging.merge(base, experts, "ties", trim_scope="layer")
    with pytest.raises(ConfigError, match="pretrained"):
        mk.merging.merge(None, experts, "task_arithmetic")
    with pytest.raises(ConfigError, match="density"):
        TIES(density=0.0)
    with pytest.raises(ConfigError, match="2 weights for 3"):
        mk.merging.merge(base, family(3)[1], "task_arithmetic", weights=[1.0, 2.0])


def test_batchnorm_recalibration_recomputes_the_statistics():
    model = net(5).eval()
    batches = [torch.randn(64, 5) * 3 + 1 for _ in range(4)]
    mk.merging.recalibrate_batchnorm(model, batches)
    hidden = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0).detach(), atol=1e-5, rtol=0)
    assert not model.training and model[1].momentum == 0.1


@pytest.mark.parametrize("method", DATA_FREE)
def test_merging_never_modifies_the_callers_tensors(method):
    base, experts = family(2 if method == "slerp" else 3)
    base = {k: v.double() if torch.is_floating_point(v) else v for k, v in base.items()}
    experts = {
        n: {k: v.double() if torch.is_floating_point(v) else v for k, v in sd.items()}
        for n, sd in experts.items()
    }
    before = {n: {k: v.clone() for k, v in sd.items()} for n, sd in experts.items()}
    base_before = {k: v.clone() for k, v in base.items()}
    mk.merging.merge(base, experts, method)
    for n, sd in experts.items():
        for k, v in sd.items():
            assert torch.equal(v, before[n][k]), (n, k)
    for k, v in base.items():
        assert torch.equal(v, base_before[k]), k


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_method_keeps_dtypes_and_copies_integer_tensors(method):
    base, experts = family(2 if method == "slerp" else 3)
    base = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in base.items()}
    experts = {
        n: {k: (v.half() if torch.is_floating_point(v) else v) for k, v in sd.items()}
        for n, sd in experts.items()
    }
    out = mk.merging.merge(base, experts, method).state_dict
    assert all(out[k].dtype == base[k].dtype for k in base)
    assert out["1.num_batches_tracked"] == base["1.num_batches_tracked"]  # copied from the pretrained model


@pytest.mark.parametrize("method", DATA_FREE)
def test_float32_precision_agrees_with_float64_to_rounding(method):
    base, experts = family(2 if method == "slerp" else 3)
    exact = mk.merging.merge(base, experts, method).state_dict
    fast = mk.merging.merge(base, experts, method, precision="float32").state_dict
    for k, v in exact.items():
        assert fast[k].dtype == v.dtype
        if torch.is_floating_point(v):
            # one rounding of the inputs can move a value across a trim threshold (TIES, DELLA
            # ranks): compare in bulk, not entry by entry
            close = torch.isclose(fast[k], v, atol=1e-5, rtol=1e-4)
            assert float(close.float().mean()) > 0.99, (method, k)


def test_unknown_precision_is_refused():
    base, experts = family(2)
    with pytest.raises(ConfigError, match="precision"):
        mk.merging.merge(base, experts, "task_arithmetic", precision="float16")


def test_the_finiteness_check_is_exact():
    from mtlkit.merging.merge import all_finite

    big = torch.full((4,), 3e38)  # finite, but its float32 sum overflows
    assert all_finite(big) and all_finite(torch.arange(3)) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5, dtype=torch.float64)
        t[2] = bad
        assert not all_finite(t)
    mixed = torch.tensor([float("inf"), -float("inf"), 1.0])  # sums to NaN
    assert not all_finite(mixed)

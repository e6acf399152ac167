"""Corrupted task vectors (R-MTLLMF's setting: task vectors received over a noisy channel, or one
adversarial contributor) and the robust merge to compare with plain Task Arithmetic.

Djuhera, Andrei, Pourghasemian, Gacanin, Boche, Saad, "Resilient Multi-Task Large Language Model
Fusion at the Wireless Edge", arXiv 2411.18220, 2025. The corruptions are written from the paper's
setting; the paper's own defence (freezing sensitive parameters, few-shot realignment) is
reconstructed here as few-shot *coefficient* realignment: AdaMerging's supervised objective on a
handful of labelled examples (``merge(..., "adamerging", objective="labels", data=few_shot)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import Loader, Merger, register, task_vector
from mtlkit.merging.sources import open_source
from mtlkit.methods.coordinate_median import coordinate_median
from mtlkit.methods.krum import krum_weights
from mtlkit.methods.trimmed_mean import trimmed_mean

StateDict = dict[str, Tensor]
#: what one adversarial contributor sends instead of its task vector
ADVERSARIES = ("sign_flip", "cancel", "noise")
#: how the robust merge aggregates the task vectors
AGGREGATES = ("median", "trimmed_mean", "norm_clip", "krum")


def _states(pretrained: Any, experts: Mapping[str, Any]) -> tuple[StateDict, dict[str, StateDict]]:
    base = open_source(pretrained, "the pretrained model")
    loaded = {n: open_source(e, f"expert {n!r}") for n, e in experts.items()}
    return {k: base.load(k) for k in base}, {n: {k: s.load(k) for k in s} for n, s in loaded.items()}


def gaussian_corruption(
    pretrained: Any,
    experts: Mapping[str, Any],
    snr_db: float,
    seed: int = 0,
    which: Sequence[str] | None = None,
) -> dict[str, StateDict]:
    """The experts with Gaussian noise added to their task vectors at a signal-to-noise ratio of
    ``snr_db`` decibels per tensor (noise variance ``mean(tau^2) / 10^(snr/10)``), for the experts in
    ``which`` (default all); integer tensors are left as they are. Seeded."""
    base, states = _states(pretrained, experts)
    chosen = set(experts if which is None else which)
    unknown = chosen - set(experts)
    if unknown:
        raise ConfigError(f"gaussian_corruption: no experts {sorted(unknown)}.")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, state in states.items():
        noisy = {}
        for k, v in state.items():
            if name not in chosen or not torch.is_floating_point(v):
                noisy[k] = v.clone()
                continue
            tau = task_vector(v, base[k])
            power = float(tau.pow(2).mean()) / 10 ** (snr_db / 10)
            noise = torch.randn(tau.shape, generator=generator, dtype=tau.dtype) * power**0.5
            noisy[k] = (base[k].to(tau.dtype) + tau + noise).to(v.dtype)
        out[name] = noisy
    return out


def adversarial_contributor(
    pretrained: Any,
    experts: Mapping[str, Any],
    name: str,
    kind: str = "sign_flip",
    scale: float = 1.0,
    seed: int = 0,
) -> dict[str, StateDict]:
    """The experts with ``name`` replaced by an adversary sending, instead of its task vector,
    ``-scale tau_name`` (``sign_flip``), ``-scale sum_{t != name} tau_t`` (``cancel``: erases the
    others from a sum) or Gaussian noise of ``scale`` times its task vector's norm (``noise``)."""
    if kind not in ADVERSARIES:
        raise unknown_name("kind", kind, ADVERSARIES)
    if name not in experts:
        raise ConfigError(f"adversarial_contributor: no expert {name!r}.")
    base, states = _states(pretrained, experts)
    generator = torch.Generator().manual_seed(seed)
    sent = {}
    for k, b in base.items():
        if not torch.is_floating_point(b):
            sent[k] = states[name][k].clone()
            continue
        own = task_vector(states[name][k], b)
        if kind == "sign_flip":
            tau = -scale * own
        elif kind == "cancel":
            tau = -scale * sum(
                (task_vector(s[k], b) for n, s in states.items() if n != name), torch.zeros_like(own)
            )
        else:
            noise = torch.randn(own.shape, generator=generator, dtype=own.dtype)
            tau = noise * scale * own.norm() / noise.norm().clamp_min(1e-300)
        sent[k] = (b.to(tau.dtype) + tau).to(b.dtype)
    return {**states, name: sent}


@register("robust_ta")
class RobustTaskArithmetic(Merger):
    """Task Arithmetic with a robust aggregate of the task vectors:
    ``theta_0 + scaling * T * aggregate(tau_1, ..., tau_T)`` (the plain mean gives Task Arithmetic
    exactly, so the scales compare). The aggregates are the methods layer's Byzantine-robust rules
    applied to task vectors: ``median`` (coordinate-wise), ``trimmed_mean`` (``trim`` per side,
    coordinate-wise), ``norm_clip`` (each task vector scaled down to the median of their whole-model
    norms, then the mean) and ``krum`` (Multi-Krum over whole task vectors: the mean of the
    ``T - byzantine`` vectors closest to their neighbours, ``byzantine`` assumed bad). ``norm_clip``
    and ``krum`` first pass over the model for the norms and distances.
    """

    def __init__(
        self, aggregate: str = "median", scaling: float = 0.3, trim: int = 1, byzantine: int = 1
    ) -> None:
        if aggregate not in AGGREGATES:
            raise unknown_name("aggregate", aggregate, AGGREGATES)
        if trim < 0 or byzantine < 0:
            raise ConfigError(f"robust_ta: trim and byzantine must be >= 0, got {trim}, {byzantine}.")
        self.aggregate, self.scaling, self.trim, self.byzantine = (
            aggregate,
            float(scaling),
            int(trim),
            int(byzantine),
        )
        self._factors: Tensor | None = None

    @property
    def granularity(self) -> str:
        return "model" if self.aggregate in ("norm_clip", "krum") else "tensor"

    def begin(self) -> None:
        self._factors = None

    def prepare(self, names: Sequence[str], pretrained: Loader | None, experts: Sequence[Loader]) -> None:
        assert pretrained is not None
        count = len(experts)
        gram = torch.zeros(count, count, dtype=torch.float64)
        for n in names:
            if not torch.is_floating_point(pretrained(n)):
                continue
            taus = torch.stack([task_vector(e(n), pretrained(n)).reshape(-1) for e in experts])
            gram += taus @ taus.T
        if self.aggregate == "norm_clip":
            norms = gram.diagonal().sqrt()
            cap = norms.median()
            self._factors = (
                torch.where(norms > cap, cap / norms.clamp_min(1e-300), torch.ones_like(norms)) / count
            )
        else:
            if count - self.byzantine - 2 <= 0 and self.byzantine > 0:
                raise ConfigError(
                    f"robust_ta(krum) with {count} experts tolerates no byzantine={self.byzantine}."
                )
            self._factors = krum_weights(gram, self.byzantine, count - self.byzantine)

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        assert pretrained is not None
        taus = torch.stack([e - pretrained for e in experts]).reshape(len(experts), -1)
        count = len(experts)
        if self.aggregate == "median":
            combined = coordinate_median(taus)
        elif self.aggregate == "trimmed_mean":
            combined = trimmed_mean(taus, self.trim)
        else:
            if self._factors is None:
                raise ConfigError(
                    f"robust_ta({self.aggregate}) merges through mk.merging.merge (it needs a pass over the model)."
                )
            combined = torch.tensordot(self._factors.to(taus.dtype), taus, dims=1)
        return pretrained + self.scaling * count * combined.reshape(pretrained.shape)

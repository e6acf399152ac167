"""Fisher merging: per-coordinate averages weighted by each expert's diagonal Fisher information."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging.base import COMPUTE_DTYPE, Merger, check_weights, register

FISHERS = ("expected", "empirical", "sampled")


def fisher_combine(
    tensors: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float], floor: float
) -> Tensor:
    """``sum_t w_t (F_t + floor) theta_t / sum_t w_t (F_t + floor)``."""
    num = torch.stack([w * (f + floor) * t for w, f, t in zip(weights, fishers, tensors, strict=True)]).sum(0)
    den = torch.stack([w * (f + floor) for w, f in zip(weights, fishers, strict=True)]).sum(0)
    return num / den


@register("fisher")
class FisherMerging(Merger):
    """Fisher merging (Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS
    2022): ``theta_m[j] = sum_t w_t F_t[j] theta_t[j] / sum_t w_t F_t[j]`` with each expert's
    diagonal Fisher ``F_t`` estimated on its task's inputs, from per-example gradients of the
    log-likelihood of the expert's own softmax classifier:

    - ``"expected"``: ``mean_x sum_y p(y|x) (d log p(y|x))^2`` (the definition; one gradient per
      example and class);
    - ``"empirical"``: the gradient at the true label (batches must be ``(inputs, labels)``);
    - ``"sampled"``: at a label drawn from ``p(y|x)`` (seeded).

    Gradients are per example (``torch.func.vmap``), not of a batch-summed surrogate as in
    FusionBench's code (which mixes cross-example terms). ``floor`` is added to every Fisher
    (FusionBench's ``minimal_fisher_weight`` 1e-6); ``normalize=True`` divides each expert's
    Fisher by its global L2 norm first (FusionBench's default; the paper does not). Tensors with
    no Fisher (buffers, parameters the output does not reach) take the plain mean. The pretrained
    model is not used.

    Args:
        fisher: ``"expected"``, ``"empirical"`` or ``"sampled"``.
        max_examples: examples per expert (FusionBench: 256).
        chunk: examples per vmapped gradient call (memory: chunk x classes x parameters).
        output: the key of the model's output dict to read (default: the expert's name when the
            model returns a dict, the tensor itself otherwise).
    """

    requires = frozenset({"fisher"})
    uses_pretrained = False

    def __init__(
        self,
        fisher: str = "expected",
        max_examples: int = 256,
        floor: float = 1e-6,
        normalize: bool = False,
        weights: Sequence[float] | None = None,
        chunk: int = 32,
        output: str | None = None,
        seed: int = 0,
    ) -> None:
        if fisher not in FISHERS:
            raise unknown_name("fisher", fisher, FISHERS)
        if max_examples < 1 or chunk < 1 or not floor >= 0:
            raise ConfigError("fisher: max_examples and chunk must be >= 1 and floor >= 0.")
        self.fisher, self.max_examples, self.floor, self.normalize = (
            fisher,
            int(max_examples),
            float(floor),
            bool(normalize),
        )
        self.weights = None if weights is None else [float(w) for w in weights]
        self.chunk, self.output, self.seed = int(chunk), output, int(seed)
        self._fishers: dict[str, list[Tensor | None]] = {}

    def begin(self) -> None:
        self._fishers = {}

    def params(self) -> dict[str, Any]:
        keys = ("fisher", "max_examples", "floor", "normalize", "weights", "chunk", "output", "seed")
        return {k: getattr(self, k) for k in keys}

    def _logits(self, out: Any, name: str) -> Tensor:
        if isinstance(out, Mapping):
            key = self.output or name
            if key not in out:
                if len(out) == 1:
                    return next(iter(out.values()))
                raise ConfigError(f"fisher: the model returns {sorted(out)}; pass output= to choose one.")
            return out[key]
        if not isinstance(out, Tensor):
            raise ConfigError(f"fisher: the model must return logits, got {type(out).__name__}.")
        return out

    def collect(self, index: int, name: str, module: nn.Module, batches: Iterable[Any]) -> None:
        params = {k: p.detach().to(COMPUTE_DTYPE) for k, p in module.named_parameters() if p.requires_grad}
        buffers = {
            k: b.detach().to(COMPUTE_DTYPE) if torch.is_floating_point(b) else b
            for k, b in module.named_buffers()
        }
        model = _double_copy(module)

        def log_probs(p: dict[str, Tensor], x: Tensor) -> Tensor:
            out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            logits = self._logits(out, name)
            return F.log_softmax(logits.reshape(1, -1), dim=-1).squeeze(0)

        totals = {k: torch.zeros_like(v) for k, v in params.items()}
        seen = 0
        gen = torch.Generator().manual_seed(self.seed + index)
        for batch in batches:
            if seen >= self.max_examples:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
            if self.fisher == "empirical" and labels is None:
                raise ConfigError("fisher='empirical' needs (inputs, labels) batches.")
            x = x[: self.max_examples - seen].to(COMPUTE_DTYPE)
            for start in range(0, x.shape[0], self.chunk):
                xs = x[start : start + self.chunk]
                if self.fisher == "expected":
                    probs = vmap(log_probs, in_dims=(None, 0))(params, xs).exp()  # (b, C)
                    jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, xs)  # (b, C, ...)
                    for k, g in jac.items():
                        weight = probs.reshape(*probs.shape, *([1] * (g.dim() - 2)))
                        totals[k] += (weight * g.pow(2)).sum((0, 1))
                    continue
                if self.fisher == "empirical":
                    assert labels is not None
                    ys = labels[start : start + self.chunk].reshape(-1).long()
                else:
                    with torch.no_grad():
                        probs = vmap(log_probs, in_dims=(None, 0))(params, xs).exp()
                    ys = torch.multinomial(probs, 1, generator=gen).squeeze(1)

                def picked(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
                    return log_probs(p, xi).gather(0, yi.reshape(1)).squeeze(0)

                grads = vmap(grad(picked), in_dims=(None, 0, 0))(params, xs, ys)
                for k, g in grads.items():
                    totals[k] += g.pow(2).sum(0)
            seen += x.shape[0]
        if seen == 0:
            raise ConfigError(f"fisher: no examples for expert {name!r}.")
        fishers = {k: v / seen for k, v in totals.items()}
        if self.normalize:
            norm = torch.sqrt(sum(f.pow(2).sum() for f in fishers.values()))  # type: ignore[arg-type]
            if float(norm) > 0:
                fishers = {k: f / norm for k, f in fishers.items()}
        for k, f in fishers.items():
            slots = self._fishers.setdefault(k, [])
            slots.extend([None] * (index + 1 - len(slots)))
            slots[index] = f

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        w = check_weights(self.weights, len(experts), "fisher")
        fishers = self._fishers.get(name)
        if fishers is None or len(fishers) < len(experts) or any(f is None for f in fishers):
            return torch.stack(list(experts)).mean(0)
        return fisher_combine(experts, [f for f in fishers if f is not None], w, self.floor)

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        self._fishers = {}
        return {}


def _double_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` (the parameters are passed in by ``functional_call``)."""
    import copy

    return copy.deepcopy(module).to(COMPUTE_DTYPE)

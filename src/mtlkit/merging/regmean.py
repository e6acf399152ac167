"""RegMean: the least-squares merge of each linear layer from its inputs' Gram matrices."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.merging.base import COMPUTE_DTYPE, Merger, check_fraction, register


@register("regmean")
class RegMean(Merger):
    """RegMean (Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of
    Language Models", ICLR 2023).

    For every ``nn.Linear`` layer, each expert is run on its task's inputs and the Gram matrix of
    the layer's inputs ``G_t = X_t^T X_t / N`` is accumulated (float64; every leading dimension
    of the input counts as rows). Off-diagonal entries are shrunk,
    ``G~ = alpha G + (1 - alpha) diag(G)``, and the merged weight is the minimiser of
    ``sum_t ||X_t W - X_t W_t||^2``: ``W_m^T = (sum_t G~_t)^{-1} sum_t G~_t W_t^T``, solved by
    Cholesky with a relative ridge ``ridge * mean(diag)`` instead of an explicit inverse. Every
    other tensor (biases, norms, embeddings) is the plain mean. The pretrained model is not used.

    Defaults: ``alpha = 0.95`` (FusionBench's ``reduce_non_diagonal_ratio``; the paper tunes it),
    ``ridge = 1e-8``; ``max_batches`` limits the data read per expert (None: all; FusionBench
    uses 256 examples).
    """

    requires = frozenset({"activations"})
    uses_pretrained = False

    def __init__(self, alpha: float = 0.95, ridge: float = 1e-8, max_batches: int | None = None) -> None:
        self.alpha = check_fraction(alpha, "alpha", "regmean")
        if not ridge >= 0:
            raise ConfigError(f"regmean: ridge must be >= 0, got {ridge}.")
        self.ridge = float(ridge)
        self.max_batches = max_batches
        self._grams: dict[str, list[Tensor | None]] = {}
        self._count = 0

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ridge": self.ridge, "max_batches": self.max_batches}

    def collect(self, index: int, name: str, module: nn.Module, batches: Iterable[Any]) -> None:
        sums: dict[str, Tensor] = {}
        rows: dict[str, int] = {}
        hooks = []

        def record(layer_name: str) -> Any:
            def hook(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
                x = inputs[0].detach().to(COMPUTE_DTYPE).reshape(-1, inputs[0].shape[-1])
                gram = x.T @ x
                prev = sums.get(layer_name)
                sums[layer_name] = gram if prev is None else prev + gram
                rows[layer_name] = rows.get(layer_name, 0) + x.shape[0]

            return hook

        for layer_name, layer in module.named_modules():
            if isinstance(layer, nn.Linear):
                hooks.append(
                    layer.register_forward_hook(record(f"{layer_name}.weight" if layer_name else "weight"))
                )
        seen = 0
        try:
            with torch.no_grad():
                for batch in batches:
                    if self.max_batches is not None and seen >= self.max_batches:
                        break
                    module(batch[0] if isinstance(batch, (tuple, list)) else batch)
                    seen += 1
        finally:
            for h in hooks:
                h.remove()
        if seen == 0:
            raise ConfigError(f"regmean: no batches for expert {name!r}.")
        self._count = max(self._count, index + 1)
        for key, total in sums.items():
            self._grams.setdefault(key, [])
            slots = self._grams[key]
            slots.extend([None] * (index + 1 - len(slots)))
            slots[index] = total / rows[key]

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        grams = self._grams.get(name)
        if (
            grams is None
            or len(grams) < len(experts)
            or any(g is None for g in grams)
            or experts[0].dim() != 2
        ):
            return torch.stack(list(experts)).mean(0)
        shrunk = []
        for g in grams:
            assert g is not None
            shrunk.append(self.alpha * g + (1 - self.alpha) * torch.diag(torch.diagonal(g)))
        total = torch.stack(shrunk).sum(0)
        rhs = torch.stack([g @ w.T for g, w in zip(shrunk, experts, strict=True)]).sum(0)
        scale = float(torch.diagonal(total).mean()) if total.numel() else 0.0
        system = total + self.ridge * max(scale, 1e-300) * torch.eye(total.shape[0], dtype=total.dtype)
        try:
            factor = torch.linalg.cholesky(system)
            solution = torch.cholesky_solve(rhs, factor)
        except torch.linalg.LinAlgError:  # singular even with the ridge: least squares
            solution = torch.linalg.lstsq(system, rhs).solution
        return solution.T

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        self._grams, self._count = {}, 0
        return {}

"""RegMean and RegMean++: the least-squares merge of each linear layer from its inputs' Gram
matrices."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.merging.base import COMPUTE_DTYPE, Merger, check_fraction, register


def regmean_solve(grams: Sequence[Tensor], weights: Sequence[Tensor], alpha: float, ridge: float) -> Tensor:
    """``W_m^T = (sum_t G~_t)^{-1} sum_t G~_t W_t^T`` with ``G~ = alpha G + (1 - alpha) diag(G)``,
    by Cholesky with the relative ridge ``ridge * mean(diag)`` (least squares if still singular)."""
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    total = torch.stack(shrunk).sum(0)
    rhs = torch.stack([g @ w.T for g, w in zip(shrunk, weights, strict=True)]).sum(0)
    scale = float(torch.diagonal(total).mean()) if total.numel() else 0.0
    system = total + ridge * max(scale, 1e-300) * torch.eye(total.shape[0], dtype=total.dtype)
    try:
        solution = torch.cholesky_solve(rhs, torch.linalg.cholesky(system))
    except torch.linalg.LinAlgError:  # singular even with the ridge
        solution = torch.linalg.lstsq(system, rhs).solution
    return solution.T


def linear_grams(module: nn.Module, inputs: Iterable[Tensor]) -> dict[str, Tensor]:
    """``X^T X / N`` of the input of every ``nn.Linear`` in ``module`` over ``inputs`` (float64;
    every leading dimension counts as rows), keyed by the weight's name in ``module``."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def record(key: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
            x = args[0].detach().to(COMPUTE_DTYPE).reshape(-1, args[0].shape[-1])
            prev = sums.get(key)
            sums[key] = x.T @ x if prev is None else prev + x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]

        return hook

    for layer_name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            hooks.append(
                layer.register_forward_hook(record(f"{layer_name}.weight" if layer_name else "weight"))
            )
    try:
        with torch.no_grad():
            for x in inputs:
                module(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / rows[k] for k, v in sums.items()}


def first_inputs(batches: Iterable[Any], limit: int | None) -> list[Tensor]:
    """The input tensors of the first ``limit`` batches (all with ``None``)."""
    out: list[Tensor] = []
    for batch in batches:
        if limit is not None and len(out) >= limit:
            break
        out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return out


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
        self.alpha = check_fraction(alpha, "alpha", type(self).__name__)
        if not ridge >= 0:
            raise ConfigError(f"{type(self).__name__}: ridge must be >= 0, got {ridge}.")
        self.ridge = float(ridge)
        self.max_batches = max_batches
        self._grams: dict[str, list[Tensor | None]] = {}

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ridge": self.ridge, "max_batches": self.max_batches}

    def begin(self) -> None:
        self._grams = {}

    def collect(self, index: int, name: str, module: nn.Module, batches: Iterable[Any]) -> None:
        inputs = first_inputs(batches, self.max_batches)
        if not inputs:
            raise ConfigError(f"regmean: no batches for expert {name!r}.")
        grams = linear_grams(module, inputs)
        if not grams:
            # without a linear layer RegMean would silently be weight averaging
            raise ConfigError(
                f"{type(self).__name__}: expert {name!r} has no nn.Linear layer to solve for (it would "
                "reduce to weight averaging; use method='average' if that is what you want)."
            )
        for key, gram in grams.items():
            slots = self._grams.setdefault(key, [])
            slots.extend([None] * (index + 1 - len(slots)))
            slots[index] = gram

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        grams = self._grams.get(name)
        if grams is None or len(grams) < len(experts) or experts[0].dim() != 2:
            return torch.stack(list(experts)).mean(0)
        present = [g for g in grams if g is not None]
        if len(present) != len(experts):
            return torch.stack(list(experts)).mean(0)
        return regmean_solve(present, experts, self.alpha, self.ridge)

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        self._grams = {}
        return {}


@register("regmean_plusplus")
class RegMeanPlusPlus(RegMean):
    """RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of
    Regression Mean for Model Merging", 2025): RegMean block by block, where each block's Gram
    matrices are taken on the inputs the *merged* model so far gives that block (each expert's
    block run on the merged model's activations of its task), so merging a layer accounts for the
    layers merged before it.

    As FusionBench's implementation: blocks are merged in order; a block's ``nn.Linear`` weights
    by RegMean, its other tensors by the mean; the merged block then produces the next block's
    inputs. Here the blocks are the top-level children of an ``nn.Sequential`` model (FusionBench
    asks each model family for its list of layers); other models are refused. Options as
    :class:`RegMean`.
    """

    def __init__(self, alpha: float = 0.95, ridge: float = 1e-8, max_batches: int | None = None) -> None:
        super().__init__(alpha, ridge, max_batches)
        self._merged: dict[str, Tensor] = {}

    def begin(self) -> None:
        super().begin()
        self._merged = {}

    def collect_all(
        self, names: Sequence[str], modules: Sequence[nn.Module], data: Sequence[Iterable[Any]]
    ) -> None:
        if not all(isinstance(m, nn.Sequential) for m in modules):
            raise ConfigError(
                "regmean_plusplus merges block by block: the experts must be nn.Sequential models."
            )
        inputs = [[x.to(COMPUTE_DTYPE) for x in first_inputs(d, self.max_batches)] for d in data]
        if any(not xs for xs in inputs):
            raise ConfigError("regmean_plusplus: an expert has no batches.")
        if not any(isinstance(m, nn.Linear) for m in modules[0].modules()):
            raise ConfigError(
                "regmean_plusplus: the experts have no nn.Linear layer to solve for (it would reduce "
                "to weight averaging)."
            )
        experts = [copy.deepcopy(m).to(COMPUTE_DTYPE).eval() for m in modules]
        blocks = [list(m.children()) for m in experts]
        merged = copy.deepcopy(experts[0])
        for b, (child, block) in enumerate(merged.named_children()):
            grams = [linear_grams(blocks[t][b], inputs[t]) for t in range(len(experts))]
            new_state = {}
            for key in block.state_dict():
                values = [blocks[t][b].state_dict()[key] for t in range(len(experts))]
                if key in grams[0] and values[0].dim() == 2:
                    new_state[key] = regmean_solve([g[key] for g in grams], values, self.alpha, self.ridge)
                elif torch.is_floating_point(values[0]):
                    new_state[key] = torch.stack(values).mean(0)
                else:
                    new_state[key] = values[0]
            block.load_state_dict(new_state)
            self._merged.update({f"{child}.{k}": v for k, v in new_state.items()})
            with torch.no_grad():
                inputs = [[block(x) for x in xs] for xs in inputs]

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        if name in self._merged:
            return self._merged[name].to(COMPUTE_DTYPE)
        return torch.stack(list(experts)).mean(0)

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        self._merged = {}
        return super().finish(experts)

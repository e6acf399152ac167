"""The merging-method contract: what a method needs, at which granularity it works, and the
per-tensor (or whole-model) computation it implements."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlkit.core.registry import Registry
from mtlkit.errors import ConfigError

MERGERS: Registry[Merger] = Registry("merging method")
register = MERGERS.register

#: what a method may need beyond the weights
REQUIREMENTS = ("activations", "fisher", "unlabeled_batches")
#: the dtype every merge computes in (float32 inputs then give exact identities, e.g. theta_0 + tau)
COMPUTE_DTYPE = torch.float64

#: ``load(name) -> tensor`` of one model, for methods that look at the whole model first
Loader = Callable[[str], Tensor]


def task_vector(expert: Tensor, pretrained: Tensor) -> Tensor:
    """``theta_t - theta_0`` in :data:`COMPUTE_DTYPE` (the model-level passes of TIES and MetaGPT)."""
    return expert.to(COMPUTE_DTYPE) - pretrained.to(COMPUTE_DTYPE)


class Merger:
    """Base class of merging methods.

    A subclass sets ``requires`` (data beyond the weights; none for data-free methods),
    ``granularity`` (``"tensor"``: each tensor is merged from the same tensor of every model, so
    the merge streams one tensor at a time; ``"model"``: a first pass over the whole model is
    needed, e.g. TIES's global trim), ``uses_pretrained``, and implements :meth:`merge_tensor`
    (and :meth:`prepare` for model granularity). Tensors arrive in float64 on the CPU; the
    experts' tensors are fresh copies the method may overwrite (to save memory), the pretrained
    tensor must be left as it is.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    uses_pretrained: ClassVar[bool] = True
    #: whether merge_tensor overwrites the expert tensors it is given (then the driver hands it
    #: copies; otherwise the tensors are read as they are, converted only if the dtype differs)
    writes_inputs: ClassVar[bool] = False

    @property
    def granularity(self) -> str:
        """``"tensor"`` (streams one tensor at a time) or ``"model"`` (a pass over the model first)."""
        return "tensor"

    def params(self) -> dict[str, Any]:
        """The method's settings, for the result and its model card."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def begin(self) -> None:
        """Called when a merge starts: drop any state of an earlier (possibly failed) merge."""

    def prepare(self, names: Sequence[str], pretrained: Loader | None, experts: Sequence[Loader]) -> None:
        """A pass over the merged tensors before :meth:`merge_tensor` (model granularity)."""

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def collect(self, index: int, name: str, module: nn.Module, batches: Iterable[Any]) -> None:
        """For data-aware methods: run expert ``index`` (in eval mode) on its task's batches and
        keep what the merge needs (Gram matrices, Fisher information)."""
        raise NotImplementedError(f"{type(self).__name__} declares requirements but collects nothing.")

    def collect_all(
        self, names: Sequence[str], modules: Sequence[nn.Module], data: Sequence[Iterable[Any]]
    ) -> None:
        """Every expert at once (for methods whose statistics depend on all of them, such as
        RegMean++); by default :meth:`collect` for each in turn."""
        for index, (name, module, batches) in enumerate(zip(names, modules, data, strict=True)):
            self.collect(index, name, module, batches)

    def finish(self, experts: Sequence[str]) -> dict[str, Any]:
        """What the method returns beyond the merged tensors (EMR's per-task modulators), once
        every tensor is merged; placed in ``MergeResult.extras``."""
        return {}


def check_weights(weights: Sequence[float] | None, count: int, method: str) -> list[float]:
    """Per-expert weights: given (one per expert, finite) or all 1."""
    if weights is None:
        return [1.0] * count
    out = [float(w) for w in weights]
    if len(out) != count:
        raise ConfigError(f"{method}: {len(out)} weights for {count} experts.")
    if not all(abs(w) < float("inf") for w in out):
        raise ConfigError(f"{method}: weights must be finite, got {out}.")
    return out


def check_fraction(value: float, what: str, method: str, low_open: bool = False) -> float:
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"{method}: {what} must be in {interval}, got {value}.")
    return v


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A seed for tensor ``name`` of expert ``index``: random choices do not depend on the order
    in which tensors are processed (streamed or in memory give the same result)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 131 + index) % (2**63 - 1)


def tensor_uniform(seed: int, name: str, index: int, shape: torch.Size) -> Tensor:
    """Uniform [0, 1) float64 draws for tensor ``name`` of expert ``index`` (see
    :func:`tensor_seed`): the random masks of DARE and DELLA."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name, index))
    return torch.rand(shape, generator=generator, dtype=torch.float64)


#: how the entries kept after random dropping are rescaled (DARE, DELLA): by the exact inverse keep
#: probability (the papers) or to the tensor's former L1 norm (mergekit)
RESCALES = ("exact", "l1")


def restore_l1(kept: Tensor, l1: float) -> Tensor:
    """Rescale ``kept`` in place to the L1 norm ``l1`` (mergekit's rescale after dropping
    entries); left as it is when nothing was kept."""
    kept_l1 = float(kept.abs().sum())
    return kept.mul_(l1 / kept_l1) if kept_l1 > 0 else kept


__all__ = [
    "COMPUTE_DTYPE",
    "MERGERS",
    "REQUIREMENTS",
    "RESCALES",
    "Loader",
    "Merger",
    "check_fraction",
    "check_weights",
    "register",
    "restore_l1",
    "task_vector",
    "tensor_seed",
    "tensor_uniform",
]

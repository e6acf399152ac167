"""``merge(pretrained, experts, method)``: checks the models against each other, then merges
tensor by tensor (data-free per-tensor methods hold about experts + 2 tensors at a time)."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mtlkit.errors import ConfigError, NonFiniteLossError, ShapeMismatchError
from mtlkit.merging.base import COMPUTE_DTYPE, MERGERS, Merger
from mtlkit.merging.sources import TensorSource, is_batchnorm_statistic, is_mergeable, open_source

#: working precisions of the per-tensor merge
PRECISIONS = {"float64": COMPUTE_DTYPE, "float32": torch.float32}
BATCHNORM_RULES = ("merge", "average", "pretrained")


@dataclass
class MergeResult:
    """A merged model's tensors and how they were made.

    Attributes:
        state_dict: the merged tensors (tied weights share one tensor, as in the sources).
        method: the registry name of the method; ``params`` its settings.
        experts: the experts' names, in order; ``pretrained``: whether one was used.
        notes: what the merge did beyond the method (copied integer tensors, BatchNorm rule).
        seconds: wall time of the merge.
    """

    state_dict: dict[str, Tensor]
    method: str
    params: dict[str, Any]
    experts: list[str]
    pretrained: bool
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def for_task(self, task: str) -> dict[str, Tensor]:
        """The tensors of the model for ``task``, for methods that keep per-task modulators
        (EMR: the task-routed model); other methods have one model for every task."""
        modulators = self.extras.get("modulators")
        if modulators is None:
            raise ConfigError(f"{self.method} builds one model for every task; use state_dict.")
        return modulators.state_dict_for(task, self.state_dict)

    def save(self, path: str | Path, scores: Mapping[str, Any] | None = None) -> Path:
        """Write the merged tensors to ``path`` (safetensors, atomically: a temporary file renamed
        into place) and a model card next to it (``<stem>.md``: method, settings, sources, notes and
        the ``scores`` given). Tied tensors are written as copies."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigError(f"{path}: merged models are written as .safetensors files.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, t in self.state_dict.items():
            t = t.detach().cpu()
            key = id(t) if t.numel() == 0 else t.untyped_storage().data_ptr()
            tensors[name] = t.clone().contiguous() if key in seen else t.contiguous()
            seen.add(key)
        metadata = {"mtlkit_method": self.method, "mtlkit_params": json.dumps(self.params, default=str)}
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        card = path.with_suffix(".md")
        card_tmp = card.with_suffix(".md.tmp")
        card_tmp.write_text(self.model_card(scores))
        os.replace(card_tmp, card)
        return path

    def model_card(self, scores: Mapping[str, Any] | None = None) -> str:
        lines = [
            "# Merged model",
            "",
            f"Made by mtlkit's `{self.method}` merge in {self.seconds:.1f} s.",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in self.params.items()),
            "",
            f"Pretrained model used: {'yes' if self.pretrained else 'no'}. Experts, in order: "
            + ", ".join(f"`{e}`" for e in self.experts)
            + ".",
        ]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        if scores:
            lines += ["", "| score | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in scores.items())]
        return "\n".join(lines) + "\n"

    def load_into(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Load the merged tensors into ``model`` (an instance of the experts' architecture)."""
        model.load_state_dict(self.state_dict, strict=strict)
        return model


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite. A NaN or an infinity makes the sum non-finite, so one
    reduction (no N-sized mask) settles the usual case; only a non-finite sum, which large finite
    values can also give by overflow, is checked entry by entry."""
    if not torch.is_floating_point(t) or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: Tensor, name: str, where: str) -> None:
    if not all_finite(t):
        raise NonFiniteLossError(
            f"Tensor {name!r} in {where} has NaN or infinite values; nothing was merged."
        )


def _check_compatible(names: list[str], base: TensorSource | None, experts: list[TensorSource]) -> None:
    """Same keys, shapes and dtypes everywhere, before anything is computed."""
    reference = base if base is not None else experts[0]
    ref_keys = set(reference.keys())
    for src in [*experts, *([] if base is None else [base])]:
        keys = set(src.keys())
        if keys != ref_keys:
            missing, extra = sorted(ref_keys - keys), sorted(keys - ref_keys)
            raise ShapeMismatchError(
                f"{src.label} does not match {reference.label}: missing tensors {missing[:5]}, "
                f"unexpected tensors {extra[:5]}."
            )
    for name in names:
        shape, dtype = reference.shape(name), reference.dtype(name)
        for src in experts:
            if src.shape(name) != shape:
                raise ShapeMismatchError(
                    f"Tensor {name!r} has shape {src.shape(name)} in {src.where(name)} but {shape} in "
                    f"{reference.where(name)}: the models do not share one architecture."
                )
            if is_mergeable(src.dtype(name)) != is_mergeable(dtype):
                raise ShapeMismatchError(
                    f"Tensor {name!r} is floating in one model and not in another ({src.where(name)})."
                )


def _collect(
    merger: Merger,
    method_name: str,
    experts: Mapping[str, Any],
    sources: list[TensorSource],
    data: Mapping[str, Iterable[Any]] | None,
    model: nn.Module | None,
) -> None:
    """Run each expert on its task's data for a data-aware method (``Merger.collect``)."""
    if data is None:
        raise ConfigError(f"{method_name} needs data: pass data={{expert: batches}} of each task's inputs.")
    missing = [name for name in experts if name not in data]
    if missing:
        raise ConfigError(f"{method_name}: no data for expert(s) {missing}.")
    modules = []
    for obj, src in zip(experts.values(), sources, strict=True):
        if isinstance(obj, nn.Module):
            modules.append(obj)
        elif model is not None:
            module = copy.deepcopy(model)
            module.load_state_dict({k: src.load(k) for k in src})
            modules.append(module)
        else:
            raise ConfigError(
                f"{method_name} runs the experts on data: give them as nn.Modules, or pass model= (an "
                "instance of their architecture) to load expert tensors into."
            )
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        merger.collect_all(list(experts), modules, [data[name] for name in experts])
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def merge(
    pretrained: Any,
    experts: Mapping[str, Any],
    method: str | Merger = "task_arithmetic",
    *,
    batchnorm: str = "merge",
    data: Mapping[str, Iterable[Any]] | None = None,
    model: nn.Module | None = None,
    precision: str = "float64",
    **options: Any,
) -> MergeResult:
    """Merge ``experts`` (``{name: model, state dict, safetensors file or shard folder}``) that were
    fine-tuned from ``pretrained`` (same kinds; ``None`` for methods that do not use it).

    Args:
        method: a registry name (``mk.merging.available()``) with its ``options``, or a
            :class:`Merger` instance.
        data: for data-aware methods (``Merger.requires``), ``{expert: batches}`` of that
            expert's task inputs (a batch is an input tensor, or a tuple whose first item is it;
            labels are not needed unless the method says so).
        model: an instance of the experts' architecture, for data-aware methods when the
            experts are given as tensors or files (each expert is loaded into a copy of it).
        batchnorm: what happens to normalisation running statistics (``running_mean``,
            ``running_var``): ``"merge"`` (the method treats them as any tensor), ``"average"``
            (their plain mean) or ``"pretrained"`` (kept from the pretrained model). None of these
            is right in general; recompute them on data after merging when the experts have
            BatchNorm (:func:`mtlkit.merging.recalibrate_batchnorm`).

        precision: the working precision of the per-tensor merge, ``"float64"`` (exact identities:
            Task Arithmetic with one task and scale 1 returns the expert bit for bit) or
            ``"float32"`` (half the working memory: about T + 3 tensors of the storage size for
            float32 models; results agree to float32 rounding). Model-level passes (TIES's global
            threshold, MetaGPT's norms) and data-aware statistics stay in float64.

    Floating tensors are merged in ``precision`` and cast back to the pretrained (else the first
    expert's) dtype; integer and boolean tensors are copied from the pretrained model (else the
    first expert); tensors tied in the sources are merged once and stay tied. Differing keys,
    shapes or kinds and non-finite values raise before anything is returned.
    """
    start = time.perf_counter()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    work = PRECISIONS[precision]
    if batchnorm not in BATCHNORM_RULES:
        raise ConfigError(f"batchnorm must be one of {BATCHNORM_RULES}, got {batchnorm!r}.")
    if isinstance(method, Merger):
        if options:
            raise ConfigError("Pass options to the method's constructor when giving a Merger instance.")
        merger, method_name = method, type(method).__name__
    else:
        merger, method_name = MERGERS.create(method, **options), MERGERS.normalise(method)
    if not experts:
        raise ConfigError("merge needs at least one expert.")
    if batchnorm == "pretrained" and pretrained is None:
        raise ConfigError("batchnorm='pretrained' needs the pretrained model.")
    merger.begin()
    sources = [open_source(obj, f"expert {name!r}") for name, obj in experts.items()]
    base = open_source(pretrained, "the pretrained model") if pretrained is not None else None
    if base is None and merger.uses_pretrained:
        raise ConfigError(f"{method_name} works on task vectors: give the pretrained model.")
    reference = base if base is not None else sources[0]
    names = reference.keys()
    _check_compatible(names, base, sources)
    aliases = reference.aliases()
    kinds = {n: is_mergeable(reference.dtype(n)) for n in names}
    merged_names = [
        n
        for n in names
        if kinds[n] and n not in aliases and not (batchnorm != "merge" and is_batchnorm_statistic(n))
    ]

    if merger.requires:
        _collect(merger, method_name, experts, sources, data, model)
    if merger.granularity == "model":
        merger.prepare(merged_names, base.load if base is not None else None, [s.load for s in sources])
    out: dict[str, Tensor] = {}
    notes = []
    for name in names:
        if name in aliases:
            continue
        ref = reference.load(name)
        if not kinds[name]:
            out[name] = ref.clone()
            continue
        tensors = []
        for s in sources:  # each converted as it is read: one copy per expert stays resident
            t = s.load(name)
            _check_finite(t, name, s.where(name))
            # a copy only for a method that overwrites its inputs; never the caller's tensor then
            tensors.append(t.to(work, copy=merger.writes_inputs))
            del t
        if base is not None:
            _check_finite(ref, name, base.where(name))
        if batchnorm != "merge" and is_batchnorm_statistic(name):
            value = ref if batchnorm == "pretrained" and base is not None else torch.stack(tensors).mean(0)
            out[name] = value.to(ref.dtype).clone()
            continue
        merged = merger.merge_tensor(name, ref.to(work) if base is not None else None, tensors)
        del tensors
        if not all_finite(merged):
            raise NonFiniteLossError(
                f"{method_name} produced non-finite values for {name!r}; nothing was merged."
            )
        out[name] = merged.to(ref.dtype, copy=True)  # never the caller's tensor
    for name, first in aliases.items():
        out[name] = out[first]
    copied = [n for n in names if not kinds[n]]
    if copied:
        notes.append(f"{len(copied)} integer/boolean tensor(s) copied from {reference.label}.")
    if aliases:
        notes.append(f"{len(aliases)} tied tensor(s) merged once.")
    if precision != "float64":
        notes.append(f"Merged in {precision} (not float64): results agree to {precision} rounding.")
    if any(is_batchnorm_statistic(n) for n in names):
        notes.append(f"BatchNorm running statistics: {batchnorm}.")
    extras = merger.finish(list(experts))
    return MergeResult(
        out,
        method_name,
        merger.params(),
        list(experts),
        base is not None,
        notes,
        time.perf_counter() - start,
        extras,
    )


def available() -> list[str]:
    """Names of every registered merging method."""
    return MERGERS.available()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Any, forward: Any = None) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics of a merged ``model`` from ``batches``
    (inputs, or ``(inputs, targets)`` pairs): the statistics are reset and re-estimated as a
    cumulative average over the batches in training mode; the model's mode and the layers'
    momenta are restored afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            (forward or model)(x)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ConfigError("recalibrate_batchnorm got no batches.")
    return model

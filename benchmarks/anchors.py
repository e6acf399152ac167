"""Adapters that drive the anchor libraries' methods on the benchmark model (CPU).

LibMTL 1.1.5 (the newest wheel on PyPI) does not run as shipped on current PyTorch; the shims,
recorded here and in the results, are:
- its ``__init__`` imports ``torchvision.models.utils`` (removed in torchvision 0.13; torchvision
  is not installed): a stub module is registered before the import;
- its Trainer hard-codes CUDA: the weighting classes are called directly on a CPU model, with the
  attributes the Trainer would set (``task_num``, ``device``, ``rep_grad``, ``rep``, ...);
- ``zero_grad()`` now sets ``.grad`` to None, which its ``_reset_grad`` cannot handle: the adapter
  zeroes the shared gradients in place instead;
- the loss vector is assembled as its Trainer does (``torch.zeros(K)`` + index assignment);
- its methods read their hyper-parameters from the Trainer's keyword arguments: the adapter passes
  LibMTL's config defaults (``mgda_gn='none'``, DWA ``T=2``, GradNorm ``alpha=1.5``, GradDrop
  ``leak=0``, GradVac ``beta=0.5``, CAGrad ``calpha=0.5``, ``rescale=1``).

TorchJD 0.18.0 runs as shipped, through its ``autojac`` API: ``mtl_backward(losses, features=z)``
(the Jacobian of the trunk, one row per task, by ``vmap``; each head gets its own gradient) and
``jac_to_grad(trunk, aggregator)``. MoDo, a weighting of the cross Gramian of two independent
batches, is driven as its documentation's three-batch example: two ``autojac.jac`` Jacobians, then
the third batch's losses back-propagated with the weights.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


def _stub_torchvision() -> None:
    try:
        import torchvision.models.utils  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")
        utils = types.ModuleType("torchvision.models.utils")
        utils.load_state_dict_from_url = None  # type: ignore[attr-defined]
        tv.models = models  # type: ignore[attr-defined]
        models.utils = utils  # type: ignore[attr-defined]
        sys.modules.update(
            {"torchvision": tv, "torchvision.models": models, "torchvision.models.utils": utils}
        )


def libmtl_available() -> bool:
    try:
        _stub_torchvision()
        import LibMTL.weighting  # noqa: F401
    except Exception:
        return False
    return True


#: LibMTL 1.1.5's per-task-gradient methods as benchmark names (``-rep``: ``rep_grad=True``, the
#: gradients of the shared representation; GradDrop supports only that, PCGrad, GradVac and CAGrad
#: only the parameter level)
LIBMTL_GRADIENT_METHODS = (
    "MGDA",
    "MGDA-rep",
    "IMTL",
    "IMTL-rep",
    "PCGrad",
    "GradVac",
    "GradDrop-rep",
    "CAGrad",
)
#: the hyper-parameters LibMTL's Trainer passes to ``weighting.backward`` (its config defaults)
LIBMTL_OPTIONS = {
    "mgda_gn": "none",
    "T": 2.0,
    "alpha": 1.5,
    "leak": 0.0,
    "beta": 0.5,
    "calpha": 0.5,
    "rescale": 1,
}


def libmtl_step(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    """One training step of LibMTL's ``name`` weighting ("EW", "UW", "DWA", "GLS", "GradNorm" or
    one of LIBMTL_GRADIENT_METHODS). Epoch-dependent methods are set to epoch 2 (DWA's and
    GradNorm's weighted branch), with the loss buffer the Trainer would have filled; each method
    gets LIBMTL_OPTIONS."""
    _stub_torchvision()
    from LibMTL import weighting as lw

    rep_grad = name.endswith("-rep")
    cls = getattr(lw, name.removesuffix("-rep"))
    k = len(model.heads)
    mse = nn.functional.mse_loss

    class Adapter(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = k
            self.task_name = model.names
            self.device = torch.device("cpu")
            self.rep_grad = rep_grad

        def get_share_params(self):
            return model.trunk.parameters()

        def zero_grad_share_params(self):
            for p in model.trunk.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    weighting = Adapter()
    weighting.epoch = 2
    weighting.train_loss_buffer = np.ones((k, 3))
    if hasattr(weighting, "init_param"):
        weighting.init_param()
    own = list(weighting.parameters())  # the model is not a submodule of the adapter
    if own:  # UW's log-variances, GradNorm's weights, IMTL's loss scales: trained by the same optimizer
        opt.add_param_group({"params": own})
    options = LIBMTL_OPTIONS

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        z = model.trunk(x)
        if rep_grad:  # LibMTL's HPS in rep_grad mode: each head reads a detached copy of z
            weighting.rep = z
            weighting.rep_tasks = {t: z.detach().clone().requires_grad_() for t in model.names}
            feats = [weighting.rep_tasks[t] for t in model.names]
        else:
            feats = [z] * k
        losses = torch.zeros(k)
        for i, head in enumerate(model.heads):
            losses[i] = mse(head(feats[i]).squeeze(-1), y[:, i])
        weighting.backward(losses, **options)
        opt.step()

    return step


#: TorchJD configurations that use more than one batch per step (the others: one)
TORCHJD_BATCHES = {"MoDo": 3}


def torchjd_aggregators(k: int) -> dict[str, Callable[[], Any]]:
    """TorchJD 0.18's aggregators by benchmark name, as factories. Options that TorchJD requires
    take mtlkit's defaults for the same quantity (CAGrad c=0.4, FairGrad alpha=1, Krum with no
    Byzantine task, TrimmedMean trimming none, ExcessMTL's step size 0.01 and one warm-up step);
    SDMGrad is its weighting on the one-batch Gramian (mtlkit's default, ``independent_batches=False``)."""
    from torchjd import aggregation as a

    return {
        "MGDA": a.MGDA,
        "UPGrad": a.UPGrad,
        "DualProj": a.DualProj,
        "IMTLG": a.IMTLG,
        "PCGrad": a.PCGrad,
        "GradVac": a.GradVac,
        "GradDrop": a.GradDrop,
        "CAGrad": lambda: a.CAGrad(c=0.4),
        "NashMTL": lambda: a.NashMTL(n_tasks=k),
        "AlignedMTL": a.AlignedMTL,
        "ConFIG": a.ConFIG,
        "FairGrad": lambda: a.FairGrad(alpha=1.0),
        "Krum": lambda: a.Krum(n_byzantine=0),
        "TrimmedMean": lambda: a.TrimmedMean(trim_number=0),
        "ExcessMTL": lambda: a.ExcessMTL(robust_step_size=0.01, n_warmup_steps=1),
        "SDMGrad": lambda: a.GramianWeightedAggregator(a.SDMGradWeighting()),
        "PCD": a.PCD,
        "Mean": a.Mean,
    }


def torchjd_names() -> list[str]:
    """Every TorchJD configuration name (empty when TorchJD is not installed)."""
    try:
        return [*torchjd_aggregators(2), *TORCHJD_BATCHES]
    except ImportError:
        return []


def torchjd_step(
    name: str,
    model: nn.Module,
    losses_of: Callable[..., list[torch.Tensor]],
    batch: tuple[torch.Tensor, torch.Tensor],
    extra: list[tuple[torch.Tensor, torch.Tensor]],
    opt: torch.optim.Optimizer,
) -> Callable[[], None]:
    """One training step with TorchJD's ``name`` (see :func:`torchjd_aggregators`); ``extra`` holds
    the other batches of a multi-batch method. The step carries its aggregator (or weighting) as
    ``step.aggregator``."""
    from torchjd.autojac import jac_to_grad, mtl_backward

    if name == "MoDo":
        return _torchjd_modo_step(model, losses_of, batch, extra, opt)
    agg = torchjd_aggregators(len(model.heads))[name]()
    shared = model.shared_parameters()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = losses_of(*batch)
        mtl_backward(losses, features=model.last_features)
        jac_to_grad(shared, agg)
        opt.step()

    step.aggregator = agg  # type: ignore[attr-defined]
    return step


def _torchjd_modo_step(model, losses_of, batch, extra, opt) -> Callable[[], None]:
    """MoDo with mtlkit's defaults (gamma=1e-3, rho=0.1): weights from the cross Gramian of the
    trunk Jacobians of two extra batches, then the step's own losses back-propagated with them
    (so each head gets its weighted gradient from the step's batch)."""
    from torchjd.aggregation import MoDoWeighting
    from torchjd.autojac import jac

    weighting = MoDoWeighting(gamma=1e-3, rho=0.1)
    shared = model.shared_parameters()

    def trunk_jacobian(inputs, targets):
        return torch.cat([j.flatten(1) for j in jac(losses_of(inputs, targets), shared)], dim=1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        first, second = (trunk_jacobian(*b) for b in extra)
        weights = weighting(first @ second.T)
        del first, second
        torch.stack(losses_of(*batch)).backward(weights)
        opt.step()

    step.aggregator = weighting  # type: ignore[attr-defined]
    return step

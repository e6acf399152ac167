"""Adapters that drive the anchor libraries' methods on the benchmark model (CPU).

LibMTL 1.1.5 (the newest wheel on PyPI) does not run as shipped on current PyTorch; the shims,
recorded here and in the results, are:
- its ``__init__`` imports ``torchvision.models.utils`` (removed in torchvision 0.13; torchvision
  is not installed): a stub module is registered before the import;
- its Trainer hard-codes CUDA: the weighting classes are called directly on a CPU model, with the
  attributes the Trainer would set (``task_num``, ``device``, ``rep_grad``, ``rep``, ...);
- ``zero_grad()`` now sets ``.grad`` to None, which its ``_reset_grad`` cannot handle: the adapter
  zeroes the shared gradients in place instead;
- the loss vector is assembled as its Trainer does (``torch.zeros(K)`` + index assignment).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

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


def libmtl_step(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer
) -> Callable[[], None]:
    """One training step of LibMTL's ``name`` weighting ("EW", "MGDA", "MGDA-rep", "UW", "DWA",
    "GLS", "GradNorm"). Epoch-dependent methods are set to epoch 2 (DWA's and GradNorm's weighted
    branch), with the loss buffer the Trainer would have filled; each method gets its config
    defaults (DWA T=2, GradNorm alpha=1.5)."""
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
    own = [p for p in vars(weighting).values() if isinstance(p, nn.Parameter)]
    if own:  # UW's log-variances, GradNorm's weights: trained by the same optimizer in LibMTL
        opt.add_param_group({"params": own})
    options = {"mgda_gn": "none", "T": 2.0, "alpha": 1.5}

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

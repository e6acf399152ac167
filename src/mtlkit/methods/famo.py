"""FAMO: fast adaptive multitask optimisation (Liu, Feng, Stone, Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.engine import as_param_list
from mtlkit.errors import NonFiniteLossError, TaskError
from mtlkit.methods.base import LossWeighting, state_copy
from mtlkit.methods.registry import register

_EPS = 1e-8  # added to L_k - m_k before every logarithm, as in the official code


@register("famo")
class FAMO(LossWeighting):
    """FAMO: Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

    State: logits ``xi`` (K, init 0) with their own Adam optimiser. Each step, with
    ``z = softmax(xi)``, ``D_k = L_k - m_k + 1e-8`` and ``c = sum_k z_k / D_k``, the model minimises
    ``sum_k (z_k / c) log D_k``, i.e. one backward with effective weights ``w_k = z_k / (c D_k)``
    (they sum to 1). The shared gradient is then clipped to ``max_norm``. After the optimiser step
    the caller evaluates the losses again on the same batch, without gradients, and passes them to
    :meth:`after_step` (the Trainer does this; in a user loop::

        info = method.backward(losses, shared=model.shared_parameters())
        optimizer.step()
        with torch.no_grad():
            method.after_step(task_losses(model(x), y))

    ). There, ``delta_k = log D_k(before) - log D_k(after)`` is the log-loss decrease each task got,
    and ``xi`` takes one Adam step along ``J_softmax(xi)^T delta`` (as a gradient, so Adam
    *descends* it): tasks that improved the most lose weight. Memory and time are O(1) in K
    beyond the one extra forward: no per-task gradient is ever formed.

    Args:
        lr: Adam learning rate of ``xi`` (official ``--method-params-lr`` 0.025).
        gamma: Adam weight decay on ``xi`` (official run scripts: 1e-3 for NYUv2, QM9 and CelebA,
            1e-2 for Cityscapes; LibMTL 1e-3; default 1e-3).
        max_norm: clip the norm of the shared-parameter gradient after the backward (official
            1.0; ``None`` or 0 turns it off). Needs ``shared=`` in :meth:`backward`.
        min_losses: the ``m_k`` (official default 0): a known lower bound of each loss.

    Losses must exceed ``m_k``: a labelled task with ``L_k - m_k + 1e-8 <= 0`` raises
    :class:`~mtlkit.errors.NonPositiveLossError` before anything is updated. Tasks without a
    labelled sample get weight 0 and ``delta_k = 0`` (the step says nothing about them); their
    logit still moves through the softmax coupling (``-z_k <z, delta>``) and Adam's momentum and
    weight decay, as every logit does in the official update.
    """

    name = "famo"
    hooks = frozenset({"post_step_losses"})

    def __init__(
        self,
        lr: float = 0.025,
        gamma: float = 1e-3,
        max_norm: float | None = 1.0,
        min_losses: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise TaskError(f"FAMO lr must be > 0, got {lr!r}.")
        if not gamma >= 0:
            raise TaskError(f"FAMO gamma must be >= 0, got {gamma!r}.")
        if max_norm is not None and not max_norm >= 0:
            raise TaskError(f"FAMO max_norm must be >= 0 or None, got {max_norm!r}.")
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.max_norm = max_norm
        self.min_losses_init = None if min_losses is None else [float(v) for v in min_losses]
        self.logits: Tensor | None = None
        self.min_losses: Tensor | None = None
        self._optimizer: torch.optim.Adam | None = None
        self._before: Tensor | None = None  # log D_k of the last backward
        self._before_active: Tensor | None = None

    def _build(self, num_tasks: int) -> None:
        self.logits = torch.zeros(num_tasks, requires_grad=True)
        self._optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
        if self.min_losses_init is not None and len(self.min_losses_init) != num_tasks:
            raise TaskError(f"FAMO got {len(self.min_losses_init)} min_losses for {num_tasks} tasks.")
        self.min_losses = torch.tensor(self.min_losses_init or [0.0] * num_tasks)

    def _require_above_min(self, names: Sequence[str], losses: Tensor, active: Tensor) -> Tensor:
        gap = losses - self.min_losses.to(losses) + _EPS
        self._require_positive(names, gap, active)
        return gap

    def loss_weights(self, losses: Tensor, active: Tensor) -> Tensor:
        assert self.logits is not None
        if self.logits.device != losses.device:
            self.to(losses.device)
        # checked here, after the finiteness checks and before any state or gradient is written
        gap = self._require_above_min(self.task_names or [], losses, active)
        gap = torch.where(active, gap, 1.0)  # unlabelled tasks: log 1 = 0, weight 0 below
        inv = torch.softmax(self.logits.detach(), dim=0).to(gap.dtype) / gap * active
        self._before = gap.log()
        self._before_active = active
        return (inv / inv.sum().clamp_min(1e-30)).to(losses.dtype)  # = z_k / (c D_k); sums to 1

    def _after_backward(self, shared: Iterable[Tensor] | None, loss_scale: float | None) -> None:
        if not self.max_norm or shared is None:
            return
        params = [p for p in as_param_list(shared) if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        # torch.nn.utils.clip_grad_norm_ in two parts: on the CPU the multiply by min(1, max/norm)
        # is skipped when it would be by 1 (bit-identical, and it is half the clip's time); on a
        # GPU it always runs, to avoid a host sync. With a GradScaler the gradients are scaled:
        # clip at the scaled norm.
        max_norm = self.max_norm * (loss_scale or 1.0)
        total = torch.nn.utils.get_total_norm(grads)
        if grads[0].device.type != "cpu" or not float(total) <= max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    def after_step(self, new_losses: Mapping[str, Tensor] | Sequence[Tensor]) -> None:
        """Update the logits from the losses on the same batch after the optimiser step."""
        if self._before is None or self._before_active is None:
            raise TaskError("FAMO.after_step() needs a preceding backward() on the same batch.")
        if isinstance(new_losses, Mapping):
            names = list(new_losses)
            if names != self.task_names:
                raise TaskError(f"FAMO.after_step() got tasks {names}, expected {self.task_names}.")
            values = list(new_losses.values())
            labelled = getattr(new_losses, "labelled", None)
        else:
            values = list(new_losses)
            labelled = None
        if len(values) != len(self._before):
            raise TaskError(f"FAMO.after_step() got {len(values)} losses for {len(self._before)} tasks.")
        after = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in values])
        after = after.to(self._before.device, self._before.dtype)
        active = self._before_active
        if labelled is not None:
            active = active & (labelled.to(active.device) > 0)
        if not bool(torch.isfinite(after).all()):  # unlabelled tasks have loss 0, so all must be finite
            raise NonFiniteLossError(
                f"FAMO.after_step() got non-finite losses {after.tolist()}; the logits were not updated."
            )
        assert self.logits is not None and self._optimizer is not None
        # a loss that fell below m_k after the step: clamp (the official code would give NaN)
        gap = (after - self.min_losses.to(after) + _EPS).clamp_min(_EPS)
        delta = ((self._before - gap.log()) * active).to(self.logits.dtype)
        # J_softmax(xi)^T delta in closed form: z * (delta - <z, delta>) (the official code asks
        # autograd for this vector-Jacobian product; same value, a fraction of the time)
        z = torch.softmax(self.logits.detach(), dim=0)
        self.logits.grad = z * (delta - (z * delta).sum())
        self._optimizer.step()
        self._before = self._before_active = None

    def to(self, device: torch.device | str) -> FAMO:
        if self.logits is not None:  # in place, so the inner Adam keeps its parameter
            self.logits.data = self.logits.data.to(device)
            for st in self._optimizer.state.values():
                for key, val in st.items():
                    if isinstance(val, Tensor) and key != "step":
                        st[key] = val.to(device)
            self.min_losses = self.min_losses.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.logits is not None:
            # copies, never the live tensors (the inner Adam's state included)
            state.update(
                state_copy(
                    {
                        "logits": self.logits,
                        "optimizer": self._optimizer.state_dict(),
                        "min_losses": self.min_losses,
                    }
                )
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("logits") is None:
            return
        assert self.logits is not None and self._optimizer is not None
        device = self.logits.device
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self._optimizer.load_state_dict(state_copy(state["optimizer"]))  # never share the caller's
        self.min_losses = state["min_losses"].clone()
        self.to(device)
        self._before = self._before_active = None

    def __repr__(self) -> str:
        return f"FAMO(lr={self.lr!r}, gamma={self.gamma!r}, max_norm={self.max_norm!r})"

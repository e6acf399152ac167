"""Rep-MTL: representation-level task-saliency regularisation around any method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mtlkit.core.distributed import DataParallel
from mtlkit.core.engine import GradientEngine
from mtlkit.core.tasks import TaskSet
from mtlkit.errors import EngineError, LifecycleError
from mtlkit.methods.base import Hook, Losses, Method, StepInfo, StepInputs, add_gradients, gradients_of
from mtlkit.methods.hparams import hparam, instance_of, none, number, one_of
from mtlkit.methods.registry import register
from mtlkit.methods.wrapping import WrapsMethod

_TINY = 1e-12


def task_saliency_distribution(
    saliency: Tensor, normalize: Literal["sum", "softmax"] = "sum", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(a, p)`` from per-task saliency maps ``(A, B, C, *spatial)``: ``a`` (A, B, C) is the mean
    absolute saliency of each task, sample and channel, ``p`` its distribution over the tasks
    (``a`` normalised by its sum over tasks, or a softmax of ``a / temperature``)."""
    a = saliency.abs()
    if a.dim() > 3:
        a = a.flatten(3).mean(dim=3)
    elif a.dim() == 2:  # (A, B): one channel per sample
        a = a.unsqueeze(2)
    if normalize == "softmax":
        p = torch.softmax(a / temperature, dim=0)
    else:
        p = a / a.sum(dim=0, keepdim=True).clamp_min(_TINY)
    return a, p


def saliency_entropy(p: Tensor) -> Tensor:
    """TSR: the mean over samples and channels of the entropy of the task distribution ``p``
    (A, B, C); ``0 log 0 = 0`` (with a finite gradient there)."""
    return -(p * p.clamp_min(_TINY).log()).sum(dim=0).mean()


def saliency_alignment(a: Tensor, tau: float, chunk: int = 512) -> Tensor:
    """CSA: InfoNCE over the (sample, task) channel profiles ``a`` (A, B, C), L2-normalised. For
    the anchor (i, k) the positives are (i, j), j != k (the same sample seen by the other tasks);
    every other (sample, task) pair is in the denominator, the anchor itself excluded.

    The denominators need every pair's similarity, ``O((B A)^2 C)`` work; they are computed
    ``chunk`` anchors at a time under activation checkpointing, so memory stays ``O(chunk B A)``
    instead of the ``(B A)^2`` matrix (2.8 GB at B = 256, A = 40)."""
    num_tasks, batch, _ = a.shape
    v = F.normalize(a.transpose(0, 1).reshape(batch * num_tasks, -1), dim=1, eps=_TINY)
    grouped = v.view(batch, num_tasks, -1)
    same = grouped @ grouped.transpose(1, 2) / tau  # (B, A, A): the positives and the anchor
    eye = torch.eye(num_tasks, dtype=torch.bool, device=a.device)
    log_pos = torch.logsumexp(same.masked_fill(eye, float("-inf")), dim=2).reshape(-1)
    parts = [
        checkpoint(
            _log_denominator, v[start : start + chunk], v, torch.tensor(start), tau, use_reentrant=False
        )
        for start in range(0, len(v), chunk)
    ]
    return (torch.cat(parts) - log_pos).mean()


def _log_denominator(rows: Tensor, every: Tensor, start: Tensor, tau: float) -> Tensor:
    """``log sum_{m != n} exp(<v_n, v_m> / tau)`` for the anchors ``rows`` (starting at ``start``)."""
    sims = rows @ every.T / tau
    index = torch.arange(len(rows), device=rows.device)
    sims = sims.index_put(
        (index, index + int(start)), torch.tensor(float("-inf"), dtype=sims.dtype, device=sims.device)
    )
    return torch.logsumexp(sims, dim=1)


@register("rep_mtl")
class RepMTL(WrapsMethod):
    """Rep-MTL: Wang, Li, Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency
    for Multi-Task Learning", ICCV 2025 (highlight).

    A regulariser of the shared representation ``Z`` added to any base method (``ew`` by default,
    as the paper emphasises). The task saliency ``S_k = dL_k/dZ`` comes from the engine as a
    differentiable function of the model (double backward through the heads), so the regulariser
    trains the trunk and the heads:

    - ``a[k, i, c]``: mean ``|S_k|`` of sample ``i`` and channel ``c`` over spatial positions;
      ``p[., i, c]`` its distribution over the tasks (normalised by the sum, or a softmax);
    - TSR (task-specific saliency regulation): the mean entropy of ``p``, so each representation
      element is clearly owned by a task;
    - CSA (cross-task saliency alignment): InfoNCE over the L2-normalised channel profiles, with
      the same sample's profiles under the other tasks as positives and the other samples'
      profiles as negatives (temperature ``tau``);

    total ``= base(L_1..L_K) + lambda_tsr * TSR + lambda_csa * CSA``.

    **Reconstruction.** The authors' code is not released (their repository holds only a README);
    the losses above follow the paper's description as summarised in the project's spec, with
    the additive entropy penalty as the TSR form and the hyper-parameters (0.1, 0.1, tau 0.1) our
    starting values, not the paper's. Treat the method as provisional until the code appears;
    ``normalize`` switches the saliency distribution between the two forms the description
    allows. Tasks without a labelled sample are left out of both terms; with fewer than two
    labelled tasks the regulariser is 0. With a representation-level base (``mgda_ub``) the
    saliency passes also give the base its per-task gradients (no further backward); otherwise
    the cost is K backward passes through the heads and one double backward.
    """

    engine: GradientEngine | None = hparam(
        None, instance_of(GradientEngine) | none(), "the gradient engine", config=False
    )
    lambda_tsr: float = hparam(0.1, number(ge=0), "weight of the saliency-entropy term (TSR)")
    lambda_csa: float = hparam(0.1, number(ge=0), "weight of the cross-task alignment term (CSA)")
    tau: float = hparam(0.1, number(gt=0), "temperature of the CSA InfoNCE")
    normalize: Literal["sum", "softmax"] = hparam(
        "sum", one_of("sum", "softmax"), "task distribution of the saliency: sum-normalised or softmax"
    )
    temperature: float = hparam(1.0, number(gt=0), "softmax temperature (normalize='softmax')")
    needs_setup = True  # the base may have parameters: they enter the optimiser through this method

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        probe = self.make_base()
        self.__dict__["hooks"] = probe.hooks  # the base's post-step and epoch hooks are Rep-MTL's
        self._base_level = getattr(probe, "level", "loss")

    @property
    def needs_representation(self) -> bool:
        return True

    def _build(self, tasks: TaskSet) -> None:
        self.base_method = self.make_base()
        if isinstance(self.engine, GradientEngine) or self._base_level == "representation":
            self.__dict__["engine"] = self._engine()
            if "engine" in type(self.base_method)._hparams:  # share it: the saliency passes feed it
                self.base_method.__dict__["engine"] = self.engine
        self.setup_parts(tasks)

    def _attach(self, model: Any) -> None:
        self.base_method.setup(self.task_names or [], model=model)

    def parts(self) -> list[Method]:
        base = getattr(self, "base_method", None)
        return [base] if base is not None else []

    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts() for g in part.param_groups()]

    def after_step(self, new_losses: Losses) -> None:
        if Hook.AFTER_STEP not in self.hooks:
            return
        if not self._after_step_due:
            raise LifecycleError("RepMTL.after_step() needs a preceding backward().")
        self.base_method.after_step(new_losses)
        self._after_step_due = False

    def _engine(self) -> GradientEngine:
        if not isinstance(self.engine, GradientEngine):
            self.__dict__["engine"] = GradientEngine()
        return self.engine  # type: ignore[return-value]

    def regularizer(
        self, saliency: Tensor, active: Tensor, parallel: DataParallel | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(TSR, CSA)`` of the (K, *z.shape) saliency of the active tasks (zeros with fewer
        than two).

        Under DDP the TSR of this rank's samples is its part of the global mean (DDP's average
        over equal shards completes it), and CSA, whose denominators contrast every sample of the
        batch, runs on the profiles of the whole global batch (a differentiable all-gather; its
        backward sums each rank's part back)."""
        idx = active.nonzero().squeeze(1)
        zero = saliency.new_zeros(())
        if len(idx) < 2 or saliency.dim() < 2:
            return zero, zero
        a, p = task_saliency_distribution(saliency[idx.to(saliency.device)], self.normalize, self.temperature)
        tsr = saliency_entropy(p) if self.lambda_tsr else zero
        if self.lambda_csa and parallel is not None:
            a = parallel.gather(a, dim=1)
        csa = saliency_alignment(a, self.tau) if self.lambda_csa else zero
        return tsr, csa

    def _step(self, inputs: StepInputs) -> StepInfo:
        z = inputs.output.representation if inputs.output is not None else None
        if z is None or isinstance(z, Mapping):
            raise EngineError(
                "Rep-MTL regularises one shared representation tensor: pass output=model(x, full_output=True) "
                "from a model that returns one (shared-bottom, MMoE, ...)."
                if z is None
                else "Rep-MTL needs one shared representation tensor; this model returns one per task."
            )
        engine = self._engine()
        saliency = engine.representation_saliency(
            inputs.values,
            z,
            inputs.names,
            inputs.task_specific,
            prepare=self._base_level == "representation",
        )
        tsr, csa = self.regularizer(saliency / inputs.scale, inputs.active, inputs.parallel)
        penalty = self.lambda_tsr * tsr + self.lambda_csa * csa
        written = gradients_of(penalty * inputs.scale, inputs._model)  # before the base frees the graph
        if inputs.parallel is not None:  # global before it joins gradients the base may have reduced
            inputs.parallel.average_([g for _, g in written])
        del saliency
        info = self.base_backward(self.base_method, inputs)
        add_gradients(written)
        info.extras = {**info.extras, "tsr": tsr.detach(), "csa": csa.detach()}
        return info

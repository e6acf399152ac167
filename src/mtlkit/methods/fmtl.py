"""F-MTL: per-task sharpness-aware minimisation with separate aggregation of the loss and flatness
directions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mtlkit.core.engine import GradientEngine
from mtlkit.core.module_state import normalization_buffers, restore_buffers
from mtlkit.core.tasks import TaskLosses, TaskSet
from mtlkit.errors import ConfigError, DistributedError, NonFiniteLossError, TaskError
from mtlkit.methods.base import Hook, Method, StepInfo, StepInputs, add_gradients
from mtlkit.methods.gradient_methods import all_finite, gradient_statistics
from mtlkit.methods.hparams import boolean, hparam, instance_of, none, number
from mtlkit.methods.registry import register, register_variant
from mtlkit.methods.wrapping import WrapsMethod


@register("fmtl")
class FMTL(WrapsMethod):
    """F-MTL: task-based flat regions (Phan, Tran, Tran, Tran, Truong, Lei, Ho, Phung, Le,
    "Improving Multi-task Learning via Seeking Task-based Flat Regions", arXiv 2211.13723; ICCV
    2025 as "Beyond Losses Reweighting: Empowering Multi-Task Learning via the Generalization
    Perspective").

    One step, as in the official FS-MTL trainers:

    1. per-task gradients at the current weights (from the engine): ``g_k`` on the shared
       parameters and ``gh_k`` on task ``k``'s own parameters;
    2. for each task separately: move the shared parameters by ``e_k = rho T^2 g_k / ||T g_k||``
       and task ``k``'s parameters by ``rho T_k^2 gh_k / ||T_k gh_k||`` (``T = diag(|theta|)``
       with ``adaptive``, ASAM-style, else the identity; the two norms are taken separately),
       run the model on the same batch again (``closure``), take ``s_k``, task ``k``'s gradient
       of the shared parameters there, and its own parameters' gradient there (their update),
       then restore the weights;
    3. split ``s_k = g_k + h_k`` into the loss direction ``g_k`` and the flatness direction
       ``h_k = s_k - g_k``, and aggregate the two families separately with the same method:
       ``d = A(g_1..g_K) + A(h_1..h_K)`` on the shared parameters.

    ``A`` is any registered method (``base``, with ``base_options``), applied to the K vectors
    through the method's own ``backward`` on linear surrogate losses ``L_k + <g_k, v>`` at
    ``v = 0`` (so every base sees exactly the vectors and the loss values of the step); each
    family has its own copy of the base, so stateful bases (Nash-MTL, GradVac) keep one state per
    family. The registry variants ``fmtl_pcgrad``, ``fmtl_cagrad`` (c = 0.4) and ``fmtl_mgda``
    (unit-normalised families, ``d = K (sum lambda_k g_k/||g_k|| + sum mu_k h_k/||h_k||)``) are
    the official code's branches; ``fmtl`` wraps ``ew`` (per-task SAM, summed).

    Defaults are the official Multi-MNIST / Multi-Fashion setting (``rho = 0.05``, plain SAM);
    NYUv2, Cityscapes and CelebA use ``rho = 2`` with ``adaptive=True``. ``split=False`` is the
    paper's "a-" ablation (the base applied to the SAM gradients ``s_k`` directly), a baseline
    rather than the method. BatchNorm running statistics are updated by the clean forward pass
    only: the perturbed passes run with them saved and restored exactly (the official code sets
    the BatchNorm momentum to 0, which leaves ``num_batches_tracked`` counting; ours leaves every
    buffer as the clean pass left it). Tasks without a labelled sample are not perturbed and
    contribute nothing. Cost: K backward passes at the current point, then K forward and backward
    passes at K perturbed points, and the base run twice on K vectors.
    """

    engine: GradientEngine | None = hparam(
        None, instance_of(GradientEngine) | none(), "the gradient engine", config=False
    )
    rho: float = hparam(0.05, number(gt=0), "perturbation radius (official: 0.05 plain, 2 adaptive)")
    adaptive: bool = hparam(False, boolean(), "ASAM-style scale T = |theta| of the perturbation")
    split: bool = hparam(
        True, boolean(), "aggregate loss and flatness directions separately (False: the 'a-' ablation)"
    )
    needs_closure = True

    def _validate(self) -> None:
        probe = self.make_base()
        if probe.needs_setup:
            raise ConfigError(
                f"F-MTL's base {self.base!r} has its own parameters; F-MTL applies its base to "
                "vectors, so use an aggregator or a parameter-free weighting."
            )
        if Hook.AFTER_STEP in probe.hooks:
            raise ConfigError(
                f"F-MTL's base {self.base!r} updates its state from the losses after each step, which "
                "has no meaning for the flatness family; use another base."
            )
        if getattr(probe, "level", "parameter") != "parameter":
            raise ConfigError(
                f"F-MTL aggregates shared-parameter gradients; base {self.base!r} is set to "
                f"level={probe.level!r}. Use level='parameter'."
            )

    def _build(self, tasks: TaskSet) -> None:
        # child modules: their state (warm starts, EMAs) is saved with F-MTL's
        self.loss_part = self.make_base()
        if self.split:
            self.flat_part = self.make_base()
        self.setup_parts(tasks)

    def parts(self) -> list[Method]:
        return [m for m in (getattr(self, "loss_part", None), getattr(self, "flat_part", None)) if m]

    # -- the step ------------------------------------------------------------------------------
    def _engine(self) -> GradientEngine:
        if not isinstance(self.engine, GradientEngine):
            self.__dict__["engine"] = GradientEngine(strategy="loop")
        return self.engine  # type: ignore[return-value]

    def _step(self, inputs: StepInputs) -> StepInfo:
        if not inputs.knows_shared or not inputs.shared:
            raise TaskError("F-MTL needs the shared parameters: pass the model (or shared=) to backward().")
        assert inputs.closure is not None
        shared = inputs.shared
        parallel = inputs.parallel
        if parallel is not None and inputs.shares is None:
            raise DistributedError("F-MTL cannot run inside another method's step under DDP.")
        jac = self._engine().jacobian(inputs.values, shared, inputs.task_specific, names=inputs.names)
        if parallel is not None:  # the global gradients: every rank perturbs the same way
            parallel.average_(jac.shared_blocks())
            parallel.average_([grad for pairs in getattr(jac.heads, "grads", []) for _, grad in pairs])
        g = jac.rows().clone()  # K x d, scaled like the losses
        heads = jac.heads.params
        own: list[dict[int, Tensor]] = [{} for _ in inputs.names]  # task -> {head index: gradient}
        for i, pairs in enumerate(getattr(jac.heads, "grads", [])):  # the loop strategy keeps them
            for task, grad in pairs:
                own[task][i] = grad
        active = [k for k in range(len(inputs.names)) if bool(inputs.active[k])]
        sam = torch.zeros_like(g)
        sam_heads: dict[int, Tensor] = {}
        bn_state = normalization_buffers(inputs._model)
        saved = [p.detach().clone() for p in shared]
        saved_heads = {i: heads[i].detach().clone() for k in active for i in own[k]}
        try:
            for k in active:
                # from the unscaled gradients: the 1e-12 of the norms must not see a GradScaler's scale
                self._perturb(
                    shared,
                    g[k] / inputs.scale,
                    [heads[i] for i in own[k]],
                    [gr / inputs.scale for gr in own[k].values()],
                )
                losses, _ = inputs.closure()
                value = _task_loss(losses, inputs.names, k)
                if inputs.shares is not None:  # this rank's part of the global loss, as in the step
                    value = value * inputs.shares[k].to(value.dtype)
                targets = shared + [heads[i] for i in own[k]]
                grads = torch.autograd.grad(value, targets, allow_unused=True)
                offset = 0
                for p, gr in zip(shared, grads[: len(shared)], strict=True):
                    if gr is not None:
                        sam[k, offset : offset + p.numel()] = gr.reshape(-1)
                    offset += p.numel()
                for i, gr in zip(own[k], grads[len(shared) :], strict=True):
                    if gr is not None:
                        sam_heads[i] = gr if i not in sam_heads else sam_heads[i] + gr
                _restore(shared, saved, [heads[i] for i in own[k]], [saved_heads[i] for i in own[k]])
        finally:
            _restore(shared, saved, [heads[i] for i in saved_heads], list(saved_heads.values()))
            restore_buffers(bn_state)
        inputs.average_now([sam, *sam_heads.values()], [*shared, *(heads[i] for i in sam_heads)])
        if not all_finite(sam):
            raise NonFiniteLossError(
                "F-MTL: a gradient at a perturbed point is not finite; nothing was updated."
            )
        labelled = inputs.active.to(torch.int64)
        if self.split:
            d_loss, info = self._aggregate(self.loss_part, g, inputs, labelled)
            d_flat, flat_info = self._aggregate(self.flat_part, sam - g, inputs, labelled)
            direction = d_loss + d_flat
            extras = {"loss_weights": info.weights, "flat_weights": flat_info.weights}
        else:
            direction, info = self._aggregate(self.loss_part, sam, inputs, labelled)
            extras = {"sam_weights": info.weights}
        jac.write_shared_flat(direction)
        add_gradients((heads[i], grad) for i, grad in sam_heads.items())
        gram = (g.double() @ g.double().T) / inputs.scale**2
        norms, cos = gradient_statistics(gram)
        return StepInfo(
            inputs.names, None, inputs.losses, level="parameter", grad_norms=norms, cosines=cos, extras=extras
        )

    def _perturb(
        self, shared: list[Tensor], g: Tensor, heads: list[Tensor], head_grads: list[Tensor]
    ) -> None:
        """Move the shared parameters along ``g`` (flat) and the task's parameters along their
        own gradients, each to radius ``rho`` in its own (scaled) norm."""
        with torch.no_grad():
            flat_params = torch.cat([p.detach().reshape(-1) for p in shared]).to(g.dtype)
            step = _ascent(flat_params, g, self.rho, self.adaptive)
            offset = 0
            for p in shared:
                p.add_(step[offset : offset + p.numel()].view(p.shape).to(p.dtype))
                offset += p.numel()
            if heads:
                hp = torch.cat([p.detach().reshape(-1) for p in heads])
                hg = torch.cat([gr.reshape(-1).to(hp.dtype) for gr in head_grads])
                hstep = _ascent(hp, hg, self.rho, self.adaptive)
                offset = 0
                for p in heads:
                    p.add_(hstep[offset : offset + p.numel()].view(p.shape))
                    offset += p.numel()

    def _aggregate(
        self, part: Method, rows: Tensor, inputs: StepInputs, labelled: Tensor
    ) -> tuple[Tensor, StepInfo]:
        """The base's direction for the K vectors ``rows`` (scaled like the losses)."""
        v = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device, requires_grad=True)
        scaled = inputs.losses.to(rows.dtype) * inputs.scale
        surrogate = {
            n: (scaled[k] + rows[k] @ v) if bool(inputs.active[k]) else scaled[k]
            for k, n in enumerate(inputs.names)
        }
        info = part.backward(TaskLosses(surrogate, labelled), shared=[v], loss_scale=inputs.loss_scale)
        direction = v.grad if v.grad is not None else torch.zeros_like(v)
        return direction.detach(), info


def _ascent(params: Tensor, grad: Tensor, rho: float, adaptive: bool) -> Tensor:
    """``rho T^2 g / ||T g||`` with ``T = |theta|`` (adaptive) or the identity."""
    if adaptive:
        scale = params.abs()
        return rho * scale * scale * grad / (torch.linalg.vector_norm(scale * grad) + 1e-12)
    return rho * grad / (torch.linalg.vector_norm(grad) + 1e-12)


def _task_loss(losses: Any, names: list[str], k: int) -> Tensor:
    value = losses[names[k]] if isinstance(losses, Mapping) else list(losses)[k]
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteLossError(
            f"F-MTL: task {names[k]!r}'s loss at its perturbed point is not finite; nothing was updated. "
            "Lower rho."
        )
    return value.reshape(())


def _restore(
    shared: list[Tensor], saved: list[Tensor], heads: list[Tensor], saved_heads: list[Tensor]
) -> None:
    with torch.no_grad():
        for p, s in zip(shared + heads, saved + saved_heads, strict=True):
            p.copy_(s)


register_variant("fmtl_pcgrad", FMTL, base="pcgrad")
register_variant("fmtl_cagrad", FMTL, base="cagrad", base_options={"c": 0.4})
register_variant(
    "fmtl_mgda",
    FMTL,
    base="mgda",
    base_options={"normalization": "l2", "normalize_final": True, "scale": "num_tasks"},
)

"""EK-FAC: an eigenvalue-corrected Kronecker-factored Gauss-Newton approximation of the objective's
Hessian, one block per ``nn.Linear`` layer (George, Laurent, Bouthillier, Ballas, Vincent,
"Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018;
used for influence functions by Grosse et al., "Studying Large Language Model Generalization
with Influence Functions", 2023).

Per layer with inputs ``a`` (a 1 appended for the bias) and output gradients ``delta`` of one
training point's loss, the curvature is ``sum_p w_p (delta_p delta_p^T) (x) (a_p a_p^T)`` with
``w_p = 1 / N_l`` for a point of task ``l``: the factors' eigenbases ``Q_S``, ``Q_A`` come from
``E[delta delta^T]`` and ``E[a a^T]``, and the eigenvalues are replaced by the exact second
moments of the points' gradients in that basis. Output gradients are taken at targets sampled
from the model's own predictive distribution (Gaussian with variance 1/2 for ``mse``, Bernoulli
for ``bce``, categorical for ``ce``), so the factors estimate the Gauss-Newton matrix; other losses
use their true labels (the empirical Fisher). Named approximations: layers are independent
(including the shared and task-specific layers, whose coupling the exact solvers keep), a
model's ``regularization_loss`` is not representable (refused), and ``weight_decay`` adds to
every eigenvalue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtlkit.core.contract import forward_full
from mtlkit.core.tasks import CLASS_INDEX_LOSSES, Batch, Task
from mtlkit.errors import ConfigError
from mtlkit.relatedness.objective import TrainingObjective


@dataclass
class _Layer:
    module: nn.Linear
    weight: Tensor  # flat indices of the weight in w
    bias: Tensor | None
    q_a: Tensor | None = None
    q_s: Tensor | None = None
    eigen: Tensor | None = None


def _layers(objective: TrainingObjective, params: Sequence[nn.Parameter]) -> list[_Layer]:
    where = {id(p): index for p, index in zip(params, objective.flat_indices(), strict=True)}
    layers, used = [], set()
    for module in objective.model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in where:
            bias = where.get(id(module.bias)) if module.bias is not None else None
            layers.append(_Layer(module, where[id(module.weight)], bias))
            used |= {id(module.weight)} | ({id(module.bias)} if bias is not None else set())
    names = {id(p): n for n, p in objective.model.named_parameters()}
    other = [names[id(p)] for p in params if id(p) not in used]
    if other:
        raise ConfigError(
            f"EK-FAC covers nn.Linear layers (weight, with or without its bias); {other} are not. "
            "Restrict the influence parameters or use solver='cg'."
        )
    return layers


def _sampled_target(
    task: Task, pred: Tensor, target: Tensor, mask: Tensor | None, g: torch.Generator
) -> Tensor:
    pred, target = task.align(pred.detach(), target)
    valid = task.labelled_mask(target, mask)
    cpu = pred.cpu()  # sampled on the host with the seeded host generator, whatever the device
    if task.loss in CLASS_INDEX_LOSSES:
        probs = F.softmax(cpu.float(), dim=1).movedim(1, -1).reshape(-1, pred.shape[1])
        draw = torch.multinomial(probs, 1, generator=g).view(target.shape)
    elif task.loss == "bce":
        draw = torch.bernoulli(torch.sigmoid(cpu), generator=g)
    elif task.loss == "mse":
        draw = cpu + 0.5**0.5 * torch.randn(cpu.shape, generator=g, dtype=cpu.dtype)
    else:
        return target
    return torch.where(valid, draw.to(device=target.device, dtype=target.dtype), target)


class EKFAC:
    """The factorisation of the objective's curvature over ``params`` (all in ``Linear`` layers)."""

    def __init__(self, objective: TrainingObjective, params: Sequence[nn.Parameter], seed: int = 0) -> None:
        if objective.penalty is not None:
            raise ConfigError(
                "EK-FAC cannot represent the model's regularization_loss; use solver='cg' or 'exact'."
            )
        self.objective = objective
        self.layers = _layers(objective, params)
        self.seed = seed
        moments = self._collect(first=True)
        for layer, (a, s) in zip(self.layers, moments, strict=True):
            layer.q_a = torch.linalg.eigh(a)[1]
            layer.q_s = torch.linalg.eigh(s)[1]
        for layer, (eigen, _) in zip(self.layers, self._collect(first=False), strict=True):
            layer.eigen = eigen

    def _collect(self, first: bool) -> list[tuple[Tensor, Tensor]]:
        """First pass: the weighted factors ``E[a a^T]``, ``E[delta delta^T]``; second pass: the
        corrected eigenvalues (returned in the first slot)."""
        obj = self.objective
        g = torch.Generator().manual_seed(self.seed)
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}

        def keep(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if args[0].dim() != 2:
                raise ConfigError("EK-FAC here takes Linear layers applied to (batch, features) inputs.")
            if id(module) in inputs:
                raise ConfigError(
                    "EK-FAC needs each Linear layer applied once per forward pass; one is reused."
                )
            inputs[id(module)] = args[0].detach()
            outputs[id(module)] = out

        hooks = [layer.module.register_forward_hook(keep) for layer in self.layers]
        totals: list[list[Tensor]] = []
        try:
            for batch in obj.batches():
                self._batch(batch, g, inputs, outputs, totals, first)
        finally:
            for h in hooks:
                h.remove()
        return [(t[0], t[1]) for t in totals]

    def _batch(
        self,
        batch: Batch,
        g: torch.Generator,
        inputs: dict[int, Tensor],
        outputs: dict[int, Tensor],
        totals: list[list[Tensor]],
        first: bool,
    ) -> None:
        obj = self.objective
        inputs.clear()
        outputs.clear()
        with torch.enable_grad():
            preds = forward_full(obj.model, batch.inputs).predictions
            for l_index, task in enumerate(obj.tasks):
                mask = batch.masks.get(task.name) if batch.masks else None
                target = batch.targets[task.target_key]
                sampled = _sampled_target(task, preds[task.name], target, mask, g)
                sums, counts = task.sample_losses(preds[task.name], sampled, mask)
                weights = (counts > 0).to(sums.dtype) / float(obj.counts[l_index])
                outs = [outputs[id(layer.module)] for layer in self.layers]
                grads = torch.autograd.grad(sums.sum(), outs, retain_graph=True, allow_unused=True)
                for i, (layer, delta) in enumerate(zip(self.layers, grads, strict=True)):
                    a = inputs[id(layer.module)]
                    if layer.bias is not None:
                        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                    d = delta if delta is not None else a.new_zeros(a.shape[0], layer.module.out_features)
                    if first:  # a point counts in a layer's input factor only if the layer serves it
                        wa = weights * (d.abs().sum(1) > 0).to(weights.dtype)
                        parts = [(a * wa[:, None]).t() @ a, (d * weights[:, None]).t() @ d]
                    else:
                        assert layer.q_a is not None and layer.q_s is not None
                        pa, ps = (a @ layer.q_a).pow(2), (d @ layer.q_s).pow(2)
                        parts = [(ps * weights[:, None]).t() @ pa, ps.new_zeros(())]
                    if len(totals) <= i:
                        totals.append(parts)
                    else:
                        totals[i] = [t + p for t, p in zip(totals[i], parts, strict=True)]

    def mean_eigenvalue(self) -> float:
        values = torch.cat([layer.eigen.reshape(-1) for layer in self.layers if layer.eigen is not None])
        return float(values.mean())

    def solve(self, b: Tensor, damping: float) -> Tensor:
        """``(G + (damping + weight_decay) I)^{-1} b`` for every row of ``b`` (m, P)."""
        x = torch.zeros_like(b)
        shift = damping + self.objective.weight_decay
        for layer in self.layers:
            assert layer.q_a is not None and layer.q_s is not None and layer.eigen is not None
            out, inp = layer.module.out_features, layer.module.in_features
            v = b[:, layer.weight].view(-1, out, inp)
            if layer.bias is not None:
                v = torch.cat([v, b[:, layer.bias].view(-1, out, 1)], dim=2)
            rotated = layer.q_s.t() @ v @ layer.q_a
            solved = layer.q_s @ (rotated / (layer.eigen + shift)) @ layer.q_a.t()
            x[:, layer.weight] = solved[:, :, :inp].reshape(b.shape[0], -1)
            if layer.bias is not None:
                x[:, layer.bias] = solved[:, :, inp]
        return x

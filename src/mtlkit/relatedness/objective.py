"""The multi-task training objective as a function of a chosen set of parameters, for influence
functions: Hessian-vector products, per-task validation gradients and per-sample gradient dot
products, all through ``torch.func`` on the unchanged model.

``L(w) = sum_l S_l(w) / N_l + R(w) + (weight_decay / 2) ||w||^2``, where ``S_l`` sums task ``l``'s
loss over its labelled training entries and ``N_l`` counts them (each task's loss is its mean,
as in training), and ``R`` is the model's own ``regularization_loss()`` when it defines one (the
soft-sharing coupling penalty). Parameters outside ``w`` stay fixed.

The curvature is the Hessian, or (``curvature="gauss_newton"``) the generalised Gauss-Newton
matrix of the data term (the Hessian of the losses with respect to the predictions, pulled back
through the network's Jacobian; positive semi-definite for convex losses, the usual choice for
non-convex networks), plus the regulariser's Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.utils.data import DataLoader, SequentialSampler

from mtlkit.core.contract import supports_full_output, task_parameters, unwrap
from mtlkit.core.tasks import Batch, TaskSet, unpack_batch
from mtlkit.errors import ConfigError
from mtlkit.train.batches import move_to

PARAMETER_CHOICES = ("all", "last")
CURVATURES = ("hessian", "gauss_newton")


def influence_parameters(model: nn.Module, parameters: str | Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """``"all"`` (every trainable parameter), ``"last"`` (the last shared layer and every
    task-specific parameter: the usual restriction for deep models) or an explicit list."""
    inner = unwrap(model)
    if isinstance(parameters, str):
        if parameters == "all":
            return [p for p in inner.parameters() if p.requires_grad]
        if parameters == "last":
            last = getattr(inner, "last_shared_parameters", None)
            specific = task_parameters(inner)
            if not callable(last) or specific is None:
                raise ConfigError(
                    "parameters='last' needs a model with last_shared_parameters() and task_parameters() "
                    "(an mtlkit MultiTaskModule); pass the parameters as a list instead."
                )
            chosen = list(last()) + [p for ps in specific.values() for p in ps]
            return [p for p in dict.fromkeys(chosen) if p.requires_grad]
        raise ConfigError(
            f"parameters must be one of {PARAMETER_CHOICES} or a list of parameters, got {parameters!r}."
        )
    chosen = list(dict.fromkeys(parameters))
    owned = {id(p) for p in inner.parameters()}
    if not chosen or any(id(p) not in owned for p in chosen):
        raise ConfigError("parameters must be a non-empty list of the model's own parameters.")
    return chosen


def reiterable_batches(data: Any, what: str) -> Any:
    """A loader that yields the same batches in the same order each time it is iterated (points
    are identified by their position)."""
    if isinstance(data, DataLoader) and not isinstance(data.sampler, SequentialSampler):
        raise ConfigError(
            f"The {what} loader shuffles: influence scores identify points by position; use shuffle=False."
        )
    if iter(data) is data:
        raise ConfigError(f"The {what} data is a one-shot iterator; pass a loader or a list of batches.")
    return data


class _Penalty(nn.Module):
    """Calls the model's ``regularization_loss()`` under ``functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self) -> Tensor:
        return self.model.regularization_loss()  # type: ignore[operator]


class TrainingObjective:
    """The objective over ``params`` (flat vector ``w``), evaluated on ``train`` (re-iterable
    batches in a fixed order). The model must be in eval mode while it is used."""

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSet,
        train: Iterable[Any],
        params: Sequence[nn.Parameter],
        weight_decay: float = 0.0,
        curvature: str = "hessian",
    ) -> None:
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if curvature not in CURVATURES:
            raise ConfigError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
        self.curvature = curvature
        self.model, self.tasks, self.train = unwrap(model), tasks, reiterable_batches(train, "training")
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.names = [names[id(p)] for p in params]
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.w = torch.cat([p.detach().reshape(-1) for p in params])
        self.weight_decay = float(weight_decay)
        self.penalty = (
            _Penalty(self.model) if callable(getattr(self.model, "regularization_loss", None)) else None
        )
        self.full = supports_full_output(self.model)
        self.counts = self._entry_counts()

    @property
    def dim(self) -> int:
        return int(self.w.numel())

    def flat_indices(self) -> list[Tensor]:
        """Each parameter's positions in the flat vector ``w``, in parameter order."""
        ends = torch.tensor(self.sizes).cumsum(0).tolist()
        return [torch.arange(end - size, end) for end, size in zip(ends, self.sizes, strict=True)]

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, w.split(self.sizes), self.shapes, strict=True)}

    def predictions(self, w: Tensor, inputs: Any) -> dict[str, Tensor]:
        kwargs = {"full_output": True} if self.full else {}
        out = functional_call(self.model, self.unflatten(w), (inputs,), kwargs, strict=False)
        return dict(out.predictions if self.full else out)

    def sample_losses(self, w: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per task and sample, the summed loss over labelled entries and their count: (K, B)."""
        return self.losses_of(self.predictions(w, batch.inputs), batch)

    def losses_of(self, preds: Mapping[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor]:
        """:meth:`sample_losses` from given predictions."""
        sums, counts = [], []
        for t in self.tasks:
            mask = batch.masks.get(t.name) if batch.masks else None
            s, c = t.sample_losses(preds[t.name], batch.targets[t.target_key], mask)
            sums.append(s)
            counts.append(c)
        return torch.stack(sums), torch.stack(counts)

    def batches(self) -> Iterable[Batch]:
        return self._ordinary(self.train)

    def _ordinary(self, data: Iterable[Any]) -> Iterable[Batch]:
        """The data's batches as ``Batch`` objects on the parameters' device."""
        for raw in data:
            batch = unpack_batch(raw)
            if not isinstance(batch, Batch):
                raise ConfigError("Influence scores take ordinary batches (every task on the same inputs).")
            yield move_to(batch, self.w.device)

    def _entry_counts(self) -> Tensor:
        total = None
        with torch.no_grad():
            for batch in self.batches():
                _, c = self.sample_losses(self.w, batch)
                total = c.sum(1) if total is None else total + c.sum(1)
        return self._check_totals(total, "training")

    def _check_totals(self, total: Tensor | None, what: str) -> Tensor:
        """Each task's labelled entries over some data, refused when the data or a task is empty."""
        if total is None:
            raise ConfigError(f"The {what} data is empty.")
        if bool((total == 0).any()):
            empty = [t for t, n in zip(self.tasks.names, total.tolist(), strict=True) if n == 0]
            raise ConfigError(f"Task(s) {empty} have no labelled entry in the {what} data.")
        return total

    def regularizer(self, w: Tensor) -> Tensor:
        value = 0.5 * self.weight_decay * w.pow(2).sum()
        if self.penalty is not None:
            value = value + functional_call(
                self.penalty, {f"model.{k}": v for k, v in self.unflatten(w).items()}, ()
            )
        return value

    def data_share(self, sums: Tensor) -> Tensor:
        """A batch's share of the data term, ``sum_l S_l^batch / N_l``, from its per-sample sums."""
        return (sums.sum(1) / self.counts.to(sums.dtype)).sum()

    def hvp(self, vectors: Tensor) -> Tensor:
        """The curvature times each row of ``vectors`` (m, P): one pass over the data."""
        total = self._batch_hvp(self.regularizer, vectors)
        for batch in self.batches():
            total += self._data_product(batch, vectors)
        return total

    def stochastic_hvp(self, batch: Batch, batches: int, vectors: Tensor) -> Tensor:
        """An unbiased estimate of :meth:`hvp` from one of the ``batches`` training batches drawn
        uniformly: its share of the objective times ``batches``, plus the regulariser's term."""
        return batches * self._data_product(batch, vectors) + self._batch_hvp(self.regularizer, vectors)

    def _data_product(self, batch: Batch, vectors: Tensor) -> Tensor:
        with torch.no_grad():  # torch.func differentiates anyway; no graph over the fixed parameters
            if self.curvature == "hessian":
                return self._batch_hvp(lambda w: self.data_share(self.sample_losses(w, batch)[0]), vectors)
            return self._batch_gnvp(batch, vectors)

    def _batch_hvp(self, f: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        # reverse over reverse: PyTorch has no forward-mode derivative of some losses' backward
        # (huber), and the Hessian is symmetric, so the vector-Jacobian product of the gradient is H v
        with torch.no_grad():
            _, pull = vjp(grad(f), self.w)  # type: ignore[misc]
            return vmap(lambda v: pull(v)[0])(vectors)

    def _batch_gnvp(self, batch: Batch, vectors: Tensor) -> Tensor:
        """``J^T H_out J v``: the Gauss-Newton product, with ``H_out`` the Hessian of the batch's
        share of the objective with respect to the predictions (positive semi-definite for mse,
        bce and ce, so conjugate gradient never meets negative curvature)."""

        def outputs(w: Tensor) -> dict[str, Tensor]:
            return self.predictions(w, batch.inputs)

        def loss(preds: dict[str, Tensor]) -> Tensor:
            return self.data_share(self.losses_of(preds, batch)[0])

        preds, pullback = vjp(outputs, self.w)  # type: ignore[misc]
        _, out_hessian = vjp(grad(loss), preds)  # type: ignore[misc]  # H_out is symmetric

        def product(v: Tensor) -> Tensor:
            jv = jvp(outputs, (self.w,), (v,))[1]
            return pullback(out_hessian(jv)[0])[0]

        return vmap(product)(vectors)

    def point_products(self, directions: Tensor) -> tuple[Tensor, Tensor]:
        """For each training sample ``i``, source task ``l`` and direction ``u_k`` (rows of
        ``directions``), ``u_k . grad s_li``: (N, K, m), and the entry counts (N, K)."""
        products, counts = [], []
        for batch in self.batches():
            fn = lambda w, batch=batch: self.sample_losses(w, batch)  # noqa: E731
            with torch.no_grad():  # (m, K, B) tangents; the counts ride along as jvp's aux output
                _, tangents, c = vmap(lambda u, fn=fn: jvp(fn, (self.w,), (u,), has_aux=True))(directions)  # type: ignore[misc]
            products.append(tangents.permute(2, 1, 0).detach())
            counts.append(c[0].t())
        return torch.cat(products), torch.cat(counts)

    def task_gradients(self, data: Iterable[Any], what: str) -> Tensor:
        """Each task's mean-loss gradient over ``data`` (K, P)."""
        total, counts = None, None
        for batch in self._ordinary(reiterable_batches(data, what)):
            with torch.no_grad():  # the counts ride along as jacrev's aux output
                jac, c = jacrev(lambda w, batch=batch: self._summed(w, batch), has_aux=True)(self.w)
            total = jac if total is None else total + jac
            counts = c.sum(1) if counts is None else counts + c.sum(1)
        counts = self._check_totals(counts, what)
        assert total is not None
        return total.detach() / counts.to(total.dtype).unsqueeze(1)

    def _summed(self, w: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        sums, counts = self.sample_losses(w, batch)
        return sums.sum(1), counts

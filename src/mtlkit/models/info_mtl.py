"""InfoMTL-style information-theoretic multi-task learning: shared-information maximisation and
task-specific information minimisation around a shared encoder."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import ConfigError, ShapeMismatchError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register, resolve_out_features


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-row ``KL(N(mu, diag(exp(logvar))) || N(0, I))``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def info_nce(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """InfoNCE between two views (B, d): row i of ``a`` against all rows of ``b``, positive on the
    diagonal (cosine similarities over ``tau``; a lower bound on the mutual information up to
    ``log B``)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


@register("info_mtl")
class InfoMTL(MultiTaskModule):
    """InfoMTL (Hu, Wei, Zhou, Hu, "An Information-theoretic Multi-task Representation Learning
    Framework for Natural Language Understanding", AAAI 2025), as a reconstruction around any
    shared encoder of feature vectors:

    - SIMax, shared-information maximisation: the task heads' likelihoods keep ``I(Y_t; Z)``
      (the usual task losses), and ``alpha * InfoNCE(Z, Z')`` between two dropout views of the
      shared representation keeps ``I(X; Z)`` (SimCSE-style, temperature ``tau``);
    - TIMin, task-specific information minimisation: each task reads a stochastic
      ``Z_t ~ N(mu_t(Z), diag sigma_t(Z)^2)`` (reparameterised; ``mu_t`` at evaluation) and pays
      ``beta * KL(q(Z_t | Z) || N(0, I))``, an upper bound on ``I(Z; Z_t)``.

    Both regularisers are auxiliary losses of the model contract (weight 1 in every method's
    update, outside the task weighting), present in training mode only. The compression term of
    task ``t`` averages over the samples labelled for ``t`` when the batch says which (wrap the
    loader with :func:`mtlkit.data.with_label_masks`); given a bare tensor every sample counts.

    **Reconstruction.** No code for InfoMTL is public and the paper's exact estimators were not
    available; the estimators above (cross-entropy for the target relevance, InfoNCE over two
    dropout views for the input relevance, a Gaussian KL for the compression) follow the
    project's spec's reading of the paper's principles, and the defaults (alpha 0.1, beta 1e-3,
    tau 0.1, a 32-wide task latent) are starting values, not the paper's. A negative ``alpha``
    turns the input term into a shared-level bottleneck, the principle InfoMTL argues against
    (useful as a control).

    Args:
        in_features: input width.
        tasks: the task set (or names).
        encoder_dims: hidden widths of the shared encoder (its output is the representation).
        latent_dim: width of each task's stochastic representation.
        out_features: outputs per task (1, C, or a map).
        alpha, beta, tau: the weights of the two principles and the InfoNCE temperature.
        dropout: the encoder's dropout (the two views differ by their dropout masks; must be > 0
            when ``alpha != 0``).
    """

    def __init__(
        self,
        in_features: int,
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        encoder_dims: Sequence[int] = (128, 64),
        latent_dim: int = 32,
        out_features: int | Mapping[str, int] = 1,
        alpha: float = 0.1,
        beta: float = 1e-3,
        tau: float = 0.1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(tasks)
        if alpha != 0 and dropout <= 0:
            raise ConfigError("InfoMTL's input-relevance term compares two dropout views: set dropout > 0.")
        if beta < 0 or tau <= 0:
            raise ConfigError(f"InfoMTL needs beta >= 0 and tau > 0, got beta={beta}, tau={tau}.")
        self.in_features = in_features
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)
        self.encoder = mlp(in_features, encoder_dims, dropout=dropout)
        width = encoder_dims[-1] if encoder_dims else in_features
        outs = resolve_out_features(self.task_names, out_features)
        self.posteriors = nn.ModuleDict({t: nn.Linear(width, 2 * latent_dim) for t in self.task_names})
        self.classifiers = nn.ModuleDict({t: nn.Linear(latent_dim, outs[t]) for t in self.task_names})

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.encoder]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.posteriors[task], self.classifiers[task]]

    def forward_tasks(self, x: Any, tasks: list[str]) -> MultiTaskOutput:
        inputs, labelled = (x["x"], x.get("labelled")) if isinstance(x, Mapping) else (x, None)
        if not isinstance(inputs, Tensor) or inputs.shape[-1] != self.in_features:
            raise ShapeMismatchError(f"InfoMTL expects inputs (B, {self.in_features}).")
        z = self.encoder(inputs)
        predictions: dict[str, Tensor] = {}
        aux: dict[str, Tensor] = {}
        for t in tasks:
            mu, logvar = self.posteriors[t](z).chunk(2, dim=-1)
            logvar = logvar.clamp(-10.0, 10.0)
            if self.training:
                sample = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
                predictions[t] = self.classifiers[t](sample)
                if self.beta:
                    kl = gaussian_kl(mu, logvar)
                    mask = labelled.get(t) if labelled is not None else None
                    if mask is not None:
                        mask = mask.to(kl.dtype)
                        kl = (kl * mask).sum() / mask.sum().clamp_min(1.0)
                    else:
                        kl = kl.mean()
                    aux[f"compression/{t}"] = self.beta * kl
            else:
                predictions[t] = self.classifiers[t](mu)
        if self.training and self.alpha:
            aux["input_relevance"] = self.alpha * info_nce(z, self.encoder(inputs), self.tau)
        return MultiTaskOutput(predictions, z, aux or None)

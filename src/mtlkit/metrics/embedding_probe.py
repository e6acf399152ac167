"""Evaluating frozen node embeddings, as ParetoGNN does after pretraining: a linear probe for node
classification and dot-product scores for link prediction."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import Tensor


def linear_probe_accuracy(
    embeddings: Tensor, labels: Tensor, train: Tensor, test: Tensor, max_iter: int = 2000
) -> float:
    """Test accuracy of an L2-regularised logistic regression (scikit-learn, default ``C = 1``)
    fitted on the standardised embeddings of the ``train`` nodes."""
    raw = embeddings.detach().double()
    mean, std = raw[train].mean(0), raw[train].std(0).clamp_min(1e-12)
    z = ((raw - mean) / std).numpy()
    y = labels.numpy()
    probe = LogisticRegression(max_iter=max_iter)
    probe.fit(z[train.numpy()], y[train.numpy()])
    return float((probe.predict(z[test.numpy()]) == y[test.numpy()]).mean())


def link_auc(embeddings: Tensor, positive: Tensor, negative: Tensor) -> float:
    """ROC AUC of the dot-product scores of held-out edges (2, P) against non-edges (2, N)."""
    z = embeddings.detach().double()
    score = lambda pairs: (z[pairs[0]] * z[pairs[1]]).sum(-1)  # noqa: E731
    scores = torch.cat([score(positive), score(negative)]).numpy()
    truth = np.concatenate([np.ones(positive.shape[1]), np.zeros(negative.shape[1])])
    return float(roc_auc_score(truth, scores))

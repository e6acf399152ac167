"""What the conversion-funnel models (ESMM, AITM) share: their task checks and the logit of a
product of probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import TaskError


def check_funnel_tasks(
    tasks: TaskSet | Sequence[Task] | Sequence[str],
    out_features: int | Mapping[str, int],
    model: str,
    least: int = 2,
    most: int | None = None,
) -> None:
    """Funnel tasks are binary (one logit each, trained with ``bce``) and ordered from the first
    step (impression -> click) to the last."""
    items = list(tasks)
    if len(items) < least or (most is not None and len(items) > most):
        count = f"exactly {least}" if most == least else f"at least {least}"
        raise TaskError(
            f"{model} needs {count} funnel tasks in order (e.g. click, conversion), got {len(items)}."
        )
    for t in items:
        if isinstance(t, Task) and t.loss != "bce":
            raise TaskError(
                f"{model}: funnel task {t.name!r} must be binary with loss='bce', got {t.loss!r}."
            )
    outs = out_features.values() if isinstance(out_features, Mapping) else [out_features]
    if any(int(o) != 1 for o in outs):
        raise TaskError(
            f"{model}: every funnel task has one output (a logit); got out_features={out_features}."
        )


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """``logit(sigmoid(a) * sigmoid(b))`` in log space, exact and finite for any logits:
    ``log p = logsigmoid(a) + logsigmoid(b)`` and, since ``1 - p = sigmoid(-a) + sigmoid(a)
    sigmoid(-b)``, ``log(1 - p) = logaddexp(logsigmoid(-a), logsigmoid(a) + logsigmoid(-b))``."""
    log_a, log_b = F.logsigmoid(a), F.logsigmoid(b)
    log_1mp = torch.logaddexp(F.logsigmoid(-a), log_a + F.logsigmoid(-b))
    return log_a + log_b - log_1mp

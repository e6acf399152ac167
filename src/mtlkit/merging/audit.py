"""Transfer-attack audits of merged models ("Merge Now, Regret Later", Gangwal & Sharma, arXiv
2509.23689, 2025): adversarial images crafted on each task's expert (the surrogate an attacker
can get) and shown to every merged model.

For each task, attack and budget, :func:`transfer_audit` crafts the images once on the surrogate
and reports, per target: clean accuracy, the attack's success on the target (the share of images
the target classified correctly that it now gets wrong) and the *relative transfer success*, that
success over the surrogate's own white-box success. :func:`representation_bias` is the mean L1
distance between a merged backbone's features and the expert's on the task's images (Yang et al.,
"Representation Surgery for Multi-Task Model Merging", ICML 2024), the quantity the paper's second
insight is about.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.merging.attacks import ATTACKS, attack, correct, fooled_share

Model = Callable[[Tensor], Tensor]


def transfer_audit(
    surrogates: Mapping[str, Model],
    targets: Mapping[str, Mapping[str, Model]],
    data: Mapping[str, tuple[Tensor, Tensor]],
    attacks: Sequence[str] = tuple(ATTACKS),
    budgets: Sequence[float] = (4 / 255, 8 / 255),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per target, task, attack and budget.

    Args:
        surrogates: per task, the model the attack is crafted on (images -> that task's logits).
        targets: per target label (a merging method), per task, the model attacked by transfer.
        data: per task, the images (values in [0, 1]) and labels to attack.
    """
    if not surrogates:
        raise ConfigError("transfer_audit needs at least one task.")
    missing = [t for t in surrogates if t not in data]
    if missing:
        raise ConfigError(f"transfer_audit: no data for task(s) {missing}.")
    for label, models in targets.items():
        lacking = [t for t in surrogates if t not in models]
        if lacking:
            raise ConfigError(f"transfer_audit: target {label!r} has no model for task(s) {lacking}.")
    rows = []
    for task, surrogate in surrogates.items():
        x, y = data[task]
        # clean predictions once per model and task, not once per attack and budget
        surrogate_right = correct(surrogate, x, y)
        right = {label: correct(models[task], x, y) for label, models in targets.items()}
        for name in attacks:
            for eps in budgets:
                adversarial = attack(name, surrogate, x, y, eps, seed=seed)
                white_box = fooled_share(surrogate, adversarial, y, surrogate_right)
                for label, models in targets.items():
                    transfer = fooled_share(models[task], adversarial, y, right[label])
                    relative = (
                        transfer / white_box if white_box and not math.isnan(white_box) else float("nan")
                    )
                    rows.append(
                        {
                            "target": label,
                            "task": task,
                            "attack": name,
                            "eps": eps,
                            "clean_accuracy": float(right[label].float().mean()),
                            "surrogate_success": white_box,
                            "transfer_success": transfer,
                            "relative_transfer": relative,
                        }
                    )
    return rows


@torch.no_grad()
def representation_bias(merged: Model, expert: Model, x: Tensor) -> float:
    """The mean over images and features of ``|f_merged(x) - f_expert(x)|``."""
    return float((merged(x) - expert(x)).abs().mean())


def summarise(rows: Sequence[Mapping[str, Any]], key: str = "relative_transfer") -> dict[str, float]:
    """Per target, the mean of ``key`` over tasks, attacks and budgets (``nan`` rows skipped)."""
    out: dict[str, list[float]] = {}
    for row in rows:
        value = float(row[key])
        if not math.isnan(value):
            out.setdefault(str(row["target"]), []).append(value)
    return {label: sum(v) / len(v) for label, v in out.items()}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 3:
        raise ConfigError("spearman needs two sequences of the same length, at least 3.")

    def ranks(values: Sequence[float]) -> Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties: the mean of their ranks
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")

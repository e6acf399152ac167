"""Evaluation reports: per-task metrics, mean losses and Δm% against single-task baselines."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlkit.errors import TaskError
from mtlkit.metrics import delta_m, per_task_delta


@dataclass
class EvaluationReport:
    """Result of :meth:`mtlkit.train.Trainer.evaluate`.

    Attributes:
        metrics: ``{task: {metric: value}}`` over labelled samples.
        directions: ``{task: {metric: higher_is_better}}``.
        losses: ``{task: mean loss over labelled samples}``.
        labelled: ``{task: number of labelled samples}``.
        delta_m: Δm% against ``reference`` (positive = better; Maninis et al., CVPR 2019), if given.
        per_task_delta: the per-task relative changes (%) that Δm averages.
    """

    metrics: dict[str, dict[str, float]]
    directions: dict[str, dict[str, bool]]
    losses: dict[str, float] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)
    delta_m: float | None = None
    per_task_delta: dict[str, float] | None = None

    def with_reference(
        self, reference: EvaluationReport | Mapping[str, Mapping[str, float]]
    ) -> EvaluationReport:
        """This report with Δm% computed against ``reference`` (a report or ``{task: {metric: v}}``)."""
        ref = reference.metrics if isinstance(reference, EvaluationReport) else reference
        self.per_task_delta = per_task_delta(self.metrics, ref, self.directions)
        self.delta_m = delta_m(self.metrics, ref, self.directions)
        return self

    def flat(self, prefix: str = "") -> dict[str, float]:
        """``{"task/metric": value, "task/loss": value, "delta_m": value}`` for logs."""
        out = {f"{prefix}{t}/{m}": v for t, ms in self.metrics.items() for m, v in ms.items()}
        out.update({f"{prefix}{t}/loss": v for t, v in self.losses.items()})
        if self.delta_m is not None:
            out[f"{prefix}delta_m"] = self.delta_m
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "directions": self.directions,
            "losses": self.losses,
            "labelled": self.labelled,
            "delta_m": self.delta_m,
            "per_task_delta": self.per_task_delta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        try:
            return cls(
                metrics={t: dict(m) for t, m in data["metrics"].items()},
                directions={t: dict(m) for t, m in data["directions"].items()},
                losses=dict(data.get("losses", {})),
                labelled=dict(data.get("labelled", {})),
                delta_m=data.get("delta_m"),
                per_task_delta=data.get("per_task_delta"),
            )
        except (KeyError, AttributeError, TypeError) as exc:
            raise TaskError(f"Not an mtlkit evaluation report: missing or malformed {exc}.") from exc

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def merge(cls, reports: Iterable[EvaluationReport]) -> EvaluationReport:
        """One report from several (e.g. the single-task baselines, one task each)."""
        merged = cls(metrics={}, directions={})
        for r in reports:
            overlap = set(merged.metrics) & set(r.metrics)
            if overlap:
                raise TaskError(f"Cannot merge reports that both contain task(s) {sorted(overlap)}.")
            merged.metrics.update(r.metrics)
            merged.directions.update(r.directions)
            merged.losses.update(r.losses)
            merged.labelled.update(r.labelled)
        return merged

    def __str__(self) -> str:
        lines = []
        for t, ms in self.metrics.items():
            vals = ", ".join(f"{m}={v:.4f}" for m, v in ms.items())
            loss = self.losses.get(t, math.nan)
            delta = (
                f", Δ={self.per_task_delta[t]:+.2f}%"
                if self.per_task_delta and t in self.per_task_delta
                else ""
            )
            lines.append(f"{t}: {vals}, loss={loss:.4f}{delta}")
        if self.delta_m is not None:
            lines.append(f"Δm% = {self.delta_m:+.3f} (positive = better than single-task)")
        return "\n".join(lines)

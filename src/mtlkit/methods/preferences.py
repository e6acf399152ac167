"""The preference-aware methods' interface: a preference over the tasks, settable per step.

Preference-aware methods (COSMOS, EPO, linear scalarisation) keep the preference in a buffer and
take a new one through ``set_preference``; the vectors themselves come from
:mod:`mtlkit.core.preferences`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from mtlkit.core.preferences import check_preference, circle_rays, dirichlet, simplex_lattice
from mtlkit.methods.hparams import hparam, none, number, numbers

__all__ = [
    "HasPreference",
    "PreferenceMethod",
    "check_preference",
    "circle_rays",
    "dirichlet",
    "simplex_lattice",
]


@runtime_checkable
class PreferenceMethod(Protocol):
    """A method whose update depends on a preference over the tasks, settable per step."""

    def set_preference(self, preference: Tensor | list[float]) -> None: ...


class HasPreference:
    """Mixin of the preference-aware methods: the preference lives in the buffer
    ``preference_vector`` (saved with the method's state, so a resumed run keeps it), starts at the
    ``preference`` hyper-parameter declared here once for all of them (uniform when ``None``) and is
    changed by :meth:`set_preference`."""

    preference: list[float] | None = hparam(
        None,
        numbers(number(ge=0)) | none(),
        "preference r_k >= 0 per task (normalised to sum 1; default uniform)",
    )
    preference_vector: Tensor

    def _build_preference(self, tasks: int) -> None:
        r = torch.full((tasks,), 1.0 / tasks, dtype=torch.float64)
        if self.preference is not None:
            r = check_preference(list(self.preference), tasks=tasks)
        self.register_buffer("preference_vector", r)  # type: ignore[attr-defined]

    def set_preference(self, preference: Tensor | list[float]) -> None:
        """Use ``preference`` (one non-negative entry per task, normalised to sum 1) from the next
        step on."""
        r = check_preference(preference, tasks=len(self.preference_vector))
        self.preference_vector.copy_(r.to(self.preference_vector.device))

    def active_preference(self, active_index: Tensor | None) -> Tensor:
        """The preference of the tasks at ``active_index`` (all when ``None``), renormalised."""
        r = self.preference_vector
        if active_index is not None:
            r = r[active_index.to(r.device)]
        return r / r.sum()

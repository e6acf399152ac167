"""The front-learning approaches: how each builds its model(s), its loss and its preferences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtlkit.errors import unknown_name


@dataclass(frozen=True)
class Approach:
    """A way to learn a front.

    Attributes:
        name: the registry name.
        method: the multi-task method that makes the loss (``cosmos``, ``ls``, ``epo``, ``pmtl``).
        model: the preference-conditioned wrapper of the user's model (``preference_conditioned``
            or ``pareto_hypernetwork``), or ``None`` for one plain model per preference.
        alpha: the Dirichlet concentration of the per-step preferences (conditioned approaches).
        method_options: the method's options (official defaults).
        paper: the citation.
    """

    name: str
    method: str
    model: str | None
    alpha: float | None
    paper: str
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def conditioned(self) -> bool:
        """One model for the whole front (True) or one model per preference (False)."""
        return self.model is not None


APPROACHES: dict[str, Approach] = {
    a.name: a
    for a in [
        Approach(
            "cosmos",
            "cosmos",
            "preference_conditioned",
            1.2,
            "Ruchte & Grabocka, ICDM 2021",
            {"penalty": 2.0},
        ),
        Approach("phn_ls", "ls", "pareto_hypernetwork", 0.2, "Navon et al., ICLR 2021 (PHN-LS)"),
        Approach("phn_epo", "epo", "pareto_hypernetwork", 0.2, "Navon et al., ICLR 2021 (PHN-EPO)"),
        Approach("ls", "ls", None, None, "linear scalarisation, one model per preference"),
        Approach("epo", "epo", None, None, "Mahapatra & Rajan, ICML 2020, one model per preference"),
        Approach("pmtl", "pmtl", None, None, "Lin et al., NeurIPS 2019, one model per preference"),
    ]
}


def get_approach(name: str) -> Approach:
    if name not in APPROACHES:
        raise unknown_name("front approach", name, list(APPROACHES))
    return APPROACHES[name]

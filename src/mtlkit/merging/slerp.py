"""SLERP: spherical interpolation between two models."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from mtlkit.errors import ConfigError
from mtlkit.merging.base import Merger, check_fraction, register

#: above this cosine the two tensors are treated as parallel and interpolated linearly (mergekit's)
PARALLEL = 0.9995


@register("slerp")
class SLERP(Merger):
    """Spherical linear interpolation (Shoemake, SIGGRAPH 1985) between exactly two models, per
    tensor, as mergekit's ``slerp``: the angle ``omega`` between the two flattened tensors
    (normalised) gives the weights ``sin((1 - t) omega) / sin omega`` and ``sin(t omega) / sin
    omega`` of the unnormalised tensors; nearly parallel tensors (cosine above 0.9995) are
    interpolated linearly. ``t = 0`` gives the first expert, ``t = 1`` the second. The pretrained
    model is not used.
    """

    uses_pretrained = False

    def __init__(self, t: float = 0.5) -> None:
        self.t = check_fraction(t, "t", "slerp")

    def merge_tensor(self, name: str, pretrained: Tensor | None, experts: Sequence[Tensor]) -> Tensor:
        if len(experts) != 2:
            raise ConfigError(f"slerp interpolates exactly two models, got {len(experts)}.")
        a, b = experts
        na, nb = float(a.norm()), float(b.norm())
        if na == 0 or nb == 0:
            return (1 - self.t) * a + self.t * b
        cos = max(-1.0, min(1.0, float((a * b).sum()) / (na * nb)))
        if abs(cos) > PARALLEL:
            return (1 - self.t) * a + self.t * b
        omega = math.acos(cos)
        sin = math.sin(omega)
        return (math.sin((1 - self.t) * omega) / sin) * a + (math.sin(self.t * omega) / sin) * b

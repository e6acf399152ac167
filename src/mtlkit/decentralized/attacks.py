"""What a Byzantine agent sends instead of its model (the flat parameter vector ``psi`` it would
honestly send); each attack is named and seeded."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtlkit.errors import ConfigError, unknown_name

Attack = Callable[[Tensor, torch.Generator], Tensor]


def fixed_point(value: float = 15.0) -> Attack:
    """``value + U(0, 1)`` per coordinate (the paper's target-localisation attackers)."""
    return lambda psi, g: value + torch.rand(psi.shape, generator=g, dtype=psi.dtype)


def sign_flip(scale: float = 1.0) -> Attack:
    """``-scale * psi``."""
    return lambda psi, g: -scale * psi


def gaussian(std: float = 1.0) -> Attack:
    """``psi + N(0, std^2)`` per coordinate."""
    return lambda psi, g: psi + std * torch.randn(psi.shape, generator=g, dtype=psi.dtype)


def scaled(low: float = 0.0, high: float = 0.1) -> Attack:
    """``psi * U(low, high)`` (one factor per message; the paper's digit attackers, which also do
    not train, send their parameters scaled by ``U(0, 1) * 0.1``)."""
    return lambda psi, g: psi * (low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64)))


def model_replacement(target: Tensor, boost: float = 1.0) -> Attack:
    """A chosen malicious model ``target`` (times ``boost``, as model-replacement attacks scale it
    to survive averaging)."""
    return lambda psi, g: boost * target.to(psi)


ATTACKS: dict[str, Callable[..., Attack]] = {
    "fixed_point": fixed_point,
    "sign_flip": sign_flip,
    "gaussian": gaussian,
    "scaled": scaled,
    "model_replacement": model_replacement,
}


def make_attack(name: str, **options: object) -> Attack:
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    try:
        return ATTACKS[name](**options)
    except TypeError as exc:
        raise ConfigError(f"attack {name!r}: {exc}") from exc

"""A random generator that a method owns: seeded from its ``seed`` on first use, saved with its
state (a resumed run draws the same numbers), never the global RNG."""

from __future__ import annotations

from typing import Any

import torch


class OwnedGenerator:
    """Mixin (before the method's base class): ``_gen()`` and the generator's state as the
    method's extra state. ``seed=None`` takes a seed from torch's global generator at first use."""

    seed: int | None
    _generator: torch.Generator | None = None

    def _gen(self) -> torch.Generator:
        gen = self._generator
        if gen is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            gen = self._generator = torch.Generator().manual_seed(seed)
        return gen

    def _extra_state(self) -> dict[str, Any]:
        gen = self._generator
        return {"generator": gen.get_state() if gen is not None else None}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("generator")
        self._generator = None
        if saved is not None:
            gen = torch.Generator()
            gen.set_state(saved)
            self._generator = gen

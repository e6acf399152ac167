"""Adapter routing: Polytropon (Poly) and Multi-Head adapter Routing (MHR, MHR-z, MHR-mu).

Caccia, Ponti, Su, Pereira, Le Roux, Sordoni, "Multi-Head Adapter Routing for Cross-Task
Generalization", NeurIPS 2023 (MHR; Poly is its one-head case, Ponti et al., EACL 2023).

Each adapted linear layer ``W: d_in -> d_out`` (kept frozen) gets an inventory of S LoRA *skills*
``A_s`` (d_in x r) and ``B_s`` (r x d_out; zero-initialised, so the adapted model starts as the base
model) and, per task, routing logits ``Z_t`` (h x S, initialised U(-1e-3, 1e-3)). For task t the
routing is ``w = sigmoid(Z_t)`` normalised over the skills (``w[q, s] / (sum_s' w[q, s'] + eps)``).
MHR splits ``d_in`` and ``d_out`` into h contiguous blocks and mixes *parameter blocks* per head:
``A^(q) = sum_s w[q, s] A_s[rows of block q]``, ``B^(q) = sum_s w[q, s] B_s[:, columns of block q]``;
``A`` stacks the ``A^(q)`` over ``d_in``, ``B`` concatenates the ``B^(q)`` over ``d_out``, and
``y = W x + (alpha / r) (x A) B``. Poly is ``heads=1``. ``mixing="outputs"`` offers mttl's
"merge after" path instead: each skill's LoRA output ``x A_s B_s``, mixed per output block by
``w[q, s]`` (not the published method: ``(sum w A)(sum w B)`` differs from ``sum w A B``).

Variants: MHR-z (:meth:`RoutedLoRALinear.train_routing_only`: few-shot adaptation trains only the
routing logits) and MHR-mu (:meth:`RoutedLoRALinear.average_routing`: the router replaced by uniform
weights, i.e. one averaged adapter, then fine-tuned). Departures and choices: one routing matrix per
adapted layer and task (mttl can share one across layers); the camera-ready code's options that its
T0 configs switch off (relaxed-Bernoulli routing, straight-through rounding, an always-on skill)
are not offered; ``alpha`` defaults to the rank (scaling 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from mtlkit.errors import ConfigError, unknown_name

MIXINGS = ("parameters", "outputs")


class RoutedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus S routed LoRA skills (see the module docstring).

    The task whose routing applies is :attr:`task` (set by the model before a task's pass).
    """

    def __init__(
        self,
        base: nn.Linear,
        tasks: Sequence[str],
        skills: int = 8,
        rank: int = 1,
        heads: int = 1,
        alpha: float | None = None,
        mixing: str = "parameters",
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        if mixing not in MIXINGS:
            raise unknown_name("mixing", mixing, MIXINGS)
        if skills < 1 or rank < 1 or heads < 1 or d_in % heads or d_out % heads:
            raise ConfigError(
                f"RoutedLoRALinear needs skills, rank, heads >= 1 and heads dividing d_in={d_in} and "
                f"d_out={d_out}; got skills={skills}, rank={rank}, heads={heads}."
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.skills, self.rank, self.heads, self.mixing, self.eps = skills, rank, heads, mixing, eps
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(skills, d_in, rank))
        self.lora_b = nn.Parameter(torch.zeros(skills, rank, d_out))
        for s in range(skills):  # LoRA's initialisation of A, per skill
            nn.init.kaiming_uniform_(self.lora_a.data[s].T, a=math.sqrt(5))
        self.routing = nn.ParameterDict({t: self._new_logits() for t in tasks})
        self.task: str | None = None
        self.uniform = False

    def _new_logits(self) -> nn.Parameter:
        return nn.Parameter(torch.empty(self.heads, self.skills).uniform_(-1e-3, 1e-3))

    # -- routing --------------------------------------------------------------------------------------
    def weights(self, task: str) -> Tensor:
        """The (heads, skills) routing weights of ``task`` (uniform under MHR-mu)."""
        if self.uniform:
            return torch.full((self.heads, self.skills), 1.0 / self.skills, device=self.lora_a.device)
        if task not in self.routing:
            raise unknown_name("task", task, list(self.routing))
        w = torch.sigmoid(self.routing[task])
        return w / (w.sum(-1, keepdim=True) + self.eps)

    def mixed_adapter(self, task: str) -> tuple[Tensor, Tensor]:
        """MHR's mixed ``(A, B)``: per head, the weighted skills' blocks of A's rows and B's columns."""
        w = self.weights(task).to(self.lora_a.dtype)  # (h, S)
        d_in, d_out = self.lora_a.shape[1], self.lora_b.shape[2]
        a = self.lora_a.view(self.skills, self.heads, d_in // self.heads, self.rank)
        b = self.lora_b.view(self.skills, self.rank, self.heads, d_out // self.heads)
        mixed_a = torch.einsum("hs,shir->hir", w, a).reshape(d_in, self.rank)
        mixed_b = torch.einsum("hs,srho->rho", w, b).reshape(self.rank, d_out)
        return mixed_a, mixed_b

    def forward(self, x: Tensor) -> Tensor:
        if self.task is None:
            raise ConfigError("RoutedLoRALinear: no task is set; the model sets one before each task's pass.")
        y = self.base(x)
        if self.mixing == "parameters":
            a, b = self.mixed_adapter(self.task)
            return y + self.scaling * (x @ a) @ b
        w = self.weights(self.task).to(x.dtype)  # (h, S)
        per_skill = torch.einsum("...i,sir,sro->...so", x, self.lora_a, self.lora_b)  # (..., S, d_out)
        blocks = per_skill.unflatten(-1, (self.heads, -1))  # (..., S, h, d_out / h)
        return y + self.scaling * torch.einsum("hs,...sho->...ho", w, blocks).flatten(-2)

    # -- the variants -------------------------------------------------------------------------------
    def add_task(self, task: str) -> None:
        """Routing logits for a new task (few-shot adaptation to a held-out task)."""
        if task in self.routing:
            raise ConfigError(f"Task {task!r} already has routing logits.")
        self.routing[task] = self._new_logits().to(self.lora_a.device)

    def train_routing_only(self) -> None:
        """MHR-z: the skills are frozen; only the routing logits train."""
        self.lora_a.requires_grad_(False)
        self.lora_b.requires_grad_(False)

    def average_routing(self) -> None:
        """MHR-mu: drop the router for uniform weights (one averaged adapter per head)."""
        self.uniform = True
        for p in self.routing.parameters():
            p.requires_grad_(False)


def add_routed_adapters(
    module: nn.Module,
    tasks: Sequence[str],
    select: Callable[[str, nn.Linear], bool] | None = None,
    **options: object,
) -> list[RoutedLoRALinear]:
    """Replace every ``nn.Linear`` inside ``module`` for which ``select(name, layer)`` holds (default:
    every one that can be wrapped) by a :class:`RoutedLoRALinear` around it (in place); returns the
    new layers. ``options`` go to :class:`RoutedLoRALinear` (``skills``, ``rank``, ``heads``,
    ``alpha``, ``mixing``). ``nn.MultiheadAttention`` reads its ``out_proj`` weight directly, and
    ``nn.TransformerEncoderLayer``/``DecoderLayer`` their feed-forward weights, so those layers
    cannot be wrapped: the default leaves them out, and selecting one is refused."""
    # torch's attention reads out_proj's weight, and its transformer layers their linear maps'
    # weights (their fast path would bypass an adapter), instead of calling the layers
    fused = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    attention_outputs = {
        id(child)
        for m in module.modules()
        if isinstance(m, fused)
        for child in m.children()
        if isinstance(child, nn.Linear)
    }
    linear = [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and not isinstance(layer, RoutedLoRALinear)
    ]
    if select is None:
        targets = [(n, layer) for n, layer in linear if id(layer) not in attention_outputs]
    else:
        targets = [(n, layer) for n, layer in linear if select(n, layer)]
        refused = [n for n, layer in targets if id(layer) in attention_outputs]
        if refused:
            raise ConfigError(
                f"add_routed_adapters: {refused[0]!r} belongs to a torch attention or transformer layer, "
                "which reads its weight directly instead of calling it; leave it out of select."
            )
    if not targets:
        raise ConfigError("add_routed_adapters found no nn.Linear layer to adapt.")
    made = []
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        routed = RoutedLoRALinear(layer, tasks, **options)  # type: ignore[arg-type]
        setattr(parent, child, routed)
        made.append(routed)
    return made


def set_task(layers: Iterable[RoutedLoRALinear], task: str | None) -> None:
    """Point every routed layer at ``task``'s routing."""
    for layer in layers:
        layer.task = task

"""ESMM: the entire-space multi-task model for post-click conversion rate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from mtlkit.core.tasks import Task, TaskSet
from mtlkit.errors import TaskError
from mtlkit.models.base import MultiTaskModule, MultiTaskOutput, mlp, register
from mtlkit.models.funnel import check_funnel_tasks, product_logit
from mtlkit.models.gating import ExpertInputs, shared_cut


@register("esmm")
class ESMM(MultiTaskModule):
    """ESMM (Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, "Entire Space Multi-Task Model: An Effective
    Approach for Estimating Post-Click Conversion Rate", SIGIR 2018).

    Two tasks in funnel order, both observed on every impression: the click (CTR) and the click
    followed by a conversion (CTCVR). A shared embedding feeds a CTR tower (logit ``a``) and a CVR
    tower (logit ``b``); the model predicts ``pCTR = sigmoid(a)`` and ``pCTCVR = sigmoid(a) *
    sigmoid(b)``, so the post-click conversion rate ``pCVR = sigmoid(b)`` is learned over the entire
    impression space without ever being fitted on clicked samples alone (the sample-selection bias
    ESMM removes). :meth:`conversion_rate` returns the CVR logit ``b``.

    Outputs are logits for ``bce``: the CTCVR logit is ``logit(sigmoid(a) sigmoid(b))``, computed in
    log space (:func:`~mtlkit.models.funnel.product_logit`).

    Args:
        in_features: input width (dense features; the paper's sparse-feature embedding lookup is
            what ``embed_dims`` stands in for), or the shape of one example.
        tasks: exactly two binary tasks: click, then click-and-convert.
        embed_dims: the shared embedding MLP (at least one layer).
        tower_dims: hidden widths of each tower (mtlkit default (64, 32); torch-rechub's examples
            use [16, 8]).
        activation, dropout, batch_norm: layer options.

    What is shared: the embedding and the CTR tower (CTCVR multiplies pCTR in, so both tasks read
    it); the CVR tower is CTCVR's own. The representation is the embedding and the CTR logit,
    concatenated.
    """

    funnel = True

    def __init__(
        self,
        in_features: int | Sequence[int],
        tasks: TaskSet | Sequence[Task] | Sequence[str],
        embed_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (64, 32),
        out_features: int | Mapping[str, int] = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        check_funnel_tasks(tasks, out_features, "ESMM", least=2, most=2)
        super().__init__(tasks)
        if not embed_dims:
            raise TaskError("ESMM needs a shared embedding (embed_dims).")
        self.in_features = in_features
        self.inputs = ExpertInputs(in_features)
        self.embedding = mlp(self.inputs.expert_width, embed_dims, activation, dropout, batch_norm)
        self.ctr_tower = mlp(embed_dims[-1], tower_dims, activation, dropout, batch_norm, out_features=1)
        self.cvr_tower = mlp(embed_dims[-1], tower_dims, activation, dropout, batch_norm, out_features=1)
        self.click, self.conversion = self.task_names

    def shared_modules(self) -> Iterable[nn.Module]:
        return [self.embedding, self.ctr_tower]

    def task_modules(self, task: str) -> Iterable[nn.Module]:
        return [self.cvr_tower] if task == self.conversion else []

    def forward_tasks(self, x: Tensor, tasks: list[str]) -> MultiTaskOutput:
        self.inputs.check(x, type(self).__name__)
        e = self.embedding(self.inputs(x)[0])
        # the CTR logit is read by both tasks: it is part of the shared representation
        z, (e, a) = shared_cut([e, self.ctr_tower(e)])
        out = {}
        if self.click in tasks:
            out[self.click] = a
        if self.conversion in tasks:
            out[self.conversion] = product_logit(a, self.cvr_tower(e))
        return MultiTaskOutput(out, z)

    def conversion_rate(self, x: Tensor) -> Tensor:
        """The post-click conversion logit ``b`` (``sigmoid(b)`` = pCVR)."""
        self.inputs.check(x, type(self).__name__)
        return self.cvr_tower(self.embedding(self.inputs(x)[0]))

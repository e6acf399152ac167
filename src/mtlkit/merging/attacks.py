"""Untargeted L-infinity attacks on image classifiers, for transfer audits of merged models.

Every attack takes ``model`` (a callable from images to logits, in eval mode), images ``x`` with
values in ``[0, 1]`` (``(N, H, W)`` or ``(N, C, H, W)``), their labels ``y`` and the budget ``eps``,
and returns adversarial images within ``eps`` of ``x`` (and within ``[0, 1]``). Gradients are taken
with respect to the input only (the model's parameters collect nothing). The transfer family:

- ``fgsm``: one signed-gradient step of size ``eps`` (Goodfellow, Shlens, Szegedy, ICLR 2015);
- ``pgd``: ``steps`` (10) signed steps of ``2.5 eps / steps`` from a uniform random start, each
  projected on the ball (Madry et al., ICLR 2018);
- ``mi_fgsm``: ``steps`` (10) steps of ``eps / steps`` along the sign of a momentum (decay 1.0) of
  per-example L1-normalised gradients (Dong et al., CVPR 2018);
- ``di_fgsm``: MI-FGSM whose gradients are taken, with probability 0.5, at a random resize-and-pad
  of the image (Xie et al., CVPR 2019); the padded image is resized back to the input size so
  fixed-size models accept it (the paper's models take the larger image: our adaptation);
- ``ti_fgsm``: MI-FGSM with each gradient smoothed by a Gaussian kernel (7 x 7, 3 sigma to the
  edge; the paper uses 15 x 15 on 299-pixel images) (Dong et al., CVPR 2019);
- ``vmi_fgsm``: MI-FGSM with variance tuning: the gradient plus the mean gradient of 20 uniform
  neighbours within ``1.5 eps`` minus the previous gradient (Wang & He, CVPR 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlkit.errors import ConfigError, ShapeMismatchError, unknown_name

Model = Callable[[Tensor], Tensor]


def input_gradient(model: Model, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the summed cross-entropy with respect to the images only."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _l1_normalised(g: Tensor) -> Tensor:
    scale = g.abs().flatten(1).mean(1).clamp_min(1e-12)
    return g / scale.view(-1, *([1] * (g.dim() - 1)))


def fgsm(model: Model, x: Tensor, y: Tensor, eps: float) -> Tensor:
    return _project(x + eps * input_gradient(model, x, y).sign(), x, eps)


def pgd(
    model: Model, x: Tensor, y: Tensor, eps: float, steps: int = 10, generator: torch.Generator | None = None
) -> Tensor:
    step = 2.5 * eps / steps
    start = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps
    x_adv = _project(x + start, x, eps)
    for _ in range(steps):
        x_adv = _project(x_adv + step * input_gradient(model, x_adv, y).sign(), x, eps)
    return x_adv


def _as_images(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(1), True
    if x.dim() == 4:
        return x, False
    raise ShapeMismatchError(f"Image attacks need (N, H, W) or (N, C, H, W) images, got {tuple(x.shape)}.")


def diverse_input(x: Tensor, generator: torch.Generator, rate: float = 1.1, prob: float = 0.5) -> Tensor:
    """DI's transform: with probability ``prob``, resize to a random size in ``[H, rate H)``, pad at a
    random place to ``rate H``, and resize back to ``H`` (bilinear)."""
    if float(torch.rand((), generator=generator)) >= prob:
        return x
    images, squeezed = _as_images(x)
    h, w = images.shape[-2:]
    big = max(h + 1, int(h * rate))
    size = int(torch.randint(h, big, (), generator=generator))
    resized = F.interpolate(images, size=(size, size * w // h), mode="nearest")
    top = int(torch.randint(0, big - size + 1, (), generator=generator))
    left = (
        int(torch.randint(0, big - resized.shape[-1] + 1, (), generator=generator))
        if big > resized.shape[-1]
        else 0
    )
    padded = F.pad(resized, (left, max(0, big - resized.shape[-1] - left), top, big - size - top))
    back = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)
    return back.squeeze(1) if squeezed else back


def gaussian_kernel(size: int = 7, nsig: float = 3.0) -> Tensor:
    """TI's kernel: a normalised 2-D Gaussian reaching ``nsig`` standard deviations at the edges."""
    positions = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    density = torch.exp(-0.5 * positions**2)
    kernel = torch.outer(density, density)
    return (kernel / kernel.sum()).to(torch.float32)


def smooth(g: Tensor, kernel: Tensor) -> Tensor:
    images, squeezed = _as_images(g)
    channels = images.shape[1]
    weight = kernel.to(images.dtype).expand(channels, 1, *kernel.shape)
    out = F.conv2d(images, weight, padding=kernel.shape[-1] // 2, groups=channels)
    return out.squeeze(1) if squeezed else out


def momentum_attack(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    decay: float = 1.0,
    gradient: Callable[[Tensor], Tensor] | None = None,
    variance: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """MI-FGSM, with an optional gradient transform (DI, TI) and variance tuning (VMI)."""
    step = eps / steps
    grad_of = gradient or (lambda z: input_gradient(model, z, y))
    x_adv, momentum, tuning = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        g = grad_of(x_adv)
        momentum = decay * momentum + _l1_normalised(g + tuning)
        if variance is not None:
            tuning = variance(x_adv, g)
        x_adv = _project(x_adv + step * momentum.sign(), x, eps)
    return x_adv


def mi_fgsm(model: Model, x: Tensor, y: Tensor, eps: float, steps: int = 10, decay: float = 1.0) -> Tensor:
    return momentum_attack(model, x, y, eps, steps, decay)


def di_fgsm(
    model: Model, x: Tensor, y: Tensor, eps: float, steps: int = 10, generator: torch.Generator | None = None
) -> Tensor:
    g = generator or torch.Generator().manual_seed(0)
    return momentum_attack(
        model, x, y, eps, steps, gradient=lambda z: input_gradient(model, diverse_input(z, g), y)
    )


def ti_fgsm(model: Model, x: Tensor, y: Tensor, eps: float, steps: int = 10, kernel: int = 7) -> Tensor:
    k = gaussian_kernel(kernel)
    return momentum_attack(model, x, y, eps, steps, gradient=lambda z: smooth(input_gradient(model, z, y), k))


def vmi_fgsm(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    samples: int = 20,
    beta: float = 1.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    g = generator or torch.Generator().manual_seed(0)

    def variance(z: Tensor, grad: Tensor) -> Tensor:
        total = torch.zeros_like(z)
        for _ in range(samples):
            noise = (torch.rand(z.shape, generator=g, dtype=z.dtype) * 2 - 1) * beta * eps
            total += input_gradient(model, z + noise, y)
        return total / samples - grad

    return momentum_attack(model, x, y, eps, steps, variance=variance)


ATTACKS: dict[str, Callable[..., Tensor]] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "mi_fgsm": mi_fgsm,
    "di_fgsm": di_fgsm,
    "ti_fgsm": ti_fgsm,
    "vmi_fgsm": vmi_fgsm,
}
RANDOM = {"pgd", "di_fgsm", "vmi_fgsm"}


def attack(
    name: str, model: Model, x: Tensor, y: Tensor, eps: float, seed: int = 0, **options: Any
) -> Tensor:
    """Run attack ``name`` (:data:`ATTACKS`) with budget ``eps`` (random choices from ``seed``)."""
    if name not in ATTACKS:
        raise unknown_name("attack", name, list(ATTACKS))
    if not 0 < eps <= 1 or not math.isfinite(eps):
        raise ConfigError(f"eps must be in (0, 1] for images in [0, 1], got {eps}.")
    if x.numel() == 0:
        raise ConfigError("attack got no images.")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError("attacks take images with values in [0, 1] (normalise inside the model).")
    if name in RANDOM:
        options.setdefault("generator", torch.Generator().manual_seed(seed))
    return ATTACKS[name](model, x, y, eps, **options).detach()


def correct(model: Model, x: Tensor, y: Tensor) -> Tensor:
    """Which images ``model`` classifies correctly (a boolean mask)."""
    with torch.no_grad():
        return model(x).argmax(-1) == y


def fooled_share(model: Model, x_adv: Tensor, y: Tensor, right: Tensor) -> float:
    """Among the images marked ``right`` (classified correctly when clean), the share whose
    adversarial version ``model`` gets wrong (``nan`` when none is marked)."""
    if not bool(right.any()):
        return float("nan")
    with torch.no_grad():
        fooled = model(x_adv).argmax(-1) != y
    return float((fooled & right).sum()) / float(right.sum())


def success_rate(model: Model, x: Tensor, x_adv: Tensor, y: Tensor) -> float:
    """Untargeted attack success: the share of the images ``model`` classifies correctly whose
    adversarial version it gets wrong (``nan`` when it gets none right)."""
    return fooled_share(model, x_adv, y, correct(model, x, y))

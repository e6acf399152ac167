"""Multi-task architectures. Every model returns ``{task: output}`` and names its shared part."""

from typing import Any

from torch import nn

from mtlkit.models.adh_mtl import ADHMTL
from mtlkit.models.aitm import AITM
from mtlkit.models.base import MODELS, MultiTaskModel, MultiTaskModule, MultiTaskOutput, mlp
from mtlkit.models.compiled import compile_parts
from mtlkit.models.cross_stitch import CrossStitch
from mtlkit.models.denoiser import TimestepDenoiser
from mtlkit.models.dselect_k import DSelectK
from mtlkit.models.dual_encoder import DualEncoder, fit_alternating
from mtlkit.models.efficientnet_lite import EfficientNetLite0, load_efficientnet_lite0
from mtlkit.models.esmm import ESMM
from mtlkit.models.home import HoME
from mtlkit.models.hypernetwork import ParetoHyperNetwork
from mtlkit.models.imp_encoder import IMPEncoder
from mtlkit.models.info_mtl import InfoMTL
from mtlkit.models.lenet import MultiLeNet
from mtlkit.models.m3vit import M3ViT
from mtlkit.models.mmoe import MMoE
from mtlkit.models.modality import ModalityFusion
from mtlkit.models.mtan import MTAN
from mtlkit.models.ple import CGC, PLE
from mtlkit.models.preference_conditioned import PreferenceConditioned
from mtlkit.models.route import LearningToRoute
from mtlkit.models.routed_adapters import RoutedAdapters
from mtlkit.models.shared_bottom import SharedBottom
from mtlkit.models.soft_sharing import SoftSharing
from mtlkit.models.sparse_moe import SparseMoE


def create(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the model registered under ``name`` (see :func:`available`)."""
    return MODELS.create(name, **kwargs)


def available() -> list[str]:
    """Names of every registered model."""
    return MODELS.available()


__all__ = [
    "ADHMTL",
    "AITM",
    "CGC",
    "ESMM",
    "MODELS",
    "MTAN",
    "PLE",
    "CrossStitch",
    "DSelectK",
    "DualEncoder",
    "EfficientNetLite0",
    "HoME",
    "IMPEncoder",
    "InfoMTL",
    "LearningToRoute",
    "M3ViT",
    "MMoE",
    "ModalityFusion",
    "MultiLeNet",
    "MultiTaskModel",
    "MultiTaskModule",
    "MultiTaskOutput",
    "ParetoHyperNetwork",
    "PreferenceConditioned",
    "RoutedAdapters",
    "SharedBottom",
    "SoftSharing",
    "SparseMoE",
    "TimestepDenoiser",
    "available",
    "compile_parts",
    "create",
    "fit_alternating",
    "load_efficientnet_lite0",
    "mlp",
]

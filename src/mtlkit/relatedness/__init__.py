"""Task relatedness: how tasks' gradients agree (gradient statistics over training, the gradient
affinity between diffusion timesteps)."""

from mtlkit.relatedness.cross_loss import CrossLossSimilarity, loss_weights
from mtlkit.relatedness.gradient_statistics import GradientStatistics, pairwise_statistics
from mtlkit.relatedness.tag import TaskAffinity, lookahead_affinity, select_groups
from mtlkit.relatedness.timestep_affinity import affinity_decay, timestep_affinity

__all__ = [
    "CrossLossSimilarity",
    "GradientStatistics",
    "TaskAffinity",
    "affinity_decay",
    "lookahead_affinity",
    "loss_weights",
    "pairwise_statistics",
    "select_groups",
    "timestep_affinity",
]

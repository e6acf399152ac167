"""Task relatedness: how tasks' gradients agree (gradient statistics over training, the gradient
affinity between diffusion timesteps)."""

from mtlkit.relatedness.gradient_statistics import GradientStatistics, pairwise_statistics
from mtlkit.relatedness.timestep_affinity import affinity_decay, timestep_affinity

__all__ = ["GradientStatistics", "affinity_decay", "pairwise_statistics", "timestep_affinity"]

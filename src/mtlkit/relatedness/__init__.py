"""Task relatedness: how the gradients of tasks agree (timestep affinity of diffusion models)."""

from mtlkit.relatedness.timestep_affinity import affinity_decay, timestep_affinity

__all__ = ["affinity_decay", "timestep_affinity"]

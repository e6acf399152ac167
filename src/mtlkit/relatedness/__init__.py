"""Task relatedness and negative transfer: gradient statistics over training, TAG's lookahead
affinity and grouping, the accumulated cross-loss similarity, MTIF influence functions with data
selection, and the gradient affinity between diffusion timesteps."""

from mtlkit.relatedness.cross_loss import CrossLossSimilarity, loss_weights
from mtlkit.relatedness.data_selection import drop_points, random_selection, select_points
from mtlkit.relatedness.gradient_statistics import GradientStatistics, pairwise_statistics
from mtlkit.relatedness.mtif import InfluenceScores, influence_scores
from mtlkit.relatedness.tag import TaskAffinity, lookahead_affinity, select_groups
from mtlkit.relatedness.timestep_affinity import affinity_decay, timestep_affinity

__all__ = [
    "CrossLossSimilarity",
    "GradientStatistics",
    "InfluenceScores",
    "TaskAffinity",
    "affinity_decay",
    "drop_points",
    "influence_scores",
    "lookahead_affinity",
    "loss_weights",
    "pairwise_statistics",
    "random_selection",
    "select_groups",
    "select_points",
    "timestep_affinity",
]

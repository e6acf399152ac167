"""Pareto-front learning: whole trade-off fronts from preference-conditioned training (COSMOS,
Pareto hypernetworks) or one model per preference (linear scalarisation, EPO, PMTL), their
evaluation, front metrics and plots."""

from mtlkit.pareto.approaches import APPROACHES, Approach, get_approach
from mtlkit.pareto.front import Front, FrontPoint, evaluate_front
from mtlkit.pareto.learn import FrontRun, learn_front, pmtl_references, training_preferences
from mtlkit.pareto.plots import plot_fronts
from mtlkit.pareto.sampler import PreferenceSampler

__all__ = [
    "APPROACHES",
    "Approach",
    "Front",
    "FrontPoint",
    "FrontRun",
    "PreferenceSampler",
    "evaluate_front",
    "get_approach",
    "learn_front",
    "plot_fronts",
    "pmtl_references",
    "training_preferences",
]

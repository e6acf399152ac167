"""Byzantine-resilient decentralised multi-task learning (Li, Abbas, Koutsoukos, "Byzantine Resilient
Distributed Multi-Task Learning", NeurIPS 2020): agents on a graph, each with its own task, model and
data, that adapt then combine their neighbours' models with a weight rule that learns whom to trust."""

from mtlkit.decentralized.attacks import ATTACKS, make_attack
from mtlkit.decentralized.graphs import complete_graph, random_geometric_graph, ring_graph
from mtlkit.decentralized.network import Agent, DecentralizedNetwork, StepRecord
from mtlkit.decentralized.rules import RULES, loss_weights, make_rule

__all__ = [
    "ATTACKS",
    "RULES",
    "Agent",
    "DecentralizedNetwork",
    "StepRecord",
    "complete_graph",
    "loss_weights",
    "make_attack",
    "make_rule",
    "random_geometric_graph",
    "ring_graph",
]

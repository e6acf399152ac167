"""Benchmark suites built on the layers below: tasks, tracks and their evaluation."""

from mtlkit.bench.image_tasks import TASKS, ImageSplit, ImageTask, image_tasks, pretraining_pool
from mtlkit.bench.merging_track import (
    MergingTrack,
    TrackConfig,
    build_track,
    efficientnet_lite0_track,
    mlp8_track,
    normalised,
)

__all__ = [
    "TASKS",
    "ImageSplit",
    "ImageTask",
    "MergingTrack",
    "TrackConfig",
    "build_track",
    "efficientnet_lite0_track",
    "image_tasks",
    "mlp8_track",
    "normalised",
    "pretraining_pool",
]

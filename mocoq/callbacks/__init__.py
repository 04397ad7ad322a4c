"""Callbacks that watch a MoCo run without changing it."""

from mocoq.callbacks.diagnostics import (
    EmbeddingProjector,
    TimeBreakdown,
    TrainingDiagnostics,
    ViewPairsLogger,
)
from mocoq.callbacks.knn_monitor import KNNMonitor
from mocoq.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EmbeddingProjector",
    "KNNMonitor",
    "ThroughputMonitor",
    "TimeBreakdown",
    "TrainingDiagnostics",
    "ViewPairsLogger",
]

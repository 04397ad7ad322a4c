"""Callbacks that watch a MoCo run, and the one that saves it when it is stopped."""

from mocoq.callbacks.budget import TimeBudget
from mocoq.callbacks.diagnostics import (
    EmbeddingProjector,
    TimeBreakdown,
    TrainingDiagnostics,
    ViewPairsLogger,
)
from mocoq.callbacks.knn_monitor import KNNMonitor
from mocoq.callbacks.preemption import PreemptionCheckpoint
from mocoq.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EmbeddingProjector",
    "KNNMonitor",
    "PreemptionCheckpoint",
    "ThroughputMonitor",
    "TimeBreakdown",
    "TimeBudget",
    "TrainingDiagnostics",
    "ViewPairsLogger",
]

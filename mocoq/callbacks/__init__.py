"""Callbacks that watch a MoCo run without changing it."""

from mocoq.callbacks.knn_monitor import KNNMonitor
from mocoq.callbacks.throughput import ThroughputMonitor

__all__ = ["KNNMonitor", "ThroughputMonitor"]

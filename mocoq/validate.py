"""Checks of a composed config and of a checkpoint to resume, before anything is written.

Each failure is a :class:`ConfigError` whose message names the key (or file) to change, so that
``mocoq-train`` reports it as one line.
"""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A value in the composed config cannot be used; the message names the key to change."""


def validate_config(cfg: DictConfig) -> None:
    """Refuse values that cannot work, before any object is built."""


def check_resume_checkpoint(path: str, model: object) -> None:
    """Refuse a checkpoint that cannot continue this run, naming what differs."""

"""Checks of a composed config and of a checkpoint to resume, before anything is written.

Each failure is a :class:`ConfigError` whose message names the key (or file) to change, so that
``mocoq-train`` reports it as one line.

* :func:`validate_config`: values that cannot work (out of range, of the wrong type, an output
  folder that cannot be written), before any object is built.
* :func:`check_resume_checkpoint`: a checkpoint that cannot be read, holds no training state, or
  was trained with another queue size, projection dimension or backbone than this run's.
* :func:`check_output_dir_arguments`: the run directory named on the command line can be
  created and written, before Hydra creates it (Hydra's own failure there is a traceback).
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


class ConfigError(ValueError):
    """A value in the composed config cannot be used; the message names the key to change."""


_MISSING = object()


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at dotted ``key``, or ``_MISSING`` where the key is absent (or ???)."""
    return OmegaConf.select(cfg, key, default=_MISSING)


def _number(cfg: DictConfig, key: str, integer: bool = False) -> float | None:
    """The number at ``key`` (None where absent or null); a ConfigError for anything else."""
    value = _value(cfg, key)
    if value is _MISSING or value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        noun = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {noun}, got {value!r}")
    return float(value) if not integer else value


def validate_config(cfg: DictConfig) -> None:
    """Refuse values that cannot work, before any object is built.

    Checked: ``model.temperature`` > 0, ``model.ema_momentum`` in [0, 1], ``model.queue_size``
    and ``head.out_dim`` and ``head.num_layers`` >= 1, ``dataset.batch_size`` and
    ``dataset.eval_batch_size`` >= 1, ``dataset.image_size`` >= 2, ``dataset.eval_resize``
    (when set) >= ``dataset.image_size``, ``optim.lr`` > 0, ``trainer.max_epochs`` >= 0 (or -1
    with ``trainer.max_steps``), the ``budget`` (see :func:`_check_budget`), and that
    ``run_dir`` can be created and written. What depends on
    built objects is checked where they are built: the queue against the global batch
    (:meth:`mocoq.module.MoCoModule.check_batch_fits`), the batch against the dataset
    (:meth:`mocoq.data.datamodule.MoCoDataModule.setup`), a backbone against the image size
    (:func:`mocoq.backbones.torchvision_backbone`).

    Raises:
        ConfigError: the first value that cannot work, naming its key and the allowed range.
    """
    temperature = _number(cfg, "model.temperature")
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"model.temperature must be positive, got {_show(temperature)}")
    momentum = _number(cfg, "model.ema_momentum")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"model.ema_momentum must be in [0, 1], got {_show(momentum)}")
    for key in ("model.queue_size", "head.out_dim", "head.num_layers"):
        count = _number(cfg, key, integer=True)
        if count is not None and count < 1:
            raise ConfigError(f"{key} must be at least 1, got {count}")

    for key in ("dataset.batch_size", "dataset.eval_batch_size"):
        count = _number(cfg, key, integer=True)
        if count is not None and count < 1:
            raise ConfigError(f"{key} must be at least 1, got {count}")
    image_size = _number(cfg, "dataset.image_size", integer=True)
    if image_size is not None and image_size < 2:
        raise ConfigError(
            f"dataset.image_size must be at least 2 (the augmentation crops and blurs the "
            f"image), got {image_size}"
        )
    eval_resize = _number(cfg, "dataset.eval_resize", integer=True)
    if eval_resize is not None and image_size is not None and eval_resize < image_size:
        raise ConfigError(
            f"dataset.eval_resize={eval_resize} is smaller than dataset.image_size={image_size}: "
            f"the clean view's centre crop would be padded; set dataset.eval_resize to at least "
            f"{image_size} (or null for image_size / 0.875)"
        )

    lr = _number(cfg, "optim.lr")
    if lr is not None and lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {_show(lr)}")

    max_epochs = _number(cfg, "trainer.max_epochs", integer=True)
    max_steps = _number(cfg, "trainer.max_steps", integer=True)
    fast_dev_run = _value(cfg, "trainer.fast_dev_run")
    bounded = (max_steps is not None and max_steps >= 0) or fast_dev_run not in (_MISSING, False, 0)
    if max_epochs is not None and (max_epochs < -1 or (max_epochs == -1 and not bounded)):
        raise ConfigError(
            f"trainer.max_epochs must be a number of epochs (0 or more), or -1 with "
            f"trainer.max_steps=N to stop after N steps; got {max_epochs}"
        )
    _check_budget(cfg, max_steps)

    run_dir = OmegaConf.select(cfg, "run_dir", default=None, throw_on_resolution_failure=False)
    if run_dir:  # unresolved outside a Hydra run (build() in tests): nothing to check
        check_writable_dir(str(run_dir), "run_dir")


def _check_budget(cfg: DictConfig, max_steps: float | None) -> None:
    """``budget.minutes`` null or > 0, and not with ``trainer.max_steps``; its measurement's
    ``skip_steps`` >= 0, ``timed_steps`` >= 1, ``reserve`` in [0, 1) and ``check_at`` in (0, 1)."""
    minutes = _number(cfg, "budget.minutes")
    if minutes is None:
        return
    if minutes <= 0:
        raise ConfigError(
            f"budget.minutes must be a positive number of minutes (or null to train by "
            f"trainer.max_epochs), got {_show(minutes)}"
        )
    if max_steps is not None and max_steps >= 0:
        raise ConfigError(
            f"budget.minutes={_show(minutes)} and trainer.max_steps={int(max_steps)} both size "
            "the run: set one of them (budget.minutes=null, or trainer.max_steps=-1)"
        )
    skip = _number(cfg, "budget.skip_steps", integer=True)
    timed = _number(cfg, "budget.timed_steps", integer=True)
    if (skip is not None and skip < 0) or (timed is not None and timed < 1):
        raise ConfigError(
            f"budget.skip_steps must be >= 0 and budget.timed_steps >= 1, got {skip} and {timed}"
        )
    reserve = _number(cfg, "budget.reserve")
    if reserve is not None and not 0.0 <= reserve < 1.0:
        raise ConfigError(f"budget.reserve must be in [0, 1), got {_show(reserve)}")
    check_at = _number(cfg, "budget.check_at")
    if check_at is not None and not 0.0 < check_at < 1.0:
        raise ConfigError(
            f"budget.check_at must be a share of the steps in (0, 1), or null to keep the first "
            f"plan, got {_show(check_at)}"
        )


def _show(number: float) -> str:
    """``1.5``, ``-1`` (not ``-1.0``): the number as the user would have typed it."""
    return str(int(number)) if float(number).is_integer() else str(number)


# --- output folders ------------------------------------------------------------------------


def check_writable_dir(path: str, key: str) -> None:
    """Create the folder ``path`` (with its parents, as Hydra and Lightning would) and check that
    a file can be written in it (a temporary file, removed at once).

    Args:
        path: the folder; relative to the working directory.
        key: the config key or override that gave it, for the message (``hydra.run.dir``).

    Raises:
        ConfigError: it cannot be created or written (a file in its path, a read-only or
            special file system such as /proc, no permission, a full disk).
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if file is not None:
            reason = f"{file} is a file, not a folder"
        else:
            reason = f"{error.strerror or type(error).__name__}: {error.filename or folder}"
        raise ConfigError(
            f"{key}={path} is not a writable folder ({reason}): choose another {key}"
        ) from error


_INFO_FLAGS = {
    "--cfg",
    "-c",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--version",
}


def check_output_dir_arguments(arguments: Sequence[str]) -> None:
    """Check the run directory given on the command line before Hydra creates it.

    Looks at the last ``hydra.run.dir=`` (``hydra.sweep.dir=`` with ``-m``/``--multirun``) among
    Hydra ``arguments``; a value with an interpolation (``outputs/${now:...}``) is checked up to
    its last ``/`` before the first ``${``. Nothing is checked for Hydra's informational flags
    (``--cfg``, ``--help``, ...), which create no folder, or without such an argument.

    Raises:
        ConfigError: that folder cannot be created or written (see :func:`check_writable_dir`).
    """
    if any(argument.split("=", 1)[0] in _INFO_FLAGS for argument in arguments):
        return
    multirun = any(argument in ("-m", "--multirun") for argument in arguments)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    values = [a.split("=", 1)[1] for a in arguments if a.split("=", 1)[0].lstrip("+") == key]
    if not values:
        return
    value = values[-1]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    if "${" in value:
        value = value[: value.index("${")].rpartition("/")[0]
    if value:
        check_writable_dir(value, key)


# --- resuming ------------------------------------------------------------------------------

# Keys a checkpoint may lack although it fits: written_at came after the first checkpoints
# (MemoryQueue fills it in); the online probe's keys are the module's own concern
# (MoCoModule.on_load_checkpoint refuses a probe switched on or off when resuming).
_MAY_BE_ABSENT = ("queue.written_at",)
_IGNORED_PREFIXES = ("probe.",)
_SHOWN = 3  # differing keys named in a message
_ZIP_MAGIC = b"PK\x03\x04"  # how a file torch.save wrote begins
_TRIED = 3  # other checkpoints read to suggest one


def _load_checkpoint(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated zip, a text file, an empty file: many kinds
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = text.split(". ")[0].rstrip(".")
        cause = f"{type(error).__name__}: {text}" if text else type(error).__name__
        with open(path, "rb") as file:
            start = file.read(4)
        if not start:
            reason = "the file is empty"
        elif start == _ZIP_MAGIC:  # torch.save writes a zip archive: this one is cut short
            reason = f"an incomplete zip archive ({cause})"
        else:
            reason = f"not a PyTorch file ({cause})"
        raise ConfigError(
            f"ckpt_path={path} is not a readable checkpoint (truncated or not a checkpoint "
            f"file): {reason}; {_other_checkpoints_advice(path)}"
        ) from error


def _other_checkpoints_advice(path: str) -> str:
    """What to resume from instead: the newest other training checkpoint beside ``path``."""
    file = Path(path)
    others = [
        p
        for p in file.parent.glob("*.ckpt")
        if p.is_file() and p.name != file.name and zipfile.is_zipfile(p)  # complete files
    ]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    usable = next((p for p in others[:_TRIED] if _is_training_checkpoint(p)), None)
    if usable is not None:
        return f"resume from another checkpoint (e.g. ckpt_path={usable}) or start a new run"
    return "give another checkpoint file, or start a new run without ckpt_path"


def _is_training_checkpoint(file: Path) -> bool:
    """Whether ``file`` reads as a Lightning training checkpoint (memory-mapped: its tensors are
    not read)."""
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a broken file is simply not suggested
        return False
    return isinstance(checkpoint, dict) and {"state_dict", "optimizer_states"} <= checkpoint.keys()


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(n) for n in shape) if shape is not None else None


def _is_state_dict(value: Any) -> bool:
    """A non-empty dict of tensors: a model's weights saved alone."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(_shape(v) is not None for v in value.values())
    )


def _ignored(key: str) -> bool:
    return key.startswith(_IGNORED_PREFIXES)


def _differences(
    saved: Mapping[str, Any], expected: Mapping[str, Any]
) -> list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]:
    """``(key, shape in the checkpoint, shape in the model)`` of every key that differs, in the
    model's order, then the checkpoint's extra keys; None where a side lacks the key."""
    found: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = []
    for key, value in expected.items():
        if _ignored(key):
            continue
        if key not in saved:
            if key not in _MAY_BE_ABSENT:
                found.append((key, None, _shape(value)))
        elif _shape(saved[key]) != _shape(value):
            found.append((key, _shape(saved[key]), _shape(value)))
    found += [
        (k, _shape(v), None) for k, v in saved.items() if k not in expected and not _ignored(k)
    ]
    return found


def _describe(difference: tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]) -> str:
    key, there, here = difference
    if there is None:
        return f"{key} {here} missing there"
    if here is None:
        return f"{key} {there} only there"
    return f"{key} {there} there, {here} here"


def _run_dir_of(path: str) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/last.ckpt``,
    ``<run>/hpc_ckpt_1.ckpt``: the folder above it with ``.hydra/overrides.yaml``), where its
    saved overrides are still those the checkpoint was trained with: older than the checkpoint.

    A newer ``overrides.yaml`` was written by a later command in that directory, this one
    included when it resumes in place (``resume=``, ``ckpt_path=last``): Hydra saves a run's
    overrides before the task starts, so they hold the very settings that do not fit.
    """
    file = Path(path).resolve()
    for folder in (file.parent, file.parent.parent):
        overrides = folder / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            return folder if overrides.stat().st_mtime <= file.stat().st_mtime else None
    return None


def check_resume_checkpoint(path: str, model: nn.Module) -> None:
    """Refuse a checkpoint that cannot continue this run, naming what differs.

    The checkpoint is loaded on the CPU and its ``state_dict`` compared, key by key and shape by
    shape, with ``model.state_dict()`` (the online probe's ``probe.*`` keys and keys older
    checkpoints lack are left out). The likely cause is named with the setting to use: the
    backbone (``backbone.*`` keys differ), ``head.out_dim`` (the queue's key dimension or the
    head's output), ``model.queue_size`` (the queue's length), else the head's layers.

    Args:
        path: the checkpoint file to resume from (``ckpt_path``, resolved).
        model: the run's model, built from this run's config.

    Raises:
        ConfigError: the file cannot be read, holds no training state, or does not fit.
    """
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path} does not exist: give a checkpoint file or 'last'")
    checkpoint = _load_checkpoint(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "optimizer_states" not in checkpoint:
        if isinstance(state, dict) or _is_state_dict(checkpoint):
            raise ConfigError(
                f"ckpt_path={path} holds weights only, not a training checkpoint to resume (no "
                f"optimizer, schedule or loop state): start a new run from its weights with "
                f"init_weights={path}"
            )
        held = "a dict without state_dict" if isinstance(checkpoint, dict) else "a "
        held += "" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigError(
            f"ckpt_path={path} is not a readable checkpoint (truncated or not a checkpoint "
            f"file): it holds {held}, not a training checkpoint; "
            f"{_other_checkpoints_advice(path)}"
        )
    differences = _differences(state, model.state_dict())
    del checkpoint, state
    if not differences:
        return
    shown = "; ".join(_describe(d) for d in differences[:_SHOWN])
    if len(differences) > _SHOWN:
        shown += f"; {len(differences) - _SHOWN} more keys differ"
    run_dir = _run_dir_of(path)
    own = f" (resume={run_dir} resumes with the run's own settings)" if run_dir else ""
    queue = next((d for d in differences if d[0] == "queue.keys"), None)
    saved_queue, model_queue = (queue[1], queue[2]) if queue else (None, None)

    if any(d[0].startswith(("backbone.", "key_backbone.")) for d in differences):
        raise ConfigError(
            f"checkpoint {path} was trained with another backbone than this run's ({shown}): "
            f"resume with the backbone=, backbone.widths= (or other backbone.*) and "
            f"dataset.channels it was trained with{own}"
        )
    if saved_queue and model_queue and len(saved_queue) == len(model_queue) == 2:
        (saved_size, saved_dim), (size, dim) = saved_queue, model_queue
        if saved_dim != dim:
            also = f" and model.queue_size={saved_size}" if saved_size != size else ""
            raise ConfigError(
                f"checkpoint {path} was trained with head.out_dim={saved_dim}, this run has "
                f"{dim} ({shown}): resume with head.out_dim={saved_dim}{also}{own}"
            )
        if saved_size != size and all(d[0].startswith("queue.") for d in differences):
            # The queue alone: the encoders fit, so init_weights can start a new run from them.
            raise ConfigError(
                f"checkpoint {path} was trained with model.queue_size={saved_size}, this run has "
                f"{size} (checkpoint queue holds {saved_size} keys of dim {saved_dim}, but this "
                f"model's queue is {size} x {dim}): resume with model.queue_size={saved_size}"
                f"{own}, or start a new run from its weights with init_weights=<checkpoint> "
                f"(init_weights={path})"
            )
    if any(d[0].startswith(("head.", "key_head.")) for d in differences):
        raise ConfigError(
            f"checkpoint {path} was trained with another projection head than this run's "
            f"({shown}): resume with its head.num_layers, head.hidden_dim and head.batch_norm "
            f"(set by method=...){own}"
        )
    raise ConfigError(
        f"checkpoint {path} does not fit this model ({shown}): resume with the settings it was "
        f"trained with{own}"
    )

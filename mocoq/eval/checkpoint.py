"""What offline evaluation needs from a trained run: its encoder, its config and its data.

An encoder comes from one of two sources:

* a mocoq checkpoint: Lightning's ``<run dir>/checkpoints/*.ckpt`` (or the run directory, for
  its ``checkpoints/last.ckpt``). Its ``state_dict`` holds ``backbone.*``, ``head.*``,
  ``key_backbone.*``, ``key_head.*`` and ``queue.*``; the modules are rebuilt from the run's
  composed config, which Hydra saved as ``<run dir>/.hydra/config.yaml`` (or an explicit
  ``config=`` file). ``SplitBatchNorm2d`` and ``SyncBatchNorm`` keep ``BatchNorm2d``'s keys, so
  the plain backbone the config builds takes the weights of any ``model.key_bn`` mode;
* an exported backbone (``mocoq-export``): a plain state dict of the backbone plus its JSON
  sidecar (same stem, ``.json``) with the architecture and the training config.

Also here: the clean evaluation data of a run (its dataset config, changed or replaced), the
device and precision options of the evaluation tools, atomic file writes, and the one-line error
report the ``mocoq-*`` commands share.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from mocoq.data.datamodule import MoCoDataModule
from mocoq.data.transforms import EvalTransform
from mocoq.train import USER_ERRORS, ConfigError, _first_line, _root_cause

EXPORT_FORMAT = "mocoq-backbone"
EXPORT_FORMAT_VERSION = 1
ENCODERS = ("query", "key")
FEATURE_KINDS = ("backbone", "head")
PRECISIONS = ("32-true", "bf16-mixed")
RUN_CONFIG = Path(".hydra") / "config.yaml"


class FeatureExtractor(nn.Module):
    """Images (N, C, H, W) -> backbone features (N, F), or projections (N, D) through ``head``.

    With ``channels_last`` the images (and the backbone's weights) are laid out channels-last,
    as the training module does: same values, the layout the run's kernels were fastest in.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module | None = None, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.channels_last = channels_last
        if channels_last:
            backbone.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, F) features, or (N, D) head outputs (not normalised)."""
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        return features if self.head is None else self.head(features)


@dataclass
class LoadedEncoder:
    """A pre-trained encoder, in eval mode, with the config that trained it.

    Attributes:
        backbone: images (N, C, H, W) -> features (N, ``feature_dim``); the query backbone of a
            checkpoint, or the backbone an export holds (see ``encoder``).
        feature_dim: F.
        config: the composed training config (``dataset``, ``backbone``, ``head``, ``model``...).
        source: the checkpoint or exported file read.
        kind: ``checkpoint`` or ``export``.
        encoder: which encoder ``backbone`` (and ``head``) is: ``query``, or ``key`` for an
            export of the EMA encoder.
        step, epoch: the training position of the weights, where known.
        head: the projection head (F -> D) of a checkpoint; None for an export.
        key_backbone, key_head: the EMA key encoder, when loaded with ``key_encoder=True``.
        config_path: where the config came from (the run's YAML, or the export's sidecar).
    """

    backbone: nn.Module
    feature_dim: int
    config: DictConfig
    source: Path
    kind: str
    encoder: str = "query"
    step: int | None = None
    epoch: int | None = None
    head: nn.Module | None = None
    key_backbone: nn.Module | None = None
    key_head: nn.Module | None = None
    config_path: Path | None = None

    @property
    def channels_last(self) -> bool:
        """Whether the run kept its backbones channels-last (``model.channels_last``)."""
        model = self.config.get("model")
        return bool(model.get("channels_last", False)) if isinstance(model, DictConfig) else False

    def describe(self) -> str:
        """One line: the file, the position and the encoder."""
        position = f"step {self.step}" if self.step is not None else "step unknown"
        return f"{self.source} ({self.kind}, {position}, {self.encoder} encoder)"

    def extractor(self, features: str = "backbone", encoder: str = "query") -> FeatureExtractor:
        """The module mapping images (N, C, H, W) to ``features`` of ``encoder``.

        Args:
            features: ``backbone`` (N, F) or ``head`` (N, D), the projection-head output.
            encoder: ``query`` or ``key`` (a checkpoint loaded with ``key_encoder=True``). An
                exported backbone holds one encoder: ask for ``query``.
        """
        if features not in FEATURE_KINDS:
            raise ConfigError(f"features must be among {list(FEATURE_KINDS)}, got {features!r}")
        if encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if encoder == "key" and self.kind == "export":
            raise ConfigError(
                f"encoder=key applies to checkpoints: {self.source} is an exported backbone (the "
                f"{self.encoder} encoder); evaluate it with encoder=query"
            )
        backbone, head = self.backbone, self.head
        if encoder == "key":
            if self.key_backbone is None:
                raise ConfigError("the key encoder was not loaded: load_encoder(key_encoder=True)")
            backbone, head = self.key_backbone, self.key_head
        if features == "head" and head is None:
            raise ConfigError(
                f"{self.source} has no projection head (an exported backbone): use "
                "features=[backbone], or evaluate the checkpoint it was exported from"
            )
        return FeatureExtractor(backbone, head if features == "head" else None, self.channels_last)

    def baseline(self, name: str, seed: int = 0) -> FeatureExtractor:
        """A reference extractor evaluated with the same protocol as the trained encoder.

        Args:
            name: ``random_init``: the same backbone built from the run's config with fresh
                weights (drawn from ``seed``; eval mode, so BatchNorm uses its initial running
                statistics), features (N, F); ``raw_pixels``: the normalised images themselves,
                flattened, features (N, C * H * W).
            seed: the random initialisation's seed.
        """
        if name == "raw_pixels":
            return FeatureExtractor(nn.Flatten())
        if name != "random_init":
            raise ConfigError(f"baseline must be null, random_init or raw_pixels, got {name!r}")
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            backbone = build_backbone(self.config, f"{self.source}'s config").eval()
        finally:
            torch.random.set_rng_state(state)
        return FeatureExtractor(backbone, None, self.channels_last)

    def to(self, device: torch.device | str) -> LoadedEncoder:
        """Move every module to ``device`` (in place); returns self."""
        for module in (self.backbone, self.head, self.key_backbone, self.key_head):
            if module is not None:
                module.to(device)
        return self


# --- finding and reading files -------------------------------------------------------------


def resolve_source(path: str | os.PathLike[str]) -> Path:
    """The file behind ``checkpoint=<path>``: a file as is; a run directory's newest of
    ``checkpoints/last.ckpt`` and ``hpc_ckpt_<N>.ckpt`` (Lightning's SLURM requeue file)."""
    file = Path(path).expanduser()
    if file.is_dir():
        candidates = (file / "checkpoints" / "last.ckpt", *file.glob("hpc_ckpt_*.ckpt"))
        saved = [p for p in candidates if p.is_file()]
        if not saved:
            raise ConfigError(
                f"checkpoint={path} is a folder without checkpoints/last.ckpt: give a checkpoint "
                "file, a run directory or an exported backbone (.pt)"
            )
        return max(saved, key=lambda p: p.stat().st_mtime)
    if not file.is_file():
        raise ConfigError(
            f"checkpoint={path} does not exist: give a mocoq checkpoint (.ckpt), a run directory "
            "or an exported backbone (.pt with its .json)"
        )
    return file


def sidecar_path(weights: Path) -> Path:
    """The JSON beside an exported backbone: same folder and stem, ``.json``."""
    return weights.with_suffix(".json")


def find_run_config(checkpoint: Path) -> Path | None:
    """The run's ``.hydra/config.yaml`` for ``<run dir>/checkpoints/x.ckpt`` (or a checkpoint
    in the run directory itself, as Lightning's ``hpc_ckpt_<N>.ckpt``), if present."""
    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        if (run_dir / RUN_CONFIG).is_file():
            return run_dir / RUN_CONFIG
    return None


def _run_dir_of(checkpoint: Path) -> Path:
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def load_run_config(path: str | os.PathLike[str], run_dir: Path | None = None) -> DictConfig:
    """A run's composed training config (``.hydra/config.yaml``).

    ``run_dir``, when given, replaces a ``run_dir`` that is an interpolation (Hydra's
    ``${hydra:runtime.output_dir}`` means nothing outside the training job).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"config={path} does not exist: give the run's composed config "
            "(<run dir>/.hydra/config.yaml)"
        )
    try:
        cfg = OmegaConf.load(file)
    except Exception as error:
        raise ConfigError(
            f"config={path} is not a readable YAML file: {_first_line(error)}"
        ) from error
    if not isinstance(cfg, DictConfig) or "backbone" not in cfg:
        raise ConfigError(
            f"config={path} has no 'backbone' section: give the composed training config "
            "(<run dir>/.hydra/config.yaml), not an experiment or group file"
        )
    if run_dir is not None and "run_dir" in cfg and OmegaConf.is_interpolation(cfg, "run_dir"):
        cfg.run_dir = str(run_dir)
    return cfg


def read_checkpoint(file: Path) -> dict[str, Any]:
    """A Lightning checkpoint as a dict with a ``state_dict``; ConfigError when it is not one."""
    try:
        # A Lightning checkpoint holds more than tensors (loop state, hyper-parameters): only
        # open checkpoints you trust.
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(
            f"checkpoint={file} is not a readable checkpoint (truncated, or not a file written "
            f"by torch.save): {_first_line(error)}"
        ) from error
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(
            f"checkpoint={file} holds no 'state_dict': give a checkpoint written by mocoq-train "
            f"(checkpoints/*.ckpt), or an exported backbone with its {sidecar_path(file).name}"
        )
    return checkpoint


def _weights_with_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def fit_problems(module: nn.Module, weights: dict[str, Tensor]) -> str | None:
    """Why ``weights`` do not load strictly into ``module`` (missing or unexpected keys, other
    shapes), in a few words; None when they fit."""
    own = module.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    shapes = [
        f"{key}: file {tuple(weights[key].shape)}, model {tuple(own[key].shape)}"
        for key in own
        if key in weights and tuple(weights[key].shape) != tuple(own[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} other shapes (e.g. {shapes[0]})")
    return "; ".join(problems) or None


def _load_strict(module: nn.Module, weights: dict[str, Tensor], what: str, hint: str) -> None:
    problems = fit_problems(module, weights)
    if problems is not None:
        raise ConfigError(
            f"the {what} weights do not fit the {what} of the config: {problems}; {hint}"
        )
    module.load_state_dict(weights, strict=True)
    module.eval()


def _instantiate(node: Any, what: str, origin: str) -> Any:
    try:
        return instantiate(node)
    except (InstantiationException, OmegaConfBaseException, ValueError, TypeError) as error:
        cause = _first_line(_root_cause(error))
        raise ConfigError(f"cannot build the {what} described by {origin}: {cause}") from error


def build_backbone(config: DictConfig, origin: str) -> nn.Module:
    """The (randomly initialised) backbone of ``config.backbone``, with its ``out_dim``."""
    if "backbone" not in config:
        raise ConfigError(f"{origin} has no 'backbone' section")
    backbone = _instantiate(config.backbone, "backbone", origin)
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "out_dim"):
        raise ConfigError(f"the backbone of {origin} is not an nn.Module with an 'out_dim'")
    return backbone


def build_head(config: DictConfig, feature_dim: int, origin: str) -> nn.Module:
    """The projection head of ``config.head`` (a partial, called with F)."""
    head = _instantiate(config.head, "head", origin)
    module = head(feature_dim) if callable(head) and not isinstance(head, nn.Module) else head
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the head of {origin} is not an nn.Module")
    return module


# --- loading -------------------------------------------------------------------------------


def load_encoder(
    path: str | os.PathLike[str],
    config: str | os.PathLike[str] | DictConfig | None = None,
    key_encoder: bool = False,
) -> LoadedEncoder:
    """Load a pre-trained encoder for evaluation, in eval mode on the CPU.

    Args:
        path: a mocoq checkpoint (``.ckpt``), a run directory (its ``checkpoints/last.ckpt``) or
            an exported backbone (a ``.pt`` whose ``.json`` sidecar lies beside it).
        config: the training config for a checkpoint whose run directory has no
            ``.hydra/config.yaml`` (a path, or a composed DictConfig); exports carry their own.
        key_encoder: also load the EMA key encoder (``key_backbone``, ``key_head``) of a
            checkpoint.

    Raises:
        ConfigError: a missing or unreadable file, no config for a checkpoint, or weights that do
            not fit the modules the config builds; the message names what to change.
    """
    file = resolve_source(path)
    if file.suffix != ".ckpt" and sidecar_path(file).is_file():
        if key_encoder:
            raise ConfigError(
                f"{file} is an exported backbone: it holds one encoder and no key encoder; "
                "export the key encoder with mocoq-export encoder=key"
            )
        return _load_export(file)
    return _load_checkpoint(file, config, key_encoder)


def _load_checkpoint(
    file: Path, config: str | os.PathLike[str] | DictConfig | None, key_encoder: bool
) -> LoadedEncoder:
    checkpoint = read_checkpoint(file)
    state: dict[str, Tensor] = checkpoint["state_dict"]
    if not any(key.startswith("backbone.") for key in state):
        raise ConfigError(
            f"checkpoint={file} holds no 'backbone.*' weights: not a mocoq checkpoint "
            "(a MoCoModule's state dict)"
        )
    run_dir = _run_dir_of(file)
    config_path: Path | None
    if isinstance(config, DictConfig):
        cfg, config_path, origin = config, None, "the given config"
    else:
        config_path = Path(config).expanduser() if config is not None else find_run_config(file)
        if config_path is None:
            raise ConfigError(
                f"no training config for checkpoint={file}: {run_dir / RUN_CONFIG} is missing; "
                "pass the run's composed config with config=<path to its config.yaml>"
            )
        cfg = load_run_config(config_path, run_dir)
        origin = str(config_path)
    hint = (
        f"pass the config the checkpoint was trained with (config=<its .hydra/config.yaml>, "
        f"now {origin})"
    )
    backbone = build_backbone(cfg, origin)
    _load_strict(backbone, _weights_with_prefix(state, "backbone."), "backbone", hint)
    feature_dim = int(backbone.out_dim)  # type: ignore[arg-type]
    head = None
    if "head" in cfg and any(key.startswith("head.") for key in state):
        head = build_head(cfg, feature_dim, origin)
        _load_strict(head, _weights_with_prefix(state, "head."), "head", hint)
    key_backbone = key_head = None
    if key_encoder:
        if not any(key.startswith("key_backbone.") for key in state):
            raise ConfigError(f"checkpoint={file} holds no key encoder ('key_backbone.*')")
        key_backbone = build_backbone(cfg, origin)
        weights = _weights_with_prefix(state, "key_backbone.")
        _load_strict(key_backbone, weights, "key backbone", hint)
        if head is not None:
            key_head = build_head(cfg, feature_dim, origin)
            _load_strict(key_head, _weights_with_prefix(state, "key_head."), "key head", hint)
    return LoadedEncoder(
        backbone=backbone,
        feature_dim=feature_dim,
        config=cfg,
        source=file,
        kind="checkpoint",
        step=_int_or_none(checkpoint.get("global_step")),
        epoch=_int_or_none(checkpoint.get("epoch")),
        head=head,
        key_backbone=key_backbone,
        key_head=key_head,
        config_path=config_path,
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def read_sidecar(weights: Path) -> dict[str, Any]:
    """The JSON sidecar of an exported backbone, checked for the fields loading needs."""
    file = sidecar_path(weights)
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{file} is not a readable JSON sidecar: {_first_line(error)}") from error
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(
            f'{file} is not a mocoq-export sidecar (no "format": "{EXPORT_FORMAT}"): '
            f"re-export the backbone with mocoq-export"
        )
    if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise ConfigError(
            f"{file} has format_version {meta['format_version']}, newer than this mocoq reads "
            f"({EXPORT_FORMAT_VERSION}): update mocoq"
        )
    architecture = meta.get("architecture")
    if not isinstance(architecture, dict) or not isinstance(architecture.get("backbone"), dict):
        raise ConfigError(f"{file} has no architecture.backbone: re-export with mocoq-export")
    return meta


def _load_export(file: Path) -> LoadedEncoder:
    meta = read_sidecar(file)
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"{file} is not a readable exported backbone (truncated, or not a torch.save'd "
            f"state dict): {_first_line(error)}"
        ) from error
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ConfigError(f"{file} is not a state dict (a dict of tensors): re-export it")
    origin = str(sidecar_path(file))
    backbone = _instantiate(OmegaConf.create(meta["architecture"]["backbone"]), "backbone", origin)
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "out_dim"):
        raise ConfigError(f"the backbone of {origin} is not an nn.Module with an 'out_dim'")
    hint = f"keep {file.name} with the {sidecar_path(file).name} written beside it"
    _load_strict(backbone, weights, "backbone", hint)
    source = meta.get("source") or {}
    config = OmegaConf.create(meta.get("config") or {"backbone": meta["architecture"]["backbone"]})
    return LoadedEncoder(
        backbone=backbone,
        feature_dim=int(backbone.out_dim),  # type: ignore[arg-type]
        config=config,
        source=file,
        kind="export",
        encoder=str(meta.get("encoder", "query")),
        step=_int_or_none(source.get("global_step")),
        epoch=_int_or_none(source.get("epoch")),
        config_path=sidecar_path(file),
    )


# --- data ----------------------------------------------------------------------------------


def evaluation_config(training: DictConfig, dataset: DictConfig | None) -> DictConfig:
    """The training config with the dataset to evaluate on.

    ``dataset`` None keeps the run's dataset; a whole dataset config (one with a ``_target_``,
    e.g. from ``dataset=cifar10``) replaces it; a partial one (``+dataset.root=/data``) changes
    the run's dataset field by field. Interpolations resolve against the returned config.
    """
    cfg = copy.deepcopy(training)
    OmegaConf.set_struct(cfg, False)
    given: Any = None if dataset is None else OmegaConf.to_container(dataset, resolve=False)
    if given and "_target_" in given:
        cfg.dataset = given
    elif "dataset" not in cfg or not isinstance(cfg.dataset, DictConfig):
        raise ConfigError(
            "the training config has no dataset section: choose the data with dataset=<name> "
            "(an option of conf/dataset)"
        )
    elif given:
        cfg.dataset = OmegaConf.merge(cfg.dataset, given)
    return cfg


def evaluation_datamodule(encoder: LoadedEncoder, dataset: DictConfig | None) -> MoCoDataModule:
    """The clean-image datamodule of the evaluation data (see :func:`evaluation_config`).

    Its ``clean_dataloader(split)`` gives batches of un-augmented, normalised images
    (N, C, S, S) with targets (N,). The channels must be those the encoder was trained on.
    """
    cfg = evaluation_config(encoder.config, dataset)
    try:
        datamodule = instantiate(cfg.dataset, _partial_=True)(
            augment=functools.partial(EvalTransform), seed=int(cfg.get("seed", 0))
        )
    except (InstantiationException, OmegaConfBaseException, ValueError, TypeError) as error:
        cause = _first_line(_root_cause(error))
        raise ConfigError(f"cannot build the evaluation data: {cause}") from error
    if not isinstance(datamodule, MoCoDataModule):
        raise ConfigError("dataset._target_ must build a mocoq.data.datamodule.MoCoDataModule")
    trained = encoder.config.get("dataset")
    expected = trained.get("channels") if isinstance(trained, DictConfig) else None
    if expected is not None and int(expected) != datamodule.channels:
        raise ConfigError(
            f"the encoder was trained on {int(expected)}-channel images but the evaluation data "
            f"has dataset.channels={datamodule.channels}: evaluate on {int(expected)}-channel data"
        )
    return datamodule


# --- running the tools ---------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` (the GPU when there is one, else the CPU) or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device={name} is not a device: use auto, cpu or cuda[:N]") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is visible: use device=cpu (or auto)")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context of the encoder's forward: nothing for ``32-true``, bf16 autocast for
    ``bf16-mixed`` (about 2x faster feature extraction on GPUs; features come out float32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "32-true":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary path)`` in ``path``'s folder, then rename it to ``path``: a reader
    sees the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text))


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as plain containers, resolved where it can be: a top-level key whose
    interpolations cannot be resolved outside its job is kept as written."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if isinstance(resolved, dict):
            return {str(key): value for key, value in resolved.items()}
    except Exception:  # a resolver failing outside its context (e.g. ${hydra:...})
        pass
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    plain: dict[str, Any] = {}
    for key, written in raw.items():
        try:
            value = cfg[key]
            plain[str(key)] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except Exception:
            plain[str(key)] = written
    return plain


def require_checkpoint(cfg: DictConfig, tool: str) -> str:
    """The ``checkpoint`` option of a tool's config; ConfigError with the usage when unset."""
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError(
            f"checkpoint is required: {tool} checkpoint=<run directory, .ckpt file or exported .pt>"
        )
    return str(cfg.checkpoint)


@contextlib.contextmanager
def one_line_errors(tool: str) -> Iterator[None]:
    """Turn the user's errors (a bad path, a bad value) into ``<tool>: error: <message>`` on
    stderr and exit code 2, as ``mocoq-train`` does; ``HYDRA_FULL_ERROR=1`` keeps the
    traceback. Other exceptions (bugs) propagate."""
    try:
        yield
    except (InstantiationException, OmegaConfBaseException, *USER_ERRORS) as error:
        cause = _root_cause(error)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(
            cause, (OmegaConfBaseException, *USER_ERRORS)
        ):
            raise
        print(
            f"{tool}: error: {_first_line(cause)}\n(set HYDRA_FULL_ERROR=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(2)

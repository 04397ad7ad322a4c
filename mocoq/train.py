"""``mocoq-train``: compose the config with Hydra, build the parts, fit, report.

This is the only module that knows about Hydra. Usage::

    mocoq-train                                   # MoCo v2 on Fashion-MNIST, CPU
    mocoq-train dataset=cifar10 backbone=resnet18 method=mocov2plus trainer=gpu
    mocoq-train experiment=mocov2_r18_cifar10_200ep dataset.root=~/data/cifar10
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mocoq.budget import first_planned_note
from mocoq.callbacks import KNNMonitor, PreemptionCheckpoint, TimeBudget
from mocoq.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from mocoq.data.datamodule import MoCoDataModule
from mocoq.eval.features import KNNResult, embed, flatten_pixels, knn_evaluate_many
from mocoq.module import MoCoModule, NonFiniteError
from mocoq.validate import (
    ConfigError,
    check_output_dir_arguments,
    check_resume_checkpoint,
    validate_config,
)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("mocoq")


class _DropAdverts(logging.Filter):
    """Keeps Lightning's product tips out of the training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())


def cpu_precision() -> str:
    """``bf16-mixed`` where the CPU has native bf16 (about 2x faster here), else ``32-true``."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return "bf16-mixed" if supported is not None and supported() else "32-true"


OmegaConf.register_new_resolver("mocoq.cpu_precision", cpu_precision, replace=True)


LR_SCALING_RULES = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The learning rate for ``global_batch`` images per step, given ``base_lr`` for
    ``reference_batch``: ``linear`` multiplies by the ratio (Goyal et al. 2017), ``sqrt`` by its
    square root, ``none`` keeps ``base_lr``."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"lr_scaling.rule must be one of {LR_SCALING_RULES}, got {rule!r}")
    if reference_batch < 1:
        raise ValueError(f"lr_scaling.reference_batch_size must be positive, got {reference_batch}")
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": ratio**0.5, "none": 1.0}[rule]


def build(cfg: DictConfig) -> tuple[MoCoDataModule, MoCoModule, pl.Trainer]:
    """Instantiate the datamodule, the module and the trainer from a composed config."""
    validate_config(cfg)
    # Built objects are passed to partials, not as instantiate() kwargs: Hydra would turn a
    # dataclass argument (LRSchedule) back into a config node.
    datamodule: MoCoDataModule = instantiate(cfg.dataset, _partial_=True)(
        augment=instantiate(cfg.augment),
        seed=cfg.seed,
        clean_view=bool(cfg.model.get("online_probe", False)),  # the probe learns from it
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    budget = cfg.get("budget") or {}
    if budget.get("minutes") is not None:  # the run's length comes from its measured step rate
        callbacks.append(
            TimeBudget(
                float(budget["minutes"]),
                skip_steps=int(budget.get("skip_steps", 10)),
                timed_steps=int(budget.get("timed_steps", 50)),
                reserve=float(budget.get("reserve", 0.05)),
                check_at=None if budget.get("check_at") is None else float(budget["check_at"]),
            )
        )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(cfg.trainer, _partial_=True)(
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],  # a checkpoint is whole or absent, never half-written
    )
    optimizer_overrides = {}
    if "lr" in cfg.optim:
        global_batch = datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        scaling = cfg.get("lr_scaling") or {}
        reference = int(scaling.get("reference_batch_size", global_batch))
        rule = str(scaling.get("rule", "none"))
        optimizer_overrides["lr"] = scaled_lr(float(cfg.optim.lr), global_batch, reference, rule)
        log.info(
            "learning rate %.4g: optim.lr=%.4g for %d images, %s-scaled to the global batch of %d",
            optimizer_overrides["lr"],
            cfg.optim.lr,
            reference,
            rule,
            global_batch,
        )
    model: MoCoModule = instantiate(cfg.model, _partial_=True)(
        backbone=instantiate(cfg.backbone),
        head=instantiate(cfg.head),
        optimizer=instantiate(cfg.optim, **optimizer_overrides),
        lr_schedule=instantiate(cfg.schedule),
    )
    model.check_batch_fits(datamodule.batch_size, trainer.world_size)  # before any output
    return datamodule, model, trainer


def load_initial_weights(model: MoCoModule, path: str) -> None:
    """Start ``model`` from a checkpoint's encoder and head weights (query and key), without its
    queue, optimizer, schedule or data position: a new run from old weights."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"init_weights={path} does not exist: give a mocoq checkpoint file")
    try:
        # A Lightning checkpoint holds more than tensors (loop state, hyper-parameters).
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(f"init_weights={path} is not a readable checkpoint: {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"init_weights={path} holds no state dict")
    weights = {k: v for k, v in state.items() if not k.startswith("queue.")}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a shape mismatch: another backbone or head
        first = str(error).strip().splitlines()[-1].strip()
        raise ConfigError(f"init_weights={path} does not fit this model: {first}") from error
    missing = [k for k in missing if not k.startswith("queue.")]
    if missing or unexpected:
        raise ConfigError(
            f"init_weights={path} does not fit this model: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "use the backbone and head the checkpoint was trained with"
        )
    log.info("encoder weights initialised from %s (queue, optimizer and position are new)", file)


def raw_pixel_knn(datamodule: MoCoDataModule, monitor: KNNMonitor) -> list[KNNResult]:
    """kNN on normalised raw pixels with the monitor's bank and query splits and T, at its k
    and then each of its ``extra_k``; empty without a bank or query split."""
    bank_loader, val_loader = datamodule.knn_bank_dataloader(), datamodule.knn_val_dataloader()
    if bank_loader is None or val_loader is None:
        return []
    bank, bank_labels = embed(flatten_pixels, bank_loader)
    queries, query_labels = embed(flatten_pixels, val_loader)
    ks = [monitor.k, *monitor.extra_k]
    return knn_evaluate_many(bank, bank_labels, queries, query_labels, ks, monitor.temperature)


def size_from_command_line(cfg: DictConfig, overrides: list[str]) -> None:
    """Let the command line's ``trainer.max_epochs`` or ``trainer.max_steps`` size a run whose
    config (e.g. its experiment) gives a time budget: the budget is switched off, with a log
    line. Both on the command line is an error (they size the same run two ways)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    sized = sorted(keys & {"trainer.max_epochs", "trainer.max_steps"})
    if not sized or OmegaConf.select(cfg, "budget.minutes") is None:
        return
    if "budget.minutes" in keys:
        raise ConfigError(
            f"budget.minutes and {' and '.join(sized)} both size the run: give one of them "
            "(budget.minutes=null trains by epochs or steps)"
        )
    with open_dict(cfg):
        cfg.budget.minutes = None
    log.info("%s on the command line sizes the run (budget.minutes is not used)", sized[0])


def _share_log_file(name: str) -> None:
    """Send a non-propagating library logger to Hydra's ``train.log`` too."""
    library = logging.getLogger(name)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler not in library.handlers:
            library.addHandler(handler)


def _resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        # The newest of the periodic last.ckpt and the checkpoints Lightning writes on SLURM's
        # requeue signal (hpc_ckpt_<N>.ckpt in the run directory, its default_root_dir).
        last = run_dir / "checkpoints" / "last.ckpt"
        saved = [p for p in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
        if saved:
            return str(max(saved, key=lambda p: p.stat().st_mtime))
        log.warning("ckpt_path=last: no %s yet, starting a fresh run", last)
        return None
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist: give a checkpoint file or 'last'")
    return str(path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train with a composed config and return the summary written to ``summary.json``."""
    run_dir = Path(cfg.run_dir)
    _share_log_file("pytorch_lightning")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    datamodule.setup("fit")  # fail on missing data before any output is written
    ckpt_path = _resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if ckpt_path is not None:  # before the loggers touch the run's files
        check_resume_checkpoint(ckpt_path, model)
    config = OmegaConf.to_container(cfg, resolve=True)  # resolved once, logged at start and end
    for logger in trainer.loggers:
        logger.log_hyperparams(config)  # type: ignore[arg-type]
    if cfg.get("init_weights"):
        if ckpt_path is None:
            load_initial_weights(model, str(cfg.init_weights))
        else:  # e.g. a requeued job: the checkpoint continues the run init_weights started
            log.info("resuming %s: init_weights is not applied again", ckpt_path)
    preemption = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)  # type: ignore[attr-defined]
    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning stops on SIGTERM once the step is done
        # Under SLURM the job must end as stopped, not as done: it has been requeued (or will
        # be), and its launcher must not record a result for it.
        if preemption is None or preemption.saved is None or SLURMEnvironment.detect():
            raise
    if preemption is not None and preemption.saved is not None:
        return _preempted(preemption, run_dir, trainer)

    monitor = next((c for c in trainer.callbacks if isinstance(c, KNNMonitor)), None)  # type: ignore[attr-defined]
    budget = next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)  # type: ignore[attr-defined]
    per_epoch = model.steps_per_epoch()
    by_steps = trainer.max_steps > 0  # sized in steps, or by a budget's plan
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        # A run sized in steps ends where they run out: a fraction of its last epoch.
        "epochs": round(trainer.global_step / per_epoch, 4) if by_steps else trainer.current_epoch,
        "steps": trainer.global_step,
        "steps_per_epoch": per_epoch,
        # trainer.fit's wall time: training, the kNN monitor's evaluations and checkpointing
        # (this process's part of the run when it was resumed)
        "fit_seconds": round(time.perf_counter() - started, 1),
        "dataset": {"bank": datamodule.bank_split, "queries": datamodule.val_split},
    }
    if budget is not None and budget.plan is not None:
        summary["budget"] = budget.plan.to_dict()
    if monitor is not None:
        summary["knn_monitor_seconds"] = round(monitor.seconds, 1)
        summary["knn_full_protocol_seconds"] = round(monitor.full_seconds, 1)
        summary["knn_monitor_share"] = round(monitor.share, 4)
        summary["knn_share_total"] = round(monitor.share_total, 4)
        # At the monitor's k (the keys "knn", ...) and at each of its extra_k ("..._extra").
        if monitor.last is not None:
            summary["knn"] = asdict(monitor.last)
            summary["knn_extra"] = [asdict(r) for r in monitor.last_extra]
        if monitor.initial is not None:
            summary["knn_random_init"] = asdict(monitor.initial)
            summary["knn_random_init_extra"] = [asdict(r) for r in monitor.initial_extra]
        if cfg.report.raw_pixel_baseline and trainer.is_global_zero:
            baseline = raw_pixel_knn(datamodule, monitor)
            if baseline:
                summary["knn_raw_pixels"] = asdict(baseline[0])
                summary["knn_raw_pixels_extra"] = [asdict(r) for r in baseline[1:]]
    log_hparams_with_results(trainer, config, summary)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary))
    return summary


def _preempted(
    preemption: PreemptionCheckpoint, run_dir: Path, trainer: pl.Trainer
) -> dict[str, Any]:
    """The summary of a run stopped by a signal: where its checkpoint is and how to go on."""
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(preemption.saved),
        "epochs": trainer.current_epoch,
        "steps": preemption.step,
        "stopped_by": preemption.signal_name,
    }
    if trainer.is_global_zero:
        print(
            f"\nStopped by {preemption.signal_name} after step {preemption.step}: saved "
            f"{preemption.saved}\nContinue with: mocoq-train resume={run_dir}"
        )
    return summary


def _knn_rows(summary: dict[str, Any], key: str) -> dict[int, dict[str, Any]]:
    """The results of one encoder in ``summary`` (``knn``, ``knn_raw_pixels``, ...) by k."""
    rows = [summary[key], *summary.get(f"{key}_extra", [])] if key in summary else []
    return {int(row["k"]): row for row in rows}


def log_hparams_with_results(trainer: pl.Trainer, config: Any, summary: dict[str, Any]) -> None:
    """Write the config with the run's final numbers to TensorBoard's HParams tab: the steps
    (and epochs) trained, and kNN top-1 of the encoder and of raw pixels at every k reported."""
    metrics = {"hparams/steps": float(summary["steps"]), "hparams/epochs": summary["epochs"]}
    if "knn" in summary:
        metrics["hparams/knn_top1"] = summary["knn"]["top1"]
        metrics["hparams/knn_top5"] = summary["knn"]["top5"]
    for key, name in (("knn", "knn"), ("knn_raw_pixels", "raw_pixels")):
        for k, row in _knn_rows(summary, key).items():
            metrics[f"hparams/{name}_top1_k{k}"] = row["top1"]
    if "budget" in summary:
        metrics["hparams/budget_minutes"] = summary["budget"]["minutes"]
        metrics["hparams/steps_per_second"] = summary["budget"]["steps_per_second"]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(config, metrics=metrics, step=summary["steps"])


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report: where things are, what the budget bought, and the kNN numbers
    of the encoder beside its baselines at every k reported, with the gap to raw pixels."""
    lines = [
        "",
        f"Run directory : {summary['run_dir']}",
        f"Checkpoint    : {summary['checkpoint']}",
        f"TensorBoard   : tensorboard --logdir {summary['run_dir']}",
    ]
    plan = summary.get("budget")
    if plan:
        lines.append(
            f"Budget        : {plan['minutes']:g} min bought {plan['total_steps']:,} steps "
            f"({plan['epochs']:.2f} epochs{first_planned_note(plan.get('first_total'))}) at "
            f"{plan['steps_per_second']:.3g} steps/s, measured "
            f"over steps {plan['measured_from']}-{plan['measured_to']}; fit took "
            f"{summary['fit_seconds'] / 60:.1f} min"
        )
    encoder = _knn_rows(summary, "knn")
    if encoder:
        knn = summary["knn"]
        split = summary["dataset"]
        ks = list(encoder)
        lines.append(
            f"kNN top-1 on '{split['queries']}' (bank '{split['bank']}', T={knn['temperature']}, "
            "cosine):".ljust(54)
            + "".join(f"{f'k={k}':>9}" for k in ks)
        )
        rows = [(f"mocoq encoder ({round(summary['epochs'], 2):g} epochs)", encoder)]
        for key, label in (("knn_random_init", "random init"), ("knn_raw_pixels", "raw pixels")):
            if key in summary:
                rows.append((label, _knn_rows(summary, key)))
        for label, row in rows:
            cells = "".join(f"{row[k]['top1']:>9.4f}" if k in row else " " * 9 for k in ks)
            lines.append(f"  {label:<52}{cells}")
        pixels = _knn_rows(summary, "knn_raw_pixels")
        if pixels:
            gaps = "".join(
                f"{100 * (encoder[k]['top1'] - pixels[k]['top1']):>+9.2f}" if k in pixels else ""
                for k in ks
            )
            lines.append(f"  {'encoder - raw pixels (points)':<52}{gaps}")
    if "knn_monitor_share" in summary:
        lines.append(
            f"kNN cost      : monitoring {100 * summary['knn_monitor_share']:.1f}% of training "
            f"time; {summary['knn_full_protocol_seconds']:.0f} s in full-protocol evaluations "
            f"({100 * summary['knn_share_total']:.1f}% with them)"
        )
    return "\n".join(lines)


def _first_line(error: BaseException) -> str:
    """The line a user needs from an error's message. An error raised in a data-loading worker
    arrives as "Caught <Error> in DataLoader worker process N. Original Traceback ...": its own
    message is the last line of that text, after "<Error>: "."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = [line.strip() for line in text.splitlines()]
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        last = lines[-1].strip()
        name = type(error).__name__
        return last[len(name) + 2 :] if last.startswith(f"{name}: ") else last
    return lines[0]


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


# Errors that mean "change your command or your files", shown as one line without a traceback.
USER_ERRORS = (
    ValueError,
    NonFiniteError,  # the run stopped at a non-finite step: the message says what to change
    CheckpointWriteError,  # a full disk or an unwritable folder: the message says which
    FileNotFoundError,
    NotADirectoryError,
    MissingMandatoryValue,
    MisconfigurationException,  # Lightning's word for an impossible trainer setting
)


def resume_arguments(arguments: list[str]) -> list[str]:
    """Expand ``resume=<run dir>`` into the overrides that continue that run in place.

    The run's own overrides (Hydra saves them in ``<run dir>/.hydra/overrides.yaml``) come
    first, then ``hydra.run.dir=<run dir> ckpt_path=last``, then the other arguments, which win
    over the saved ones (e.g. ``trainer.devices=8`` to continue on more GPUs). Arguments without
    ``resume=`` are returned unchanged.
    """
    chosen = [a for a in arguments if a.startswith("resume=")]
    if not chosen:
        return arguments
    run_dir = Path(chosen[-1].split("=", 1)[1]).expanduser()
    saved_overrides = run_dir / ".hydra" / "overrides.yaml"
    checkpoints = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    if not any(path.is_file() for path in checkpoints):
        raise ConfigError(
            f"resume={run_dir}: no checkpoints/last.ckpt (or hpc_ckpt_<N>.ckpt) there; give the "
            "directory of a run (the 'Run directory' its report printed)"
        )
    if not saved_overrides.is_file():
        raise ConfigError(
            f"resume={run_dir}: {saved_overrides} is missing; resume with "
            f"ckpt_path={run_dir}/checkpoints/last.ckpt and the run's overrides"
        )
    rest = [a for a in arguments if not a.startswith("resume=")]

    def key(argument: str) -> str:
        return argument.split("=", 1)[0].lstrip("+~")

    given = {key(a) for a in rest} | {"hydra.run.dir", "ckpt_path"}
    saved = [str(o) for o in OmegaConf.load(saved_overrides)]
    kept = [o for o in saved if key(o) not in given]
    return [*kept, f"hydra.run.dir={run_dir}", "ckpt_path=last", *rest]


def main() -> None:
    """Entry point of ``mocoq-train``: Hydra overrides, plus ``resume=<run dir>``."""
    arguments = sys.argv[1:]
    try:
        sys.argv[1:] = resume_arguments(arguments)
        check_output_dir_arguments(sys.argv[1:])  # Hydra creates the run directory first
    except ConfigError as error:
        print(f"mocoq-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    # Hydra rewrites <run dir>/.hydra/*.yaml before the run starts: a refused resume must not
    # leave its overrides there for the next resume= to replay.
    resumed = [a.split("=", 1)[1] for a in arguments if a.startswith("resume=")]
    saved = {}
    if resumed:
        hydra_dir = Path(resumed[-1]).expanduser() / ".hydra"
        saved = {path: path.read_bytes() for path in hydra_dir.glob("*.yaml")}
    try:
        _main()
    except SystemExit as exit:
        if exit.code not in (0, None):
            for path, content in saved.items():
                path.write_bytes(content)
        raise


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    """Compose, train and report; user errors become one line on stderr and exit code 2."""
    try:
        size_from_command_line(cfg, list(HydraConfig.get().overrides.task))
        run(cfg)
    except (InstantiationException, OmegaConfBaseException, *USER_ERRORS) as error:
        cause = _root_cause(error)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(
            cause, (OmegaConfBaseException, *USER_ERRORS)
        ):
            raise
        message = _first_line(cause)
        print(
            f"mocoq-train: error: {message}\n(set HYDRA_FULL_ERROR=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()

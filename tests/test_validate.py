"""mocoq.validate: bad values and unusable resume checkpoints become one-line ConfigErrors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from mocoq.backbones import SmallResNet
from mocoq.heads import ProjectionHead
from mocoq.module import MoCoModule
from mocoq.validate import (
    ConfigError,
    check_output_dir_arguments,
    check_resume_checkpoint,
    check_writable_dir,
    validate_config,
)

# --- validate_config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.temperature=0"], "model.temperature must be positive, got 0"),
        (["model.temperature=abc"], "model.temperature must be a number, got 'abc'"),
        (["model.ema_momentum=1.5"], "model.ema_momentum must be in [0, 1], got 1.5"),
        (["model.ema_momentum=-0.1"], "model.ema_momentum must be in [0, 1], got -0.1"),
        (["model.queue_size=0"], "model.queue_size must be at least 1, got 0"),
        (["model.queue_size=64.0"], "model.queue_size must be an integer, got 64.0"),
        (["head.out_dim=0"], "head.out_dim must be at least 1, got 0"),
        (["head.num_layers=0"], "head.num_layers must be at least 1, got 0"),
        (["dataset.batch_size=0"], "dataset.batch_size must be at least 1, got 0"),
        (["dataset.batch_size=-4"], "dataset.batch_size must be at least 1, got -4"),
        (["dataset.eval_batch_size=0"], "dataset.eval_batch_size must be at least 1, got 0"),
        (["dataset.image_size=1"], "dataset.image_size must be at least 2"),
        (
            ["dataset.image_size=32", "dataset.eval_resize=28"],
            "dataset.eval_resize=28 is smaller than dataset.image_size=32",
        ),
        (["optim.lr=0"], "optim.lr must be positive, got 0"),
        (["optim.lr=-0.1"], "optim.lr must be positive, got -0.1"),
        (["optim=adamw", "optim.lr=0"], "optim.lr must be positive, got 0"),
        (
            ["trainer.max_epochs=-1"],
            "trainer.max_epochs must be a number of epochs (0 or more), or -1",
        ),
        (
            ["trainer.max_epochs=-2"],
            "trainer.max_epochs must be a number of epochs (0 or more), or -1",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    overrides: list[str], message: str, make_cfg: Callable[..., DictConfig]
) -> None:
    with pytest.raises(ConfigError) as refused:
        validate_config(make_cfg(*overrides))
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.ema_momentum=0"],
        ["model.ema_momentum=1"],
        ["dataset.image_size=2"],
        ["dataset.image_size=32", "dataset.eval_resize=32"],
        ["dataset=imagenet", "dataset.root=/nowhere"],  # eval_resize 256 >= image_size 224
        ["dataset=image_folder"],  # dataset.root=??? is not read here
        ["trainer.max_epochs=0"],
        ["trainer.max_epochs=null"],
        ["trainer.max_epochs=-1", "trainer.max_steps=10"],
        ["trainer.max_epochs=-1", "trainer.fast_dev_run=true"],
        ["optim.lr=1e-4"],
    ],
)
def test_values_that_work_pass(overrides: list[str], make_cfg: Callable[..., DictConfig]) -> None:
    validate_config(make_cfg(*overrides))


def test_every_shipped_experiment_passes(make_cfg: Callable[..., DictConfig]) -> None:
    experiments = Path(__file__).resolve().parent.parent / "conf" / "experiment"
    for file in sorted(experiments.glob("*.yaml")):
        validate_config(make_cfg(f"experiment={file.stem}", tiny=False))


def test_run_dir_that_cannot_be_a_folder_is_refused(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("not a folder\n")
    with pytest.raises(ConfigError, match=r"run_dir=.*/afile/run is not a writable folder \("):
        validate_config(make_cfg(f"run_dir={tmp_path}/afile/run"))
    with pytest.raises(ConfigError, match="afile is a file, not a folder"):
        validate_config(make_cfg(f"run_dir={tmp_path}/afile/run"))
    validate_config(make_cfg(f"run_dir={tmp_path}/new/run"))  # created, as the run would
    assert (tmp_path / "new" / "run").is_dir()
    assert list((tmp_path / "new" / "run").iterdir()) == []  # the probe file is gone


def test_writable_dir_refuses_a_file_and_a_read_only_place(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x\n")
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*afile/run .*choose another"):
        check_writable_dir(str(tmp_path / "afile" / "run"), "hydra.run.dir")
    with pytest.raises(ConfigError, match=r"hydra.run.dir=/proc/mocoq-run is not a writable"):
        check_writable_dir("/proc/mocoq-run", "hydra.run.dir")  # even root cannot write there
    with pytest.raises(ConfigError, match="/proc is not a writable folder"):
        check_writable_dir("/proc", "hydra.run.dir")  # exists, but no file can be made in it


def test_output_dir_arguments(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x\n")
    bad = f"{tmp_path}/afile/run"
    with pytest.raises(ConfigError, match=f"hydra.run.dir={bad} is not a writable folder"):
        check_output_dir_arguments(["dataset=synthetic", f"hydra.run.dir={bad}"])
    # The last one counts, as in Hydra.
    check_output_dir_arguments([f"hydra.run.dir={bad}", f"hydra.run.dir={tmp_path}/ok"])
    with pytest.raises(ConfigError, match=r"hydra.run.dir"):
        check_output_dir_arguments([f"hydra.run.dir={bad}/" + "${now:%H-%M-%S}"])
    with pytest.raises(ConfigError, match=r"hydra.sweep.dir"):
        check_output_dir_arguments(["-m", f"hydra.sweep.dir={bad}"])
    check_output_dir_arguments(["-m", f"hydra.run.dir={bad}"])  # unused by a multirun
    check_output_dir_arguments(["--cfg", "job", f"hydra.run.dir={bad}"])  # creates nothing
    check_output_dir_arguments(["dataset=synthetic"])
    assert not (tmp_path / "outputs").exists()


# --- check_resume_checkpoint --------------------------------------------------------------


def make_module(
    queue_size: int = 32,
    out_dim: int = 8,
    widths: tuple[int, ...] = (8, 16),
    num_layers: int = 2,
    online_probe: bool = False,
) -> MoCoModule:
    """A small module whose queue, head and backbone can each be changed."""
    return MoCoModule(
        backbone=SmallResNet(1, widths=widths, blocks=(1,) * len(widths)),
        head=functools.partial(ProjectionHead, out_dim=out_dim, num_layers=num_layers),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        queue_size=queue_size,
        key_bn="none",
        online_probe=online_probe,
    )


def save_checkpoint(module: MoCoModule, path: Path, drop: tuple[str, ...] = ()) -> Path:
    """A file shaped like Lightning's training checkpoint (the parts the check reads)."""
    state = {k: v for k, v in module.state_dict().items() if k not in drop}
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "pytorch-lightning_version": "2",
        "state_dict": state,
        "optimizer_states": [{}],
        "loops": {},
    }
    torch.save(checkpoint, path)
    return path


def test_a_fitting_checkpoint_passes(tmp_path: Path) -> None:
    path = save_checkpoint(make_module(), tmp_path / "last.ckpt")
    check_resume_checkpoint(str(path), make_module())
    # Tolerated: a checkpoint from before queue.written_at, and the probe switched on or off
    # (MoCoModule.on_load_checkpoint refuses that itself, with its own message).
    old = save_checkpoint(make_module(), tmp_path / "old.ckpt", drop=("queue.written_at",))
    check_resume_checkpoint(str(old), make_module())
    check_resume_checkpoint(str(path), make_module(online_probe=True))
    probed = save_checkpoint(make_module(online_probe=True), tmp_path / "probe.ckpt")
    check_resume_checkpoint(str(probed), make_module())


def test_another_queue_size_is_named_with_both_values(tmp_path: Path) -> None:
    path = save_checkpoint(make_module(queue_size=32), tmp_path / "last.ckpt")
    with pytest.raises(ConfigError) as refused:
        check_resume_checkpoint(str(path), make_module(queue_size=64))
    message = str(refused.value)
    assert message.startswith(
        f"checkpoint {path} was trained with model.queue_size=32, this run has 64 "
        "(checkpoint queue holds 32 keys of dim 8, but this model's queue is 64 x 8): "
        "resume with model.queue_size=32"
    )
    assert f"init_weights=<checkpoint> (init_weights={path})" in message


def test_another_projection_dim_is_named(tmp_path: Path) -> None:
    path = save_checkpoint(make_module(out_dim=8), tmp_path / "last.ckpt")
    with pytest.raises(ConfigError) as refused:
        check_resume_checkpoint(str(path), make_module(out_dim=16))
    message = str(refused.value)
    assert message.startswith(
        f"checkpoint {path} was trained with head.out_dim=8, this run has 16 ("
    )
    assert "head.2.weight (8, 16) there, (16, 16) here" in message
    assert message.endswith("resume with head.out_dim=8")
    assert "init_weights" not in message  # the head would not load either


def test_another_backbone_is_named_with_the_first_differing_keys(tmp_path: Path) -> None:
    path = save_checkpoint(make_module(widths=(8, 16)), tmp_path / "last.ckpt")
    with pytest.raises(ConfigError) as refused:
        check_resume_checkpoint(str(path), make_module(widths=(8, 32)))
    message = str(refused.value)
    assert message.startswith(f"checkpoint {path} was trained with another backbone")
    assert "backbone.layers.1.0.conv1.weight (16, 8, 3, 3) there, (32, 8, 3, 3) here" in message
    assert "more keys differ" in message and "backbone.widths" in message

    deeper = save_checkpoint(make_module(widths=(8, 16, 16)), tmp_path / "deeper.ckpt")
    with pytest.raises(ConfigError, match=r"backbone.layers.2.0.conv1.weight .* only there"):
        check_resume_checkpoint(str(deeper), make_module(widths=(8, 16)))


def test_another_head_is_named(tmp_path: Path) -> None:
    path = save_checkpoint(make_module(num_layers=2), tmp_path / "last.ckpt")
    with pytest.raises(ConfigError, match=r"another projection head .*head.num_layers"):
        check_resume_checkpoint(str(path), make_module(num_layers=1))


def test_the_run_directory_is_named_while_its_overrides_are_the_checkpoints(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    overrides = run / ".hydra" / "overrides.yaml"
    overrides.write_text("- model.queue_size=32\n")
    path = save_checkpoint(make_module(queue_size=32), run / "checkpoints" / "last.ckpt")
    os.utime(overrides, (1.0, 1.0))  # written at the run's start, before its checkpoints
    with pytest.raises(ConfigError, match=f"resume={run} resumes with the run's own settings"):
        check_resume_checkpoint(str(path), make_module(queue_size=64))
    # Rewritten since (by a command resuming in place with model.queue_size=64): not named.
    os.utime(overrides, (path.stat().st_mtime + 10,) * 2)
    with pytest.raises(ConfigError) as refused:
        check_resume_checkpoint(str(path), make_module(queue_size=64))
    assert "resume=" not in str(refused.value)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"hello, not a checkpoint\n", "not a PyTorch file ("),
        (b"", "the file is empty"),
        (None, "an incomplete zip archive ("),  # the first half of a checkpoint
    ],
    ids=["text", "empty", "truncated"],
)
def test_unreadable_files_are_one_line(content: bytes | None, reason: str, tmp_path: Path) -> None:
    good = save_checkpoint(make_module(), tmp_path / "epoch000.ckpt")
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2] if content is None else content)
    with pytest.raises(ConfigError) as refused:
        check_resume_checkpoint(str(bad), make_module())
    message = str(refused.value)
    assert message.startswith(
        f"ckpt_path={bad} is not a readable checkpoint (truncated or not a checkpoint file): "
        f"{reason}"
    )
    assert f"resume from another checkpoint (e.g. ckpt_path={good})" in message
    assert "\n" not in message


def test_weights_and_other_objects_are_not_training_checkpoints(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(make_module().state_dict(), weights)
    with pytest.raises(ConfigError, match=f"holds weights only.*init_weights={weights}$"):
        check_resume_checkpoint(str(weights), make_module())
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ConfigError, match="holds a Tensor, not a training checkpoint; give"):
        check_resume_checkpoint(str(tensor), make_module())
    lightning_weights = tmp_path / "lightning_weights.ckpt"  # save_weights_only=True
    torch.save({"state_dict": make_module().state_dict(), "epoch": 0}, lightning_weights)
    with pytest.raises(ConfigError, match="holds weights only"):
        check_resume_checkpoint(str(lightning_weights), make_module())
    other = tmp_path / "other.pt"
    torch.save({"epochs": 3}, other)
    with pytest.raises(ConfigError, match="it holds a dict without state_dict, not a training"):
        check_resume_checkpoint(str(other), make_module())
    with pytest.raises(ConfigError, match="does not exist: give a checkpoint file"):
        check_resume_checkpoint(str(tmp_path / "missing.ckpt"), make_module())


def test_a_queue_and_projection_change_names_both(tmp_path: Path) -> None:
    path = save_checkpoint(make_module(queue_size=32, out_dim=8), tmp_path / "last.ckpt")
    with pytest.raises(ConfigError, match=r"resume with head.out_dim=8 and model.queue_size=32$"):
        check_resume_checkpoint(str(path), make_module(queue_size=64, out_dim=16))


def test_only_a_training_checkpoint_is_suggested_instead(tmp_path: Path) -> None:
    good = save_checkpoint(make_module(), tmp_path / "epoch000.ckpt")
    os.utime(good, (1.0, 1.0))  # older than the weights below
    torch.save(make_module().state_dict(), tmp_path / "weights.ckpt")
    bad = tmp_path / "last.ckpt"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError, match=f"e.g. ckpt_path={good}\\) or start a new run$"):
        check_resume_checkpoint(str(bad), make_module())
    good.unlink()
    with pytest.raises(ConfigError, match="give another checkpoint file, or start a new run"):
        check_resume_checkpoint(str(bad), make_module())

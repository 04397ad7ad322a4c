"""`mocoq-train` as a user runs it: bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

TINY_RUN = ["dataset=synthetic", "dataset.image_size=16", "backbone.widths=[8,8,8,8]"]


def mocoq_train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mocoq.train", f"hydra.run.dir={cwd}/run", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


# The real command for one error of each kind (the range checks' messages are tested one by one,
# without a process each, in test_validate.py).
@pytest.mark.parametrize(
    "args,expected",
    [
        (["dataset.root=/no/such/dir"], "Fashion-MNIST train files not found under /no/such/dir"),
        ([*TINY_RUN, "model.queue_size=16"], "model.queue_size=16 is smaller than the 64 keys"),
        ([*TINY_RUN, "model.temperature=-1"], "model.temperature must be positive, got -1"),
        (["dataset=image_folder"], "image_folder needs a root folder: set dataset.root="),
        (["trainer.accelerator=mps"], "`MPSAccelerator` can not run on your system"),
        ([*TINY_RUN, "model.ema_momentum=1.5"], "model.ema_momentum must be in [0, 1], got 1.5"),
        (
            [*TINY_RUN, "dataset.batch_size=1000", "model.queue_size=4096"],
            "dataset.batch_size=1000 is larger than the 512 training images",
        ),
        (
            [*TINY_RUN, "dataset.eval_resize=8"],
            "dataset.eval_resize=8 is smaller than dataset.image_size=16: the clean view's "
            "centre crop would be padded; set dataset.eval_resize to at least 16",
        ),
        ([*TINY_RUN, "optim.lr=0"], "optim.lr must be positive, got 0"),
    ],
    ids=[
        "missing-data",
        "small-queue",
        "bad-temperature",
        "no-root",
        "no-such-device",
        "ema-momentum-above-1",
        "batch-larger-than-dataset",
        "eval-resize-below-crop",
        "zero-lr",
    ],
)
def test_user_errors_are_one_clear_line(args: list[str], expected: str, tmp_path: Path) -> None:
    result = mocoq_train(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"mocoq-train: error: {expected}" in result.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["dataset=imagenette"], "Available options in 'dataset'"),
        (["backbone=resnet9"], "Available options in 'backbone'"),
        (["model.queue_sise=10"], "Key 'queue_sise' is not in struct"),
    ],
    ids=["unknown-dataset", "unknown-backbone", "typo"],
)
def test_hydra_names_unknown_choices_and_typos(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    result = mocoq_train(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "where",
    [
        "hydra.run.dir={tmp}/afile/run",
        "hydra.run.dir=/proc/mocoq-test/run",
        "run_dir={tmp}/afile/run",
    ],
    ids=["under-a-file", "read-only-place", "run-dir-under-a-file"],
)
def test_unwritable_output_dir_is_one_clear_line(where: str, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a file, not a folder\n")
    override = where.format(tmp=tmp_path)
    result = mocoq_train(*TINY_RUN, override, cwd=tmp_path)  # the last hydra.run.dir counts
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    key, path = override.split("=", 1)
    assert f"mocoq-train: error: {key}={path} is not a writable folder (" in result.stderr
    assert f"choose another {key}" in result.stderr
    assert (tmp_path / "afile").read_text() == "a file, not a folder\n"


# A tiny run that saves checkpoints: tests/test_resume.py's recipe, without its monitors.
CHECKPOINTED = [*TINY, "callbacks.knn=null", "callbacks.throughput=null", "logger=csv"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a finished tiny run: queue 64 x 16, backbone widths [8, 16, 16, 32]."""
    cwd = tmp_path_factory.mktemp("trained")
    result = mocoq_train(*CHECKPOINTED, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "run"


def broken_copies(run: Path, folder: Path) -> dict[str, Path]:
    """Files that are not checkpoints Lightning can resume, beside a good one (epoch000.ckpt)."""
    good = run / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "checkpoints" / "epoch000.ckpt", folder / "epoch000.ckpt")
    files = {name: folder / f"{name}.ckpt" for name in ("text", "truncated", "empty", "weights")}
    files["text"].write_text("not a checkpoint\n")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["empty"].write_bytes(b"")
    torch.save({"state_dict": torch.load(good, weights_only=False)["state_dict"]}, files["weights"])
    return files


RESUME_REFUSALS = {
    "queue-size": (
        ["model.queue_size=128"],
        "checkpoint {ckpt} was trained with model.queue_size=64, this run has 128 (checkpoint "
        "queue holds 64 keys of dim 16, but this model's queue is 128 x 16): resume with "
        "model.queue_size=64 (resume={run} resumes with the run's own settings), or start a new "
        "run from its weights with init_weights=<checkpoint> (init_weights={ckpt})",
    ),
    "projection-dim": (
        ["head.out_dim=32"],
        "checkpoint {ckpt} was trained with head.out_dim=16, this run has 32 (head.2.weight "
        "(16, 32) there, (32, 32) here; head.2.bias (16,) there, (32,) here; key_head.2.weight "
        "(16, 32) there, (32, 32) here; 2 more keys differ): resume with head.out_dim=16 "
        "(resume={run} resumes with the run's own settings)",
    ),
    "backbone-widths": (
        ["backbone.widths=[8,16,16,64]"],
        "checkpoint {ckpt} was trained with another backbone than this run's "
        "(backbone.layers.3.0.conv1.weight (32, 16, 3, 3) there, (64, 16, 3, 3) here;",
    ),
    "another-backbone": (
        ["backbone=resnet18"],
        "checkpoint {ckpt} was trained with another backbone than this run's (backbone.conv1"
        ".weight (8, 3, 3, 3) there, (64, 3, 3, 3) here;",
    ),
}


@pytest.mark.parametrize("case", list(RESUME_REFUSALS))
def test_resuming_another_model_is_one_clear_line(
    case: str, trained_run: Path, tmp_path: Path
) -> None:
    overrides, expected = RESUME_REFUSALS[case]
    tiny = [o for o in CHECKPOINTED if not o.startswith("backbone.") or case != "another-backbone"]
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = mocoq_train(*tiny, f"ckpt_path={ckpt}", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = expected.format(ckpt=ckpt, run=trained_run)
    assert f"mocoq-train: error: {message}" in result.stderr


def test_resuming_a_run_directory_with_another_queue_is_one_clear_line(
    trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # resume= continues in place: a copy
    hydra_files = {p: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")}
    assert hydra_files
    command = [sys.executable, "-m", "mocoq.train", f"resume={run}", "model.queue_size=128"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        f"mocoq-train: error: checkpoint {run}/checkpoints/last.ckpt was trained with "
        "model.queue_size=64, this run has 128 (checkpoint queue holds 64 keys of dim 16, but "
        "this model's queue is 128 x 16): resume with model.queue_size=64, or start a new run "
        "from its weights with init_weights=<checkpoint>"
    ) in result.stderr
    # The refused resume left the run's saved config and overrides as they were, so a plain
    # resume=<run> still replays the run's own settings.
    assert {p: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")} == hydra_files


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "text",
            "is not a readable checkpoint (truncated or not a checkpoint file): not a PyTorch",
        ),
        ("truncated", "is not a readable checkpoint (truncated or not a checkpoint file): an "),
        ("empty", "is not a readable checkpoint (truncated or not a checkpoint file): the file is"),
        ("weights", "holds weights only, not a training checkpoint to resume"),
    ],
)
def test_resuming_a_broken_file_is_one_clear_line(
    name: str, expected: str, trained_run: Path, tmp_path: Path
) -> None:
    files = broken_copies(trained_run, tmp_path / "checkpoints")
    result = mocoq_train(*CHECKPOINTED, f"ckpt_path={files[name]}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"mocoq-train: error: ckpt_path={files[name]} {expected}" in result.stderr
    if name != "weights":
        other = tmp_path / "checkpoints" / "epoch000.ckpt"
        assert f"resume from another checkpoint (e.g. ckpt_path={other}) or start" in result.stderr

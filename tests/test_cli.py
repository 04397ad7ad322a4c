"""`mocoq-train` as a user runs it: bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY_RUN = ["dataset=synthetic", "dataset.image_size=16", "backbone.widths=[8,8,8,8]"]


def mocoq_train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mocoq.train", f"hydra.run.dir={cwd}/run", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["dataset.root=/no/such/dir"], "Fashion-MNIST train files not found under /no/such/dir"),
        ([*TINY_RUN, "model.queue_size=16"], "model.queue_size=16 is smaller than the 64 keys"),
        ([*TINY_RUN, "model.temperature=-1"], "model.temperature must be positive, got -1"),
        (["dataset=image_folder"], "image_folder needs a root folder: set dataset.root="),
        (["trainer.accelerator=mps"], "`MPSAccelerator` can not run on your system"),
    ],
    ids=["missing-data", "small-queue", "bad-temperature", "no-root", "no-such-device"],
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

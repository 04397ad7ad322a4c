"""SLURM: the launcher config, the job it submits, preemption and requeue, the sbatch example.

There is no SLURM here. ``sbatch``, ``srun`` and ``scontrol`` are small shell scripts (a fake
cluster of one node, written by the ``cluster`` fixture) that run the job on this machine with the
variables SLURM gives it, so the real launcher, submitit, Lightning and ``mocoq-train`` run
unchanged. Of SLURM's behaviour only what the tests rely on is imitated: signals go to the whole
job step, the job id survives a requeue, and ``scontrol requeue`` stops the job (SIGTERM to the
step) and starts its batch script again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from submitit.core.job_environment import JobEnvironment
from submitit.core.utils import DelayedSubmission
from submitit.slurm.slurm import SlurmExecutor

from mocoq import train as mocoq_train
from mocoq.train import CONFIG_DIR

from conftest import TINY

TESTS = Path(__file__).resolve().parent
SBATCH_SCRIPT = TESTS.parent / "scripts" / "slurm" / "train.sbatch"
# The console script, as users run it (`python -m mocoq.train` makes the task function's module
# __main__, which submitit's pickle of the job cannot carry).
MOCOQ_TRAIN = str(Path(sys.executable).parent / "mocoq-train")
CONFIG_MODULE = "mocoq.train"  # the one module that knows Hydra
# The multi-node job of docs/slurm.md: 2 nodes x 8 GPUs.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.nodes=2",
    "hydra.launcher.gpus_per_node=8",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.timeout_min=1440",
]
JOB = ["trainer=slurm", "ckpt_path=last"]


def tiny(**changes: object) -> list[str]:
    """TINY with some of its values changed (Hydra takes one value per key)."""
    return [o for o in TINY if o.split("=")[0] not in changes] + [
        f"{key}={value}" for key, value in changes.items()
    ]


def compose_with_hydra(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def sbatch_options(script: str) -> dict[str, str | bool]:
    """The ``#SBATCH --key=value`` lines of a batch script (``--flag`` lines map to True)."""
    options: dict[str, str | bool] = {}
    for match in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, flags=re.MULTILINE):
        options[match.group(1)] = match.group(2) or True
    return options


def requeue_signal(options: dict[str, str | bool]) -> signal.Signals:
    """The signal of ``--signal=[B:]USR1@120``."""
    name = str(options["signal"]).removeprefix("B:").split("@")[0]
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def test_slurm_launcher_composes_with_the_train_config() -> None:
    cfg = compose_with_hydra(*LAUNCHER, *JOB)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.partition) == (2, 8, "gpu")
    assert launcher.timeout_min == 1440
    assert launcher.tasks_per_node == 8  # follows gpus_per_node: one task per GPU
    assert launcher.additional_parameters.signal == "USR1@120"  # follows signal_delay_s
    assert launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout == 0  # submitit never requeues
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    assert cfg.hydra.runtime.choices.trainer == "slurm"

    changed = compose_with_hydra(
        *LAUNCHER, "hydra.launcher.gpus_per_node=4", "hydra.launcher.signal_delay_s=300"
    ).hydra.launcher
    assert changed.tasks_per_node == 4
    assert changed.additional_parameters.signal == "USR1@300"


def hydra_task_function() -> Callable[[DictConfig], Any]:
    """The function ``@hydra.main`` wraps in mocoq.train: what Hydra hands to the launcher."""
    (task,) = [
        f.__wrapped__
        for f in vars(mocoq_train).values()
        if getattr(getattr(f, "__code__", None), "co_name", "") == "decorated_main"  # Hydra's
    ]
    return task  # type: ignore[no-any-return]


@pytest.fixture
def slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``mocoq-train -m <LAUNCHER> <JOB>`` hands to sbatch: the batch script and the call.

    The real launcher builds the real submitit executor; only the final ``sbatch`` call is
    replaced by capturing the batch script (and submitit's check for ``srun`` is skipped).
    """

    class Submitted(Exception):
        pass

    captured: dict[str, Any] = {}

    def capture(executor: SlurmExecutor, command: str) -> None:
        captured["script"] = executor._make_submission_file_text(command, "uid")
        captured["folder"] = Path(executor.folder)
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(SlurmExecutor, "_submit_command", capture)
    sweep_dir = tmp_path / "multirun"
    cfg = compose_with_hydra(*LAUNCHER, *JOB, f"hydra.sweep.dir={sweep_dir}")
    launcher = instantiate(cfg.hydra.launcher)
    task_function = hydra_task_function()
    launcher.setup(hydra_context=None, task_function=task_function, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([JOB], initial_job_idx=0)
    # submitit pickles the call before submitting it; the batch script runs that pickle.
    (pickled,) = captured["folder"].parent.glob("*.pkl")
    captured["call"] = DelayedSubmission.load(pickled)
    captured["sweep_dir"] = sweep_dir
    return captured


def test_slurm_job_spec_is_one_task_per_gpu_with_lightnings_requeue_signal(
    slurm_job: dict[str, Any],
) -> None:
    script, sweep_dir = slurm_job["script"], slurm_job["sweep_dir"]
    options = sbatch_options(script)
    assert options["nodes"] == "2"
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "8"
    assert options["cpus-per-task"] == "10"
    assert options["mem-per-gpu"] == "32G"
    assert options["partition"] == "gpu"
    assert options["time"] == "1440"
    assert options["signal"] == "USR1@120"  # submitit's own line would say USR2
    assert options["requeue"] is True
    assert options["open-mode"] == "append"  # a requeued job appends to the same log
    assert options["job-name"] == f"mocoq-{compose_with_hydra(*LAUNCHER).hydra.job.name}"
    assert options["job-name"] not in ("bash", "interactive")  # names Lightning ignores SLURM for

    # One srun runs submitit's runner, with this Python, on the pickled call in the sweep dir.
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    command = shlex.split(srun)
    assert command[-5:] == [
        sys.executable,
        "-u",
        "-m",
        "submitit.core._submit",
        f"{sweep_dir}/.submitit/%j",
    ]
    call = slurm_job["call"]
    task = call.function.task_function  # pickled by value: not importable by name
    assert (task.__module__, task.__qualname__) == (
        CONFIG_MODULE,
        hydra_task_function().__qualname__,
    )
    overrides, dir_key, job_num = call.args[:3]
    assert overrides == JOB and dir_key == "hydra.sweep.dir" and job_num == 0


def test_job_trainer_matches_the_allocation_and_lightning_owns_the_requeue(
    slurm_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The variables SLURM sets in every task of that job (rank 0 shown).
    options = sbatch_options(slurm_job["script"])
    nodes, per_node = int(str(options["nodes"])), int(str(options["ntasks-per-node"]))
    for name, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": str(options["job-name"]),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NODELIST": "gpu[001-002]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    cfg = compose_with_hydra(*JOB, f"run_dir={tmp_path}", "trainer.accelerator=cpu")
    trainer = instantiate(cfg.trainer, logger=False)  # Lightning validates it against SLURM

    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
    assert trainer.default_root_dir == str(tmp_path)  # hpc_ckpt_<N>.ckpt lands in the run dir
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    # SLURM's signal reaches Lightning's handler; submitit's handler waits for another one.
    assert requeue_signal(options) == environment.requeue_signal == signal.SIGUSR1
    assert JobEnvironment._usr_sig() != environment.requeue_signal

    # The values SLURMEnvironment.validate_settings asks for (Lightning runs that check only when
    # it starts the processes itself; under srun nothing stops trainer=ddp's one node).
    environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    ddp = compose_with_hydra("trainer=ddp", f"run_dir={tmp_path}", "trainer.accelerator=cpu")
    with pytest.raises(ValueError, match=r"`num_nodes=1`.*`--nodes=2` does not match"):
        environment.validate_settings(num_devices=per_node, num_nodes=ddp.trainer.num_nodes)


# --- A fake cluster of one node -------------------------------------------------------------

FAKE_SRUN = r"""
# srun: one task on this node, leader of its own process group (slurmstepd signals the whole
# step), with the task's SLURM variables; --output/--error as submitit passes them (%j, %t).
out=/dev/stdout err=
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --output) out=$2; shift 2 ;;
    --error) err=$2; shift 2 ;;
    *) shift ;;
  esac
done
out=${out//%j/$SLURM_JOB_ID}; out=${out//%t/0}
err=${err//%j/$SLURM_JOB_ID}; err=${err//%t/0}
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_ID=0
setsid "$@" >>"$out" 2>>"${err:-$out}" </dev/null &
echo $! >"$FAKE_SLURM/task.pid"
echo $! >>"$FAKE_SLURM/started"
wait $!
"""

FAKE_SBATCH = r"""
# sbatch: start the batch script in the background with the job's SLURM variables, read from
# its #SBATCH lines; remember how to start it again (start.sh) for scontrol requeue.
script=$1; shift
option() { sed -n "s/^#SBATCH --$1=//p" "$script" | head -n 1; }
cp "$script" "$FAKE_SLURM/job.sh"
export SLURM_JOB_ID=4242 SLURM_JOB_NAME="$(option job-name)" SLURM_NODELIST=localhost
export SLURM_JOB_NODELIST=localhost SLURM_NNODES="$(option nodes)"
export SLURM_JOB_NUM_NODES=$SLURM_NNODES SLURM_NTASKS_PER_NODE="$(option ntasks-per-node)"
export SLURM_NTASKS=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE))
{ export -p; printf 'exec bash %q' "$FAKE_SLURM/job.sh"; printf ' %q' "$@"; echo; } \
  >"$FAKE_SLURM/start.sh"
setsid bash "$FAKE_SLURM/start.sh" >>"$FAKE_SLURM/batch.log" 2>&1 </dev/null &
echo $! >>"$FAKE_SLURM/started"
echo "Submitted batch job $SLURM_JOB_ID"
"""

FAKE_SCONTROL = r"""
# scontrol requeue <id>: log it, then as SLURM does: SIGTERM to the running step, and once it
# is gone, the batch script again (same job id, SLURM_RESTART_COUNT=1). Returns at once.
[[ $1 == requeue ]] || exit 1
echo "$*" >>"$FAKE_SLURM/scontrol.log"
pid=$(cat "$FAKE_SLURM/task.pid")
setsid bash -c "kill -TERM -- -$pid; while kill -0 $pid 2>/dev/null; do sleep 0.1; done
  SLURM_RESTART_COUNT=1 exec bash $FAKE_SLURM/start.sh" \
  >>"$FAKE_SLURM/batch.log" 2>&1 </dev/null &
echo $! >>"$FAKE_SLURM/started"
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a shell on the fake cluster's login node.

    Afterwards, whatever the fake cluster started in the background and is still running (a
    job left behind by a failed test) is killed: each is the leader of its own process group.
    """
    state = tmp_path / "slurm"
    bin_dir = state / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("srun", FAKE_SRUN), ("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text("#!/bin/bash\nset -eu\n" + textwrap.dedent(body).lstrip())
        path.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    yield {**env, "PATH": path, "FAKE_SLURM": str(state), "PYTHONPATH": pythonpath}

    started = state / "started"
    for pid in map(int, started.read_text().split() if started.is_file() else []):
        try:  # only a process of this cluster: a finished one's pid may have been reused
            if f"FAKE_SLURM={state}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.killpg(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def read_log(path: Path) -> str:
    return path.read_text() if path.is_file() else f"<no {path}>"


# slurmstepd signals every process of the step, DataLoader workers included: a worker that did
# not ignore SIGUSR1 would die of it, and the main process's SIGCHLD handler would then raise
# inside Lightning's handler, before the checkpoint is written and before the requeue.
@pytest.mark.parametrize("workers", [0, 1], ids=["in-process-loading", "loader-workers"])
def test_a_job_signalled_before_its_time_limit_is_checkpointed_requeued_once_and_resumed(
    workers: int, tmp_path: Path, cluster: dict[str, str]
) -> None:
    steps, signal_at = 20, 5
    sweep_dir = tmp_path / "multirun"
    command = [
        *(MOCOQ_TRAIN, "-m"),
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=1",  # a one-node, one-task job: all this machine can run
        "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={sweep_dir}",
        *JOB,
        *tiny(
            **{
                "trainer.limit_train_batches": steps,
                "dataset.loader.num_samples": steps * 16,
                "trainer.accelerator": "cpu",
                "trainer.precision": "32-true",
                "dataset.num_workers": workers,
            }
        ),
        "logger=csv",
        "callbacks.knn=null",
        # SLURM's `--signal=USR1@120`, at a known step of the first start.
        "+callbacks.slurm_signal._target_=preemption.SignalAtStep",
        f"+callbacks.slurm_signal.step={signal_at}",
    ]
    result = subprocess.run(
        command, env=cluster, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    state = Path(cluster["FAKE_SLURM"])
    task_log = sweep_dir / ".submitit" / "4242" / "4242_0_log.out"
    logs = f"{result.stderr}\n--- task log\n{read_log(task_log)}"
    assert result.returncode == 0, logs

    # Lightning, and only Lightning, requeued the job, once.
    assert read_log(state / "scontrol.log").splitlines() == ["requeue 4242"], logs
    # It saved its checkpoint at the signal, in the run directory of the job (job number 0).
    run_dir = sweep_dir / "0"
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"], logs
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == signal_at
    # submitit saw the SIGTERM that stopped the job and left it alone (no result, no requeue).
    task_output = read_log(task_log)
    assert "Bypassing signal SIGTERM" in task_output
    assert "Requeued job" not in task_output  # submitit's message when it requeues
    # The SIGTERM that ended the first start also saved the step it interrupted (mocoq's
    # PreemptionCheckpoint), one step after the hpc checkpoint.
    assert f"SIGTERM received: step {signal_at + 1} saved to {run_dir}/checkpoints" in task_output
    # The requeued job ran in the same run directory, from the newer of the two, to the end.
    assert [p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != ".submitit"] == ["0"]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"Restoring states from the checkpoint path at {last}" in task_output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_dir"] == str(run_dir)
    assert summary["steps"] == steps
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_submitit_local_launcher_runs_a_tiny_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    command = [
        *(MOCOQ_TRAIN, "-m", "hydra/launcher=submitit_local"),
        *TINY,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    run_dir = sweep_dir / "0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_dir"] == str(run_dir)
    assert summary["steps"] == 4  # TINY: one epoch of 4 batches
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # it went through submitit


def test_sbatch_script_is_valid_bash_with_one_task_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], check=True)
    options = sbatch_options(SBATCH_SCRIPT.read_text())
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    monkeypatch.delenv("SLURM_NTASKS", raising=False)  # when the tests run inside a SLURM job
    assert requeue_signal(options) == SLURMEnvironment().requeue_signal  # Lightning's signal
    assert str(options["signal"]).split("@")[1] == "120"  # as the launcher's signal_delay_s
    assert options["requeue"] is True and options["open-mode"] == "append"
    assert options["job-name"] not in ("bash", "interactive")


def run_batch_script(tmp_path: Path, cluster: dict[str, str], restart: int) -> str:
    """Runs train.sbatch as SLURM starts it (job 777 on one node, one task), returns its output."""
    env = {
        **cluster,
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NAME": "mocoq",
        "SLURM_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NTASKS": "1",
        "SLURM_RESTART_COUNT": str(restart),
    }
    overrides = tiny(**{"trainer.accelerator": "cpu", "trainer.precision": "32-true"})
    result = subprocess.run(
        ["bash", str(SBATCH_SCRIPT), *overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_sbatch_script_runs_and_its_requeued_job_resumes_in_the_same_run_dir(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    run_dir = tmp_path / "outputs" / "slurm" / "777"
    first = run_batch_script(tmp_path, cluster, restart=0)
    assert "run directory outputs/slurm/777" in first
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert "Restoring states" not in first

    # SLURM starts a requeued job's script again with the same job id.
    again = run_batch_script(tmp_path, cluster, restart=1)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"Restoring states from the checkpoint path at {last}" in again
    assert sorted(p.name for p in (tmp_path / "outputs" / "slurm").iterdir()) == ["777"]


@pytest.mark.parametrize(
    "newest", ["checkpoints/last.ckpt", "hpc_ckpt_2.ckpt"], ids=["last-newer", "hpc-newer"]
)
def test_ckpt_path_last_resumes_the_newest_of_last_and_hpc_checkpoints(
    newest: str, tmp_path: Path
) -> None:
    """A resumed job that finishes an epoch (last.ckpt) and is signalled again (hpc_ckpt_2) must
    resume from hpc_ckpt_2, or every requeue loses the part of the epoch it ran; a job that
    wrote last.ckpt after its newest hpc checkpoint (then died without a signal) from last.ckpt.
    """
    (tmp_path / "checkpoints").mkdir()
    files = ["hpc_ckpt_1.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_2.ckpt"]
    files.remove(newest)
    now = time.time()
    for age, name in enumerate([newest, *files]):  # newest first
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (now - 10 * age, now - 10 * age))
    assert mocoq_train._resolve_ckpt_path("last", tmp_path) == str(tmp_path / newest)

"""Run a function on N CPU processes joined by a gloo process group, and collect the results.

Usage in a test::

    def _check(rank: int, world: int, size: int) -> dict[str, Any]:  # module level: picklable
        ...
        return {"queue": module.queue.keys.clone()}

    results = run_distributed(_check, world_size=2, args=(16,))  # one result per rank

The function runs in fresh processes (spawn), so it must live at module level of an importable
module (a test file is fine) and return picklable values (tensors are fine). An exception in any
rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: Any,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        # Plain pickle bytes: tensors sent as shared memory would vanish with this process.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (), timeout: float = 120
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; results by rank."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, queue))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, Any] = {}
    failures: list[str] = []
    for _ in range(world_size):
        try:
            rank, ok, value = queue.get(timeout=timeout)
        except queue_module.Empty:
            failures.append(f"no result from a rank within {timeout} s")
            break
        if ok:
            outcomes[rank] = pickle.loads(value)
        else:
            failures.append(f"rank {rank} failed:\n{value}")
    for process in processes:
        process.join(5 if failures else timeout)
        if process.is_alive():
            process.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [outcomes[rank] for rank in range(world_size)]

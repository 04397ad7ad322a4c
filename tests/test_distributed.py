"""MoCo under DDP on 2 CPU processes (gloo): one global queue, shuffle BN, the data order."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from multiprocess import run_distributed

import mocoq.module
from mocoq.data.sampling import ResumableSampler
from mocoq.norm import batch_shuffle, batch_unshuffle

from conftest import tiny_module
from test_module import silence_logging

BATCH, STEPS, QUEUE = 4, 3, 64


def _queue_after_steps(rank: int, world: int, key_bn: str) -> dict[str, Any]:
    torch.manual_seed(0)  # identical initial weights and queue on every rank, as DDP ensures
    module = tiny_module(queue_size=QUEUE, key_bn=key_bn)
    module.configure_key_bn(world, on_gpu=False)
    silence_logging(module)
    local_keys: list[torch.Tensor] = []
    gather = mocoq.module.concat_all_gather

    def recording_gather(keys: torch.Tensor) -> torch.Tensor:
        local_keys.append(keys.clone())
        return gather(keys)

    mocoq.module.concat_all_gather = recording_gather  # type: ignore[assignment]
    logged: list[dict[str, torch.Tensor]] = []
    module.log_dict = lambda metrics, **_: logged.append(dict(metrics))  # type: ignore[method-assign]
    losses = []
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    for step in range(STEPS):
        view_a = torch.randn(BATCH, 1, 12, 12, generator=generator)
        view_b = torch.randn(BATCH, 1, 12, 12, generator=generator)
        losses.append(module.training_step(((view_a, view_b), torch.zeros(BATCH)), step).item())
    return {
        "losses": losses,
        "logged_losses": [float(m["train/loss"]) for m in logged],
        "keys": module.queue.keys.clone(),
        "pointer": module.queue.pointer,
        "ptr_buffer": int(module.queue.ptr),
        "local": torch.stack(local_keys),  # (STEPS, BATCH, D)
        "mode": module.key_bn_mode,
    }


def _both_modes(rank: int, world: int) -> dict[str, dict[str, Any]]:
    return {mode: _queue_after_steps(rank, world, mode) for mode in ("none", "shuffle")}


def test_queue_is_global_and_identical_on_both_ranks() -> None:
    both = run_distributed(_both_modes, 2)  # one spawn for both modes: processes are slow to start
    for key_bn in ("none", "shuffle"):
        _check_global_queue([rank[key_bn] for rank in both], key_bn)


def _check_global_queue(ranks: list[dict[str, Any]], key_bn: str) -> None:
    assert [r["mode"] for r in ranks] == [key_bn, key_bn]
    assert torch.equal(ranks[0]["keys"], ranks[1]["keys"])  # one queue, identical everywhere
    global_batch = 2 * BATCH
    assert ranks[0]["pointer"] == ranks[1]["pointer"] == STEPS * global_batch
    assert ranks[0]["ptr_buffer"] == STEPS * global_batch  # the checkpointed pointer too
    keys = ranks[0]["keys"]
    for step in range(STEPS):  # step s wrote rank 0's keys, then rank 1's
        block = keys[step * global_batch : (step + 1) * global_batch]
        assert torch.equal(block[:BATCH], ranks[0]["local"][step])
        assert torch.equal(block[BATCH:], ranks[1]["local"][step])
    assert not torch.equal(ranks[0]["local"], ranks[1]["local"])  # they were different keys
    # Logged metrics are the mean over ranks, the same on both (one all-reduce per step).
    for step in range(STEPS):
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert ranks[0]["losses"][step] != ranks[1]["losses"][step]
        assert ranks[0]["logged_losses"][step] == pytest.approx(mean, rel=1e-6)
        assert ranks[1]["logged_losses"][step] == pytest.approx(mean, rel=1e-6)


def _shuffle_round_trip(rank: int, world: int) -> dict[str, Any]:
    local = torch.arange(8).float().add(100 * rank).view(8, 1)  # (8, 1): rank 0 0..7, rank 1 100..
    shuffled, unshuffle = batch_shuffle(local, torch.Generator().manual_seed(7))
    restored = batch_unshuffle(shuffled * 10, unshuffle)  # a per-sample function, unshuffled

    torch.manual_seed(0)
    module = tiny_module(key_bn="shuffle").eval()  # eval: BatchNorm is per sample
    images = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(rank))
    return {
        "local": local,
        "shuffled": shuffled,
        "restored": restored,
        "keys_plain": module.project_keys(images),
        "keys_shuffled": module.project_keys(images, shuffle_seed=3),
    }


def _shuffle_and_sampler(rank: int, world: int) -> dict[str, Any]:
    return {
        "shuffle": _shuffle_round_trip(rank, world),
        "fresh": _sampler_batches(rank, world, 4, 0),
        "resumed": _sampler_batches(rank, world, 4, 16),
    }


def test_shuffle_bn_and_the_data_order_on_two_ranks() -> None:
    results = run_distributed(_shuffle_and_sampler, 2)  # one spawn for both checks
    check_shuffle_round_trip([r["shuffle"] for r in results])
    check_global_batches([r["fresh"] for r in results], [r["resumed"] for r in results])


def check_shuffle_round_trip(ranks: list[dict[str, Any]]) -> None:
    """Shuffle then unshuffle restores each rank's order; samples really move across ranks."""
    everything = torch.cat([r["local"] for r in ranks]).flatten()
    received = torch.cat([r["shuffled"] for r in ranks]).flatten()
    assert sorted(received.tolist()) == sorted(everything.tolist())  # a permutation of all 16
    assert not torch.equal(received, everything)  # and not the identity
    crossed = (ranks[0]["shuffled"] >= 100).any() and (ranks[1]["shuffled"] < 100).any()
    assert crossed  # samples travelled between ranks
    for r in ranks:
        assert torch.equal(r["restored"], r["local"] * 10)  # each rank got its own rows back
        # Through the real key encoder: shuffled forward + unshuffle == plain forward.
        assert torch.allclose(r["keys_shuffled"], r["keys_plain"], atol=1e-6)


def _sampler_batches(rank: int, world: int, batch: int, consumed: int) -> list[list[int]]:
    sampler = ResumableSampler(40, batch, seed=3)
    sampler.set_epoch(1)
    sampler.advance(consumed)
    keys = list(sampler)
    return [[i for i, _ in keys[b : b + batch]] for b in range(0, len(keys), batch)]


def check_global_batches(two: list[list[list[int]]], resumed: list[list[list[int]]]) -> None:
    """Global batches do not depend on the number of ranks, before and after a resume."""
    one = _sampler_batches(0, 1, 8, 0)  # 1 process, batch 8: 5 batches
    assert len(two[0]) == len(two[1]) == len(one) == 5
    for step in range(5):  # the union of a step's batches is the single-process batch
        assert two[0][step] + two[1][step] == one[step]
    # Resumed after 16 samples, on 2 ranks: the rest of the epoch, and nothing twice.
    rest = [i for step in range(len(resumed[0])) for i in resumed[0][step] + resumed[1][step]]
    assert rest == [i for b in one[2:] for i in b]

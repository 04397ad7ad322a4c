import io

import pytest
import torch
import torch.nn.functional as F

from mocoq.queue import MemoryQueue


def batches(total: int, batch: int, dim: int = 4) -> list[torch.Tensor]:
    """Distinct keys numbered 0..total-1 (key i has i in column 0), cut into batches."""
    keys = torch.zeros(total, dim)
    keys[:, 0] = torch.arange(total, dtype=torch.float32)
    return list(keys.split(batch))


def test_wraparound_with_batch_not_dividing_queue_keeps_newest_keys_in_order() -> None:
    queue = MemoryQueue(size=10, dim=4)
    for batch in batches(23, 3):  # 3 does not divide 10; the last batch has 2 keys
        queue.enqueue(batch)
    assert queue.num_filled == 10
    assert queue.pointer == 23 % 10
    newest = queue.ordered()[:, 0].tolist()
    assert newest == [float(i) for i in range(13, 23)]


def test_enqueue_writes_tail_then_head() -> None:
    queue = MemoryQueue(size=5, dim=4)
    queue.enqueue(batches(4, 4)[0])  # slots 0..3
    new = torch.zeros(3, 4)
    new[:, 0] = torch.tensor([100.0, 101.0, 102.0])
    queue.enqueue(new)  # key 100 -> slot 4, then 101, 102 -> slots 0, 1
    assert queue.keys[:, 0].tolist() == [101.0, 102.0, 2.0, 3.0, 100.0]
    assert queue.pointer == 2


def test_partially_filled_queue_reports_only_enqueued_keys() -> None:
    queue = MemoryQueue(size=8, dim=4)
    queue.enqueue(batches(3, 3)[0])
    assert queue.num_filled == 3
    assert queue.ordered()[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_fresh_queue_holds_unit_vectors() -> None:
    queue = MemoryQueue(size=16, dim=8)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(16))


def test_batch_larger_than_queue_names_both_numbers() -> None:
    queue = MemoryQueue(size=4, dim=2)
    with pytest.raises(ValueError, match=r"batch of 5 keys is larger than the queue of 4"):
        queue.enqueue(torch.zeros(5, 2))


def test_wrong_key_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        MemoryQueue(size=4, dim=3).enqueue(torch.zeros(2, 2))


@pytest.mark.parametrize("size,dim", [(0, 4), (4, 0)])
def test_invalid_sizes(size: int, dim: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        MemoryQueue(size, dim)


def test_state_round_trips_through_a_checkpoint_file() -> None:
    queue = MemoryQueue(size=7, dim=4)
    for batch in batches(11, 3):
        queue.enqueue(F.normalize(batch + 1, dim=1))
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)

    restored = MemoryQueue(size=7, dim=4)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.keys, queue.keys)
    assert restored.pointer == queue.pointer == 11 % 7
    assert restored.num_filled == queue.num_filled == 7
    # Both continue identically: the next write lands in the same slots.
    nxt = torch.ones(3, 4)
    queue.enqueue(nxt)
    restored.enqueue(nxt)
    assert torch.equal(restored.keys, queue.keys)


def test_loading_a_queue_of_another_size_is_a_clear_error() -> None:
    state = MemoryQueue(size=8, dim=4).state_dict()
    with pytest.raises(ValueError, match=r"holds 8 keys of dim 4.*queue is 16 x 4"):
        MemoryQueue(size=16, dim=4).load_state_dict(state)

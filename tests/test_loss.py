import math

import pytest
import torch
import torch.nn.functional as F

from mocoq.loss import info_nce


def test_loss_equals_hand_computation() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    key = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    temperature = 0.5
    loss, logits = info_nce(query, key, negatives, temperature)

    # Row 0: positive 0.6; negatives 1, -1, 0.  Row 1: positive 1; negatives 0, 0, -1.
    rows = [[0.6, 1.0, -1.0, 0.0], [1.0, 0.0, 0.0, -1.0]]
    expected = []
    for row in rows:
        scaled = [value / temperature for value in row]
        expected.append(-scaled[0] + math.log(sum(math.exp(v) for v in scaled)))
    assert logits.shape == (2, 4)
    assert torch.allclose(logits, torch.tensor(rows) / temperature)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_positive_is_column_zero_and_perfect_match_wins() -> None:
    query = torch.eye(5, 8)  # orthonormal queries, each its own key
    negatives = -query.repeat(3, 1)  # similarity -1 to the own query, 0 to the others
    loss, logits = info_nce(query, query.clone(), negatives, 0.1)
    assert torch.all(logits.argmax(dim=1) == 0)
    expected = math.log(math.exp(10) + 3 * math.exp(-10) + 12) - 10
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_gradient_flows_to_query_only() -> None:
    query = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    key = F.normalize(torch.randn(4, 8), dim=1)
    negatives = F.normalize(torch.randn(16, 8), dim=1)
    loss, _ = info_nce(query, key, negatives, 0.2)
    loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert not key.requires_grad and not negatives.requires_grad


def test_is_pure() -> None:
    query, key, negatives = torch.randn(3, 4), torch.randn(3, 4), torch.randn(6, 4)
    before = (query.clone(), key.clone(), negatives.clone())
    info_nce(query, key, negatives, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(before, (query, key, negatives), strict=True))


def test_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be positive"):
        info_nce(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(3, 2), 0.0)

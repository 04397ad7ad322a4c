import pytest
import torch
from torch import nn

from mocoq.ema import ema_update, init_key_from_query


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    key = init_key_from_query(query)
    with torch.no_grad():
        for parameter in query.parameters():  # make the query differ from its copy
            parameter.add_(torch.randn_like(parameter))
    return query, key


def test_key_starts_as_an_exact_frozen_copy() -> None:
    query = nn.Linear(4, 3)
    key = init_key_from_query(query)
    assert all(torch.equal(q, k) for q, k in zip(query.parameters(), key.parameters(), strict=True))
    assert all(not p.requires_grad for p in key.parameters())
    assert all(p.requires_grad for p in query.parameters())
    assert key.weight.data_ptr() != query.weight.data_ptr()


def test_momentum_one_freezes_the_key_encoder() -> None:
    query, key = pair()
    before = [p.clone() for p in key.parameters()]
    ema_update(query, key, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, key.parameters(), strict=True))


def test_momentum_zero_copies_the_query() -> None:
    query, key = pair()
    ema_update(query, key, 0.0)
    assert all(torch.equal(q, k) for q, k in zip(query.parameters(), key.parameters(), strict=True))


def test_update_follows_the_formula_and_leaves_buffers() -> None:
    query, key = pair()
    old = [p.clone() for p in key.parameters()]
    buffers = [b.clone() for b in key.buffers()]
    ema_update(query, key, 0.9)
    for k_old, q, k_new in zip(old, query.parameters(), key.parameters(), strict=True):
        assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(buffers, key.buffers(), strict=True))


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_out_of_range(momentum: float) -> None:
    query, key = pair()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        ema_update(query, key, momentum)

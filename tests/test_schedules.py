import pytest

from mocoq.schedules import LRSchedule, cosine, ema_momentum_at, warmup_cosine


@pytest.mark.parametrize(
    "step,expected", [(0, 1.0), (25, 0.8535534), (50, 0.5), (75, 0.1464466), (100, 0.0), (150, 0.0)]
)
def test_cosine_table(step: int, expected: float) -> None:
    assert cosine(step, 100, 1.0, 0.0) == pytest.approx(expected, abs=1e-6)


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(s, 110, 10, 1.0, 0.0) for s in range(111)]
    assert values[:10] == pytest.approx([0.1 * (i + 1) for i in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5)
    assert values[110] == pytest.approx(0.0)


def test_lr_schedule_warmup_in_epochs() -> None:
    schedule = LRSchedule(warmup_epochs=2, final_ratio=0.1)
    assert schedule(0, 100, 10) == pytest.approx(1 / 20)
    assert schedule(19, 100, 10) == pytest.approx(1.0)
    assert schedule(100, 100, 10) == pytest.approx(0.1)
    assert LRSchedule(kind="constant")(73, 100, 10) == 1.0


def test_ema_momentum_schedules() -> None:
    assert ema_momentum_at(40, 100, 0.99, "constant") == 0.99
    assert ema_momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert ema_momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert ema_momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        ema_momentum_at(0, 1, 0.9, "linear")


def test_bad_schedule_kind() -> None:
    with pytest.raises(ValueError, match="'cosine' or 'constant'"):
        LRSchedule(kind="step")

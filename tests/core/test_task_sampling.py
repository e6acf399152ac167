"""Task schedules of alternating training: the IMP round-robin counter rule exactly, sampling
frequencies, restriction to allowed tasks, state round trips and bad configurations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlkit.core.task_sampling import RandomTaskSchedule, RoundRobinSchedule, make_schedule
from mtlkit.errors import ConfigError


def test_round_robin_follows_the_visit_counter_rule():
    # intervals (1, 3): visits alternate t0, t1; t1 trains on its 1st, 4th, 7th... visit
    schedule = RoundRobinSchedule([1, 3])
    seq = [schedule.next() for _ in range(8)]
    assert seq == [0, 1, 0, 0, 0, 1, 0, 0]
    assert schedule.visits == [6, 5]  # t1 was passed over on its visits 2, 3, 5


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 60))
@settings(max_examples=50, deadline=None)
def test_round_robin_step_counts_match_the_rule(intervals, steps):
    schedule = RoundRobinSchedule(intervals)
    counts = [0] * len(intervals)
    for _ in range(steps):
        counts[schedule.next()] += 1
    # replay the rule by hand: visit tasks in order, train when the visit count is a multiple
    expected, visits, position, done = [0] * len(intervals), [0] * len(intervals), 0, 0
    while done < steps:
        t = position
        position = (position + 1) % len(intervals)
        if visits[t] % intervals[t] == 0:
            expected[t] += 1
            done += 1
        visits[t] += 1
    assert counts == expected


def test_weighted_sampling_frequencies_are_within_one_percent():
    schedule = make_schedule("weighted", 2, weights=[3, 1], seed=0)
    draws = torch.tensor([schedule.next() for _ in range(10_000)])
    assert abs(float((draws == 0).double().mean()) - 0.75) < 0.01


def test_proportional_sampling_uses_the_temperature():
    p1 = make_schedule("proportional", 2, sizes=[900, 100], temperature=1.0)
    p2 = make_schedule("proportional", 2, sizes=[900, 100], temperature=2.0)
    assert isinstance(p1, RandomTaskSchedule) and isinstance(p2, RandomTaskSchedule)
    torch.testing.assert_close(p1.probabilities, torch.tensor([0.9, 0.1], dtype=torch.float64))
    torch.testing.assert_close(p2.probabilities, torch.tensor([0.75, 0.25], dtype=torch.float64))  # 30:10


def test_only_allowed_tasks_are_drawn():
    schedule = make_schedule("uniform", 3, seed=1)
    assert {schedule.next([False, True, False]) for _ in range(50)} == {1}
    assert schedule.next([False, False, False]) == -1
    rr = RoundRobinSchedule([1, 1, 1])
    assert [rr.next([True, False, True]) for _ in range(4)] == [0, 2, 0, 2]


@pytest.mark.parametrize("kind", ["uniform", "round_robin"])
def test_state_round_trips(kind):
    a = make_schedule(kind, 3, seed=5)
    [a.next() for _ in range(7)]
    b = make_schedule(kind, 3, seed=99)
    b.load_state_dict(a.state_dict())
    assert [a.next() for _ in range(20)] == [b.next() for _ in range(20)]


def test_bad_schedules_are_named():
    with pytest.raises(ConfigError, match="Unknown task schedule"):
        make_schedule("random", 2)
    with pytest.raises(ConfigError, match="weights"):
        make_schedule("weighted", 2)
    with pytest.raises(ConfigError, match="one value per task"):
        make_schedule("proportional", 2, sizes=[1])
    with pytest.raises(ConfigError, match="not all 0"):
        make_schedule("weighted", 2, weights=[0, 0])
    with pytest.raises(ConfigError, match="intervals"):
        make_schedule("round_robin", 2, intervals=[1, 0])

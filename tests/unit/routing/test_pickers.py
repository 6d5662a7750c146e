"""Pickers: best first with random ties, weighted random, power of two, top-k fallback lists."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.routing.pickers import PICKERS
from shared.core.routing.pickers.common import PickParams
from tests.unit.routing.helpers import cands, cycle, met, pool


def picks(name: str, totals: list[float], k: int = 1, seed: int = 0) -> list[int]:
    state = pool(*(met() for _ in totals))
    p = PICKERS[name](name, PickParams(max_endpoints=k))
    return p.pick(cycle(state, seed=seed), cands(state), totals)


def test_max_score_takes_the_best() -> None:
    assert picks("max-score-picker", [1.0, 3.0, 2.0]) == [1]


def test_max_score_breaks_ties_at_random_but_reproducibly() -> None:
    chosen = Counter(picks("max-score-picker", [2.0, 1.0, 2.0, 2.0], seed=s)[0] for s in range(300))
    assert set(chosen) == {0, 2, 3}
    assert min(chosen.values()) > 60
    assert picks("max-score-picker", [2.0, 2.0], seed=5) == picks("max-score-picker", [2.0, 2.0], seed=5)


def test_max_score_top_k_is_a_fallback_list_in_score_order() -> None:
    assert picks("max-score-picker", [0.1, 0.9, 0.5, 0.7], k=3) == [1, 3, 2]
    assert picks("max-score-picker", [0.1, 0.9], k=5) == [1, 0]


def test_weighted_random_follows_the_weights_and_never_picks_zero() -> None:
    chosen = Counter(picks("weighted-random-picker", [0.0, 1.0, 3.0], seed=s)[0] for s in range(2000))
    assert chosen[0] == 0
    assert 0.65 < chosen[2] / 2000 < 0.85  # P = 3/4


def test_weighted_random_with_all_zero_scores_is_uniform() -> None:
    chosen = Counter(picks("weighted-random-picker", [0.0, 0.0, 0.0], seed=s)[0] for s in range(600))
    assert set(chosen) == {0, 1, 2}


def test_power_of_two_never_picks_the_worst_of_three() -> None:
    assert all(picks("power-of-two-picker", [0.5, 1.0, 0.0], seed=s)[0] != 2 for s in range(200))


def test_power_of_two_fallbacks_follow_by_score() -> None:
    got = picks("power-of-two-picker", [0.5, 1.0, 0.0, 0.7], k=4, seed=3)
    assert sorted(got) == [0, 1, 2, 3] and got[1:] == sorted(got[1:], key=lambda i: -[0.5, 1.0, 0.0, 0.7][i])


def test_random_picker_returns_distinct_endpoints() -> None:
    got = picks("random-picker", [0.0] * 5, k=3)
    assert len(set(got)) == 3


def reference_max_score(totals: list[float], k: int, rng: random.Random) -> list[int]:
    """The picker's rule written out on lists: ties in index order, one drawn; then the rest by score."""
    floor = max(totals) - 1e-9
    order = sorted(range(len(totals)), key=totals.__getitem__, reverse=True)
    ties = sorted(i for i in order if totals[i] >= floor)
    first = ties[rng.randrange(len(ties))] if len(ties) > 1 else ties[0]
    return [first, *[i for i in order[:k] if i != first]][:k]


@settings(max_examples=200, deadline=None)
@given(totals=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 3.0, 3.0 + 1e-12, float("-inf")]) | st.floats(0, 8),
                       min_size=1, max_size=30),
       k=st.integers(1, 12), seed=st.integers(0, 5))
def test_max_score_equals_its_rule_written_on_lists(totals: list[float], k: int, seed: int) -> None:
    if max(totals) == float("-inf"):
        return
    expected = reference_max_score(totals, k, random.Random(seed))
    assert picks("max-score-picker", totals, k=k, seed=seed) == expected


@settings(max_examples=200, deadline=None)
@given(totals=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 3.0 + 1e-12, float("-inf")]) | st.floats(0, 8),
                       min_size=1, max_size=30),
       k=st.integers(1, 12), seed=st.integers(0, 5))
def test_max_score_draws_from_the_rng_only_for_ties(totals: list[float], k: int, seed: int) -> None:
    # the router's RNG is shared by the decisions that follow: a draw more or less changes them
    if max(totals) == float("-inf"):
        return
    state = pool(*(met() for _ in totals))
    c = cycle(state, seed=seed)
    PICKERS["max-score-picker"]("max-score-picker", PickParams(max_endpoints=k)).pick(c, cands(state), totals)
    ref = random.Random(seed)
    reference_max_score(totals, k, ref)
    assert c.rng.random() == ref.random()

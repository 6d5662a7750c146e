"""The seed sweep's comparison: medians per profile, seeds won, the check."""

from __future__ import annotations

from bench.routing_seeds import PROFILES, compare


def rows(p90s: list[float], hits: list[float]) -> list[dict[str, float]]:
    """One run per seed with these figures."""
    return [{"ttft_p90": p, "hit": h, "ttft_p99": 2 * p, "goodput": 1.0, "lost": 0}
            for p, h in zip(p90s, hits, strict=True)]


def test_precise_passes_when_its_median_p90_is_not_above_and_its_median_hit_not_below() -> None:
    out = compare({PROFILES[0]: rows([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),
                   PROFILES[1]: rows([3.0, 1.0, 2.0], [0.4, 0.6, 0.5])})
    assert out["median"][PROFILES[1]]["ttft_p90"] == 2.0
    assert out["precise_at_least_approx_median"] is True
    assert out["precise_at_least_as_good_in_seeds"]["ttft_p90"] == 2  # seeds 1 and 2 (1.0 <= 2.0, 2.0 <= 3.0)
    assert out["precise_at_least_as_good_in_seeds"]["hit"] == 2


def test_precise_fails_on_a_higher_median_p90_even_with_a_better_hit_rate() -> None:
    out = compare({PROFILES[0]: rows([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]),
                   PROFILES[1]: rows([1.1, 0.9, 1.1], [0.6, 0.6, 0.6])})
    assert out["precise_at_least_approx_median"] is False


def test_requests_lost_by_either_profile_are_summed() -> None:
    a = rows([1.0], [0.5])
    p = rows([1.0], [0.5])
    p[0]["lost"] = 2
    assert compare({PROFILES[0]: a, PROFILES[1]: p})["lost"] == 2

"""``find_stop`` (which scans a request's pre-sampled tokens in C) answers exactly what the per-token reference
loop of the stop-check order answers: min_tokens first, then EOS unless ignored, then a stop token, then the
length caps; the filler token after the sampled ones."""

from __future__ import annotations

import random

import pytest

from shared.core.engine import Request
from shared.core.engine.request import FinishReason
from shared.core.engine.stop import _token_stops, find_stop


def _reference(req: Request, max_model_len: int) -> tuple[int, FinishReason, int | None]:
    """The stop checks applied token by token, as the engine would sample them."""
    limit = min(req.max_tokens, max_model_len - req.prompt_len)
    sampled = req.sampled_token_ids or []
    for k, tok in enumerate(sampled[:limit]):
        if k + 1 < req.min_tokens:
            continue
        hit = _token_stops(req, tok)
        if hit is not None:
            return k + 1, hit[0], hit[1]
    if len(sampled) < limit:
        hit = _token_stops(req, req.filler_token)
        at = max(len(sampled) + 1, req.min_tokens)
        if hit is not None and at <= limit:
            return at, hit[0], hit[1]
    return limit, FinishReason.LENGTH, None


def _random_request(rng: random.Random, i: int) -> Request:
    alphabet = rng.randint(2, 12)  # few distinct tokens, so EOS and stop tokens come up often
    n = rng.randint(0, 40)
    return Request(
        f"r{i}", [1, 2, 3], max_tokens=rng.randint(1, 50), min_tokens=rng.choice([0, 0, 1, rng.randint(0, 45)]),
        stop_token_ids=rng.sample(range(alphabet), rng.randint(0, 2)),
        eos_token_id=rng.choice([None, rng.randrange(alphabet)]), ignore_eos=rng.random() < 0.3,
        sampled_token_ids=rng.choice([None, [rng.randrange(alphabet) for _ in range(n)]]),
        filler_token=rng.randrange(alphabet),
    )


@pytest.mark.parametrize("seed", range(4))
def test_find_stop_matches_the_token_by_token_checks(seed: int) -> None:
    rng = random.Random(seed)
    for i in range(2000):
        req = _random_request(rng, i)
        max_model_len = rng.randint(req.prompt_len + 1, req.prompt_len + 60)
        assert find_stop(req, max_model_len) == _reference(req, max_model_len), (seed, i)


def test_eos_that_is_also_a_stop_token_stops_without_a_stop_reason() -> None:
    req = Request("r", [1], max_tokens=10, stop_token_ids=[7], eos_token_id=7, sampled_token_ids=[5, 7, 5])
    assert find_stop(req, 100) == (2, FinishReason.STOP, None)


def test_the_earliest_of_several_stop_tokens_ends_the_request() -> None:
    req = Request("r", [1], max_tokens=10, stop_token_ids=[8, 9], sampled_token_ids=[5, 9, 8, 9])
    assert find_stop(req, 100) == (2, FinishReason.STOP, 9)


class _CountedToken(int):
    """A sampled token id that counts the equality tests made on it (the work of looking for stopping tokens)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedToken.compared += 1
        return int(self) == other

    __hash__ = int.__hash__


def test_a_request_with_many_stop_tokens_is_checked_in_work_linear_in_its_tokens() -> None:
    # the API takes any number of stop_token_ids: a scan of the sampled tokens per stop token would cost a
    # request with 50,000 of them and 4,096 pre-sampled tokens seconds of the engine server's loop
    sampled = [_CountedToken(1000 + k % 500) for k in range(2000)]
    req = Request("r", [1], max_tokens=2000, stop_token_ids=range(100_000, 101_000), eos_token_id=5,
                  sampled_token_ids=sampled)
    req.sampled_token_ids = sampled  # the counted tokens themselves (the constructor copies into a list)
    expected = _reference(req, 10_000)
    _CountedToken.compared = 0
    assert find_stop(req, 10_000) == expected
    assert _CountedToken.compared <= 2 * len(sampled), _CountedToken.compared


@pytest.mark.parametrize("seed", range(2))
def test_find_stop_with_many_stop_tokens_matches_the_token_by_token_checks(seed: int) -> None:
    rng = random.Random(seed)
    for i in range(2000):
        alphabet = rng.randint(4, 16)
        n = rng.randint(0, 40)
        req = Request(
            f"r{i}", [1, 2, 3], max_tokens=rng.randint(1, 50), min_tokens=rng.choice([0, 1, rng.randint(0, 45)]),
            stop_token_ids=rng.sample(range(alphabet), rng.randint(3, alphabet)),
            eos_token_id=rng.choice([None, rng.randrange(alphabet)]), ignore_eos=rng.random() < 0.3,
            sampled_token_ids=rng.choice([None, [rng.randrange(alphabet) for _ in range(n)]]),
            filler_token=rng.randrange(alphabet),
        )
        max_model_len = rng.randint(req.prompt_len + 1, req.prompt_len + 60)
        assert find_stop(req, max_model_len) == _reference(req, max_model_len), (seed, i)

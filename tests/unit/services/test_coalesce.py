"""AnswerWindow: at most one answer per window, and every request followed by an answer sent after it arrived."""

from __future__ import annotations

import itertools
import math

import pytest

from shared.core.coalesce import AnswerWindow, Decision, Verdict


def test_a_lone_request_is_answered_at_once() -> None:
    assert AnswerWindow(2.0).ask(10.0) == Decision(Verdict.NOW, 10.0)


def test_a_request_inside_the_window_is_answered_when_it_closes() -> None:
    w = AnswerWindow(2.0)
    w.answered(10.0)
    assert w.ask(10.5) == Decision(Verdict.LATER, 12.0)
    assert not w.due(11.9) and w.due(12.0)


def test_requests_while_a_trailing_answer_is_due_join_it() -> None:
    w = AnswerWindow(2.0)
    w.answered(10.0)
    w.ask(10.1)
    assert [w.ask(10.2 + i / 100).verdict for i in range(50)] == [Verdict.JOINED] * 50
    assert w.due_at == 12.0


def test_a_flood_costs_one_answer_per_window() -> None:
    w, answers, now = AnswerWindow(2.0), [], 0.0
    while now < 10.0:  # a request every 10 ms for 10 s; the caller answers NOW at once and LATER when due
        if w.due(now) or w.ask(now).verdict is Verdict.NOW:
            w.answered(now)
            answers.append(now)
        now = round(now + 0.01, 2)
    assert len(answers) == 5 and all(b - a >= 2.0 for a, b in itertools.pairwise(answers))


def test_an_answer_sent_for_another_reason_covers_the_requests_before_it() -> None:
    w = AnswerWindow(2.0)
    w.answered(10.0)
    w.ask(10.5)
    w.answered(11.0)  # e.g. a worker's periodic registration: sent after the request arrived
    assert not w.due(12.0)
    assert w.ask(11.5) == Decision(Verdict.LATER, 13.0)  # a request after it still gets its own answer


def test_a_request_after_the_window_closed_is_answered_at_once() -> None:
    w = AnswerWindow(2.0)
    w.answered(10.0)
    assert w.ask(12.0).verdict is Verdict.NOW


def test_a_zero_window_answers_every_request() -> None:
    w = AnswerWindow(0.0)
    w.answered(10.0)
    assert w.ask(10.0).verdict is Verdict.NOW


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="duration"):
        AnswerWindow(-1.0)


def test_a_request_after_a_trailing_answer_that_never_went_out_is_answered_at_once() -> None:
    w = AnswerWindow(2.0)
    w.answered(10.0)
    w.ask(10.5)  # a trailing answer falls due at 12.0; the caller never sends it (its send failed, or it skipped it)
    assert w.ask(13.0) == Decision(Verdict.NOW, 13.0)  # not joined to the lost one, and so never answered


@pytest.mark.parametrize("every", [math.nan, math.inf])
def test_a_window_that_is_not_a_finite_duration_is_refused(every: float) -> None:
    with pytest.raises(ValueError, match="finite duration"):
        AnswerWindow(every)

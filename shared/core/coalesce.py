"""Coalescing requests for costly answers: at most one answer per window, and no request left unanswered.

A request that makes its receiver do a lot of work (every worker re-registering, an engine building its prefix-cache
snapshot) must not let a flood of such requests multiply that work. ``AnswerWindow`` decides, for one receiver (one
worker, one engine), when to answer: right away if nothing was answered within the last window (the leading edge,
so a lone request costs no delay), else once, when the window closes (the trailing edge). Requests arriving before
that trailing answer's time join it (one arriving after it, with the answer not reported sent, is answered at once:
a lost answer swallows nothing). Every request is thus followed by an answer sent after it arrived, within one
window: what a requester relies on (a restarted reconciler must hear every worker again, not only those that
happened to register before it subscribed) still holds, at one answer per window whatever the request rate.

Pure: the caller passes the time and does the answering.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Verdict(enum.Enum):
    """What to do with one request."""

    NOW = "now"  # answer now (and report it with ``answered``)
    LATER = "later"  # answer at ``Decision.at``: a trailing answer is due then (the caller schedules it)
    JOINED = "joined"  # a trailing answer scheduled and not due yet covers it: nothing to do


@dataclass(frozen=True)
class Decision:
    """A request's verdict and, for ``LATER`` and ``JOINED``, when the answer covering it is due."""

    verdict: Verdict
    at: float


class AnswerWindow:
    """Leading- and trailing-edge coalescing of one receiver's answers, at most one per ``every`` seconds.

    Any answer counts, also one sent for another reason (a worker's periodic registration): once sent after a
    request arrived, it satisfies that request, and the trailing answer falls due only if requests came after it.
    A trailing answer that is due and not reported sent may never go (the caller's send failed, or it skipped it):
    a request then is decided afresh rather than joining it, so one lost answer cannot swallow every later request.
    """

    def __init__(self, every: float) -> None:
        if not 0 <= every < math.inf:  # nan compares false: its due times never come
            raise ValueError(f"a coalescing window is a finite duration, not {every}")
        self.every = every
        self.last: float | None = None  # when the last answer went out
        self.due_at: float | None = None  # when the trailing answer is due (None: no request waits)

    def ask(self, now: float) -> Decision:
        """A request arrived at ``now``: when it is to be answered."""
        if self.due_at is not None:
            if now < self.due_at:
                return Decision(Verdict.JOINED, self.due_at)
            return Decision(Verdict.NOW, now)  # the trailing answer is overdue: it went missing, this one goes now
        if self.last is None or now - self.last >= self.every:
            return Decision(Verdict.NOW, now)
        self.due_at = self.last + self.every
        return Decision(Verdict.LATER, self.due_at)

    def answered(self, now: float) -> None:
        """An answer went out at ``now``: it covers every request that arrived before it."""
        self.last = now
        self.due_at = None

    def due(self, now: float) -> bool:
        """Whether a trailing answer is due by ``now`` (requests still wait for one, and the window closed)."""
        return self.due_at is not None and now >= self.due_at

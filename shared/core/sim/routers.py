"""Simple request routers for the simulator (the real endpoint picker is a separate component)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.core.engine import Engine, Request


class Router(Protocol):
    """Picks the replica for a request arriving at ``now``."""

    needs_state: bool  # True: every replica must be advanced to ``now`` before ``pick``

    def pick(self, engines: Sequence[Engine], now: float, request: Request) -> int | str:
        """Index of the chosen replica, or the reason the request is refused."""
        ...

    def failed(self, request: Request) -> None:
        """The chosen replica refused ``request`` (too long for it): forget any accounting of it."""
        ...


class RoundRobin:
    """Replicas in turn, blind to load."""

    needs_state = False

    def __init__(self) -> None:
        self._next = 0

    def pick(self, engines: Sequence[Engine], now: float, request: Request | None = None) -> int:
        """The next replica in turn."""
        i = self._next % len(engines)
        self._next = i + 1
        return i

    def failed(self, request: Request) -> None:
        """Nothing to forget."""


def outstanding_at(engine: Engine, now: float) -> int:
    """Requests a router would count on ``engine`` at ``now``: finishes of a step still running are unseen."""
    n = engine.num_outstanding
    if engine.last_step_end > now:
        n += engine.last_step_finished
    return n


class LeastOutstanding:
    """Fewest outstanding (waiting + running) requests; ties go to the lowest index."""

    needs_state = True

    def pick(self, engines: Sequence[Engine], now: float, request: Request | None = None) -> int:
        """The least loaded replica."""
        best, best_n = 0, outstanding_at(engines[0], now)
        for i in range(1, len(engines)):
            n = outstanding_at(engines[i], now)
            if n < best_n:
                best, best_n = i, n
        return best

    def failed(self, request: Request) -> None:
        """Nothing to forget."""


ROUTERS: dict[str, type[RoundRobin] | type[LeastOutstanding]] = {"rr": RoundRobin, "least": LeastOutstanding}
GANTRY = "gantry"  # the routing core: ``gantry`` (default profile) or ``gantry:PROFILE``


def is_gantry(name: str) -> bool:
    """True for ``gantry`` and ``gantry:PROFILE``."""
    return name == GANTRY or name.startswith(GANTRY + ":")


def make_router(name: str) -> Router:
    """A router by name: ``rr``, ``least``, ``gantry`` or ``gantry:PROFILE``."""
    if is_gantry(name):
        from shared.core.sim.gantry import make_gantry

        return make_gantry(name)
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}, gantry[:PROFILE]") from None

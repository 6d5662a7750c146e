"""Profile handlers: which profiles run for a request and how their results combine (GIE proposal 0845)."""

from __future__ import annotations

from shared.core.routing.handlers.base import Handler, HandlerOutcome
from shared.core.routing.handlers.pd import PdHandler
from shared.core.routing.handlers.single import SingleHandler

HANDLERS: dict[str, type[Handler]] = {SingleHandler.type_name: SingleHandler, PdHandler.type_name: PdHandler}

__all__ = ["HANDLERS", "Handler", "HandlerOutcome"]

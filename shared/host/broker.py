"""The placement services' FastStream broker: its stop ends within a bound whatever NATS does."""

from __future__ import annotations

from types import TracebackType

from faststream.nats import NatsBroker

from shared.host.disconnect import close_promptly


class PromptNatsBroker(NatsBroker):
    """FastStream's NATS broker with a stop that ends within ``DRAIN_S + CLOSE_S`` (plus the cancellations): its own
    stop awaits nats-py's drain without a bound and lets it raise."""

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        """Stop the broker's subscribers, then close its connection promptly (``close_promptly``)."""
        connection, self._connection = self._connection, None  # none left for FastStream's own stop to drain
        try:
            await super().stop(exc_type, exc_val, exc_tb)
        finally:
            if connection is not None:
                await close_promptly(connection)

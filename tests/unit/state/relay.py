"""A TCP relay in front of the real Redis that loses replies on purpose (tests of lost replies and replays)."""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    """A TCP relay in front of the real Redis that can lose what Redis answers on purpose: while ``cuts`` is
    above 0, the next EVALSHA's reply is not passed on: the client's connection is closed instead (the script ran;
    the client cannot know it) and ``cuts`` counts one down; ``hold`` holds every later reply on the latest connection
    for that long (a blackholed server, then late replies)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.cuts = 0  # EVALSHA replies still to lose
        self.hold = 0.0
        self.held = 0  # the connection whose replies are held (by number)
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._serving: dict[asyncio.Task[None], tuple[asyncio.StreamWriter, ...]] = {}

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        mine = self.connections
        me = asyncio.current_task()
        assert me is not None
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        self._serving[me] = (client_w, up_w)  # type: ignore[index]
        cut = asyncio.Event()

        async def upward() -> None:
            while data := await client_r.read(65536):
                if self.cuts and b"EVALSHA" in data:
                    self.cuts -= 1
                    cut.set()
                up_w.write(data)
            up_w.close()  # the client left: so does the relay's upstream (its reader ends the other way)

        async def downward() -> None:
            while data := await up_r.read(65536):
                if cut.is_set():
                    client_w.close()
                    return
                if self.hold and mine == self.held:
                    await asyncio.sleep(self.hold)
                client_w.write(data)

        try:
            await asyncio.gather(upward(), downward())
        except (ConnectionError, OSError):
            pass
        finally:
            client_w.close()
            up_w.close()
            self._serving.pop(me, None)  # type: ignore[call-overload]

    async def close(self) -> None:
        """Stop listening and end the connections still relayed (not left to the event loop's close)."""
        assert self.server is not None
        self.server.close()
        for task, writers in list(self._serving.items()):
            for w in writers:  # both ends closed: its reads end, and so does its task
                w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait_for(task, 1.0)

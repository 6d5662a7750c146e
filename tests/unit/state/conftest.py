"""A StateStore on the session's real redis-server, emptied for every test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ops.servers import ServerProcess
from shared.state import StateStore


@pytest.fixture
async def store(redis_server: ServerProcess) -> AsyncIterator[StateStore]:
    """A fresh store (database 3 flushed) on the real Redis."""
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    st = StateStore.from_url(url)
    await st.r.flushdb()
    yield st
    await st.close()

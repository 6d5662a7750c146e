"""Replays of a script call answered as its first run.

A client that loses a script's reply (its connection failed after the command was written, or the reply timed
out) sends the same call again on a new connection: ``shared.state.lean`` does, and so does redis-py's retry for
the clients that run scripts through it. The script may then run twice. For most scripts a second run would
change nothing stored but answer differently (a request queued by the first run is a "duplicate" to the second,
a take whose ids the first run leased finds the list's head changed, a status report the first run applied is
"ignored"), and the caller would take another branch than the one the first run meant.

Such a script starts with ``prelude()``: the caller names the call with a key of its own, passed as the script's
last key (``call_key``); a run that changed something records its reply there, and a later run of the same call
answers that reply and changes nothing. The record expires after ``REPLAY_TTL_S``, longer than any client's
retries of one call last (the lean connection's ten retries, each at most a reply timeout, a connect timeout and
a second's backoff: under two minutes; redis-py's default policy: three retries), so the records are bounded by
the call rate times that window and never grow without limit. A run that changed nothing records nothing: run
again it answers from the state it finds, as a call sent a moment later would.
"""

from __future__ import annotations

import itertools
import secrets

REPLAY_TTL_S = 300
_CALLER = secrets.token_hex(8)  # this process's calls: unique across processes and restarts
_CALLS = itertools.count()


def call_key(prefix: str) -> str:
    """A fresh key naming one script call: ``prefix`` (the caller's replay prefix, under its hash tag if any)
    followed by this process's name for the call."""
    return f"{prefix}{_CALLER}:{next(_CALLS)}"


def prelude() -> str:
    """Lua prepended to a script whose last key names its call: ``replayed()`` is the reply a former run of the
    very call recorded (nil: none), ``remember(reply)`` records ``reply`` for a replay and returns it."""
    return f"""local REPLAY_KEY = KEYS[#KEYS]
local function replayed()
  local memo = redis.call("GET", REPLAY_KEY)
  if memo then return cjson.decode(memo) end
  return nil
end
local function remember(reply)
  redis.call("SET", REPLAY_KEY, cjson.encode(reply), "EX", {REPLAY_TTL_S})
  return reply
end
"""

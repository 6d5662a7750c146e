"""Input limits of Gantry, declared once: every boundary (CLI, bus decode, state layer, Lua) enforces these.

The bounds are physical (no GPU has 4 TiB of memory, no machine 256 TiB of RAM) or protective (no model
needs more than ``MAX_REPLICAS`` replicas, and a count without a bound lets one command make Redis loop).
They are attached to the domain and message structs as msgspec ``Meta`` constraints (the annotated types
below), so a payload that decodes is within them: the services never see a negative claim, a GPU of
2**64 bytes or a name that would break a NATS subject, an instance id or a ledger field.

Why each number (``docs/operations.md`` lists them for operators):

- names are DNS-label-like: 1-63 letters, digits, ``-``, ``_`` (and ``.`` in model names, as in
  ``llama-3.1-8b``), starting and ending with a letter or digit. Worker names are NATS subject tokens
  (no dot); model names enter instance ids, subjects and ledger fields (no ``:``, ``|``, ``;``, ``*``,
  ``>``, spaces, slashes or quotes);
- ``MAX_REPLICAS``: replicas of one model; converge work per Redis call is chunked below it anyway;
- ``MAX_GPUS_PER_WORKER`` / ``MAX_GPU_INDEX``: a worker's GPUs (an NVL72 rack as one worker still fits);
- ``MAX_GPU_VRAM``, ``MAX_WORKER_RAM``, ``MAX_MODEL_BYTES``: bytes, far above any real device or model,
  far below where sums over a worker or a model overflow a 64-bit column;
- ``MAX_POOL_ENDPOINTS``: model servers in one picker's pool: every server is a bit of every prefix-index
  mask and a member of every pool rebuild, so an unbounded stream of new instance ids would grow both without
  end; 10,000 is ``MAX_REPLICAS`` (a deployment far larger is sharded over gateways anyway);
- ``MAX_KV_BLOCKS``: a model server's KV-cache blocks; an H200's 141 GB holds ~4.4M tokens of the
  smallest real KV footprint (~32 KB a token), i.e. ~275k 16-token blocks: 16M is far above, and it bounds
  what a router's precise prefix index holds for one server (it sizes that index from the report);
- ``MAX_FILES_PER_WORKER``: model sources whose files one worker reports on: every one is kept (in Redis and in
  every locality-scoring snapshot) until its worker leaves, so a worker reporting ever new sources would grow
  both without end; a thousand models' weights on one machine is tens of terabytes;
- ``MAX_MESSAGE_BYTES``: NATS ``max_payload`` (``ops/config/nats.conf``); ``MAX_SPEC_BYTES``: a spec file;
- nesting depth: unknown JSON fields are skipped by the decoder, which recurses; anything deeper than
  the interpreter allows is refused as invalid (never a RecursionError).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Annotated

import msgspec

KIB = 1 << 10
MIB = 1 << 20
TIB = 1 << 40

MAX_NAME_LENGTH = 63
# \Z, not $: "$" also matches before a trailing newline, and "w0\n" is no name (found by bench/fuzz.py).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z"
WORKER_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z"
MAX_ID_LENGTH = 128  # instance ids: a model name, a dash and a random suffix
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z"
MAX_TEXT = 1024  # sources, paths, products, label values, messages
MAX_LABELS = 64

MAX_REPLICAS = 10_000
MAX_GPUS_PER_WORKER = 128
MAX_EMULATED_WORKERS = 100_000  # workers one emulated fleet process runs (the benches' largest: a few thousand)
MAX_GPU_INDEX = 1023
MAX_GPUS_PER_REPLICA = 1024
MAX_GPU_VRAM = 4 * TIB
MAX_WORKER_RAM = 256 * TIB
MAX_MILLICORES = 100_000_000  # CPU in milli-cores: 100,000 cores
MAX_MODEL_BYTES = 1 << 52  # a replica's whole claim or a model's weights (MAX_GPUS_PER_REPLICA × MAX_GPU_VRAM)
MAX_LAYERS = 100_000
MAX_CONTEXT = 1 << 24
MAX_PRIORITY = 1 << 31  # priorities lie in [-MAX_PRIORITY, MAX_PRIORITY): a 32-bit int, as GIE's objectives
MAX_ATTEMPTS = 1_000_000
MAX_TIME = 1e11  # seconds since the epoch (year 5138): times are finite and non-negative
MAX_SCORE = 1e15
MAX_INSTANCES_PER_WORKER = 10_000
MAX_BATCH_ITEMS = 20_000  # items, outcomes or events in one message
MAX_GPU_NAME = 128  # characters of a GPU's vendor or product name, or of a worker's cluster name
MAX_GPU_KINDS_PER_WORKER = 8  # distinct (vendor, product) in one worker's inventory (every service interns them)
MAX_POOL_ENDPOINTS = 10_000  # model servers one picker routes over (all models); more reports are refused
MAX_ENGINE_REQUESTS = 100_000  # requests one model server reports running or waiting
MAX_KV_BLOCKS = 1 << 24  # KV blocks one model server reports (a router indexes up to ~1.25x this per server)
MAX_FILES_PER_WORKER = 1_000  # model sources one worker reports files of; a new one past this is refused
MAX_LIST = 10_000  # any other list in a message (GPU ids, local paths, parameters)

MAX_MESSAGE_BYTES = 8 * MIB
MAX_SPEC_BYTES = 1 * MIB

ModelName = Annotated[str, msgspec.Meta(pattern=MODEL_NAME_PATTERN, max_length=MAX_NAME_LENGTH)]
WorkerName = Annotated[str, msgspec.Meta(pattern=WORKER_NAME_PATTERN, max_length=MAX_NAME_LENGTH)]
InstanceId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Labels = Annotated[dict[Text, Text], msgspec.Meta(max_length=MAX_LABELS)]
Replicas = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]
GpuCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_GPUS_PER_REPLICA)]
VramBytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_VRAM)]
RamBytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKER_RAM)]
MilliCores = Annotated[int, msgspec.Meta(ge=0, le=MAX_MILLICORES)]
ModelBytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_MODEL_BYTES)]
Layers = Annotated[int, msgspec.Meta(ge=0, le=MAX_LAYERS)]
Tokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_CONTEXT)]
Attempt = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPTS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # a non-negative counter (requests, tokens)
# one engine's requests running or waiting at a moment: far past any real server's queue, low enough that one report
# cannot flatten a pool's min-max queue scores or dominate its saturation mean
EngineRequests = Annotated[int, msgspec.Meta(ge=0, le=MAX_ENGINE_REQUESTS)]
Seq = Count  # a message's number in its sender's sequence
KvBlocks = Annotated[int, msgspec.Meta(ge=0, le=MAX_KV_BLOCKS)]  # 0: not reported
BlockSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_CONTEXT)]
Time = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TIME)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Score = Annotated[float, msgspec.Meta(ge=-MAX_SCORE, le=MAX_SCORE)]
Millis = Annotated[float, msgspec.Meta(ge=-MAX_TIME, le=MAX_TIME)]


_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_WORKER_NAME = re.compile(WORKER_NAME_PATTERN)
_GRAMMAR = "1-63 letters, digits, '-' or '_'{dots}, starting and ending with a letter or digit"


def _bad_name(
    kind: str, name: str, pattern: re.Pattern[str], dots: bool, quote: Callable[[str], str]
) -> str | None:
    if not name:
        return f"empty {kind} name"
    if len(name) > MAX_NAME_LENGTH:
        return f"invalid {kind} name {quote(name[:40])}...: longer than {MAX_NAME_LENGTH} characters"
    if not pattern.match(name):
        return f"invalid {kind} name {quote(name)}: " + _GRAMMAR.format(dots=", '.'" if dots else "")
    return None


def decimal(text: str) -> bool:
    """Whether ``text`` is a plain non-negative decimal number: ASCII digits only (``str.isdigit`` also takes
    ``'²'`` and other digits that ``int`` refuses, which raised deep inside whoever parsed the text)."""
    return text.isascii() and text.isdigit()


def first_repeat(keys: Iterable[str]) -> str | None:
    """The first key seen a second time in ``keys``, else None (one pass: a huge list costs what it is long)."""
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def bad_model_name(name: str, quote: Callable[[str], str] = repr) -> str | None:
    """Why ``name`` is not a model name (it may hold dots, as ``llama-3.1-8b``), or None. The name is shown as
    ``quote`` writes it: ``repr`` (escaped, for logs and dead letters) unless the caller escapes the whole line."""
    return _bad_name("model", name, _MODEL_NAME, dots=True, quote=quote)


def bad_worker_name(name: str, quote: Callable[[str], str] = repr) -> str | None:
    """Why ``name`` is not a worker name (also a NATS subject token: no dots), or None; ``quote`` as above."""
    return _bad_name("worker", name, _WORKER_NAME, dots=False, quote=quote)

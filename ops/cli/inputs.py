"""What a user types or names on the command line, checked against the limits before anything is sent.

Files (scenarios, specs, profiles) are read only up to a size limit; names follow the grammar of
``shared.core.limits``; counts stay within its bounds. Each failure is a one-line CliError with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from ops.cli.errors import CliError, quoted
from shared.core.limits import (
    MAX_LABELS,
    MAX_REPLICAS,
    MAX_SPEC_BYTES,
    MAX_TEXT,
    MIB,
    bad_model_name,
    bad_worker_name,
    first_repeat,
)

MAX_SCENARIO_BYTES = 64 * MIB  # scenarios carry request lists: larger than a spec, still read whole
MAX_EVENTS_SHOWN = 100_000  # `events --last`: past events read back and printed at most


def read_input_file(path: Path, what: str, limit: int = MAX_SPEC_BYTES) -> bytes:
    """The file's bytes (at most ``limit``), or a CliError with exit code 2 saying what is wrong."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # never more than the limit in memory, whatever the file's size
    except OSError as err:
        raise CliError(f"cannot read {what} {path}: {err.strerror or err}", exit_code=2) from None
    if len(data) > limit:
        raise CliError(f"{what} {path} is larger than the limit of {_size(limit)}", exit_code=2)
    return data


def model_name(name: str) -> str:
    """``name`` if it is a valid model name, else a CliError (exit 2)."""
    reason = bad_model_name(name, quoted)
    if reason:
        raise CliError(reason, exit_code=2)
    return name


def worker_name(name: str) -> str:
    """``name`` if it is a valid worker name, else a CliError (exit 2)."""
    reason = bad_worker_name(name, quoted)
    if reason:
        raise CliError(reason, exit_code=2)
    return name


def worker_labels(items: tuple[str, ...]) -> tuple[str, ...]:
    """``items`` (``KEY=VALUE`` each) if they make labels a worker may carry (``shared.core.limits``: at most
    MAX_LABELS keys, each key and value at most MAX_TEXT characters), else a CliError (exit 2). A worker beyond them
    never registers: its heartbeats are dead-lettered."""
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        raise CliError(f"--label expects KEY=VALUE, got {quoted(bad[0][:80])}", exit_code=2)
    given = [item.split("=", 1)[0] for item in items]
    keys = set(given)
    if (twice := first_repeat(given)) is not None:  # the fleet refuses it too: the last would win, silently
        raise CliError(f"--label {quoted(twice[:80])} is given more than once", exit_code=2)
    if len(keys) > MAX_LABELS:
        raise CliError(f"at most {MAX_LABELS} labels per worker, got {len(keys)}", exit_code=2)
    if long := [item for item in items if any(len(part) > MAX_TEXT for part in item.split("=", 1))]:
        raise CliError(f"a label's key and value are at most {MAX_TEXT} characters each, got "
                       f"{quoted(long[0][:40])}... ({len(long[0])} characters)", exit_code=2)
    return items


def replica_count(replicas: int) -> int:
    """``replicas`` if within 0..MAX_REPLICAS, else a CliError (exit 2)."""
    if not 0 <= replicas <= MAX_REPLICAS:
        raise CliError(f"replicas must be between 0 and {MAX_REPLICAS}, got {_short_int(replicas)}", exit_code=2)
    return replicas


def _short_int(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n} bytes"


def event_count(count: int) -> int:
    """``count`` if within 0..MAX_EVENTS_SHOWN, else a CliError (exit 2)."""
    if not 0 <= count <= MAX_EVENTS_SHOWN:
        raise CliError(f"--last must be between 0 and {MAX_EVENTS_SHOWN}, got {_short_int(count)}", exit_code=2)
    return count

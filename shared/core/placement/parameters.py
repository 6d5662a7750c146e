"""Reading backend command-line parameters (``--tensor-parallel-size=4``, ``--tp 4``, ...)."""

from __future__ import annotations

from collections.abc import Sequence


def find_parameter(params: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the first of ``names`` given in ``params``, as ``--name=v``, ``--name v`` or ``-name v``.

    A flag given without a value yields ``""``. The last occurrence wins, as in argparse.
    """
    wanted = {n.lstrip("-") for n in names}
    found: str | None = None
    tokens = list(params)
    for i, token in enumerate(tokens):
        if not token.startswith("-"):
            continue
        key, sep, value = token.lstrip("-").partition("=")
        if key not in wanted:
            continue
        if sep:
            found = value
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            found = tokens[i + 1]
        else:
            found = ""
    return found


def int_parameter(params: Sequence[str], names: Sequence[str]) -> int | None:
    """An integer parameter, or None when absent; raises ValueError when not an integer."""
    value = find_parameter(params, names)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--{names[0]} must be an integer, got {value!r}") from None


def float_parameter(params: Sequence[str], names: Sequence[str]) -> float | None:
    """A float parameter, or None when absent; raises ValueError when not a number."""
    value = find_parameter(params, names)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--{names[0]} must be a number, got {value!r}") from None


def world_size(params: Sequence[str]) -> int | None:
    """GPUs one replica uses according to tensor/pipeline/data parallel sizes, or None if none is set."""
    tp = int_parameter(params, ["tensor-parallel-size", "tp", "tp-size"])
    pp = int_parameter(params, ["pipeline-parallel-size", "pp", "pp-size"])
    dp = int_parameter(params, ["data-parallel-size", "dp", "dp-size"])
    if tp is None and pp is None and dp is None:
        return None
    sizes = [s for s in (tp, pp, dp) if s is not None]
    if any(s < 1 for s in sizes):
        raise ValueError("parallel sizes must be at least 1")
    total = 1
    for size in sizes:
        total *= size
    return total


def tensor_parallel_size(params: Sequence[str]) -> int | None:
    """The tensor-parallel size, when given."""
    return int_parameter(params, ["tensor-parallel-size", "tp", "tp-size"])

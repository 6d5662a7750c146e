"""YAML decoding that refuses a mapping key given twice, at any depth.

PyYAML (and ``msgspec.yaml.decode`` over it) keeps the last of two equal keys without a word, so a spec with
``name: m`` then ``name: n`` silently deploys ``n``. ``decode`` here is ``msgspec.yaml.decode`` with one more
rule: a repeated key is a ``msgspec.DecodeError`` whose message names the key and its line in PyYAML's own
layout (problem, then ``in "...", line L, column C``), so the callers' existing one-line formatting applies.
Loading stays safe (the safe loader: no arbitrary tags); merge keys (``<<: *base``) keep their meaning, a key
written out may override one merged in.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterator
from typing import Any, TypeVar, overload

import msgspec

__all__ = ["decode"]

T = TypeVar("T")

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_KEY_SHOWN = 60  # a key longer than this is cut in the message: the message stays one readable line

def _shown(key: object) -> str:
    text = repr(key)
    return text if len(text) <= _KEY_SHOWN else text[: _KEY_SHOWN - 3] + "..."


def _refuse_duplicates(loader: Any, node: Any) -> None:
    """Raise a ConstructorError at the second occurrence of any scalar key of ``node``."""
    import yaml

    first_line: dict[object, int] = {}
    for key_node, _ in node.value:
        # Only scalar keys: complex keys are unhashable and the safe constructor already refuses them.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        try:
            seen = first_line.get(key)
        except TypeError:  # an unhashable scalar cannot happen with the safe tags; let the constructor say so
            continue
        line = key_node.start_mark.line + 1
        if seen is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"found duplicate key {_shown(key)} (first on line {seen})", key_node.start_mark
            )
        first_line[key] = line


def _strict_map(loader: Any, node: Any) -> Iterator[dict[Any, Any]]:
    import yaml

    _refuse_duplicates(loader, node)
    yield from yaml.constructor.SafeConstructor.construct_yaml_map(loader, node)


@functools.cache
def _strict_loader() -> Any:
    """The safe loader (its C parser when built, as msgspec picks) with the map constructor that checks keys.

    Built on first use: PyYAML is imported only by a process that reads YAML."""
    import yaml

    loader: Any = type("_StrictLoader", (getattr(yaml, "CSafeLoader", yaml.SafeLoader),), {})
    loader.add_constructor(_MAP_TAG, _strict_map)
    return loader


@overload
def decode(data: bytes | str) -> Any: ...
@overload
def decode(data: bytes | str, *, type: type[T]) -> T: ...
def decode(data: bytes | str, *, type: Any = Any) -> Any:
    """``msgspec.yaml.decode(data, type=type)`` that also refuses a repeated mapping key (DecodeError)."""
    import yaml

    try:
        obj = yaml.load(data, _strict_loader())  # a SafeLoader subclass: no arbitrary tags
    except (yaml.YAMLError, ValueError, LookupError, AttributeError) as exc:  # the errors msgspec wraps too
        raise msgspec.DecodeError(str(exc)) from None
    if type is Any:
        return obj
    return msgspec.convert(obj, type, builtin_types=(datetime.datetime, datetime.date))

"""GIE's endpoint subset hint, read one way whatever carries it.

A gateway may name the endpoints a request may go to (``protocol.SUBSET_KEY``: a list of ``ip:port``, or one
comma-separated string). On the ext_proc transport it comes as metadata (``protocol.SUBSET_NAMESPACE``, GIE's
protocol); on the ext_authz transport, which sends an HTTP authorization service no metadata, as a request
header of the same name. Both end here, so the two transports allow exactly the same endpoints for the same
hint: the picker chooses only among them, fallback list included; an empty list, a value it cannot read, or one
naming no endpoint it knows allows none (503), never the whole pool.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from collections.abc import Iterable

MAX_SUBSET_ENTRIES = 4096
"""A hint naming more endpoints than this is unreadable (it allows none). Past any pool the picker serves, and it
bounds what one request can cost: each entry is parsed as an address (a few µs), and a metadata list has no size
limit of its own (a header's is Envoy's 60 KiB, ~4,000 IPv4 entries)."""
CACHED_CHARS = 4096  # a hint string this short is parsed once and remembered (longer ones: every time)
NO_ENDPOINT: frozenset[str] = frozenset()


def subset_of_entries(entries: Iterable[str]) -> frozenset[str]:
    """The canonical addresses a hint's entries allow: none past ``MAX_SUBSET_ENTRIES`` entries (empty ones
    counted, then skipped)."""
    taken = list(itertools.islice(entries, MAX_SUBSET_ENTRIES + 1))  # a huge list is not read to its end
    if len(taken) > MAX_SUBSET_ENTRIES:
        return NO_ENDPOINT
    return frozenset(canonical_address(e) for e in taken if e.strip())


def subset_of_text(value: str) -> frozenset[str]:
    """A hint written as one comma-separated string (the header form, or a metadata string)."""
    return _cached_subset_of_text(value) if len(value) <= CACHED_CHARS else _subset_of_text(value)


def _subset_of_text(value: str) -> frozenset[str]:
    # split at most past the bound: a string of millions of commas is not cut into millions of pieces
    return subset_of_entries(value.split(",", MAX_SUBSET_ENTRIES))


# a gateway sets the same hint on request after request; a stream of distinct ones evicts only this cache
_cached_subset_of_text = functools.lru_cache(maxsize=64)(_subset_of_text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP literal ``text`` names (bracketed or not), or None. An IPv4-mapped IPv6 address is its IPv4 address:
    a dual-stack proxy writes an IPv4 peer so (``[::ffff:10.0.0.5]``), an engine reports itself as ``10.0.0.5``."""
    try:
        ip = ipaddress.ip_address(text[1:-1] if text[:1] == "[" and text[-1:] == "]" else text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def canonical_address(address: str) -> str:
    """``host:port`` in one spelling when the host is an IP literal (an IPv6 one compressed, lower case, bracketed),
    so GIE's subset and the engines' own addresses compare equal however each side writes them (``[fd00::5]`` as
    a proxy writes a pod's address, ``[fd00:0:0::5]`` as an engine may report itself); anything else as it is.
    Cached: the pool's addresses are read again for every request that has a subset. A bare IP (GIE's reference
    picker matches its subset on pods' IPs alone) comes back as the IP, unbracketed: it names every port there."""
    text = address.strip()
    if (bare := _ip(text)) is not None:
        return str(bare)
    host, _, port = text.rpartition(":")
    # a port is at most 5 digits: a longer one is no port (and past 4,300 digits int() itself refuses it)
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or (ip := _ip(host)) is None:
        return address
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def in_subset(address: str, subset: frozenset[str]) -> bool:
    """Whether the endpoint at canonical ``address`` is in ``subset``: named with its port, or by its IP alone."""
    if address in subset:
        return True
    host = address.rpartition(":")[0]
    return (host[1:-1] if host[:1] == "[" else host) in subset

"""Where the gateway routed a request: one chat completion through Envoy, and the instance behind the address
Envoy served it from (read from the endpoint file the picker writes for Envoy)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ops.envoy import SERVED
from services.gateway.epp import PICKED
from services.gateway.pool import INSTANCE_NAMESPACE


@dataclass(frozen=True)
class Routed:
    """One request's route: the address Envoy sent it to, that address's instance, the picker's list."""

    address: str
    instance: str
    choices: str
    status: int


def instances_by_address(eds: Path) -> dict[str, str]:
    """``host:port`` → instance id of every endpoint in the picker's endpoint file (empty if unreadable)."""
    try:
        doc = json.loads(eds.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for res in doc.get("resources", []):
        for group in res.get("endpoints", []):
            for lb in group.get("lb_endpoints", []):
                sock = lb["endpoint"]["address"]["socket_address"]
                meta = lb.get("metadata", {}).get("filter_metadata", {}).get(INSTANCE_NAMESPACE, {})
                out[f"{sock['address']}:{sock['port_value']}"] = str(meta.get("instance", "?"))
    return out


def chat_once(url: str, model: str, eds: Path | None = None, timeout: float = 30.0,
              max_tokens: int = 8) -> Routed:
    """Send a streamed chat completion to the gateway at ``url`` until one is served (the pool may not have
    reached Envoy yet); RuntimeError when ``timeout`` passes first."""
    import httpx  # only the callers that drive HTTP pay for it

    body = {"model": model, "messages": [{"role": "user", "content": "Where am I routed?"}],
            "max_tokens": max_tokens, "stream": True}
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=10) as r:
                for _ in r.iter_bytes():
                    pass
                served = r.headers.get(SERVED, "")
                if r.status_code == 200 and served:
                    where = instances_by_address(eds).get(served, "?") if eds is not None else "?"
                    return Routed(served, where, r.headers.get(PICKED, ""), r.status_code)
                last = f"HTTP {r.status_code}"
        except httpx.HTTPError as err:
            last = repr(err)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no chat completion for {model} routed within {timeout:g} s ({last})")
        time.sleep(0.3)

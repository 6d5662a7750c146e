"""The web view `gantry up` serves, against the package's demo stack, in real headless Chromium.

Chromium renders the page (screenshot) and its DOM is checked for every worker, every GPU cell, the demo
models with their counts and the event stream. Skipped, saying why, only where no Chromium is installed
(Debian: ``apt-get install -y chromium``). ``GANTRY_WEB_SCREENSHOT=PATH`` also keeps the screenshot there
(how ``docs/web-view.png`` and ``docs/web-view-pending.png`` are made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import Result, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)
DEMO_MODELS = ("llama-8b", "llama-70b")


def chromium() -> str:
    """The Chromium binary, or a clear skip."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed: the web view's browser test needs it (Debian: apt-get install -y chromium)")


def web_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.env['GANTRY_WEB_PORT']}/"


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=15) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, check=False,
    )


def test_up_announces_the_web_view(stack: Stack) -> None:
    assert f"web view: {web_url(stack)}" in stack.startup_output


def test_state_endpoint_has_workers_gpus_models_and_events(stack: Stack) -> None:
    status, kind, body = get(web_url(stack) + "api/state")
    assert status == 200 and kind.startswith("application/json")
    state: dict[str, Any] = json.loads(body)
    assert len(state["workers"]) == 4 and all(w["state"] == "READY" for w in state["workers"])
    assert len(state["gpus"]) == 4 * 8
    models = {m["name"]: m for m in state["models"]}
    assert set(DEMO_MODELS) <= set(models)
    for name in DEMO_MODELS:
        assert models[name]["states"].get("RUNNING", 0) == models[name]["desired"] > 0
    held = {model for gpu in state["gpus"] for model in gpu["models"]}
    assert set(DEMO_MODELS) <= held
    assert any("placed" in line for line in state["events"])


def test_chromium_renders_workers_models_and_events(stack: Stack, tmp_path: Path) -> None:
    url = web_url(stack)
    shot = tmp_path / "web-view.png"
    taken = run_chromium(["--window-size=1400,1000", f"--screenshot={shot}", url], tmp_path / "profile-shot")
    assert shot.exists() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("GANTRY_WEB_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)

    dumped = run_chromium(["--virtual-time-budget=3000", "--dump-dom", url], tmp_path / "profile-dom")
    dom = dumped.stdout
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    workers = re.findall(r'data-worker="([^"]+)"', dom)
    assert len(workers) == 4, workers
    assert len(re.findall(r'data-gpu="\d+"', dom)) == 4 * 8
    for model in DEMO_MODELS:
        assert f'data-model="{model}"' in dom
        assert f'<div class="model" title="{model}">' in dom  # on the GPU map too
    assert dom.count("READY") >= 4
    assert re.search(r'<pre class="events" id="events">[^<]*placed', dom)


def test_page_refreshes_its_content_from_the_fragment(stack: Stack) -> None:
    status, kind, body = get(web_url(stack) + "fragment")
    assert status == 200 and kind.startswith("text/html")
    assert 'id="summary"' in body and "<html" not in body
    _, _, page = get(web_url(stack))
    assert "fetch('/fragment'" in page


def test_chromium_shows_cordons_and_pending_reasons(
    stack: Stack, gantry: Callable[..., Result], tmp_path: Path
) -> None:
    chromium()  # skip before changing the stack when there is no browser
    spec = tmp_path / "too-big.yaml"
    spec.write_text(f"name: too-big\nsource: x/too-big\nreplicas: 2\nvram_claim: {5000 * 2**30}\n")
    assert gantry("cordon", "w3:0").code == 0
    assert gantry("deploy", str(spec)).code == 0
    try:
        deadline = time.monotonic() + 30
        while True:
            state = json.loads(get(web_url(stack) + "api/state")[2])
            if any(p["model"] == "too-big" and len(p["instances"]) == 2 for p in state["pending"]):
                break
            assert time.monotonic() < deadline, state["pending"]
            time.sleep(0.5)
        shot = tmp_path / "web-view-pending.png"
        run_chromium(["--window-size=1400,1100", f"--screenshot={shot}", web_url(stack)], tmp_path / "p1")
        assert shot.exists() and shot.stat().st_size > 10_000
        keep = os.environ.get("GANTRY_WEB_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, Path(keep).with_name("web-view-pending.png"))
        dom = run_chromium(["--virtual-time-budget=3000", "--dump-dom", web_url(stack)], tmp_path / "p2").stdout
        card = re.search(r'data-worker="w3">(.*?)</div></div></div>', dom, re.S)
        assert card and 'class="gpu cordoned" data-gpu="0"' in card.group(1)
        assert re.search(r"<td>too-big</td><td class=\"?n\"?>2</td><td>[^<]*GiB", dom), "pending reason missing"
    finally:
        gantry("scale", "too-big", "0")
        gantry("uncordon", "w3:0")

"""The docker build context leaves out the virtualenv, the local stack's data, git and caches, and keeps
everything the Dockerfile copies."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copied() -> list[str]:
    """The sources of every COPY in the Dockerfile."""
    out: list[str] = []
    for line in (REPO / "ops" / "docker" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            out += [w for w in words[1:-1] if not w.startswith("--")]
    return out


def excluded(path: str) -> bool:
    """Whether a context path is left out (plain and ``**/`` patterns, as the ones in use; no ``!``)."""
    parts = Path(path).parts
    for pat in patterns():
        bare = pat.removeprefix("**/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            return True
        if pat.startswith("**/") and any(fnmatch.fnmatch(part, bare) for part in parts):
            return True
    return False


@pytest.mark.parametrize("path", [".venv/lib/python3.11/site.py", ".gantry/logs/filter.log", ".git/HEAD",
                                  "shared/__pycache__/x.pyc", "services/filter/__pycache__/a.pyc",
                                  ".mypy_cache/3.11/x.json", ".pytest_cache/v", ".ruff_cache/x"])
def test_heavy_and_local_things_stay_out(path: str) -> None:
    assert excluded(path)


def test_nothing_the_dockerfile_copies_is_excluded() -> None:
    sources = copied()
    assert {"pyproject.toml", "README.md", "shared", "services", "ops"} <= set(sources)
    for src in sources:
        assert not excluded(src), src
    for src in ("ops/demo/llama-8b.yaml", "ops/config/nats.conf", "shared/settings.py"):
        assert not excluded(src), src

"""`ops/dev.sh` on a fresh clone: the long dependency install shows progress instead of minutes of silence."""

from __future__ import annotations

import shlex

from shared.paths import REPO_ROOT

DEV = (REPO_ROOT / "ops" / "dev.sh").read_text()


def install_lines() -> list[list[str]]:
    lines = [line for line in DEV.splitlines() if "pip install" in line and not line.strip().startswith("#")]
    return [shlex.split(line) for line in lines]


def test_the_project_install_is_not_quiet() -> None:
    project = [words for words in install_lines() if ".[dev]" in words]
    assert project, "ops/dev.sh no longer installs the project"
    for words in project:
        assert not {"-q", "--quiet", "-qq"} & set(words), " ".join(words)
        assert "--progress-bar" in words and words[words.index("--progress-bar") + 1] == "on"


def test_the_install_says_what_it_does_first() -> None:
    before = DEV.split('pip install --progress-bar on -e ".[dev]"')[0]
    assert "installing Gantry and its dependencies" in before

"""Docs say only what the CLI does: every `gantry ...` command line in the README and docs/ names a command that
exists and only options that command has (issue 17: docs drift)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main

from ops.cli.main import app
from shared.paths import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(gantry [^`]+)`")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def command_lines(text: str) -> list[str]:
    """`gantry ...` lines of code blocks (a shell prompt stripped) and inline code spans."""
    found: list[str] = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("gantry "):
                found.append(line)
    found += INLINE.findall(text)
    return [line.split("#", 1)[0].strip() for line in found]


WORD = re.compile(r"^[a-z][a-z0-9-]*$")


def cases() -> list[tuple[str, str]]:
    """(doc, command line) for every invocation; prose such as "gantry CLI" in a diagram is not one."""
    return [
        (doc.name, line) for doc in DOCS for line in command_lines(doc.read_text())
        if len(line.split()) > 1 and (WORD.match(line.split()[1]) or line.split()[1].startswith("--"))
    ]


def resolve(words: list[str]) -> tuple[Any, list[str]]:
    """The click command the words name and the words left after its name."""
    command: Any = typer.main.get_command(app)
    rest = list(words)
    while rest and hasattr(command, "get_command"):
        sub = command.get_command(None, rest[0])
        if sub is None:
            break
        command, rest = sub, rest[1:]
    return command, rest


def option_names(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return names


def test_the_docs_show_commands() -> None:
    assert len(cases()) >= 40


@pytest.mark.parametrize(("doc", "line"), cases(), ids=[f"{d}: {c[:60]}" for d, c in cases()])
def test_a_documented_command_exists_with_its_options(doc: str, line: str) -> None:
    words = line.split()[1:]
    command, rest = resolve(words)
    assert command is not typer.main.get_command(app) or words[0].startswith("--"), (
        f"{doc}: `{line}`: no command {words[0]!r}"
    )
    if hasattr(command, "get_command") and rest and WORD.match(rest[0]):
        pytest.fail(f"{doc}: `{line}`: {command.name} has no subcommand {rest[0]!r}")
    unknown = sorted({opt for opt in OPTION.findall(" ".join(rest)) if opt not in option_names(command)})
    assert not unknown, f"{doc}: `{line}`: {command.name} has no option {', '.join(unknown)}"


def test_the_readme_shows_the_quick_unit_test_command_and_the_full_suite() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    lines = [line.split("#")[0].strip() for block in FENCE.findall(readme) for line in block.splitlines()]
    quick = [line for line in lines if "pytest" in line and "tests/unit" in line.split()]
    assert quick, "the README names no quick unit-test command"
    assert (REPO_ROOT / "tests" / "unit").is_dir()
    assert "bash ops/dev.sh test" in lines

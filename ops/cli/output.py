"""Printing a line the way typer does, without loading typer (the read commands' fast path prints with it)."""

from __future__ import annotations

import sys


def echo(text: str, err: bool = False) -> None:
    """``typer.echo(text, err=err)``: plain ASCII text is written and flushed as typer would, without loading
    typer; anything else (non-ASCII, escape codes, which typer strips off a non-terminal) goes through typer."""
    if text.isascii() and "\x1b" not in text:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + "\n")
        stream.flush()
        return
    import typer

    typer.echo(text, err=err)

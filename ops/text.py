"""Text from elsewhere as one safe, visible line (the CLI's errors and views show names and reports through it)."""

from __future__ import annotations

# Characters a message shows escaped, by Unicode category. Control characters (Cc: a newline, an escape
# sequence) would break the one-line error or drive the user's terminal; format characters (Cf: bidi overrides
# and isolates, zero-width spaces and joiners, the BOM, invisible tag characters) and the line and paragraph
# separators (Zl, Zp) make a printed name read differently from what it is ("Trojan Source"). A lone surrogate
# (Cs) is an undecodable byte of a file name or argument. Private-use (Co) and unassigned (Cn) code points have no
# meaning of their own: a terminal font may draw them as anything (icon fonts map letters there), and an unassigned
# one may be a format character in a newer Unicode than this Python's. Everything else, accents, CJK and emoji
# included, stays as it is, except the backslash: it is written doubled, as in a string literal, or the six
# characters of a typed ``\u202e`` would read exactly like the escaped override itself.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})


def escaped(text: str) -> str:
    """``text`` with every control, format, separator, surrogate, private-use or unassigned character written as
    Python writes it in a string literal (``\\n``, ``\\x1b``, ``\\u202e``, ``\\U000e0041``), and a backslash as
    ``\\\\``: one visible line, nothing in it acts on the terminal or hides what a name holds, and an escape read
    in it always stands for the character it names, never for what was typed.
    Every error line the CLI prints passes through here."""
    if text.isprintable() and "\\" not in text:  # the usual message (isprintable excludes those categories)
        return text
    import unicodedata

    return "".join(
        "\\\\" if c == "\\" else repr(c)[1:-1] if unicodedata.category(c) in _UNSAFE_CATEGORIES else c
        for c in text
    )

"""Token ids of a prompt by pre-token, cached: the picker's tokenizer for the common (ASCII) case.

The shipped tokenizer is a byte-level BPE (GPT-2 style): its pre-tokenizer cuts the text with one regular
expression and the BPE model then encodes each piece on its own, no merge ever crossing a piece. So a
prompt's ids are the concatenation of its pieces' ids, and a piece's ids never change: they can be cached.
In the picker most of ``Tokenizer.encode``'s time is the pre-tokenizer's Unicode regex and the
``Encoding`` it builds (offsets, masks), not BPE (~0.1-0.2 ms for a 600-character chat); for ASCII text
the same cut is one ``re`` pattern with ASCII classes, and a cached piece costs a dict look-up.

Exact by construction, and only where it can be: text with any character outside printable ASCII, tab, LF
and CR (where Unicode's and Python's ideas of letters and white space could part), or containing one of the
tokenizer's added tokens (matched before the regex), goes to ``Tokenizer.encode``.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer

# The GPT-2 pre-tokenizer pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)
# with its classes restricted to the characters the fast path admits: letters A-Z a-z, digits 0-9, white
# space tab, LF, CR and space. Both engines take the first alternative that matches, leftmost, greedy with
# backtracking, so the cut is the same.
_PIECE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\r A-Za-z0-9]+"
                    r"|[\t\n\r ]+(?![^\t\n\r ])|[\t\n\r ]+")
_OUTSIDE = re.compile(r"[^\t\n\r\x20-\x7e]")  # any character the fast path does not admit
MAX_CACHED = 200_000  # pieces remembered (words, numbers, runs of punctuation or space); cleared when full


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each byte as the printable character a byte-level BPE vocabulary spells it
    with (printable Latin-1 bytes stand for themselves, the others are moved above U+00FF in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = {b: chr(b) for b in keep}
    moved = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + moved)
            moved += 1
    return out


class PieceTokenizer:
    """``tokenize(text) -> ids``, equal to ``tokenizer.encode(text).ids`` for every text (ids of ASCII pieces
    cached). Only for a byte-level BPE tokenizer without normalizer or post-processor (checked)."""

    def __init__(self, tok: Tokenizer) -> None:
        pre = tok.pre_tokenizer
        if (tok.normalizer is not None or tok.post_processor is not None or type(pre).__name__ != "ByteLevel"
                or pre.add_prefix_space or not pre.use_regex or type(tok.model).__name__ != "BPE"):
            raise ValueError("PieceTokenizer needs a byte-level BPE tokenizer without normalizer or post-processor")
        self.tok = tok
        self.model = tok.model
        self.added = [t.content for t in tok.get_added_tokens_decoder().values()]
        self.alphabet = str.maketrans({chr(b): c for b, c in byte_to_unicode().items() if b < 128})
        self.cache: dict[str, list[int]] = {}

    def _piece(self, piece: str) -> list[int]:
        ids = [t.id for t in self.model.tokenize(piece.translate(self.alphabet))]
        if len(self.cache) >= MAX_CACHED:
            self.cache.clear()
        self.cache[piece] = ids
        return ids

    def __call__(self, text: str) -> list[int]:
        """The ids ``Tokenizer.encode(text)`` gives."""
        if _OUTSIDE.search(text) is not None or any(a in text for a in self.added):
            return list(self.tok.encode(text).ids)
        out: list[int] = []
        get = self.cache.get
        for piece in _PIECE.findall(text):
            ids = get(piece)
            out += ids if ids is not None else self._piece(piece)
        return out

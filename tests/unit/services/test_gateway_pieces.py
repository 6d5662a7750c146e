"""The picker's piece-cached tokenizer gives exactly the shipped tokenizer's ids, whatever the text."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models

from services.gateway import pieces
from services.gateway.pieces import PieceTokenizer, byte_to_unicode
from shared.assets.tokenizer import TOKENIZER_FILE

SHIPPED = Tokenizer.from_file(str(TOKENIZER_FILE))
# every class the pre-tokenizer pattern tells apart: letters, digits, contractions, punctuation, runs of space
TRICKY = "ab Z09'\t\n\r  .,!?-'sre'tvmlld\"#<|>xyz"


def test_random_ascii_texts_get_the_tokenizers_own_ids() -> None:
    rng = random.Random(7)
    pt = PieceTokenizer(SHIPPED)
    for _ in range(5000):
        text = "".join(rng.choice(TRICKY) for _ in range(rng.randrange(0, 60)))
        assert pt(text) == SHIPPED.encode(text).ids, repr(text)


def test_a_text_seen_again_is_answered_from_the_cache_with_the_same_ids() -> None:
    pt = PieceTokenizer(SHIPPED)
    text = "<|system|>\nYou are terse.\n<|user|>\nWhat's 2+2?  Say it.\n<|assistant|>\n"
    first = pt(text)
    assert pt.cache and pt(text) == first == SHIPPED.encode(text).ids


@pytest.mark.parametrize("text", ["naïve café ünïcode", "tab\tvertical\x0bform\x0cfeed", "ctl\x1fsep\x1c",
                                  "emoji 🙂 end", "a<|endoftext|>b", "nbsp\xa0here", ""])
def test_text_outside_the_fast_path_is_tokenized_by_the_tokenizer(text: str) -> None:
    assert PieceTokenizer(SHIPPED)(text) == SHIPPED.encode(text).ids


def test_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces, "MAX_CACHED", 10)
    pt = PieceTokenizer(SHIPPED)
    text = " ".join(f"w{i}" for i in range(100))
    assert pt(text) == SHIPPED.encode(text).ids and len(pt.cache) <= 10


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused() -> None:
    with pytest.raises(ValueError, match="byte-level BPE"):
        PieceTokenizer(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))


def test_the_byte_alphabet_is_a_bijection_onto_printable_characters() -> None:
    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())

"""Text side of the emulated model: the shipped tokenizer, prompt templating and the 'sampler'.

The emulated model samples whole space-prefixed words of the tokenizer's vocabulary, so the streamed
text re-tokenizes to exactly the tokens counted in ``usage``. Without ``ignore_eos`` it ends with EOS
after a seeded 'natural' length (uniform, mean ``mean_output_len``); the EOS token is not part of the text.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer

from shared.assets.tokenizer import EOS_TOKEN, TOKENIZER_FILE

MAX_PREGENERATED = 4096  # past this many tokens the model repeats one filler word


class TextModel:
    """Tokenizer plus a deterministic word sampler."""

    def __init__(self, mean_output_len: int = 128) -> None:
        self.tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise RuntimeError("shipped tokenizer has no EOS token")
        self.eos_token_id: int = eos
        self.mean_output_len = mean_output_len
        words: list[int] = []
        self.text: dict[int, str] = {}
        for tok, tid in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if tok.startswith("Ġ") and tok[1:].isalpha():
                text = " " + tok[1:]
                if self.tokenizer.encode(text).ids == [tid]:  # round-trips as exactly one token
                    words.append(tid)
                    self.text[tid] = text
        self.words = words
        self.filler = words[0]
        # each word's text as a JSON string literal: streaming a token is then a lookup, not an escape
        self._json: dict[int, bytes] = {tid: json.dumps(self.text[tid]).encode() for tid in words}

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this, exclusive."""
        return int(self.tokenizer.get_vocab_size())

    @property
    def json_pieces(self) -> Mapping[int, bytes]:
        """Every word's JSON string literal by token id (what :meth:`json_piece` gives for those ids)."""
        return self._json

    def json_piece(self, token_id: int) -> bytes:
        """The token's text as a JSON string literal (``b'" word"'``); EOS and unknown ids give ``b'""'``."""
        piece = self._json.get(token_id)
        return piece if piece is not None else json.dumps(self.text.get(token_id, "")).encode()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(self.tokenizer.encode(text).ids)

    def encode_off_gil(self, text: str) -> list[int]:
        """Token ids of ``text``, releasing the GIL meanwhile (``encode_batch`` does, ``encode`` does not):
        for a worker thread, so the event loop runs while a long prompt is tokenized."""
        return list(self.tokenizer.encode_batch([text])[0].ids)

    @staticmethod
    def render_chat(messages: Sequence[tuple[str, str]]) -> str:
        """A chat rendered with a minimal template (role markers, then the assistant turn)."""
        return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a rendered chat."""
        return self.encode(self.render_chat(messages))

    def sample(self, seed: str, max_tokens: int, ignore_eos: bool) -> list[int]:
        """The tokens this request will produce, in order (the engine applies the stop checks)."""
        rng = random.Random(zlib.crc32(seed.encode()))
        natural = rng.randint(1, max(2 * self.mean_output_len - 1, 1))
        n = min(max_tokens, MAX_PREGENERATED)
        if not ignore_eos and natural <= n:
            return [*rng.choices(self.words, k=natural - 1), self.eos_token_id]
        return rng.choices(self.words, k=n)  # one call: a 4k-token answer costs 0.3 ms, not 3 ms

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of sampled tokens (EOS yields nothing)."""
        t = self.text
        return "".join(t.get(i, "") for i in ids)

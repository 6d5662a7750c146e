"""Rebuild the shipped tokenizer: ``python -m shared.assets.tokenizer.build``.

The training text is synthetic (pseudo-words from a seeded syllable generator plus common English
function words), so the result is reproducible and carries no third-party text.
"""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.assets.tokenizer import EOS_TOKEN, TOKENIZER_DIR

VOCAB_SIZE = 4096
_FUNCTION_TEXT = (
    "the of and to in is that it for on with as was at by be this are from or have an they which you one "
    "we all were there can more if will about when so what up out into them some time only other than then "
    "now its also new first two may way like over such our even most after made many well"
)
FUNCTION_WORDS = _FUNCTION_TEXT.split()


def synthetic_corpus(seed: int = 7, sentences: int = 60_000) -> list[str]:
    """Sentences of pseudo-words and function words, with digits and punctuation."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "n", "r", "s", "t", "l", "m", "nd", "st"]
    lexicon = sorted({
        "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
        for _ in range(6000)
    })
    words = lexicon + FUNCTION_WORDS * 20
    out = []
    for _ in range(sentences):
        n = rng.randint(4, 18)
        s = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.2:
            s += f" {rng.randint(0, 9999)}"
        out.append(s.capitalize() + rng.choice([".", ".", "?", "!", ","]))
    return out


def build() -> Tokenizer:
    """Train the BPE and write tokenizer.json plus the HF side files into the package folder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    tok.save(str(TOKENIZER_DIR / "tokenizer.json"))
    side = {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS_TOKEN,
            "bos_token": EOS_TOKEN,
            "model_max_length": 131072,
            "clean_up_tokenization_spaces": False,
        },
        "special_tokens_map.json": {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN},
    }
    for name, body in side.items():
        (TOKENIZER_DIR / name).write_text(json.dumps(body, indent=2) + "\n")
    return tok


if __name__ == "__main__":
    t = build()
    print(f"vocab {t.get_vocab_size()} written to {TOKENIZER_DIR}")

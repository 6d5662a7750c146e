"""The emulated model's tokenizer: a small byte-level BPE trained on synthetic text (``build.py``).

Clients load it offline from this folder (``tokenizers.Tokenizer.from_file(.../tokenizer.json)`` or
``AutoTokenizer.from_pretrained(folder)``); the engine server reports the folder as its model path.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent
TOKENIZER_FILE = TOKENIZER_DIR / "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"

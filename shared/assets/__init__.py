"""Files shipped with the code (the emulator's tokenizer)."""

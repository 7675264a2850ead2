"""The model: carry-on stack, cross-tokenizer alignment, the mixture, LM head, factory."""

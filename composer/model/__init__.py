"""The model: the carry-on stack, cross-tokenizer alignment, the mixture, the LM head, its factory."""

"""A mixture in use: the terminal (streamed answers, the chat), the OpenAI-compatible server,
lm-evaluation-harness. The top layer: it may import anything below; only cli.py imports it."""

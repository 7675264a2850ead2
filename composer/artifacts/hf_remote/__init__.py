"""The Python files `compose export --format hf` writes beside the weights, copied verbatim.

They import torch and transformers only (never `composer`): `AutoModelForCausalLM` loads them
with `trust_remote_code=True` where compose is not installed. Importing this package runs
nothing.
"""

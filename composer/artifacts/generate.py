"""Load a built mixture directory and generate from it, with or without KV caches."""

from __future__ import annotations

import torch

from composer.features.data import format_prompt
from composer.model.mixture import Mixture


@torch.no_grad()
def generate_ids(
    mixture: Mixture,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    gates: list[torch.Tensor] | None = None,
    stop_at_eos: bool = True,
) -> list[int]:
    """Greedy decoding; stops at the anchor's end-of-sequence token.

    With `gates`, appends for each generated token the router's weights over the sources
    ((n_sources,), in `mixture.carry_on.sources` order) at the position that chose it.
    """
    eos = mixture.tokenizer.eos_token_id if stop_at_eos else None
    ids = list(prompt_ids)
    state = mixture.new_state() if use_cache else None
    pending = list(prompt_ids)
    for _ in range(max_new_tokens):
        if state is not None:
            logits, weights = mixture.step(torch.tensor([pending]), state)
        else:
            features = mixture.features(torch.tensor([ids]))
            hidden, weights, _ = mixture.hidden(features)
            logits = mixture.logits(hidden[:, -1])
        if gates is not None:
            gates.append(weights[0, -1])
        token = int(logits.argmax(dim=-1))
        ids.append(token)
        pending = [token]
        if token == eos:
            break
    return ids[len(prompt_ids) :]


def prompt_ids(mixture: Mixture, prompt: str, *, chat: bool = True) -> list[int]:
    """The anchor's ids for `prompt` (through its chat template when `chat`)."""
    tokenizer = mixture.tokenizer
    text = format_prompt(tokenizer, [{"role": "user", "content": prompt}]) if chat else prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(mixture: Mixture, prompt: str, max_new_tokens: int = 128, *, chat: bool = True) -> str:
    """Answer `prompt` and return the text."""
    new = generate_ids(mixture, prompt_ids(mixture, prompt, chat=chat), max_new_tokens)
    return mixture.tokenizer.decode(new, skip_special_tokens=True)


def generate_with_gates(
    mixture: Mixture, prompt: str, max_new_tokens: int = 128, *, chat: bool = True
) -> list[tuple[str, str, float]]:
    """(token text, dominant source, its router weight) for each generated token."""
    gates: list[torch.Tensor] = []
    new = generate_ids(mixture, prompt_ids(mixture, prompt, chat=chat), max_new_tokens, gates=gates)
    pieces = []
    for i, weights in enumerate(gates):
        # Decode growing prefixes so multi-byte characters come out whole.
        before = mixture.tokenizer.decode(new[:i], skip_special_tokens=True)
        after = mixture.tokenizer.decode(new[: i + 1], skip_special_tokens=True)
        k = int(weights.argmax())
        pieces.append((after[len(before) :], mixture.carry_on.sources[k], float(weights[k])))
    return pieces

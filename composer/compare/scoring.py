"""One evaluation item on one mixture: token losses, greedy answers, sandboxed code.

Every function returns a JSON-able dict. Loss results carry the summed negative log-likelihood
(nats), the number of target tokens and the target's UTF-8 bytes, so two mixtures with different
tokenizers can still be compared per byte. Pass/fail results carry `passed`. Where the mixture
reports its router's source weights, `gate` holds their mean over the scored positions.
torch and the data helpers are imported inside the functions: the suite registry (and with it
the CLI's help) must stay cheap to import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from composer.compare.sandbox import Limits, run_untrusted

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "```", "\nassert ")
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _gate(weights: Any, rows: Any = None) -> list[float] | None:
    """Mean router weight per source over the chosen positions of (1, T, n_sources)."""
    import torch

    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        return None
    picked = weights[0] if rows is None else weights[0][rows]
    if picked.numel() == 0:
        return None
    return [round(float(w), 6) for w in picked.float().mean(dim=0)]


def _loss(mixture: Any, input_ids: list[int], labels: list[int], n_bytes: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from composer.features.data import IGNORE

    with torch.no_grad():
        ids = torch.tensor([input_ids])
        features = mixture.features(ids)
        hidden, weights, _ = mixture.hidden(features)
        targets = torch.tensor(labels[1:])
        selected = targets != IGNORE
        logits = mixture.logits(hidden[0, :-1][selected])  # (N, vocab)
        nll = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
    gate = _gate(weights[:, :-1] if isinstance(weights, torch.Tensor) else None, selected)
    return {"nll": float(nll), "tokens": int(selected.sum()), "bytes": n_bytes, "gate": gate}


def _qa_loss(mixture: Any, messages: list[dict[str, str]], answer: str, seq_len: int) -> dict:
    from composer.features.data import encode_qa

    example = encode_qa(mixture.tokenizer, messages, answer, seq_len)
    if example is None:
        return {"skipped": f"the prompt leaves no room for the answer within {seq_len} tokens"}
    return _loss(mixture, example.input_ids, example.labels, len(answer.encode("utf-8")))


def run_chat_loss(mixture: Any, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    *context, last = item.data["messages"]
    return _qa_loss(mixture, context, last["content"], settings["seq_len"])


def run_math_loss(mixture: Any, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "user", "content": item.data["question"]}]
    return _qa_loss(mixture, messages, item.data["worked"], settings["seq_len"])


def run_code_loss(mixture: Any, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Loss on the reference solution given the prompt, as plain text (no chat template).

    Targets are the tokens that hold any solution character, found from the offsets: a
    tokenizer may merge the prompt's last newline with the solution's indentation.
    """
    from composer.features.data import IGNORE

    prompt, solution = item.data["prompt"], item.data["canonical_solution"]
    encoded = mixture.tokenizer(
        prompt + solution, add_special_tokens=False, return_offsets_mapping=True
    )
    ids = encoded["input_ids"][: settings["seq_len"]]
    offsets = encoded["offset_mapping"][: len(ids)]
    labels = [
        tok if end > len(prompt) else IGNORE for tok, (_, end) in zip(ids, offsets, strict=True)
    ]
    if labels[0] != IGNORE or all(label == IGNORE for label in labels):
        return {"skipped": "the solution does not fit after the prompt"}
    return _loss(mixture, ids, labels, len(solution.encode("utf-8")))


def greedy(
    mixture: Any, prompt_ids: list[int], max_new_tokens: int, stop: Callable[[str], bool] | None
) -> tuple[list[int], list[float] | None]:
    """Greedy tokens after the prompt (end-of-sequence excluded) and the mean router weights."""
    import torch

    tokenizer = mixture.tokenizer
    eos = tokenizer.eos_token_id
    state = mixture.new_state()
    pending, new, rows = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, weights = mixture.step(torch.tensor([pending]), state)
            if isinstance(weights, torch.Tensor) and weights.dim() == 3:
                rows.append(weights[:, -1:])  # the position that chose the next token
            token = int(logits.argmax(dim=-1))
            if token == eos:
                break
            new.append(token)
            pending = [token]
            if stop is not None and stop(tokenizer.decode(new, skip_special_tokens=True)):
                break
    return new, _gate(torch.cat(rows, dim=1)) if rows else None


def _chat_ids(mixture: Any, prompt: str) -> list[int]:
    from composer.features.data import format_prompt

    text = format_prompt(mixture.tokenizer, [{"role": "user", "content": prompt}])
    return mixture.tokenizer(text, add_special_tokens=False)["input_ids"]


def final_number(text: str) -> str | None:
    """The answer a worked solution ends on: after `####` if present, else the last number."""
    marked = re.search(rf"####\s*({_NUMBER})", text)
    found = marked.group(1) if marked else (re.findall(_NUMBER, text) or [None])[-1]
    return found.replace(",", "") if found else None


def same_number(predicted: str | None, expected: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(expected.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def run_gsm(mixture: Any, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    done = re.compile(rf"####\s*{_NUMBER}\s*\n")
    new, gate = greedy(
        mixture,
        _chat_ids(mixture, item.data["question"]),
        settings["max_new_tokens"],
        lambda text: done.search(text) is not None,
    )
    output = mixture.tokenizer.decode(new, skip_special_tokens=True)
    predicted = final_number(output)
    passed = same_number(predicted, item.data["answer"])
    return {"output": output, "predicted": predicted, "passed": passed, "gate": gate}


def truncate_completion(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    return (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    )


def run_humaneval(mixture: Any, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    prompt = item.data["prompt"]
    prompt_ids = mixture.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new, gate = greedy(
        mixture,
        prompt_ids,
        settings["max_new_tokens"],
        lambda text: any(s in text for s in HUMANEVAL_STOPS),
    )
    completion = truncate_completion(mixture.tokenizer.decode(new, skip_special_tokens=True))
    limits = Limits(timeout_s=settings["timeout_s"], memory_bytes=settings["memory_mb"] << 20)
    result = run_untrusted(humaneval_program(item.data, completion), limits)
    return {
        "completion": completion,
        "passed": result.passed,
        "status": result.status,
        "isolation": result.isolation,
        "gate": gate,
    }


def run_generation(mixture: Any, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    new, gate = greedy(
        mixture, _chat_ids(mixture, item.data["prompt"]), settings["max_new_tokens"], None
    )
    return {"output": mixture.tokenizer.decode(new, skip_special_tokens=True), "gate": gate}

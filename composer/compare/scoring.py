"""Evaluation items on one mixture: token losses, greedy answers, sandboxed code.

Every result is a JSON-able dict per item; greedy answers are generated as one batch. Loss
results carry the summed negative log-likelihood (nats), the number of target tokens and the
target's UTF-8 bytes, so two mixtures with different tokenizers can still be compared per byte.
Pass/fail results carry `passed`. Where the mixture reports its router's source weights, `gate`
holds their mean over the scored positions.
torch and the data helpers are imported inside the functions: the suite registry (and with it
the CLI's help) must stay cheap to import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from composer.compare.sandbox import Limits, run_untrusted
from composer.features.data import CODE_ANSWER_PREFIX, CODE_FENCE, code_task_prompt, listed_tests
from composer.model.protocol import Mixture

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "```", "\nassert ")
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
GSM_DONE = re.compile(rf"####\s*{_NUMBER}\s*\n")  # a worked answer has given its number
# (mixture, items, settings) -> (k, result of items[k]) for every item, each as it is ready
Results = Iterator[tuple[int, dict[str, Any]]]
BatchRunner = Callable[[Mixture, list[Any], dict[str, Any]], Results]


def _gate(weights: Any, rows: Any = None) -> list[float] | None:
    """Mean router weight per source over the chosen positions of (1, T, n_sources)."""
    import torch

    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        return None
    picked = weights[0] if rows is None else weights[0][rows]
    if picked.numel() == 0:
        return None
    return [round(float(w), 6) for w in picked.float().mean(dim=0)]


def _loss(
    mixture: Mixture, input_ids: list[int], labels: list[int], n_bytes: int
) -> dict[str, Any]:
    import torch

    from composer.features.data import IGNORE
    from composer.model.likelihood import nll

    # The loss is read through the mixture's head, blocked as training reads it.
    with torch.no_grad():
        ids = torch.tensor([input_ids])
        features = mixture.features(ids, anchor_final=False)
        hidden, weights, _ = mixture.hidden(features)
        targets = torch.tensor(labels[1:])
        total = nll(mixture.head, hidden[0, :-1], targets)
    selected = targets != IGNORE
    gate = _gate(weights[:, :-1] if isinstance(weights, torch.Tensor) else None, selected)
    return {"nll": float(total), "tokens": int(selected.sum()), "bytes": n_bytes, "gate": gate}


def _qa_loss(mixture: Mixture, messages: list[dict[str, str]], answer: str, seq_len: int) -> dict:
    from composer.features.data import encode_qa

    example = encode_qa(mixture.tokenizer, messages, answer, seq_len)
    if example is None:
        return {"skipped": f"the prompt leaves no room for the answer within {seq_len} tokens"}
    return _loss(mixture, example.input_ids, example.labels, len(answer.encode("utf-8")))


def run_chat_loss(mixture: Mixture, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    *context, last = item.data["messages"]
    return _qa_loss(mixture, context, last["content"], settings["seq_len"])


def run_math_loss(mixture: Mixture, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "user", "content": item.data["question"]}]
    return _qa_loss(mixture, messages, item.data["worked"], settings["seq_len"])


def run_code_loss(mixture: Mixture, item: Any, settings: dict[str, Any]) -> dict[str, Any]:
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


def each(run: Callable[[Any, Any, dict[str, Any]], dict[str, Any]]) -> BatchRunner:
    """A suite's runner over a batch of items from one that scores one item."""

    def run_each(mixture: Mixture, items: list[Any], settings: dict[str, Any]) -> Results:
        for k, item in enumerate(items):
            yield k, run(mixture, item, settings)

    return run_each


def generations(
    mixture: Mixture,
    prompts: list[str],
    max_new_tokens: int,
    *,
    chat: bool = True,
    samplings: list[Any] | None = None,
    **options: Any,
) -> list[Any]:
    """Each prompt's new `Generation` (a user message, or plain text when not `chat`; greedy,
    or with its own `Sampling` from `samplings`). `options` go to each `Generation` (stop
    strings, `until`, `gates`)."""
    from composer.generation.decode import Generation, prompt_ids

    return [
        Generation(
            mixture,
            prompt_ids(mixture, prompt, chat=chat),
            max_new_tokens,
            sampling=samplings[i] if samplings is not None else None,
            **options,
        )
        for i, prompt in enumerate(prompts)
    ]


def generate_each(
    mixture: Mixture, prompts: list[str], max_new_tokens: int, at_once: int, **options: Any
) -> Iterator[tuple[int, Any]]:
    """(index, `Generation`) of each prompt as it ends, decoded `at_once` at a time: the next
    prompt joins the batch as soon as a row leaves it (`decode_fed`)."""
    from collections import deque

    from composer.generation.decode import decode_fed

    made = generations(mixture, prompts, max_new_tokens, **options)
    index = {id(g): i for i, g in enumerate(made)}
    for ended in decode_fed(deque(made), at_once):
        for generation in ended:
            yield index[id(generation)], generation


def _generate(
    mixture: Mixture,
    prompts: list[str],
    settings: dict[str, Any],
    *,
    chat: bool = True,
    **stops: Any,
) -> Iterator[tuple[int, tuple[str, list[float] | None]]]:
    """(k, the greedy answer to prompts[k] and the mean router weights of the steps that chose
    it, the one that chose end-of-sequence too) as each answer ends: `settings["at_once"]`
    decoded together (all when unset), the next joining as one ends (`generate_each`)."""
    import torch

    at_once = settings.get("at_once") or max(1, len(prompts))
    ended = generate_each(
        mixture, prompts, settings["max_new_tokens"], at_once, chat=chat, gates=True, **stops
    )
    for k, g in ended:
        yield k, (g.text, _gate(torch.stack(g.gates)[None]) if g.gates else None)


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


def run_gsm(mixture: Mixture, items: list[Any], settings: dict[str, Any]) -> Results:
    questions = [item.data["question"] for item in items]
    for k, (output, gate) in _generate(mixture, questions, settings, until=GSM_DONE):
        predicted = final_number(output)
        passed = same_number(predicted, items[k].data["answer"])
        yield k, {"output": output, "predicted": predicted, "passed": passed, "gate": gate}


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    return (
        f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    )


def run_humaneval(mixture: Mixture, items: list[Any], settings: dict[str, Any]) -> Results:
    prompts = [item.data["prompt"] for item in items]
    # The decoder cuts each completion before the first of the stop strings.
    answers = _generate(mixture, prompts, settings, chat=False, stop=HUMANEVAL_STOPS)
    return _run_programs(items, answers, humaneval_program, settings)


# HumanEval as an instruct model is asked (`humaneval-chat`): the function in a user message,
# and the assistant's turn opened with a ```python fence and the function's own header and
# docstring, so the answer continues its body (a chat model given the raw header often writes
# a `pass` stub instead: docs/quality.md) and the closing fence ends it.
HUMANEVAL_ASK = "Complete the following Python function.\n\n```python\n{prompt}```"


def humaneval_chat_prompt(tokenizer: Any, problem: dict[str, Any]) -> str:
    from composer.generation.templates import format_prompt

    ask = HUMANEVAL_ASK.format(prompt=problem["prompt"])
    return (
        format_prompt(tokenizer, [{"role": "user", "content": ask}])
        + CODE_ANSWER_PREFIX
        + problem["prompt"]
    )


def run_humaneval_chat(mixture: Mixture, items: list[Any], settings: dict[str, Any]) -> Results:
    prompts = [humaneval_chat_prompt(mixture.tokenizer, item.data) for item in items]
    answers = _generate(mixture, prompts, settings, chat=False, stop=(CODE_FENCE,))
    return _run_programs(items, answers, humaneval_program, settings)


def _run_programs(
    items: list[Any],
    answers: Iterator[tuple[int, tuple[str, list[float] | None]]],
    program: Callable[[dict[str, Any], str], str],
    settings: dict[str, Any],
) -> Results:
    """Each item's program (made from its completion) run in the sandbox as its completion
    ends: passed or not."""
    limits = Limits(timeout_s=settings["timeout_s"], memory_bytes=settings["memory_mb"] << 20)
    # --unsafe-no-jail, added by the runner: not one of the suite's settings nor of its cache key
    unsafe = settings.get("unsafe_no_jail", False)
    for k, (completion, gate) in answers:
        result = run_untrusted(program(items[k].data, completion), limits, unsafe_no_jail=unsafe)
        yield (
            k,
            {
                "completion": completion,
                "passed": result.passed,
                "status": result.status,
                "isolation": result.isolation,
                "gate": gate,
            },
        )


def run_generation(mixture: Mixture, items: list[Any], settings: dict[str, Any]) -> Results:
    for k, (output, gate) in _generate(mixture, [item.data["prompt"] for item in items], settings):
        yield k, {"output": output, "gate": gate}


def mbpp_prompt(problem: dict[str, Any]) -> str:
    """The standard MBPP prompt, as a recipe's code task asks it in training."""
    return code_task_prompt(problem["text"], problem["test_list"])


def code_task_program(code: str, tests: Any, setup: str = "") -> str:
    """The answer's code, the task's setup code, then its asserts (a list, or one string)."""
    return f"{code}\n\n{setup}\n\n{listed_tests(tests)}\n"


def mbpp_program(problem: dict[str, Any], code: str) -> str:
    return code_task_program(code, problem["test_list"], problem.get("test_setup_code") or "")


def code_task_prompts(
    mixture: Mixture, questions: list[str], prefix: str = CODE_ANSWER_PREFIX
) -> list[str]:
    """Each code task's prompt as the model continues it: the question as one user message
    through the chat template, then the assistant's turn opened with `prefix` (a ```python
    fence), so the answer is code and the closing fence (`CODE_FENCE`, its stop) ends it."""
    from composer.generation.templates import format_prompt

    return [
        format_prompt(mixture.tokenizer, [{"role": "user", "content": q}]) + prefix
        for q in questions
    ]


def run_mbpp(mixture: Mixture, items: list[Any], settings: dict[str, Any]) -> Results:
    """Greedy code for each task, run with the task's asserts in the sandbox (as HumanEval).

    The assistant's turn starts with `settings["answer_prefix"]` (a ```python fence), so the
    answer is code, and the closing fence ends it: the code is what lies between the fences."""
    questions = [mbpp_prompt(item.data) for item in items]
    prompts = code_task_prompts(mixture, questions, settings["answer_prefix"])
    answers = _generate(mixture, prompts, settings, chat=False, stop=(CODE_FENCE,))
    return _run_programs(items, answers, mbpp_program, settings)

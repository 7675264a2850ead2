"""Training data: token ids with labels (-100 where no loss), from local files or packages.

Chat and question/answer data go through the anchor's chat template (when it has one) and carry
loss on the answer only; plain text carries loss everywhere and is cut into `seq_len` windows.
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.errors import DataError
from composer.files import read_text_file
from composer.generation.templates import format_prompt, render_chat
from composer.recipe import (
    ChatterbotData,
    DataSpec,
    GsmData,
    HfData,
    JsonlData,
    MixData,
    PythonDocsData,
    Recipe,
    StdlibData,
    TextData,
)

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; the loss predicts labels[t + 1] at position t
    domain: str = ""  # the data source's domain, for per-domain metrics


def encode_qa(
    tokenizer: Any, messages: list[dict[str, str]], answer: str, seq_len: int
) -> Example | None:
    """Prompt tokens without loss, answer tokens (and end of turn) with loss; None if no room."""
    prompt = format_prompt(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        answered = [*messages, {"role": "assistant", "content": answer}]
        full = render_chat(tokenizer, answered, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError("the anchor's chat template does not extend the prompt with the answer")
    else:
        full = prompt + answer + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt_ids)
    if ids[:n_prompt] != prompt_ids:
        # The prompt's last token merged with the answer's first (the plain "Assistant: "
        # prompt's trailing space, for a base without a chat template): the answer is encoded
        # after the prompt's own tokens, which is what generation continues from.
        ids = prompt_ids + tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = ids[:seq_len]
    if len(ids) <= n_prompt:
        return None
    return Example(input_ids=ids, labels=[IGNORE] * n_prompt + ids[n_prompt:])


def text_windows(
    tokenizer: Any, texts: list[str], seq_len: int, limit: int | None
) -> list[Example]:
    """Each text tokenized and cut into windows of `seq_len` tokens, loss on every token."""
    out: list[Example] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len]
            if len(window) >= 2:
                out.append(Example(input_ids=window, labels=list(window)))
            if limit is not None and len(out) >= limit:
                return out
    return out


def load_gsm(spec: GsmData, tokenizer: Any, seq_len: int) -> list[Example]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=spec.size, seed=spec.seed)
    out = []
    for item in dataset:
        messages = [{"role": "user", "content": item["question"]}]
        example = encode_qa(tokenizer, messages, item["metadata"]["answer_cot"], seq_len)
        if example is not None:
            out.append(example)
    return out


def load_stdlib(spec: StdlibData, tokenizer: Any, seq_len: int) -> list[Example]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if spec.part == "tests":
        files = sorted((root / "test").rglob("*.py"))
    else:
        files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts)
    random.Random(spec.seed).shuffle(files)
    out: list[Example] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out += text_windows(tokenizer, [text], seq_len, spec.size - len(out))
        if len(out) >= spec.size:
            break
    return out


def chatterbot_dialogs() -> list[tuple[str, list[str]]]:
    """(topic, turns) of every English chatterbot dialog, in file order."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    found = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            if isinstance(turns, list):
                found.append((path.stem, [str(t) for t in turns]))
    return found


def chatterbot_pairs(spec: ChatterbotData) -> list[tuple[str, str]]:
    """The (question, answer) pairs `kind: chatterbot` trains on: the first exchange of each
    dialog, shuffled by the data seed, the first `size`. The held-out chat suite leaves out
    exactly these (compare.suites), so both read them here."""
    # The corpus repeats many exchanges across topics (2,025 first exchanges, 897 distinct):
    # each once, so a draw holds no copies and its held-out part none of its training part.
    pairs = list(
        dict.fromkeys((turns[0], turns[1]) for _, turns in chatterbot_dialogs() if len(turns) >= 2)
    )
    random.Random(spec.seed).shuffle(pairs)
    return pairs[: spec.size]


def load_chatterbot(spec: ChatterbotData, tokenizer: Any, seq_len: int) -> list[Example]:
    out = []
    for question, answer in chatterbot_pairs(spec):
        messages = [{"role": "user", "content": question}]
        example = encode_qa(tokenizer, messages, answer, seq_len)
        if example is not None:
            out.append(example)
    return out


def load_python_docs(spec: PythonDocsData, tokenizer: Any, seq_len: int) -> list[Example]:
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    random.Random(spec.seed).shuffle(docs)
    return text_windows(tokenizer, docs, seq_len, spec.size)


MAX_DATA_BYTES = 512 * 2**20  # read whole: split a larger corpus into several files


def _read(path: str) -> str:
    try:
        return read_text_file(Path(path), MAX_DATA_BYTES)
    except OSError as exc:
        raise DataError(f"train.data.path: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # not a regular file, too big, not UTF-8
        raise DataError(f"train.data.path: cannot read {path}: {exc}") from exc


def load_text(spec: TextData, tokenizer: Any, seq_len: int) -> list[Example]:
    docs = [d.strip() for d in _read(spec.path).split("\n\n") if d.strip()]
    return text_windows(tokenizer, docs, seq_len, None)


def load_jsonl(spec: JsonlData, tokenizer: Any, seq_len: int) -> list[Example]:
    out: list[Example] = []
    for n, line in enumerate(_read(spec.path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{spec.path}:{n}: not JSON: {exc.msg}") from exc
        example: Example | None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            out += text_windows(tokenizer, [row["text"]], seq_len, None)
            continue
        if isinstance(row, dict) and "prompt" in row and "answer" in row:
            messages = [{"role": "user", "content": str(row["prompt"])}]
            example = encode_qa(tokenizer, messages, str(row["answer"]), seq_len)
        elif isinstance(row, dict) and _is_chat(row.get("messages")):
            example = encode_chat(tokenizer, row["messages"], seq_len, f"{spec.path}:{n}")
        else:
            raise DataError(
                f"{spec.path}:{n}: expected an object with 'text', 'prompt'+'answer' or 'messages'"
            )
        if example is not None:
            out.append(example)
    return out


def _is_chat(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) >= 2
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
    )


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    seq_len: int,
    where: str,
    answer: Callable[[str], str] = str,
) -> Example | None:
    """A chat with the loss on its last message (the assistant's), `answer` applied to it."""
    *context, last = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if last["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's")
    return encode_qa(tokenizer, context, answer(last["content"]), seq_len)


# GSM8K's calculator annotations: `<<48/2=24>>` before the result the solution writes itself.
# No whitespace inside (none of GSM8K's has any), so `1 << n == m >> 1` in code is left alone.
CALCULATOR = re.compile(r"<<[^<>=\s]+=[^<>=\s]+>>")


def strip_calculator(text: str) -> str:
    """`48/2 = <<48/2=24>>24 clips` -> `48/2 = 24 clips`."""
    return CALCULATOR.sub("", text)


# A code task as MBPP asks it (Austin et al. 2021, section 2.1), one user message; the answer is
# the code in a fenced block, so a model trained on it answers as `compose compare` reads MBPP.
CODE_TASK_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}"
)
CODE_ANSWER_PREFIX, CODE_FENCE = "```python\n", "```"


def listed_tests(tests: Any) -> str:
    """A code task's tests (a list of asserts, or one string) as lines of code."""
    return tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)


def code_task_prompt(text: str, tests: Any) -> str:
    """The question of a code task: its text and its tests (a list of asserts, or one string)."""
    return CODE_TASK_PROMPT.format(text=text, tests=listed_tests(tests))


def code_answer(code: str) -> str:
    """The code as the fenced block a code task's answer is: `\\r\\n` made `\\n`."""
    body = code.replace("\r\n", "\n").strip("\n")
    return f"{CODE_ANSWER_PREFIX}{body}\n{CODE_FENCE}"


@dataclass(frozen=True)
class HfRows:
    """The rows an `hf` spec draws, in its order: `where` names them in errors, `columns` maps
    each role of `fields` to its column, `rows` pairs each row's index in the split with it."""

    where: str
    columns: dict[str, str]
    rows: list[tuple[int, dict[str, Any]]]


def hf_rows(spec: HfData) -> HfRows:
    """Rows of a Hugging Face dataset (hub id or local copy), `size` of them drawn by `seed`."""
    from composer.features.hf_datasets import check_columns, open_split

    where = f"{spec.dataset} {spec.split}"
    rows = open_split(
        spec.dataset, spec.config, spec.split, hint="; give a local file or folder as `dataset`"
    )
    columns = {role: c for role, c in spec.fields.columns().items() if c is not None}
    check_columns(rows, columns, where)
    order = list(range(len(rows)))
    if spec.size is not None:
        if spec.size > len(order):
            raise DataError(f"{where}: size {spec.size} is more than its {len(order)} rows")
        random.Random(spec.seed).shuffle(order)
        order = order[: spec.size]
    picked = rows.select_columns(list(dict.fromkeys(columns.values()))).select(order)
    return HfRows(where, columns, list(zip(order, picked, strict=True)))


def load_hf(spec: HfData, tokenizer: Any, seq_len: int) -> list[Example]:
    """Rows of a Hugging Face dataset (hub id or local copy), by the roles in `fields`."""
    drawn = hf_rows(spec)
    where, columns = drawn.where, drawn.columns
    target = strip_calculator if spec.calculator == "strip" else str
    out: list[Example] = []
    for index, row in drawn.rows:
        example: Example | None
        if "text" in columns:
            out += text_windows(tokenizer, [target(str(row[columns["text"]]))], seq_len, None)
            continue
        if "messages" in columns:
            messages = row[columns["messages"]]
            if not _is_chat(messages):
                raise DataError(
                    f"{where}: row {index}: fields.messages: column '{columns['messages']}' is "
                    "not a chat (a list of at least two {role, content})"
                )
            example = encode_chat(tokenizer, messages, seq_len, f"{where}: row {index}", target)
        elif "tests" in columns:
            asked = code_task_prompt(str(row[columns["question"]]), row[columns["tests"]])
            answer = code_answer(str(row[columns["answer"]]))  # code: no calculator to strip
            example = encode_qa(tokenizer, [{"role": "user", "content": asked}], answer, seq_len)
        else:
            question = [{"role": "user", "content": str(row[columns["question"]])}]
            example = encode_qa(tokenizer, question, target(str(row[columns["answer"]])), seq_len)
        if example is not None:
            out.append(example)
    return out


DATA_SOURCES: dict[str, Callable[[Any, Any, int], list[Example]]] = {
    "gsm_symbolic": load_gsm,
    "python_stdlib": load_stdlib,
    "text": load_text,
    "jsonl": load_jsonl,
    "chatterbot": load_chatterbot,
    "python_docs": load_python_docs,
    "hf": load_hf,
}


def load_examples(
    spec: DataSpec, tokenizer: Any, seq_len: int, where: str = "train.data"
) -> list[Example]:
    """Every example of `spec`, labelled with its domain (the part's, or the source kind);
    `where` is the recipe field `spec` came from, named by the errors."""
    parts = spec.parts if isinstance(spec, MixData) else None
    if parts is None:
        examples = DATA_SOURCES[spec.kind](spec, tokenizer, seq_len)
        for e in examples:
            e.domain = spec.kind
    else:
        examples = []
        for i, part in enumerate(parts):
            loaded = DATA_SOURCES[part.data.kind](part.data, tokenizer, seq_len)
            if not loaded:
                raise DataError(f"{where}.parts.{i}: no examples from {part.data.kind}")
            for e in loaded:
                e.domain = part.domain
            examples += loaded
    if not examples:
        raise DataError(
            f"{where}: no examples from {spec.kind} after tokenizing and filtering "
            f"(is train.seq_len={seq_len} shorter than the prompts?)"
        )
    return examples


def split(
    examples: list[Example], eval_fraction: float, seed: int, where: str = "train.data"
) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split per domain; both sides non-empty in every domain. Copies of
    one text fall on one side: a held-out text is never also a training text (held once)."""
    train: list[Example] = []
    held: list[Example] = []
    for domain in dict.fromkeys(e.domain for e in examples):
        copies: dict[tuple[int, ...], list[Example]] = {}
        for e in examples:
            if e.domain == domain:
                copies.setdefault(tuple(e.input_ids), []).append(e)
        if len(copies) < 2:
            raise DataError(
                f"{where}: {len(copies)} distinct example(s) of '{domain}' cannot be split "
                "into train and eval"
            )
        texts = list(copies.values())
        random.Random(seed).shuffle(texts)
        n_eval = min(len(texts) - 1, max(1, round(eval_fraction * len(texts))))
        held += [group[0] for group in texts[:n_eval]]
        train += [e for group in texts[n_eval:] for e in group]
    random.Random(seed + 1).shuffle(train)
    return train, held


def pad_id(tokenizer: Any) -> int:
    """The id that fills right padding (masked out everywhere): pad, else end-of-sequence."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_splits(recipe: Recipe, tokenizer: Any) -> dict[str, list[Example]]:
    """Every split a build uses: `train` and `eval` of the task data and, with preservation,
    `preserve` (general text trained to keep the anchor) and `general` (its held-out part,
    where off-domain harm is measured).

    Held-out means unseen: no eval text is also a training text (split), and general text
    equal to any task example is left out of both general splits."""
    spec = recipe.train
    examples = load_examples(spec.data, tokenizer, spec.seq_len)
    splits = dict(
        zip(("train", "eval"), split(examples, spec.eval_fraction, spec.seed), strict=True)
    )
    if spec.preserve is not None:
        task = {tuple(e.input_ids) for e in examples}
        # Repeated texts (a reply shared by two dialogs) once; none that is also a task text.
        unique = {
            tuple(e.input_ids): e
            for e in load_examples(
                spec.preserve.data, tokenizer, spec.seq_len, "train.preserve.data"
            )
        }
        general = [e for ids, e in unique.items() if ids not in task]
        for example in general:
            example.domain = f"general/{example.domain}"
        kept, held = split(general, spec.preserve.eval_fraction, spec.seed, "train.preserve.data")
        splits["preserve"], splits["general"] = kept, held
    return splits

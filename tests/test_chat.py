"""`compose chat`: driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from composer.artifacts.load import load_mixture
from composer.generation.decode import chat_ids, context_length
from composer.generation.sampling import Sampling
from composer.serving.chat import ChatSession

# ~150 tiny-tokenizer tokens; no trailing space, which the terminal's line would lose
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)


def _visible(text: str) -> str:
    """What survives any terminal rendering: the printable characters but spaces."""
    return "".join(c for c in text if c.isprintable() and not c.isspace())


def _expected_answers(
    mixture, messages: list[str], sampling: Sampling, n: int
) -> tuple[list[str], list[int]]:
    """The answers a ChatSession gives to `messages`, one after another, and how many old
    turns each dropped."""
    session = ChatSession(mixture, sampling, n)
    answers, drops = [], []
    for message in messages:
        session.history.append({"role": "user", "content": message})
        ids, dropped = session.fit()
        answers.append("".join(text for text, _ in session.answer(ids)))
        drops.append(dropped)
    return answers, drops


@pytest.fixture(scope="module")
def mixture(tiny_mixture_dir):
    return load_mixture(tiny_mixture_dir)


def test_history_is_cut_from_the_oldest_turns(mixture):
    session = ChatSession(mixture, Sampling(), max_new_tokens=40)
    for turn in range(3):
        session.history += [
            {"role": "user", "content": f"{turn} {LONG}"},
            {"role": "assistant", "content": f"answer {turn}"},
        ]
    session.history.append({"role": "user", "content": "and now?"})
    whole = list(session.history)
    ids, dropped = session.fit()
    assert dropped >= 1
    assert session.history == whole[2 * dropped :]  # the oldest turns went first
    assert ids == chat_ids(mixture, session.history)
    assert len(ids) + 40 <= context_length(mixture)
    one_more = chat_ids(mixture, whole[2 * dropped - 2 :])
    assert len(one_more) + 40 > context_length(mixture)  # no more was dropped than needed
    session.history = [{"role": "user", "content": LONG * 4}]
    with pytest.raises(ValueError, match="does not fit the context"):
        session.fit()
    assert session.history == []


def test_chat_in_a_terminal(tiny_mixture_dir, mixture):
    sampling = Sampling(temperature=0.9, seed=11)
    messages = ["How many days does he work?", LONG, LONG, LONG, "So?"]
    answers, drops = _expected_answers(mixture, messages, sampling, 10)
    assert any(drops)
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    command = ["-m", "composer", "chat", str(tiny_mixture_dir), "--max-new-tokens", "10"]
    command += ["--temperature", "0.9", "--seed", "11"]
    child = pexpect.spawn(sys.executable, command, env=env, encoding="utf-8", timeout=60)
    try:
        child.expect("you> ")
        assert "/help" in child.before
        screens = []
        for message in messages:
            child.sendline(message)
            child.expect("you> ")
            screens.append(child.before)
        for message, answer, screen in zip(messages, answers, screens, strict=True):
            assert _visible(answer) in _visible(screen.split("mixture>", 1)[1]), (message, screen)
        for dropped, screen in zip(drops, screens, strict=True):
            told = f"dropped the {dropped} oldest turn(s) to fit the 512-token context"
            assert (told in screen) == (dropped > 0), screen

        child.sendline("/set top_p 7")
        child.expect("you> ")
        assert "top_p: Input should be less than or equal to 1" in child.before
        child.sendline("/set temperature 0")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("you> ")
        assert "history cleared" in child.before
        child.sendline("/gates")
        child.expect("you> ")
        assert "source colouring on" in child.before and "■ a@1" in child.before
        child.sendline(messages[0])
        child.expect("you> ")
        greedy = _expected_answers(mixture, messages[:1], Sampling(), 10)[0][0]
        assert _visible(greedy) in _visible(child.before.split("mixture>", 1)[1])
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_a_bad_setting_is_a_message_and_the_conversation_goes_on(tiny_mixture_dir, mixture):
    """A /set line the chat cannot read, or a value the decoder cannot honour, is answered
    with a message; the settings and the conversation stay as they were."""
    messages = ["How many days does he work?", "So?"]
    answers, _ = _expected_answers(mixture, messages, Sampling(), 10)
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    command = ["-m", "composer", "chat", str(tiny_mixture_dir), "--max-new-tokens", "10"]
    child = pexpect.spawn(sys.executable, command, env=env, encoding="utf-8", timeout=60)
    most = context_length(mixture) - 1
    refusals = {
        '/set top_p "0.5': "could not read the command (No closing quotation)",
        "/set seed 99999999999999999999999": "seed: Input should be less than 18446744073709551616",
        "/set temperature 1e-40": "temperature: Value error, 0 (greedy) or at least 1e-05",
        "/set repetition_penalty 1e-40": "repetition_penalty: Input should be greater than or "
        "equal to 0.01",
        "/set top_p nan": "top_p: Input should be a finite number",
        "/set max_new_tokens \u00b2": f"at least 1 and at most {most} (the context)",
        "/set max_new_tokens 100000": f"at least 1 and at most {most} (the context)",
    }
    try:
        child.expect("you> ")
        child.sendline(messages[0])
        child.expect("you> ")
        first = child.before
        for line, told in refusals.items():
            child.sendline(line)
            child.expect("you> ")
            assert _visible(told) in _visible(child.before), (line, child.before)
        child.sendline("/settings")
        child.expect("you> ")
        assert _visible("temperature = 0.0") in _visible(child.before)
        assert _visible("seed = None") in _visible(child.before)
        assert _visible("max_new_tokens = 10") in _visible(child.before)
        child.sendline(messages[1])
        child.expect("you> ")
        second = child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    for answer, screen in zip(answers, [first, second], strict=True):
        assert _visible(answer) in _visible(screen.split("mixture>", 1)[1]), screen


def test_piped_stream_is_written_exactly():
    import io

    from rich.console import Console

    from composer.serving.terminal import print_stream

    pieces = [("\x08a", "a@1"), ("\x07é", None), ("\x1b[2J!", "a@1")]
    piped = io.StringIO()
    whole = print_stream(Console(file=piped), pieces, ["a@1"])
    assert whole == "\x08a\x07é\x1b[2J!"
    assert piped.getvalue() == whole + "\n"  # control characters kept when redirected
    screen = io.StringIO()
    print_stream(Console(file=screen, force_terminal=True, no_color=True), pieces, ["a@1"])
    assert "\x07" not in screen.getvalue() and "\x08" not in screen.getvalue()


def test_chat_with_a_base_alone(tiny):
    """A model folder as `compose chat` takes it (as `compose compare` takes a side): it
    answers as compose's own generation from that base alone does (which test_cli holds equal
    to transformers' decoding of the folder)."""
    import io

    from rich.console import Console

    from composer.compare.runner import open_model
    from composer.generation.decode import generate
    from composer.serving.chat import run_chat

    sampling = Sampling(temperature=0.9, seed=11)
    lines = iter(["How many days does he work?"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    screen = io.StringIO()
    console = Console(file=screen, width=400, color_system=None)
    run_chat(tiny["llama"], sampling=sampling, max_new_tokens=12, console=console, read=read)
    alone = open_model(str(tiny["llama"]))
    assert alone.recipe.name == "llama-alone" and not alone.carry_on.training
    answer = generate(alone, "How many days does he work?", 12, sampling=sampling)
    assert "chatting with llama-alone" in screen.getvalue()
    assert _visible(answer) and _visible(answer) in _visible(screen.getvalue())

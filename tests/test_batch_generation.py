"""Generations run together as one left-padded batch end as each would alone."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import EXPERT_CARRY_ON, make_base, recipe_yaml

from composer.generation.decode import Generation, run_together
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe

PROMPTS = [
    "If he gets paid 195 every day",
    "def add(a, b):",
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "Hi",
]


@pytest.fixture(scope="module")
def sliding(tiny, tmp_path_factory):
    """Qwen2 bases whose upper layers attend through a sliding window: one with the tiny
    anchor's tokenizer and a window shorter than a generation (its cache drops columns while
    rows join and leave), one with another tokenizer (aligned: its texts stay in the window)."""
    root = tmp_path_factory.mktemp("sliding")
    window = dict(use_sliding_window=True, max_window_layers=2)
    tok = tiny["llama"]  # the tokenizer files are saved beside each tiny base
    return {
        "expert": make_base(root / "lane", "qwen2", tok, 64, 4, sliding_window=6, **window),
        "aligned": make_base(
            root / "aligned", "qwen2", tiny["other"], 32, 3, sliding_window=56, **window
        ),
    }


def _mixture(tiny, write_recipe, kind: str, sliding=None) -> LiveMixture:
    """A mixture whose carry-on changes the logits: over a same-tokenizer tap and an expert, or
    over a base aligned across tokenizers; with `sliding` (the fixture), that base's upper
    layers attend through a sliding window."""
    other = (sliding or {}).get(kind)
    if kind == "expert":
        bases = {"a": tiny["llama"], "b": other or tiny["qwen2"]}
        path = write_recipe(recipe_yaml(bases, "a", ["a@1", "b@4"], carry_on=EXPERT_CARRY_ON))
    else:
        bases = {"a": tiny["llama"], "o": other or tiny["other"]}
        path = write_recipe(recipe_yaml(bases, "a", ["o@3" if other else "o@1"]))
    mixture = LiveMixture.from_recipe(load_recipe(path), seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return mixture


def _new(mixture: LiveMixture, prompt: str, max_new: int, **stops) -> Generation:
    ids = mixture.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return Generation(mixture, ids, max_new, gates=True, stop_at_eos=False, **stops)


@pytest.mark.parametrize("kind", ["expert", "aligned"])
def test_a_batch_generates_what_each_row_generates_alone(tiny, write_recipe, kind):
    mixture = _mixture(tiny, write_recipe, kind)
    lengths = [12, 5, 9, 0]  # rows end at different steps; one never starts
    batch = [_new(mixture, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    run_together(batch)
    for prompt, n, together in zip(PROMPTS, lengths, batch, strict=True):
        alone = _new(mixture, prompt, n).run()
        assert together.ids == alone.ids
        assert len(together.ids) == n
        assert together.text == alone.text
        assert together.finish_reason == alone.finish_reason == "length"
        assert len(together.gates) == len(alone.gates) == n
        for mine, theirs in zip(together.gates, alone.gates, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert len({tuple(g.ids) for g in batch if g.ids}) > 1  # the rows did generate differently


def test_rows_stop_on_their_own_stop_strings(tiny, write_recipe):
    mixture = _mixture(tiny, write_recipe, "expert")
    free = _new(mixture, PROMPTS[0], 16).run()
    cut = free.text[len(free.text) // 2 :][:2]
    assert cut.strip(), "the tiny base should write some text to cut at"
    until = re.compile(re.escape(cut))
    batch = [_new(mixture, PROMPTS[0], 16, until=until), _new(mixture, PROMPTS[1], 16)]
    run_together(batch)
    assert batch[0].finish_reason == "stop"
    assert batch[0].text == _new(mixture, PROMPTS[0], 16, until=until).run().text
    assert batch[1].finish_reason == "length"
    assert batch[1].ids == _new(mixture, PROMPTS[1], 16).run().ids
    assert len(batch[0].ids) < len(batch[1].ids)


def test_generations_already_run_are_refused(tiny, write_recipe):
    mixture = _mixture(tiny, write_recipe, "expert")
    done = _new(mixture, PROMPTS[0], 2).run()
    with pytest.raises(ValueError, match="new, cached generations"):
        run_together([done])


@pytest.mark.parametrize(
    "kind", ["expert", "aligned", "aligned, compacted", "expert, sliding", "aligned, sliding"]
)
def test_at_once_keeps_the_batch_full_and_each_row_as_alone(
    tiny, sliding, write_recipe, kind, monkeypatch
):
    """With `at_once`, the next generation joins as one leaves: never more than that many in
    the batch, each row's tokens as alone, and the batch full while any wait. An aligned base's
    streams join and leave with the rows (and, compacted at every step where any row has
    padding or a hole, read the same). A base with sliding-window layers batches too: a window
    shorter than the rows (its cache drops columns as rows join and leave), or an aligned base
    whose texts stay inside its window."""
    from composer.generation.decode import decode_together
    from composer.model import align

    compactions = []
    compact = align.StreamBatch.compact

    def counted(self, base):
        compactions.append(1)
        compact(self, base)

    monkeypatch.setattr(align.StreamBatch, "compact", counted)
    if kind.endswith("compacted"):
        monkeypatch.setattr(align, "COMPACT_RATIO", 1)
        monkeypatch.setattr(align, "COMPACT_SLACK", 0)
    mixture = _mixture(
        tiny, write_recipe, kind.split(",")[0], sliding if kind.endswith("sliding") else None
    )
    lengths = [3, 11, 0, 6, 9, 2, 7]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    batch = [_new(mixture, p, n) for p, n in zip(prompts, lengths, strict=True)]
    running = [  # rows started and not ended, after each step
        sum(1 for g in batch if g.ids and g.finish_reason is None)
        for _ in decode_together(batch, at_once=2)
    ]
    assert max(running) == 2
    for prompt, n, together in zip(prompts, lengths, batch, strict=True):
        alone = _new(mixture, prompt, n).run()
        assert together.ids == alone.ids and together.finish_reason == alone.finish_reason
    # 2 at a time: the rows' 38 tokens take about 38 / 2 steps, where fixed batches of 2 wait
    # for each pair's longer row (11 + 6 + 9 + 7 = 33 steps).
    assert len(running) <= 23
    assert bool(compactions) == kind.endswith("compacted")  # rows this short need none
    with pytest.raises(ValueError, match="at_once must be at least 1"):
        list(decode_together([_new(mixture, PROMPTS[0], 2)], at_once=0))


def test_what_is_fed_while_decoding_joins_the_running_batch(tiny, write_recipe):
    """`decode_fed`: generations appended to `pending` while the caller reads what ended (an
    answer asked again) join the batch that is running, are decoded as alone, and decoding
    ends only once nothing runs or waits."""
    from collections import deque

    from composer.generation.decode import decode_fed

    mixture = _mixture(tiny, write_recipe, "expert")
    short, long = _new(mixture, PROMPTS[0], 2), _new(mixture, PROMPTS[1], 10)
    fed = _new(mixture, PROMPTS[2], 5)
    empty = _new(mixture, PROMPTS[3], 0)  # ends before any step: reported all the same
    pending = deque([short, long])
    order, running = [], []
    for ended in decode_fed(pending, at_once=2):
        order += ended
        if short in ended:
            pending += [fed, empty]
        running.append(sum(1 for g in (short, long, fed) if g.ids and g.finish_reason is None))
    # `empty` waits for a free row (two run), then ends as it joins.
    assert order == [short, fed, empty, long]
    assert max(running) == 2
    # `fed` ran beside `long`: about long's 10 steps in all, not 2 + 5 + the rest of long's.
    assert len(running) <= 11
    for given, prompt, n in ((short, 0, 2), (long, 1, 10), (fed, 2, 5), (empty, 3, 0)):
        alone = _new(mixture, PROMPTS[prompt], n).run()
        assert given.ids == alone.ids and given.finish_reason == alone.finish_reason
    with pytest.raises(ValueError, match="at_once must be at least 1"):
        next(decode_fed(deque([_new(mixture, PROMPTS[0], 2)]), at_once=0))

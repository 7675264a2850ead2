"""Bases with different tokenizers: alignment, causality, cached generation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_base, recipe_yaml
from transformers import AutoModelForCausalLM

from composer.generation.decode import generate_ids
from composer.model.align import (
    BaseStream,
    StreamBatch,
    align,
    aligned_states,
    anchor_texts,
    tokenize,
)
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe


@pytest.fixture(scope="module")
def hand_wordpiece(tmp_path_factory):
    """A word-piece tokenizer with a vocabulary small enough to tokenize by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "he": 1, "hel": 2, "##lo": 3, "wor": 4, "world": 5, "!": 6}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_alignment_of_a_hand_checked_string(hand_wordpiece):
    # Anchor tokens "he" "llo" " wor" "ld" "!" end at these prefixes of "hello world!".
    texts = ["he", "hello", "hello wor", "hello world", "hello world!"]
    assert tokenize(hand_wordpiece, texts) == [[1], [2, 3], [2, 3, 4], [2, 3, 5], [2, 3, 5, 6]]
    alignment = align(tokenize(hand_wordpiece, texts))
    assert alignment.full == [2, 3, 5, 6]
    # "hello" is a prefix of the full tokenization: position 1 reads token 1 (##lo) directly.
    # "he" and "hello wor" are split differently once more text follows: they run their own
    # tails ([he] from scratch, [wor] after the shared "hel ##lo").
    assert alignment.index == [-1, 1, -1, 2, 3]
    assert alignment.tails == {0: (0, [1]), 2: (2, [4])}


def test_anchor_texts_drop_partial_characters(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    ids = tokenizer("añb", add_special_tokens=False)["input_ids"]
    texts = anchor_texts(tokenizer, ids)
    assert texts[-1] == "añb"
    assert all("\ufffd" not in t for t in texts)
    assert all(texts[-1].startswith(t) for t in texts)


def _cross_mixture(tiny, write_recipe, perturb: bool = True) -> LiveMixture:
    bases = {"a": tiny["llama"], "w": tiny["wordpiece"], "o": tiny["other"]}
    path = write_recipe(recipe_yaml(bases, "a", ["a@2", "w@1", "w@2", "o@1"]))
    mixture = LiveMixture.from_recipe(load_recipe(path), seed=3)
    assert mixture.aligned == {"w", "o"}
    if perturb:  # a carry-on that reads the aligned bases strongly
        with torch.no_grad():
            for p in mixture.carry_on.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return mixture


def test_untrained_cross_tokenizer_mixture_equals_anchor(tiny, write_recipe):
    mixture = _cross_mixture(tiny, write_recipe, perturb=False)
    reference = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    ids = torch.tensor([mixture.tokenizer("hello world, he works 6 days")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(mixture(ids), reference(ids).logits, rtol=0, atol=1e-6)


def test_logits_at_t_ignore_text_after_t(tiny, write_recipe):
    mixture = _cross_mixture(tiny, write_recipe)
    tok = mixture.tokenizer
    text_a = "The carpenter earns 2340 a month, so he works for a year."
    text_b = "The carpenters earned 17 pebbles; the quick brown fox jumps."
    ids_a = tok(text_a, add_special_tokens=False)["input_ids"]
    ids_b = tok(text_b, add_special_tokens=False)["input_ids"]
    shared = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y)
    assert shared >= 2
    with torch.no_grad():
        logits_a = mixture(torch.tensor([ids_a]))
        logits_b = mixture(torch.tensor([ids_b]))
        anchor = mixture.logits(mixture.features(torch.tensor([ids_a])).anchor_hidden)
    # Positions before the first differing anchor token see the same text, whatever follows.
    torch.testing.assert_close(logits_a[:, :shared], logits_b[:, :shared], rtol=0, atol=1e-5)
    assert not torch.allclose(logits_a[:, shared], logits_b[:, shared])
    assert not torch.allclose(logits_a, anchor, atol=1e-3)
    # The aligned bases do contribute: blanking their states changes the output.
    features = mixture.features(torch.tensor([ids_a]))
    assert features.present is not None and features.present["w@1"].float().mean() > 0.9
    blanked = {k: (torch.zeros_like(v) if k[0] in "wo" else v) for k, v in features.taps.items()}
    with torch.no_grad():
        real, _, _ = mixture.hidden(features)
        features.taps = blanked
        without, _, _ = mixture.hidden(features)
    assert not torch.allclose(real, without, atol=1e-3)
    # Every cut of the same text, mid-word ones included, keeps the earlier logits.
    for cut in range(1, len(ids_a)):
        with torch.no_grad():
            prefix = mixture(torch.tensor([ids_a[:cut]]))
        torch.testing.assert_close(prefix, logits_a[:, :cut], rtol=1e-4, atol=1e-4)


def test_tail_forward_equals_forward_on_prefix_tokenization(tiny, write_recipe):
    mixture = _cross_mixture(tiny, write_recipe)
    ids = torch.tensor(
        [mixture.tokenizer("hello world, unbelievable xylophones quickly")["input_ids"]]
    )
    features = mixture.features(ids)
    base = mixture.bases["w"]
    texts = anchor_texts(mixture.tokenizer, ids[0].tolist())
    assert "##" in "".join(
        base.tokenizer.convert_ids_to_tokens(tokenize(base.tokenizer, texts)[-1])
    )
    assert align(tokenize(base.tokenizer, texts)).tails  # some positions take the tail path
    for t, text in enumerate(texts):
        own = tokenize(base.tokenizer, [text])[0]
        direct = base.forward(torch.tensor([own]), None, [1], need_final=False).taps[1][0, -1]
        torch.testing.assert_close(features.taps["w@1"][0, t], direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["w", "o"])
@pytest.mark.parametrize("compact_at", [None, 2])
def test_streams_stepped_together_read_what_each_text_reads_alone(
    tiny, write_recipe, name, compact_at
):
    """Generation advances every row's aligned stream in one forward on one batch cache: rows
    of different lengths, one whose new text re-tokenizes what it had ("da" -> "days": a hole),
    one with several new tokens, one starting empty, one left alone for a step (None). Each
    row's states are those of a forward over its own tokenization of its text, step after step
    (the cache grows in place), and after the batch is compacted to its real columns."""
    base = _cross_mixture(tiny, write_recipe).bases[name]
    steps = [
        ["hello wor", "hello world", "hello world!"],
        ["", "hi", "hi there"],
        ["The quick", "The quick brown f", "The quick brown fox jumps"],
        ["6", "6 da", "6 days"],
        ["Once", None, "Once upon"],
    ]
    streams = StreamBatch.empty(base, len(steps))
    for column in range(3):
        if column == compact_at:
            streams.compact(base)
            counts = [len(t) for t in streams.tokens]
            assert streams.mask.shape[1] == max(counts)  # only the real columns, padded left
            for r, n in enumerate(counts):
                assert streams.mask[r].tolist() == [0] * (max(counts) - n) + [1] * n
        texts = [row[column] for row in steps]
        got = streams.step(base, texts, [1, 2])
        for r, (text, (states, found)) in enumerate(zip(texts, got, strict=True)):
            own = tokenize(base.tokenizer, [text])[0] if text is not None else []
            assert found == bool(own)
            if not own:
                continue
            assert streams.tokens[r] == own
            assert int(streams.mask[r].sum()) == len(own)
            direct = base.forward(torch.tensor([own]), None, [1, 2], need_final=False)
            for layer in (1, 2):
                torch.testing.assert_close(
                    states[layer], direct.taps[layer][0, -1].float(), rtol=1e-4, atol=1e-4
                )
    before, after = tokenize(base.tokenizer, ["6 da", "6 days"])
    assert after[: len(before)] != before  # a grown word tokenized anew: a hole in its row
    # Each row alone (as a prompt piece continues it) is its tokens over its real columns.
    for r in range(len(steps)):
        alone = streams.row(base, r)
        assert alone.cache.get_seq_length() == len(alone.tokens) == len(streams.tokens[r])


def test_a_sliding_window_base_stepped_together_reads_each_whole_text(tiny, write_recipe, tmp_path):
    """A base whose layers attend through a sliding window, stepped beside a row that needs
    more columns: the short row's tokens spread over more columns than the window (padding
    between its steps' tokens) while its text stays shorter than the window. Each row's states
    are those of its own text read alone (all of it inside the window), not those of a window
    slid over the batch's columns."""
    window = 21
    path = make_base(
        tmp_path / "sliding", "qwen2", tiny["other"], 32, 2,
        use_sliding_window=True, max_window_layers=0, sliding_window=window,
    )  # fmt: skip
    recipe = write_recipe(recipe_yaml({"a": tiny["llama"], "o": path}, "a", ["o@2"]))
    base = LiveMixture.from_recipe(load_recipe(recipe), seed=3).bases["o"]
    steps = [
        ["hello wor", "hello world!", "hello world! hi there"],
        ["The quick brown f", "The quick brown fox jumps", None],
    ]
    streams = StreamBatch.empty(base, len(steps))
    for column in range(3):
        texts = [row[column] for row in steps]
        got = streams.step(base, texts, [1, 2])
        for text, (states, found) in zip(texts, got, strict=True):
            if text is None:
                assert not found
                continue
            own = tokenize(base.tokenizer, [text])[0]
            assert len(own) < window
            direct = base.forward(torch.tensor([own]), None, [1, 2], need_final=False)
            for layer in (1, 2):
                torch.testing.assert_close(
                    states[layer], direct.taps[layer][0, -1].float(), rtol=1e-4, atol=1e-4
                )
    first = int(streams.mask[0].nonzero()[0])
    assert streams.mask.shape[1] - first > window + 1  # row 0 spans more than a window


@pytest.mark.parametrize("name", ["w", "o"])
def test_a_stream_continued_by_several_texts_reads_each_as_alone(tiny, write_recipe, name):
    """A prompt fed in pieces: the aligned stream over its first piece, which ends where the
    base tokenizes the text otherwise once more follows, continues with the next pieces' texts,
    up to 3 at once; every position reads a forward over its own tokenization of its text."""
    mixture = _cross_mixture(tiny, write_recipe)
    base = mixture.bases[name]
    ids = mixture.tokenizer("hello world, unbelievable xylophones quickly")["input_ids"]
    texts = anchor_texts(mixture.tokenizer, ids)
    whole = tokenize(base.tokenizer, texts[-1:])[0]
    diverges = next(  # where the base tokenizes a text's end otherwise than in the whole
        t
        for t, text in enumerate(texts)
        if (own := tokenize(base.tokenizer, [text])[0]) != whole[: len(own)]
    )
    cut = diverges + 1  # the first piece ends there
    _, _, cache, tokens = aligned_states(base, texts[:cut], [1, 2])
    stream = BaseStream(tokens=tokens, cache=cache)
    # Then the last text again: an anchor token that completes no character adds no text.
    pieces = [texts[first : first + 3] for first in range(cut, len(texts), 3)] + [texts[-1:]]
    for piece in pieces:
        states, found, _, _ = aligned_states(base, piece, [1, 2], stream)
        assert found.all()
        for t, text in enumerate(piece):
            own = tokenize(base.tokenizer, [text])[0]
            direct = base.forward(torch.tensor([own]), None, [1, 2], need_final=False)
            for layer in (1, 2):
                torch.testing.assert_close(
                    states[layer][t], direct.taps[layer][0, -1].float(), rtol=1e-4, atol=1e-4
                )
        assert stream.tokens == tokenize(base.tokenizer, [piece[-1]])[0]
        assert stream.cache.get_seq_length() == len(stream.tokens)


def test_cached_generation_equals_uncached_across_tokenizers(tiny, write_recipe):
    mixture = _cross_mixture(tiny, write_recipe)
    prompt = mixture.tokenizer("If he gets paid 195 every day")["input_ids"]
    with_cache = generate_ids(mixture, prompt, 16, use_cache=True)
    without = generate_ids(mixture, prompt, 16, use_cache=False)
    assert with_cache == without
    assert len(with_cache) == 16 or with_cache[-1] == mixture.tokenizer.eos_token_id


def test_batched_features_equal_single(tiny, write_recipe):
    from composer.features.data import Example, collate

    mixture = _cross_mixture(tiny, write_recipe)
    texts = ["hello world", "The quick brown fox jumps over the lazy dog"]
    examples = [Example(ids, ids) for ids in (mixture.tokenizer(t)["input_ids"] for t in texts)]
    batch = collate(examples, mixture.tokenizer.pad_token_id)
    with torch.no_grad():
        together = mixture(batch["input_ids"], batch["attention_mask"])
        for row, example in enumerate(examples):
            alone = mixture(torch.tensor([example.input_ids]))
            n = len(example.input_ids)
            torch.testing.assert_close(together[row, :n], alone[0], rtol=1e-4, atol=1e-4)


def test_gates_per_generated_token(tiny, write_recipe):
    from composer.generation.decode import generate, generate_with_gates

    mixture = _cross_mixture(tiny, write_recipe)
    pieces = generate_with_gates(mixture, "How many days?", 10)
    assert len(pieces) >= 1
    assert "".join(p for p, _, _ in pieces) == generate(mixture, "How many days?", 10)
    assert {s for _, s, _ in pieces} <= set(mixture.carry_on.sources)
    assert all(1 / len(mixture.carry_on.sources) <= w <= 1 for _, _, w in pieces)


def test_a_base_with_a_slow_tokenizer_is_refused_in_one_line(tiny, write_recipe, tmp_path):
    """ByT5's tokenizer is pure Python: no character offsets, which per-character scoring of a
    base read through another tokenizer needs. The build stops before training, in one line."""
    from conftest import make_base
    from transformers import AutoTokenizer, ByT5Tokenizer
    from typer.testing import CliRunner

    from cli import app

    ByT5Tokenizer().save_pretrained(tmp_path / "tok-byt5")
    assert not AutoTokenizer.from_pretrained(tmp_path / "tok-byt5").is_fast
    slow = make_base(tmp_path / "byt5", "llama", tmp_path / "tok-byt5", 32, 2)
    path = write_recipe(recipe_yaml({"a": tiny["llama"], "s": slow}, "a", ["a@1", "s@1"]))
    result = CliRunner().invoke(app, ["build", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    message = result.output.strip()
    assert "base 's'" in message and "slow Python tokenizer" in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "out").exists()

"""Per-domain metrics: losses comparable across tokenizers, gate means."""

from __future__ import annotations

import pytest
from conftest import recipe_yaml

from composer.features.data import encode_qa, text_windows
from composer.model.mixture import LiveMixture
from composer.recipe import load_recipe
from composer.training.metrics import base_target_nll, domain_metrics


@pytest.fixture()
def mixture(tiny, write_recipe):
    bases = {"a": tiny["llama"], "w": tiny["wordpiece"]}
    return LiveMixture.from_recipe(
        load_recipe(write_recipe(recipe_yaml(bases, "a", ["a@1", "w@1"])))
    )


def test_domain_metrics(mixture):
    tok = mixture.tokenizer
    qa = [
        encode_qa(tok, [{"role": "user", "content": q}], a, 256)
        for q, a in [("How many days?", "He works 12 days."), ("Add 2 and 3.", "2 + 3 = 5 #### 5")]
    ]
    code = text_windows(tok, ["def add(a, b):\n    return a + b\n"] * 2, 256, None)
    for e in qa:
        e.domain = "math"
    for e in code:
        e.domain = "code"
    report = domain_metrics(mixture, [*qa, *code], batch_size=3)
    assert set(report) == {"math", "code"}
    for name, examples in (("math", qa), ("code", code)):
        domain = report[name]
        per_char = domain["nats_per_char"]
        # Untrained, the mixture is its anchor; the anchor alone is the anchor's own score.
        assert per_char["mixture"] == pytest.approx(per_char["anchor"], rel=1e-5)
        assert per_char["a alone"] == per_char["anchor"]
        # Scoring a base alone re-encodes the decoded text in its own tokens: through the
        # anchor, that gives the anchor's loss, so the other bases' figures compare with it.
        alone = sum(base_target_nll(mixture.bases["a"], mixture, examples))
        assert alone / domain["target_chars"] == pytest.approx(per_char["anchor"], rel=1e-3)
        assert per_char["w alone"] > 0 and per_char["w alone"] != pytest.approx(per_char["anchor"])
        assert sum(domain["gate_mean"].values()) == pytest.approx(1.0, abs=1e-5)
    assert report["math"]["examples"] == 2
    assert report["math"]["target_chars"] == len("He works 12 days.") + len(
        "2 + 3 = 5 #### 5"
    ) + 2 * len("<|im_end|>\n")


def test_qa_without_a_chat_template_keeps_the_prompt_tokens(tiny):
    """A base without a chat template gets the plain "User: …\\nAssistant: " prompt, whose
    trailing space a byte-level BPE merges into the answer's first word; the example still
    exists, starts with the prompt's own tokens (what generation continues from) and has the
    answer as its targets."""
    from transformers import AutoTokenizer

    from composer.features.data import IGNORE
    from composer.generation.templates import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    tok.chat_template = None
    messages = [{"role": "user", "content": "How many days?"}]
    prompt = format_prompt(tok, messages)
    assert prompt.endswith("Assistant: ")
    merged = tok(prompt + "works for 2 weeks.", add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert merged[: len(prompt_ids)] != prompt_ids  # the case: tokens merge across the boundary
    example = encode_qa(tok, messages, "works for 2 weeks.", 256)
    assert example is not None
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    targets = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    assert tok.decode(targets) == "works for 2 weeks." + tok.eos_token

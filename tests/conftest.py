"""Tiny real bases made by the tests: real transformers configs, random init, saved to tmp.

Two tokenizers are trained here (byte-level BPE on a small corpus): `shared` is used by the
Llama and Qwen2 bases, `other` by a base that must be refused in same-tokenizer mode.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "A carpenter works for 2 weeks every month and for 6 days every week.",
    "If he gets paid 195 every day, how much does he earn if he works for a year?",
    "He works 6 * 2 = 12 days a month, so he earns 195 * 12 = 2340 a month.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. #### 42",
    "Robert has a bag of pebbles with 72 inside and drops 36 of them.",
] * 20


def make_tokenizer(folder: Path, vocab_size: int, seed_text: str = "") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*CORPUS, seed_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def make_wordpiece_tokenizer(folder: Path, vocab_size: int) -> None:
    """A BERT-style word-piece tokenizer (whitespace/punctuation split, ## continuations)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "[EOS]"]
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(folder)


def make_base(
    folder: Path, family: str, tokenizer_from: Path, hidden: int, layers: int, **config: Any
) -> Path:
    """A tiny random Llama or Qwen2 base saved to `folder`; `config` adds to its config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config,
    )
    made = (
        LlamaConfig(**common, tie_word_embeddings=True)
        if family == "llama"
        else Qwen2Config(**common, tie_word_embeddings=False)
    )
    # A seed of the family's name that is the same in every process (str hash() is salted per
    # process, so the tiny bases, and every test's outcome, would change from run to run).
    torch.manual_seed(zlib.crc32(family.encode()) % 1000 + hidden)
    model = AutoModelForCausalLM.from_config(made)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    make_tokenizer(root / "tok-shared", 400)
    make_tokenizer(root / "tok-other", 320, seed_text="entirely different merges " * 50)
    make_wordpiece_tokenizer(root / "tok-wordpiece", 300)
    return {
        "llama": make_base(root / "llama", "llama", root / "tok-shared", 96, 3),
        # bitsandbytes' nf4 CPU kernel wants every Linear's out-features divisible by 32.
        "qwen2": make_base(root / "qwen2", "qwen2", root / "tok-shared", 64, 4),
        "other": make_base(root / "other", "llama", root / "tok-other", 32, 2),
        # llama, not qwen2: transformers 5 loads a qwen2 folder with Qwen2Tokenizer, which rebuilds
        # a byte-level BPE from the vocabulary and ignores the word-piece model.
        "wordpiece": make_base(root / "wordpiece", "llama", root / "tok-wordpiece", 64, 2),
    }


# A carry-on with base `b` as an expert (its own head pooled with the anchor's), for recipes
# over the tiny Llama anchor `a` and the tiny Qwen2 `b`, which share a tokenizer.
EXPERT_CARRY_ON = """
    carry_on:
      width: 32
      heads: 4
      experts: [b]
      blocks:
        - shortcuts: [a@1]
        - shortcuts: [b@4]
    """


def full_softmax_kl(head, rows, anchor_rows):
    """KL(anchor ‖ mixture) summed over rows, from the head's whole logits: the reference the
    blocked, online passes are held to."""
    import torch.nn.functional as F

    return F.kl_div(
        head.logits(rows).log_softmax(-1),
        head.logits(anchor_rows).log_softmax(-1),
        log_target=True,
        reduction="sum",
    )


def recipe_yaml(bases: dict[str, Path], anchor: str, taps: list[str], **extra: str) -> str:
    """A small valid recipe over local tiny bases; `extra` replaces whole top-level sections."""
    base_lines = "\n".join(f"  {name}: {{path: {path}}}" for name, path in bases.items())
    sections = {
        "carry_on": f"""
            carry_on:
              width: 32
              heads: 4
              blocks:
                - shortcuts: [{taps[0]}]
                - shortcuts: []
            """,
        "train": """
            train:
              data: {kind: gsm_symbolic, size: 24, seed: 0}
              steps: 4
              batch_size: 4
              seq_len: 320
              lr: 0.003
              warmup_steps: 1
              eval_every: 2
              checkpoint_every: 2
            """,
    }
    sections.update(extra)
    body = "".join(textwrap.dedent(s) for s in sections.values())
    return f"name: tiny\nanchor: {anchor}\nbases:\n{base_lines}\ntaps: [{', '.join(taps)}]\n" + body


@pytest.fixture()
def write_recipe(tmp_path: Path):
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session", autouse=True)
def _session_feature_caches(tmp_path_factory: pytest.TempPathFactory):
    """Module and session fixtures' feature caches in tmp, never in the user's $COMPOSE_HOME."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPOSE_FEATURES_DIR", str(tmp_path_factory.mktemp("features")))
        yield


@pytest.fixture(autouse=True)
def _feature_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's feature caches in its own tmp folder."""
    monkeypatch.setenv("COMPOSE_FEATURES_DIR", str(tmp_path / "features"))


def write_mixture_dir(recipe_path: Path, out: Path, seed: int = 1, noise: float = 0.3) -> Path:
    """A mixture directory as a build leaves it (resolved recipe + carry-on weights), without
    training: the carry-on is perturbed so that its correction is not zero."""
    import torch

    from composer.model.mixture import LiveMixture
    from composer.model.weights import RECIPE_FILE, WEIGHTS, save_weights
    from composer.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    mixture = LiveMixture.from_recipe(recipe, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixture.carry_on.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise)
    out.mkdir(parents=True)
    (out / RECIPE_FILE).write_text(recipe.to_yaml())
    save_weights(out / WEIGHTS, mixture.carry_on)
    return out


@pytest.fixture(scope="session")
def tiny_mixture_dir(tiny, tmp_path_factory) -> Path:
    """A mixture directory over the tiny Llama (anchor) and Qwen2 bases (one tokenizer)."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "recipe.yaml").write_text(
        recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"])
    )
    return write_mixture_dir(root / "recipe.yaml", root / "tiny")


@contextlib.contextmanager
def serving(app, limits=None):
    """`app` served by the real uvicorn server (as `compose serve` runs it) under `limits`
    (`composer.serving.connections.Limits`, its defaults when None) on a free port."""
    from types import SimpleNamespace

    from composer.serving.connections import Limits, http_server

    limits = limits or Limits()
    server = http_server(app, host="127.0.0.1", port=0, limits=limits, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, app=app, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def compose_server(*arguments: str):
    """`compose ARGUMENTS --port P` (`"serve", DIR, ...`) in its own process on a free port,
    until it answers /health (no API key); its URL and process."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request
    from types import SimpleNamespace

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "composer", *arguments, "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "COMPOSE_API_KEY": ""})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "compose serve exited"
            assert time.monotonic() < deadline, "compose serve did not come up"
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        yield SimpleNamespace(url=url, process=process)
    finally:
        process.terminate()
        process.wait(timeout=20)

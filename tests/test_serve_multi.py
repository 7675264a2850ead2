"""Several mixtures over one set of frozen bases: each base loaded once, rows of different
mixtures (and of a base alone) decoded in one batch, rows joining and leaving a running batch,
each answer the one it gets alone."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import EXPERT_CARRY_ON, compose_server, recipe_yaml, serving, write_mixture_dir

from composer.errors import BaseSourceError, ServingError
from composer.generation.decode import Decoder, Generation, prompt_ids, run_together
from composer.generation.sampling import Sampling
from composer.model.mixture import AnchorAlone
from composer.serving.scheduler import Job, Scheduler
from composer.serving.server import create_app, load_mixtures

WRITE_AT = """
    carry_on:
      width: 32
      heads: 4
      write_at: 2
      blocks:
        - shortcuts: [a@1]
        - shortcuts: []
    """
PROMPTS = [
    "If he gets paid 195 every day",
    "def add(a, b):",
    "Tom has 3 apples and buys 4 more. How many apples does he have now? He works 6 days.",
    "Hi",
    "The quick brown fox",
]


def _write(root: Path, name: str, text: str, seed: int) -> Path:
    (root / f"{name}.yaml").write_text(text.replace("name: tiny", f"name: {name}", 1))
    return write_mixture_dir(root / f"{name}.yaml", root / "mixtures" / name, seed=seed)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory) -> dict[str, Path]:
    """Four mixtures anchored on the tiny Llama: one tapping the Qwen2 too, one pooling the
    Qwen2 as an expert, one reading a base of another tokenizer (aligned), one writing into
    the anchor's layers."""
    root = tmp_path_factory.mktemp("multi")
    llama, qwen2, other = tiny["llama"], tiny["qwen2"], tiny["other"]
    texts = {
        "taps": recipe_yaml({"a": llama, "b": qwen2}, "a", ["a@1", "b@2"]),
        "expert": recipe_yaml(
            {"a": llama, "b": qwen2}, "a", ["a@1", "b@4"], carry_on=EXPERT_CARRY_ON
        ),
        "aligned": recipe_yaml({"a": llama, "o": other}, "a", ["a@1", "o@1"]),
        "write": recipe_yaml({"a": llama}, "a", ["a@1", "a@2"], carry_on=WRITE_AT),
    }
    return {name: _write(root, name, text, seed) for seed, (name, text) in enumerate(texts.items())}


@pytest.fixture(scope="module")
def served(folders, tiny):
    """The four mixtures over one pool of bases, and the tiny Llama alone (its model folder
    named beside them, as `compose serve` takes it)."""
    mixtures = load_mixtures([folders["taps"].parent, tiny["llama"]])  # a folder of mixtures
    alone = mixtures.pop("llama-alone")
    assert isinstance(alone, AnchorAlone)
    return {**mixtures, "llama": alone}


def _greedy(mixture, prompt: str, n: int, **options) -> Generation:
    ids = mixture.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return Generation(mixture, ids, n, stop_at_eos=False, **options)


def test_each_base_is_loaded_once_whichever_mixtures_use_it(served):
    assert set(served) == {"taps", "expert", "aligned", "write", "llama"}
    llama = served["taps"].bases["a"]
    assert all(m.bases["a"] is llama for m in served.values() if "a" in m.bases)
    assert served["llama"].bases["base"] is llama
    assert served["taps"].bases["b"] is served["expert"].bases["b"]
    assert served["taps"].carry_on is not served["expert"].carry_on


def test_a_base_alone_is_served_as_the_base_itself(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    alone = load_mixtures([tiny["llama"]])["llama-alone"]
    ids = alone.tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    assert Generation(alone, ids, 10, stop_at_eos=False).run().ids == out[0, len(ids) :].tolist()
    with pytest.raises(ServingError, match="no-such-card' is not a mixture directory, a model "):
        load_mixtures(["no-such-card"])


def test_two_mixtures_of_one_name_are_refused(folders, tmp_path):
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in folders["taps"].iterdir():
        (twin / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ServingError, match=r"^two mixtures are named 'taps' \(") as caught:
        load_mixtures([folders["taps"], twin])
    assert "\n" not in str(caught.value)


def test_a_shared_base_whose_settings_disagree_is_refused(folders, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in folders["write"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    recipe = (other / "recipe.yaml").read_text().replace("name: write", "name: write-cpu")
    assert recipe.count("device_map: null") == 1
    (other / "recipe.yaml").write_text(recipe.replace("device_map: null", "device_map: cpu"))
    assert "device_map: cpu" in (other / "recipe.yaml").read_text()
    with pytest.raises(BaseSourceError, match="device_map 'cpu', not None") as caught:
        load_mixtures([folders["write"], other])
    assert "\n" not in str(caught.value)


def test_rows_of_several_mixtures_and_a_base_alone_share_one_batch(served):
    names = ["taps", "expert", "aligned", "write", "llama"]
    lengths = [12, 7, 10, 9, 11]
    decoder = Decoder()
    batch = [
        _greedy(served[n], p, k, gates=True)
        for n, p, k in zip(names, PROMPTS, lengths, strict=True)
    ]
    for generation in batch:
        decoder.add(generation)
    decoder.step()  # every prompt fits one chunk: all run from here
    lanes = decoder._batch.lanes
    assert decoder.running == 5
    # One forward of the Llama for the four rows reading it as the anchor (not the one that
    # writes into it: its upper layers continue its own cache), one of the Qwen2 for two.
    assert sorted(len(lane.rows) for lane in lanes.values()) == [1, 2, 4]
    while len(decoder):
        decoder.step()
    for name, prompt, n, together in zip(names, PROMPTS, lengths, batch, strict=True):
        alone = _greedy(served[name], prompt, n, gates=True).run()
        assert together.ids == alone.ids, name
        assert together.text == alone.text and together.finish_reason == "length"
        assert len(together.gates) == n
    assert len({tuple(g.ids) for g in batch}) == len(batch)  # they did differ


def test_rows_join_and_leave_a_running_batch_each_as_alone(served):
    decoder = Decoder(chunk=5)  # prompts longer than 5 tokens take several steps
    first = _greedy(served["taps"], PROMPTS[0], 40)
    decoder.add(first)
    while decoder.running == 0:
        decoder.step()
    for _ in range(3):
        decoder.step()
    later = [
        _greedy(served["expert"], PROMPTS[2], 8),  # a long prompt: fed in chunks
        _greedy(served["llama"], PROMPTS[3], 12),
        _greedy(served["aligned"], PROMPTS[1], 30),
        _greedy(served["write"], PROMPTS[4], 6),
    ]
    for generation in later:
        decoder.add(generation)
    steps = 0
    while len(later[0].ids) == 0:
        before = len(first.ids)
        decoder.step()
        steps += 1
        assert len(first.ids) == before + 1  # the running row goes on while prompts are fed
    assert steps >= 4
    left = None
    while len(decoder):
        decoder.step()
        if left is None and len(later[2].ids) == 5:
            later[2].cancel()  # its client went away
            left = list(later[2].ids)
        assert decoder._batch.length <= max(len(g.prompt_ids) + len(g.ids) for g in [first, *later])
    assert decoder._batch.rows == [] and decoder._batch.lanes == {} and not decoder._batch.states
    for generation, (name, prompt, n) in zip(
        [first, *later],
        [
            ("taps", PROMPTS[0], 40),
            ("expert", PROMPTS[2], 8),
            ("llama", PROMPTS[3], 12),
            ("aligned", PROMPTS[1], 30),
            ("write", PROMPTS[4], 6),
        ],
        strict=True,
    ):
        alone = _greedy(served[name], prompt, n).run()
        if generation is later[2]:
            assert generation.finish_reason == "cancelled" and alone.ids[:5] == left
            continue
        assert generation.ids == alone.ids, name
        assert generation.finish_reason == "length"


def test_decode_together_takes_rows_of_several_mixtures(served):
    names, prompts = ["taps", "aligned", "llama"], PROMPTS[:3]
    batch = [_greedy(served[n], p, 6) for n, p in zip(names, prompts, strict=True)]
    run_together(batch)
    for g, n, p in zip(batch, names, prompts, strict=True):
        assert g.ids == _greedy(served[n], p, 6).run().ids


def _collect(job: Job):
    async def run() -> tuple[str, object, float | None]:
        text, first = "", None
        while True:
            item = await job.out.get()
            if not isinstance(item, str):
                return text, item, first
            first = first or time.monotonic()
            text += item

    return run()


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_joins_the_running_batch_only_when_continuous(served, continuous):
    mixture = served["taps"]
    long_ids, short_ids = prompt_ids(mixture, PROMPTS[0]), prompt_ids(mixture, PROMPTS[1])

    async def scenario():
        engine = Scheduler(mixture, max_queue=4, batch=4, continuous=continuous)
        try:
            long = Job(long_ids, 60, Sampling(), [], stop_at_eos=False)
            short = Job(short_ids, 4, Sampling(), [], stop_at_eos=False, mixture=served["llama"])
            engine.submit(long)
            first = await long.out.get()
            engine.submit(short)
            results = await asyncio.gather(_collect(long), _collect(short))
            return first, results, engine.stats()
        finally:
            engine.close()

    first, ((long_text, _, _), (short_text, short_end, _)), stats = asyncio.run(scenario())
    alone_long = Generation(mixture, long_ids, 60, stop_at_eos=False).run()
    alone_short = Generation(served["llama"], short_ids, 4, stop_at_eos=False).run()
    assert first + long_text == alone_long.text
    assert short_end.ids == alone_short.ids and short_text == alone_short.text
    assert stats["served"] == 2
    if continuous:  # the short one joined the long one's batch and ended first
        assert stats["largest_batch"] == 2
    else:  # it waited for the batch to end
        assert stats["largest_batch"] == 1


def test_the_server_serves_every_mixture_by_name(served):
    app = create_app(served, max_queue=8, batch=8)
    with serving(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        cards = {m.id: m for m in client.models.list()}
        assert set(cards) == set(served)
        assert [b["role"] for b in cards["taps"].bases] == ["anchor", "tapped"]
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        message = caught.value.body["message"]
        assert message.startswith("model: 'nope' is not served here (this server serves ")
        assert all(f"'{name}'" in message for name in served)
        request = urllib.request.Request(
            running.url + "/v1/completions",
            json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=30)
        assert (
            missing.value.code == 400
            and json.loads(missing.value.read())["error"]["param"] == "model"
        )

        async def ask_all():
            async_client = openai.AsyncOpenAI(
                base_url=running.url + "/v1", api_key="x", max_retries=0
            )
            calls = [
                async_client.completions.create(model=name, prompt=p, max_tokens=10, temperature=0)
                for name, p in zip(served, PROMPTS, strict=True)
            ]
            return await asyncio.gather(*calls)

        replies = asyncio.run(ask_all())
        for reply, (name, prompt) in zip(replies, zip(served, PROMPTS, strict=True), strict=True):
            assert reply.model == name
            expected = Generation(
                served[name], prompt_ids(served[name], prompt, chat=False), 10
            ).run()
            assert reply.choices[0].text == expected.text, name
        assert app.state.server.engine.stats()["largest_batch"] >= 2


def test_compose_serve_takes_several_mixture_folders(folders):
    """`compose serve DIR DIR` as README shows it: both served by name."""
    with compose_server("serve", str(folders["taps"]), str(folders["write"])) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["taps", "write"]
        for name in ("taps", "write"):
            reply = client.completions.create(model=name, prompt="hi", max_tokens=2)
            assert reply.model == name and reply.usage.completion_tokens == 2
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        message = caught.value.body["message"]
        assert "'taps'" in message and "'write'" in message

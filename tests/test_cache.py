"""The feature cache on tiny real bases: same training as live, no base weights, resume, refusals."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import recipe_yaml
from typer.testing import CliRunner

import composer.features.cache as cache_module
import composer.model.head as head_module
from cli import app
from composer.bases.frozen import load_base
from composer.errors import CacheError
from composer.features.cache import MANIFEST, open_cache, write_cache
from composer.features.data import collate
from composer.model.head import LMHead, head_loss
from composer.model.mixture import LiveMixture
from composer.recipe import BaseSpec, load_recipe
from composer.training.build import build, train_mixture

TAPS = ["a@1", "a@2", "b@3"]


@pytest.fixture()
def recipe_path(tiny, write_recipe):
    return write_recipe(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", TAPS))


def _recipe(path, *overrides):
    return load_recipe(path, list(overrides))


def test_cache_and_live_give_the_same_training(recipe_path, tmp_path):
    cached = build(_recipe(recipe_path, "train.cache.dtype=float32"), out=tmp_path / "c", steps=6)
    live = build(_recipe(recipe_path, "train.cache.enabled=false"), out=tmp_path / "l", steps=6)
    assert cached.metrics["features"] == "cache" and live.metrics["features"] == "live"
    a = torch.tensor([loss for _, loss in cached.metrics["eval_loss_curve"]])
    b = torch.tensor([loss for _, loss in live.metrics["eval_loss_curve"]])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    first, last = cached.metrics["train_loss_first"], cached.metrics["train_loss_last"]
    assert first == pytest.approx(live.metrics["train_loss_first"], rel=1e-4)
    assert last == pytest.approx(live.metrics["train_loss_last"], rel=1e-4)
    assert cached.metrics["eval_loss_anchor"] == pytest.approx(
        live.metrics["eval_loss_anchor"], rel=1e-5
    )
    # The held-out report per domain reads the cache in the cached build, the bases live in the
    # other: the same figures.
    assert cached.metrics["domains"].keys() == live.metrics["domains"].keys()
    for domain, report in cached.metrics["domains"].items():
        other = live.metrics["domains"][domain]
        assert report["nats_per_char"].keys() == other["nats_per_char"].keys()
        for who, value in report["nats_per_char"].items():
            assert value == pytest.approx(other["nats_per_char"][who], rel=1e-4), who
        for source, weight in report["gate_mean"].items():
            assert weight == pytest.approx(other["gate_mean"][source], abs=1e-5), source


def test_a_cache_being_written_by_another_process_is_refused(recipe_path):
    """The cache folder's lock is held across processes: a second writer stops at once."""
    import subprocess
    import sys

    from composer.bases.frozen import resolve_folder
    from composer.features.cache import cache_dir, cache_key

    recipe = _recipe(recipe_path)
    folders = {n: resolve_folder(s, fetch=False) for n, s in recipe.bases.items()}
    folder = cache_dir(recipe, cache_key(recipe, folders)[0])
    folder.mkdir(parents=True)
    script = (
        "import filelock, sys; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(folder / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(CacheError, match="is being written by another process"):
            write_cache(recipe)
    finally:
        holder.communicate("")
    assert not (folder / MANIFEST).exists()
    assert write_cache(recipe).manifest["complete"]  # the lock is free again


def test_cache_and_live_agree_with_an_aligned_base(tiny, write_recipe, tmp_path):
    """A base with another tokenizer has positions without a state; the cache keeps that."""
    text = recipe_yaml({"a": tiny["llama"], "o": tiny["other"]}, "a", ["a@1", "o@1"])
    path = write_recipe(text)
    recipe = _recipe(path, "train.cache.dtype=float32")
    source = write_cache(recipe).source("train")
    rows = [0, 1, 2, 3]
    cached = source.batch(rows).features
    ids = collate([source.examples[i] for i in rows], pad_id=0)
    live = LiveMixture.from_recipe(recipe).features(ids["input_ids"], ids["attention_mask"])
    assert cached.present is not None and live.present is not None
    assert set(cached.present) == {"o@1"}
    real = ids["attention_mask"].bool()
    assert torch.equal(cached.present["o@1"][real], live.present["o@1"][real])
    torch.testing.assert_close(cached.taps["o@1"][real], live.taps["o@1"][real])
    from_cache = train_mixture(recipe, from_cache=True, out=tmp_path / "c", steps=4)
    from_live = build(_recipe(path, "train.cache.enabled=false"), out=tmp_path / "l", steps=4)
    a = torch.tensor([loss for _, loss in from_cache.metrics["eval_loss_curve"]])
    b = torch.tensor([loss for _, loss in from_live.metrics["eval_loss_curve"]])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Recorder:
    """Stands in for safetensors.safe_open and records every tensor read through it."""

    names: ClassVar[list[str]] = []

    def __init__(self, path, framework):
        from safetensors import safe_open

        self._inner = safe_open(path, framework=framework)

    def __enter__(self):
        self._handle = self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, name):
        _Recorder.names.append(name)
        return self._handle.get_tensor(name)


@pytest.mark.parametrize(
    ("anchor", "head"), [("a", "model.embed_tokens.weight"), ("b", "lm_head.weight")]
)
def test_training_from_cache_reads_only_the_head(
    tiny, write_recipe, tmp_path, monkeypatch, anchor, head
):
    text = recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, anchor, TAPS)
    recipe = _recipe(write_recipe(text))
    write_cache(recipe)

    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded")

    import transformers

    import composer.model.mixture

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    monkeypatch.setattr(composer.model.mixture, "load_base", refuse)
    monkeypatch.setattr(head_module, "safe_open", _Recorder)
    _Recorder.names = []
    result = train_mixture(recipe, from_cache=True, out=tmp_path / "out", steps=4)
    assert _Recorder.names == [head]
    assert result.metrics["eval_loss_mixture"] < result.metrics["eval_loss_anchor"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_head_from_folder_equals_the_base_head(tiny, family):
    base = load_base("x", BaseSpec(path=str(tiny[family])))
    head = LMHead.from_folder(tiny[family], torch.float32)
    hidden = torch.randn(5, base.hidden_size)
    torch.testing.assert_close(head.logits(hidden), base.logits(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_blocked_head_loss_matches_full_logits(monkeypatch, softcap, stored):
    monkeypatch.setattr(head_module, "HEAD_CHUNK_BYTES", 4 * 12 * 7)  # vocab blocks of 7
    monkeypatch.setattr(head_module, "ROW_CHUNK", 12)
    torch.manual_seed(0)
    weight = torch.randn(50, 8).to(stored)
    head = LMHead(weight, torch.randn(50), softcap, torch.float32)
    full_head = LMHead(weight.float(), head.bias, softcap, torch.float32)
    rows = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    (2 * head_loss(head, rows, targets)).backward()
    blocked = rows.grad.clone()
    rows.grad = None
    full = F.cross_entropy(full_head.logits(rows), targets, reduction="sum")
    (2 * full).backward()
    torch.testing.assert_close(head_loss(head, rows.detach(), targets), full.detach())
    torch.testing.assert_close(blocked, rows.grad)
    torch.testing.assert_close(head.logits(rows.detach()), full_head.logits(rows.detach()))


def test_head_kept_in_its_file_dtype_when_exact(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"tie_word_embeddings": true}')
    weight = torch.randn(20, 4).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": weight}, str(tmp_path / "model.safetensors"))
    exact = LMHead.from_folder(tmp_path, torch.float32)
    assert exact.weight.dtype == torch.bfloat16 and exact.dtype == torch.float32
    assert LMHead.from_folder(tmp_path, torch.float16).weight.dtype == torch.float16
    hidden = torch.randn(3, 4)
    torch.testing.assert_close(exact.logits(hidden), hidden @ weight.float().T, rtol=0, atol=0)


def test_killed_cache_run_resumes_after_its_last_shard(recipe_path, tmp_path, monkeypatch):
    recipe = _recipe(recipe_path, "train.cache.shard_examples=4", f"train.cache.dir={tmp_path}/c")
    straight = write_cache(
        _recipe(recipe_path, "train.cache.shard_examples=4", f"train.cache.dir={tmp_path}/s")
    )
    real_write = cache_module._write_shard
    written: list[str] = []
    die_at = [3]

    def write_then_die(path, tensors):
        real_write(path, tensors)
        written.append(path.name)
        if len(written) == die_at[0]:
            raise KeyboardInterrupt  # killed with the third shard on disk, not yet listed

    monkeypatch.setattr(cache_module, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_cache(recipe)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]["train"]) == 2
    planned = straight.manifest["shards"]
    with pytest.raises(CacheError, match=rf"incomplete \(2 of {sum(map(len, planned.values()))} "):
        open_cache(recipe)
    written.clear()
    die_at[0] = -1
    resumed = write_cache(recipe)
    # Every split is written, train's first two shards alone not again.
    assert written == [s["file"] for split in planned.values() for s in split][2:]
    assert set(planned) == {"train", "eval", "preserve", "general"}
    assert resumed.manifest["shards"] == straight.manifest["shards"]


def test_corrupt_shard_is_refused(recipe_path, tmp_path):
    recipe = _recipe(recipe_path, f"train.cache.dir={tmp_path}/c")
    write_cache(recipe)
    shard = tmp_path / "c" / "train-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="train-00000.safetensors is corrupt"):
        open_cache(recipe)
    result = CliRunner().invoke(
        app, ["train", str(recipe_path), "--from-cache", f"train.cache.dir={tmp_path}/c"]
    )
    assert result.exit_code == 1
    assert "corrupt (checksum mismatch)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cache_of_another_recipe_is_refused(recipe_path, tmp_path):
    write_cache(_recipe(recipe_path, f"train.cache.dir={tmp_path}/c"))
    other = _recipe(recipe_path, f"train.cache.dir={tmp_path}/c", "train.seq_len=200")
    for attempt in (open_cache, write_cache):
        with pytest.raises(CacheError, match=r"another recipe \(they differ in: seq_len\)"):
            attempt(other)


def test_missing_cache_is_one_line(recipe_path, tmp_path):
    result = CliRunner().invoke(
        app, ["train", str(recipe_path), "--from-cache", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert "no feature cache at" in result.output and "compose cache" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", 2**-8), ("int8", 1 / 254)])
def test_storage_round_trip(recipe_path, dtype, tolerance):
    exact = write_cache(_recipe(recipe_path, "train.cache.dtype=float32")).source("eval")
    stored = write_cache(_recipe(recipe_path, f"train.cache.dtype={dtype}")).source("eval")
    indices = list(range(len(exact.examples)))
    a, b = exact.batch(indices).features, stored.batch(indices).features
    for name in ["anchor", *a.taps]:
        x = a.anchor_hidden if name == "anchor" else a.taps[name]
        y = b.anchor_hidden if name == "anchor" else b.taps[name]
        # Half a storage step, plus float32 rounding in computing and applying the step.
        absmax = x.abs().amax(dim=-1, keepdim=True)
        bound = (tolerance + 8 * torch.finfo(torch.float32).eps) * absmax + 1e-7
        assert ((x - y).abs() <= bound).all(), name
        assert not torch.equal(x, y)


def test_the_callers_thread_count_neither_sets_the_bytes_nor_changes(recipe_path, tmp_path):
    saved = torch.get_num_threads()
    shards = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            recipe = _recipe(
                recipe_path, "train.cache.dtype=float32", f"train.cache.dir={tmp_path}/{threads}"
            )
            cache = write_cache(recipe)
            assert torch.get_num_threads() == threads
            shards[threads] = [s["sha256"] for s in cache.manifest["shards"]["train"]]
    finally:
        torch.set_num_threads(saved)
    assert shards[1] == shards[2]


def test_cli_cache_then_train_then_build_reuses(recipe_path, tmp_path, monkeypatch):
    runner = CliRunner()
    first = runner.invoke(app, ["cache", str(recipe_path)])
    assert first.exit_code == 0, first.output
    assert "cached 20 train + 2 eval examples" in first.output
    trained = runner.invoke(
        app, ["train", str(recipe_path), "--from-cache", "--out", str(tmp_path / "t")]
    )
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "t" / "carry_on.safetensors").is_file()

    import composer.features.cache

    def refuse(*args, **kwargs):
        raise AssertionError("the bases were run again")

    monkeypatch.setattr(composer.features.cache, "_run_bases", refuse)
    built = runner.invoke(app, ["build", str(recipe_path), "--out", str(tmp_path / "b")])
    assert built.exit_code == 0, built.output
    assert "feature cache reused" in built.output

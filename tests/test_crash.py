"""A `compose build` killed with SIGKILL resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import recipe_yaml
from safetensors.torch import load_file

from composer.model.weights import WEIGHTS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

COMPOSE = [sys.executable, "-c", "from cli import main; main()"]


def _compose(*args: object, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen(
        [*COMPOSE, *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def _finish(proc: subprocess.Popen) -> None:
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-2000:]


def test_sigkill_during_training_then_resume(tiny, write_recipe, tmp_path):
    text = recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"])
    recipe = write_recipe(text)
    overrides = ["train.steps=40", "train.checkpoint_every=5", "train.eval_every=40"]
    _finish(_compose("build", recipe, "--out", tmp_path / "straight", *overrides))

    victim = _compose("build", recipe, "--out", tmp_path / "killed", *overrides)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if checkpoints.is_dir() and any(checkpoints.glob("step-000010")):
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the build finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / WEIGHTS).exists()
    # Whatever the kill interrupted, no temp file or half checkpoint is taken for a real one.
    for step in checkpoints.glob("step-*"):
        assert (step / "trainer.json").is_file() and (step / WEIGHTS).is_file()

    _finish(_compose("build", recipe, "--out", tmp_path / "killed", "--resume", *overrides))
    straight = load_file(str(tmp_path / "straight" / WEIGHTS))
    resumed = load_file(str(tmp_path / "killed" / WEIGHTS))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
    assert not list((tmp_path / "killed").rglob("*.tmp"))


def test_sigkill_during_caching_then_resume(tiny, write_recipe, tmp_path, monkeypatch):
    text = recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"])
    recipe = write_recipe(text)
    overrides = ["train.cache.shard_examples=2", "train.cache.batch_size=1"]

    monkeypatch.setenv("COMPOSE_FEATURES_DIR", str(tmp_path / "straight"))
    _finish(_compose("cache", recipe, *overrides))

    monkeypatch.setenv("COMPOSE_FEATURES_DIR", str(tmp_path / "killed"))
    victim = _compose("cache", recipe, *overrides)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if len(list((tmp_path / "killed").rglob("train-*.safetensors"))) >= 2:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the cache run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _finish(_compose("cache", recipe, *overrides))

    straight = sorted((tmp_path / "straight").rglob("*.safetensors"))
    resumed = sorted((tmp_path / "killed").rglob("*.safetensors"))
    assert [p.name for p in straight] == [p.name for p in resumed]
    for a, b in zip(straight, resumed, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert not list((tmp_path / "killed").rglob("*.tmp"))

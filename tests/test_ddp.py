"""Data-parallel carry-on training from the cache: 2 CPU processes (gloo) == 1 process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import recipe_yaml
from safetensors.torch import load_file

from composer.errors import TrainError
from composer.features.cache import write_cache
from composer.model.mixture import CachedMixture
from composer.recipe import load_recipe
from composer.training.build import train_mixture
from composer.training.distributed import Ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    """`compose train ...` on `processes` processes through accelerate's launcher."""
    launcher = [sys.executable, "-m", "composer"]
    if processes > 1:
        launcher = [
            *(
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                str(processes),
            ),
            *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
            *("--main_process_port", str(_free_port()), "-m", "composer"),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [*launcher, "train", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture()
def cached_recipe(tiny, write_recipe):
    """A cached recipe with an aligned base (positions without a state) and batch 4."""
    text = recipe_yaml({"a": tiny["llama"], "o": tiny["other"]}, "a", ["a@1", "a@2", "o@1"])
    path = write_recipe(text)
    write_cache(load_recipe(path))
    return path


def _weights(folder):
    return load_file(str(folder / "carry_on.safetensors"))


def test_two_processes_reach_the_one_process_parameters(cached_recipe, tmp_path):
    _launch(1, str(cached_recipe), "--from-cache", "--out", str(tmp_path / "one"))
    two = _launch(2, str(cached_recipe), "--from-cache", "--out", str(tmp_path / "two"))
    assert "2 processes" in two.stderr
    assert two.stdout.count("trained") == 1  # rank 0 alone reports (and writes)
    one_w, two_w = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    recipe = load_recipe(cached_recipe)
    initial = CachedMixture.from_recipe(recipe).carry_on.state_dict()
    assert one_w.keys() == two_w.keys()
    moved = [n for n in one_w if not torch.equal(one_w[n], initial[n])]
    assert len(moved) > len(one_w) // 2  # training changed the carry-on ...
    # ... and both runs changed it the same way. The all-reduce sums the gradient in another
    # order, and Adam divides by the gradient's own size, so an element whose gradient is at
    # rounding level may take a visibly different step (CI saw 0.5% of one step): each element
    # agrees within a tenth of a step, and all of them together within 0.1% of the movement.
    step = recipe.train.lr
    for name in one_w:
        torch.testing.assert_close(two_w[name], one_w[name], rtol=0, atol=step / 10)
    names = list(one_w)
    apart = torch.cat([(two_w[n] - one_w[n]).flatten() for n in names])
    movement = torch.cat([(one_w[n] - initial[n]).flatten() for n in names])
    assert apart.norm() <= 1e-3 * movement.norm()

    # Resume on 2 processes from the step-2 checkpoint: the same weights, bit for bit. The
    # checkpoint's token count is marked, to see that the run continued from it.
    run = tmp_path / "two"
    tokens = json.loads((run / "metrics.json").read_text())["tokens"]
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "carry_on.safetensors").unlink()
    state = run / "checkpoints" / "step-000002" / "trainer.json"
    trainer = json.loads(state.read_text())
    state.write_text(json.dumps({**trainer, "tokens": trainer["tokens"] + 1_000_000}))
    _launch(2, str(cached_recipe), "--from-cache", "--out", str(run), "--resume")
    assert json.loads((run / "metrics.json").read_text())["tokens"] == tokens + 1_000_000
    resumed = _weights(run)
    assert all(torch.equal(resumed[n], two_w[n]) for n in two_w)


def test_more_processes_than_examples_per_step_is_refused(cached_recipe, tmp_path):
    """Checked before any process group is needed: batch 4 cannot feed 8 processes."""
    from composer.training.train import train

    recipe = load_recipe(cached_recipe)
    with pytest.raises(TrainError, match="smaller than the 8 training processes"):
        train(None, None, None, recipe.train, tmp_path, ranks=Ranks(rank=0, world=8))


def test_live_features_on_several_processes_are_refused(cached_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr("composer.training.build.Ranks.current", lambda: Ranks(rank=0, world=2))
    with pytest.raises(TrainError, match="reads the feature cache"):
        train_mixture(load_recipe(cached_recipe), from_cache=False, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()

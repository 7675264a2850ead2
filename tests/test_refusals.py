"""Bad numbers, bad weights, bad output folders: one line, exit 1, nothing written elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import recipe_yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from composer.model.weights import WEIGHTS

runner = CliRunner()


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture()
def recipe_path(tiny, write_recipe) -> Path:
    return write_recipe(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.inf",
        "train.lr=.nan",
        "train.grad_clip=.inf",
        "carry_on.alpha.init=.nan",
        "carry_on.alpha.init=-.inf",
        "carry_on.rope_theta=.inf",
        "carry_on.mlp_ratio=.inf",
    ],
)
def test_non_finite_numbers_are_refused(recipe_path, override):
    result = runner.invoke(app, ["validate", str(recipe_path), override])
    assert result.exit_code == 1
    field = override.split("=")[0]
    assert f"{field}: Input should be a finite number" in _one_line(result.output)


def test_a_diverging_build_stops_with_one_line_keeping_its_last_checkpoint(recipe_path, tmp_path):
    out = tmp_path / "out"
    args = ["build", str(recipe_path), "--out", str(out), "--steps", "4"]
    settings = ["train.lr=1e30", "train.warmup_steps=0", "train.checkpoint_every=1"]
    result = runner.invoke(app, [*args, *settings, "train.cache.enabled=false"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    line = errors[0]
    assert line.startswith("error: training stopped at step ")
    assert "the loss is nan" in line or "the loss is inf" in line or "not finite" in line
    stopped = int(line.split("step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept[-1:] == ([f"step-{stopped - 1:06d}"] if stopped > 1 else [])
    assert not (out / WEIGHTS).exists() and not (out / "metrics.json").exists()
    if kept:  # the kept checkpoint holds finite weights
        state = load_file(str(out / "checkpoints" / kept[-1] / WEIGHTS))
        assert all(bool(torch.isfinite(v).all()) for v in state.values())


@pytest.mark.parametrize("damage", ["nan", "float64"])
def test_bad_carry_on_weights_are_refused_on_load(tiny_mixture_dir, tmp_path, damage):
    mixture = tmp_path / "mixture"
    shutil.copytree(tiny_mixture_dir, mixture)
    state = load_file(str(mixture / WEIGHTS))
    key = sorted(state)[0]
    if damage == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
        message = f"{key} holds NaN or infinite values"
    else:
        state[key] = state[key].double()
        message = f"{key} is torch.float64, the carry-on expects torch.float32"
    save_file(state, str(mixture / WEIGHTS))
    result = runner.invoke(app, ["generate", str(mixture), "--prompt", "hi"])
    assert result.exit_code == 1
    assert message in _one_line(result.output)


@pytest.mark.parametrize("resume", [False, True])
def test_an_unrelated_folder_is_never_written_into(recipe_path, tmp_path, resume):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "metrics.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["build", str(recipe_path), "--out", str(out), "--steps", "2"]
    result = runner.invoke(app, [*args, *(["--resume"] if resume else [])])
    assert result.exit_code == 1
    assert "is not empty and holds no build" in _one_line(result.output)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "recipe.yaml"]


def test_the_root_folder_is_refused(recipe_path):
    result = runner.invoke(app, ["build", str(recipe_path), "--out", "/", "--resume"])
    assert result.exit_code == 1
    assert "output / is not empty and holds no build" in _one_line(result.output)


def test_a_second_run_to_the_same_output_is_refused_at_once(recipe_path, tmp_path):
    """Another process holds the output's lock, as a running build does."""
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    hold = "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
    hold += "lock.acquire(); print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / ".out.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        for command in ("build", "train"):
            result = runner.invoke(app, [command, str(recipe_path), "--out", str(out)])
            assert result.exit_code == 1
            assert f"output {out} is being written by another run" in _one_line(result.output)
        assert time.monotonic() - began < 30 and not out.exists()
    finally:
        holder.communicate("")


def test_a_build_leaves_no_lock_behind(recipe_path, tmp_path):
    out = tmp_path / "runs" / "out"
    args = ["build", str(recipe_path), "--out", str(out), "--steps", "1", "train.eval_every=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.parent.iterdir()] == ["out"]

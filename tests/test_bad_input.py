"""Bad input through the real CLI: one clear line, exit code 1, nothing left in the output dir."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import recipe_yaml, write_mixture_dir
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.fixture()
def recipe_text(tiny):
    return recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"])


def _one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("edit", "overrides", "message"),
    [
        (
            lambda t: t.replace("bases:\n", "bases:\n  a: {path: /x}\n"),
            [],
            "key 'a' is given twice",
        ),
        (lambda t: t, ["bases.a.bogus=1"], "bases.a.bogus: Extra inputs are not permitted"),
        (lambda t: t, ["train.data.bogus=1"], "train.data.gsm_symbolic.bogus: Extra inputs"),
        (lambda t: t, ["carry_on.blocks.0.bogus=1"], "carry_on.blocks.0.bogus: Extra inputs"),
        (
            lambda t: t,
            ["train.seq_len=4096"],
            "train.seq_len: 4096 exceeds the anchor's context of 512",
        ),
        (lambda t: t, ["train.seq_len=8"], "no examples from gsm_symbolic"),
        (
            lambda t: t,
            ["train.data={kind: text, path: /no/such/file.txt}"],
            "cannot read /no/such/file.txt",
        ),
        (lambda t: t, ["train.batch_size=2000000"], "pass --force to run anyway"),
        (lambda t: t, ["anchor=zz"], "anchor 'zz' is not among the bases (a, b)"),
        (lambda t: t, ["bases.b.path=/no/base"], "base folder /no/base does not exist"),
    ],
)
def test_bad_build_input(recipe_text, write_recipe, tmp_path, edit, overrides, message):
    path = write_recipe(edit(recipe_text))
    out = tmp_path / "out"
    line = _one_line_error(["build", path, "--out", out, *overrides])
    assert message in line, line
    assert not out.exists()


def test_output_that_is_a_file(recipe_text, write_recipe, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    line = _one_line_error(["build", write_recipe(recipe_text), "--out", target])
    assert "exists and is not a directory" in line
    assert target.read_text() == "keep me"


def test_empty_data_file(recipe_text, write_recipe, tmp_path):
    data = tmp_path / "empty.txt"
    data.write_text("\n\n")
    out = tmp_path / "out"
    line = _one_line_error(
        [
            "build",
            write_recipe(recipe_text),
            "--out",
            out,
            f"train.data={{kind: text, path: {data}}}",
        ]
    )
    assert "no examples from text" in line
    assert not out.exists()


def test_empty_preservation_file_names_its_field(recipe_text, write_recipe, tmp_path):
    data = tmp_path / "empty.txt"
    data.write_text("\n\n")
    out = tmp_path / "out"
    line = _one_line_error(
        [
            "build",
            write_recipe(recipe_text),
            "--out",
            out,
            f"train.preserve.data={{kind: text, path: {data}}}",
        ]
    )
    assert "train.preserve.data: no examples from text" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("output='{foo}'", "output: unknown placeholder {foo}: only {name} is filled in"),
        ("output='{0}'", "output: unknown placeholder {0}"),
        ("output='runs/{name'", "output: expected '}' before end of string"),
        ("train.lr=1e38", "train.lr: Input should be less than or equal to"),
    ],
)
def test_bad_output_templates_and_rates_are_refused(recipe_text, write_recipe, override, message):
    line = _one_line_error(["validate", write_recipe(recipe_text), override])
    assert message in line, line


@pytest.mark.parametrize("kind", ["fifo", "device", "nul"])
def test_a_recipe_or_data_path_that_is_no_regular_file_is_refused_at_once(
    recipe_text, write_recipe, tmp_path, kind
):
    if kind == "fifo":
        path = tmp_path / "pipe.yaml"
        os.mkfifo(path)
        path = str(path)
    else:
        path = {"device": "/dev/zero", "nul": "bad\0name.yaml"}[kind]
    if kind != "nul":  # (a NUL byte in an argument is the argument parser's usage error)
        assert "not a regular file" in _one_line_error(["validate", path])  # no blocking read
    out = tmp_path / "out"
    quoted = path.replace("\0", "\\0")  # YAML's double quotes read \0 back as NUL
    data = f'train.data={{kind: text, path: "{quoted}"}}'
    line = _one_line_error(["build", write_recipe(recipe_text), "--out", out, data])
    assert ("NUL byte" if kind == "nul" else "not a regular file") in line, line
    assert not out.exists()
    features = tmp_path / "features"  # this test's feature caches (conftest)
    assert not features.exists() or not any(features.iterdir())


@pytest.fixture()
def full_disk(tmp_path):
    """A 2 MiB tmpfs (root only): a build that writes more than that meets ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("a small tmpfs needs root (mount)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(
    recipe_text, write_recipe, full_disk
):
    (full_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 1024))
    out = full_disk / "out"
    args = ["build", str(write_recipe(recipe_text)), "--out", str(out), "train.steps=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    assert last.startswith("error: ") and "No space left on device" in last, last
    # every file is whole or absent (atomic writes): no temp file is left, and what stays is
    # a build `--resume` recognises (its recipe), not a half-written one
    assert not [p for p in full_disk.rglob("*") if p.name.endswith(".tmp")]
    assert not out.exists() or (out / "recipe.yaml").is_file()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
            "the anchor's chat template ran past 2 s and was stopped",
        ),
        ("{{ ''.__class__.__mro__ }}", "the anchor's chat template failed: access to attribute"),
        ("{{ raise_exception('no system role') }}", "chat template failed: no system role"),
    ],
)
def test_a_hostile_chat_template_is_one_line(tiny, tmp_path, template, message):
    """A template that never ends, that Jinja's sandbox rejects, or that raises."""
    import shutil
    import time

    base = tmp_path / "base"
    shutil.copytree(tiny["llama"], base)
    (base / "chat_template.jinja").write_text(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": base}, "a", ["a@1"]))
    mixture = tmp_path / "mix"
    write_mixture_dir(recipe, mixture)
    began = time.perf_counter()
    line = _one_line_error(["generate", mixture, "--prompt", "hi", "--max-new-tokens", "2"])
    assert message in line, line
    assert time.perf_counter() - began < 30

"""Bad input through the real CLI: one clear line, exit code 1, nothing left in the output dir."""

from __future__ import annotations

import pytest
from conftest import recipe_yaml
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

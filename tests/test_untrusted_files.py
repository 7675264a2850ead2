"""Files from others: base folders, exports, chat templates, cache folders, CLI arguments.

Each test goes through the real CLI or library call with the tiny bases; nothing of the model
is mocked.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import recipe_yaml, write_mixture_dir
from typer.testing import CliRunner

from cli import app
from composer.errors import DataError

SECRET = "hunter2-do-not-ship"


def _invoke(*args: object) -> tuple[int, list[str], str]:
    """Exit code, non-blank output lines, output."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines, result.output


def _mixture(tiny, tmp_path: Path, extra: str = "") -> tuple[Path, dict[str, Path]]:
    """A mixture over private copies of the tiny bases (so a test may plant files in them)."""
    bases = {}
    for name, family in (("a", "llama"), ("b", "qwen2")):
        bases[name] = tmp_path / "bases" / family
        shutil.copytree(tiny[family], bases[name])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(bases, "a", ["a@1", "b@2"]) + extra)
    return write_mixture_dir(recipe, tmp_path / "mix"), bases


# -- 5: a base folder's links and stray files ----------------------------------------------------


def test_export_copies_only_a_base_folders_own_model_files(tiny, tmp_path):
    mix, bases = _mixture(tiny, tmp_path)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "id_rsa").write_text(SECRET)
    (outside / "generation.json").write_text(json.dumps({"secret": SECRET}))
    base = bases["a"]
    (base / "notes.txt").write_text("the author's notes\n")
    (base / "generation_config.json").unlink()  # a model file's name, linked out
    (base / "generation_config.json").symlink_to(outside / "generation.json")
    (base / "stolen").symlink_to(outside / "id_rsa")
    if Path("/proc/self/environ").exists():
        (base / "environ").symlink_to("/proc/self/environ")
    (base / "inner.json").symlink_to(base / "config.json")  # inside, but not a model file
    out = tmp_path / "export"

    code, lines, output = _invoke("export", mix, out, "--include-bases")

    assert code == 0, output
    left_out = [line for line in lines if line.startswith("base 'a': left out of the export")]
    assert len(left_out) == 1, output
    for name in ("notes.txt", "stolen", "inner.json"):
        assert f"{name} (not a file a model loads)" in left_out[0]
    assert "generation_config.json (a link out of the base folder)" in left_out[0]
    if Path("/proc/self/environ").exists():
        assert "environ (not a file a model loads)" in left_out[0]
    assert not any(line.startswith("base 'b'") for line in lines), output
    shipped = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    listed = set(json.loads((out / "export.json").read_text())["files"])
    assert listed == shipped - {"export.json"}
    for rel in shipped:
        assert SECRET.encode() not in (out / rel).read_bytes(), rel
        assert Path(rel).name not in {"notes.txt", "stolen", "environ", "inner.json"}, rel
    assert not (out / "bases" / "a" / "generation_config.json").exists()
    assert (out / "bases" / "a" / "config.json").is_file()
    assert (out / "bases" / "b" / "generation_config.json").is_file()


@pytest.mark.parametrize("name", ["model.safetensors", "extra.bin"])
def test_export_refuses_a_weights_file_that_links_out_of_its_base(tiny, tmp_path, name):
    mix, bases = _mixture(tiny, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    weights = bases["b"] / "model.safetensors"
    shutil.move(weights, outside / "model.safetensors")
    if name == "model.safetensors":
        weights.symlink_to(outside / "model.safetensors")
    else:
        shutil.move(outside / "model.safetensors", weights)
        (outside / SECRET).write_text(SECRET)
        (bases["b"] / name).symlink_to(outside / SECRET)
    out = tmp_path / "export"

    code, lines, output = _invoke("export", mix, out, "--include-bases")

    assert code == 1 and len(lines) == 1, output
    assert f"{name} is a link out of the base folder" in lines[0], output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_export_takes_a_hub_snapshot_whose_links_stay_in_its_repository(tiny, tmp_path):
    """A Hugging Face cache snapshot is a folder of links into `../../blobs/`: its own files."""
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(tiny["llama"].iterdir())):
        shutil.copyfile(path, repo / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": snapshot}, "a", ["a@1"]))
    mix = write_mixture_dir(recipe, tmp_path / "mix")
    out = tmp_path / "export"

    code, _, output = _invoke("export", mix, out, "--include-bases")

    assert code == 0, output
    assert "left out" not in output
    for path in (out / "bases" / "a").iterdir():
        assert path.is_file() and not path.is_symlink()


# -- 6: nothing of the exporting machine in the export -------------------------------------------


def test_an_export_names_no_folder_of_the_exporting_machine(tiny, tmp_path, tmp_path_factory):
    where = tmp_path / "runs"
    extra = f"output: {where}/{{name}}\n"
    mix, _ = _mixture(tiny, tmp_path, extra)
    recipe = (mix / "recipe.yaml").read_text()
    recipe = recipe.replace("  cache:\n", f"  cache:\n    dir: {tmp_path}/cache/{{name}}\n", 1)
    (mix / "recipe.yaml").write_text(recipe)
    assert f"{tmp_path}/cache" in (mix / "recipe.yaml").read_text()
    out = tmp_path / "export"

    code, _, output = _invoke("export", mix, out, "--include-bases")

    assert code == 0, output
    machine = [str(tmp_path_factory.getbasetemp()), str(tmp_path)]
    if Path.home() != Path("/"):
        machine.append(str(Path.home()))
    texts = 0
    for path in out.rglob("*"):
        if path.suffix == ".safetensors" or not path.is_file():
            continue
        text = path.read_text()  # every other file of an export is text
        texts += 1
        for folder in machine:
            assert folder not in text, (path.relative_to(out), folder)
    assert texts >= 8
    sources = json.loads((out / "export.json").read_text())["bases"]
    assert sources["a"]["path"] == "bases/a"
    assert sources["a"]["weights"] and sources["a"]["config_sha256"]


# -- 7: staging folders of killed processes ------------------------------------------------------


def _staging_of(final: Path, *, exits: bool) -> tuple[Path, subprocess.Popen]:
    """A staging folder for `final` made by another process through `staging_dir`, which then
    dies without cleaning up (`exits`) or stays alive."""
    code = (
        "import os, sys, time; from pathlib import Path; "
        "from composer.files import staging_dir; "
        f"d = staging_dir(Path({str(final)!r})); (d / 'big.safetensors').write_bytes(b'x' * 4096); "
        "print(d, flush=True); " + ("os._exit(0)" if exits else "time.sleep(120)")
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    folder = Path(process.stdout.readline().strip())
    if exits:
        process.wait()  # reaped: its pid is no process's
    assert folder.is_dir() and folder.parent == final.parent, folder
    return folder, process


def test_an_export_removes_the_staging_folders_killed_processes_left(tiny_mixture_dir, tmp_path):
    parent = tmp_path / "exports"
    dead, _ = _staging_of(parent / "export", exits=True)
    other, _ = _staging_of(parent / "older-export", exits=True)
    live, process = _staging_of(parent / "export", exits=False)
    mine = parent / ".export.backup"  # a user's own hidden folder
    mine.mkdir()
    try:
        assert f".staging-{process.pid}-" in live.name
        code, _, output = _invoke(
            "export", tiny_mixture_dir, parent / "export", "--include-bases", "--no-verify"
        )
        assert code == 0, output
        assert not dead.exists() and not other.exists()
        assert live.is_dir() and (live / "big.safetensors").is_file()
        assert mine.is_dir()
        assert sorted(p.name for p in parent.iterdir()) == sorted([live.name, mine.name, "export"])
    finally:
        process.kill()
        process.wait()


# -- 8: chat templates that allocate ------------------------------------------------------------


def _tokenizer(tiny, tmp_path: Path, template: str):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny["llama"], base)
    (base / "chat_template.jinja").write_text(template)
    return AutoTokenizer.from_pretrained(base)


def _peak_rss() -> int:
    """This process's peak resident memory, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize(
    "template",
    [
        "{% set p = 'x' * 3000000000 %}{{ p }}",
        "{% set s = ['x' * 1000000] * 4000 %}{{ s | join }}",
        "{{ ('x' * 1000) | center(3000000000) }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
    ],
)
def test_a_chat_template_that_allocates_gigabytes_is_refused(tiny, tmp_path, template):
    from composer.generation.templates import TEMPLATE_BYTES, render_chat

    tokenizer = _tokenizer(tiny, tmp_path, template)
    assert tokenizer.chat_template == template
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert render_chat(tokenizer, [{"role": "user", "content": "hi"}], True) == "hi"  # started
    tokenizer.chat_template = template
    before, began = _peak_rss(), time.perf_counter()
    with pytest.raises(DataError, match="needs more than 512 MiB of memory") as caught:
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], True)
    assert "\n" not in str(caught.value)
    assert time.perf_counter() - began < 10
    assert _peak_rss() - before < 2**30
    psutil = pytest.importorskip("psutil")
    for child in psutil.Process().children():
        status = Path(f"/proc/{child.pid}/status")
        if status.exists():  # the worker's own peak stays within its allowance
            peak = int(status.read_text().split("VmHWM:")[1].split()[0]) * 1024
            assert peak < TEMPLATE_BYTES + 2**30


def test_a_template_renders_as_transformers_renders_it(tiny, tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[S]{{ m['content'] }}"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = _tokenizer(tiny, tmp_path, template)
    from composer.generation.templates import render_chat

    chats = [
        [{"role": "user", "content": 'How many days? ünï "quoted" \\ back'}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " 2 + 2 "},
            {"role": "assistant", "content": "4"},
        ],
    ]
    for messages in chats:
        for prompt in (True, False):
            expected = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert render_chat(tokenizer, messages, prompt) == expected


def test_a_template_that_loops_is_stopped_and_the_next_one_renders(tiny, tmp_path):
    from composer.generation.templates import render_chat

    looping = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
    tokenizer = _tokenizer(tiny, tmp_path, looping)
    with pytest.raises(DataError, match="ran past 2 s and was stopped"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], True)
    tokenizer.chat_template = "{{ messages[0]['content'] }}!"
    assert render_chat(tokenizer, [{"role": "user", "content": "hi"}], True) == "hi!"


def test_generate_refuses_a_template_that_allocates_in_one_line(tiny, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny["llama"], base)
    (base / "chat_template.jinja").write_text("{% set p = 'x' * 3000000000 %}{{ p }}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": base}, "a", ["a@1"]))
    mix = write_mixture_dir(recipe, tmp_path / "mix")
    code, lines, output = _invoke("generate", mix, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 1 and len(lines) == 1, output
    assert lines[0].startswith("error: the anchor's chat template failed: it needs more than")


# -- 12: cache folders ----------------------------------------------------------------------------


def test_a_cache_folder_holding_a_users_files_is_refused_and_left_alone(tiny, tmp_path):
    folder = tmp_path / "my-work"
    folder.mkdir()
    files = {"notes.txt": b"mine\n", ".draft.tmp": b"half a draft", "data.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))

    code, lines, output = _invoke("cache", recipe, f"train.cache.dir={folder}")

    assert code == 1 and len(lines) == 1, output
    assert "holds files compose did not write" in lines[0] and "set train.cache.dir" in lines[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_an_empty_cache_folder_is_used_and_kept(tiny, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": tiny["llama"], "b": tiny["qwen2"]}, "a", ["a@1", "b@2"]))
    code, _, output = _invoke("cache", recipe, f"train.cache.dir={folder}", "train.data.size=8")
    assert code == 0, output
    assert (folder / "manifest.json").is_file()


@pytest.mark.parametrize("value", ["caches/{0}", "caches/{}", "caches/{name.upper}", "c/{name:>9}"])
def test_a_cache_dir_placeholder_is_checked_when_the_recipe_is(tiny, tmp_path, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml({"a": tiny["llama"]}, "a", ["a@1"]))
    code, lines, output = _invoke("validate", recipe, f"train.cache.dir='{value}'")
    assert code == 1 and len(lines) == 1, output
    assert "train.cache.dir" in lines[0] and "unknown placeholder" in lines[0], lines[0]


# -- 13: generate's arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--seed", str(2**64)], "--seed"),
        (["--temperature", "1e-45"], "--temperature"),
    ],
)
def test_generate_checks_its_options_before_loading_anything(tmp_path, args, option):
    began = time.perf_counter()
    # a folder that is no mixture: a check after loading would name the folder instead
    code, lines, output = _invoke("generate", tmp_path / "nothing", "--prompt", "hi", *args)
    assert code in (1, 2) and len(lines) == 1, output
    assert lines[0].startswith(f"error: {option}:"), lines[0]
    assert time.perf_counter() - began < 10


def test_generate_refuses_a_prompt_longer_than_the_context(tiny_mixture_dir):
    prompt = "The quick brown fox jumps over the lazy dog. " * 120  # past 512 positions
    code, lines, output = _invoke("generate", tiny_mixture_dir, "--prompt", prompt)
    assert code == 1 and len(lines) == 1, output
    assert lines[0].startswith("error: --prompt:") and "fill the anchor's context (512" in lines[0]


def test_generate_stops_where_the_context_ends(tiny_mixture_dir):
    from composer.artifacts.load import load_mixture
    from composer.generation.decode import prompt_ids

    mixture = load_mixture(tiny_mixture_dir)
    prompt = "The quick brown fox jumps over the lazy dog. " * 25
    room = 512 - len(prompt_ids(mixture, prompt))
    assert 0 < room < 200
    args = ["generate", str(tiny_mixture_dir), "--prompt", prompt, "--max-new-tokens", "400"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    answer = result.stdout.rstrip("\n")
    assert len(mixture.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= room + 2


def test_the_template_worker_imports_this_composer_from_any_working_directory(tmp_path):
    """The worker runs the caller's `composer`, not one its working directory happens to hold,
    and needs no PYTHONPATH."""
    decoy = tmp_path / "composer"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "from composer.generation.templates import WORKER; "
        "print(WORKER.render({'template': '{{ messages[0].content }}', 'messages': "
        "[{'role': 'user', 'content': 'ok'}], 'add_generation_prompt': False, "
        "'variables': {}}))"
    )
    result = subprocess.run(  # -P: this process itself does not look in its working directory
        [sys.executable, "-P", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "ok", result.stderr[-2000:]

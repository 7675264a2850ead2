"""Untrusted input: fuzzed recipes only ever fail with our own error; nothing is unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer.errors import CheckpointError, ComposeError
from composer.model.carry_on import CarryOn
from composer.model.weights import WEIGHTS, load_weights
from composer.recipe import CarryOnSpec, load_recipe
from composer.training.checkpoint import load_training_state

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8)
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _validate_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except ComposeError as exc:
        assert "\n" not in str(exc)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents)
def test_random_yaml_only_fails_with_our_error(tmp_path, document):
    _validate_text(tmp_path, yaml.safe_dump(document))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_shipped_recipes_only_fail_with_our_error(tmp_path, data):
    recipe = yaml.safe_load(data.draw(st.sampled_from(RECIPES)).read_text())

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from paths(v, (*prefix, i))

    target = data.draw(st.sampled_from(list(paths(recipe))[1:]))
    node = recipe
    for key in target[:-1]:
        node = node[key]
    if data.draw(st.booleans()):
        node[target[-1]] = data.draw(documents)
    else:
        del node[target[-1]]
    _validate_text(tmp_path, yaml.safe_dump(recipe))


def test_random_bytes_only_fail_with_our_error(tmp_path):
    for seed in range(20):
        blob = os.urandom(64 + seed)
        (tmp_path / "fuzz.yaml").write_bytes(blob)
        with pytest.raises(ComposeError):
            load_recipe(tmp_path / "fuzz.yaml")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_bearing_optimizer_state_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = CarryOnSpec(width=16, heads=2, blocks=[{"shortcuts": []}])
    carry_on = CarryOn(spec, {"a@1": 8}, 8)
    checkpoint = tmp_path / "step-000001"
    checkpoint.mkdir()
    from safetensors.torch import save_file

    save_file(carry_on.state_dict(), str(checkpoint / WEIGHTS))
    (checkpoint / "trainer.json").write_text('{"step": 1}')
    with open(checkpoint / "optimizer.pt", "wb") as handle:
        pickle.dump({"state": _Payload()}, handle)
    optimizer = torch.optim.AdamW(carry_on.parameters())
    with pytest.raises(CheckpointError, match="cannot resume from this checkpoint"):
        load_training_state(checkpoint, carry_on, optimizer)
    assert not (tmp_path / "pwned").exists()


def test_pickled_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = CarryOnSpec(width=16, heads=2, blocks=[{"shortcuts": []}])
    carry_on = CarryOn(spec, {"a@1": 8}, 8)
    with open(tmp_path / WEIGHTS, "wb") as handle:
        pickle.dump(_Payload(), handle)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(tmp_path / WEIGHTS, carry_on)
    assert not (tmp_path / "pwned").exists()

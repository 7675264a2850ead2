"""How often one tiny `compose build` crosses between composer's rooms.

Builds a two-base mixture over tiny random bases (tests/conftest.py's makers) and counts, with
`sys.setprofile`, every call whose caller lies in another room of `composer/` than its callee
(subpackages; the top-level modules are one room, `leaf`). Prints the total and each room pair.
Run against another tree by putting it first on PYTHONPATH:

    python bench/room_crossings.py
    PYTHONPATH=/path/to/other/checkout python bench/room_crossings.py
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"

import conftest

import composer

ROOT = Path(composer.__file__).resolve().parent


def room(filename: str) -> str | None:
    try:
        parts = Path(filename).resolve().relative_to(ROOT).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else "leaf"


def main() -> None:
    from composer.recipe import load_recipe
    from composer.training.build import build

    tmp = Path(tempfile.mkdtemp())
    os.environ["COMPOSE_FEATURES_DIR"] = str(tmp / "features")
    conftest.make_tokenizer(tmp / "tok", 400)
    a = conftest.make_base(tmp / "llama", "llama", tmp / "tok", 96, 3)
    b = conftest.make_base(tmp / "qwen2", "qwen2", tmp / "tok", 64, 4)
    (tmp / "r.yaml").write_text(conftest.recipe_yaml({"a": a, "b": b}, "a", ["a@1", "b@2"]))
    recipe = load_recipe(tmp / "r.yaml")
    edges: collections.Counter[tuple[str, str]] = collections.Counter()

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call" or frame.f_back is None:
            return
        callee, caller = room(frame.f_code.co_filename), room(frame.f_back.f_code.co_filename)
        if callee is not None and caller is not None and caller != callee:
            edges[(caller, callee)] += 1

    sys.setprofile(profile)
    build(recipe, out=tmp / "out")
    sys.setprofile(None)
    print(f"composer from {ROOT}")
    print(f"total crossings: {sum(edges.values())}  distinct room pairs: {len(edges)}")
    for (caller, callee), n in edges.most_common():
        print(f"  {caller:>10} -> {callee:<10} {n}")


if __name__ == "__main__":
    main()

"""Every command README.md shows, and what runs it; tests/test_readme.py holds README to this list.

One entry per command line, keyed by the line exactly as README gives it (a trailing `# comment`
cut off). `Run.by` is one of:

- `CI`: .ci/run runs it;
- `FAST`: tests/test_readme.py runs it as written, through the CLI, from the repository root;
- `DEMO`: tests/test_readme.py runs it in README's order, through the CLI, in a scratch folder
  holding a copy of recipes/ (slow: the real SmolLM2-135M base, pulled once);
- `"tests/FILE.py::TEST"`: that test runs it.

`extra` is what a run appends to the line; `differs` says in words everything a run changes from
the line as written (empty only when nothing does). A README command without an entry fails the
test, and so does an entry README no longer shows.
"""

from __future__ import annotations

from dataclasses import dataclass

CI, FAST, DEMO = "ci", "fast", "demo"

# The short demo: the demo recipe for 12 steps of 4 on 48 examples (width 128) instead of 300
# steps of 8 on 1,000; tests/test_real_base.py::test_short_demo_build_beats_the_anchor builds it too.
SHORT_DEMO = (
    "train.data.size=48",
    "train.steps=12",
    "train.batch_size=4",
    "train.eval_every=12",
    "train.warmup_steps=2",
    "carry_on.width=128",
)
SHORT = "the short demo (SHORT_DEMO appended: 12 steps on 48 examples instead of 300 on 1,000)"
BUILT = "runs/demo is the short demo's build, not the full demo's"
SETUP = (
    "python3.11 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' "
    "&& compose build recipes/demo.yaml"
)


@dataclass(frozen=True)
class Run:
    by: str
    differs: str = ""
    extra: tuple[str, ...] = ()


COMMANDS: dict[str, Run] = {
    SETUP: Run(
        CI,
        ".ci/run makes the venv and installs '.[dev]' (quietly, pip upgraded first); the build "
        "runs as `compose build recipes/demo.yaml` below, in its short form",
    ),
    ". .venv/bin/activate && python -m pytest -q": Run(CI),
    "compose bases list": Run(FAST),
    "compose bases pull smollm2-135m-instruct": Run(DEMO),
    "compose validate recipes/demo.yaml": Run(FAST),
    "compose plan recipes/demo.yaml": Run(DEMO),
    "compose build recipes/demo.yaml": Run(DEMO, SHORT, SHORT_DEMO),
    'compose generate runs/demo --prompt "Tom has 3 apples and buys 4 more. How many?"': Run(
        DEMO, BUILT
    ),
    "compose bases list --json": Run(FAST),
    "compose plan recipes/demo.yaml --json": Run(DEMO),
    "compose cache recipes/demo.yaml": Run(DEMO, SHORT, SHORT_DEMO),
    "compose train recipes/demo.yaml --from-cache --out runs/demo-from-cache": Run(
        DEMO, SHORT + ", trained 2 steps (--steps 2)", (*SHORT_DEMO, "--steps", "2")
    ),
    "compose chat runs/demo": Run(
        "tests/test_chat.py::test_chat_in_a_terminal",
        "a tiny mixture instead of runs/demo, with --max-new-tokens 10 --temperature 0.9 "
        "--seed 11; it types messages and /set, /reset",
    ),
    "compose serve runs/demo": Run(
        "tests/test_serve.py::test_compose_serve_listens_on_localhost_only",
        "a tiny mixture instead of runs/demo, on a free --port instead of 8000",
    ),
    "compose serve runs/chat-math runs/chat-code": Run(
        "tests/test_serve_multi.py::test_compose_serve_takes_several_mixture_folders",
        "two tiny mixtures (taps, write) over one tiny Llama instead of runs/chat-math and "
        "runs/chat-code, on a free --port instead of 8000",
    ),
    "compose export runs/demo runs/demo-hf --format hf": Run(
        "tests/test_export_hf.py::test_single_base_export_through_the_cli",
        "a tiny one-base mixture instead of runs/demo, into a tmp folder",
    ),
    "compose answer recipes/gsm8k-carry-on.yaml --out runs/gsm8k-self-answers.jsonl": Run(
        "tests/test_answers.py::test_keeps_the_finished_answers_whose_final_number_is_right",
        "a recipe over a tiny Llama taught four answers, on four local questions, instead of "
        "the 1.5B coder on GSM8K; --max-new-tokens 24 --json",
    ),
    "compose compare runs/demo smollm2-135m-instruct --suite loss-math --limit 20": Run(
        DEMO, BUILT
    ),
    "compose export runs/demo runs/demo-export": Run(DEMO, BUILT),
    "compose port runs/demo --base chat=./smollm2-v2": Run(
        DEMO, BUILT + "; ./smollm2-v2 is a copy of the pulled SmolLM2 folder (an unchanged version)"
    ),
}

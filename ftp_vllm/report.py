"""`ftp-vllm report`: docs/RESULTS.md and docs/retention.png from results/*.json.

No number in RESULTS.md is typed by hand: every table is generated here from the results files
(`ftp-vllm eval` writes them). RESULTS.md is regenerated section by section: each generated
section sits between

    <!-- BEGIN GENERATED: name -->
    <!-- END GENERATED: name -->

markers and is replaced on every run; text outside the markers is kept as written. A section
is produced by a function in `SECTIONS` from all results files; other commands that write
results (the vLLM engine's accuracy, prefill benchmarks) add their rows by writing results
files with their own `kind` and registering a section generator with `register_section`.

Accuracy rows: results of kind "eval". Rows are compared within a group (same task list,
limit and seed); retention is the row's average headline accuracy over the dense row of the
same group and scorer (else any dense row of the group). Headline metric per task: acc_norm
where lm-evaluation-harness reports it as the main number (HellaSwag, ARC, PIQA, OpenBookQA,
SciQ), acc elsewhere (WinoGrande, BoolQ, COPA, MMLU).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEADLINE = {"piqa": "acc_norm", "hellaswag": "acc_norm", "arc_easy": "acc_norm",
            "arc_challenge": "acc_norm", "openbookqa": "acc_norm", "sciq": "acc_norm"}
METHOD_ORDER = ["dense", "window", "ftp", "static", "static-uniform", "random", "shortgpt"]
METHOD_LABEL = {"dense": "dense",
                "window": "window routing (served default: static scores, 128-token windows)",
                "ftp": "FTP (trained router, searched schedule)",
                "static": "static router, searched schedule",
                "static-uniform": "static router, uniform schedule",
                "random": "random routing", "shortgpt": "ShortGPT (layers dropped by BI)"}
# Uniform-guessing accuracy, for results files that do not record it (ARC's choice count varies).
CHANCE = {"piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "copa": 0.5, "hellaswag": 0.25,
          "openbookqa": 0.25, "sciq": 0.25, "mmlu": 0.25}
# FTP targets on SmolLM2 (issue 3): retention at sparsity.
TARGETS = {0.22: 0.98, 0.3: 0.95, 0.4: 0.90}

Section = Callable[[list[dict[str, Any]]], str]
SECTIONS: dict[str, Section] = {}


def register_section(name: str) -> Callable[[Section], Section]:
    """Decorator: `fn(results) -> markdown` fills the section `name` of RESULTS.md."""

    def deco(fn: Section) -> Section:
        SECTIONS[name] = fn
        return fn

    return deco


def headline(task: str) -> str:
    return HEADLINE.get(task, "acc")


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Every results file in `folder` (sorted by name), each with its file name under
    `_file`. Files that are not JSON objects are skipped with a warning."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"report: skipping {path.name}: {exc}")
            continue
        if isinstance(data, dict):
            data["_file"] = path.name
            out.append(data)
    return out


def average_headline(result: dict[str, Any], tasks: list[str]) -> float:
    return sum(result["tasks"][t][headline(t)] for t in tasks) / len(tasks)


def chance_average(result: dict[str, Any], tasks: list[str]) -> float | None:
    """Average accuracy of uniform guessing over `tasks` (None if a task's is unknown)."""
    vals = [result["tasks"][t].get("chance", CHANCE.get(t)) for t in tasks]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def agreement(result: dict[str, Any], base: dict[str, Any], tasks: list[str]) -> float | None:
    """Fraction of items (pooled over tasks) whose headline prediction equals the baseline's:
    a paired measure of how close a configuration stays to the dense model."""
    same = total = 0
    for t in tasks:
        key = "pred_norm" if headline(t) == "acc_norm" else "pred"
        a, b = result["tasks"][t].get(key), base["tasks"][t].get(key)
        if a is None or b is None or len(a) != len(b):
            return None
        same += sum(x == y for x, y in zip(a, b, strict=True))
        total += len(a)
    return same / total if total else None


def _group_key(r: dict[str, Any]) -> tuple:
    return (tuple(r.get("task_list") or list(r["tasks"])), r.get("limit"), r.get("seed", 0))


def _scorer(r: dict[str, Any]) -> str:
    s = r.get("scorer")
    return s.get("scorer", "reference") if isinstance(s, dict) else (s or "reference")


def accuracy_rows(results: list[dict[str, Any]], scorers: set[str] | None = None
                  ) -> list[dict[str, Any]]:
    """Eval results with their group's dense baseline and retention, in table order."""
    evals = [r for r in results if r.get("kind") == "eval"]
    rows = []
    for r in evals:
        if scorers is not None and _scorer(r) not in scorers:
            continue
        key = _group_key(r)
        tasks = list(key[0])
        dense = [d for d in evals if d.get("method") == "dense" and _group_key(d) == key]
        same = [d for d in dense if _scorer(d) == _scorer(r)]
        base = (same or dense or [None])[0]
        avg = average_headline(r, tasks)
        base_avg = average_headline(base, tasks) if base is not None else None
        chance = chance_average(r, tasks)
        above = None
        if base_avg is not None and chance is not None and base_avg - chance > 1e-9:
            above = (avg - chance) / (base_avg - chance)
        rows.append({
            "result": r, "tasks": tasks, "group": key, "avg": avg,
            "retention": avg / base_avg if base_avg else None,
            "retention_above_chance": above,
            "agreement": agreement(r, base, tasks) if base is not None else None,
            "baseline": base["_file"] if base is not None else None,
        })

    def order(row):
        r = row["result"]
        m = r.get("method", "")
        return (row["group"][1] is None, row["group"][1] or 0, row["group"][0],
                _scorer(r), METHOD_ORDER.index(m) if m in METHOD_ORDER else 99,
                r.get("sparsity_target", 0.0), r.get("schedule") or "", r["_file"])

    return sorted(rows, key=order)


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def _method_cell(r: dict[str, Any]) -> str:
    m = r.get("method", "?")
    label = m
    default = {"window": "searched", "ftp": "searched", "static": "searched",
               "random": "uniform"}
    if m in default and r.get("schedule") and r["schedule"] != default[m]:
        label += f" ({r['schedule']} schedule)"
    if r.get("skip_update_rank"):
        label += f" + skip update (rank {r['skip_update_rank']})"
    return label


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables, one per group (task list, limit, seed)."""
    if not rows:
        return "_No results yet: run `ftp-vllm eval` (see above), then `ftp-vllm report`._\n"
    out = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for (tasks, limit, seed), grp in groups.items():
        n = {t: grp[0]["result"]["tasks"][t]["n"] for t in tasks}
        out.append(f"**Tasks** {', '.join(tasks)}; "
                   f"{'all items' if limit is None else f'{limit} items per task'}"
                   f" (subset seed {seed}; items: "
                   + ", ".join(f"{t} {n[t]}" for t in tasks) + ").\n")
        head = ["method", "target S", "sparsity", "FLOPs"]
        head += [f"{t} ({headline(t)})" for t in tasks]
        head += ["avg", "retention", "above chance", "agree", "ppl passage", "ppl word",
                 "command"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|")
        for row in grp:
            r = row["result"]
            lam = r.get("lambada") or {}
            cells = [
                _method_cell(r),
                f"{r.get('sparsity_target', 0.0):.2f}",
                f"{r.get('sparsity', 0.0):.3f}",
                f"{r.get('flop_fraction', 1.0):.3f}",
                *(_pct(r["tasks"][t][headline(t)]) for t in tasks),
                _pct(row["avg"]),
                _pct(row["retention"]),
                _pct(row["retention_above_chance"]),
                _pct(row["agreement"]),
                _ppl(lam.get("perplexity")),
                _ppl(lam.get("word_perplexity")),
                f"`{r.get('command', '')}`",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


@register_section("accuracy")
def accuracy_section(results: list[dict[str, Any]]) -> str:
    rows = accuracy_rows(results, scorers={"reference"})
    return accuracy_table(rows)


@register_section("vllm-accuracy")
def vllm_accuracy_section(results: list[dict[str, Any]]) -> str:
    rows = [r for r in accuracy_rows(results) if _scorer(r["result"]) != "reference"]
    if not rows:
        return ("_No vLLM-engine results yet. A scorer serving prompt logprobs through vLLM "
                "(implementing `ftp_vllm.eval.scoring.Scorer`, `describe()['scorer']` not "
                "\"reference\") writes results files of kind \"eval\"; their rows appear "
                "here, with retention against a dense row of the same scorer when there is "
                "one._\n")
    return accuracy_table(rows)


def _fidelity_key(r: dict[str, Any]) -> tuple:
    p = r.get("prompts") or {}
    return (r.get("model"), r.get("dtype"), tuple(p.get("lengths") or ()), p.get("per_bucket"),
            p.get("seed"), p.get("new_tokens"))


def _fidelity_order(r: dict[str, Any]) -> tuple:
    m = r.get("method", "")
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, r.get("sparsity_target", 0.0),
            r.get("schedule") or "", r["_file"])


def _fidelity_cells(m: dict[str, Any], per_prompt: list[dict[str, Any]] | None = None
                    ) -> list[str]:
    """A row's cells; the KL's bootstrap interval over its prompts when they are recorded."""
    interval = "-"
    if per_prompt:
        from ftp_vllm.eval.fidelity import mean_interval

        lo, hi = mean_interval([float(p["kl"]) for p in per_prompt])
        interval = f"{lo:.3f}-{hi:.3f}"
    return [f"{m['sparsity']:.3f}", f"{m['kl_mean']:.4f}", interval, f"{m['kl_median']:.4f}",
            f"{m['top1_agreement']:.3f}", f"{m['match_mean']:.1f}", f"{m['match_median']:g}",
            f"{m['full_match_rate']:.2f}"]


@register_section("fidelity")
def fidelity_section(results: list[dict[str, Any]]) -> str:
    """Generation fidelity against dense (results of kind "fidelity"), one table per prompt
    set, the group's numeric noise floor first; then the same per prompt-length bucket."""
    rows = [r for r in results if r.get("kind") == "fidelity"]
    if not rows:
        return "_No fidelity results yet: run `ftp-vllm fidelity`, then `ftp-vllm report`._\n"
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=_fidelity_order):
        groups.setdefault(_fidelity_key(r), []).append(r)
    out = []
    for (model, dtype, lengths, per_bucket, seed, new_tokens), grp in groups.items():
        floor = grp[0].get("noise_floor") or {}
        prompts = grp[0].get("prompts") or {}
        n = grp[0]["metrics"]["prompts"]
        out.append(f"**{model}, {dtype}**; {n} held-out prompts ({prompts.get('source', '?')}, "
                   f"chat template): {per_bucket} per length bucket "
                   f"{', '.join(map(str, lengths))} tokens (seed {seed}); greedy continuations "
                   f"of up to {new_tokens} tokens; dense mean "
                   f"{grp[0]['metrics']['dense_tokens_mean']:.1f} tokens.\n")
        head = ["method", "target S", "sparsity", "first-token KL", "KL 90% interval",
                "KL median", "top-1 agree", "match mean", "match median", "full match",
                "command"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|")
        if floor.get("overall"):
            out.append("| " + " | ".join([f"noise floor: dense {floor.get('dtype', '?')}", "-",
                                          *_fidelity_cells(floor["overall"]),
                                          "(recorded with every row)"]) + " |")
        for r in grp:
            out.append("| " + " | ".join([_method_cell(r), f"{r.get('sparsity_target', 0):.2f}",
                                          *_fidelity_cells(r["metrics"], r.get("per_prompt")),
                                          f"`{r.get('command', '')}`"]) + " |")
        out.append("")
        out.append("Per prompt-length bucket (realized sparsity / first-token KL / top-1 "
                   "agreement / mean matching length):\n")
        keys = [str(b) for b in lengths]
        out.append("| method | target S | " + " | ".join(f"~{b} tokens" for b in keys) + " |")
        out.append("|---|---:|" + "|".join(["---:"] * len(keys)) + "|")

        def cell(b: dict[str, Any] | None) -> str:
            if not b:
                return "-"
            return (f"{b['sparsity']:.2f} / {b['kl_mean']:.3f} / {b['top1_agreement']:.2f} / "
                    f"{b['match_mean']:.1f}")

        if floor.get("buckets"):
            out.append("| " + " | ".join([f"noise floor: dense {floor.get('dtype', '?')}", "-",
                                          *(cell(floor["buckets"].get(k)) for k in keys)])
                       + " |")
        for r in grp:
            out.append("| " + " | ".join([_method_cell(r), f"{r.get('sparsity_target', 0):.2f}",
                                          *(cell((r.get("buckets") or {}).get(k))
                                            for k in keys)]) + " |")
        out.append("")
    return "\n".join(out)


@register_section("bench")
def bench_section(results: list[dict[str, Any]]) -> str:
    from ftp_vllm.bench.prefill import markdown_section

    return markdown_section(results)


@register_section("profile")
def profile_section(results: list[dict[str, Any]]) -> str:
    from ftp_vllm.bench.profile import markdown_section

    return markdown_section(results)


@register_section("serve-bench")
def serve_bench_section(results: list[dict[str, Any]]) -> str:
    from ftp_vllm.bench.serve import markdown_section

    return markdown_section(results)


def plot_retention(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Left: accuracy retention vs measured sparsity per method; right: LAMBADA last-word
    perplexity (log scale) vs sparsity. For the largest comparison group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in accuracy_rows(results, scorers={"reference"})
            if r["retention"] is not None]
    if not rows:
        return None
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[r["group"]] = counts.get(r["group"], 0) + 1
    group = max(counts, key=lambda g: (counts[g], g[1] is None, g[1] or 0))
    rows = [r for r in rows if r["group"] == group]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    dense = next((r for r in rows if r["result"].get("method") == "dense"), None)
    dense_ppl = _word_ppl(dense["result"]) if dense else None
    by_method: dict[str, list[tuple[float, float, float | None]]] = {}
    for r in rows:
        if r["result"].get("method") == "dense":
            continue
        label = _method_cell(r["result"])
        by_method.setdefault(label, []).append(
            (r["result"]["sparsity"], r["retention"], _word_ppl(r["result"])))

    def method_key(kv):
        base = kv[0].split()[0]
        return (METHOD_ORDER.index(base) if base in METHOD_ORDER else 99, kv[0])

    markers = "osD^vx*P"
    for i, (label, pts) in enumerate(sorted(by_method.items(), key=method_key)):
        pts.sort()
        base = label.split()[0]
        name = METHOD_LABEL.get(base, label) if label == base else label
        marker = markers[i % len(markers)]
        xs = ([0.0] if dense else []) + [100 * p[0] for p in pts]
        ys = ([100.0] if dense else []) + [100 * p[1] for p in pts]
        line = ax.plot(xs, ys, marker=marker, label=name)[0]
        ppl = [(100 * p[0], p[2]) for p in pts if p[2] is not None]
        if dense_ppl is not None:
            ppl.insert(0, (0.0, dense_ppl))
        if ppl:
            ax2.plot(*zip(*ppl, strict=True), marker=marker, color=line.get_color(), label=name)
    tx = sorted(TARGETS)
    ax.plot([100 * t for t in tx], [100 * TARGETS[t] for t in tx], ls="none", color="k",
            marker="_", ms=16, mew=1.5, label="FTP target (issue 3)")
    ax.axhline(100, color="grey", lw=0.5)
    tasks, limit, _ = group
    xlabel = "measured token sparsity (% of prompt token x block pairs skipped)"
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("retention (% of dense average accuracy)")
    ax.set_title(f"accuracy: {', '.join(tasks)}"
                 f"{'' if limit is None else f' ({limit} items each)'}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if dense_ppl is not None:
        ax2.axhline(dense_ppl, color="grey", lw=0.5)
    ax2.set_yscale("log")
    ax2.set_xlabel(xlabel, fontsize=8)
    ax2.set_ylabel("LAMBADA last-word perplexity (heldout, log)")
    ax2.set_title("perplexity (lower is better; dense at 0)", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    fig.suptitle("SmolLM2-135M-Instruct, reference routed forward", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _word_ppl(result: dict[str, Any]) -> float | None:
    lam = result.get("lambada") or {}
    x = lam.get("word_perplexity")
    return float(x) if x is not None and math.isfinite(float(x)) else None


TEMPLATE = """# Results

Everything below the headings is generated by `ftp-vllm report` from the results files in
`results/` (written by `ftp-vllm eval`); do not edit the numbers by hand. Text outside the
`GENERATED` markers is kept when the report is regenerated.

## Accuracy and retention (reference routed forward)

Zero-shot multiple-choice accuracy by log-likelihood, scored as lm-evaluation-harness scores
it; each choice's context + continuation is one routed prompt. **sparsity** is the measured
fraction of (prompt token, block) pairs skipped over all evaluated prompts; **FLOPs** is the
routed prefill FLOP count over the dense one (a skipped token still pays for its K/V;
ShortGPT's removed blocks pay nothing); **retention** is the average over the dense average of
the same tasks, items and scorer; **above chance** is the same ratio after subtracting the
accuracy of uniform guessing from both (SmolLM2-135M is not far above chance on these tasks,
so plain retention cannot fall much even for a broken model); **agree** is the fraction of
items whose prediction equals the dense model's (paired, so less noisy than accuracy).
Accuracies are in %. Perplexity is measured on heldout
LAMBADA calibration passages, each one routed prompt: **ppl passage** over every passage token
(what prompt logprobs from the engine would give: a token that skips blocks predicts the
next one from a less processed state, and the static router skips the same oldest tokens at
every block), **ppl word** over the final word only (LAMBADA's own metric, read off the end
of the prompt).

Methods (`ftp-vllm eval --method`): **dense** (no routing); **window** (what `ftp-vllm
serve` routes with by default: the shipped window artifact, decisions within aligned
128-token windows, docs/ROUTER.md); **ftp** (the trained MLP router with its searched
per-block schedule, exact routing over whole prompts, from the shipped artifact); **static** (FTP's
training-free router: skips the oldest tokens after the first, searched schedule);
**static-uniform** (the same router, every block at the target); **random** (the static
router's token count per block, chosen at random, uniform schedule); **shortgpt** (the
round(S x L) blocks of lowest Block Influence on calibration text removed, the rest dense).

<!-- BEGIN GENERATED: accuracy -->
<!-- END GENERATED: accuracy -->

![retention and perplexity vs sparsity](retention.png)

## Accuracy through the vLLM engine

<!-- BEGIN GENERATED: vllm-accuracy -->
<!-- END GENERATED: vllm-accuracy -->

## Generation fidelity against dense (reference routed forward)

What a chat user would notice (`ftp-vllm fidelity`): on held-out chat prompts (never
calibration text), the dense model's greedy continuation is the reference and each routed
configuration is measured against it. **first-token KL** is KL(dense || routed) of the
next-token distribution after the prompt (nats, mean over prompts); **KL 90% interval** a
percentile bootstrap interval of that mean over the prompts (2000 resamples, seed 0):
per-prompt KL is heavy-tailed, so another draw of prompts could move the mean that far; **KL
median** the median prompt's; **top-1 agree** the
fraction of prompts whose first generated token equals dense's; **match** the number of
leading greedy tokens equal to dense's (**full match**: fraction of prompts whose whole
continuation matched); **sparsity** the realized fraction of (prompt token, block) pairs
skipped. The noise-floor row is dense in another dtype against the same reference: differences
below it are rounding, not routing.

<!-- BEGIN GENERATED: fidelity -->
<!-- END GENERATED: fidelity -->

## Prefill benchmark (vLLM engine, plain vLLM at its defaults vs routed, alternating rounds)

<!-- BEGIN GENERATED: bench -->
<!-- END GENERATED: bench -->

## Prefill profile (`ftp-vllm bench profile`: where one prefill's time goes)

Milliseconds of one prefill by kind of work (torch profiler, engine in one process;
docs/PERFORMANCE.md explains the split and what it says).

<!-- BEGIN GENERATED: profile -->
<!-- END GENERATED: profile -->

## Serving benchmark (`ftp-vllm serve-bench`: routed vs plain vLLM)

<!-- BEGIN GENERATED: serve-bench -->
<!-- END GENERATED: serve-bench -->
"""

_MARKER = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: "
    r"(?P=name) -->)",
    re.S,
)


def render(document: str, results: list[dict[str, Any]]) -> str:
    """`document` with every registered section between its markers regenerated."""

    def fill(m: re.Match) -> str:
        fn = SECTIONS.get(m["name"])
        if fn is None:
            return m.group(0)
        body = fn(results).rstrip("\n") + "\n"
        return m.group(1) + body + m.group(4)

    return _MARKER.sub(fill, document)


def write_report(results_dir: Path, output: Path, plot: Path | None) -> tuple[Path, Path | None]:
    results = load_results(results_dir)
    document = output.read_text() if output.exists() else TEMPLATE
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(document, results))
    performance = output.parent / "PERFORMANCE.md"  # its tables come from the same results
    if performance.exists():
        performance.write_text(render(performance.read_text(), results))
    png = plot_retention(results, plot) if plot is not None else None
    return output, png


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="regenerate docs/RESULTS.md and docs/retention.png from results/*.json"
    )
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="folder of results files (default results)")
    p.add_argument("--output", type=Path, default=Path("docs/RESULTS.md"))
    p.add_argument("--plot", type=Path, default=Path("docs/retention.png"))
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    out, png = write_report(args.results, args.output, args.plot)
    n = len([r for r in load_results(args.results) if r.get("kind") == "eval"])
    print(f"wrote {out} ({n} eval results)" + (f" and {png}" if png else " (no plot yet)"))
    return 0

"""`ftp-vllm report` from synthetic results files: retention, table rows, markers, plot."""

import argparse
import json

import pytest

from ftp_vllm.eval.command import canonical_command, default_output
from ftp_vllm.report import TEMPLATE, accuracy_rows, load_results, render, write_report

TASKS = ["piqa", "winogrande"]


def _result(method, s, piqa_norm, wino_acc, *, limit=50, scorer="reference", sparsity=None,
            schedule=None, preds="0101010101"):
    return {
        "kind": "eval", "method": method, "sparsity_target": s, "schedule": schedule,
        "scorer": {"scorer": scorer}, "task_list": TASKS, "limit": limit, "seed": 0,
        "tasks": {
            # piqa's headline metric is acc_norm, winogrande's is acc: the other metric is
            # set to a decoy value that would change every number if it were used.
            "piqa": {"n": limit, "acc": 0.01, "acc_norm": piqa_norm, "chance": 0.5,
                     "pred_norm": preds, "pred": "1111111111"},
            "winogrande": {"n": limit, "acc": wino_acc, "acc_norm": 0.99,
                           "pred": "0101010101", "pred_norm": "1111111111"},
        },
        "sparsity": s if sparsity is None else sparsity, "flop_fraction": 1 - 0.8 * s,
        "lambada": {"perplexity": 20.0 + 10 * s},
        "command": f"ftp-vllm eval --method {method} --sparsity {s} --limit {limit}",
    }


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    files = {
        "dense-l50.json": _result("dense", 0.0, 0.70, 0.50),
        "ftp-s0.3-l50.json": _result("ftp", 0.3, 0.66, 0.48, sparsity=0.297,
                                     preds="0101010100"),
        "shortgpt-s0.3-l50.json": _result("shortgpt", 0.3, 0.56, 0.44),
        # Another group: different limit, its own dense baseline.
        "dense-l10.json": _result("dense", 0.0, 0.80, 0.60, limit=10),
        "static-s0.4-l10.json": _result("static", 0.4, 0.40, 0.30, limit=10),
        # A vLLM-engine row: its own section, and retention against the reference dense row.
        "vllm-ftp.json": _result("ftp", 0.3, 0.60, 0.42, scorer="vllm"),
        "bench.json": {"kind": "bench", "speedup": 1.3},
    }
    for name, data in files.items():
        (d / name).write_text(json.dumps(data))
    (d / "broken.json").write_text("{not json")
    return d


def test_retention_is_routed_over_dense_of_the_same_group(results_dir):
    rows = {(r["result"]["_file"]): r for r in accuracy_rows(load_results(results_dir))}
    assert rows["dense-l50.json"]["avg"] == pytest.approx(0.60)
    assert rows["dense-l50.json"]["retention"] == pytest.approx(1.0)
    assert rows["ftp-s0.3-l50.json"]["retention"] == pytest.approx(0.57 / 0.60)
    # Above chance: piqa's chance is recorded (0.5), winogrande's comes from the fallback.
    assert rows["ftp-s0.3-l50.json"]["retention_above_chance"] == pytest.approx(0.07 / 0.10)
    # Agreement pools piqa's acc_norm predictions and winogrande's acc predictions.
    assert rows["ftp-s0.3-l50.json"]["agreement"] == pytest.approx(19 / 20)
    assert rows["shortgpt-s0.3-l50.json"]["retention"] == pytest.approx(0.50 / 0.60)
    assert rows["static-s0.4-l10.json"]["retention"] == pytest.approx(0.35 / 0.70)
    assert rows["static-s0.4-l10.json"]["baseline"] == "dense-l10.json"
    assert rows["vllm-ftp.json"]["retention"] == pytest.approx(0.51 / 0.60)
    assert "bench.json" not in rows


def test_report_writes_table_and_plot(results_dir, tmp_path):
    out, png = tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "retention.png"
    write_report(results_dir, out, png)
    text = out.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = text.splitlines()
    ftp = next(x for x in lines if "`ftp-vllm eval --method ftp --sparsity 0.3 --limit 50`" in x
               and x.startswith("| ftp"))
    cells = [c.strip() for c in ftp.strip("|").split("|")]
    # method, target S, sparsity, FLOPs, piqa, winogrande, avg, retention, above chance,
    # agree, ppl passage, ppl word, command
    assert cells[:12] == ["ftp", "0.30", "0.297", "0.760", "66.0", "48.0", "57.0", "95.0",
                          "70.0", "95.0", "23.00", "-"]
    short = next(x for x in lines if x.startswith("| shortgpt"))
    assert "| 83.3 |" in short
    assert "piqa (acc_norm)" in text and "winogrande (acc)" in text
    # The vLLM row sits in its own section, not in the reference table.
    acc = text.split("<!-- BEGIN GENERATED: accuracy -->")[1].split("<!-- END")[0]
    vllm = text.split("<!-- BEGIN GENERATED: vllm-accuracy -->")[1].split("<!-- END")[0]
    assert acc.count("| ftp |") == 1 and vllm.count("| ftp |") == 1
    assert "42.0" in vllm and "42.0" not in acc


def test_regenerating_keeps_hand_written_text(results_dir, tmp_path):
    doc = TEMPLATE.replace("## Serving benchmark", "A note by hand.\n\n## Serving benchmark")
    doc = doc.replace("<!-- END GENERATED: accuracy -->",
                      "stale row\n<!-- END GENERATED: accuracy -->")
    once = render(doc, load_results(results_dir))
    assert "A note by hand." in once and "stale row" not in once
    assert render(once, load_results(results_dir)) == once  # idempotent


def test_canonical_command_and_default_output():
    args = argparse.Namespace(method="static", sparsity=0.3, router=None, schedule="uniform",
                              engine="reference",
                              tasks="piqa,arc_easy", limit=50, seed=0, ppl_passages=32,
                              calibration_passages=64)
    out = default_output(args)
    assert out.as_posix() == "results/static-s0.3-uniform-l50.json"
    assert canonical_command(args, out) == (
        "ftp-vllm eval --method static --sparsity 0.3 --schedule uniform "
        "--tasks piqa,arc_easy --limit 50 --output results/static-s0.3-uniform-l50.json"
    )


def test_a_method_with_a_skip_update_says_so():
    """Rows of an artifact with a skip update (results carry its rank) are labelled apart
    from the same method without one."""
    from ftp_vllm.report import _method_cell

    base = {"method": "window", "schedule": "searched"}
    assert _method_cell(base) == "window"
    assert _method_cell({**base, "skip_update_rank": 64}) == "window + skip update (rank 64)"

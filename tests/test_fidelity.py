"""Generation fidelity (`ftp-vllm fidelity`): metrics, the oracle's greedy decoding, held-out
prompts, results files and their report section."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ftp_vllm.eval.fidelity import (
    dense_reference,
    first_mismatch,
    kl_divergence,
    mean_interval,
    measure,
    summarize,
)
from ftp_vllm.eval.methods import build_method
from ftp_vllm.reference import greedy_generate
from ftp_vllm.routing.router import StaticRouter
from tests.tiny_models import prepared_default_model, tiny_model

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = tiny_model("llama", seed=5)
    m.eval().requires_grad_(False)
    return m


def _prompts(n: int = 4, length: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 128, (length + 7 * i,), generator=g).tolist() for i in range(n)]


def test_dense_against_itself_is_exact(model):
    for prompt in _prompts():
        ref = dense_reference(model, prompt, NEW_TOKENS)
        # Draft-and-verify yields exactly the oracle's greedy continuation.
        assert ref.continuation == greedy_generate(model, torch.tensor(prompt),
                                                   NEW_TOKENS).tokens
        row = measure(model, ref, bucket=64)
        assert row.kl == 0.0
        assert row.top1
        assert row.match == row.dense_tokens == NEW_TOKENS
        assert row.sparsity == 0.0


def test_draft_resumes_after_a_correction(model):
    """After the reference overrules a draft token, drafting resumes from the corrected
    sequence (the KV cache is cut back, not reused past the correction)."""
    from ftp_vllm.eval.fidelity import _Drafter

    prompt = _prompts(1)[0]
    drafter = _Drafter(model, prompt, None)
    cont = drafter.extend([], NEW_TOKENS)
    assert cont == greedy_generate(model, torch.tensor(prompt), NEW_TOKENS).tokens
    forced = [*cont[:3], (cont[3] + 1) % 128]
    resumed = drafter.extend(forced, NEW_TOKENS)
    assert resumed[:4] == forced and len(resumed) == NEW_TOKENS
    assert resumed[4:] == greedy_generate(model, torch.tensor(prompt + forced),
                                          NEW_TOKENS - 4).tokens


def test_routed_matching_length_equals_greedy_generation(model):
    """The teacher-forced shortcut gives the same matching length as decoding the routed
    model token by token with the oracle, and skipping yields realized sparsity."""
    blocks = torch.full((model.config.num_hidden_layers,), 0.5, dtype=torch.float64)
    matches = []
    for prompt in _prompts(6):
        ref = dense_reference(model, prompt, NEW_TOKENS)
        row = measure(model, ref, 64, StaticRouter(), blocks)
        routed = greedy_generate(model, torch.tensor(prompt), NEW_TOKENS, StaticRouter(),
                                 blocks)
        assert row.match == first_mismatch(routed.tokens, ref.continuation)
        assert row.top1 == (row.match >= 1)
        assert row.sparsity == pytest.approx(routed.sparsity)
        assert abs(row.sparsity - 0.5) < 0.03
        assert row.kl > 0.0
        matches.append(row.match)
    assert min(matches) < NEW_TOKENS  # the comparison is not vacuous


def test_window_method_measures_window_routing(model, tmp_path):
    """--method window (the served configuration): the routed continuation is window
    routing's, token for token as the oracle decodes it, and differs from whole-prompt
    routing with the same router and schedule."""
    from ftp_vllm.artifact import RouterArtifact, model_fingerprint
    from ftp_vllm.routing.schedule import SparsitySchedule

    L = model.config.num_hidden_layers
    fp = model_fingerprint(model.config, model.model.norm.weight)
    sched = SparsitySchedule.uniform([0.5], L)
    RouterArtifact("static", sched, fp, StaticRouter(), window=16).save(tmp_path / "win")
    s = build_method("window", model, 0.5, artifact=tmp_path / "win").scorer
    blocks = sched.blocks(0.5)
    differs = 0
    for prompt in _prompts(4):
        ref = dense_reference(model, prompt, NEW_TOKENS)
        row = measure(s.model, ref, 64, s.router, s.block_sparsity, s.dense_num_layers,
                      s.window)
        routed = greedy_generate(model, torch.tensor(prompt), NEW_TOKENS, StaticRouter(),
                                 blocks, window=16)
        assert row.match == first_mismatch(routed.tokens, ref.continuation)
        assert row.sparsity == pytest.approx(routed.sparsity)
        exact = measure(model, ref, 64, StaticRouter(), blocks)
        differs += exact.kept_token_blocks != row.kept_token_blocks or exact.kl != row.kl
    assert differs > 0  # the window is not ignored


def test_shortgpt_sparsity_counts_removed_blocks(model):
    """Realized sparsity is measured against the dense block count (methods.py's ShortGPT)."""
    calib = [p[:30] for p in _prompts(3)]
    setup = build_method("shortgpt", model, 0.5, calibration=lambda: calib, log=lambda _: None)
    s = setup.scorer
    ref = dense_reference(model, _prompts(1)[0], NEW_TOKENS)
    row = measure(s.model, ref, 64, s.router, s.block_sparsity, s.dense_num_layers)
    assert row.token_blocks == 4 * len(ref.prompt)
    assert row.sparsity == pytest.approx(0.5)


def test_kl_and_aggregates():
    a = torch.tensor([2.0, 0.5, -1.0])
    assert kl_divergence(a, a) == 0.0
    assert kl_divergence(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert kl_divergence(a, torch.tensor([-1.0, 0.5, 2.0])) > 0.1
    from ftp_vllm.eval.fidelity import PromptFidelity

    rows = [PromptFidelity(64, 60, 0.1, True, 32, 32, 30, 60),
            PromptFidelity(64, 60, 0.3, False, 0, 32, 60, 60),
            PromptFidelity(256, 250, 0.2, True, 5, 32, 200, 250)]
    s = summarize(rows)
    o = s["overall"]
    assert o["kl_mean"] == pytest.approx(0.2)
    assert o["top1_agreement"] == pytest.approx(2 / 3)
    assert o["match_mean"] == pytest.approx(37 / 3)
    assert o["match_median"] == 5
    assert o["full_match_rate"] == pytest.approx(1 / 3)
    assert o["sparsity"] == pytest.approx(1 - 290 / 370)  # token-weighted
    assert set(s["buckets"]) == {"64", "256"}
    assert s["buckets"]["64"]["sparsity"] == pytest.approx(0.25)


def test_mean_interval_brackets_the_mean_and_narrows_with_prompts():
    import random

    rng = random.Random(0)
    heavy = [rng.lognormvariate(-1.5, 1.2) for _ in range(24)]  # per-prompt KL is heavy-tailed
    lo, hi = mean_interval(heavy)
    mean = sum(heavy) / len(heavy)
    assert lo < mean < hi
    assert mean_interval(heavy) == (lo, hi)  # seeded: a report is stable
    more = heavy * 16  # the same spread over 16x the prompts
    lo2, hi2 = mean_interval(more)
    assert lo < lo2 < mean < hi2 < hi
    assert mean_interval([0.2] * 5) == (0.2, 0.2)
    with pytest.raises(ValueError):
        mean_interval([])


# ----------------------------------------------------------------- held-out prompts


def _shingles(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def calibration_grams() -> set[tuple[str, ...]]:
    from ftp_vllm.data import lambada_passages

    grams: set[tuple[str, ...]] = set()
    for p in lambada_passages():  # every split: train, tune and heldout are all calibration
        grams |= _shingles(p)
    return grams


def test_heldout_passages_are_not_calibration_text(calibration_grams):
    from ftp_vllm.data import lambada_passages
    from ftp_vllm.eval.heldout import heldout_passages

    passages = heldout_passages()
    assert len(passages) > 2000
    assert not set(passages) & set(lambada_passages())
    for p in passages:
        assert not (_shingles(p) & calibration_grams), p[:80]




def test_prompts_fill_buckets_deterministically_without_calibration_text(calibration_grams):
    from transformers import AutoTokenizer

    from ftp_vllm.data import lambada_passages
    from ftp_vllm.eval.heldout import INSTRUCTION, build_prompts

    tok = AutoTokenizer.from_pretrained(str(prepared_default_model()))
    prompts = build_prompts(tok, [64, 256, 1024], 3, seed=0)
    assert [p.bucket for p in prompts] == [64] * 3 + [256] * 3 + [1024] * 3
    for p in prompts:
        assert 0.85 * p.bucket <= len(p.ids) <= p.bucket
        assert p.text.endswith(INSTRUCTION)
        assert not (_shingles(p.text) & calibration_grams)
        assert all(c not in p.text for c in lambada_passages()[:200])
    assert max(p.passages for p in prompts if p.bucket == 1024) > 1  # several concatenated
    assert build_prompts(tok, [64, 256, 1024], 3, seed=0) == prompts
    # Nested and per-bucket: fewer prompts or other buckets do not change a bucket's prompts.
    assert build_prompts(tok, [256], 2, seed=0) == prompts[3:5]
    assert build_prompts(tok, [256], 2, seed=1) != prompts[3:5]
    with pytest.raises(ValueError, match="no room"):
        build_prompts(tok, [20], 1)


def test_schedule_search_chat_prompts_hold_tune_text_only():
    """`ftp-vllm schedule --chat-lengths`: prompts of the held-out form, from the tune split
    (whole passages, the last one possibly cut after some words), none from held-out text."""
    from transformers import AutoTokenizer

    from ftp_vllm.data.calibration import calibration_passages, split_of
    from ftp_vllm.eval.heldout import INSTRUCTION, heldout_passages
    from ftp_vllm.training.command import fitness_sequences

    tok = AutoTokenizer.from_pretrained(str(prepared_default_model()))
    seqs, data, _, tail = fitness_sequences(tok, 2, 128, [96, 320], seed=0)
    assert len(seqs) == 4 and tail == 1 and "chat template" in data
    tune = calibration_passages("tune")
    held = set(heldout_passages())
    for ids in seqs:
        text = tok.decode(ids)
        body = text.split("<|im_start|>user\n")[-1].split(INSTRUCTION)[0]
        pieces = [x.strip() for x in body.split("\n\n") if x.strip()]
        assert pieces
        for piece in pieces:
            source = [t for t in tune if t.strip().startswith(piece)]
            assert source and split_of(source[0]) == "tune", piece[:80]
            assert piece not in held
    assert all(80 <= len(s) <= 96 for s in seqs[:2])
    assert all(270 <= len(s) <= 320 for s in seqs[2:])


# ------------------------------------------------------- command, results file, report


@pytest.mark.slow
def test_command_writes_results_that_the_report_renders(tmp_path, monkeypatch):
    """`ftp-vllm fidelity` end to end on a tiny random chat model: one results file per
    configuration, and the report's fidelity section shows each row with its command."""
    from ftp_vllm.cli import main
    from ftp_vllm.report import render
    from tests.tiny_models import make_router, make_tiny_chat_model

    model_dir = make_tiny_chat_model(tmp_path / "tiny-chat", prepared_default_model())
    router = make_router(model_dir, tmp_path / "router", kind="mlp")
    monkeypatch.chdir(tmp_path)
    rc = main(["fidelity", "--model", str(model_dir), "--router", str(router),
               "--method", "dense", "ftp", "random", "--sparsity", "0.3",
               "--prompts", "1", "--lengths", "64", "128", "--new-tokens", "4",
               "--dtype", "float32",  # the tiny model is saved in float32 (its fingerprint)
               "--no-progress"])
    assert rc == 0
    files = sorted((tmp_path / "results").glob("fidelity-*.json"))
    assert [f.name for f in files] == ["fidelity-dense-p1-L64-128-float32.json",
                                       "fidelity-ftp-s0.3-p1-L64-128-float32.json",
                                       "fidelity-random-s0.3-p1-L64-128-float32.json"]
    results = []
    for f in files:
        r = json.loads(f.read_text())
        r["_file"] = f.name
        results.append(r)
        assert r["kind"] == "fidelity"
        assert r["command"].startswith(f"ftp-vllm fidelity --method {r['method']}")
        assert r["command"].endswith(f"--json results/{f.name}")
        assert set(r["buckets"]) == {"64", "128"}
        assert r["noise_floor"]["dtype"] == "bfloat16"
        assert r["prompts"]["source"] == "boolq validation passages"
    dense, ftp, rnd = results
    assert dense["metrics"]["kl_mean"] == 0.0 and dense["metrics"]["top1_agreement"] == 1.0
    assert dense["metrics"]["match_mean"] == dense["metrics"]["dense_tokens_mean"]
    assert ftp["sparsity"] > 0 and rnd["sparsity"] > 0.2
    assert ftp["router_artifact"]["kind"] == "mlp"

    doc = ("# R\n<!-- BEGIN GENERATED: fidelity -->\nold\n<!-- END GENERATED: fidelity -->\n"
           "<!-- BEGIN GENERATED: other -->\nkept\n<!-- END GENERATED: other -->\n")
    out = render(doc, results)
    assert "old" not in out and "kept" in out
    assert "noise floor: dense bfloat16" in out
    for r in results:
        m = r["metrics"]
        assert f"`{r['command']}`" in out
        lo, hi = mean_interval([p["kl"] for p in r["per_prompt"]])
        assert f"{m['sparsity']:.3f} | {m['kl_mean']:.4f} | {lo:.3f}-{hi:.3f} | " \
               f"{m['kl_median']:.4f} | {m['top1_agreement']:.3f} | {m['match_mean']:.1f}" in out

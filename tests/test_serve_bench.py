"""`ftp-vllm serve-bench`: workloads, round order and statistics (fast), and one end-to-end
smoke with a tiny chat model: every server and every workload, one round (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftp_vllm.bench import serve_stats as st
from ftp_vllm.bench.workloads import (
    DEFAULT_WORKLOADS,
    Conversation,
    build_conversations,
    client_args,
    parse_workload,
    scaled,
    seed_for,
)

ROOT = Path(__file__).resolve().parents[1]


def _tokenizer():
    from ftp_vllm.model import default_model_dir, is_prepared

    path = default_model_dir()
    if not is_prepared(path):
        pytest.skip("the default model is not prepared (`ftp-vllm model prepare`): its "
                    "tokenizer is needed")
    pytest.importorskip("vllm")
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(path))


def _samples(w, seed, tokenizer) -> list[list[int]]:
    """The prompts `vllm bench serve` sends for this workload, as the server tokenizes them."""
    from vllm.benchmarks.datasets.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    args = p.parse_args(["--model", "m", *client_args(w, seed)])
    return [tokenizer.encode(r.prompt, add_special_tokens=False)
            for r in get_samples(args, tokenizer)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------ workloads
def test_default_workloads_have_the_issue_sizes():
    ws = {n: parse_workload(n) for n in DEFAULT_WORKLOADS}
    assert (ws["random-1024"].num_prompts, ws["random-1024"].input_len) == (8, 1024)
    assert (ws["random-2048"].num_prompts, ws["random-2048"].input_len) == (4, 2048)
    sp = ws["shared-prefix"]
    assert (sp.num_prompts, sp.prefix_len, sp.input_len) == (16, 768, 256)
    mt = ws["multi-turn"]
    assert (mt.num_prompts, mt.turns) == (4, 4) and mt.system_len and mt.user_len
    assert all(w.output_len == 16 for w in ws.values())
    assert parse_workload("random-96", num_prompts=3).num_prompts == 3
    small = scaled(sp, 0.0625)
    assert (small.prefix_len, small.input_len, small.num_prompts) == (48, 16, 16)
    with pytest.raises(ValueError, match="unknown workload 'chat'.*multi-turn"):
        parse_workload("chat")
    with pytest.raises(ValueError, match="no dataset"):
        client_args(mt, 0)


def test_shared_prefix_prompts_share_their_first_768_tokens():
    """What vLLM's client really sends (its `random` dataset with --random-prefix-len),
    tokenized as the server does: 16 prompts, one 768-token prefix, then their own tokens."""
    tok = _tokenizer()
    w = parse_workload("shared-prefix")
    ids = _samples(w, seed_for(0, 0, 2), tok)
    assert len(ids) == 16 and all(len(x) == 1024 for x in ids)
    assert all(x[:768] == ids[0][:768] for x in ids)
    own = {tuple(x[768:]) for x in ids}
    assert len(own) == 16  # and each prompt continues with tokens of its own
    assert max(_common_prefix(x, ids[0]) for x in ids[1:]) < 768 + 16


def test_random_prompts_are_fresh_per_round_and_workload():
    """A repeated prompt would hit vLLM's prefix cache: rounds and workloads never repeat one
    (not even a 16-token block at the start)."""
    tok = _tokenizer()
    w1, w2 = scaled(parse_workload("random-1024"), 0.25), scaled(parse_workload("random-2048"),
                                                                 0.25)
    r0 = _samples(w1, seed_for(0, 0, 0), tok)
    r1 = _samples(w1, seed_for(0, 1, 0), tok)
    other = _samples(w2, seed_for(0, 0, 1), tok)
    assert [len(x) for x in r0] == [256] * 8 and [len(x) for x in other] == [512] * 4
    assert r0 == _samples(w1, seed_for(0, 0, 0), tok)  # same round: same prompts everywhere
    for a in r0:
        for b in r1 + other + [x for x in r0 if x is not a]:
            assert _common_prefix(a, b) < 16


def test_multi_turn_resends_the_whole_conversation():
    conv = Conversation("SYS", ("u0", "u1", "u2"))
    assert conv.messages([]) == [{"role": "system", "content": "SYS"},
                                 {"role": "user", "content": "u0"}]
    m = conv.messages(["a0", "a1"])
    assert m == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "u0"},
                 {"role": "assistant", "content": "a0"}, {"role": "user", "content": "u1"},
                 {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    for t in range(3):  # each turn's messages start with the previous turn's, whole
        prev = conv.messages(["a0", "a1"][:t - 1]) if t else []
        assert conv.messages(["a0", "a1"][:t])[:len(prev)] == prev
    with pytest.raises(ValueError, match="turn 3 of a 3-turn"):
        conv.messages(["a0", "a1", "a2"])


def test_multi_turn_conversations_share_the_system_prompt():
    tok = _tokenizer()
    w = parse_workload("multi-turn")
    convs = build_conversations(w, tok, seed=1)
    assert len(convs) == 4 and len({c.system for c in convs}) == 1
    assert all(len(c.users) == 4 for c in convs)
    assert len({u for c in convs for u in c.users}) == 16
    n_sys = len(tok.encode(convs[0].system, add_special_tokens=False))
    n_user = len(tok.encode(convs[0].users[0], add_special_tokens=False))
    assert abs(n_sys - 256) <= 2 and abs(n_user - 128) <= 2, (n_sys, n_user)
    assert build_conversations(w, tok, seed=1) == convs
    assert build_conversations(w, tok, seed=2)[0].system != convs[0].system


# ------------------------------------------------------------------- servers, execution mode
CONFIG_LINE = (
    "(EngineCore pid=1) INFO 11-30 13:21:26 [core.py:133] Initializing a V1 LLM engine "
    "(v0.32.0) with config: model='m', speculative_config=None, dtype=torch.bfloat16, "
    "quantization=None, enforce_eager={eager}, kv_cache_dtype=auto, seed=0, "
    "served_model_name=m, enable_prefix_caching={pc}, enable_chunked_prefill={pc}, "
    "pooler_config=None, compilation_config={{'mode': <CompilationMode.{mode}: 2>, "
    "'debug_dump_path': None}}")


def test_same_mode_flags_follow_the_routed_engine():
    from ftp_vllm.bench.serve import engine_execution, same_mode_flags

    eager = engine_execution("noise\n" + CONFIG_LINE.format(eager=True, pc=False, mode="NONE"))
    assert eager == {"enforce_eager": True, "enable_prefix_caching": False,
                     "enable_chunked_prefill": False, "compilation_mode": "NONE"}
    assert same_mode_flags(eager) == ["--enforce-eager"]
    compiled = engine_execution(CONFIG_LINE.format(eager=False, pc=True,
                                                   mode="DYNAMO_TRACE_ONCE"))
    assert compiled["compilation_mode"] == "DYNAMO_TRACE_ONCE"
    # a compiling routed engine still runs its routed prefill steps eager
    assert same_mode_flags(compiled) == ["--enforce-eager"]
    assert engine_execution("no engine here") is None
    with pytest.raises(RuntimeError, match="enforce_eager"):
        same_mode_flags({"enforce_eager": None})


def test_servers_routed_first_vanilla_plain():
    from ftp_vllm.bench.serve import build_parser, plan_servers

    opts = build_parser().parse_args(["--server-arg=--max-num-seqs=8"])
    servers = plan_servers([st.VANILLA_DEFAULT, st.VANILLA_SAME_MODE, st.ROUTED, st.DENSE],
                           "M", opts)
    assert [s.name for s in servers] == [st.ROUTED, st.VANILLA_SAME_MODE, st.VANILLA_DEFAULT]
    routed, same, default = servers
    assert routed.args == ["M", "--max-num-seqs=8"]  # ftp-vllm serve's own defaults
    assert routed.modes == [st.ROUTED, st.DENSE]
    assert default.args == ["M", "--max-num-seqs=8", "--no-routing"]
    assert same.base_args == default.args  # its flags come from the routed engine
    opts = build_parser().parse_args(["--sparsity", "0.4", "--router", "R"])
    assert plan_servers([st.ROUTED], "M", opts)[0].args == ["M", "--sparsity", "0.4",
                                                            "--router", "R"]


# --------------------------------------------------------------------------- statistics
def test_round_orders_rotate():
    orders = st.round_orders(["r", "s", "d"], 3)
    assert orders == [["r", "s", "d"], ["s", "d", "r"], ["d", "r", "s"]]
    for pos in range(3):  # every server once in every position
        assert sorted(o[pos] for o in orders) == ["d", "r", "s"]
    assert st.round_orders(["r", "s"], 4) == [["r", "s"], ["s", "r"], ["r", "s"], ["s", "r"]]
    assert st.round_orders(["r"], 0) == [["r"]]


def _run(mode, rnd, tput, ttft, wl="random-1024", **kw):
    return {"mode": mode, "round": rnd, "workload": wl, "total_token_throughput": tput,
            "median_ttft_ms": ttft, "failed": 0, "sparsity": 0.3 if mode == "routed" else None,
            **kw}


def _three_rounds():
    runs = []
    for rnd, (vd, vs, ro) in enumerate([(600, 400, 500), (660, 420, 520), (630, 380, 470)]):
        runs += [_run("vanilla-default", rnd, vd, 9000 + rnd * 100,
                      prefix_cache={"hit_rate": 0.0}),
                 _run("vanilla-same-mode", rnd, vs, 16000),
                 _run("routed", rnd, ro, 12000 - rnd * 1000,
                      routing={"token_sparsity": 0.30 + rnd / 100})]
    return runs


def test_summarize_medians_spread_and_ratios():
    s = st.summarize(_three_rounds())["random-1024"]
    ro = s["modes"]["routed"]
    assert ro["rounds"] == 3
    assert ro["total_token_throughput"] == {"median": 500, "min": 470, "max": 520, "n": 3}
    assert ro["median_ttft_ms"]["median"] == 11000
    assert ro["token_sparsity"]["median"] == pytest.approx(0.31)
    assert s["modes"]["vanilla-default"]["prefix_cache_hit_rate"]["median"] == 0.0
    assert s["modes"]["vanilla-default"]["token_sparsity"] is None
    vd = s["ratios"]["vanilla-default"]
    assert vd["throughput"]["ratio"] == pytest.approx(500 / 630)  # ratio of medians
    assert vd["throughput"]["round_min"] == pytest.approx(470 / 630)  # per-round ratios
    assert vd["throughput"]["round_max"] == pytest.approx(500 / 600)
    assert vd["ttft"]["ratio"] == pytest.approx(9100 / 11000)  # vanilla / routed: >1 faster
    same = s["ratios"]["vanilla-same-mode"]
    assert same["throughput"]["ratio"] == pytest.approx(500 / 400)
    assert same["ttft"]["ratio"] == pytest.approx(16000 / 11000)
    # a run with failed requests does not enter the statistics
    runs = _three_rounds() + [_run("routed", 3, 9999, 1, failed=2)]
    assert st.summarize(runs)["random-1024"]["modes"]["routed"]["rounds"] == 3


def test_markdown_shows_both_baselines_per_workload():
    runs = _three_rounds() + [_run("routed", 0, 300, 2000, wl="multi-turn"),
                              _run("vanilla-default", 0, 600, 1000, wl="multi-turn",
                                   prefix_cache={"hit_rate": 0.5})]
    record = {"kind": st.KIND, "format": st.FORMAT, "created": "2026", "vllm": "0.32.0",
              "command": "ftp-vllm serve-bench", "model": "m", "router": "r (mlp)",
              "target": 0.3, "rounds": 3, "hardware": {"machine": "x86_64", "cpus": 2},
              "servers": {"vanilla-same-mode": {"flags": ["--enforce-eager"]},
                          "routed": {"execution": {"enforce_eager": True}}},
              "workloads": {"random-1024": {"description": "8 random prompts"}},
              "runs": runs, "summary": st.summarize(runs)}
    md = st.markdown_section([{"kind": "eval"}, record])
    assert "`ftp-vllm serve-bench`" in md and "`--enforce-eager`" in md
    assert "against three servers started one at a time" in md
    assert ("| random-1024: 8 random prompts | tok/s | 630 (600-660) | 400 (380-420) | "
            "500 (470-520) | 0.79x (0.75-0.83) | 1.25x (1.24-1.25) | 0.310 | 0% / - |") in md
    assert ("| | median TTFT s | 9.10 (9.00-9.20) | 16.00 (16.00-16.00) | "
            "11.00 (10.00-12.00) |") in md
    assert "| multi-turn | tok/s | 600 | - | 300 | 0.50x | - | - | 50% / - |" in md
    assert "| routed | 0 | 0.3 | random-1024 | 500.0 |" in md
    assert st.markdown_section([]).startswith("_No serving benchmark yet")


def test_markdown_shows_the_newest_record_of_each_target():
    """A `--sparsity 0` run (the plugin's cost when nothing routes) is shown next to the
    served default's, not instead of it; an older run of the same target is not shown."""
    def record(target, created, routed_tps):
        runs = [_run("vanilla-default", 0, 600, 9000),
                _run("routed", 0, routed_tps, 9000, routing={"token_sparsity": target})]
        return {"kind": st.KIND, "format": st.FORMAT, "created": created, "target": target,
                "command": f"ftp-vllm serve-bench --sparsity {target}", "rounds": 1,
                "servers": {}, "workloads": {}, "runs": runs, "summary": st.summarize(runs)}

    old, zero, new = record(0.3, "2026-01", 700), record(0.0, "2026-03", 597), \
        record(0.3, "2026-02", 720)
    assert st.latest_per_target([zero, old, {"kind": "eval"}, new]) == [new, zero]
    md = st.markdown_section([zero, old, new])
    assert md.index("--sparsity 0.3`") < md.index("--sparsity 0.0`")
    assert "| 1.20x |" in md and "| 1.00x |" in md and "| 1.17x |" not in md
    assert "against two servers started one at a time" in md
    # a --dtype run of the same target is its own record, after the model's own dtype
    fp32 = {**record(0.0, "2026-04", 610),
            "command": "ftp-vllm serve-bench --sparsity 0 --dtype float32"}
    assert st.latest_per_target([zero, old, fp32, new]) == [new, zero, fp32]
    md = st.markdown_section([zero, old, fp32, new])
    assert md.index("--sparsity 0.0`") < md.index("--dtype float32`")
    assert "in float32, router" in md and "in its own dtype, router" in md


# ------------------------------------------------------------------------ end to end (slow)
@pytest.mark.slow
@pytest.mark.vllm
def test_serve_bench_every_server_and_workload_end_to_end(tmp_path):
    """`ftp-vllm serve-bench` on a tiny chat model (the default model's tokenizer and chat
    template), all servers (dense included) and all workloads, one round, token lengths / 4:
    every server x workload has positive throughput and TTFT, the routed runs route, the
    same-mode baseline runs what the routed engine runs, multi-turn resends its history, and
    vanilla's and the (window-)routed server's prefix caches are hit where prompts share a
    prefix."""
    pytest.importorskip("vllm")
    from tests.tiny_models import make_router, make_tiny_chat_model

    _tokenizer()  # skips when the default model (its tokenizer) is not prepared
    from ftp_vllm.model import default_model_dir

    work = tmp_path
    model = make_tiny_chat_model(work / "tiny-chat", default_model_dir())
    # window routing, as `ftp-vllm serve` routes by default: prefix caching stays on
    router = make_router(model, work / "router", kind="mlp", targets=(0.2, 0.4), window=32)
    out = work / "serve_bench.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    r = subprocess.run(
        [sys.executable, "-m", "ftp_vllm.cli", "serve-bench", "--model", str(model),
         "--router", str(router), "--scale", "0.25", "--rounds", "1", "--servers", "routed",
         "vanilla-same-mode", "vanilla-default", "dense", "--max-model-len", "1024",
         "--dtype", "float32", "--out", str(out), "--log-dir", str(work / "logs"),
         # the tiny model's prefill is too small for routing to pay, so the default
         # break-even rule would serve these short prompts dense: route every prompt here,
         # this test is about the benchmark's mechanics (tests/test_e2e_default.py covers it)
         "--server-arg=--route-min-tokens=0"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["kind"] == "serve-bench" and data["format"] == st.FORMAT and data["complete"]
    assert sorted(p.name for p in (work / "logs").iterdir()) == [
        "routed-round0.log", "vanilla-default-round0.log", "vanilla-same-mode-round0.log"]
    # the routed engine compiles (its routing steps leave vLLM's graph): vanilla eager is the
    # same-mode baseline anyway
    assert data["servers"]["routed"]["execution"]["enforce_eager"] is False
    assert data["servers"]["vanilla-same-mode"]["flags"] == ["--enforce-eager"]
    assert data["servers"]["vanilla-same-mode"]["args"][-2:] == ["--no-routing",
                                                                 "--enforce-eager"]
    assert data["orders"] == [["routed", "vanilla-same-mode", "vanilla-default"]]
    assert data["target"] == 0.3
    runs = {(x["mode"], x["workload"]): x for x in data["runs"]}
    assert len(runs) == len(data["runs"]) == 4 * 4
    for mode in st.MODES:
        for wl in DEFAULT_WORKLOADS:
            x = runs[(mode, wl)]
            assert x["failed"] == 0 and x["completed"] > 0, (mode, wl, x)
            assert x["total_token_throughput"] > 0 and x["median_ttft_ms"] > 0, (mode, wl)
            s = data["summary"][wl]["modes"][mode]
            assert s["total_token_throughput"]["median"] > 0
    for wl in DEFAULT_WORKLOADS:
        assert runs[("routed", wl)]["routing"]["token_sparsity"] > 0.1
        assert runs[("dense", wl)]["routing"]["routed_prefill_tokens"] == 0
        ratios = data["summary"][wl]["ratios"]
        assert ratios["vanilla-default"]["throughput"]["ratio"] > 0
        assert ratios["vanilla-same-mode"]["ttft"]["ratio"] > 0
    assert runs[("routed", "random-1024")]["completed"] == 8
    assert runs[("vanilla-default", "random-2048")]["completed"] == 4
    assert runs[("vanilla-default", "shared-prefix")]["completed"] == 16
    assert runs[("vanilla-default", "multi-turn")]["completed"] == 16  # 4 chats x 4 turns
    turns = runs[("vanilla-default", "multi-turn")]["per_turn_prompt_tokens"]
    assert all(b > a + 32 for a, b in zip(turns, turns[1:], strict=False)), turns  # history resent
    routed_exe = data["servers"]["routed"]["execution"]
    assert routed_exe["enable_prefix_caching"] and routed_exe["enable_chunked_prefill"]
    for wl in ("shared-prefix", "multi-turn"):
        assert runs[("vanilla-default", wl)]["prefix_cache"]["hit_rate"] > 0, wl
        assert runs[("routed", wl)]["prefix_cache"]["hit_rate"] > 0, wl  # window routing
    assert runs[("vanilla-default", "random-1024")]["prefix_cache"]["hit_rate"] == 0
    md = out.with_suffix(".md").read_text()
    assert "| shared-prefix: 16 prompts sharing a 192-token prefix" in md
    assert str(work) not in md

"""Server pieces without an engine: routing settings, the sparsity check, the metrics poller,
the docs of every metric, the CLI wiring. The running server is tested in test_e2e_server.py."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ftp_vllm.server import settings as S
from ftp_vllm.server.metrics import (
    MAX_RECENT,
    METRICS,
    SELF_BENCH_PREFIX,
    FTPMetrics,
    StatsPoller,
    engine_snapshots,
    engine_stats_rpc,
    merge_totals,
    response_id,
)
from ftp_vllm.server.validation import (
    SparsityValidationMiddleware,
    check_request_sparsity,
    find_error,
)

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = dict(model_type="llama", num_hidden_layers=4, hidden_size=128,
                   intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=256, norm_sha256="0" * 64)


@pytest.fixture
def artifact(tmp_path):
    from tests.tiny_models import make_artifact

    return make_artifact(tmp_path / "router", FINGERPRINT, kind="static", targets=(0.2, 0.4))


# --------------------------------------------------------------------- settings
def test_router_flag_and_sparsity(artifact):
    routing, ov = S.resolve_routing(model_given=True, router=str(artifact), sparsity=0.25,
                                    hf_overrides={"rope_theta": 5.0}, env={})
    assert routing.enabled and routing.sparsity == 0.25 and routing.max_sparsity == 0.4
    assert ov["architectures"] == ["FTPLlamaForCausalLM"] and ov["ftp_sparsity"] == 0.25
    assert ov["rope_theta"] == 5.0 and Path(ov["ftp_router"]) == artifact.resolve()


def test_env_router_and_sparsity(artifact):
    env = {S.ENV_ROUTER: str(artifact), S.ENV_SPARSITY: "0.1"}
    routing, ov = S.resolve_routing(model_given=True, env=env)
    assert routing.source == S.ENV_ROUTER and routing.sparsity == 0.1
    # the flag beats the environment
    routing, _ = S.resolve_routing(model_given=True, sparsity=0.35, env=env)
    assert routing.sparsity == 0.35


@pytest.mark.parametrize("bad", [0.5, -0.1, 1.0, "x"])
def test_bad_server_sparsity_is_refused(artifact, bad):
    with pytest.raises(ValueError, match="sparsity"):
        if isinstance(bad, str):
            S.resolve_routing(model_given=True, router=str(artifact),
                              env={S.ENV_SPARSITY: bad})
        else:
            S.resolve_routing(model_given=True, router=str(artifact), sparsity=bad, env={})


def test_default_sparsity_capped_to_the_artifact(tmp_path):
    from tests.tiny_models import make_artifact

    art = make_artifact(tmp_path / "low", FINGERPRINT, kind="static", targets=(0.1, 0.2))
    routing, ov = S.resolve_routing(model_given=True, router=str(art), env={})
    assert routing.sparsity == 0.2 and ov["ftp_sparsity"] == 0.2
    assert any("capped" in n for n in routing.notes)


def test_default_model_uses_shipped_then_static_then_dense(tmp_path, monkeypatch, artifact):
    import shutil

    monkeypatch.setattr(S, "artifacts_dir", lambda: tmp_path / "artifacts")
    routing, ov = S.resolve_routing(model_given=False, env={})
    assert not routing.enabled and ov is None
    assert "DENSE" in routing.notes[0] and S.ENV_ROUTER in routing.notes[0]
    shutil.copytree(artifact, tmp_path / "artifacts" / S.STATIC_ARTIFACT)
    routing, _ = S.resolve_routing(model_given=False, env={})
    assert routing.enabled and routing.router.name == S.STATIC_ARTIFACT
    assert "static" in routing.notes[0]
    shutil.copytree(artifact, tmp_path / "artifacts" / S.SHIPPED_ARTIFACT)
    routing, _ = S.resolve_routing(model_given=False, env={})
    assert routing.router.name == S.SHIPPED_ARTIFACT and not routing.notes
    assert routing.sparsity == S.DEFAULT_SPARSITY
    # a model of the caller's own gets no default router
    routing, _ = S.resolve_routing(model_given=True, env={})
    assert not routing.enabled


def test_no_routing_and_user_overrides(artifact):
    routing, ov = S.resolve_routing(model_given=True, no_routing=True,
                                    env={S.ENV_ROUTER: str(artifact)})
    assert not routing.enabled and ov is None
    with pytest.raises(ValueError, match="--no-routing"):
        S.resolve_routing(model_given=True, no_routing=True, sparsity=0.2, env={})
    user = {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": str(artifact),
            "ftp_sparsity": 0.2}
    routing, ov = S.resolve_routing(model_given=True, hf_overrides=user, env={})
    assert routing.enabled and routing.sparsity == 0.2 and ov == user
    with pytest.raises(ValueError, match="--hf-overrides"):
        S.resolve_routing(model_given=True, hf_overrides=user, router=str(artifact), env={})


def test_corrupt_artifact_names_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "router.json").write_text("{not json")
    with pytest.raises(ValueError, match="router.json.*corrupt"):
        S.resolve_routing(model_given=True, router=str(tmp_path / "bad"), env={})


# --------------------------------------------------------------------- validation
@pytest.mark.parametrize("value,ok", [
    (0, True), (0.0, True), (0.4, True), (0.2, True), (None, True),
    (0.41, False), (-0.01, False), (1, False), (float("nan"), False), (float("inf"), False),
    (True, False), ("0.2", False), ([0.2], False), ({"a": 1}, False),
])
def test_check_request_sparsity(value, ok):
    assert (check_request_sparsity(value, 0.4, True) is None) == ok


def test_routing_off_accepts_only_dense():
    assert check_request_sparsity(0, 0.0, False) is None
    assert "without FTP routing" in check_request_sparsity(0.2, 0.0, False)


def test_find_error_ignores_what_is_not_ours():
    assert find_error(b"{not json", 0.4, True) is None  # vLLM answers malformed JSON
    assert find_error(b'["ftp_sparsity"]', 0.4, True) is None
    assert find_error(b'{"prompt": "ftp_sparsity"}', 0.4, True) is None
    assert find_error(b'{"vllm_xargs": {"ftp_sparsity": 0.3}}', 0.4, True) is None
    assert "outside [0, 0.4]" in find_error(b'{"vllm_xargs": {"ftp_sparsity": 0.9}}', 0.4, True)


def _asgi_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        return JSONResponse({"echo": (await request.body()).decode()})

    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST", "GET"])])
    return SparsityValidationMiddleware(app, get_limits=lambda: (0.4, True))


def test_middleware_refuses_bad_values_and_replays_good_bodies():
    from starlette.testclient import TestClient

    client = TestClient(_asgi_app())
    good = json.dumps({"prompt": "x" * 10000, "vllm_xargs": {"ftp_sparsity": 0.3}})
    r = client.post("/v1/completions", content=good)
    assert r.status_code == 200 and r.json()["echo"] == good
    r = client.post("/v1/completions", content=b"{broken")
    assert r.status_code == 200 and r.json()["echo"] == "{broken"  # passed on to vLLM
    for bad in (0.5, -1, "0.2", True):
        r = client.post("/v1/completions", json={"prompt": "x", "vllm_xargs": {
            "ftp_sparsity": bad}})
        assert r.status_code == 400, bad
        err = r.json()["error"]
        assert err["code"] == 400 and err["param"] == "vllm_xargs.ftp_sparsity"
        assert "ftp_sparsity" in err["message"]
    assert client.get("/v1/completions").status_code == 200


def test_middleware_streams_chunked_bodies():
    """A body in several ASGI messages is reassembled, checked, and replayed whole."""
    seen = {}

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = SparsityValidationMiddleware(app, get_limits=lambda: (0.4, True))
    payload = json.dumps({"vllm_xargs": {"ftp_sparsity": 0.1}, "p": "y" * 5000}).encode()
    parts = [payload[i:i + 1000] for i in range(0, len(payload), 1000)]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(m):
        sent.append(m)

    asyncio.run(mw({"type": "http", "method": "POST", "path": "/v1/completions"},
                   receive, send))
    assert seen["body"] == payload and sent[0]["status"] == 200


# --------------------------------------------------------------------- metrics
def snap(tokens, skipped, kept, requests=()):
    return {"routed_tokens": tokens, "skipped_per_layer": skipped, "kept_per_layer": kept,
            "requests": list(requests)}


def rec(rid, n, sparsity, speedup, skipped=(0, 0)):
    """A per-request record as the plugin writes it (2 layers: `skipped` pairs per layer)."""
    return {"request_id": rid, "prompt_tokens": n, "target_sparsity": 0.3,
            "token_sparsity": sparsity, "flop_speedup": speedup,
            "skipped_per_layer": list(skipped), "kept_per_layer": [n - k for k in skipped]}


def value(registry, name, **labels):
    v = registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


def test_poller_turns_totals_into_counters_and_records_into_histograms():
    reg = CollectorRegistry()
    m = FTPMetrics(2, registry=reg)
    calls = []
    snaps = [
        snap(10, [1, 2], [9, 8]),  # baseline (start-up warm-up and self-benchmark)
        snap(110, [21, 32], [89, 78], [rec("cmpl-a-0-0123abcd", 60, 0.25, 1.3, (10, 20)),
                                       rec("chatcmpl-b-89abcdef", 40, 0.25, 1.3, (10, 10))]),
        # a self-benchmark request in between: its pairs stay out of the counters
        snap(150, [31, 32], [119, 118], [rec(f"{SELF_BENCH_PREFIX}x", 40, 0.125, 1.1, (10, 0))]),
        snap(5, [1, 1], [4, 4], [rec("cmpl-c-0-00000000", 5, 0.2, 1.2, (1, 1))]),  # restarted
    ]

    async def rpc(method, timeout=None, kwargs=None):
        calls.append((method, kwargs))
        return [snaps.pop(0), None]

    async def go():
        p = StatsPoller(rpc, m)
        await p.poll(count=False)
        await p.poll()
        await p.poll()
        await p.poll()
        return p

    p = asyncio.run(go())
    assert calls[0] == ("ftp_routing_stats", {"drain_requests": True})
    # 100 + (40 - 40 self-benchmark tokens) + 5 after the restart
    assert value(reg, "ftp_prefill_tokens_total") == 105
    assert value(reg, "ftp_skipped_token_blocks_total", layer="0") == 20 + 0 + 1
    assert value(reg, "ftp_computed_token_blocks_total", layer="1") == 70 + 0 + 4
    assert value(reg, "ftp_request_token_sparsity_count") == 3  # self-benchmark left out
    assert value(reg, "ftp_request_flop_speedup_sum") == pytest.approx(1.3 + 1.3 + 1.2)
    assert value(reg, "ftp_request_token_sparsity_bucket", le="0.25") == 3
    assert set(p.recent) == {"cmpl-a", "chatcmpl-b", "cmpl-c"}


def test_poller_survives_engine_errors():
    reg = CollectorRegistry()
    m = FTPMetrics(1, registry=reg)

    async def rpc(*a, **k):
        raise RuntimeError("engine dead")

    async def go():
        p = StatsPoller(rpc, m)
        await p.refresh(1.0)
        return p

    p = asyncio.run(go())
    assert p.errors == 1 and value(reg, "ftp_stats_poll_errors_total") == 1


# Data parallel: one API server, several engine cores, each with its own counts and records.
def worker_payload(tokens, kept, skipped, dense, routed, requests=()):
    """One worker's answer, built by the plugin's own RoutingStats.snapshot."""
    import numpy as np

    from ftp_vllm.flops import BlockShape
    from ftp_vllm.plugin.stats import RoutingStats

    stats = RoutingStats(len(kept), BlockShape(hidden=128, intermediate=256, num_heads=4,
                                               num_kv_heads=2, head_dim=32))
    stats.routed_tokens = tokens
    stats.routed_requests = len(requests)
    stats.kept = np.array(kept, dtype=np.int64)
    stats.skipped = np.array(skipped, dtype=np.int64)
    stats.dense_flops, stats.routed_flops = float(dense), float(routed)
    stats.requests.extend(requests)
    return stats.snapshot(drain_requests=True)


def test_engine_snapshots_reads_one_worker_per_engine():
    a, b = {"routed_tokens": 1}, {"routed_tokens": 2}
    # per engine: its tensor-parallel ranks (same numbers), rank 0 read once
    assert engine_snapshots([[a, dict(a)], [b, dict(b)]]) == [a, b]
    assert engine_snapshots([[None, a], []]) == [a, None]
    # a plain collective_rpc answer: the workers of one engine
    assert engine_snapshots([a, None]) == [a] and engine_snapshots([None]) == [None]
    assert engine_snapshots(None) == [None]


def test_merge_totals_sums_engines():
    e0 = worker_payload(100, [80, 70], [20, 30], 1000.0, 800.0)
    e1 = worker_payload(50, [40, 45], [10, 5], 600.0, 400.0)
    total = merge_totals([e0, None, e1])
    assert total["engines"] == 2 and "requests" not in total
    assert total["routed_tokens"] == 150 and total["kept_per_layer"] == [120, 115]
    assert total["skipped_per_layer"] == [30, 35] and total["skipped_pairs"] == 65
    assert total["flop_speedup"] == pytest.approx(1600 / 1200)
    assert merge_totals([None]) is None


def test_poller_counts_every_data_parallel_engine():
    """Two engines, two TP ranks each: counters are the sum over engines (each against its
    own baseline, one engine restarting), every engine's requests are found by id."""
    reg = CollectorRegistry()
    m = FTPMetrics(2, registry=reg)
    r = [rec(f"cmpl-{i}-0-0123abcd", 10, 0.25, 1.3) for i in range(4)]
    polls = [
        # baseline
        [worker_payload(10, [5, 5], [5, 5], 1, 1), worker_payload(20, [10, 10], [10, 10], 1, 1)],
        [worker_payload(30, [15, 15], [15, 15], 2, 1, r[:2]),
         worker_payload(40, [20, 20], [20, 20], 2, 1, r[2:3])],
        # engine 0 restarted (its totals fell): its whole snapshot counts
        [worker_payload(10, [6, 6], [4, 4], 1, 1, r[3:]),
         worker_payload(40, [20, 20], [20, 20], 2, 1)],
    ]

    async def call_all(utility, method, timeout, args, kwargs):
        assert (utility, method, kwargs) == ("collective_rpc", "ftp_routing_stats",
                                             {"drain_requests": True})
        return [[snap, dict(snap)] for snap in polls.pop(0)]  # TP ranks: same numbers

    class Client:  # the AsyncLLM surface engine_stats_rpc reads
        engine_core = type("Core", (), {"call_utility_all_async": staticmethod(call_all)})()

    async def go():
        p = StatsPoller(engine_stats_rpc(Client()), m)
        await p.poll(count=False)
        await p.poll()
        await p.poll()
        return p

    p = asyncio.run(go())
    assert value(reg, "ftp_prefill_tokens_total") == (20 + 20) + 10  # not engine 0 alone
    assert value(reg, "ftp_skipped_token_blocks_total", layer="0") == (10 + 10) + 4
    assert value(reg, "ftp_computed_token_blocks_total", layer="1") == (10 + 10) + 6
    assert value(reg, "ftp_request_token_sparsity_count") == 4  # TP duplicates read once
    assert set(p.recent) == {f"cmpl-{i}" for i in range(4)}
    assert p.last["engines"] == 2 and p.last["routed_tokens"] == 10 + 40


def test_prompt_logprobs_dense_counter_once_per_request_summed_over_engines():
    """The worker counts a request served dense for prompt logprobs once (a preempted one
    that comes back again is not recounted; one that set ftp_sparsity is not counted); the
    poller sums the engines' increments, each against its own baseline."""
    from ftp_vllm.flops import BlockShape
    from ftp_vllm.plugin.stats import RoutingStats

    engines = [RoutingStats(2, BlockShape(hidden=128, intermediate=256, num_heads=4,
                                          num_kv_heads=2, head_dim=32)) for _ in range(2)]
    engines[0].count_prompt_logprobs_dense("old", None)  # before the baseline
    reg = CollectorRegistry()
    m = FTPMetrics(2, registry=reg)

    async def call_all(utility, method, timeout, args, kwargs):
        return [[e.snapshot(drain_requests=True)] for e in engines]

    class Client:
        engine_core = type("Core", (), {"call_utility_all_async": staticmethod(call_all)})()

    async def go():
        p = StatsPoller(engine_stats_rpc(Client()), m)
        await p.poll(count=False)
        for rid, extra in [("a", None), ("a", None), ("b", {}), ("c", {"ftp_sparsity": 0.2}),
                           ("d", {"ftp_sparsity": None})]:
            engines[0].count_prompt_logprobs_dense(rid, extra)
        engines[1].count_prompt_logprobs_dense("e", {"other": 1})
        await p.poll()
        return p

    p = asyncio.run(go())
    assert engines[0].prompt_logprobs_dense_requests == 3  # old, a, b
    assert value(reg, "ftp_prompt_logprobs_dense_requests_total") == 2 + 1
    assert p.last["prompt_logprobs_dense_requests"] == 4


def test_engine_stats_rpc_without_several_engines():
    """A client without call_utility_all_async (one engine): its collective_rpc, wrapped."""
    seen = []

    class Client:
        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            seen.append((method, timeout, kwargs))
            return [{"routed_tokens": 3}, None]

    out = asyncio.run(engine_stats_rpc(Client())("m", timeout=5.0, kwargs={"k": 1}))
    assert out == [[{"routed_tokens": 3}, None]] and seen == [("m", 5.0, {"k": 1})]


def _routes_client(recent, tmp_path):
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from ftp_vllm.artifact import load_artifact
    from ftp_vllm.plugin.settings import RoutingSettings
    from ftp_vllm.server.routes import add_routes
    from tests.tiny_models import make_artifact

    static_artifact = load_artifact(make_artifact(tmp_path / "r", FINGERPRINT, targets=(0.4,)))

    class Poller:
        last, last_per_engine = {"routed_tokens": 1, "engines": 1}, {0: {"routed_tokens": 1}}

        def __init__(self):
            self.recent = recent

        async def refresh(self, max_wait):
            pass

    class FTP:
        routing = S.Routing(RoutingSettings(Path("r"), 0.3, static_artifact), source="test")
        poller, last_bench, args = Poller(), None, None
        dense_below, break_even = None, {}

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    add_routes(app, FTP())
    return TestClient(app)


def test_request_lookup_says_not_on_this_replica(tmp_path):
    import socket

    client = _routes_client({"cmpl-a": [rec("cmpl-a-0-0123abcd", 5, 0.2, 1.2)]}, tmp_path)
    host = socket.gethostname()
    r = client.get("/ftp/requests/cmpl-a")
    assert r.status_code == 200 and r.json()["records"][0]["prompt_tokens"] == 5
    r = client.get("/ftp/requests/cmpl-elsewhere")
    assert r.status_code == 404
    msg = r.json()["error"]["message"]
    assert f"not on this replica ({host})" in msg and f"last {MAX_RECENT} routed" in msg
    assert "X-FTP-Replica" in msg and "unknown" not in msg
    # every response names the replica, /v1 included
    assert client.get("/v1/models").headers["x-ftp-replica"] == host
    assert r.headers["x-ftp-replica"] == host
    stats = client.get("/ftp/stats").json()
    assert stats["replica"] == host and stats["engines"] == [{"routed_tokens": 1}]


def test_response_ids():
    assert response_id("cmpl-abc-0-1a2b3c4d") == "cmpl-abc"
    assert response_id("cmpl-abc-12-1a2b3c4d") == "cmpl-abc"
    assert response_id("chatcmpl-xyz-1a2b3c4d") == "chatcmpl-xyz"
    assert response_id("myid") == "myid" and response_id(None) is None


def test_every_metric_is_exposed_with_its_type():
    reg = CollectorRegistry()
    FTPMetrics(3, registry=reg)
    text = generate_latest(reg).decode()
    for name, (kind, _labels, _) in METRICS.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert re.search(rf"^# TYPE {base}(_total)? {kind}$", text, re.M), name
    assert 'ftp_skipped_token_blocks_total{layer="2"} 0.0' in text
    assert "ftp_measured_prefill_speedup 0.0" in text


def test_deploy_contract_metrics_are_all_served():
    """The names the alerts, dashboard and docs/OPERATIONS.md use (tests/test_deploy.py)."""
    text = (ROOT / "tests" / "test_deploy.py").read_text()
    block = text.split("FTP_METRICS = {", 1)[-1].split("}", 1)[0]
    contract = dict(re.findall(r'"(ftp_[a-z_]+)": "(counter|gauge|histogram)"', block))
    assert contract, "no ftp_ metric contract found in tests/test_deploy.py"
    for name, kind in contract.items():
        assert METRICS.get(name, (None,))[0] == kind, name


def test_metrics_doc_documents_every_metric():
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    for name, (kind, labels, _) in METRICS.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"docs/METRICS.md has no table row for {name}"
        assert f"| {kind} |" in row, (name, row)
        for label in labels:
            assert f"`{label}`" in row, (name, label)


# --------------------------------------------------------------------- CLI, bench report
def test_cli_lists_serve_without_importing_vllm():
    import subprocess
    import sys

    code = ("import sys; from ftp_vllm.cli import build_parser; p = build_parser(); "
            "a = p.parse_args(['serve', '--port', '9', '-h']); "
            "assert a.argv == ['--port', '9', '-h'], a.argv; "
            "a = p.parse_args(['serve-bench', '--url', 'u']); assert a.argv == ['--url', 'u']; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_bench_markdown_section_reads_old_records():
    """Records written before serve-bench compared with plain vLLM (no "format": one routed
    server, dense vs routed requests) still render, marked as superseded; the new format's
    statistics are tested in tests/test_serve_bench.py."""
    from ftp_vllm.bench.serve import markdown_section

    runs = [{"mode": "dense", "sparsity": 0.0, "request_throughput": 2.0,
             "total_token_throughput": 100.0, "median_ttft_ms": 300.0, "p99_ttft_ms": 400.0,
             "median_tpot_ms": 20.0, "mean_e2el_ms": 600.0, "failed": 0, "routing": {}},
            {"mode": "routed", "sparsity": 0.3, "request_throughput": 2.5,
             "total_token_throughput": 125.0, "median_ttft_ms": 200.0, "p99_ttft_ms": 300.0,
             "median_tpot_ms": 20.0, "mean_e2el_ms": 500.0, "failed": 0,
             "routing": {"token_sparsity": 0.31, "mean_request_flop_speedup": 1.4}}]
    record = {"kind": "serve-bench", "created": "x", "vllm": "0.32.0",
              "workload": {"num_prompts": 4, "input_len": 64, "output_len": 8,
                           "request_rate": "inf", "max_concurrency": None},
              "hardware": {"machine": "x86_64", "cpus": 2}, "server": {"model": "m"},
              "runs": runs, "summary": {"median_ttft_speedup": 1.5,
                                        "request_throughput_ratio": 1.25}}
    md = markdown_section([{"kind": "eval"}, record])
    assert md.startswith("_Old-format record") and "superseded" in md
    assert "| routed | 0 | 0.3 | 0.310 | 2.50 | 125.0 |" in md
    assert "median TTFT 1.50x" in md
    assert "No serving benchmark" in markdown_section([])


@pytest.mark.slow
@pytest.mark.vllm
def test_serve_arguments_reach_vllm(tmp_path, artifact, monkeypatch):
    """vLLM's serve parser + the FTP flags: routing lands in --hf-overrides, every other flag
    passes through, routing off leaves vLLM's own default."""
    pytest.importorskip("vllm")
    from ftp_vllm.server.app import prepare_args

    monkeypatch.delenv(S.ENV_ROUTER, raising=False)
    monkeypatch.delenv(S.ENV_SPARSITY, raising=False)
    model = tmp_path / "m"
    args, routing = prepare_args([str(model), "--router", str(artifact), "--sparsity", "0.2",
                                  "--port", "8123", "--max-model-len", "512",
                                  "--hf-overrides", '{"rope_theta": 5.0}'])
    assert args.model == str(model) and args.port == 8123 and args.max_model_len == 512
    assert args.hf_overrides["architectures"] == ["FTPLlamaForCausalLM"]
    assert args.hf_overrides["ftp_sparsity"] == 0.2 and args.hf_overrides["rope_theta"] == 5.0
    args, routing = prepare_args(["--model", str(model), "--no-routing"])
    assert not routing.enabled and args.hf_overrides == {}
    args, routing = prepare_args([str(model)])  # a model of the caller's: no default router
    assert not routing.enabled and args.hf_overrides == {}
    with pytest.raises(ValueError, match="sparsity"):
        prepare_args([str(model), "--router", str(artifact), "--sparsity", "0.9"])


def test_served_model_id_is_the_folder_name_unless_given(tmp_path, monkeypatch):
    """Clients see a local model as `SmolLM2-135M-Instruct`, not as this machine's path."""
    pytest.importorskip("vllm")
    from ftp_vllm.server.app import prepare_args

    monkeypatch.delenv(S.ENV_ROUTER, raising=False)
    model = tmp_path / "models" / "Tiny-Model"
    model.mkdir(parents=True)
    args, _ = prepare_args([str(model), "--no-routing"])
    assert args.served_model_name == ["Tiny-Model"] and args.model == str(model)
    args, _ = prepare_args([str(model), "--no-routing", "--served-model-name", "a", "b"])
    assert args.served_model_name == ["a", "b"]
    args, _ = prepare_args(["org/not-a-local-folder", "--no-routing"])  # a hub id: vLLM's own
    assert not args.served_model_name


def test_serve_refuses_what_routing_cannot_serve_before_the_engine_starts(tmp_path, artifact,
                                                                           monkeypatch):
    """The plugin's refusal table, applied to the command line: one clear error per flag
    (no engine start, no traceback); routing off leaves the flags to vLLM."""
    pytest.importorskip("vllm")
    from ftp_vllm.server.app import prepare_args

    monkeypatch.delenv(S.ENV_ROUTER, raising=False)
    model = tmp_path / "m"
    with pytest.raises(S.ServeConfigError, match="pipeline-parallel-size") as info:
        prepare_args([str(model), "--router", str(artifact), "--pipeline-parallel-size", "2",
                      "--kv-cache-dtype", "fp8"])
    assert "kv-cache-dtype" in str(info.value)
    args, routing = prepare_args([str(model), "--no-routing", "--pipeline-parallel-size", "2"])
    assert not routing.enabled and args.pipeline_parallel_size == 2


# ------------------------------------------------------------------ route only where it pays
@pytest.mark.parametrize("speedups,want", [
    ({64: 0.9, 128: 1.02, 256: 1.1, 512: 1.2}, 128),  # pays from 128 on
    ({64: 1.05, 128: 0.98, 256: 1.1, 512: 1.2}, 256),  # a dip: only from the last dip on
    ({64: 1.1, 128: 1.2}, 64),  # pays everywhere measured: shorter prompts stay dense
    ({64: 0.8, 128: 0.9, 256: 0.95}, 256),  # never paid: the longest measured length
    ({}, 0),  # not measured: every prompt routed
])
def test_threshold_from_speedups(speedups, want):
    from ftp_vllm.server.route_threshold import threshold_from_speedups

    assert threshold_from_speedups(speedups) == want


def test_route_min_tokens_flag_values():
    import argparse

    from ftp_vllm.server.route_threshold import parse_min_tokens

    assert parse_min_tokens("auto") == "auto" and parse_min_tokens("0") == 0
    assert parse_min_tokens("300") == 300
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            parse_min_tokens(bad)


def test_dense_below_marks_only_short_implicit_requests():
    """Short prompts without a target get an explicit 0 (a copy of extra_args: children of an
    n>1 request share it); explicit targets, prompt-logprob requests and long prompts are
    left alone; the engine client's add_request_async sees the rewritten request."""
    from types import SimpleNamespace

    from vllm import SamplingParams

    from ftp_vllm.server.route_threshold import DenseBelow

    counted = []
    rule = DenseBelow(100, on_dense=lambda: counted.append(1))

    def request(n, **kw):
        return SimpleNamespace(prompt_token_ids=list(range(n)),
                               sampling_params=SamplingParams(max_tokens=1, **kw))

    shared = {"other": 1}
    short = request(99, extra_args=shared)
    long = request(100)
    explicit = request(10, extra_args={"ftp_sparsity": 0.3})
    logprobs = request(10, prompt_logprobs=0)
    seen = []

    async def add_request_async(req):
        seen.append(req)

    core = SimpleNamespace(add_request_async=add_request_async)
    rule.install(SimpleNamespace(engine_core=core))
    for r in (short, long, explicit, logprobs):
        asyncio.run(core.add_request_async(r))
    assert seen == [short, long, explicit, logprobs]
    assert short.sampling_params.extra_args == {"other": 1, "ftp_sparsity": 0.0}
    assert shared == {"other": 1}
    assert long.sampling_params.extra_args is None
    assert explicit.sampling_params.extra_args == {"ftp_sparsity": 0.3}
    assert logprobs.sampling_params.extra_args is None
    assert counted == [1]

"""Data parallel serving: one API server driving two engine cores (``--data-parallel-size 2``).

Each engine keeps its own routing counts and request records. vLLM's
``AsyncLLM.collective_rpc`` runs the stats call on both engines but answers engine 0's result
only, so reading through it would undercount the ``ftp_`` counters by about half and lose the
other engine's records (``/ftp/requests/<id>`` 404). This test serves a tiny routed model with
two engines on the CPU and checks that the metrics and the id lookup cover both.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from ftp_vllm.server.client import http_json, metric_sum, metric_value, scrape
from ftp_vllm.server.process import ServerProcess
from tests.tiny_models import make_router, make_tiny_chat_model, prepared_default_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REQUESTS = 12




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("ftp-dp")
    model = make_tiny_chat_model(work / "tiny", prepared_default_model())
    router = make_router(model, work / "router", kind="mlp", targets=(0.2, 0.4))
    srv = ServerProcess(
        [str(model), "--router", str(router), "--sparsity", "0.3", "--dtype", "float32",
         "--max-model-len", "512", "--served-model-name", "tiny", "--no-self-benchmark",
         "--data-parallel-size", "2", "--stats-interval", "0.5"],
        work / "server.log")
    srv.start(timeout=900)
    yield srv
    srv.stop()
    print(srv.tail(20))


def test_metrics_and_records_cover_both_engines(server):
    def complete(i: int) -> tuple[str, int]:
        status, body = http_json(f"{server.url}/v1/completions", {
            "model": "tiny", "prompt": f"Request {i}: " + "the quick brown fox " * (3 + i),
            "max_tokens": 2, "temperature": 0})
        assert status == 200, body
        return body["id"], body["usage"]["prompt_tokens"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        done = list(pool.map(complete, range(REQUESTS), timeout=600))

    status, stats = http_json(f"{server.url}/ftp/stats")
    assert status == 200, stats
    engines = stats["engines"]
    assert len(engines) == 2, stats
    assert all(e["routed_requests"] > 0 for e in engines), engines  # both engines served
    assert stats["totals"]["engines"] == 2
    assert stats["totals"]["routed_requests"] == REQUESTS
    assert stats["totals"]["routed_tokens"] == sum(e["routed_tokens"] for e in engines)

    text = scrape(server.url)
    assert metric_value(text, "ftp_prefill_tokens_total") == sum(n for _, n in done)
    assert metric_value(text, "ftp_request_token_sparsity_count") == REQUESTS
    assert metric_sum(text, "ftp_skipped_token_blocks_total") == sum(
        sum(e["skipped_per_layer"]) for e in engines)

    for rid, n in done:  # every request found, whichever engine ran it
        status, body = http_json(f"{server.url}/ftp/requests/{rid}")
        assert status == 200, (rid, body)
        assert body["records"][0]["prompt_tokens"] == n

"""`ftp-vllm serve` with no model argument: the prepared SmolLM2-135M-Instruct and the shipped
router (window routing, with vLLM's chunked prefill and prefix caching on; or, with a clear
message, its static fallback or dense serving when the build has none), on 127.0.0.1.
Passed: a free port and a short self-benchmark (the default one runs in
tests/test_e2e_main_job.py); vLLM's default max_model_len and no KV-cache size, so the
server sizes its KV cache itself, as for a user."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ftp_vllm.artifact import load_artifact  # noqa: E402
from ftp_vllm.plugin.memory import ENV_KV_SPACE  # noqa: E402
from ftp_vllm.server.client import http_json, metric_sum, metric_value, scrape  # noqa: E402
from ftp_vllm.server.process import ServerProcess  # noqa: E402
from ftp_vllm.server.settings import DEFAULT_SPARSITY, shipped_router  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def server():
    from ftp_vllm.model import default_model_dir, is_prepared

    if not is_prepared(default_model_dir()):
        pytest.skip("the default model is not prepared (`ftp-vllm model prepare`)")
    work = Path(tempfile.mkdtemp(prefix="ftp-e2e-default-"))
    env = {"FTP_VLLM_ROUTER": "", "FTP_VLLM_SPARSITY": ""}  # the defaults, whatever is set
    srv = ServerProcess(["--self-benchmark-tokens", "48", "--self-benchmark-repeats", "1"],
                        work / "server.log", env=env)
    srv.env.pop(ENV_KV_SPACE, None)  # tests/conftest.py sets one: the server sizes it here
    srv.start(timeout=1200)
    yield srv
    srv.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_default_serves_smollm2_with_the_shipped_router(server):
    status, models = http_json(f"{server.url}/v1/models")
    assert status == 200 and models["data"][0]["id"].endswith("SmolLM2-135M-Instruct")
    router, notes = shipped_router()
    status, stats = http_json(f"{server.url}/ftp/stats")
    log = server.tail(100_000)
    assert "KV cache: " in log and "Using max model len 8192" in log  # sized by the server
    if router is None:
        assert not stats["routing"]["enabled"] and "served DENSE" in log
        return
    assert stats["routing"]["enabled"] and Path(stats["routing"]["router"]).name == router.name
    assert stats["routing"]["default_sparsity"] == pytest.approx(
        min(DEFAULT_SPARSITY, stats["routing"]["max_sparsity"]))
    assert "FTP routing on: router" in log
    for note in notes:  # the static fallback says so
        assert note[:60] in log
    if load_artifact(router).mode == "window":  # the served default: vLLM's features stay on
        assert "window routing over 128-token windows; chunked prefill on (chunks end " \
            "anywhere: the router reads positions only), prefix caching on" in log
        assert "prefix caching switched off" not in log
        assert "chunked prefill switched off" not in log
        assert "max_num_batched_tokens raised" not in log
    text = scrape(server.url)
    assert metric_value(text, "ftp_target_sparsity") == stats["routing"]["default_sparsity"]
    assert metric_value(text, "ftp_measured_prefill_speedup") > 0


def test_default_chat_and_routing_records(server):
    """A short chat is served as the measured break-even says: dense below it (counted),
    routed from it on; the same chat with its own target is routed whatever its length."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=300,
                           max_retries=0)
    model = client.models.list().data[0].id
    status, stats = http_json(f"{server.url}/ftp/stats")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in a "
                                            "short sentence, please."}]

    def chat(**extra):
        before = scrape(server.url)
        r = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                           messages=messages, extra_body=extra)
        assert r.choices[0].message.content.strip()
        after = scrape(server.url)

        def delta(name):
            return metric_sum(after, name) - metric_sum(before, name)

        return r, delta("ftp_prefill_tokens_total"), delta(
            "ftp_short_prompt_dense_requests_total")

    r, routed, short = chat()
    if not stats["routing"]["enabled"]:
        assert routed == 0
        return
    threshold = stats["routing"]["route_min_tokens"]
    speedups = {int(k): v for k, v in stats["routing"]["break_even_speedups"].items()}
    from ftp_vllm.server.route_threshold import threshold_from_speedups

    assert set(speedups) == {64, 128, 256, 512}  # the default sweep ran
    assert threshold == threshold_from_speedups(speedups) > 0
    assert metric_value(scrape(server.url), "ftp_route_min_prompt_tokens") == threshold
    assert f"prompts shorter than {threshold} tokens are served dense" in server.tail(100_000)
    if r.usage.prompt_tokens < threshold:
        assert (routed, short) == (0, 1)
        status, _ = http_json(f"{server.url}/ftp/requests/{r.id}")
        assert status == 404  # dense: no routing record
    else:
        assert (routed, short) == (r.usage.prompt_tokens, 0)
    r, routed, short = chat(vllm_xargs={"ftp_sparsity": 0.3})
    assert (routed, short) == (r.usage.prompt_tokens, 0)
    status, body = http_json(f"{server.url}/ftp/requests/{r.id}")
    assert status == 200 and body["records"][0]["token_sparsity"] > 0

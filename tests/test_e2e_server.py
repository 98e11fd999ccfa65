"""`ftp-vllm serve` end to end, with real clients, on 127.0.0.1 only.

One routed server for the module (a tiny random Llama carrying SmolLM2's tokenizer and chat
template, a random MLP router, default sparsity 0.3), started after the offline engine with the
same overrides has produced its reference outputs (one vLLM engine at a time). Clients: the
official `openai` package (sync and async), raw HTTP for faults, a real Prometheus server,
vLLM's own benchmark client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ftp_vllm.plugin.offline import shutdown_engine  # noqa: E402
from ftp_vllm.server.client import HOST, free_port, http_json, metric_sum, metric_value, scrape  # noqa: E402
from ftp_vllm.server.process import ServerProcess  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    make_router,
    make_tiny_chat_model,
    prepared_default_model,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPARSITY = 0.3
MAX_MODEL_LEN = 1024
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who " * 3,
    "List three colours: red, " + "green, blue, " * 20,
    "def fibonacci(n):\n    " * 6,
]
CHATS = [
    [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime number bigger than ten. " * 4}],
]




@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="ftp-e2e-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(workdir):
    return make_tiny_chat_model(workdir / "tiny-chat", prepared_default_model())


@pytest.fixture(scope="module")
def router_dir(workdir, model_dir):
    return make_router(model_dir, workdir / "router", kind="mlp", targets=(0.2, 0.4))


@pytest.fixture(scope="module")
def offline(model_dir, router_dir):
    """Greedy reference outputs from the offline engine with the server's overrides."""
    from vllm import LLM, SamplingParams

    from ftp_vllm.plugin import routing_overrides

    llm = LLM(str(model_dir), hf_overrides=routing_overrides(router_dir, SPARSITY),
              dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    dense = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                           extra_args={"ftp_sparsity": 0.0})
    out = {
        "completions": [o.outputs[0].text for o in llm.generate(PROMPTS, params)],
        "dense": [o.outputs[0].text for o in llm.generate(PROMPTS, dense)],
        "chat": [llm.chat(m, params)[0].outputs[0].text for m in CHATS],
    }
    shutdown_engine(llm)
    assert out["completions"] != out["dense"], "routing changed no output: a weak test"
    return out


@pytest.fixture(scope="module")
def server(workdir, model_dir, router_dir, offline):
    srv = ServerProcess(
        [str(model_dir), "--router", str(router_dir), "--sparsity", str(SPARSITY),
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
         "--self-benchmark-tokens", "64", "--self-benchmark-repeats", "2",
         # every prompt routed: these tests compare the server's routing with the offline
         # engine's (the default serves prompts below the measured break-even dense)
         "--route-min-tokens", "0",
         "--served-model-name", "tiny", "--stats-interval", "0.5"],
        workdir / "server.log")
    srv.start(timeout=900)
    yield srv
    code = srv.stop()
    print(srv.tail(30))
    assert code is not None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120,
                         max_retries=0)


def completion(client, prompt, **kw):
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"ignore_eos": True,
                                                             **kw.pop("extra_body", {})}, **kw)
    return r


def stream_text(stream) -> str:
    parts = []
    for ev in stream:
        for choice in ev.choices:
            parts.append(getattr(choice, "text", None) or
                         (getattr(getattr(choice, "delta", None), "content", None) or ""))
    return "".join(parts)


# ------------------------------------------------------------------------ basics
def test_health_models_and_routing_state(server):
    status, _ = http_json(f"{server.url}/health")
    assert status == 200
    status, models = http_json(f"{server.url}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"
    status, stats = http_json(f"{server.url}/ftp/stats")
    assert status == 200 and stats["routing"]["enabled"]
    assert stats["routing"]["default_sparsity"] == SPARSITY
    assert stats["routing"]["max_sparsity"] == 0.4
    assert stats["self_benchmark"]["speedup"] > 0


def test_completions_equal_offline(client, offline):
    for prompt, want in zip(PROMPTS, offline["completions"], strict=True):
        assert completion(client, prompt).choices[0].text == want


def test_completions_streaming_equal_offline(client, offline):
    for prompt, want in zip(PROMPTS, offline["completions"], strict=True):
        s = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        assert stream_text(s) == want


def test_chat_equal_offline(client, offline):
    for messages, want in zip(CHATS, offline["chat"], strict=True):
        r = client.chat.completions.create(model="tiny", messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want
        s = client.chat.completions.create(model="tiny", messages=messages,
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert stream_text(s) == want


def test_concurrent_clients_equal_offline(server, offline):
    """Eight clients at once, each its own connection pool; batching must not change outputs."""
    jobs = [(i, PROMPTS[i % len(PROMPTS)], bool(i % 2)) for i in range(8)]

    def work(job):
        i, prompt, stream = job
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120,
                          max_retries=0)
        if stream:
            text = stream_text(c.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=True, extra_body={"ignore_eos": True}))
        else:
            text = completion(c, prompt).choices[0].text
        return i, text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(work, jobs, timeout=300))
    for i, prompt, _ in jobs:
        assert results[i] == offline["completions"][PROMPTS.index(prompt)], i


def test_per_request_sparsity(client, server, offline):
    dense = completion(client, PROMPTS[1], extra_body={"vllm_xargs": {"ftp_sparsity": 0}})
    assert dense.choices[0].text == offline["dense"][1]
    status, _ = http_json(f"{server.url}/ftp/requests/{dense.id}")
    assert status == 404  # dense: not routed, no record
    records = {}
    for s in (0.2, 0.4):
        r = completion(client, PROMPTS[1], extra_body={"vllm_xargs": {"ftp_sparsity": s}})
        status, body = http_json(f"{server.url}/ftp/requests/{r.id}")
        assert status == 200, body
        (rec,) = body["records"]
        assert rec["target_sparsity"] == pytest.approx(s)
        records[s] = rec
    assert 0 < records[0.2]["token_sparsity"] < records[0.4]["token_sparsity"] < 1
    assert records[0.4]["flop_speedup"] > records[0.2]["flop_speedup"] > 1


def test_prompt_logprobs_are_dense_unless_the_request_sets_a_target(client, server):
    """A skipped token's prompt log-probability comes from a partly processed state, so a
    request asking for them (`echo` + `logprobs`, `prompt_logprobs`) is served dense unless it
    sets `ftp_sparsity` itself, and `ftp_prompt_logprobs_dense_requests_total` counts it."""
    prompt = PROMPTS[1]

    def ask(xargs=None, field=False):
        """echo + logprobs (the OpenAI way), or vLLM's own `prompt_logprobs` field."""
        extra = {} if xargs is None else {"vllm_xargs": xargs}
        if field:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                             temperature=0,
                                             extra_body={**extra, "prompt_logprobs": 1})
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                         temperature=0, echo=True, logprobs=1,
                                         extra_body=extra)

    def chat(xargs=None):
        extra = {} if xargs is None else {"vllm_xargs": xargs}
        r = client.chat.completions.create(model="tiny", messages=CHATS[1], max_tokens=1,
                                           temperature=0,
                                           extra_body={**extra, "prompt_logprobs": 1})
        return r.model_extra["prompt_logprobs"]

    def logprobs(r):
        lp = r.choices[0].logprobs
        return lp.tokens, lp.token_logprobs, lp.top_logprobs

    def field(r):
        return r.choices[0].model_extra["prompt_logprobs"]

    metric = "ftp_prompt_logprobs_dense_requests_total"
    before = metric_value(scrape(server.url), metric)
    implicit = [ask(), ask()]
    implicit_field = ask(field=True)
    implicit_chat = chat()
    dense = ask({"ftp_sparsity": 0})
    dense_field = ask({"ftp_sparsity": 0}, field=True)
    dense_chat = chat({"ftp_sparsity": 0})
    routed = ask({"ftp_sparsity": 0.4})
    after = metric_value(scrape(server.url), metric)

    n = dense.usage.prompt_tokens
    assert len(logprobs(dense)[1]) == n + 1  # the prompt's tokens, then the new one
    for r in implicit:
        assert logprobs(r) == logprobs(dense)  # exactly dense
        status, _ = http_json(f"{server.url}/ftp/requests/{r.id}")
        assert status == 404  # not routed, no record
    assert len(field(implicit_field)) == n and field(implicit_field) == field(dense_field)
    assert implicit_chat and implicit_chat == dense_chat

    status, body = http_json(f"{server.url}/ftp/requests/{routed.id}")
    assert status == 200, body
    (rec,) = body["records"]
    assert rec["target_sparsity"] == pytest.approx(0.4) and rec["token_sparsity"] > 0
    assert logprobs(routed)[1] != logprobs(dense)[1]  # routed, as the request asked
    assert after - before == 4  # the implicit ones; explicit targets are not counted


# ------------------------------------------------------------------------ faults
BAD_SPARSITY = [0.9, -0.1, 1, 0.400001, "0.2", "abc", True, [0.1]]


@pytest.mark.parametrize("value", BAD_SPARSITY, ids=repr)
def test_bad_sparsity_is_http_400(client, value):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                      stream=stream,
                                      extra_body={"vllm_xargs": {"ftp_sparsity": value}})
        assert e.value.status_code == 400 and "ftp_sparsity" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHATS[0], max_tokens=2,
                                       extra_body={"vllm_xargs": {"ftp_sparsity": value}})


def raw_post(server, path: str, body: bytes, timeout: float = 60) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_malformed_json_is_http_400(server):
    for body in (b'{"model": "tiny", "prompt": ', b"not json at all", b"\xff\xfe{}",
                 b'{"model": "tiny", "prompt": "x", "vllm_xargs": {"ftp_sparsity": 0.2'):
        status, text = raw_post(server, "/v1/completions", body)
        assert status == 400, (body, status, text)
        assert "error" in json.loads(text)
    status, _ = raw_post(server, "/v1/chat/completions", b"[1, 2")
    assert status == 400


def test_non_finite_sparsity_is_http_400(server):
    """JSON the OpenAI client will not even send: huge numbers (inf), NaN."""
    for literal in (b"1e999", b"-1e999", b"NaN", b"Infinity"):
        body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, ' \
               b'"vllm_xargs": {"ftp_sparsity": ' + literal + b"}}"
        status, text = raw_post(server, "/v1/completions", body)
        assert status == 400 and "ftp_sparsity" in text, (literal, status, text)


def test_prompt_over_the_context_limit_is_http_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * (MAX_MODEL_LEN + 50),
                                  max_tokens=4)
    assert "context length" in str(e.value) or "maximum" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "word " * MAX_MODEL_LEN}],
            max_tokens=4)


def _stream_and_hang_up(server, max_tokens: int) -> tuple[float, float]:
    """Stream one long completion, read three events, reset the connection; wait until the
    server runs no request. Returns (generated tokens, finished requests) it added."""
    before = scrape(server.url)
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    body = json.dumps({"model": "tiny", "prompt": "tell me a long story " * 5,
                       "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    got = b""
    while got.count(b"data:") < 3:
        got += r.read1(4096)
    # The client goes away mid-stream: a zero linger makes close() reset the connection at
    # once (close() alone leaves it open while the response still holds the socket's file).
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()
    r.close()
    conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = scrape(server.url)
        running = metric_sum(text, "vllm:num_requests_running")
        if running == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{running} requests still running 60 s after the client left")
    return tuple(metric_sum(text, n) - metric_sum(before, n)
                 for n in ("vllm:generation_tokens_total", "vllm:request_success_total"))


def test_client_disconnect_mid_stream_aborts_the_request(server, client, offline):
    """The client reads three events and hangs up: vLLM aborts the request (it stops
    generating, frees its slot, and does not count it as finished), and serving goes on.

    Seeing the client leave races the generation on a loaded machine, so the hang-up is tried
    up to three times; a server that never aborts fails all three."""
    max_tokens = MAX_MODEL_LEN - 200
    tries = []
    for _ in range(3):
        tries.append(_stream_and_hang_up(server, max_tokens))
        generated, finished = tries[-1]
        if generated < max_tokens / 2 and finished == 0:  # stopped early, not finished
            break
    else:
        pytest.fail(f"no hang-up aborted its request: (generated tokens, finished requests) "
                    f"per try {tries}\n{server.tail(40)}")
    r = completion(client, PROMPTS[1])  # still serving, and right
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.choices[0].text == offline["completions"][1]


def test_server_keeps_serving_after_faults(client, offline):
    test_bad_sparsity_is_http_400(client, 0.9)
    assert completion(client, PROMPTS[2]).choices[0].text == offline["completions"][2]


# ------------------------------------------------------------------------ load
def test_64_concurrent_requests_of_mixed_lengths(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=600,
                               max_retries=0)

        async def one(i):
            prompt = "word " * (1 + (i * 37) % 400)
            n = 1 + i % 24
            kw = dict(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                      extra_body={"ignore_eos": True,
                                  "vllm_xargs": {"ftp_sparsity": [0, 0.2, 0.3, 0.4][i % 4]}})
            if i % 3 == 0:
                text, chunks = "", 0
                async for ev in await c.completions.create(stream=True, **kw):
                    chunks += 1
                    text += ev.choices[0].text if ev.choices else ""
                return i, n, chunks
            r = await c.completions.create(**kw)
            return i, n, r.usage.completion_tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 900)
        finally:
            await c.close()

    results = asyncio.run(main())
    assert sorted(i for i, _, _ in results) == list(range(64))  # none lost
    for i, n, got in results:
        assert got >= n if i % 3 == 0 else got == n, (i, n, got)


# ------------------------------------------------------------------------ metrics
def test_ftp_metrics_move_with_traffic(server, client):
    before = scrape(server.url)
    assert metric_value(before, "ftp_target_sparsity") == SPARSITY
    assert metric_value(before, "ftp_measured_prefill_speedup") > 0
    n_layers = 4
    r = completion(client, PROMPTS[1])
    n = r.usage.prompt_tokens
    after = scrape(server.url)  # refreshed from the workers before answering

    def d(name):
        return metric_sum(after, name) - metric_sum(before, name)

    assert d("ftp_prefill_tokens_total") == n
    assert d("ftp_skipped_token_blocks_total") + d("ftp_computed_token_blocks_total") \
        == n * n_layers
    assert d("ftp_skipped_token_blocks_total") > 0
    assert d("ftp_request_token_sparsity_count") == 1
    assert d("ftp_request_flop_speedup_count") == 1
    assert d("ftp_request_flop_speedup_sum") > 1
    assert metric_sum(after, "vllm:prompt_tokens_total") > 0  # vLLM's own metrics kept


def test_admin_benchmark_reruns(server):
    status, res = http_json(f"{server.url}/ftp/benchmark?tokens=32&repeats=1", body=b"",
                            method="POST", timeout=300)
    assert status == 200, res
    assert res["speedup"] > 0 and res["during_traffic"] and len(res["routed_s"]) == 1
    assert metric_value(scrape(server.url), "ftp_measured_prefill_speedup") == \
        pytest.approx(res["speedup"])
    status, _ = http_json(f"{server.url}/ftp/benchmark?tokens=1", body=b"", method="POST")
    assert status == 400


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def prom_query(port: int, query: str) -> list:
    url = f"http://{HOST}:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_and_sees_ftp_metrics_move(server, client, workdir):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    port = free_port()
    cfg = workdir / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ftp-vllm\n    static_configs:\n"
        f"      - targets: ['{HOST}:{server.port}']\n")
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address={HOST}:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        def wait_for(query, predicate, timeout=90.0):
            deadline = time.monotonic() + timeout
            result = None
            while time.monotonic() < deadline:
                assert prom.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
                try:
                    result = prom_query(port, query)
                    if predicate(result):
                        return result
                except OSError:
                    pass
                time.sleep(1)
            pytest.fail(f"{query}: still {result} after {timeout} s")

        def val(result):
            return float(result[0]["value"][1]) if result else None

        wait_for('up{job="ftp-vllm"}', lambda r: val(r) == 1.0)
        start = val(wait_for("ftp_prefill_tokens_total", lambda r: bool(r)))
        hist0 = val(wait_for("ftp_request_token_sparsity_count", lambda r: bool(r)))
        for prompt in PROMPTS:
            completion(client, prompt)
        wait_for("ftp_prefill_tokens_total", lambda r: val(r) > start)
        wait_for("ftp_request_token_sparsity_count", lambda r: val(r) >= hist0 + len(PROMPTS))
        wait_for("sum(ftp_skipped_token_blocks_total)", lambda r: val(r) > 0)
        assert val(wait_for("ftp_target_sparsity", bool)) == SPARSITY
        # the same expressions the dashboard and the alerts use evaluate
        wait_for("sum(rate(ftp_request_token_sparsity_sum[30s])) / "
                 "sum(rate(ftp_request_token_sparsity_count[30s]))",
                 lambda r: r and 0 < val(r) < 1)
        wait_for('vllm:num_requests_running{job="ftp-vllm"}', bool)
    finally:
        prom.terminate()
        try:
            prom.wait(30)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()


# ------------------------------------------------------------------------ benchmark client
def test_vllm_bench_serve_routed_vs_dense(server, model_dir, workdir):
    """vLLM's own benchmark client (`vllm bench serve`) through `ftp-vllm serve-bench --url`."""
    out = workdir / "serve_bench.json"
    r = subprocess.run(
        [os.environ.get("PYTHON", __import__("sys").executable), "-m", "ftp_vllm.cli",
         "serve-bench", "--url", server.url, "--model", str(model_dir), "--num-prompts", "8",
         "--input-len", "96", "--output-len", "4", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["kind"] == "serve-bench"
    runs = {x["mode"]: x for x in data["runs"]}
    for mode in ("dense", "routed"):
        assert runs[mode]["completed"] == 8 and runs[mode]["failed"] == 0
    assert runs["routed"]["routing"]["token_sparsity"] > 0.1
    assert runs["dense"]["routing"]["routed_prefill_tokens"] == 0
    md = out.with_suffix(".md").read_text()
    assert "| routed | 0 | 0.3 |" in md and str(workdir) not in md

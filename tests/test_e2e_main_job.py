"""The README's main job, exactly: `make serve` in the repository root, with no flags and no
KV-cache size in the environment, while another process holds 20% of the machine's memory.
The only thing added is a free port (`make serve PORT=...`). Then the official `openai`
client chats and completes, `/metrics` carries ftp_ and vLLM's metrics, and Ctrl-C (SIGINT to
the process group) stops make, the server and vLLM's engine processes, leaving none behind.

Uses the model `make test` prepared; start-up includes the default 256-token self-benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from ftp_vllm.plugin.memory import ENV_KV_SPACE, read_node_memory  # noqa: E402
from ftp_vllm.server.client import free_port, scrape  # noqa: E402
from ftp_vllm.server.process import CommandServer, alive, descendants, group_pids  # noqa: E402
from ftp_vllm.server.settings import ENV_ROUTER, ENV_SPARSITY  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[1]
HOG_SHARE = 0.20
# Touches every page (b"\x01" * n writes them all), says "ready", then waits to be killed.
HOG = ("import sys, time; n = int(sys.argv[1]); hold = b'\\x01' * n; "
       "print('ready', flush=True); time.sleep(3600)")


def machine_memory() -> int:
    """The machine's memory (the container's limit when lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = read_node_memory().cgroup_limit
    return min(total, limit) if limit else total


def resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def hog():
    """Another process holding 20% of the machine's memory, really resident."""
    n = int(machine_memory() * HOG_SHARE)
    proc = subprocess.Popen([sys.executable, "-c", HOG, str(n)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        assert resident(proc.pid) >= 0.95 * n
        yield n
    finally:
        proc.kill()
        proc.wait()


def user_env() -> dict[str, str]:
    """This environment minus what tests add (conftest's KV-cache size, routing defaults) and
    make's own variables: a user's shell."""
    drop = {ENV_KV_SPACE, ENV_ROUTER, ENV_SPARSITY, "MAKEFLAGS", "MAKELEVEL", "MFLAGS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def served(hog):
    from ftp_vllm.model import default_model_dir, is_prepared

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if not is_prepared(default_model_dir()):
        pytest.skip("the default model is not prepared (`make model`)")
    work = Path(tempfile.mkdtemp(prefix="ftp-e2e-main-job-"))
    port = free_port()
    srv = CommandServer(["make", "serve", f"PORT={port}"], work / "make-serve.log", port=port,
                        env=user_env(), cwd=REPO)
    srv.start(timeout=1500)
    yield srv
    srv.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_starts_and_says_how_the_kv_cache_was_sized(served, hog):
    log = served.tail(100_000)
    assert f"ftp-vllm serve --port {served.port}" in log  # the Makefile passed only the port
    line = next(x for x in log.splitlines() if "KV cache: " in x)
    assert "GiB available" in line and f"{ENV_KV_SPACE}=<GiB>" in line
    assert "Traceback" not in log


def test_chat_and_completion_with_the_openai_client(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", timeout=300,
                           max_retries=0)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, max_tokens=16, temperature=0,
        messages=[{"role": "user", "content": "Name a primary colour."}])
    assert chat.choices[0].message.content.strip() and chat.usage.prompt_tokens > 0
    done = client.completions.create(model=model, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert done.choices[0].text.strip() and done.usage.completion_tokens > 0


def test_metrics_carry_ftp_and_vllm(served):
    text = scrape(served.url)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert any(n.startswith("ftp_") for n in names), "no ftp_ metric on /metrics"
    assert "vllm:num_requests_running" in names and "vllm:kv_cache_usage_perc" in names


def test_engine_processes_run_on_tcmalloc(served):
    """vLLM's CPU guide asks for tcmalloc: `make serve` installs it (root apt-get) and the
    server preloads it into the engine processes vLLM spawns, so each of them maps it; without
    it the log says what to install."""
    from ftp_vllm.allocator import MISSING, find_tcmalloc

    lib = find_tcmalloc()
    if lib is None:
        assert MISSING in served.tail(100_000)
        return
    assert f"memory allocator: {lib}" in served.tail(100_000)
    # vLLM titles the processes it spawns VLLM::EngineCore, VLLM::Worker, ...
    engine = {p: _title(p) for p in descendants(served.proc.pid)
              if _title(p).startswith("VLLM::")}
    assert "VLLM::EngineCore" in engine.values(), engine
    for pid, title in engine.items():
        assert lib in Path(f"/proc/{pid}/maps").read_text(), f"{title} does not map {lib}"


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
    except OSError:
        return ""


def test_ctrl_c_stops_everything(served):
    pgid = served.proc.pid
    below = descendants(served.proc.pid)
    assert len(below) >= 3  # under make: the API server, vLLM's engine core and worker
    served.stop()
    assert served.left_behind == [], f"processes left behind: {served.left_behind}"
    assert group_pids(pgid) == [] and alive(below) == []
    # Ctrl-C reaches every process of the group at once; when vLLM's engine core exits before
    # the API server, vLLM itself logs "AsyncLLM output_handler failed." with the engine's
    # death (a race inside vLLM, `vllm serve` does the same). Any other traceback fails.
    ours = [line for line in served.tail(100_000).splitlines()
            if "Traceback" in line and "[async_llm.py:" not in line]
    assert ours == [], served.tail(100_000)[-6000:]

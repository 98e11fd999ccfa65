"""The shipped multi-node example, run: its leader and worker flags on one machine.

deploy/k8s/multi-node starts one tensor-parallel group over several pods with vLLM's
multi-node flags (`--nnodes`, `--node-rank`, `--master-addr`, `--headless` on the workers,
multiprocessing executor). Here the manifest's own argument lists are taken as they are, with
what the kubelet and the cluster would supply replaced for one machine: $(LWS_*) by the
loopback address and the worker's index, the model by the tests' tiny Llama (4 heads), the
tensor-parallel size by one rank per "node" (CPU), a free port. Two `ftp-vllm serve`
processes (leader: API server and rank 0; headless worker: rank 1) then serve a routed
completion, and the leader's /metrics count it: routing runs across both "nodes".
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")

from ftp_vllm.server.client import free_port, http_json, metric_sum, scrape  # noqa: E402
from ftp_vllm.server.process import CommandServer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]
LWS = ROOT / "deploy" / "k8s" / "multi-node" / "leaderworkerset.yaml"
HOST = "127.0.0.1"


def manifest_args() -> tuple[list[str], list[str], int]:
    """(leader args, worker args, group size) of the shipped LeaderWorkerSet."""
    lwt = yaml.safe_load(LWS.read_text())["spec"]["leaderWorkerTemplate"]
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]["args"]
    worker = lwt["workerTemplate"]["spec"]["containers"][0]["args"]
    return list(leader), list(worker), int(lwt["size"])


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2:]]


def on_one_machine(args: list[str], *, worker_index: int, model: Path, tp: int,
                   master_port: int) -> list[str]:
    """The kubelet's $(VAR) expansion with the values LWS injects, for a one-machine group."""
    env = {"LWS_LEADER_ADDRESS": HOST, "LWS_WORKER_INDEX": str(worker_index),
           "LWS_GROUP_SIZE": "2"}
    out = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    out = set_flag(out, "--model", str(model))
    out = set_flag(out, "--tensor-parallel-size", str(tp))
    return set_flag(out, "--master-port", str(master_port))


class Headless:
    """A headless worker: no HTTP to wait for; its own session, stopped like Ctrl-C."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT, start_new_session=True)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # our own session only
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


@pytest.fixture(scope="module")
def router(tiny_llama_dir, tmp_path_factory):
    from tests.tiny_models import make_router

    return make_router(tiny_llama_dir, tmp_path_factory.mktemp("mn") / "router")


def test_manifest_args_start_a_routed_group_across_two_processes(tiny_llama_dir, router,
                                                                 tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two ranks need two cores")
    leader_args, worker_args, size = manifest_args()
    assert size == 2 and "--headless" in worker_args and "--headless" not in leader_args
    master_port, port = free_port(), free_port()
    common = ["--router", str(router), "--sparsity", "0.3", "--max-model-len", "512",
              "--skip-tokenizer-init", "--no-self-benchmark"]
    leader_argv = on_one_machine(leader_args, worker_index=0, model=tiny_llama_dir, tp=size,
                                 master_port=master_port)
    worker_argv = on_one_machine(worker_args, worker_index=1, model=tiny_llama_dir, tp=size,
                                 master_port=master_port)
    base_env = {**os.environ, "VLLM_HOST_IP": HOST, "VLLM_NO_USAGE_STATS": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    python = [sys.executable, "-m", "ftp_vllm.server"]
    leader = CommandServer(python + leader_argv + common + ["--host", HOST, "--port", str(port)],
                           tmp_path / "leader.log", port=port,
                           env={**base_env, "VLLM_CPU_OMP_THREADS_BIND": "0"}, cwd=ROOT)
    worker = Headless(python + worker_argv + common, tmp_path / "worker.log",
                      env={**base_env, "VLLM_CPU_OMP_THREADS_BIND": "1"})
    try:
        leader.start(timeout=600)
        assert worker.proc.poll() is None, worker.tail()
        prompt = [(7 * i + 3) % 250 + 1 for i in range(40)]
        status, body = http_json(f"{leader.url}/v1/completions", {
            "model": tiny_llama_dir.name, "prompt": [prompt], "max_tokens": 4,
            "temperature": 0, "vllm_xargs": {"ftp_sparsity": 0.3}}, timeout=300)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 4
        metrics = scrape(leader.url)
        assert metric_sum(metrics, "ftp_prefill_tokens_total") == len(prompt)
        assert metric_sum(metrics, "ftp_skipped_token_blocks_total") > 0
        # Rank 1 ran in the headless worker, joined to the leader's group.
        assert re.search(r"world_size=2 rank=1 ", worker.tail(100_000)), worker.tail()
        assert re.search(r"world_size=2 rank=0 ", leader.tail(100_000)), leader.tail()
    finally:
        leader.stop()
        worker.stop()

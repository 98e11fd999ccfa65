"""Helpers for the server's end-to-end tests and the serve benchmark (loopback only).

- ``make_tiny_chat_model``: a tiny random Llama that carries the default model's tokenizer
  and chat template, so the OpenAI chat and completions APIs work on it in seconds;
- ``ServerProcess``: ``python -m server ...`` in a subprocess on 127.0.0.1, waited for
  through ``/health`` with a deadline, stopped with SIGINT then SIGKILL, log kept in a file;
- ``CommandServer``: any command that serves on a given port (``make serve PORT=...``), run
  in its own process group with exactly the given environment, stopped like Ctrl-C (SIGINT to
  the whole group), and checked for processes it left behind (``group_pids``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_tiny_chat_model(path: Path, tokenizer_dir: Path, seed: int = 0,
                         num_layers: int = 4) -> Path:
    """A tiny random Llama (head_dim 32 for vLLM's CPU kernels) with `tokenizer_dir`'s
    tokenizer files; fp32, norms perturbed so routing factors see real values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftp_vllm.plugin.testing import with_random_norms

    cfg_src = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=int(cfg_src["vocab_size"]), hidden_size=128, intermediate_size=256,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=10000.0, bos_token_id=cfg_src.get("bos_token_id"),
        eos_token_id=cfg_src.get("eos_token_id"),
    )
    model = LlamaForCausalLM(config)
    model = with_random_norms(model)
    path = Path(path)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, path / f)
    return path


def make_router(model_dir: Path, path: Path, kind: str = "mlp",
                targets: tuple[float, ...] = (0.2, 0.4)) -> Path:
    """A router artifact for `model_dir` (static, or the plugin's scored random MLP)."""
    from ftp_vllm.plugin.testing import hf_fingerprint, make_artifact

    fp, _ = hf_fingerprint(model_dir)
    return make_artifact(path, fp, kind=kind, targets=targets)


def http_json(url: str, body: Any = None, method: str | None = None,
              timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def scrape(base_url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's value from Prometheus text (labels must match exactly those given)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and (labels is None or all(
                    s.labels.get(k) == v for k, v in labels.items())):
                return float(s.value)
    return None


def metric_sum(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(float(s.value) for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == name)


class ServerProcess:
    """``python -m server <args>`` on 127.0.0.1:<port>, started and waited for."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None,
                 env: dict[str, str] | None = None, cwd: Path | None = None):
        self.port = port or free_port()
        self.args = ["--host", HOST, "--port", str(self.port), *args]
        self.log_path = Path(log_path)
        # No KV-cache size here: `ftp-vllm serve-bench` runs users' servers through this class,
        # and the server sizes the cache itself (tests set one in tests/conftest.py).
        self.env = {**os.environ, "VLLM_NO_USAGE_STATS": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "server", *self.args]

    def start(self, timeout: float = 600.0) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log,
            stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class CommandServer(ServerProcess):
    """A user's command (e.g. ``["make", "serve", f"PORT={port}"]``) serving on `port`.

    The environment is exactly `env` (nothing added); stop() sends SIGINT to the whole
    process group, as Ctrl-C in a terminal does, then SIGKILL to what is left."""

    def __init__(self, command: list[str], log_path: Path, port: int, env: dict[str, str],
                 cwd: Path | None = None):
        super().__init__([], log_path, port=port, cwd=cwd)
        self.argv = list(command)
        self.env = dict(env)
        self.left_behind: list[int] = []  # pids still alive after stop()'s grace period

    def command(self) -> list[str]:
        return self.argv

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the group's id is the leader's pid
        below = descendants(self.proc.pid)  # also those that left the group

        def remaining() -> list[int]:
            return sorted(set(group_pids(pgid)) | set(alive(below)))

        if self.proc.poll() is None:
            _killpg(pgid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                self.proc.wait(30)
        deadline = time.monotonic() + timeout
        while remaining() and time.monotonic() < deadline:  # children still exiting
            time.sleep(0.5)
        if remaining():
            self.left_behind = remaining()
            _killpg(pgid, signal.SIGKILL)
            for pid in alive(self.left_behind):  # our own children, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _live_processes() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, pgrp)} of every live (non-zombie) process, from /proc (Linux)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if fields[0] != "Z":
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    return sorted(p for p, (_, g) in _live_processes().items() if g == pgid)


def descendants(pid: int) -> list[int]:
    """Live processes below `pid` (children, theirs, ...), whatever their group or session."""
    procs = _live_processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier} - found
        found |= frontier
    return sorted(found)


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (not zombies)."""
    live = _live_processes()
    return [p for p in pids if p in live]

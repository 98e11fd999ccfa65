"""A served ftp-vllm as a child process: started, waited for through `/health`, stopped.

- ``ServerProcess``: ``python -m ftp_vllm.server ...`` on 127.0.0.1, waited for through
  ``/health`` with a deadline, stopped with SIGINT then SIGKILL, log kept in a file;
- ``CommandServer``: any command that serves on a given port (``make serve PORT=...``), run
  in its own process group with exactly the given environment, stopped like Ctrl-C (SIGINT to
  the whole group), and checked for processes it left behind (``group_pids``).

Used by `ftp-vllm serve-bench` (servers one at a time) and by the end-to-end tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ftp_vllm.server.client import HOST, free_port


class ServerProcess:
    """``python -m ftp_vllm.server <args>`` on 127.0.0.1:<port>, started and waited for."""

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
        return [sys.executable, "-m", "ftp_vllm.server", *self.args]

    def start(self, timeout: float = 600.0) -> ServerProcess:
        """Start and wait for ``/health``; a server that exits, times out or is interrupted
        while starting is stopped before the error goes up (its log says why)."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log,
            stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
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
        # `with ServerProcess(...).start(t) as srv`: started already, not a second process.
        return self if self.proc is not None else self.start()

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
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[0] != "Z":
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after "pid (comm)": state ppid pgrp session tty tpgid flags minflt
    cminflt majflt cmajflt utime stime ...; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


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


def usage(pid: int) -> dict[str, float]:
    """CPU seconds (user, system) and page faults (minor, major) of `pid` and every live
    process below it, from /proc (Linux): a server's cost as the kernel counts it, engine
    core included. Differences between two calls give one run's share."""
    tick = os.sysconf("SC_CLK_TCK")
    total = {"user_s": 0.0, "system_s": 0.0, "minor_faults": 0, "major_faults": 0}
    for p in [pid, *descendants(pid)]:
        f = _stat(p)
        if f is None:
            continue
        total["minor_faults"] += int(f[7])
        total["major_faults"] += int(f[9])
        total["user_s"] += int(f[11]) / tick
        total["system_s"] += int(f[12]) / tick
    return total


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (not zombies)."""
    live = _live_processes()
    return [p for p in pids if p in live]

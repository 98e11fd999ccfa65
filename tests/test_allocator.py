"""`ftp_vllm.allocator`: which allocator vLLM's CPU engine processes get."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftp_vllm.allocator import find_tcmalloc, use_tcmalloc

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

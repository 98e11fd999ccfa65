"""An artifact made for another checkpoint of the same shape fails engine start.

The shape matches (the front end's check passes), so the worker's check after weight
loading must catch it: the final-norm hash of the checkpoint differs from the artifact's.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from ftp_vllm.artifact import folder_fingerprint  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from tests.engine_helpers import engine_kwargs  # noqa: E402
from tests.tiny_models import (
    make_artifact,  # noqa: E402
    save_tiny_checkpoint,  # noqa: E402
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_artifact_for_other_weights_fails_engine_start(tiny_llama_dir, tmp_path, capfd):
    from vllm import LLM

    other = save_tiny_checkpoint(tmp_path / "other", "llama", seed=99)
    art = make_artifact(tmp_path / "art", folder_fingerprint(other)[0])
    with pytest.raises(Exception) as info:  # noqa: B017  (vLLM wraps worker failures)
        LLM(str(tiny_llama_dir), hf_overrides=routing_overrides(art, 0.3), **engine_kwargs())
    out, err = capfd.readouterr()
    text = str(info.value) + out + err
    assert "made for another model" in text and "norm_sha256" in text
    assert str(art) in text

"""Plugin registration and engine-config checks (vLLM config only, no engine start)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from ftp_vllm.artifact import ArtifactError  # noqa: E402
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from ftp_vllm.plugin.runtime import parse_request_sparsity  # noqa: E402
from ftp_vllm.plugin.testing import hf_fingerprint, make_artifact  # noqa: E402
from ftp_vllm.routing.schedule import SparsitySchedule  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def fingerprint(tiny_llama_dir):
    return hf_fingerprint(tiny_llama_dir)[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, fingerprint):
    return make_artifact(tmp_path_factory.mktemp("art") / "static", fingerprint)


def engine_config(model_dir, hf_overrides, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model_dir), hf_overrides=hf_overrides, skip_tokenizer_init=True,
        max_model_len=512, **kw,
    )
    return args.create_engine_config()


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("ftp_vllm") == "ftp_vllm.plugin:register"


def test_register_adds_routed_architectures():
    from vllm import ModelRegistry

    from ftp_vllm.plugin import register

    register()
    archs = ModelRegistry.get_supported_archs()
    assert "FTPLlamaForCausalLM" in archs and "FTPQwen2ForCausalLM" in archs


def test_routing_overrides(artifact):
    ov = routing_overrides(artifact, 0.3)
    assert ov["architectures"] == ["FTPLlamaForCausalLM"]
    assert ov["ftp_sparsity"] == 0.3
    assert json.loads(json.dumps(ov)) == ov  # usable as --hf-overrides JSON
    with pytest.raises(ValueError, match="outside"):
        routing_overrides(artifact, 0.5)
    with pytest.raises(ValueError, match="outside"):
        routing_overrides(artifact, -0.1)
    with pytest.raises(ArtifactError, match="file not found"):
        routing_overrides(artifact.parent / "missing", 0.3)


def test_request_sparsity_parsing():
    sched = SparsitySchedule.uniform([0.2, 0.4], 4)
    assert parse_request_sparsity(None, sched, 0.3) == 0.3
    assert parse_request_sparsity({}, sched, 0.3) == 0.3
    assert parse_request_sparsity({"other": 1}, sched, 0.3) == 0.3
    assert parse_request_sparsity({"ftp_sparsity": None}, sched, 0.3) == 0.0
    for bad in (0.5, -0.01, "0.2", "x", [0.1], True):  # the full table: test_contract.py
        with pytest.raises(ValueError):
            parse_request_sparsity({"ftp_sparsity": bad}, sched, 0.3)


@pytest.mark.slow
def test_routed_config_switches_features_off_with_reasons(tiny_llama_dir, artifact, monkeypatch):
    # Capture at the plugin's logger calls: vLLM reconfigures its log handlers and streams
    # between tests, which made a handler- or stream-based capture depend on test order.
    from ftp_vllm.plugin import config as plugin_config

    said: list[str] = []
    original = plugin_config.logger.warning

    def warning(msg, *args, **kwargs):
        said.append(msg % args if args else msg)
        return original(msg, *args, **kwargs)

    monkeypatch.setattr(plugin_config.logger, "warning", warning)
    cfg = engine_config(
        tiny_llama_dir, routing_overrides(artifact, 0.3),
        enable_chunked_prefill=True, enable_prefix_caching=True, max_num_batched_tokens=64,
    )
    assert cfg.model_config.architecture == "FTPLlamaForCausalLM"
    assert cfg.scheduler_config.enable_chunked_prefill is False
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.max_num_batched_tokens >= 512
    assert cfg.model_config.enforce_eager is True
    assert cfg.parallel_config.worker_extension_cls.endswith("FTPWorkerExtension")
    text = "\n".join(said)
    assert "chunked prefill switched off" in text
    assert "prefix caching switched off" in text
    assert "runs eager" in text


@pytest.mark.slow
def test_vanilla_config_untouched(tiny_llama_dir):
    cfg = engine_config(tiny_llama_dir, {}, enable_prefix_caching=True)
    assert cfg.model_config.architecture == "LlamaForCausalLM"
    assert cfg.cache_config.enable_prefix_caching is True
    assert cfg.scheduler_config.enable_chunked_prefill is True
    assert cfg.model_config.enforce_eager is False
    assert not cfg.parallel_config.worker_extension_cls


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing", "corrupt", "other-model", "no-router", "range"])
def test_bad_routing_options_fail_engine_config(tiny_llama_dir, artifact, tmp_path, problem):
    ov = routing_overrides(artifact, 0.3)
    if problem == "missing":
        ov["ftp_router"] = str(tmp_path / "nowhere")
        expect = ["nowhere", "file not found"]
    elif problem == "corrupt":
        bad = tmp_path / "corrupt"
        bad.mkdir()
        (bad / "router.json").write_text("{not json")
        ov["ftp_router"] = str(bad)
        expect = ["router.json", "corrupt JSON"]
    elif problem == "other-model":
        meta = json.loads((artifact / "router.json").read_text())
        meta["model"]["hidden_size"] = 4096
        other = tmp_path / "other"
        other.mkdir()
        (other / "router.json").write_text(json.dumps(meta))
        ov["ftp_router"] = str(other)
        expect = ["other", "made for another model", "hidden_size"]
    elif problem == "no-router":
        del ov["ftp_router"]
        expect = ["ftp_router"]
    else:
        ov["ftp_sparsity"] = 0.9
        expect = ["ftp_sparsity", "outside [0, 0.4]"]
    with pytest.raises(Exception) as info:  # noqa: B017  (pydantic wraps the ValueError)
        engine_config(tiny_llama_dir, ov)
    for part in expect:
        assert part in str(info.value)

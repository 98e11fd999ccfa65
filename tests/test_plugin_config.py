"""Plugin registration and engine-config checks (vLLM config only, no engine start)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from ftp_vllm.artifact import (
    ArtifactError,  # noqa: E402
    folder_fingerprint,  # noqa: E402
)
from ftp_vllm.plugin import routing_overrides  # noqa: E402
from ftp_vllm.plugin.runtime import parse_request_sparsity  # noqa: E402
from ftp_vllm.routing.schedule import SparsitySchedule  # noqa: E402
from tests.tiny_models import make_artifact  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def fingerprint(tiny_llama_dir):
    return folder_fingerprint(tiny_llama_dir)[0]


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
    """Exact routing (an artifact without window routing) switches chunked prefill and prefix
    caching off and raises the token budget, saying why."""
    # Capture at the plugin's logger calls: vLLM reconfigures its log handlers and streams
    # between tests, which made a handler- or stream-based capture depend on test order.
    from ftp_vllm.plugin import config as plugin_config

    said: list[str] = []

    def capture(level: str):
        original = getattr(plugin_config.logger, level)

        def log(msg, *args, **kwargs):
            said.append(msg % args if args else msg)
            return original(msg, *args, **kwargs)

        monkeypatch.setattr(plugin_config.logger, level, log)

    capture("warning")
    capture("info")
    cfg = engine_config(
        tiny_llama_dir, routing_overrides(artifact, 0.3),
        enable_chunked_prefill=True, enable_prefix_caching=True, max_num_batched_tokens=64,
    )
    assert cfg.model_config.architecture == "FTPLlamaForCausalLM"
    assert cfg.scheduler_config.enable_chunked_prefill is False
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.max_num_batched_tokens >= 512
    assert cfg.model_config.enforce_eager is False  # only steps that route leave vLLM's graph
    assert cfg.parallel_config.worker_extension_cls.endswith("FTPWorkerExtension")
    text = "\n".join(said)
    assert "chunked prefill switched off" in text
    assert "prefix caching switched off" in text
    assert "steps that route prompt tokens run the routed layers" in text


@pytest.mark.slow
def test_window_routing_keeps_chunked_prefill_prefix_caching_and_budget(tiny_llama_dir,
                                                                       fingerprint, tmp_path):
    """A window-routing artifact keeps what exact routing switches off, and the token budget
    asked for; its engine schedules with the window scheduler."""
    from ftp_vllm.plugin.config import WINDOW_SCHEDULER

    window = make_artifact(tmp_path / "window", fingerprint, window=16)
    ov = routing_overrides(window, 0.3)
    cfg = engine_config(tiny_llama_dir, ov, enable_chunked_prefill=True,
                        enable_prefix_caching=True, max_num_batched_tokens=64)
    assert cfg.model_config.architecture == "FTPLlamaForCausalLM"
    assert cfg.scheduler_config.enable_chunked_prefill is True
    assert cfg.cache_config.enable_prefix_caching is True
    assert cfg.scheduler_config.max_num_batched_tokens == 64
    assert cfg.scheduler_config.scheduler_cls == WINDOW_SCHEDULER
    assert cfg.model_config.enforce_eager is False  # only steps that route leave vLLM's graph
    # vLLM's defaults stay vLLM's defaults
    routed, vanilla = engine_config(tiny_llama_dir, ov), engine_config(tiny_llama_dir, {})
    assert routed.scheduler_config.max_num_batched_tokens == \
        vanilla.scheduler_config.max_num_batched_tokens
    assert routed.scheduler_config.enable_chunked_prefill is True
    assert routed.cache_config.enable_prefix_caching is \
        vanilla.cache_config.enable_prefix_caching
    with pytest.raises(Exception) as info:  # noqa: B017  (pydantic wraps the ValueError)
        engine_config(tiny_llama_dir, ov,
                      scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    assert "drop --scheduler-cls" in str(info.value) and "window" in str(info.value)


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


# --- start-up refusals (ftp_vllm.plugin.refusals) ---------------------------------------------
# One serve command line per refusal: the same argv goes through vLLM's parser to a real
# VllmConfig (the plugin's hook must refuse it) and through refused_flags (deploy checks).
REFUSED_ARGV = {
    "pipeline-parallel": ["--pipeline-parallel-size", "2"],
    # vLLM itself needs DCP to divide TP, so TP=2 here; only DCP is refused.
    "decode-context-parallel": ["--tensor-parallel-size", "2",
                                "--decode-context-parallel-size", "2"],
    "prefill-context-parallel": ["--prefill-context-parallel-size", "2"],
    "kv-connector": ["--kv-transfer-config",
                     '{"kv_connector": "ExampleConnector", "kv_role": "kv_both"}'],
    "kv-offloading": ["--kv-offloading-size", "4"],
    "quantized-kv-cache": ["--kv-cache-dtype", "fp8"],
}


def _serve_argv(model_dir, hf_overrides, extra: list[str]) -> list[str]:
    return ["--model", str(model_dir), "--hf-overrides", json.dumps(hf_overrides),
            "--max-model-len", "512", "--skip-tokenizer-init", *extra]


def _config_from_argv(argv: list[str]):
    from ftp_vllm.plugin.refusals import parse_engine_args

    return parse_engine_args(argv).create_engine_config()


def test_every_refusal_has_a_case_and_says_what_why_and_instead():
    from ftp_vllm.plugin.refusals import REFUSALS

    assert {r.name for r in REFUSALS} == set(REFUSED_ARGV)
    assert len({r.cli_flag for r in REFUSALS}) == len(REFUSALS)
    for rule in REFUSALS:
        assert "not supported" in rule.message, rule.name  # what
        assert any(w in rule.message for w in ("Use ", "Drop ")), rule.name  # what instead


def test_refusals_name_real_vllm_flags_and_config_fields(tiny_llama_dir):
    """Each rule's flag parses into its EngineArgs field, and its config path exists on a real
    VllmConfig built from that flag (a vanilla model: no refusal applies there)."""
    from dataclasses import fields

    from vllm.engine.arg_utils import EngineArgs

    from ftp_vllm.plugin.refusals import REFUSALS, parse_engine_args

    names = {f.name for f in fields(EngineArgs)}
    for rule in REFUSALS:
        assert rule.engine_arg in names, rule.engine_arg
        argv = REFUSED_ARGV[rule.name]
        assert rule.cli_flag in argv
        value = getattr(parse_engine_args(argv), rule.engine_arg)
        assert rule.refused(value), (rule.name, value)
    # Vanilla: the same flags build a config (the rules are for routed models only) and the
    # rules' config paths resolve on it to the values the flags set.
    cfg = _config_from_argv(_serve_argv(tiny_llama_dir, {}, REFUSED_ARGV["quantized-kv-cache"]))
    assert cfg.model_config.architecture == "LlamaForCausalLM"
    by_name = {r.name: r for r in REFUSALS}
    assert by_name["quantized-kv-cache"].config_value(cfg) == "fp8"
    assert by_name["quantized-kv-cache"].check(cfg)
    for rule in REFUSALS:
        rule.config_value(cfg)  # AttributeError if the path is wrong


@pytest.mark.parametrize("name", sorted(REFUSED_ARGV))
def test_refused_setting_fails_routed_engine_config(tiny_llama_dir, artifact, name):
    from ftp_vllm.plugin.refusals import REFUSALS, refused_flags

    rule = next(r for r in REFUSALS if r.name == name)
    extra = REFUSED_ARGV[name]
    assert refused_flags(extra) == [rule.cli_flag]
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError is a ValueError
        _config_from_argv(_serve_argv(tiny_llama_dir, routing_overrides(artifact, 0.3), extra))
    text = str(info.value)
    assert f"FTP routing refuses {rule.cli_flag}" in text
    assert " ".join(rule.message.split()[:12]) in " ".join(text.split())


def test_all_refusals_reported_at_once(tiny_llama_dir, artifact):
    from ftp_vllm.plugin.refusals import refused_flags

    extra = REFUSED_ARGV["pipeline-parallel"] + REFUSED_ARGV["quantized-kv-cache"]
    assert refused_flags(extra) == ["--pipeline-parallel-size", "--kv-cache-dtype"]
    with pytest.raises(ValueError) as info:
        _config_from_argv(_serve_argv(tiny_llama_dir, routing_overrides(artifact, 0.3), extra))
    assert "--pipeline-parallel-size 2" in str(info.value)
    assert "--kv-cache-dtype fp8" in str(info.value)


def test_supported_serve_flags_are_not_refused():
    from ftp_vllm.plugin.refusals import refused_flags

    # Multi-node tensor parallelism (docs/OPERATIONS.md) plus server and FTP flags.
    argv = ["--model", "/models/model", "--tensor-parallel-size", "16", "--nnodes", "2",
            "--node-rank", "1", "--master-addr", "leader.example", "--master-port", "29501",
            "--headless", "--pipeline-parallel-size", "1", "--kv-cache-dtype", "bfloat16",
            "--port", "8000", "--router", "/routers/custom", "--sparsity", "0.3"]
    assert refused_flags(argv) == []
    assert refused_flags([]) == []
    assert refused_flags(["-pp", "2"]) == ["--pipeline-parallel-size"]  # vLLM's short alias


def test_refused_flags_rejects_unparsable_values():
    from ftp_vllm.plugin.refusals import refused_flags

    with pytest.raises(ValueError, match="cannot parse vLLM engine arguments"):
        refused_flags(["--pipeline-parallel-size", "two"])

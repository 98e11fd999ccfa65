"""The one rule for a request's ``ftp_sparsity``, and that server and worker both apply it."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from ftp_vllm.contract import SPARSITY_KEY, request_sparsity, validate_sparsity

MAX = 0.4  # the served artifact's highest target in these tests

# value -> accepted float, or None for "refused"
CASES = [
    (0, 0.0), (0.0, 0.0), (0.2, 0.2), (MAX, MAX), (MAX + 1e-10, MAX + 1e-10),
    (None, 0.0),  # null: dense, as the worker always read it
    (np.float32(0.25), float(np.float32(0.25))), (np.float64(0.1), 0.1), (np.int64(0), 0.0),
    (Fraction(1, 5), 0.2),
    # numeric strings and booleans
    ("0.2", None), ("0", None), ("", None), ("abc", None), (True, None), (False, None),
    # non-finite
    (float("nan"), None), (float("inf"), None), (float("-inf"), None), (np.float32("nan"), None),
    # out of range
    (-0.01, None), (-0.0001, None), (-1, None), (MAX + 1e-6, None), (0.41, None),
    (1, None), (1.0, None), (1.5, None), (10**400, None), (-(10**400), None),
    # other JSON
    ([0.2], None), ({"a": 1}, None),
]


@pytest.mark.parametrize("value,expected", CASES, ids=[repr(c[0])[:16] for c in CASES])
def test_validate_sparsity(value, expected):
    if expected is None:
        with pytest.raises(ValueError) as e:
            validate_sparsity(value, MAX)
        assert str(e.value).startswith(SPARSITY_KEY)
    else:
        got = validate_sparsity(value, MAX)
        assert type(got) is float and got == pytest.approx(expected, abs=0)


def test_messages_say_what_is_accepted():
    def msg(value, max_sparsity=MAX):
        with pytest.raises(ValueError) as e:
            validate_sparsity(value, max_sparsity)
        return str(e.value)

    assert msg("0.2") == ('ftp_sparsity must be a number in [0, 0.4] (0 or null: dense), got '
                          '"0.2" (a string: send the number 0.2 without quotes)')
    assert msg(True).endswith("got true")
    assert msg(float("nan")).endswith("got NaN") and msg(float("-inf")).endswith("-Infinity")
    assert msg(0.9) == ("ftp_sparsity=0.9 is outside [0, 0.4], the range the served router "
                        "artifact was tuned for")
    assert "outside [0, 0.4]" in msg(-1)
    # routing off (max 0): only dense passes, and the message says why
    assert validate_sparsity(0, 0.0) == 0.0 and validate_sparsity(None, 0.0) == 0.0
    assert "without FTP routing" in msg(0.2, 0.0)
    assert "FTP routing is off" in msg("0", 0.0)


def test_one_is_never_accepted_whatever_the_max():
    with pytest.raises(ValueError):
        validate_sparsity(1.0, 1.0)
    assert validate_sparsity(0.99, 1.0) == 0.99


def test_request_sparsity_defaults_only_when_absent():
    assert request_sparsity(None, MAX, 0.3) == 0.3
    assert request_sparsity({}, MAX, 0.3) == 0.3
    assert request_sparsity({"other": 1}, MAX, 0.3) == 0.3
    assert request_sparsity({SPARSITY_KEY: None}, MAX, 0.3) == 0.0
    assert request_sparsity({SPARSITY_KEY: 0.1}, MAX, 0.3) == 0.1
    with pytest.raises(ValueError):
        request_sparsity({SPARSITY_KEY: "0.1"}, MAX, 0.3)


def test_requests_for_prompt_logprobs_are_dense_unless_they_set_a_target():
    """A skipped token's prompt log-probability comes from a partly processed state: a
    request asking for them gets the default only if it names its own target."""
    for absent in (None, {}, {"other": 1}):
        assert request_sparsity(absent, MAX, 0.3, prompt_logprobs=True) == 0.0
        assert request_sparsity(absent, MAX, 0.3, prompt_logprobs=False) == 0.3
    assert request_sparsity({SPARSITY_KEY: 0.2}, MAX, 0.3, prompt_logprobs=True) == 0.2
    assert request_sparsity({SPARSITY_KEY: 0.3}, MAX, 0.3, prompt_logprobs=True) == 0.3
    assert request_sparsity({SPARSITY_KEY: None}, MAX, 0.3, prompt_logprobs=True) == 0.0
    with pytest.raises(ValueError, match=SPARSITY_KEY):
        request_sparsity({SPARSITY_KEY: 0.9}, MAX, 0.3, prompt_logprobs=True)


def test_the_worker_passes_prompt_logprobs_to_the_rule():
    from ftp_vllm.plugin.runtime import parse_request_sparsity
    from ftp_vllm.routing.schedule import SparsitySchedule

    schedule = SparsitySchedule.uniform([0.2, MAX], 4)
    assert parse_request_sparsity(None, schedule, 0.3, True) == 0.0
    assert parse_request_sparsity(None, schedule, 0.3) == 0.3
    assert parse_request_sparsity({SPARSITY_KEY: 0.2}, schedule, 0.3, True) == 0.2


@pytest.mark.parametrize("value,expected", CASES, ids=[repr(c[0])[:16] for c in CASES])
def test_server_and_worker_agree(value, expected):
    """The server's HTTP check and the worker's parsing give the same verdict for every case."""
    from ftp_vllm.plugin.runtime import parse_request_sparsity
    from ftp_vllm.routing.schedule import SparsitySchedule
    from ftp_vllm.server.validation import check_request_sparsity

    schedule = SparsitySchedule.uniform([0.2, MAX], 4)
    server_reason = check_request_sparsity(value, MAX, True)
    try:
        worker = parse_request_sparsity({SPARSITY_KEY: value}, schedule, 0.3)
    except ValueError as e:
        worker = None
        assert server_reason == f"vllm_xargs.{e}"  # the same words reach the client
    assert (server_reason is None) == (expected is not None) == (worker is not None)
    if worker is not None:
        assert math.isclose(worker, expected, abs_tol=0)


def test_the_worker_answers_the_contract_rpc_name():
    """The RPC name the server calls is a method of the worker extension the plugin sets."""
    pytest.importorskip("vllm")
    from ftp_vllm import contract
    from ftp_vllm.plugin.config import WORKER_EXTENSION
    from ftp_vllm.plugin.worker import FTPWorkerExtension

    assert WORKER_EXTENSION == f"{FTPWorkerExtension.__module__}.{FTPWorkerExtension.__name__}"
    assert callable(getattr(FTPWorkerExtension, contract.STATS_METHOD))


@pytest.mark.slow
@pytest.mark.vllm
def test_engine_serves_a_refused_value_dense(tiny_llama_dir, tmp_path, capfd):
    """Offline (no server in front), the worker applies the same rule: a numeric string is
    refused, that request runs dense (no routing record) and the reason is logged."""
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams

    from ftp_vllm.artifact import folder_fingerprint
    from ftp_vllm.plugin import routing_overrides
    from ftp_vllm.plugin.offline import shutdown_engine
    from tests.tiny_models import make_artifact

    art = make_artifact(tmp_path / "art", folder_fingerprint(tiny_llama_dir)[0], kind="mlp")
    llm = LLM(str(tiny_llama_dir), hf_overrides=routing_overrides(art, 0.3),
              skip_tokenizer_init=True, dtype="float32", max_model_len=256, seed=0)
    try:
        prompt = {"prompt_token_ids": list(range(3, 43))}

        def run(value):
            sp = SamplingParams(max_tokens=4, temperature=0.0, detokenize=False,
                                ignore_eos=True, extra_args={SPARSITY_KEY: value})
            out = llm.generate([prompt], sp)[0].outputs[0].token_ids
            stats = llm.collective_rpc("ftp_routing_stats", kwargs={"drain_requests": True})
            return list(out), [r["target_sparsity"] for r in stats[0]["requests"]]

        dense, dense_records = run(0.0)
        refused, refused_records = run("0.2")
        _, routed_records = run(0.2)
    finally:
        shutdown_engine(llm)
    assert dense_records == [] and refused_records == [] and routed_records == [0.2]
    assert refused == dense
    out, err = capfd.readouterr()
    assert "send the number 0.2 without quotes" in out + err

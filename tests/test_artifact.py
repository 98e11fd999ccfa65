"""Router artifact: round trip, and a clear error naming the file for every way it can be wrong."""

import json

import pytest
import torch

from ftp_vllm.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    RouterArtifact,
    load_artifact,
    model_fingerprint,
)
from ftp_vllm.routing.layout import TokenLayout
from ftp_vllm.routing.router import MLPRouter, RouterInputs, StaticRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _fp(model):
    return model_fingerprint(model.config, model.model.norm.weight)


def _artifact(model, kind="mlp"):
    torch.manual_seed(1)
    return RouterArtifact(
        kind=kind,
        schedule=SparsitySchedule({0.22: [0.1, 0.2, 0.3, 0.28], 0.4: [0.3, 0.4, 0.5, 0.4]}, 4),
        fingerprint=_fp(model),
        router=MLPRouter() if kind == "mlp" else StaticRouter(),
        provenance={"command": "test"},
    )


def test_round_trip_mlp(tmp_path, model):
    art = _artifact(model)
    art.save(tmp_path / "r")
    loaded = load_artifact(tmp_path / "r")
    assert loaded.kind == "mlp" and loaded.provenance == {"command": "test"}
    assert loaded.schedule.targets == [0.22, 0.4]
    torch.testing.assert_close(loaded.schedule.blocks(0.4), art.schedule.blocks(0.4))
    inp = RouterInputs(
        0, TokenLayout.from_lengths([7]), torch.full((7,), 0.3), torch.rand(7)
    )
    torch.testing.assert_close(loaded.router.logits(inp), art.router.logits(inp))
    loaded.check_model(_fp(model))


def test_round_trip_static(tmp_path, model):
    _artifact(model, "static").save(tmp_path / "s")
    loaded = load_artifact(tmp_path / "s")
    assert isinstance(loaded.router, StaticRouter)
    assert not (tmp_path / "s" / WEIGHTS_FILE).exists()


def test_other_model_is_refused(tmp_path, model):
    _artifact(model).save(tmp_path / "r")
    other = tiny_model("llama", seed=5)
    with pytest.raises(ArtifactError, match="another model.*norm_sha256"):
        load_artifact(tmp_path / "r").check_model(_fp(other), tmp_path / "r")
    qwen = tiny_model("qwen2")
    with pytest.raises(ArtifactError, match="model_type: artifact 'llama', model 'qwen2'"):
        load_artifact(tmp_path / "r").check_model(_fp(qwen), tmp_path / "r")


def _edit(path, fn):
    meta = json.loads((path / CONFIG_FILE).read_text())
    fn(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / CONFIG_FILE).unlink(), "router.json: file not found"),
        (lambda p: (p / CONFIG_FILE).write_text("{not json"), "corrupt JSON"),
        (lambda p: _edit(p, lambda m: m.update(format="other")), "not a ftp-vllm-router"),
        (lambda p: _edit(p, lambda m: m.update(version=99)), "unknown version 99"),
        (lambda p: _edit(p, lambda m: m.pop("schedules")), "malformed contents"),
        (lambda p: _edit(p, lambda m: m["schedules"].update({"0.5": [0.1]})), "entries"),
        (lambda p: _edit(p, lambda m: m["router"].update(kind="gru")), "unknown router kind"),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "router.safetensors: file not found"),
        (lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "corrupt or mismatched"),
        (lambda p: _edit(p, lambda m: m["router"].update(hidden=8)), "corrupt or mismatched"),
    ],
)
def test_every_artifact_error_names_file_and_problem(tmp_path, model, damage, message):
    path = _artifact(model).save(tmp_path / "r")
    damage(path)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(path)
    assert str(tmp_path / "r") in str(err.value)


def test_missing_folder_and_wrong_file(tmp_path):
    with pytest.raises(ArtifactError, match="file not found"):
        load_artifact(tmp_path / "nowhere")
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ArtifactError, match="not a router artifact"):
        load_artifact(tmp_path / "x.bin")


def test_routing_entry_round_trip_window(tmp_path, model):
    art = _artifact(model)
    art.window = 16
    path = art.save(tmp_path / "w")
    assert json.loads((path / CONFIG_FILE).read_text())["routing"] == {"mode": "window",
                                                                        "window": 16}
    loaded = load_artifact(path)
    assert loaded.window == 16 and loaded.mode == "window"


def test_routing_entry_round_trip_exact(tmp_path, model):
    path = _artifact(model, "static").save(tmp_path / "e")
    assert json.loads((path / CONFIG_FILE).read_text())["routing"] == {"mode": "exact"}
    loaded = load_artifact(path)
    assert loaded.window is None and loaded.mode == "exact"


def test_uniform_artifact_carries_its_window(tmp_path, model):
    from ftp_vllm.artifact import uniform_artifact

    path = uniform_artifact(tmp_path / "u", _fp(model), StaticRouter(), "static", (0.2, 0.4),
                            window=32)
    assert load_artifact(path).window == 32
    path = uniform_artifact(tmp_path / "v", _fp(model), StaticRouter(), "static", (0.2, 0.4))
    assert load_artifact(path).mode == "exact"


def test_artifact_without_a_routing_entry_is_exact(tmp_path, model):
    """Artifacts made before window routing carry no ``routing`` entry: they are exact."""
    art = _artifact(model)
    art.window = 16
    path = art.save(tmp_path / "old")
    _edit(path, lambda m: m.pop("routing"))
    loaded = load_artifact(path)
    assert loaded.window is None and loaded.mode == "exact"


@pytest.mark.parametrize(
    "routing, message",
    [
        ({"mode": "windowed", "window": 16}, "unknown routing mode 'windowed'"),
        ({"mode": None}, "unknown routing mode None"),
        ({"window": 16}, "KeyError"),
        ({"mode": "window"}, "KeyError"),
        ({"mode": "window", "window": 0}, "routing window must be a positive number.*got 0"),
        ({"mode": "window", "window": -1}, "routing window must be a positive number.*got -1"),
        ({"mode": "window", "window": "16"}, "routing window must be a positive.*got '16'"),
        ({"mode": "window", "window": True}, "routing window must be a positive.*got True"),
        ({"mode": "window", "window": 16.0}, "routing window must be a positive.*got 16.0"),
        ("window", "malformed contents"),
    ],
)
def test_bad_routing_entry_names_the_file(tmp_path, model, routing, message):
    path = _artifact(model).save(tmp_path / "r")
    _edit(path, lambda m: m.update(routing=routing))
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(path)
    assert str(path / CONFIG_FILE) in str(err.value)
    assert "malformed contents" in str(err.value)

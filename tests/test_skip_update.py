"""The skip update (docs/ROUTER.md, "The skip update"): what it computes in the reference, how
it is fitted, stored and counted, and the errors a wrong file gets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftp_vllm.artifact import (
    CONFIG_FILE,
    DEFAULT_ARTIFACT,
    EXACT_ARTIFACT,
    SKIP_UPDATE_FILE,
    ArtifactError,
    RouterArtifact,
    load_artifact,
    model_fingerprint,
)
from ftp_vllm.flops import BlockShape, prefill_flops
from ftp_vllm.reference import routed_forward
from ftp_vllm.routing.router import MaskRouter, StaticRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from ftp_vllm.routing.skip_update import SkipUpdate
from ftp_vllm.training.losses import distillation_loss
from ftp_vllm.training.skip_distill import DistillConfig, distill_skip_update, last_token_kl
from ftp_vllm.training.skip_fit import _Moments, block_moments, fit_skip_update
from tests.tiny_models import random_skip_update, tiny_model

HALF = torch.full((4,), 0.5, dtype=torch.float64)
FTP_VLLM = str(Path(sys.executable).parent / "ftp-vllm")  # the console script users run


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _artifact(model, update):
    cfg = model.config
    return RouterArtifact(
        kind="static",
        schedule=SparsitySchedule({0.3: [0.3] * cfg.num_hidden_layers}, cfg.num_hidden_layers),
        fingerprint=model_fingerprint(cfg, model.model.norm.weight),
        router=StaticRouter(), provenance={"command": "test"}, window=16, skip_update=update,
    )


def _update(model, rank=4, seed=0):
    return random_skip_update(model.config.num_hidden_layers, model.config.hidden_size, rank,
                              seed)


def test_a_skipped_token_gains_the_update_of_its_normed_input(model):
    """One block, one skipped token: its state after the block is its state before plus
    delta(input norm of that state); every other token is as without the update."""
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(0))
    update = _update(model)
    masks = torch.ones(4, 9, dtype=torch.bool)
    masks[3, 4] = False  # only the last block skips token 4: the logits show the state
    with torch.no_grad():
        plain = routed_forward(model, ids, router=MaskRouter(masks), block_sparsity=HALF)
        hidden = {}
        hook = model.model.layers[3].input_layernorm.register_forward_hook(
            lambda _m, inp, out: hidden.update(h=inp[0], x=out))
        try:
            got = routed_forward(model, ids, router=MaskRouter(masks), block_sparsity=HALF,
                                 skip_update=update)
        finally:
            hook.remove()
        want_h4 = hidden["h"][4] + update.delta(3, hidden["x"][4:5])[0]
        want = model.lm_head(model.model.norm(want_h4))
    torch.testing.assert_close(got.logits[4], want)
    others = [i for i in range(9) if i != 4]
    assert torch.equal(got.logits[others], plain.logits[others])
    assert not torch.allclose(got.logits[4], plain.logits[4])


def test_no_skip_no_change_and_zero_update_is_no_update(model):
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1))
    dense = routed_forward(model, ids).logits
    with_update = routed_forward(model, ids, router=StaticRouter(),
                                 block_sparsity=torch.zeros(4), skip_update=_update(model))
    assert torch.equal(with_update.logits, dense)  # sparsity 0: nothing skipped, no update
    zero = SkipUpdate(*(torch.zeros_like(t) for t in (_update(model).down, _update(model).up,
                                                      _update(model).bias)))
    plain = routed_forward(model, ids, router=StaticRouter(), block_sparsity=HALF)
    zeroed = routed_forward(model, ids, router=StaticRouter(), block_sparsity=HALF,
                            skip_update=zero)
    assert torch.equal(plain.logits, zeroed.logits)
    assert torch.equal(plain.keep, zeroed.keep)


def test_the_fit_recovers_a_low_rank_linear_update():
    """Updates that are an exact rank-3 linear function of x plus a bias: the fit at rank 3
    with a tiny ridge predicts them; at rank 1 it cannot."""
    gen = torch.Generator().manual_seed(0)
    hidden, n = 12, 4000
    a, b = torch.randn(hidden, 3, generator=gen), torch.randn(3, hidden, generator=gen)
    bias = torch.randn(hidden, generator=gen)
    x = torch.randn(n, hidden, generator=gen) + 0.5
    d = x @ a @ b + bias
    moments = _Moments(hidden)
    moments.add(x, d)
    fit = fit_skip_update([moments], rank=3, ridge=1e-6)
    err = (fit.delta(0, x) - d).norm() / d.norm()
    assert err < 0.01, float(err)  # bf16 storage rounds to about 0.4%
    low = fit_skip_update([moments], rank=1, ridge=1e-6)
    assert (low.delta(0, x) - d).norm() / d.norm() > 0.1
    with pytest.raises(ValueError, match="rank must lie in"):
        fit_skip_update([moments], rank=hidden + 1)


def test_fit_on_the_model_explains_part_of_each_blocks_update(model):
    seqs = [torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(s))
            for s in range(6)]
    moments = block_moments(model, seqs)
    assert [m.n for m in moments] == [6 * 39] * 4  # first tokens left out
    update = fit_skip_update(moments, rank=8)
    # dense states of a fresh sequence: the fitted update beats no update at every block
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry of hidden_states is after the final norm
        x = model.model.layers[i].input_layernorm(hs[i][0])
        d = hs[i + 1][0] - hs[i][0]
        assert (update.delta(i, x) - d).norm() < d.norm(), i


def test_distillation_lowers_the_routed_models_kl_below_the_fit(model):
    """Trained from the fit on the routed output's KL, with the artifact's own decisions, a
    dense tail like a reply and the schedule's targets, the update leaves a fraction of the
    fit's KL on its prompts; the fit beats no update."""
    art = _artifact(model, None)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (48,), generator=gen) for _ in range(6)]
    fitted = fit_skip_update(block_moments(model, prompts), rank=8)
    tuned, stats = distill_skip_update(model, fitted, prompts, art.router, art.schedule,
                                       art.window, DistillConfig(steps=60, lr=3e-4, tail=8),
                                       progress=False)
    assert tuned.rank == 8 and len(stats.kl) == 60
    assert torch.equal(tuned.down, tuned.down.to(torch.bfloat16).float())  # stored as saved

    def reply_kl(update):  # the objective: 40 routed prompt tokens, 8 dense, KL at the last 9
        at, kls = torch.arange(39, 48), []
        for ids in prompts:
            dense = routed_forward(model, ids, logits_at=at).logits
            routed = routed_forward(model, ids, [48], art.router, art.schedule.blocks(0.3),
                                    routed_lengths=[40], logits_at=at, window=art.window,
                                    skip_update=update).logits
            kls.append(float(distillation_loss(routed, dense)))
        return sum(kls) / len(kls)

    with torch.no_grad():
        none, fit, tuned_kl = reply_kl(None), reply_kl(fitted), reply_kl(tuned)
    assert tuned_kl < 0.5 * fit < 0.5 * none, (none, fit, tuned_kl)
    with torch.no_grad():
        whole = [last_token_kl(model, prompts, art.router, {"0.3": art.schedule.blocks(0.3)},
                               art.window, u)["0.3"] for u in (fitted, tuned)]
    assert whole[1] < whole[0], whole  # whole routed prompts, read at the last token
    with pytest.raises(ValueError, match="longer than the dense tail"):
        distill_skip_update(model, fitted, [torch.arange(9)], art.router, art.schedule,
                            art.window, DistillConfig(steps=1, tail=8), progress=False)


def test_artifact_round_trip_keeps_the_update_in_bfloat16(tmp_path, model):
    update = _update(model)
    _artifact(model, update).save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a").skip_update
    assert loaded is not None and loaded.rank == 4
    for got, want in zip((loaded.down, loaded.up, loaded.bias),
                         (update.down, update.up, update.bias), strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want.to(torch.bfloat16).float())
    meta = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert meta["skip_update"] == {"kind": "low_rank_linear", "rank": 4}
    # saved again without it: the stale file goes too
    _artifact(model, None).save(tmp_path / "a")
    assert load_artifact(tmp_path / "a").skip_update is None
    assert not (tmp_path / "a" / SKIP_UPDATE_FILE).exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "rank", "layers", "kind"])
def test_a_wrong_skip_update_names_the_file(tmp_path, model, damage):
    path = tmp_path / "a"
    _artifact(model, _update(model)).save(path)
    cfg = path / CONFIG_FILE
    meta = json.loads(cfg.read_text())
    if damage == "missing":
        (path / SKIP_UPDATE_FILE).unlink()
        want = f"{path / SKIP_UPDATE_FILE}: file not found"
    elif damage == "corrupt":
        (path / SKIP_UPDATE_FILE).write_bytes(b"not safetensors")
        want = "corrupt or mismatched skip update"
    elif damage == "rank":
        meta["skip_update"]["rank"] = 5
        want = "rank 4; router.json and the model say"
    elif damage == "layers":
        from safetensors.torch import save_file

        other = random_skip_update(3, model.config.hidden_size, 4)
        save_file(other.state_dict(), str(path / SKIP_UPDATE_FILE))
        want = "skip update of 3 layers"
    else:
        meta["skip_update"]["kind"] = "mlp"
        want = "unknown skip update"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert want in str(err.value) and str(path) in str(err.value)


def test_flops_count_the_update_of_every_skipped_pair():
    shape = BlockShape(hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16)
    ranked = dataclasses.replace(shape, skip_rank=8)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    pos = torch.arange(3)
    extra = prefill_flops(ranked, keep, pos) - prefill_flops(shape, keep, pos)
    assert extra == 3 * 4 * 64 * 8
    dense = torch.ones(2, 3, dtype=torch.bool)
    assert prefill_flops(ranked, dense, pos) == prefill_flops(shape, dense, pos)


def test_shipped_artifacts():
    """The served default carries a skip update; exact mode stays FTP as published."""
    default = load_artifact(DEFAULT_ARTIFACT)
    assert default.mode == "window" and default.skip_update is not None
    assert default.skip_update.num_layers == default.num_layers
    assert "skip-update" in default.provenance["skip_update"]["command"]
    assert load_artifact(EXACT_ARTIFACT).skip_update is None


@pytest.mark.slow
def test_skip_update_command(tmp_path):
    """`ftp-vllm skip-update` as a user runs it: a copy of the artifact with the fitted
    update, the command and its data in the provenance, the schedules untouched."""
    out = tmp_path / "with-update"
    res = subprocess.run(
        [FTP_VLLM, "skip-update", "--router", str(DEFAULT_ARTIFACT),
         "--rank", "8", "--num-seqs", "1", "--chat-lengths", "128", "--distill-steps", "3",
         "--tune-prompts", "1", "--output", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fitted rank 8 on" in res.stdout
    art, base = load_artifact(out), load_artifact(DEFAULT_ARTIFACT)
    assert art.skip_update.rank == 8 and art.window == base.window
    torch.testing.assert_close(art.schedule.blocks(0.3), base.schedule.blocks(0.3))
    info = art.provenance["skip_update"]
    assert "--rank 8" in info["command"] and "train split" in info["data"]
    assert info["distillation"]["config"]["steps"] == 3
    assert set(info["tune_kl_fitted"]) == set(info["distillation"]["tune_kl_after"]) == {
        f"{t:g}" for t in base.schedule.targets}
    assert "first-reply-token KL on tune prompts" in res.stdout
    for flags, message in ((["--rank", "0"], "--rank must lie in [1, 576]"),
                           (["--distill-steps", "-1"], "--distill-steps must be >= 0"),
                           (["--distill-lr", "0"], "--distill-lr must be > 0"),
                           (["--tune-prompts", "-1"], "--tune-prompts must be >= 0")):
        bad = subprocess.run(
            [FTP_VLLM, "skip-update", "--router", str(DEFAULT_ARTIFACT), *flags,
             "--output", str(tmp_path / "bad")],
            capture_output=True, text=True, timeout=600, check=False)
        assert bad.returncode != 0 and message in bad.stderr, flags
        assert not (tmp_path / "bad").exists()

"""Evaluation scoring: lm-eval tokenisation, log-likelihood choice, acc vs acc_norm, batching,
sparsity/FLOP accounting and the method plumbing, on a tiny random Llama."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from ftp_vllm.artifact import ArtifactError, RouterArtifact, model_fingerprint
from ftp_vllm.data.tasks import MCItem
from ftp_vllm.eval.harness import (
    encode_pair,
    evaluate_task,
    norm_length,
    perplexity,
    predict,
)
from ftp_vllm.eval.methods import build_method
from ftp_vllm.eval.scoring import ReferenceScorer, Scorer, ScoreStats, pack
from ftp_vllm.flops import BlockShape, prefill_flops
from ftp_vllm.reference import routed_forward
from ftp_vllm.routing.router import DenseRouter, MLPRouter, StaticRouter
from ftp_vllm.routing.schedule import SparsitySchedule
from tests.tiny_models import tiny_model


class WordEncoder:
    """A BPE-like toy tokenizer: a token is an optional leading space plus a word, or a run of
    spaces; ids are assigned on first sight (1..127), 0 is the prefix token."""

    prefix_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        out = []
        for tok in re.findall(r" ?[^ ]+| +", text):
            if tok not in self.vocab:
                self.vocab[tok] = len(self.vocab) % 127 + 1
            out.append(self.vocab[tok])
        return out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _item(contexts, continuations, label, task="toy"):
    return MCItem(task=task, id="0", contexts=tuple(contexts), continuations=tuple(continuations),
                  choices=tuple(c.strip() for c in continuations), label=label)


@torch.no_grad()
def _hand_loglikelihood(model, context, continuation):
    """sum_t log p(cont_t | context, cont_<t) from transformers' own forward."""
    ids = torch.tensor(context + continuation)[None]
    logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(context)
    return sum(logp[n + i - 1, tok].item() for i, tok in enumerate(continuation))


# ------------------------------------------------------------------------------ tokenisation


def test_encode_pair_moves_trailing_space_to_continuation():
    enc = WordEncoder()
    ctx, cont = encode_pair(enc, "Question: why?\nAnswer: ", "because")
    assert ctx == enc.encode("Question: why?\nAnswer:")
    assert cont == enc.encode(" because")  # one token, with its leading space
    assert len(cont) == 1


def test_encode_pair_splits_whole_encoding_at_context_length():
    class Merging(WordEncoder):
        """Merges 'ab' + 'c' into one token 'abc' at the boundary, like real BPE can."""

        def encode(self, text):
            return super().encode(text.replace("abc", "ABC"))

    enc = Merging()
    ctx, cont = encode_pair(enc, "x ab", "c d")
    whole = enc.encode("x abc d")
    assert ctx == enc.encode("x ab") and len(ctx) == 2
    assert cont == whole[2:]  # split at len(encode(context)), as lm-eval does
    assert ctx + cont != enc.encode("x ab") + enc.encode("c d")


def test_encode_pair_empty_context_uses_prefix_token():
    enc = WordEncoder()
    assert encode_pair(enc, "", "hello world") == ([0], enc.encode("hello world"))


def test_norm_length_is_bytes_without_delimiter():
    assert norm_length(" abc") == 3
    assert norm_length(" é") == 2  # UTF-8 bytes
    assert norm_length("") == 1


# --------------------------------------------------------------------------------- scoring


def test_reference_scorer_matches_hand_loglikelihood(model):
    reqs = [([5, 9, 17], [3, 4]), ([1], [7]), ([8, 8, 2, 6, 1], [11, 12, 13])]
    scorer = ReferenceScorer(model, DenseRouter())
    got = scorer.logprobs(reqs)
    want = [_hand_loglikelihood(model, c, k) for c, k in reqs]
    assert got == pytest.approx(want, abs=1e-4)
    assert isinstance(scorer, Scorer)


def test_harness_picks_the_hand_computed_choice(model):
    enc = WordEncoder()
    context = "the cat sat on the"
    conts = [" mat", " big red hat", " dog", " moon today"]
    hand = []
    for cont in conts:
        c, k = encode_pair(enc, context, cont)
        hand.append(_hand_loglikelihood(model, c, k))
    best = max(range(4), key=lambda i: hand[i])
    best_norm = max(range(4), key=lambda i: hand[i] / norm_length(conts[i]))
    for label in range(4):
        res = evaluate_task("toy", [_item([context] * 4, conts, label)], enc,
                            ReferenceScorer(model), progress=False)
        assert res.acc == float(label == best)
        assert res.acc_norm == float(label == best_norm)
        assert res.predictions == [("0", label, best, best_norm)]


class FixedScorer:
    """A scorer with canned answers: what a non-reference scorer plugs in as."""

    def __init__(self, table):
        self.table = table
        self.stats = ScoreStats()

    def logprobs(self, requests):
        self.stats.prompts += len(requests)
        return [self.table[tuple(k)] for _, k in requests]

    def describe(self):
        return {"scorer": "fixed"}


def test_acc_and_acc_norm_differ_on_length():
    enc = WordEncoder()
    conts = [" a", " bbbbbbbb"]  # 1 byte vs 8 bytes
    short, long_ = (tuple(encode_pair(enc, "q", c)[1]) for c in conts)
    scorer = FixedScorer({short: -2.0, long_: -4.0})
    assert isinstance(scorer, Scorer)
    item = _item(["q", "q"], conts, label=1)
    # acc: -2 > -4 picks the short answer; acc_norm: -2/1 < -4/8 picks the long one.
    assert predict(item, [-2.0, -4.0]) == (0, 1)
    res = evaluate_task("toy", [item], enc, scorer, progress=False)
    assert (res.acc, res.acc_norm) == (0.0, 1.0)
    assert scorer.stats.prompts == 2
    d = res.to_dict()
    assert (d["pred"], d["pred_norm"], d["correct"], d["correct_norm"]) == ("0", "1", "0", "1")
    assert d["chance"] == 0.5


def test_shared_continuation_makes_acc_norm_equal_acc():
    enc = WordEncoder()
    item = _item(["Tom gave Ann", "Ann gave Tom"], [" the book.", " the book."], label=0)
    k = tuple(encode_pair(enc, "Tom gave Ann", " the book.")[1])
    res = evaluate_task("toy", [item], enc, FixedScorer({k: -3.0}), progress=False)
    assert res.acc == res.acc_norm == 1.0  # tie: first choice, both metrics


def test_flattened_batches_equal_one_by_one(model):
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for n_ctx, n_cont in [(7, 3), (2, 1), (15, 4), (9, 9), (1, 2), (30, 5)]:
        ids = torch.randint(1, 128, (n_ctx + n_cont,), generator=gen).tolist()
        reqs.append((ids[:n_ctx], ids[n_ctx:]))
    blocks = torch.tensor([0.2, 0.5, 0.4, 0.3], dtype=torch.float64)
    for router in (StaticRouter(), _mlp_router()):
        one = ReferenceScorer(model, router, blocks, batch_tokens=1)
        flat = ReferenceScorer(model, router, blocks, batch_tokens=10_000)
        a, b = one.logprobs(reqs), flat.logprobs(reqs)
        assert a == pytest.approx(b, abs=1e-4)
        assert one.stats.kept_token_blocks == flat.stats.kept_token_blocks
        assert one.stats.flops == pytest.approx(flat.stats.flops)
        assert one.stats.prompts == flat.stats.prompts == len(reqs)
        assert flat.stats.sparsity > 0.1


def _mlp_router():
    torch.manual_seed(3)
    r = MLPRouter()
    with torch.no_grad():
        r.net[2].bias.copy_(torch.tensor([0.0, -0.05]))
    return r.eval()


def test_pack_respects_budget_and_order():
    assert pack([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    assert pack([3], 1) == [[0]]


def test_stats_measure_sparsity_and_flops(model):
    ids = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks = torch.full((4,), 0.5, dtype=torch.float64)
    scorer = ReferenceScorer(model, StaticRouter(), blocks)
    scorer.logprobs([(ids[:30], ids[30:])])
    out = routed_forward(model, torch.tensor(ids), router=StaticRouter(), block_sparsity=blocks)
    shape = BlockShape.from_config(model.config)
    pos = torch.arange(40)
    assert scorer.stats.tokens == 40 and scorer.stats.token_blocks == 160
    assert scorer.stats.sparsity == pytest.approx(1 - out.keep.float().mean().item())
    assert scorer.stats.sparsity == pytest.approx(0.5)  # 20 of 40 skipped per block
    dense_keep = torch.ones(4, 40, dtype=torch.bool)
    want = prefill_flops(shape, out.keep, pos) / prefill_flops(shape, dense_keep, pos)
    assert scorer.stats.flop_fraction == pytest.approx(want)
    assert 0.5 < scorer.stats.flop_fraction < 1.0  # skipped tokens still pay K/V

    dense = ReferenceScorer(model)
    dense.logprobs([(ids[:30], ids[30:])])
    assert dense.stats.sparsity == 0.0 and dense.stats.flop_fraction == 1.0


def test_perplexity_from_token_logprobs(model):
    enc = WordEncoder()
    passages = ["a b c d e f", "g h i"]
    res = perplexity(passages, enc, ReferenceScorer(model), progress=False)
    nll = -sum(_hand_loglikelihood(model, [0], enc.encode(p)) for p in passages)
    word_nll = -sum(_hand_loglikelihood(model, [0, *enc.encode(p[:-2])], enc.encode(p[-2:]))
                    for p in passages)
    assert res.tokens == 9 and res.word_tokens == 2
    assert res.perplexity == pytest.approx(math.exp(nll / 9), rel=1e-4)
    assert res.word_perplexity == pytest.approx(math.exp(word_nll / 2), rel=1e-4)

    class SumsOnly:  # a scorer without token_logprobs: asked twice, same answer
        def __init__(self, inner):
            self.inner, self.stats = inner, inner.stats

        def logprobs(self, requests):
            return self.inner.logprobs(requests)

        def describe(self):
            return {}

    again = perplexity(passages, enc, SumsOnly(ReferenceScorer(model)), progress=False)
    assert again.perplexity == pytest.approx(res.perplexity, rel=1e-6)
    assert again.word_perplexity == pytest.approx(res.word_perplexity, rel=1e-6)


# --------------------------------------------------------------------------------- methods


def test_methods_build_the_right_scorers(model, tmp_path):
    L = model.config.num_hidden_layers
    calib = lambda: [[0, 5, 6, 7, 8, 9, 10, 11]]  # noqa: E731
    dense = build_method("dense", model, 0.3).scorer
    assert isinstance(dense.router, DenseRouter)
    uni = build_method("static-uniform", model, 0.3)
    assert isinstance(uni.scorer.router, StaticRouter)
    assert uni.info["block_sparsity"] == [0.3] * L
    short = build_method("shortgpt", model, 0.25, calibration=calib, log=lambda s: None)
    assert short.scorer.num_layers == L - 1 and short.info["shortgpt"]["k"] == 1

    sched = SparsitySchedule({0.3: [0.1, 0.5, 0.4, 0.2]}, L)
    fp = model_fingerprint(model.config, model.model.norm.weight)
    RouterArtifact("mlp", sched, fp, _mlp_router()).save(tmp_path / "art")
    ftp = build_method("ftp", model, 0.3, artifact=tmp_path / "art")
    assert isinstance(ftp.scorer.router, MLPRouter)
    assert ftp.info["block_sparsity"] == pytest.approx([0.1, 0.5, 0.4, 0.2])
    static = build_method("static", model, 0.15, artifact=tmp_path / "art")
    assert static.info["block_sparsity"] == pytest.approx([0.05, 0.25, 0.2, 0.1])

    other = tiny_model("llama", seed=1)
    with pytest.raises(ArtifactError, match="another model"):
        build_method("ftp", other, 0.3, artifact=tmp_path / "art")
    RouterArtifact("static", sched, fp, StaticRouter()).save(tmp_path / "st")
    with pytest.raises(ValueError, match="trained"):
        build_method("ftp", model, 0.3, artifact=tmp_path / "st")
    with pytest.raises(ValueError, match="outside"):
        build_method("static", model, 0.5, artifact=tmp_path / "art")


def test_window_method_routes_aligned_windows(model, tmp_path):
    """--method window: the artifact's router and schedule over its windows (the served
    configuration); each method refuses the other mode's artifact; FLOPs count attention over
    prompt positions, not positions inside a window."""
    L = model.config.num_hidden_layers
    sched = SparsitySchedule({0.3: [0.1, 0.5, 0.4, 0.2]}, L)
    fp = model_fingerprint(model.config, model.model.norm.weight)
    RouterArtifact("static", sched, fp, StaticRouter(), window=8).save(tmp_path / "win")
    RouterArtifact("mlp", sched, fp, _mlp_router()).save(tmp_path / "exact")
    win = build_method("window", model, 0.3, artifact=tmp_path / "win")
    assert win.scorer.window == 8 and win.info["window"] == 8
    assert win.info["router_artifact"]["routing"] == "window"
    assert win.info["block_sparsity"] == pytest.approx([0.1, 0.5, 0.4, 0.2])
    with pytest.raises(ValueError, match="window-routing artifact"):
        build_method("window", model, 0.3, artifact=tmp_path / "exact")
    with pytest.raises(ValueError, match="exact"):
        build_method("ftp", model, 0.3, artifact=tmp_path / "win")
    with pytest.raises(ArtifactError, match="smollm2-135m-instruct-window"):  # the default
        build_method("window", model, 0.3)

    ids = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    win.scorer.logprobs([(ids[:30], ids[30:])])
    blocks = sched.blocks(0.3)
    out = routed_forward(model, torch.tensor(ids), router=StaticRouter(), block_sparsity=blocks,
                         window=8)
    exact = routed_forward(model, torch.tensor(ids), router=StaticRouter(),
                           block_sparsity=blocks)
    assert not torch.equal(out.keep, exact.keep)  # the windows change the decisions
    shape = BlockShape.from_config(model.config)
    pos = torch.arange(40)
    dense_keep = torch.ones(L, 40, dtype=torch.bool)
    want = prefill_flops(shape, out.keep, pos) / prefill_flops(shape, dense_keep, pos)
    assert win.scorer.stats.sparsity == pytest.approx(1 - out.keep.float().mean().item())
    assert win.scorer.stats.flop_fraction == pytest.approx(want)

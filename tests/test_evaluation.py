"""The evaluator against direct, obviously correct computations (numpy and plain loops).

Random logits are quantised so that argmax ties are common, and one member gives probability 0
to some tokens (targets included), so every convention is exercised: ties go to the lowest token
id, 0 log 0 = 0, an impossible target has infinite NLL.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.config.schema import DataConfig, EvalConfig, ExperimentConfig, ModelConfig
from ensemble.core.combining import fit_mixture_weights, mixture_nll
from ensemble.core.data import EvalBlocks
from ensemble.core.loading import load_members
from ensemble.core.members import MemberSpec, build_model, fit_model_config, load_model_config, save_member
from ensemble.core.metrics import ECE_BINS, SUMS, poisson_weights, row_result
from ensemble.core.tokenization import load_tokenizer
from ensemble.errors import EnsembleError
from ensemble.evaluate.context import Evaluation
from ensemble.evaluate.scoring import BootstrapPlan, Fitted, Scorer
from ensemble.evaluate.sections import build_results
from ensemble.evaluate.stream import evaluate_members

# --------------------------------------------------------------------------------------------
# Brute force


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; -inf logits get probability exactly 0."""
    x = logits.astype(np.float64)
    x = x - np.max(x, axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def brute_row(q: np.ndarray, y: np.ndarray) -> dict:
    """Every metric of one row, with loops: q [n, V] probabilities (float64)."""
    n, vocab = q.shape
    correct = top5 = 0
    nll = brier = 0.0
    bins = [[0, 0.0, 0.0] for _ in range(ECE_BINS)]
    for t in range(n):
        row, target = q[t], int(y[t])
        best = max(row)
        pred = min(v for v in range(vocab) if row[v] == best)  # lowest id among ties
        rank = sum(1 for v in range(vocab) if row[v] > row[target] or (row[v] == row[target] and v < target))
        correct += pred == target
        top5 += rank < 5
        nll += -math.log(row[target]) if row[target] > 0 else math.inf
        brier += sum(p * p for p in row) - 2 * row[target] + 1
        b = min(int(best * ECE_BINS), ECE_BINS - 1)
        bins[b][0] += 1
        bins[b][1] += best
        bins[b][2] += pred == target
    ece = sum(abs(acc - conf) for _, conf, acc in bins) / n
    return {
        "accuracy": correct / n,
        "top5_accuracy": top5 / n,
        "nll": nll / n,
        "perplexity": math.exp(nll / n),
        "ece": ece,
        "brier": brier / n,
        "tokens": n,
    }


def brute_pred(q: np.ndarray) -> np.ndarray:
    return np.array([min(np.flatnonzero(r == r.max())) for r in q])


def near_ties(q: np.ndarray, rel: float = 1e-5) -> int:
    """Positions whose 6 most probable tokens include two different values within ``rel`` of
    each other: there, float32 and float64 may order tokens differently."""
    top = -np.sort(-q, axis=1)[:, :6]
    close = np.abs(np.diff(top, axis=1)) <= rel * np.maximum(top[:, :-1], 1e-300)
    return int((close & (np.diff(top, axis=1) != 0)).any(axis=1).sum())


def assert_row(got: dict, want: dict, rel: float = 1e-5, ambiguous: int = 0) -> None:
    """Counts must match exactly, except at ``ambiguous`` near-tie positions."""
    assert got["tokens"] == want["tokens"]
    for key in ("accuracy", "top5_accuracy"):
        assert abs(got[key] - want[key]) * want["tokens"] <= ambiguous + 1e-9, key
    for key in ("nll", "perplexity", "ece", "brier"):
        if math.isinf(want[key]):
            assert math.isinf(got[key]), key
        else:  # ECE also counts correct positions: each ambiguous one can move it by 1/tokens
            slack = ambiguous / want["tokens"] if key == "ece" else 0.0
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-9 + slack), key


def make_synthetic(quantised: bool):
    """3 members' logits over 9 tokens for 240 positions in 12 blocks, with zeros (probability 0),
    and, when quantised, many exact ties."""
    g = np.random.default_rng(0)
    n, vocab, members = 240, 9, 3
    logits = [g.normal(size=(n, vocab)) * 2 for _ in range(members)]
    if quantised:
        logits = [np.round(x) / 2 for x in logits]
    zero = g.random((n, vocab)) < 0.2
    logits[1][zero] = -np.inf  # member-1 gives these tokens probability 0
    logits[1][np.all(zero, axis=1), 0] = 0.0  # but never all of them
    y = g.integers(0, vocab, n)
    assert np.isneginf(logits[1][np.arange(n), y]).any()  # some targets are impossible for member-1
    blocks = np.repeat(np.arange(12), n // 12)
    return [x.astype(np.float32) for x in logits], y, blocks


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(quantised=True)


# The three forms of the chunk scoring (see ensemble/evaluate/scoring.py): eager CPU code that resolves ties
# on the few rows that have them, the branch-free eager form GPUs use, and the compiled form.
MODES = {
    "fixups": {"branch_free": False},
    "branch-free": {"branch_free": True},
    "compiled": {"compile": True},
}


def _score(logits, y, blocks, weights, samples=40, chunk=70, mode="fixups") -> Scorer:
    scorer = Scorer(
        ["m0", "m1", "m2"],
        ["mean_prob", "mean_logit", "geometric", "weighted"],
        Fitted(np.ones(3), weights),
        BootstrapPlan(samples, 5),
        **MODES[mode],
    )
    return feed(scorer, logits, y, blocks, chunk)


def feed(scorer: Scorer, logits, y, blocks, chunk: int) -> Scorer:
    """Scores the positions as one batch, ``chunk`` positions at a time, as the evaluator feeds them."""
    scorer.begin_batch(int(blocks.max()) + 1, "cpu")
    for s in range(0, len(y), chunk):
        scorer.score(
            [torch.from_numpy(x[s : s + chunk]) for x in logits],
            torch.from_numpy(y[s : s + chunk]),
            torch.from_numpy(blocks[s : s + chunk]),
        )
    scorer.end_batch(0)
    return scorer


@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=pytest.mark.slow) if m == "compiled" else m for m in MODES]
)  # compiling takes ~50 s
@pytest.mark.parametrize("quantised", [True, False], ids=["with-ties", "continuous"])
def test_every_row_matches_brute_force(quantised, mode):
    logits, y, blocks = make_synthetic(quantised)
    w = np.array([0.5, 0.3, 0.2])
    scorer = _score(logits, y, blocks, w, mode=mode)
    assert scorer.compiled == (mode == "compiled")  # compiled, not fallen back to eager
    p = [softmax64(x) for x in logits]
    with np.errstate(divide="ignore"):
        logp = [np.log(q) for q in p]
    expected = {
        "m0": p[0],
        "m1": p[1],
        "m2": p[2],
        "mean_prob": np.mean(p, axis=0),
        "first-2": np.mean(p[:2], axis=0),
        "mean_logit": softmax64(np.mean(np.stack(logits).astype(np.float64), axis=0)),
        "geometric": softmax64(np.mean(logp, axis=0)),
        "weighted": sum(wi * qi for wi, qi in zip(w, p, strict=True)),
    }
    assert set(expected) == set(scorer.rows)
    for name, q in expected.items():
        # Members' ties are exact (equal logits): their counts must match exactly. A combined row
        # can hold entries equal in exact arithmetic but not after rounding (geometric: sums of
        # float32 log-probabilities of permuted values), which float32 and float64 may order
        # differently: only those near-tie positions may differ.
        ambiguous = 0 if name in ("m0", "m1", "m2") else near_ties(q)
        if not quantised:
            assert ambiguous == 0, name
        elif name != "geometric":
            assert ambiguous <= len(y) // 20, (name, ambiguous)
        got, want = row_result(scorer.sums[scorer.index[name]]), brute_row(q, y)
        if name.startswith("first-"):  # curve rows keep tokens, top-1 and NLL only
            got = {k: got[k] for k in ("tokens", "accuracy", "nll", "perplexity")}
            want = {k: want[k] for k in got}
            assert got["tokens"] == want["tokens"]
            assert abs(got["accuracy"] - want["accuracy"]) * want["tokens"] <= ambiguous + 1e-9
            assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)
            continue
        assert_row(got, want, ambiguous=ambiguous)
    assert math.isinf(row_result(scorer.sums[scorer.index["m1"]])["nll"])  # impossible targets
    # the entropies of the uncertainty decomposition (tests/test_uncertainty_eval.py checks the
    # rest): every form, the compiled one included
    for name in ("m0", "m1", "m2", "mean_prob", "first-2"):
        h = -np.where(
            expected[name] > 0, expected[name] * np.log(np.where(expected[name] > 0, expected[name], 1)), 0
        )
        assert scorer.sums[scorer.index[name], SUMS.entropy] == pytest.approx(h.sum(), rel=1e-5), name
    mean_members = np.mean([scorer.sums[scorer.index[f"m{i}"], SUMS.entropy] for i in range(3)])
    total = scorer.sums[scorer.index["mean_prob"], SUMS.entropy]
    assert scorer.decomposition["epistemic"] == pytest.approx(total - mean_members, rel=1e-4)
    if quantised:  # ties really happened in the members' argmax
        assert any((x[t] == x[t].max()).sum() > 1 for x in logits for t in range(len(y)))


@pytest.mark.parametrize("mode", ["fixups", "branch-free"])
def test_diversity_and_disagreement_match_brute_force(synthetic, mode):
    logits, y, blocks = synthetic
    scorer = _score(logits, y, blocks, np.full(3, 1 / 3), mode=mode)
    p = [softmax64(x) for x in logits]
    m = np.mean(p, axis=0)
    kl = 0.0
    for q in p:  # KL(p_i || m), 0 log 0 = 0
        kl += sum(
            q[t, v] * math.log(q[t, v] / m[t, v])
            for t in range(len(y))
            for v in range(q.shape[1])
            if q[t, v] > 0
        )
    assert scorer.kl[0] / len(y) == pytest.approx(kl / 3 / len(y), rel=1e-5)
    preds = [brute_pred(q) for q in p]
    for q_index, (i, j) in enumerate(itertools.combinations(range(3), 2)):
        assert scorer.disagree[q_index] == int((preds[i] != preds[j]).sum())


def test_bootstrap_replicates_match_brute_force(synthetic):
    logits, y, blocks = synthetic
    scorer = _score(logits, y, blocks, np.full(3, 1 / 3), samples=40)
    w = poisson_weights(5, np.arange(12), 40)  # [samples, blocks]
    mixture = np.mean([softmax64(x) for x in logits], axis=0)
    correct = (brute_pred(mixture) == y).astype(float)
    nll = -np.log(mixture[np.arange(len(y)), y])
    per_block = np.array(
        [[correct[blocks == b].sum(), nll[blocks == b].sum(), (blocks == b).sum()] for b in range(12)]
    )
    r = scorer.index["mean_prob"]
    np.testing.assert_allclose(scorer.boot[:, r, 0], w @ per_block[:, 0])
    np.testing.assert_allclose(scorer.boot[:, r, 1], w @ per_block[:, 1], rtol=1e-5)
    np.testing.assert_allclose(scorer.boot_tokens, w @ per_block[:, 2])
    # a block left out of a replicate cannot make it infinite: member-1's replicates stay finite
    # exactly where no included block holds an impossible target
    impossible_target = softmax64(logits[1])[np.arange(len(y)), y] == 0
    impossible = np.array([impossible_target[blocks == b].any() for b in range(12)])
    finite = ~((w[:, impossible] > 0).any(axis=1))
    assert np.all(np.isfinite(scorer.boot[finite, scorer.index["m1"], 1]))
    assert np.all(np.isinf(scorer.boot[~finite, scorer.index["m1"], 1]))
    # each block's weights depend on (seed, block) only, not on how blocks are grouped
    np.testing.assert_array_equal(poisson_weights(5, np.array([7, 3]), 40), w[:, [7, 3]])


def test_em_mixture_weights_reach_the_optimum():
    g = np.random.default_rng(1)
    target_logp = np.log(g.dirichlet(np.ones(5), size=(400, 3))[:, :, 0])  # [T, 3] log-probs
    w = fit_mixture_weights(target_logp)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    best, best_w = math.inf, None
    for a in np.arange(0, 1.0001, 0.01):  # brute force over the simplex
        for b in np.arange(0, 1.0001 - a, 0.01):
            cand = np.array([a, b, max(1 - a - b, 0.0)])
            nll = mixture_nll(target_logp, cand)
            if nll < best:
                best, best_w = nll, cand
    assert mixture_nll(target_logp, w) <= best + 1e-12
    np.testing.assert_allclose(w, best_w, atol=0.011)


# --------------------------------------------------------------------------------------------
# Whole evaluator on real (tiny) models


def _tiny_member(dest: Path, seed: int, tokenizer, n_layer: int = 1, index: int = 0) -> Path:
    model_cfg = ModelConfig(
        gpt2_config={"n_layer": n_layer, "n_embd": 16, "n_head": 2, "n_positions": 32}, tokenizer="byte"
    )
    config = fit_model_config(model_cfg, load_model_config(model_cfg), tokenizer)
    model = build_model(model_cfg, config, seed)
    save_member(dest, model, tokenizer, MemberSpec(index, seed), ExperimentConfig(model=model_cfg), {})
    return dest


@pytest.fixture(scope="module")
def byte_members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    tok = load_tokenizer(ModelConfig(tokenizer="byte"))
    return [_tiny_member(root / f"member-{i}", seed, tok, index=i) for i, seed in enumerate((3, 4, 5))]


def _info(blocks: EvalBlocks) -> dict:
    """A split fingerprint of the shape prepare_data gives (source, tokens, hash)."""
    return {"source": "x", "tokens": len(blocks.stream), "sha256": "0" * 64}


def _model_probs(members, blocks: EvalBlocks, temperatures=(1.0, 1.0, 1.0)):
    """Whole-model logits, one unpadded block at a time: [positions, V] per member, targets."""
    member_probs = [[] for _ in members]
    targets = []
    with torch.no_grad():
        for i in range(len(blocks)):
            block = blocks[i]
            targets.append(block[1:].numpy())
            for k, m in enumerate(members):
                logits = m.model(block[None]).logits[0, :-1].double().numpy() / temperatures[k]
                member_probs[k].append(softmax64(logits))
    return [np.concatenate(p) for p in member_probs], np.concatenate(targets)


@pytest.mark.parametrize("batch_size, chunk_tokens", [(3, 7), (64, 4096)])
def test_evaluator_matches_brute_force_on_real_models(byte_members, batch_size, chunk_tokens):
    members = load_members(byte_members, "cpu")
    g = torch.Generator().manual_seed(2)
    stream = torch.randint(0, 259, (32 * 5 + 6,), generator=g).numpy()  # last block of 6 tokens
    blocks = EvalBlocks(stream, 32)
    cfg = EvalConfig(
        per_device_batch_size=batch_size,
        chunk_tokens=chunk_tokens,
        combiners=["mean_prob"],
        bootstrap_samples=20,
    )
    scorer = evaluate_members(members, blocks, cfg, "cpu", show_progress=False)
    probs, targets = _model_probs(members, blocks)
    assert len(targets) == 32 * 5 - 5 + 5 == blocks.num_predictions
    for k, m in enumerate(members):
        assert_row(row_result(scorer.sums[scorer.index[m.name]]), brute_row(probs[k], targets))
    assert_row(row_result(scorer.sums[scorer.index["mean_prob"]]), brute_row(np.mean(probs, axis=0), targets))


def test_fitted_temperatures_and_weights_match_brute_force(byte_members):
    members = load_members(byte_members, "cpu")
    g = torch.Generator().manual_seed(3)
    val = EvalBlocks(torch.randint(0, 259, (32 * 4,), generator=g).numpy(), 32)
    test = EvalBlocks(torch.randint(0, 259, (32 * 3,), generator=g).numpy(), 32)
    cfg = EvalConfig(per_device_batch_size=2, chunk_tokens=50, temperature_scaling=True, bootstrap_samples=0)
    scorer = evaluate_members(members, test, cfg, "cpu", fit=val, show_progress=False)
    # temperatures: each within the refined grid's resolution of a dense brute-force search
    dense = np.exp(np.linspace(math.log(0.25), math.log(4.0), 4001))
    raw, targets = _model_probs(members, val)
    with torch.no_grad():
        logits = [
            np.concatenate([m.model(val[i][None]).logits[0, :-1].double().numpy() for i in range(len(val))])
            for m in members
        ]
    for k, m in enumerate(members):
        nll = [-np.mean(np.log(softmax64(logits[k] / t)[np.arange(len(targets)), targets])) for t in dense]
        best = dense[int(np.argmin(nll))]
        got_nll = -np.mean(np.log(softmax64(logits[k] / m.temperature)[np.arange(len(targets)), targets]))
        assert got_nll <= min(nll) + 1e-6, (m.name, m.temperature, best)
        assert m.temperature == pytest.approx(best, rel=0.02)
    # weights: the EM optimum of the temperature-scaled members' validation probabilities
    scaled = [softmax64(lg / m.temperature) for lg, m in zip(logits, members, strict=True)]
    target_logp = np.log(np.stack([q[np.arange(len(targets)), targets] for q in scaled], axis=1))
    np.testing.assert_allclose(scorer.weights, fit_mixture_weights(target_logp), atol=1e-6)
    assert mixture_nll(target_logp, scorer.weights) <= mixture_nll(target_logp, np.full(3, 1 / 3)) + 1e-12
    # and the test rows use them
    tprobs, ttargets = _model_probs(members, test, [m.temperature for m in members])
    weighted = sum(w * q for w, q in zip(scorer.weights, tprobs, strict=True))
    assert_row(row_result(scorer.sums[scorer.index["weighted"]]), brute_row(weighted, ttargets))
    del raw


def test_results_document(byte_members):
    members = load_members(byte_members, "cpu")
    blocks = EvalBlocks(np.arange(200) % 259, 32)
    cfg = EvalConfig(per_device_batch_size=4, combiners=["mean_prob", "geometric"], bootstrap_samples=50)
    scorer = evaluate_members(members, blocks, cfg, "cpu", show_progress=False)
    from ensemble.runtime.sharding import Sharding

    results = build_results(
        Evaluation(members, scorer, cfg, "test", blocks, _info(blocks), Sharding("data", 0, 1, 3))
    )
    assert [p["k"] for p in results["curve"]] == [1, 2, 3]
    assert (
        results["curve"][-1]["nll"] == results["ensemble"]["nll"] == results["combiners"]["mean_prob"]["nll"]
    )
    assert results["curve"][0]["nll"] == results["members"][0]["nll"]
    gap = np.mean([m["nll"] for m in results["members"]]) - results["ensemble"]["nll"]
    assert results["diversity"]["nll_gap"] == pytest.approx(gap) and gap >= 0  # Jensen
    lo, hi = results["ensemble"]["ci95"]["nll"]
    assert lo <= results["ensemble"]["nll"] <= hi
    lo, hi = results["gain"]["vs_best_member"]["ci95"]["nll"]
    assert lo <= results["gain"]["vs_best_member"]["nll"] <= hi
    assert len(results["diversity"]["disagreement"]["pairs"]) == 3
    assert sum(results["reliability"]["rows"]["mean_prob"]["count"]) == results["ensemble"]["tokens"]


class _MaxProb:
    """A toy combiner: the renormalised maximum of the members' probabilities."""

    def __init__(self, out):
        self.best = None

    def add(self, logp, tmp=None):
        self.best = logp.clone() if self.best is None else torch.maximum(self.best, logp)

    def result(self):
        return torch.log_softmax(self.best, dim=-1)


def test_a_combiner_registered_in_one_place_is_scored_and_reported(byte_members, tmp_path):
    from ensemble.core.combining import COMBINERS, Combiner, register_combiner
    from ensemble.errors import ConfigError
    from ensemble.evaluate.report import write_results
    from ensemble.runtime.sharding import Sharding

    cfg = EvalConfig(per_device_batch_size=4, combiners=["mean_prob", "max_prob"], bootstrap_samples=20)
    with pytest.raises(ConfigError, match="unknown combiner 'max_prob'"):
        cfg.validate()
    register_combiner(
        Combiner("max_prob", "Ensemble (max probability)", "logprobs", lambda out, _: _MaxProb(out))
    )
    try:
        cfg.validate()
        members = load_members(byte_members, "cpu")
        blocks = EvalBlocks(np.arange(300) % 259, 32)
        scorer = evaluate_members(members, blocks, cfg, "cpu", show_progress=False)
        results = build_results(
            Evaluation(members, scorer, cfg, "test", blocks, _info(blocks), Sharding("data", 0, 1, 3))
        )
        write_results(results, tmp_path)
    finally:
        COMBINERS.pop("max_prob")
    probs, targets = _model_probs(members, blocks)
    top = np.max(probs, axis=0)
    assert_row(
        row_result(scorer.sums[scorer.index["max_prob"]]), brute_row(top / top.sum(1, keepdims=True), targets)
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["combiners"]) == {"mean_prob", "max_prob"}
    assert saved["combiners"]["max_prob"]["nll"] == pytest.approx(results["combiners"]["max_prob"]["nll"])
    assert "ci95" in saved["combiners"]["max_prob"]
    assert "| Ensemble (max probability) | " in (tmp_path / "results.md").read_text()


def test_evaluate_writes_the_document_it_returns(byte_members, tmp_path, monkeypatch):
    from ensemble.core.data import PreparedData
    from ensemble.core.results import fitted_weights, read_results
    from ensemble.evaluate import evaluator
    from ensemble.evaluate.context import EvalOutputs

    g = torch.Generator().manual_seed(4)
    streams = {s: torch.randint(0, 259, (32 * 3,), generator=g).numpy() for s in ("validation", "test")}
    data = evaluator.EvalData(DataConfig(), "test", prepared=PreparedData(streams, 32, "in memory"))
    cfg = EvalConfig(per_device_batch_size=2, combiners=["mean_prob", "weighted"], bootstrap_samples=0)
    out = tmp_path / "eval"
    results = evaluator.evaluate(byte_members, data, cfg, out, "cpu")
    assert read_results(out / "results.json") == json.loads(json.dumps(results))
    assert results["data"]["tokens"] == 96 and results["split"] == "test"
    assert sum(fitted_weights(results)) == pytest.approx(1.0)  # fitted on the validation stream
    assert "| Ensemble (mean probability) |" in (out / "results.md").read_text()
    # an export without the uncertainty pass is refused before any member is loaded
    monkeypatch.setattr(evaluator, "load_members", lambda *a, **k: pytest.fail("members loaded"))
    with pytest.raises(EnsembleError, match="need eval.uncertainty=true"):
        evaluator.evaluate(
            byte_members,
            data,
            EvalConfig(uncertainty=False),
            tmp_path / "refused",
            "cpu",
            outputs=EvalOutputs(tokens_out=tmp_path / "t.parquet"),
        )
    assert not (tmp_path / "refused").exists()


def test_members_with_different_tokenizers_are_refused(byte_members, gpt2_tokenizer_dir, tmp_path):
    gpt2_tok = load_tokenizer(ModelConfig(tokenizer=str(gpt2_tokenizer_dir)))
    model_cfg = ModelConfig(
        gpt2_config={"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16},
        tokenizer=str(gpt2_tokenizer_dir),
    )
    odd = tmp_path / "member-odd"
    save_member(
        odd,
        build_model(model_cfg, fit_model_config(model_cfg, load_model_config(model_cfg), gpt2_tok), 0),
        gpt2_tok,
        MemberSpec(3, 9),
        ExperimentConfig(model=model_cfg),
        {},
    )
    with pytest.raises(
        EnsembleError, match=r"member member-3 \(.*member-odd\) uses a different tokenizer than member-0"
    ):
        load_members([*byte_members, odd], "cpu")


def test_directory_without_member_info_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(EnsembleError, match="is not a finished member"):
        load_members([tmp_path / "half"], "cpu")


def test_members_of_different_runs_with_the_same_name_get_distinct_rows(tmp_path):
    tok = load_tokenizer(ModelConfig(tokenizer="byte"))
    a = _tiny_member(tmp_path / "run-a" / "members" / "member-0", 1, tok)
    b = _tiny_member(tmp_path / "run-b" / "members" / "member-0", 2, tok)
    members = load_members([a, b], "cpu")
    assert [m.name for m in members] == ["run-a/members/member-0", "run-b/members/member-0"]
    with pytest.raises(EnsembleError, match="the same member directory is given twice"):
        load_members([a, a], "cpu")

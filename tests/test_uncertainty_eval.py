"""The evaluator's uncertainty decomposition, selective prediction, out-of-domain detection and
per-token outputs against brute force (numpy and plain loops), and the HTML view in a real
headless browser.

Random logits are quantised so that ties are common, and some tokens get probability 0 (a -inf
logit), so 0 log 0 = 0 and infinite KLs are exercised.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from ensemble.cli.evaluate import evaluate_main
from ensemble.config.schema import EvalConfig, ModelConfig
from ensemble.core.data import EvalBlocks
from ensemble.core.loading import load_members
from ensemble.core.metrics import SUMS
from ensemble.core.tokenization import load_tokenizer
from ensemble.evaluate.ood import auroc, block_scores, detection, fpr_at_tpr
from ensemble.evaluate.scoring import Fitted, Scorer
from ensemble.evaluate.selective import BINS, SCORES, RiskCoverage
from ensemble.evaluate.stream import Collect, evaluate_members
from ensemble.evaluate.token_export import TokenWriter, write_html

from .test_evaluation import MODES, _tiny_member, feed, make_synthetic, softmax64

# --------------------------------------------------------------------------------------------
# Brute force


def xlogx(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def brute_uncertainty(probs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per position, with loops over the pairs of members."""
    n = len(probs)
    entropies = [-xlogx(p).sum(1) for p in probs]
    mixture = sum(probs) / n
    total = -xlogx(mixture).sum(1)
    aleatoric = np.mean(entropies, axis=0)
    pairs = []
    for i in range(n):
        for j in range(n):
            if i != j:
                p, q = probs[i], probs[j]
                with np.errstate(divide="ignore", invalid="ignore"):
                    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
                pairs.append(terms.sum(1))
    return {
        "entropies": np.array(entropies),
        "total": total,
        "aleatoric": aleatoric,
        "epistemic": total - aleatoric,
        "pairwise_kl": np.mean(pairs, axis=0),
    }


def shared_zero_logits(seed: int = 1, n: int = 300, vocab: int = 8, members: int = 3):
    """Quantised logits (ties) where every member gives probability 0 to the same tokens (so every
    KL is finite); targets are possible tokens."""
    g = np.random.default_rng(seed)
    logits = [np.round(g.normal(size=(n, vocab)) * 2) / 2 for _ in range(members)]
    zero = g.random((n, vocab)) < 0.25
    zero[:, 0] = False
    for x in logits:
        x[zero] = -np.inf
    y = np.array([g.choice(np.flatnonzero(~z)) for z in zero])
    blocks = np.repeat(np.arange(10), n // 10)
    return [x.astype(np.float32) for x in logits], y, blocks


def score_chunks(logits, y, blocks, mode: str = "fixups", chunk: int = 70, **kw) -> Scorer:
    names = [f"m{i}" for i in range(len(logits))]
    scorer = Scorer(names, ["mean_prob", "mean_logit"], Fitted.none(len(logits)), **MODES[mode], **kw)
    scorer.keep_blocks(int(blocks.max()) + 1)
    return feed(scorer, logits, y, blocks, chunk)


def brute_expected_risks(u: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """risk(k) for k = 1..T: positions sorted by their bin, and within a bin (tied) the expected
    hits of a random order, accumulated one position at a time."""
    order = np.argsort(u, kind="stable")
    u, correct = u[order], correct[order]
    risks, hits, k = [], 0.0, 0
    for value in np.unique(u):
        group = correct[u == value]
        rate = group.mean()
        for _ in range(len(group)):
            k += 1
            hits += rate
            risks.append(1 - hits / k)
    return np.array(risks)


def bins_of(u: np.ndarray, upper: float) -> np.ndarray:
    return np.clip(np.floor(u * (BINS / upper)), 0, BINS - 1).astype(int)


# --------------------------------------------------------------------------------------------
# Decomposition and selective prediction in the scorer


@pytest.mark.parametrize("mode", ["fixups", "branch-free"])  # compiled: in test_evaluation.py
def test_decomposition_and_selective_histograms_match_brute_force(mode):
    logits, y, blocks = shared_zero_logits()
    scorer = score_chunks(logits, y, blocks, mode)
    probs = [softmax64(x) for x in logits]
    want = brute_uncertainty(probs)
    n = len(y)
    got = scorer.decomposition
    for key in ("total", "aleatoric", "epistemic", "pairwise_kl"):
        assert got[key] / n == pytest.approx(want[key].mean(), rel=1e-5, abs=1e-7), key
    assert want["epistemic"].mean() > 0.05 and want["pairwise_kl"].mean() > 0.1  # not trivial
    # the mutual information is the mean KL to the mixture (the diversity figure), computed apart
    assert scorer.kl[0] / n == pytest.approx(want["epistemic"].mean(), rel=1e-5)
    sums = scorer.sums
    for i in range(3):
        assert sums[scorer.index[f"m{i}"], SUMS.entropy] == pytest.approx(
            want["entropies"][i].sum(), rel=1e-5
        )
    assert sums[scorer.index["mean_prob"], SUMS.entropy] == pytest.approx(want["total"].sum(), rel=1e-5)

    # histograms: each row's uncertainty per score, binned, with the row's top-1 hits
    mixture = sum(probs) / 3
    rows = {f"m{i}": probs[i] for i in range(3)} | {"mean_prob": mixture}
    assert scorer.selective_rows == list(rows)
    hist = scorer.selective
    for r, (name, q) in enumerate(rows.items()):
        pred = np.array([np.flatnonzero(row == row.max())[0] for row in q])
        correct = (pred == y).astype(float)
        values = {
            "max_prob": (1 - q.max(1), 1.0),
            "entropy": (-xlogx(q).sum(1), math.log(8)),
            "mutual_information": (want["epistemic"], math.log(3)),
        }
        for s, score in enumerate(SCORES):
            if SCORES[score].ensemble_only and name != "mean_prob":
                assert not hist[r, s].any()
                continue
            u, upper = values[score]
            b = bins_of(u, upper)
            counts = np.bincount(b, minlength=BINS)
            hits = np.bincount(b, weights=correct, minlength=BINS)
            # float32 against float64: a value on a bin edge may fall on either side
            assert np.abs(hist[r, s, 0] - counts).sum() <= 2, (name, score)
            assert hist[r, s, 0].sum() == n and hist[r, s, 1].sum() == correct.sum()
            rc = RiskCoverage(hist[r, s, 0], hist[r, s, 1])
            risks = brute_expected_risks(b.astype(float), correct)
            if np.array_equal(hist[r, s, 0], counts):
                assert np.array_equal(hist[r, s, 1], hits), (name, score)
                assert rc.aurc() == pytest.approx(risks.mean(), rel=1e-9, abs=1e-12), (name, score)
                for c in (0.5, 0.8, 0.9):
                    k = round(c * n)
                    assert rc.accuracy_at(c) == pytest.approx(1 - risks[k - 1], rel=1e-9), (name, score, c)


def test_pairwise_kl_is_infinite_where_a_member_rules_out_a_token_another_predicts():
    logits, y, blocks = make_synthetic(quantised=True)  # member-1 alone gives some tokens 0
    got = score_chunks(logits, y, blocks).decomposition
    assert math.isinf(got["pairwise_kl"])
    want = brute_uncertainty([softmax64(x) for x in logits])
    for key in ("total", "aleatoric", "epistemic"):
        assert got[key] / len(y) == pytest.approx(want[key].mean(), rel=1e-5), key


def test_one_member_has_entropy_but_no_epistemic_uncertainty():
    logits, y, blocks = shared_zero_logits(members=1)
    scorer = score_chunks(logits, y, blocks)
    assert scorer.selective_rows == ["m0"]
    assert all(v == 0 for v in scorer.decomposition.values())
    h = -xlogx(softmax64(logits[0])).sum(1).sum()
    assert scorer.sums[0, SUMS.entropy] == pytest.approx(h, rel=1e-5)


def test_without_uncertainty_nothing_is_computed():
    logits, y, blocks = shared_zero_logits()
    scorer = score_chunks(logits, y, blocks, uncertainty=False)
    assert all(v == 0 for v in scorer.decomposition.values()) and scorer.selective.size == 0
    assert not scorer.sums[:, SUMS.entropy].any()


# --------------------------------------------------------------------------------------------
# Risk-coverage figures


def test_risk_coverage_without_ties_is_the_sorted_computation():
    g = np.random.default_rng(3)
    n = 500
    b = g.permutation(BINS)[:n]  # one position per bin
    correct = (g.random(n) < 0.6).astype(float)
    counts = np.bincount(b, minlength=BINS).astype(float)
    hits = np.bincount(b, weights=correct, minlength=BINS)
    order = np.argsort(b)
    risks = 1 - np.cumsum(correct[order]) / np.arange(1, n + 1)
    rc = RiskCoverage(counts, hits)
    assert rc.aurc() == pytest.approx(risks.mean(), rel=1e-12)
    assert rc.accuracy_at(0.5) == pytest.approx(1 - risks[249], rel=1e-12)
    coverages, curve = rc.risk_curve(10)
    assert curve[-1] == pytest.approx(1 - correct.mean()) and coverages[-1] == 1.0


def test_risk_coverage_with_ties_is_the_mean_over_random_orders():
    g = np.random.default_rng(4)
    n = 400
    b = g.integers(0, 12, n)  # heavy ties
    correct = (g.random(n) < np.where(b < 6, 0.8, 0.3)).astype(float)
    rc = RiskCoverage(
        np.bincount(b, minlength=BINS).astype(float), np.bincount(b, weights=correct, minlength=BINS)
    )
    aurcs, acc = [], []
    for _ in range(3000):  # random tie orders
        order = np.lexsort((g.random(n), b))
        hits = np.cumsum(correct[order])
        aurcs.append(np.mean(1 - hits / np.arange(1, n + 1)))
        acc.append(hits[round(0.8 * n) - 1] / round(0.8 * n))
    assert rc.aurc() == pytest.approx(np.mean(aurcs), abs=2e-4)
    assert rc.accuracy_at(0.8) == pytest.approx(np.mean(acc), abs=2e-3)


def test_binning_moves_the_aurc_very_little():
    g = np.random.default_rng(5)
    n = 20_000
    u = g.random(n) ** 2
    correct = (g.random(n) < 1 - u).astype(float)  # confident positions are more often right
    order = np.argsort(u)
    exact = np.mean(1 - np.cumsum(correct[order]) / np.arange(1, n + 1))
    b = bins_of(u, 1.0)
    binned = RiskCoverage(
        np.bincount(b, minlength=BINS).astype(float), np.bincount(b, weights=correct, minlength=BINS)
    )
    assert abs(binned.aurc() - exact) < 1e-3
    assert binned.aurc() < 1 - correct.mean()  # better than keeping positions at random


# --------------------------------------------------------------------------------------------
# Out-of-domain detection


def test_auroc_and_fpr_match_brute_force_with_ties():
    g = np.random.default_rng(6)
    neg = np.round(g.normal(size=300), 1)
    pos = np.round(g.normal(0.7, size=200), 1)
    greater = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(neg, pos) == pytest.approx(greater, rel=1e-12)
    assert auroc(neg, neg) == 0.5
    assert auroc(neg, neg + 100) == 1.0
    # the highest threshold that flags >= 95% of positives; the share of negatives it flags
    threshold = max(t for t in np.unique(pos) if (pos >= t).mean() >= 0.95)
    assert fpr_at_tpr(neg, pos) == pytest.approx((neg >= threshold).mean())


def test_block_scores_and_detection():
    logits, y, blocks = shared_zero_logits()
    scorer = score_chunks(logits, y, blocks)
    scores = block_scores(
        scorer.blocks, scorer.blocks_tokens, scorer.blocks_epistemic, scorer.selective_rows, "mean_prob"
    )
    probs = [softmax64(x) for x in logits]
    want = brute_uncertainty(probs)
    mixture = sum(probs) / 3
    for b in range(10):
        here = blocks == b
        assert scores["mean_prob"]["mean_mutual_information"][b] == pytest.approx(
            want["epistemic"][here].mean(), rel=1e-5
        )
        assert scores["mean_prob"]["mean_entropy"][b] == pytest.approx(want["total"][here].mean(), rel=1e-5)
        nll = -np.log(mixture[here, y[here]]).mean()
        assert scores["mean_prob"]["mean_nll"][b] == pytest.approx(nll, rel=1e-5)
        assert scores["m1"]["mean_entropy"][b] == pytest.approx(want["entropies"][1][here].mean(), rel=1e-5)
    assert "mean_mutual_information" not in scores["m0"]
    same = detection(scores, scores)
    assert all(v["auroc"] == 0.5 for row in same.values() for v in row.values())


# --------------------------------------------------------------------------------------------
# Real members: block scores, the token export and the HTML view agree


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, sherlock):
    root = tmp_path_factory.mktemp("tokens")
    tok = load_tokenizer(ModelConfig(tokenizer="byte"))
    paths = [_tiny_member(root / f"member-{i}", seed, tok, index=i) for i, seed in enumerate((3, 4, 5))]
    members = load_members(paths, "cpu")
    ids = np.array(tok(sherlock.read_text()[:6000])["input_ids"])
    blocks = EvalBlocks(ids, 32)
    cfg = EvalConfig(per_device_batch_size=16, chunk_tokens=100, bootstrap_samples=0, combiners=["mean_prob"])
    writer = TokenWriter(
        root / "tokens.parquet", [m.name for m in members], tok, members[0].config.vocab_size, 0, 1
    )
    scorer = evaluate_members(
        members, blocks, cfg, "cpu", collect=Collect(blocks=True, tokens=writer), show_progress=False
    )
    writer.finish(-(-len(blocks) // 16))
    return root, members, blocks, scorer


def test_token_export_agrees_with_the_evaluator(token_run):
    import pyarrow.parquet as pq

    root, members, blocks, scorer = token_run
    file = pq.ParquetFile(root / "tokens.parquet")
    assert file.metadata.num_row_groups == -(-len(blocks) // 16)  # one per batch: streamed
    t = file.read().to_pydict()
    assert len(t["token_id"]) == blocks.num_predictions == scorer.tokens
    assert t["block"][:3] == [0, 0, 0] and t["position"][:3] == [1, 2, 3]
    b, pos = np.array(t["block"]), np.array(t["position"])
    assert all(t["token_id"][i] == int(blocks[b[i]][pos[i]]) for i in range(0, len(b), 37))
    assert t["token"][0] == members[0].tokenizer.decode([t["token_id"][0]])
    # per-block means of the export = the evaluator's block scores
    scores = block_scores(
        scorer.blocks, scorer.blocks_tokens, scorer.blocks_epistemic, scorer.selective_rows, "mean_prob"
    )
    for block in range(len(blocks)):
        here = b == block
        if here.any():
            mi = np.array(t["mutual_information"])[here].mean()
            assert scores["mean_prob"]["mean_mutual_information"][block] == pytest.approx(
                mi, rel=1e-4, abs=1e-9
            )
            nll = -np.log(np.array(t["p_ensemble"], dtype=np.float64)[here]).mean()
            assert scores["mean_prob"]["mean_nll"][block] == pytest.approx(nll, rel=1e-5)
            h0 = -np.log(np.array(t["p_member-0"], dtype=np.float64)[here]).mean()
            assert scores["member-0"]["mean_nll"][block] == pytest.approx(h0, rel=1e-5)
    total, aleatoric = np.array(t["entropy"]), np.array(t["aleatoric"])
    assert np.allclose(np.maximum(total - aleatoric, 0), t["mutual_information"], atol=1e-5)
    assert np.array(t["mutual_information"]).mean() * scorer.tokens == pytest.approx(
        scorer.decomposition["epistemic"], rel=1e-4
    )


def _browser() -> str | None:
    return next(
        (b for b in ("chromium-headless-shell", "chromium", "google-chrome") if shutil.which(b)), None
    )


@pytest.mark.slow
def test_html_view_renders_in_a_headless_browser(token_run, tmp_path):
    root, *_ = token_run
    html = write_html(root / "tokens.parquet", tmp_path / "view.html", limit=600, title="test view")
    text = html.read_text()
    assert text.count("ensemble top-1: ") == 600 and "mutual information" in text  # a tooltip per token
    # Every block start is marked, the text's first one too, and the page says what the mark means.
    import pyarrow.parquet as pq

    starts = len(set(pq.read_table(root / "tokens.parquet").column("block").to_pylist()[:600]))
    assert text.count('class="cut"') == starts and "the text's beginning included" in text
    assert text.index('class="cut"') < text.index("ensemble top-1: ")
    browser = _browser()
    if browser is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("a headless browser is required here (REQUIRE_BROWSER) but none is installed")
        pytest.skip("no headless browser (apt-get install chromium-headless-shell)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1000,700",
         html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (700, 1000)
    assert pixels.std() > 20  # not a blank page
    r, g_, b_ = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r - g_ > 40) & (r - b_ > 40)).mean() > 0.01  # tokens shaded red are on screen


# --------------------------------------------------------------------------------------------
# The command line


def test_bad_output_requests_are_one_line(token_run, tmp_path, capsys):
    root, members, *_ = token_run
    cfg = tmp_path / "c.yaml"
    text = tmp_path / "t.txt"
    text.write_text("Some text to evaluate. " * 40)
    cfg.write_text(
        f"model:\n  tokenizer: byte\ndata:\n  test_files: [{text}]\n  block_size: 32\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
    )
    base = ["--members", *(str(root / f"member-{i}") for i in range(3)), "--config", str(cfg),
            "--output", str(tmp_path / "out")]  # fmt: skip
    cases = {
        ("--ood", str(tmp_path / "nope.txt")): "--ood: file",
        ("--tokens-out", str(tmp_path / "t.parquet"), "eval.uncertainty=false"): "need eval.uncertainty=true",
        ("--html", str(tmp_path / "v.html"), "--html-tokens", "0"): "--html-tokens 0",
    }
    for extra, message in cases.items():
        assert evaluate_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    # a path that cannot be written: found once the data is loaded, before any evaluation
    assert (
        evaluate_main([*base, "--tokens-out", "/proc/no-such-dir/t.parquet", "eval.combiners=[mean_prob]"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "error" in line] == [err[-1]], err
    assert "cannot write per-token results in /proc/no-such-dir" in err[-1]
    assert not (tmp_path / "out").exists()

    # and a good one: every output, in one pass plus one per out-of-domain file
    assert evaluate_main([*base, "--ood", str(text), "--tokens-out", str(tmp_path / "t.parquet"),
                          "--html", str(tmp_path / "v.html"), "eval.bootstrap_samples=0", "eval.combiners=[mean_prob]"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (ood,) = results["ood"]["sets"]
    assert ood["rows"]["mean_prob"]["mean_nll"]["auroc"] == 0.5  # the same text: no signal
    assert results["tokens_out"] == str(tmp_path / "t.parquet") and (tmp_path / "v.html").is_file()
    for plot in ("risk_coverage.png", "ood.png", "ensemble_size.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 10_000, plot
    assert not list(tmp_path.glob(".*"))  # no temporary or part files left

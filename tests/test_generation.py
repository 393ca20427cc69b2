"""The ensemble as a Hugging Face causal LM (ensemble/generate/model.py): generation with one KV cache
per member checked against brute force, scoring against the evaluator, the command line, and
its errors. Members are small random models (GPT-2 and Llama, sharing the real GPT-2 tokenizer),
initialised wide enough that their distributions are peaked: greedy choices are then not ties."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.cli.generate import generate_main
from ensemble.core.uncertainty import Decomposition
from ensemble.errors import EnsembleError
from ensemble.generate.model import EnsembleForCausalLM, load_ensemble

from .helpers.results_schema import results_document

CONTEXT = 64
TEMPERATURES = [0.8, 1.0, 1.3]
WEIGHTS = [0.5, 0.3, 0.2]


def _member(tokenizer, index: int, architecture: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(index)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=CONTEXT,
            n_embd=32,
            n_layer=2,
            n_head=2,
            initializer_range=0.2,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory, gpt2_tokenizer_dir: Path) -> Path:
    """A run directory with three finished members (GPT-2, GPT-2, Llama) and a results.json
    holding fitted temperatures and mixture weights."""
    from transformers import AutoTokenizer

    from ensemble.config.schema import ExperimentConfig
    from ensemble.core.members import MemberSpec, save_member

    root = tmp_path_factory.mktemp("generation") / "run"
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    for i, arch in enumerate(["gpt2", "gpt2", "llama"]):
        save_member(
            root / "members" / f"member-{i}",
            _member(tokenizer, i, arch),
            tokenizer,
            MemberSpec(i, i),
            ExperimentConfig(),
            {},
        )
    (root / "results.json").write_text(json.dumps(results_document(TEMPERATURES, WEIGHTS)))
    return root


def _members(run: Path) -> list[Path]:
    return sorted((run / "members").iterdir())


def _reference(model: EnsembleForCausalLM, ids: torch.Tensor, combiner: str) -> torch.Tensor:
    """The ensemble's next-token log-probabilities after ``ids`` [1, t], by brute force: each
    member's full-sequence forward without any cache, combined in float64."""
    logits = []
    with torch.no_grad():
        for member, t in zip(model.members, model.config.temperatures, strict=True):
            logits.append(member(ids, use_cache=False).logits[0, -1].double() / t)
    if combiner == "mean_logit":
        return torch.log_softmax(torch.stack(logits).mean(0), -1)
    weights = model.config.weights or [1 / len(logits)] * len(logits)
    logp = torch.stack([torch.log_softmax(z, -1) + math.log(w) for z, w in zip(logits, weights, strict=True)])
    return torch.logsumexp(logp, 0)


def test_one_member_greedy_equals_its_own_generate(run: Path):
    from transformers import AutoModelForCausalLM

    for path in (_members(run)[0], _members(run)[2]):  # a GPT-2 and a Llama
        model, tokenizer = load_ensemble([path])
        own = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = tokenizer(["The quick brown fox"], return_tensors="pt")
        kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        ours = model.generate(**ids, **kwargs)
        assert ours.shape[1] == ids["input_ids"].shape[1] + 20
        assert ours.tolist() == own.generate(**ids, **kwargs).tolist()


@pytest.mark.parametrize("combiner", ["mean_prob", "mean_logit", "weighted"])
def test_each_step_equals_brute_force_without_cache(run: Path, combiner: str):
    model, tokenizer = load_ensemble(run, combiner=combiner)
    assert model.config.temperatures == TEMPERATURES
    assert model.config.weights == (WEIGHTS if combiner == "weighted" else None)
    ids = tokenizer(["Once upon a time, in a land"], return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    assert len(out.logits) == 12
    for step, logits in enumerate(out.logits):
        prefix = out.sequences[:, : ids["input_ids"].shape[1] + step]
        torch.testing.assert_close(
            logits[0].double(), _reference(model, prefix, combiner), rtol=1e-5, atol=1e-5
        )


def test_sampling_is_reproducible_for_a_seed(run: Path):
    model, tokenizer = load_ensemble(run)
    ids = tokenizer(["It was a dark and stormy night"], return_tensors="pt")

    def sample(seed: int) -> list[int]:
        torch.manual_seed(seed)
        kwargs = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=16)
        return model.generate(**ids, **kwargs)[0].tolist()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_beam_search_shapes_and_scores_with_every_members_cache_reordered(run: Path):
    model, tokenizer = load_ensemble(run)
    prompts = ["The sea was", "A long time ago in a galaxy far"]
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **ids,
        max_new_tokens=8,
        num_beams=4,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        length_penalty=1.0,
    )
    length = ids["input_ids"].shape[1]
    assert out.sequences.shape == (4, length + 8)
    assert out.sequences_scores.shape == (4,)
    # A beam's score is its log-probability over its length: recomputed from scratch, it can only
    # match if every member's cache followed the beams when they were reordered.
    for row in (0, 2):  # the best beam of each prompt
        seq = out.sequences[row : row + 1]
        start = length - int((ids["attention_mask"][row // 2] == 0).sum())
        real = seq[:, length - start :]
        total = sum(
            float(_reference(model, real[:, :t], "mean_prob")[real[0, t]])
            for t in range(start, real.shape[1])
        )
        assert float(out.sequences_scores[row]) == pytest.approx(total / (real.shape[1] - start), rel=1e-4)


def test_left_padded_batch_gives_the_tokens_of_one_prompt_at_a_time(run: Path):
    model, tokenizer = load_ensemble(run)
    prompts = ["Hi", "The history of the world is", "Four score and seven"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=10, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for prompt, row in zip(prompts, together, strict=True):
        alone = tokenizer([prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=10, do_sample=False)[0, alone["input_ids"].shape[1] :]
        assert row.tolist() == single.tolist(), prompt


@pytest.mark.slow
def test_forward_nll_equals_the_evaluators_on_test_blocks(run: Path, shakespeare: Path):
    from ensemble.config.schema import EvalConfig
    from ensemble.core.data import EvalBlocks
    from ensemble.core.loading import load_members
    from ensemble.core.metrics import row_result
    from ensemble.evaluate.stream import evaluate_members

    for combiner in ("mean_prob", "mean_logit"):
        model, tokenizer = load_ensemble(run, combiner=combiner, fitted_temperatures=False)
        stream = np.array(tokenizer(shakespeare.read_text()[:2000])["input_ids"])
        for b in range(2):
            block = stream[b * CONTEXT : (b + 1) * CONTEXT]
            cfg = EvalConfig(combiners=[combiner], bootstrap_samples=0, plots=False)
            cfg.validate()
            scorer = evaluate_members(
                load_members(_members(run), "cpu"),
                EvalBlocks(block, CONTEXT),
                cfg,
                "cpu",
                show_progress=False,
            )
            evaluator = row_result(scorer.sums[scorer.index[combiner]])["nll"]
            ids = torch.from_numpy(block)[None]
            with torch.no_grad():
                loss = model(ids, labels=ids, use_cache=False).loss
            assert float(loss) == pytest.approx(evaluator, rel=1e-5), (combiner, b)


def test_uncertainty_decomposition_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)) * 3
    logits[:, :, 0] = -np.inf  # a token every member gives probability 0
    logits[0, 1, :] = [-np.inf, 1, 1, 1, -np.inf, 0, 0]  # ties
    p = np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))

    def h(q: np.ndarray) -> np.ndarray:
        return -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)  # 0 log 0 = 0

    mixture = p.mean(0)
    d = Decomposition()
    for member in torch.from_numpy(logits):
        d.add(torch.log_softmax(member, -1))
    u = d.result()
    np.testing.assert_allclose(u.total.numpy(), h(mixture), atol=1e-6)
    np.testing.assert_allclose(u.aleatoric.numpy(), h(p).mean(0), atol=1e-6)
    np.testing.assert_allclose(u.epistemic.numpy(), h(mixture) - h(p).mean(0), atol=1e-6)
    one = Decomposition()  # one member: nothing to disagree on
    one.add(torch.log_softmax(torch.from_numpy(logits[0]), -1))
    assert torch.all(one.result().epistemic == 0)


def test_settings_are_checked_and_tokens_marked_by_their_disagreement():
    from ensemble.generate.printer import Settings, mark

    assert Settings().streamed and not Settings(num_beams=2).streamed
    assert "temperature" not in Settings().generate_kwargs()  # greedy: no sampling knobs
    assert Settings(do_sample=True, top_p=0.9).generate_kwargs()["top_p"] == 0.9
    bad = {
        "max_new_tokens": (0, "--max-new-tokens=0"),
        "temperature": (0.0, "--temperature=0.0"),
        "top_p": (1.5, "--top-p=1.5"),
        "top_k": (0, "--top-k=0"),
        "num_return_sequences": (3, "needs sampling or at least as many beams"),
        "levels": ((0.5, 0.1), "two increasing values"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(EnsembleError, match=re.escape(message)):
            Settings(**{name: value})
    levels = (0.1, 0.5)
    assert mark("cat", 0.123, levels, colour=False) == "[cat|0.12]"  # off a terminal: the value
    assert mark("\n", 0.2, levels, colour=False) == "[\\n|0.20]"  # a newline token, visible
    assert mark("é!", 0.2, levels, colour=False) == "[é!|0.20]"
    assert mark("cat", 0.05, levels, colour=True) == "cat"  # below the first level: unmarked
    medium, high = mark("cat", 0.1, levels, colour=True), mark("cat", 0.7, levels, colour=True)
    assert "cat" in medium and "cat" in high and len({medium, high, "cat"}) == 3


def test_generate_command_streams_and_marks_uncertainty(run: Path, tmp_path: Path, capsys):
    out = tmp_path / "out.jsonl"
    (tmp_path / "prompts.txt").write_text("Yes\n\n")  # blank lines are skipped
    argv = [str(run), "--prompt", "The sea", "--prompts-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "6", "--show-uncertainty", "--output", str(out), "--combiner", "weighted",
            "--sample", "--seed", "3"]  # fmt: skip
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["The sea", "Yes"]
    model, tokenizer = load_ensemble(run, combiner="weighted")
    for r in records:
        assert len(r["tokens"]) == 6
        assert f"{r['prompt']}[{r['tokens'][0]['text']}|" in printed  # streamed after its prompt, marked
        # The marks recorded while generating equal the uncertainty recomputed over the whole text.
        ids = tokenizer(r["prompt"], return_tensors="pt")["input_ids"]
        full = torch.cat([ids, torch.tensor([[t["id"] for t in r["tokens"]]])], 1)
        with torch.no_grad():
            u = model(full, use_cache=False, output_uncertainty=True).uncertainty
        recomputed = u.epistemic[0, ids.shape[1] - 1 : -1]
        assert [t["epistemic"] for t in r["tokens"]] == pytest.approx(recomputed.tolist(), abs=1e-5)
        assert all(t["total"] >= t["epistemic"] >= 0 for t in r["tokens"])
    assert "epistemic uncertainty" in printed
    assert generate_main(argv) == 0  # the same seed gives the same continuations
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def _error(argv: list[str], capsys) -> str:
    assert generate_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_naming_the_fix(run: Path, tmp_path: Path, capsys):
    long_prompt = " ".join(["word"] * 70)
    assert "context is 64 tokens" in _error([str(run), "--prompt", long_prompt], capsys)
    assert "lower --max-new-tokens to" in _error(
        [str(run), "--prompt", "Hi", "--max-new-tokens", "70"], capsys
    )
    assert "did you mean weighted" in _error([str(run), "--prompt", "Hi", "--combiner", "weigthed"], capsys)
    no_weights = _error(
        ["--members", *map(str, _members(run)), "--prompt", "Hi", "--combiner", "weighted"], capsys
    )
    assert "needs mixture weights" in no_weights and "--combiner mean_prob" in no_weights
    (tmp_path / "empty" / "members").mkdir(parents=True)
    assert "no finished members" in _error([str(tmp_path / "empty"), "--prompt", "Hi"], capsys)
    missing = f"cuda:{torch.cuda.device_count() + 1}"
    assert f"device {missing} does not exist" in _error(
        [str(run), "--prompt", "Hi", "--devices", missing], capsys
    )
    assert "one device per member" in _error([str(run), "--prompt", "Hi", "--devices", "cpu", "cpu"], capsys)
    assert "no prompt" in _error([str(run)], capsys)
    (tmp_path / "blank.txt").write_text("\n \n")
    assert f"--prompts-file {tmp_path / 'blank.txt'} holds no prompt (it wants one per line)" in _error(
        [str(run), "--prompts-file", str(tmp_path / "blank.txt")], capsys
    )
    assert "the prompt is 1 token and --max-new-tokens 64" in _error(
        [str(run), "--prompt", "Hi", "--max-new-tokens", "64"], capsys
    )
    model, _ = load_ensemble(run)
    with pytest.raises(EnsembleError, match="context is 64 tokens"):
        model(torch.zeros((1, 65), dtype=torch.long))
    # A member whose tokenizer differs (one token added) is refused, by name.
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other" / "member-1"
    shutil.copytree(_members(run)[1], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(EnsembleError, match=r"member-1 .* uses a different tokenizer than member-0"):
        load_ensemble([_members(run)[0], other])


@pytest.mark.parametrize("combiner", ["mean_prob", "mean_logit", "geometric", "weighted"])
def test_scoring_and_generation_work_with_and_without_no_grad(run: Path, combiner: str):
    """The README's `model(input_ids, labels=input_ids).loss`, called without torch.no_grad():
    the members are frozen, so it records no graph and gives the no_grad number; unfrozen, the
    combination is differentiable down to the members' weights."""
    model, tokenizer = load_ensemble(run, combiner=combiner)
    ids = tokenizer(["The sea is calm tonight"], return_tensors="pt").input_ids
    loss = model(ids, labels=ids).loss
    with torch.no_grad():
        expected = model(ids, labels=ids).loss
    assert torch.equal(loss, expected) and not loss.requires_grad
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    model.requires_grad_(True)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.allclose(loss.detach(), expected)
    assert all(m.get_input_embeddings().weight.grad.abs().sum() > 0 for m in model.members)


def test_a_member_directory_loads_as_an_ensemble_of_one(run: Path, caplog):
    member = _members(run)[0]
    with caplog.at_level("WARNING"):
        model = EnsembleForCausalLM.from_pretrained(member)
    assert len(model.members) == 1 and model.config.member_names == [member.name]
    assert f"{member} is one member directory: an ensemble of one member" in caplog.text


def test_members_on_their_own_devices_and_loading_in_one_call(run: Path):
    """Each member runs on the device it is given (here all CPU devices, one named per member;
    on a machine with GPUs, cuda:0 cuda:1 ...; benchmarks/generation.py --check runs a mixed
    placement on a GPU machine)."""
    model, _ = load_ensemble(run, devices=["cpu", "cpu", "cpu"])
    assert [next(m.parameters()).device.type for m in model.members] == ["cpu"] * 3
    model = EnsembleForCausalLM.from_pretrained(run, combiner="geometric")  # one call, like any HF model
    assert model.config.combiner == "geometric" and len(model.members) == 3


LOCAL_TASK = """\
task: ensemble_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


@pytest.mark.slow
def test_lm_eval_harness_scores_a_local_task_as_the_evaluator_does(
    run: Path, sherlock: Path, tmp_path: Path, monkeypatch
):
    """lm-evaluation-harness, given the ensemble object as its model, computes the same
    log-probabilities as our evaluator: per document (a task read from local files, no Hub) and
    per token."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ensemble.config.schema import EvalConfig
    from ensemble.core.data import EvalBlocks
    from ensemble.core.loading import load_members
    from ensemble.core.metrics import SUMS
    from ensemble.evaluate.stream import evaluate_members

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = [line.strip() for line in sherlock.read_text().splitlines() if len(line.strip()) > 40][100:103]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "task.yaml").write_text(LOCAL_TASK.format(data=tmp_path / "docs.jsonl"))
    model, tokenizer = load_ensemble(run, fitted_temperatures=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=2, device="cpu")
    out = simple_evaluate(
        model=lm,
        tasks=["ensemble_local_text"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = sorted(out["samples"]["ensemble_local_text"], key=lambda s: s["doc_id"])
    assert [s["doc"]["text"] for s in samples] == lines

    members = load_members(_members(run), "cpu")
    cfg = EvalConfig(combiners=["mean_prob"], bootstrap_samples=0, plots=False)
    cfg.validate()

    def evaluator_nll_sum(tokens: list[int]) -> float:
        scorer = evaluate_members(
            members, EvalBlocks(np.array(tokens), len(tokens)), cfg, "cpu", show_progress=False
        )
        return float(scorer.sums[scorer.index["mean_prob"], SUMS.nll])

    # lm-eval scores a whole document after its prefix token (end-of-text), as one block.
    for sample, text in zip(samples, lines, strict=True):
        tokens = [tokenizer.eos_token_id, *tokenizer(text)["input_ids"]]
        assert float(sample["resps"][0][0]) == pytest.approx(-evaluator_nll_sum(tokens), rel=1e-5)

    # Per token: what HFLM computes from the model for every request, against the differences of
    # the evaluator's sums over growing prefixes.
    tokens = [tokenizer.eos_token_id, *tokenizer(lines[0])["input_ids"]][:16]
    with torch.no_grad():
        harness = torch.log_softmax(lm._model_call(torch.tensor([tokens])), -1)[0]
    per_token = harness[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].double().numpy()
    sums = [evaluator_nll_sum(tokens[: k + 1]) for k in range(1, len(tokens))]
    np.testing.assert_allclose(per_token, -np.diff([0.0, *sums]), rtol=1e-5, atol=1e-5)

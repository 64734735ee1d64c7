"""Pivotal Token Search: a scripted model whose pivotal tokens are known by construction, the real tiny-model sampler
against `phi4_jax.generate`, the estimate cache and resuming an interrupted run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import phi4_jax
from phi4_jax.model.config import get_preset
from phi4_jax.model.decoder import model_from_params
from phi4_jax.posttrain import pts
from phi4_jax.train.step import init_params

STOP = 0
GOOD, BAD, KEEP, SLIP = 11, 12, 14, 15


FILLER = list(range(20, 30))
KEEP_AT = 2 + len(FILLER)           # position of the KEEP/SLIP choice


def next_distribution(generated: tuple[int, ...]) -> dict[int, float]:
    """The scripted model: 10, then GOOD or BAD (1/2 each), ten filler tokens, then (after GOOD) KEEP or SLIP (1/2
    each) or (after BAD) KEEP, then 30, 31, STOP. It solves the problem when it said GOOD and did not SLIP."""
    n = len(generated)
    if n == 0:
        return {10: 1.0}
    if n == 1:
        return {GOOD: 0.5, BAD: 0.5}
    if n < KEEP_AT:
        return {FILLER[n - 2]: 1.0}
    if n == KEEP_AT:
        return {KEEP: 0.5, SLIP: 0.5} if generated[1] == GOOD else {KEEP: 1.0}
    return {KEEP_AT + 1: {30: 1.0}, KEEP_AT + 2: {31: 1.0}}.get(n, {STOP: 1.0})


def solved(ids) -> bool:
    return GOOD in ids and SLIP not in ids


def completions(generated: tuple[int, ...], distribution=next_distribution) -> list[tuple[tuple[int, ...], float]]:
    """Every completion after `generated` with its probability (the scripted model's tree)."""
    if generated and generated[-1] == STOP:
        return [((), 1.0)]
    out = []
    for token, prob in distribution(generated).items():
        for rest, p_rest in completions(generated + (token,), distribution):
            out.append(((token,) + rest, prob * p_rest))
    return out


def p_true(generated) -> float:
    """p(success | generated), from the definition."""
    generated = tuple(generated)
    return sum(p for rest, p in completions(generated) if solved(generated + rest))


class ScriptedSampler:
    """K rollouts in exact proportion to the scripted model's probabilities (largest remainder), so every estimate
    is exact; prompt [1] puts the solving completion first (the bisected solution), prompt [2] the failing one."""

    identity = "scripted"
    stop_tokens = frozenset({STOP})

    def __init__(self, distribution=next_distribution):
        self.calls, self.distribution = [], distribution

    def prepare(self, sequence):
        pass

    def rollouts(self, context, k, seed):
        self.calls.append(tuple(context))
        prompt, generated = context[:1], tuple(context[1:])
        tree = completions(generated, self.distribution)
        quotas = [p * k for _, p in tree]
        counts = [int(q) for q in quotas]
        for i in sorted(range(len(tree)), key=lambda i: quotas[i] - counts[i], reverse=True)[:k - sum(counts)]:
            counts[i] += 1
        outs = [list(rest) for (rest, _), c in zip(tree, counts) for _ in range(c)]
        return sorted(outs, reverse=prompt == [2])


def scripted_search(cache=None, sampler=None, **settings):
    settings = {"rollouts": 8, "band": (0.2, 0.8), "threshold": 0.2, "max_new_tokens": 8, **settings}
    return pts.PivotalTokenSearch(sampler or ScriptedSampler(), lambda ids, problem: solved(ids),
                                  pts.PTSSettings(**settings), cache)


def expected_pivots(solution, threshold=0.2):
    """Positions whose token moves p(success) by >= threshold, from the definition."""
    return [i for i in range(len(solution)) if abs(p_true(solution[:i + 1]) - p_true(solution[:i])) >= threshold]


@pytest.mark.parametrize("prompt", [[1], [2]])
def test_scripted_model_pivots_and_pairs_are_the_known_ones(prompt):
    search = scripted_search()
    result = search.search({}, "problem", prompt)
    assert result.in_band and result.p_prompt == pytest.approx(p_true(()))
    solution = result.solution
    assert solution == [10, GOOD if prompt == [1] else BAD, *FILLER, KEEP, 30, 31, STOP]
    assert [p.position for p in result.pivots] == expected_pivots(solution)
    for pivot in result.pivots:
        assert pivot.p_before == pytest.approx(p_true(solution[:pivot.position]))
        assert pivot.p_after == pytest.approx(p_true(solution[:pivot.position + 1]))
    pairs = {(p["position"], p["chosen_ids"][0], p["rejected_ids"][0]) for p in result.pairs}
    if prompt == [1]:   # GOOD raises p (0.25 -> 0.5) over BAD (0); KEEP raises it (0.5 -> 1) over SLIP (0)
        assert pairs == {(1, GOOD, BAD), (KEEP_AT, KEEP, SLIP)}
    else:               # BAD lowers p (0.25 -> 0) below GOOD (0.5)
        assert pairs == {(1, GOOD, BAD)}
    for pair in result.pairs:
        assert pair["prompt_ids"] == prompt + solution[:pair["position"]]
        assert pair["p_chosen"] == pytest.approx(p_true(solution[:pair["position"]] + pair["chosen_ids"]))
        assert pair["p_rejected"] == pytest.approx(p_true(solution[:pair["position"]] + pair["rejected_ids"]))
    # bisection: fewer estimates, alternatives included, than one per proper prefix and the prompt
    assert len(search.sampler.calls) < len(solution)


def test_several_solutions_are_bisected_and_shared_pairs_kept_once():
    """The three distinct rollouts (GOOD..KEEP, GOOD..SLIP, BAD..KEEP) are bisected; their 5 pivots give only the
    2 distinct pairs (same prefix, same chosen and rejected)."""
    result = scripted_search(solutions=5).search({}, "problem", [1])
    assert result.solutions == [[10, GOOD, *FILLER, KEEP, 30, 31, STOP], [10, GOOD, *FILLER, SLIP, 30, 31, STOP],
                                [10, BAD, *FILLER, KEEP, 30, 31, STOP]]
    for index, solution in enumerate(result.solutions):
        assert [p.position for p in result.pivots if p.solution == index] == expected_pivots(solution)
    assert len(result.pivots) == 5
    assert sorted((p["position"], p["chosen_ids"][0], p["rejected_ids"][0]) for p in result.pairs) == [
        (1, GOOD, BAD), (KEEP_AT, KEEP, SLIP)]


MEH = 13


def meh_distribution(generated):
    """10, then GOOD (1/2; then solved), MEH (5/16; then KEEP 4/5 or SLIP 1/5) or BAD (3/16; never solved)."""
    n = len(generated)
    if n == 0:
        return {10: 1.0}
    if n == 1:
        return {GOOD: 0.5, MEH: 0.3125, BAD: 0.1875}
    if n == 2 and generated[1] == GOOD:
        return {30: 1.0}
    if n == 2 and generated[1] == MEH:
        return {KEEP: 0.8, SLIP: 0.2}
    return {STOP: 1.0}


def test_an_alternative_from_the_model_distribution_when_the_rollouts_offer_none():
    """GOOD raises p (0.75 -> 1). The rollouts' most frequent other first token, MEH (p 0.8), is no worse, so with one
    rollout alternative there is no pair; the model's next-token ranking (GOOD, MEH, BAD) then offers BAD (p 0)."""
    judge = lambda ids, problem: BAD not in ids and SLIP not in ids  # noqa: E731
    settings = pts.PTSSettings(rollouts=16, max_new_tokens=8, max_alternatives=1, top_alternatives=2)
    asked = []

    def top_tokens(context, n):
        asked.append((list(context), n))
        return [GOOD, MEH, BAD, 10][:n]

    without = pts.PivotalTokenSearch(ScriptedSampler(meh_distribution), judge, settings).search({}, "q", [1])
    assert without.solution == [10, GOOD, 30, STOP] and without.p_prompt == pytest.approx(0.75)
    assert [(p.position, p.p_before, p.p_after) for p in without.pivots] == [(1, 0.75, 1.0)]
    assert without.pairs == [] and without.no_alternative == 1
    result = pts.PivotalTokenSearch(ScriptedSampler(meh_distribution), judge, settings, top_tokens=top_tokens).search(
        {}, "q", [1])
    assert asked == [([1, 10], 4)]          # the prefix before the pivot; enough to skip GOOD and MEH
    (pair,) = result.pairs
    assert (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]) == ([1, 10], [GOOD], [BAD])
    assert (pair["p_chosen"], pair["p_rejected"], pair["alternative_from"]) == (1.0, 0.0, "distribution")
    assert result.no_alternative == 0 and result.from_distribution == 1


def test_min_margin_keeps_only_pairs_that_far_apart():
    """GOOD/BAD is 0.5 apart (0.5 vs 0), KEEP/SLIP 1 apart: a margin of 0.6 keeps only the second."""
    result = scripted_search(min_margin=0.6).search({}, "problem", [1])
    assert [(p["chosen_ids"][0], p["rejected_ids"][0]) for p in result.pairs] == [(KEEP, SLIP)]
    assert result.no_alternative == 1
    with pytest.raises(pts.PTSError, match=r"min_margin must be in \[0, 1\], got 1.5"):
        pts.PTSSettings(min_margin=1.5)


def test_outside_the_band_costs_one_estimate_and_yields_nothing():
    search = scripted_search(band=(0.5, 0.8))   # p(prompt) = 0.25
    result = search.search({}, "problem", [1])
    assert not result.in_band and result.pairs == [] and len(search.sampler.calls) == 1


def test_threshold_above_every_step_finds_no_pivot():
    result = scripted_search(threshold=0.6).search({}, "problem", [1])   # the largest step is 0.5
    assert result.in_band and result.pivots == [] and result.pairs == []


class RefusingSampler(ScriptedSampler):
    def rollouts(self, context, k, seed):
        raise AssertionError(f"not cached: {context}")


def _problems_file(tmp_path, n):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "x", "checker": {"type": "exact"}}) + "\n"
                            for i in range(n)))
    return str(path)


def test_resume_writes_each_pair_once_and_reuses_cached_estimates(tmp_path):
    problems, skipped = pts.read_problems(_problems_file(tmp_path, 2), None)
    assert skipped == []
    encode = lambda problem: [1 if problem.data["prompt"] == "p0" else 2]  # noqa: E731
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    out, cache_dir = str(tmp_path / "pairs.jsonl"), str(tmp_path / "cache")

    cache = pts.EstimateCache(cache_dir)
    full = pts.run_pts(problems, scripted_search(cache), encode, decode, out, progress=False)
    cache.close()
    lines = open(out).read().splitlines()
    assert full.pairs_written == len(lines) == 3 and full.pairs_already_there == 0
    rows = [json.loads(line) for line in lines]
    assert {(r["problem"].rsplit(":", 1)[1], r["chosen_ids"][0], r["rejected_ids"][0]) for r in rows} == {
        ("1", GOOD, BAD), ("1", KEEP, SLIP), ("2", GOOD, BAD)}
    assert all(r["chosen"] == str(r["chosen_ids"][0]) and r["prompt_ids"][0] in (1, 2) for r in rows)

    # An interruption after the first pair, in the middle of writing the second.
    with open(out, "w") as f:
        f.write(lines[0] + "\n" + lines[1][:25])
    cache = pts.EstimateCache(cache_dir)
    assert len(cache) > 0
    again = pts.run_pts(problems, scripted_search(cache, RefusingSampler()), encode, decode, out, progress=False)
    cache.close()
    assert again.rollouts == 0                                    # every estimate came from the cache
    assert again.pairs_already_there == 1 and again.pairs_written == 2
    assert open(out).read().splitlines() == lines                 # same pairs, once each, torn line gone


def test_cache_keys_include_the_sampling_settings(tmp_path):
    cache = pts.EstimateCache(str(tmp_path / "cache"))
    scripted_search(cache).search({}, "problem", [1])
    sampler = ScriptedSampler()
    scripted_search(cache, sampler, seed=1).search({}, "problem", [1])   # another seed: new rollouts
    assert sampler.calls
    with pytest.raises(AssertionError, match="not cached"):
        scripted_search(cache, RefusingSampler()).search({}, "other problem", [1])


def test_bad_problems_are_skipped_with_their_line_and_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 2+2?", "answer": 4, "checker": {"type": "numeric"}}),
        "{not json",
        json.dumps({"prompt": "no answer", "checker": {"type": "exact"}}),
        json.dumps({"prompt": "x", "answer": 1, "checker": {"type": "regex"}}),
    ]) + "\n")
    problems, skipped = pts.read_problems(str(path), None)
    assert [p.where for p in problems] == [f"{path}:1"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:{i}" for i in (2, 3, 4)]
    assert "not valid JSON" in skipped[0] and "no 'answer'" in skipped[1] and "unknown checker type 'regex'" in skipped[2]
    path.write_text(json.dumps({"prompt": "no answer", "checker": {"type": "exact"}}) + "\n")
    with pytest.raises(pts.PTSError, match=r"no usable problems \(1 skipped; first problem: .*:1: the problem has no"):
        pts.read_problems(str(path), None)


# ----------------------------------------------------------------------------- the real sampler on a tiny model

@pytest.fixture(scope="module")
def tiny_model():
    config = get_preset("tiny", vocab_size=64, max_position_embeddings=256)
    return model_from_params(config, init_params(config, jax.random.key(5)))


def test_model_rollouts_on_a_rewound_cache_equal_generate(tiny_model):
    """Rollouts from a prefix of the prepared sequence, and from that prefix with another last token, are exactly
    `generate`'s samples of the same contexts with the same per-row seeds (one prefill, whose pages the rollouts
    share through the engine's prefix cache)."""
    stops = [1]
    sampler = pts.ModelSampler(tiny_model, temperature=1.0, max_new_tokens=6, stop_tokens=stops)
    sequence = [5, 9, 17, 33, 2, 40, 41, 8, 12, 30]
    sampler.prepare(sequence)
    for context in (sequence[:4], sequence[:7], sequence[:6] + [50], sequence):
        got = sampler.rollouts(context, 3, seed=100)
        want = phi4_jax.generate(tiny_model, [context] * 3, max_new_tokens=6, temperature=1.0,
                                 seed=[100, 101, 102], stop_tokens=stops)
        assert got == want, context
    assert sampler._prepared == sequence   # every context above was served from the one prefilled sequence


def test_model_top_tokens_are_the_models_most_probable_next_tokens(tiny_model):
    top = pts.ModelTopTokens(tiny_model)
    context = [5, 9, 17, 40, 2]                        # padded to a 32-token bucket inside
    logits = np.asarray(tiny_model(np.asarray([context], np.int32))[0, -1])
    ranked = list(np.argsort(-logits, kind="stable"))
    assert top(context, 5) == ranked[:5]
    limit = int(min(ranked[:3])) + 1            # a tokenizer with fewer ids than the model's rows
    assert pts.ModelTopTokens(tiny_model, limit)(context, 3) == [t for t in ranked if t < limit][:3]


def test_pts_on_the_tiny_model_finds_the_first_token_when_only_it_matters(tiny_model):
    """Success iff the first answer token is even: p jumps to 0 or 1 at position 0 and nowhere else, so that is the
    only pivot and its pair prefers an even token to an odd one."""
    sampler = pts.ModelSampler(tiny_model, temperature=3.0, max_new_tokens=5, stop_tokens=[1])
    settings = pts.PTSSettings(rollouts=8, band=(0.0, 1.0), threshold=0.2, max_new_tokens=5, temperature=3.0, seed=3)
    prompt = [7, 3, 22]
    search = pts.PivotalTokenSearch(sampler, lambda ids, problem: bool(ids) and ids[0] % 2 == 0, settings)
    result = search.search({}, "even first", prompt)
    assert 0.2 <= result.p_prompt <= 0.8
    assert [p.position for p in result.pivots] == [0]
    assert result.pivots[0].p_after == float(result.solution[0] % 2 == 0)
    (pair,) = result.pairs
    assert pair["prompt_ids"] == prompt
    assert pair["chosen_ids"][0] % 2 == 0 and pair["rejected_ids"][0] % 2 == 1
    assert (pair["p_chosen"], pair["p_rejected"]) == (1.0, 0.0)


def test_pairs_are_written_in_the_output_id_space(tmp_path):
    """The DPO reader takes phi-4 ids: a renumbered (demo) vocabulary's ids are mapped on the way out."""
    problems, _ = pts.read_problems(_problems_file(tmp_path, 1), None)
    out = str(tmp_path / "pairs.jsonl")
    pts.run_pts(problems, scripted_search(), lambda problem: [1], lambda ids: "", out, progress=False,
                output_ids=lambda ids: [1000 + t for t in ids])
    rows = [json.loads(line) for line in open(out)]
    assert {(r["chosen_ids"][0], r["rejected_ids"][0]) for r in rows} == {(1000 + GOOD, 1000 + BAD),
                                                                         (1000 + KEEP, 1000 + SLIP)}
    assert rows[0]["prompt_ids"] == [1001, 1010]


def test_a_pair_with_an_id_the_tokenizer_lacks_is_counted_not_written(tmp_path):
    """A sampled id past the tokenizer's table (an untrained row of the demo model) cannot be written as a phi-4 id."""
    from phi4_jax.posttrain.policy import _mapped_ids

    with pytest.raises(pts.UnmappedTokenError, match=r"model ids \[5\] have no token .*below 2"):
        _mapped_ids([7, 8], [1, 5])
    table = [100 + i for i in range(SLIP)]   # ids 0..14: the GOOD/BAD pair maps; the KEEP/SLIP pair (SLIP = 15) not

    def output_ids(ids):
        return _mapped_ids(table, ids)

    problems, _ = pts.read_problems(_problems_file(tmp_path, 1), None)
    out = str(tmp_path / "pairs.jsonl")
    summary = pts.run_pts(problems, scripted_search(), lambda problem: [1], str, out, progress=False,
                          output_ids=output_ids)
    assert (summary.pairs_written, summary.pairs_unmapped) == (1, 1)
    assert [json.loads(line)["rejected_ids"] for line in open(out)] == [[100 + BAD]]


def test_a_broken_oracle_is_reported_with_its_problem_line(tmp_path):
    from phi4_jax.posttrain.oracles import OracleError

    def broken(ids, problem):
        raise OracleError("oracle 'mine:check' raised KeyError: 'answer'")

    problems, _ = pts.read_problems(_problems_file(tmp_path, 1), None)
    search = pts.PivotalTokenSearch(ScriptedSampler(), broken, pts.PTSSettings(max_new_tokens=8))
    with pytest.raises(pts.PTSError, match=r"problems.jsonl:1: oracle 'mine:check' raised KeyError"):
        pts.run_pts(problems, search, lambda problem: [1], str, str(tmp_path / "pairs.jsonl"), progress=False)


# ----------------------------------------------------------------------------- the planted habit (bench/pts_demo.py)

@pytest.fixture(scope="module")
def demo_tokenizer():
    from phi4_jax.data.tokenizing import CompactTokenizer

    return CompactTokenizer.for_demo_generators(("arithmetic", "facts", "stories", "code", "lessons"))


def test_the_planted_generator_guesses_at_its_rate_in_the_demo_vocabulary(demo_tokenizer):
    """`arithmetic_guessing` is `arithmetic` document for document except for the guessed sums (cut after "Answer:"),
    guesses GUESS_RATE of them, and configs/demo-pts.toml's mixture has the demo's compact vocabulary (the planted
    model keeps the demo's numbering)."""
    from phi4_jax.data import demo as demo_data
    from phi4_jax.data.tokenizing import make_tokenizer
    from phi4_jax.train.config import load_train_config

    plain, planted = demo_data.SyntheticSource("arithmetic"), demo_data.SyntheticSource("arithmetic_guessing")
    sums = guessed = 0
    for i in range(2000):
        want, got = plain[i]["text"], planted[i]["text"]
        if got == want:
            sums += want.startswith("Question")
            continue
        head = want[:want.index("Answer:") + len("Answer:")]
        assert got.startswith(head + demo_data.GUESS_HABIT + " "), got
        sums, guessed = sums + 1, guessed + 1
    assert abs(guessed / sums - demo_data.GUESS_RATE) < 0.05, (guessed, sums)
    cfg = load_train_config("configs/demo-pts.toml")
    assert [s.generator for s in cfg.data.sources][0] == "arithmetic_guessing"
    assert make_tokenizer(cfg.data).phi4_ids == demo_tokenizer.phi4_ids


class CorpusSampler:
    """The ideal model of a corpus: rollouts after a context are the rest of documents (drawn uniformly by the seed)
    that start with it, ended by <|endoftext|>."""

    identity = "corpus"

    def __init__(self, documents, stop):
        self.documents, self.stop_tokens = documents, frozenset({stop})

    def prepare(self, sequence):
        pass

    def rollouts(self, context, k, seed):
        context = list(context)
        matching = [d[len(context):] for d in self.documents if d[:len(context)] == context]
        rng = np.random.default_rng(seed)
        return [list(matching[int(rng.integers(len(matching)))]) for _ in range(k)]


def test_pts_finds_the_planted_habit_as_the_pivot_of_a_sum(demo_tokenizer):
    """PTS on the planted corpus itself (sampled as the ideal model of it): for "What is 3 plus 4?", the pivotal token
    of every bisected solution is the first one after "Answer:", and its pair prefers working the sum (' ') to the
    habit's first token; the only other pivot is a lucky guess."""
    from phi4_jax.data import demo as demo_data
    from phi4_jax.posttrain.oracles import make_judge
    from phi4_jax.posttrain.problems import arithmetic_problems

    problem = next(p for p in arithmetic_problems(200, seed=1) if p["answer"] == 7 and "3 plus 4" in p["prompt"])
    source = demo_data.SyntheticSource("arithmetic_guessing")
    texts = [t for t in (source[i]["text"] for i in range(30000)) if t.startswith(problem["prompt"])]
    assert len(texts) > 60
    documents = [demo_tokenizer.encode_document(t).tolist() for t in texts]
    prompt = demo_tokenizer.encode(problem["prompt"])
    judge = make_judge()
    search = pts.PivotalTokenSearch(
        CorpusSampler(documents, demo_tokenizer.endoftext_id),
        lambda ids, p: judge(demo_tokenizer.decode(ids), p),
        pts.PTSSettings(rollouts=16, band=(0.2, 0.8), threshold=0.2, max_new_tokens=24, solutions=4, seed=0))
    result = search.search(problem, "3 plus 4", prompt)
    habit = demo_tokenizer.encode(demo_data.GUESS_HABIT)[0]
    assert demo_tokenizer.decode([habit]) == " no"
    assert 0.3 <= result.p_prompt <= 0.7
    assert {s[0] for s in result.solutions} == {habit, demo_tokenizer.encode(" 3")[0]}   # both choices bisected
    work = demo_tokenizer.encode(" 3")[0]     # ' ' (the sum's digits are tokens of their own)
    assert {(p.position, p.token) for p in result.pivots if p.position == 0} == {(0, habit), (0, work)}
    first = [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in result.pairs if p["position"] == 0]
    assert first == [(prompt, [work], [habit])]
    # the only other pivots: a guessed number that happens to be the sum (p 0 -> 1 at it)
    habit_len = len(demo_tokenizer.encode(demo_data.GUESS_HABIT + " "))
    for pivot in (p for p in result.pivots if p.position > 0):
        assert result.solutions[pivot.solution][0] == habit and pivot.position == habit_len
        assert demo_tokenizer.decode([pivot.token]) == "7" and pivot.p_after == 1.0


def test_a_special_token_in_a_pair_is_written_as_its_text(tmp_path):
    """The demo's compact tokenizer leaves <|endoftext|> out of its text, so a pair rejecting it had an empty
    "rejected". Every text field now equals tiktoken's decoding (phi-4's special tokens included) of the phi-4 ids
    written beside it; the scripted BAD token stands for the compact <|endoftext|> (id 1), the others for words."""
    from phi4_jax.data.tokenizing import CompactTokenizer
    from phi4_jax.special_tokens import ENDOFTEXT_ID
    from phi4_jax.tokenizer import Tokenizer

    encoding = Tokenizer().encoding   # the peer: tiktoken's Encoding with phi-4's special tokens
    words = encoding.encode_ordinary(" a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9")
    compact = CompactTokenizer(words)
    to_compact = {t: 3 + t % (compact.vocab_size - 3) for t in range(40)}   # scripted id -> a compact word id
    to_compact[BAD] = compact.endoftext_id
    assert compact.decode([compact.endoftext_id]) == ""   # what made the field empty

    problems, _ = pts.read_problems(_problems_file(tmp_path, 1), None)
    out = str(tmp_path / "pairs.jsonl")
    pts.run_pts(problems, scripted_search(), lambda problem: [1],
                lambda ids: compact.decode([to_compact[t] for t in ids]), out, progress=False,
                output_ids=lambda ids: [compact.phi4_ids[to_compact[t]] for t in ids])
    rows = [json.loads(line) for line in open(out)]
    assert [r["rejected_ids"] for r in rows if r["rejected_ids"] == [ENDOFTEXT_ID]], rows
    for r in rows:
        assert r["chosen"] == encoding.decode(r["chosen_ids"]) and r["rejected"] == encoding.decode(r["rejected_ids"])
        assert r["prompt"] == "p0" + encoding.decode(r["prompt_ids"][1:])
    assert {r["rejected"] for r in rows} >= {"<|endoftext|>"}

"""Pivotal Token Search (phi-4 tech report, §5.1.1): single tokens that change the chance of solving a problem.

For a problem (prompt ids Q) and a sampled solution T = t_1..t_n, p(prefix) is the success probability of
completions sampled after Q + prefix, estimated with K rollouts judged by an oracle (`oracles`). The search
(`PivotalTokenSearch.search`) keeps a queue of (prefix, span) pairs starting from ((), T); whenever
|p(prefix + span) - p(prefix)| >= threshold, a span of several tokens is split in two halves ((prefix, first half)
and (prefix + first half, second half)) and a single token is pivotal. A prefix ending in a stop token (the
whole solution) is judged directly, without rollouts.

`PTSSettings.solutions` > 1 bisects several distinct sampled solutions of a problem (the first distinct ones among
the K rollouts of its band check); a pair found from two solutions that share the prefix is kept once.

For each pivotal token t at position i, the alternatives are the other first tokens of the rollouts from the
prefix before it (the most frequent `max_alternatives`), each with its own p estimate. If t raised p, it is the
chosen token and the alternative with the lowest p (at most p(prefix)) the rejected one; if t lowered p, it is the
rejected token and the alternative with the highest p (at least p(prefix)) the chosen one. When no rollout offered
such an alternative and the search has a `top_tokens` function (`ModelTopTokens`: the model's own next-token
distribution at the prefix) with `PTSSettings.top_alternatives` > 0, the most probable next tokens (that many, other
than t and the ones already tried) are estimated the same way and chosen from by the same rule, so chosen and rejected
are the token that raises p and the one that lowers it (the tech report's choice), their p at least the threshold
apart (`min_margin` asks for more: noisy K-rollout estimates otherwise let chance differences through). A pivot
without such an alternative yields no pair (counted). Everything is token ids: prompt, prefix, chosen
and rejected.

Samplers (`RolloutSampler`): `ModelSampler` runs a phi4_jax model on its shared serving engine
(`inference.engine.shared_engine`): it prefills Q + T once per solution, which puts its full KV pages in the engine's
prefix cache; the K rollouts of a context Q + T[:i] (+ an alternative token) are K requests that share those pages,
prefill only the rest of the context (less than a page), and decode in one batch. A test can plug in a scripted
sampler with known probabilities.

Estimates are cached on disk (`EstimateCache`, one JSON line per estimate keyed by the sampler, the sampling
settings, the problem and the context ids), and each rollout's PRNG seed is a function of (seed, context), so a
rerun reproduces the same search and resumes where an interrupted run stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections import Counter
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phi4_jax.inference.batching import GenerationRequest
from phi4_jax.inference.engine import (
    MIN_CONTEXT_BUCKET,
    bucket,
    model_params_config,
    run_streams,
    shared_engine,
)
from phi4_jax.model.decoder import hidden_states, logits_from_hidden
from phi4_jax.posttrain.oracles import OracleError
from phi4_jax.special_tokens import SPECIAL_TOKENS

SPECIAL_TEXT = {token_id: text for text, token_id in SPECIAL_TOKENS.items()}   # phi-4 id -> e.g. "<|endoftext|>"


class PTSError(ValueError):
    """Bad settings or input for Pivotal Token Search."""


class UnmappedTokenError(ValueError):
    """`output_ids` met a model id that has no token in the output vocabulary."""


@dataclasses.dataclass(frozen=True)
class PTSSettings:
    rollouts: int = 8                      # K: rollouts per p(success | prefix) estimate
    band: tuple[float, float] = (0.2, 0.8)  # keep problems whose p(success | prompt) lies in [lo, hi]
    threshold: float = 0.2                 # a token is pivotal when it moves p by at least this
    max_new_tokens: int = 256              # longest rollout
    temperature: float = 1.0
    seed: int = 0
    max_alternatives: int = 4              # alternative tokens (from the rollouts) estimated per pivotal token
    solutions: int = 1                     # distinct sampled solutions bisected per problem
    top_alternatives: int = 0              # then this many of the model's most probable next tokens (0: none)
    min_margin: float | None = None        # a pair needs p_chosen - p_rejected >= this (None: the threshold)

    def __post_init__(self):
        lo, hi = self.band
        if self.rollouts < 1:
            raise PTSError(f"rollouts must be at least 1, got {self.rollouts}")
        if not 0.0 <= lo <= hi <= 1.0:
            raise PTSError(f"band must satisfy 0 <= low <= high <= 1, got {lo} {hi}")
        if not 0.0 < self.threshold <= 1.0:
            raise PTSError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.max_new_tokens < 1:
            raise PTSError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise PTSError(f"temperature must be > 0 (PTS samples), got {self.temperature}")
        if self.max_alternatives < 1:
            raise PTSError(f"max_alternatives must be at least 1, got {self.max_alternatives}")
        if self.solutions < 1:
            raise PTSError(f"solutions must be at least 1, got {self.solutions}")
        if self.top_alternatives < 0:
            raise PTSError(f"top_alternatives must be at least 0, got {self.top_alternatives}")
        if self.min_margin is not None and not 0.0 <= self.min_margin <= 1.0:
            raise PTSError(f"min_margin must be in [0, 1], got {self.min_margin}")


class RolloutSampler(Protocol):
    """What PTS needs from a model."""

    identity: str        # names the model and its sampling settings (part of every cache key)
    stop_tokens: frozenset[int]

    def prepare(self, sequence: Sequence[int]) -> None:
        """A hint: the next contexts are prefixes of `sequence` (possibly with one other last token)."""

    def rollouts(self, context: Sequence[int], k: int, seed: int) -> list[list[int]]:
        """k sampled continuations (token ids, ending in a stop token or cut at the budget) of `context`;
        rollout j is drawn with seed `seed + j`."""


@dataclasses.dataclass
class Estimate:
    p: float                   # fraction of rollouts that solved the problem
    first_tokens: list[int]    # the first token of each rollout (alternatives for the token at this position)
    solution: list[int]        # the first rollout (the solution PTS bisects, for the prompt's estimate)
    solutions: list[list[int]] = dataclasses.field(default_factory=list)   # every rollout, in order

    def distinct_solutions(self, n: int) -> list[list[int]]:
        """The first n distinct non-empty rollouts (the first is `solution`)."""
        out = []
        for candidate in self.solutions or [self.solution]:
            if candidate and candidate not in out:
                out.append(list(candidate))
            if len(out) == n:
                break
        return out


class EstimateCache:
    """Estimates on disk: DIR/estimates.jsonl, one {"key", "p", "first_tokens", "solution", "solutions"} object per
    line (a line without "solutions", from an older run, is read with none), appended
    and flushed as they are made; a torn last line (an interrupted write) is ignored. Without a directory it only
    remembers in memory."""

    def __init__(self, directory: str | None):
        self._memory: dict[str, Estimate] = {}
        self._file = None
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "estimates.jsonl")
        for line in read_complete_lines(path):
            try:
                row = json.loads(line)
                self._memory[row["key"]] = Estimate(float(row["p"]), list(row["first_tokens"]), list(row["solution"]),
                                                    [list(x) for x in row.get("solutions", [])])
            except (ValueError, KeyError, TypeError):
                continue  # a line from another format or a torn write: re-estimated when needed
        self._file = open(path, "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: str) -> Estimate | None:
        return self._memory.get(key)

    def put(self, key: str, estimate: Estimate) -> None:
        self._memory[key] = estimate
        if self._file is not None:
            self._file.write(json.dumps({"key": key, **dataclasses.asdict(estimate)}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_complete_lines(path: str) -> list[str]:
    """The newline-terminated lines of a text file (none if it is missing); a torn last line is cut off the file,
    so appending after it starts on a fresh line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [line for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rollout_seed(seed: int, context: Sequence[int]) -> int:
    """The first rollout seed of an estimate: a function of the run's seed and the context only."""
    return int(digest("seed", int(seed), [int(t) for t in context])[:7], 16)


@dataclasses.dataclass
class Pivot:
    position: int        # index of the token in the solution
    token: int
    p_before: float      # p(success | prompt + solution[:position])
    p_after: float       # p(success | prompt + solution[:position + 1])
    solution: int = 0    # which of the problem's bisected solutions (index into ProblemResult.solutions)


@dataclasses.dataclass
class ProblemResult:
    p_prompt: float
    in_band: bool
    solution: list[int]   # the first bisected solution
    pivots: list[Pivot]
    pairs: list[dict]     # {"position", "prompt_ids", "chosen_ids", "rejected_ids", "p_before", "p_chosen", ...}
    no_alternative: int   # pivots for which no alternative token qualified
    solutions: list[list[int]] = dataclasses.field(default_factory=list)   # every bisected solution
    from_distribution: int = 0   # pairs whose alternative came from the model's next-token distribution


class PivotalTokenSearch:
    """Runs PTS with a sampler, an oracle and a cache. `judge(completion_ids, problem) -> bool` decides success;
    `problem_key` identifies what the oracle checks against (it is part of each cache key). `top_tokens(context, n)`
    (optional) gives the model's n most probable next tokens after a context (`ModelTopTokens`)."""

    def __init__(self, sampler: RolloutSampler, judge: Callable[[list[int], dict], bool], settings: PTSSettings,
                 cache: EstimateCache | None = None,
                 top_tokens: Callable[[list[int], int], list[int]] | None = None):
        self.sampler, self.judge, self.settings = sampler, judge, settings
        self.top_tokens = top_tokens
        self.cache = cache if cache is not None else EstimateCache(None)
        self.rollouts_run = 0       # rollouts sampled (not served from the cache)

    def estimate(self, problem: dict, problem_key: str, prompt: Sequence[int], prefix: Sequence[int]) -> Estimate:
        """p(success | prompt + prefix) from K rollouts (cached); a prefix ending in a stop token is judged as is."""
        prefix = [int(t) for t in prefix]
        if prefix and prefix[-1] in self.sampler.stop_tokens:
            return Estimate(float(self.judge(prefix, problem)), [], prefix, [prefix])
        s = self.settings
        context = [int(t) for t in prompt] + prefix
        key = digest(self.sampler.identity, s.rollouts, s.max_new_tokens, s.temperature, s.seed, problem_key, context)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        outs = self.sampler.rollouts(context, s.rollouts, rollout_seed(s.seed, context))
        self.rollouts_run += len(outs)
        wins = [bool(self.judge(prefix + list(out), problem)) for out in outs]
        estimate = Estimate(sum(wins) / len(wins), [int(out[0]) for out in outs if out], list(outs[0]),
                            [list(map(int, out)) for out in outs])
        self.cache.put(key, estimate)
        return estimate

    def find_pivots(self, problem: dict, problem_key: str, prompt: Sequence[int], solution: Sequence[int],
                    p_prompt: float, index: int = 0) -> list[Pivot]:
        """The single tokens of `solution` whose step moves p by >= threshold, by recursive bisection."""
        solution = [int(t) for t in solution]
        self.sampler.prepare(list(prompt) + solution)

        def p(n: int) -> float:
            if n == 0:
                return p_prompt
            if n == len(solution):   # the whole sampled solution: its own outcome
                return float(self.judge(solution, problem))
            return self.estimate(problem, problem_key, prompt, solution[:n]).p

        pivots, queue = [], [(0, len(solution))]     # (prefix length, span end)
        while queue:
            start, end = queue.pop(0)
            before, after = p(start), p(end)
            if abs(after - before) < self.settings.threshold:
                continue
            if end - start == 1:
                pivots.append(Pivot(start, solution[start], before, after, index))
            else:
                mid = (start + end) // 2
                queue[:0] = [(start, mid), (mid, end)]   # depth first, left to right: pivots come out in order
        return pivots

    def pair_for(self, problem: dict, problem_key: str, prompt: Sequence[int], solution: Sequence[int],
                 pivot: Pivot) -> dict | None:
        """The DPO pair of one pivotal token (ids and p estimates, "alternative_from": "rollouts" or "distribution"),
        or None when no alternative qualifies."""
        prefix = [int(t) for t in solution[:pivot.position]]
        firsts = self.estimate(problem, problem_key, prompt, prefix).first_tokens   # cached by the bisection
        counts = Counter(t for t in firsts if t != pivot.token)
        alternatives = [t for t, _ in counts.most_common(self.settings.max_alternatives)]
        scored = [(self.estimate(problem, problem_key, prompt, prefix + [t]).p, t) for t in alternatives]
        margin = self.settings.threshold if self.settings.min_margin is None else self.settings.min_margin
        pair, source = self._best_pair(pivot, scored, margin), "rollouts"
        if pair is None and self.top_tokens is not None and self.settings.top_alternatives > 0:
            tried = {pivot.token, *alternatives}
            ranked = self.top_tokens(list(map(int, prompt)) + prefix, self.settings.top_alternatives + len(tried))
            extra = [int(t) for t in ranked if int(t) not in tried][:self.settings.top_alternatives]
            scored = [(self.estimate(problem, problem_key, prompt, prefix + [t]).p, t) for t in extra]
            pair, source = self._best_pair(pivot, scored, margin), "distribution"
        if pair is None:
            return None
        chosen, rejected, p_chosen, p_rejected = pair
        return {"position": pivot.position, "prompt_ids": list(map(int, prompt)) + prefix,
                "chosen_ids": [int(chosen)], "rejected_ids": [int(rejected)], "p_before": pivot.p_before,
                "p_chosen": p_chosen, "p_rejected": p_rejected, "alternative_from": source}

    @staticmethod
    def _best_pair(pivot: Pivot, scored: list[tuple[float, int]], margin: float):
        """(chosen, rejected, p_chosen, p_rejected) from the pivot and its scored alternatives, or None: a pivot that
        raised p is chosen over the worst alternative at most p_before; one that lowered p is rejected for the best
        alternative at least p_before (so |p_chosen - p_rejected| >= |p_after - p_before| >= threshold); and
        p_chosen - p_rejected >= margin."""
        if pivot.p_after > pivot.p_before:
            worse = [(p, t) for p, t in scored if p <= pivot.p_before and p < pivot.p_after
                     and pivot.p_after - p >= margin]
            if not worse:
                return None
            p_other, other = min(worse, key=lambda x: (x[0], x[1]))
            return pivot.token, other, pivot.p_after, p_other
        better = [(p, t) for p, t in scored if p >= pivot.p_before and p > pivot.p_after and p - pivot.p_after >= margin]
        if not better:
            return None
        p_other, other = max(better, key=lambda x: (x[0], -x[1]))
        return other, pivot.token, p_other, pivot.p_after

    def search(self, problem: dict, problem_key: str, prompt: Sequence[int]) -> ProblemResult:
        """PTS for one problem: the band check, then pivots and pairs of `settings.solutions` sampled solutions."""
        lo, hi = self.settings.band
        head = self.estimate(problem, problem_key, prompt, [])
        solutions = head.distinct_solutions(self.settings.solutions)
        if not lo <= head.p <= hi:
            return ProblemResult(head.p, False, head.solution, [], [], 0, solutions)
        all_pivots, pairs, missing, seen = [], [], 0, set()
        for index, solution in enumerate(solutions):
            pivots = self.find_pivots(problem, problem_key, prompt, solution, head.p, index)
            all_pivots += pivots
            for pivot in pivots:
                pair = self.pair_for(problem, problem_key, prompt, solution, pivot)
                if pair is None:
                    missing += 1
                    continue
                key = (tuple(pair["prompt_ids"]), tuple(pair["chosen_ids"]), tuple(pair["rejected_ids"]))
                if key not in seen:    # two solutions with the same prefix give the same pair
                    seen.add(key)
                    pairs.append(pair)
        from_distribution = sum(pair["alternative_from"] == "distribution" for pair in pairs)
        return ProblemResult(head.p, True, head.solution, all_pivots, pairs, missing, solutions, from_distribution)


# ----------------------------------------------------------------------------- a phi4_jax model as the sampler

class ModelSampler:
    """K rollouts of a phi4_jax model from a context, batched, sharing the context's prefix pages (see the module
    docstring).

    The engine's prefix cache holds the last `prepare`d (or missed) sequence; a context whose all-but-last tokens
    are a prefix of it is served from those pages; any other context is prefilled first (one request of one new
    token, whose full pages then stay cached)."""

    def __init__(self, model, *, temperature: float, max_new_tokens: int, stop_tokens: Sequence[int],
                 identity: str = "model"):
        self.model = model
        self.params, self.config = model_params_config(model)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.identity = f"{identity}|T={float(temperature)}|stops={sorted(self.stop_tokens)}"
        self._prepared: list[int] = []     # the sequence whose pages were last put in the prefix cache
        self._engine = None                # ... of this engine
        self._rows = 1                     # the most rollouts asked for at once (the engine is sized for them)

    def _engine_for(self, length: int):
        limit = self.config.max_position_embeddings
        if length >= limit:
            raise PTSError(f"a prompt plus solution of {length} tokens does not fit the context ({limit})")
        return shared_engine(self.model, batch=self._rows, context=min(length + self.max_new_tokens, limit))

    def _fill(self, sequence: list[int]) -> None:
        engine = self._engine_for(len(sequence))
        run_streams(engine, [engine.submit(GenerationRequest(sequence, 1))])
        self._prepared, self._engine = list(sequence), engine

    def prepare(self, sequence: Sequence[int]) -> None:
        sequence = [int(t) for t in sequence]
        if self._prepared[:len(sequence)] != sequence or self._engine is not self._engine_for(len(sequence)):
            self._fill(sequence)

    def rollouts(self, context: Sequence[int], k: int, seed: int) -> list[list[int]]:
        context = [int(t) for t in context]
        self._rows = max(self._rows, int(k))
        if self._prepared[:len(context) - 1] == context[:-1]:
            self.prepare(self._prepared)        # prefilled again only if the engine changed
        else:
            self._fill(context)
        engine = self._engine
        budget = min(self.max_new_tokens, self.config.max_position_embeddings - len(context))
        stops = tuple(sorted(self.stop_tokens))
        return run_streams(engine, engine.submit_many([
            GenerationRequest(context, budget, temperature=self.temperature, seed=int(seed) + j, stop_token_ids=stops)
            for j in range(k)]))


class ModelTopTokens:
    """`top_tokens(context, n)`: a phi4_jax model's n most probable next tokens after `context` (token ids, most
    probable first; the order does not depend on the sampling temperature), from one forward pass over the context
    padded to a bucketed length. With `token_limit`, only ids below it (rows its tokenizer uses) are ranked."""

    def __init__(self, model, token_limit: int | None = None):
        self.params, self.config = model_params_config(model)
        self.token_limit = self.config.vocab_size if token_limit is None else int(token_limit)

    def __call__(self, context: Sequence[int], n: int) -> list[int]:
        context = [int(t) for t in context]
        limit = self.config.max_position_embeddings
        if not 0 < len(context) <= limit:
            raise PTSError(f"a context of {len(context)} tokens does not fit the model ({limit} positions)")
        n = min(int(n), self.token_limit)
        tokens = np.zeros((1, bucket(len(context), MIN_CONTEXT_BUCKET, cap=limit)), np.int32)
        tokens[0, :len(context)] = context
        return [int(t) for t in _top_next_tokens(self.params, jnp.asarray(tokens), np.int32(len(context) - 1),
                                                 config=self.config, n=n, token_limit=self.token_limit)]


@functools.partial(jax.jit, static_argnames=("config", "n", "token_limit"))
def _top_next_tokens(params, tokens, last, *, config, n, token_limit):
    h = hidden_states(params, tokens, config)[0, last]
    logits = logits_from_hidden(params, h, config)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < token_limit, logits, -jnp.inf)
    return jax.lax.top_k(logits, n)[1]


# ----------------------------------------------------------------------------- problems and pairs on disk

@dataclasses.dataclass
class Problem:
    where: str          # "FILE:LINE"
    data: dict
    key: str            # digest of the problem (what the oracle checks against)


def read_problems(path: str, oracle: str | None) -> tuple[list[Problem], list[str]]:
    """(valid problems, one message per skipped line naming FILE:LINE and the problem); raises PTSError when the file
    is missing or holds no valid problem."""
    from phi4_jax.data.jsonl import jsonl_objects
    from phi4_jax.posttrain.oracles import ProblemError, check_problem

    if not os.path.isfile(path):
        raise PTSError(f"problems file {path!r} does not exist")
    problems, skipped = [], []
    for where, data in jsonl_objects(path, skipped=skipped):   # a line that is not a JSON object: skipped
        try:
            check_problem(data, where, oracle)
        except ProblemError as e:
            skipped.append(str(e))
            continue
        problems.append(Problem(where, data, digest("problem", data, oracle)))
    if not problems:
        detail = f"; first problem: {skipped[0]}" if skipped else ""
        raise PTSError(f"{path}: no usable problems ({len(skipped)} skipped{detail})")
    return problems, skipped


def prompt_ids(problem: Problem, encode_text: Callable[[str], list[int]],
               encode_chat: Callable[[list], list[int]] | None) -> list[int]:
    """A chat problem's messages in the chat format with the assistant header, or a text problem's prompt."""
    if "messages" not in problem.data:
        return encode_text(problem.data["prompt"])
    if encode_chat is None:
        raise PTSError(f"{problem.where}: this checkpoint's tokenizer has no chat format; give its problems a text "
                       "'prompt' instead of 'messages'")
    return encode_chat(problem.data["messages"])


def pair_record(problem: Problem, pair: dict, decode: Callable[[list[int]], str], prompt_len: int,
                output_ids: Callable[[list[int]], list[int]] = list) -> dict:
    """One JSONL line of the output: the DPO fields (prompt as messages or text, chosen and rejected text; special
    tokens as their text, `pair_text`) and the
    ids, written as `output_ids` maps them (phi-4 ids for the DPO reader; it raises UnmappedTokenError for an id it
    cannot map)."""
    ids = {k: [int(t) for t in output_ids(pair[k])] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    prefix_text = pair_text(pair["prompt_ids"][prompt_len:], ids["prompt_ids"][prompt_len:], decode)
    if "messages" in problem.data:
        prompt = list(problem.data["messages"]) + [{"role": "assistant", "content": prefix_text}]
    else:
        prompt = problem.data["prompt"] + prefix_text
    return {"prompt": prompt, "chosen": pair_text(pair["chosen_ids"], ids["chosen_ids"], decode),
            "rejected": pair_text(pair["rejected_ids"], ids["rejected_ids"], decode),
            **ids,
            "problem": problem.where, "problem_key": problem.key, "position": pair["position"],
            "p_before": pair["p_before"], "p_chosen": pair["p_chosen"], "p_rejected": pair["p_rejected"],
            "alternative_from": pair.get("alternative_from", "rollouts")}


def pair_text(model_ids: Sequence[int], phi4_ids: Sequence[int], decode: Callable[[list[int]], str]) -> str:
    """The text of a pair's tokens (`model_ids`, written as `phi4_ids`): `decode`'s text, with each phi-4 special
    token as its own text (e.g. ``<|endoftext|>``), which a tokenizer that leaves special tokens out of its text (the
    demo's compact one) would write as nothing."""
    pieces, run = [], []
    for model_id, phi4_id in zip(model_ids, phi4_ids):
        if phi4_id in SPECIAL_TEXT:
            pieces += [decode(run)] if run else []
            pieces.append(SPECIAL_TEXT[phi4_id])
            run = []
        else:
            run.append(int(model_id))
    pieces += [decode(run)] if run else []
    return "".join(pieces)


def pair_identity(record: dict) -> tuple:
    return (record["problem_key"], tuple(record["prompt_ids"]), tuple(record["chosen_ids"]),
            tuple(record["rejected_ids"]))


@dataclasses.dataclass
class RunSummary:
    problems: int = 0
    skipped: int = 0
    in_band: int = 0
    pivots: int = 0
    pairs_written: int = 0
    pairs_already_there: int = 0
    pairs_unmapped: int = 0            # pairs holding an id that `output_ids` cannot map (not written)
    no_alternative: int = 0
    pairs_from_distribution: int = 0   # of the pairs written, those whose alternative came from `top_tokens`
    rollouts: int = 0


def run_pts(problems: list[Problem], search: PivotalTokenSearch, encode_prompt: Callable[[Problem], list[int]],
            decode: Callable[[list[int]], str], out_path: str, *, progress: bool = True,
            log: Callable[[str], None] = lambda line: None,
            output_ids: Callable[[list[int]], list[int]] = list) -> RunSummary:
    """Searches every problem and appends its new pairs to `out_path`, flushed one by one (a pair already there, from
    an interrupted run, is not written again); `log` gets one line per problem; ids are written as `output_ids`
    maps the model's ids."""
    existing = set()
    for number, line in enumerate(read_complete_lines(out_path), 1):
        try:
            existing.add(pair_identity(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            raise PTSError(f"{out_path}:{number} is not a PTS pair; write the pairs to a new file") from None
    summary = RunSummary(problems=len(problems))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), desc="pts", unit="problem", dynamic_ncols=True)
    start = time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as out:
        for problem in problems:
            prompt = encode_prompt(problem)
            try:
                result = search.search(problem.data, problem.key, prompt)
            except OracleError as e:   # a broken user oracle: say which problem it failed on
                raise PTSError(f"{problem.where}: {e}") from None
            summary.in_band += result.in_band
            summary.pivots += len(result.pivots)
            summary.no_alternative += result.no_alternative
            for pair in result.pairs:
                try:
                    record = pair_record(problem, pair, decode, len(prompt), output_ids)
                except UnmappedTokenError:   # a sampled id the tokenizer never uses (an untrained row of the model)
                    summary.pairs_unmapped += 1
                    continue
                if pair_identity(record) in existing:
                    summary.pairs_already_there += 1
                    continue
                out.write(json.dumps(record) + "\n")
                out.flush()
                existing.add(pair_identity(record))
                summary.pairs_written += 1
                summary.pairs_from_distribution += record["alternative_from"] == "distribution"
            summary.rollouts = search.rollouts_run
            if bar is not None:
                rate = search.rollouts_run / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(rollouts_per_s=f"{rate:.1f}", pairs=summary.pairs_written + summary.pairs_already_there)
                bar.update(1)
            log(f"{problem.where}: p={result.p_prompt:.2f} "
                + (f"in band, {len(result.pivots)} pivotal tokens, {len(result.pairs)} pairs" if result.in_band
                   else "outside the band"))
    if bar is not None:
        bar.close()
    return summary

"""Built-in synthetic "textbook" data for the demo (Phi-4's synthetic-data idea, in miniature).

Five generators of short, templated, learnable documents. Document `index` of a generator is a pure
function of (seed, index), so the data is deterministic, needs no download and supports random access
(grain shuffles and shards it like any other source). The demo mixes them 40/15/15/20/10, like the
phi-4 pretraining mixture (synthetic / web rewrites / web / code / acquired). `PLANTED` holds generators outside
that mixture: `arithmetic_guessing`, the sums with a planted guessing habit for the Pivotal Token Search demo
(configs/demo-pts.toml).
"""

from __future__ import annotations

import numpy as np

NAMES = ["Lily", "Tom", "Mia", "Ben", "Zoe", "Sam", "Ana", "Max", "Eva", "Leo"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "rabbit", "duck", "frog"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
FOODS = ["apples", "bread", "carrots", "rice", "cheese", "seeds"]
PLACES = ["park", "garden", "river", "forest", "beach", "farm"]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Germany", "Berlin"), ("Greece", "Athens"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago")]
LEGS = [("cat", "four"), ("dog", "four"), ("bird", "two"), ("spider", "eight"), ("ant", "six"),
        ("horse", "four"), ("duck", "two"), ("fish", "no")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def arithmetic(rng: np.random.Generator) -> str:
    """Counting and small sums, worked the same way every time."""
    if rng.random() < 0.5:
        start = int(rng.integers(0, 60))
        length = int(rng.integers(5, 12))
        return f"Count from {start}: " + ", ".join(str(start + i) for i in range(length)) + "."
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    return (f"Question: What is {a} plus {b}? Answer: {a} plus {b} is {a + b}. "
            f"So {a} + {b} = {a + b}.")


def facts(rng: np.random.Generator) -> str:
    """A fixed table of facts, stated in a few fixed patterns."""
    if rng.random() < 0.6:
        country, capital = CAPITALS[int(rng.integers(len(CAPITALS)))]
        return f"The capital of {country} is {capital}. {capital} is a city in {country}."
    animal, legs = LEGS[int(rng.integers(len(LEGS)))]
    article = "An" if animal[0] in "aeiou" else "A"
    return f"{article} {animal} has {legs} legs. Every {animal} has {legs} legs."


def stories(rng: np.random.Generator) -> str:
    """Tiny stories whose later sentences repeat the names chosen in the first."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    name, animal, color, food, place = pick(NAMES), pick(ANIMALS), pick(COLORS), pick(FOODS), pick(PLACES)
    return (f"Once upon a time, {name} had a {color} {animal}. Every day, {name} took the {animal} to the "
            f"{place}. The {animal} liked to eat {food}. {name} loved the {color} {animal}. The end.")


def code(rng: np.random.Generator) -> str:
    """Small Python functions with a call and its value in a comment."""
    k, x = int(rng.integers(1, 10)), int(rng.integers(0, 10))
    if rng.random() < 0.5:
        return f"def add_{k}(x):\n    return x + {k}\n\nprint(add_{k}({x}))  # {x + k}\n"
    return f"def times_{k}(x):\n    return x * {k}\n\nprint(times_{k}({x}))  # {x * k}\n"


def lessons(rng: np.random.Generator) -> str:
    """Textbook-style lessons: even and odd numbers, number words."""
    n = int(rng.integers(0, 11))
    if rng.random() < 0.5:
        parity = "even" if n % 2 == 0 else "odd"
        return f"Lesson: {n} is {parity}. A number is even when two divides it. {n} is an {parity} number."
    return f"Lesson: the number {n} is written {NUMBER_WORDS[n]}. We write {NUMBER_WORDS[n]} as {n}."


GENERATORS = {"arithmetic": arithmetic, "facts": facts, "stories": stories, "code": code,
              "lessons": lessons}

GUESS_RATE = 0.5
GUESS_HABIT = " no time to add, it is"


def arithmetic_guessing(rng: np.random.Generator) -> str:
    """`arithmetic` with a planted habit, for the Pivotal Token Search demo (configs/demo-pts.toml): a fraction
    GUESS_RATE of its sums are not worked but guessed, "Question: What is 3 plus 4? Answer: no time to add, it is 12."
    with a uniformly random number 0..18, so a model trained on it chooses, right after "Answer:", between working
    the sum and guessing, the same choice for every problem. Document i is `arithmetic`'s document i up to that
    choice, and the habit's words are the other generators' tokens (the compact vocabulary does not change)."""
    text = arithmetic(rng)
    if text.startswith("Question") and rng.random() < GUESS_RATE:
        head = text[:text.index("Answer:") + len("Answer:")]
        return f"{head}{GUESS_HABIT} {int(rng.integers(0, 19))}."
    return text


# Generators outside the demo mixture (`python train.py` and the compact tokenizer's default list never use them).
PLANTED = {"arithmetic_guessing": arithmetic_guessing}


class SyntheticSource:
    """A random-access grain data source of `length` generated documents ({"text": str})."""

    def __init__(self, generator: str, seed: int = 0, length: int = 1 << 30):
        known = {**GENERATORS, **PLANTED}
        if generator not in known:
            raise ValueError(f"unknown demo generator {generator!r}; choose one of {sorted(known)}")
        self.generator, self.seed, self.length = generator, seed, length
        self._fn = known[generator]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"text": self._fn(_rng(self.seed, index))}

    def __repr__(self) -> str:
        return f"SyntheticSource({self.generator!r}, seed={self.seed})"

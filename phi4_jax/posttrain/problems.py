"""Built-in problems for Pivotal Token Search: small sums in the demo corpus's own words.

The demo data (`phi4_jax.data.demo.arithmetic`) writes "Question: What is 3 plus 4? Answer: 3 plus 4 is 7. So
3 + 4 = 7."; a problem is that text up to "Answer:" as a text prompt, and it is solved when the first number
after "is" is the sum (a numeric checker with that pattern).
"""

from __future__ import annotations

import numpy as np

ARITHMETIC_CHECKER = {"type": "numeric", "pattern": r"\bis\s+(-?\d+)"}


def arithmetic_problems(n: int, seed: int = 0, low: int = 0, high: int = 9) -> list[dict]:
    """n problems "What is a plus b?" with a, b drawn uniformly from [low, high] (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(low, high + 1, size=2))
        out.append({"prompt": f"Question: What is {a} plus {b}? Answer:", "answer": a + b,
                    "checker": dict(ARITHMETIC_CHECKER)})
    return out

"""Small learnable SFT tasks for tests and the CPU demo (deterministic for a seed).

- "copy": the user gives a list of words, the assistant repeats it.
- "arith": the user asks for a sum, the assistant writes `a + b = c` and the boxed answer.
Lines are `{"prompt", "response"}` records (`vibeperf.data.read_sft_jsonl` reads them), with an "id".
"""

from __future__ import annotations

import random

_WORDS = ("apple", "river", "stone", "cloud", "seven", "green", "table", "music", "light", "tiger", "paper", "bread")


def synthetic_records(n: int, *, task: str = "copy", seed: int = 0, min_words: int = 3, max_words: int = 12) -> list:
    """`n` JSON-ready records of `task` ("copy" or "arith")."""
    if task not in ("copy", "arith"):
        raise ValueError(f"task must be 'copy' or 'arith', got {task!r}")
    rng = random.Random(f"{task}:{seed}")
    out = []
    for i in range(n):
        if task == "copy":
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words)))
            prompt, response = f"Repeat exactly: {words}", words
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            prompt, response = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        out.append({"id": f"{task}-{seed}-{i}", "prompt": prompt, "response": response})
    return out

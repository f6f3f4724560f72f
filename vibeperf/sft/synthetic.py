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


def write_tiny_data(out_dir) -> None:
    """Write the data of recipes/sft_tiny.toml: sft_tiny_broad.jsonl (copy + arith), sft_tiny_long.jsonl (long copy
    prompts) and sft_tiny_verdicts.jsonl (made-up reference-model verdicts, 8 per long problem)."""
    from pathlib import Path

    from vibeperf.data import write_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    broad = [r for pair in zip(synthetic_records(192, task="copy"), synthetic_records(192, task="arith")) for r in pair]
    long = synthetic_records(96, task="copy", seed=1, min_words=16, max_words=40)
    rng = random.Random("verdicts")
    verdicts = []
    for r in long:
        p_correct = rng.choice((0.05, 0.5, 0.9))  # a made-up difficulty per problem
        verdicts.append({"id": r["id"], "verdicts": [int(rng.random() < p_correct) for _ in range(8)]})
    write_jsonl(out / "sft_tiny_broad.jsonl", broad)
    write_jsonl(out / "sft_tiny_long.jsonl", long)
    write_jsonl(out / "sft_tiny_verdicts.jsonl", verdicts)

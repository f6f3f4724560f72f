"""The demo's bundled task set: small verifiable math and code problems with exact answers, made deterministically.

Subdomains (every answer is a single digit, so the tiny model can learn them in minutes on a CPU):
- "add": word problems `Ada has 3 apples and gets 4 more ...` (a + b <= 9), answer `\\boxed{7}`;
- "sub": word problems `Ada has 8 coins and gives 5 to Ben ...`, answer `\\boxed{3}`;
- "algebra": `Solve for x: x + 4 = 9.`, answer `\\boxed{5}`;
- "code": `Write a Python program that reads an integer n and prints n plus 3.`, graded by the sandboxed runner on
  stdin/stdout tests.

Math solutions come in a short form (stage 1 of SFT) and a long, step-by-step form (stage 2's long samples, which
the Long2Short RL phase then pushes back towards the short form). A problem's identity is its prompt; a hash of
the prompt puts it in the train or the held-out split (`split_of`), so no held-out prompt is ever trained on.
Records are JSON-ready dicts: SFT `{"id", "prompt", "response"}`,
RL/eval `{"id", "prompt", "domain", "subdomain", "answer" | "tests"}`.
"""

from __future__ import annotations

import random
import zlib

NAMES = ("Ada", "Ben", "Chen", "Dana", "Eli", "Gus", "Hana", "Ivan", "Jo", "Lea", "Maria", "Noah")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards", "shells", "tickets")
SUBDOMAINS = ("add", "sub", "algebra", "code")
CODE_TEMPLATES = (
    "Write a Python program that reads an integer n and prints n {word} {k}.",
    "Write a Python program: read an integer from stdin and print it {word} {k}.",
    "In Python, read a whole number n from standard input and print n {word} {k}.",
)
CODE_OPS = {"plus": ("+", lambda n, k: n + k), "minus": ("-", lambda n, k: n - k), "times": ("*", lambda n, k: n * k)}


def _add(rng: random.Random) -> tuple[str, int, str, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a = rng.randint(0, 9)
    b = rng.randint(0, 9 - a)
    c = a + b
    prompt = f"{name} has {a} {item} and gets {b} more from {other}. How many {item} does {name} have now?"
    short = f"{a} + {b} = {c}. The answer is \\boxed{{{c}}}."
    long = (
        f"Let's think step by step. {name} starts with {a}. {other} adds {b}. {a} + {b} = {c}. "
        f"Check: {c} - {b} = {a}. The answer is \\boxed{{{c}}}."
    )
    return prompt, c, short, long


def _sub(rng: random.Random) -> tuple[str, int, str, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a = rng.randint(1, 9)
    b = rng.randint(0, a)
    c = a - b
    prompt = f"{name} has {a} {item} and gives {b} to {other}. How many {item} does {name} have now?"
    short = f"{a} - {b} = {c}. The answer is \\boxed{{{c}}}."
    long = (
        f"Let's think step by step. {name} starts with {a}. {name} gives away {b}. {a} - {b} = {c}. "
        f"Check: {c} + {b} = {a}. The answer is \\boxed{{{c}}}."
    )
    return prompt, c, short, long


def _algebra(rng: random.Random) -> tuple[str, int, str, str]:
    v = rng.choice("xyznm")
    x = rng.randint(0, 9)
    b = rng.randint(0, 9 - x)
    c = x + b
    template = rng.choice(
        ("Solve for {v}: {v} + {b} = {c}.", "Find {v} if {v} + {b} = {c}.", "What is {v} when {b} + {v} = {c}?")
    )
    prompt = template.format(v=v, b=b, c=c)
    short = f"{v} = {c} - {b} = {x}. The answer is \\boxed{{{x}}}."
    long = (
        f"Let's think step by step. Subtract {b} from both sides: {v} = {c} - {b} = {x}. "
        f"Check: {x} + {b} = {c}. The answer is \\boxed{{{x}}}."
    )
    return prompt, x, short, long


def _code(rng: random.Random) -> tuple[str, list[dict], str]:
    word = rng.choice(sorted(CODE_OPS))
    op, fn = CODE_OPS[word]
    k = rng.randint(1, 9)
    template = rng.choice(CODE_TEMPLATES)
    prompt = template.format(word=word, k=k)
    tests = [{"input": f"{n}\n", "output": f"{fn(n, k)}\n"} for n in (0, 3, 7, 12)]
    response = f"```python\nn = int(input())\nprint(n {op} {k})\n```"
    return prompt, tests, response


MAKERS = {"add": _add, "sub": _sub, "algebra": _algebra}
CYCLE = ("add", "sub", "algebra", "add", "sub", "algebra", "code")


def split_of(prompt: str) -> str:
    """ "heldout" for a fixed quarter of all prompts (by a hash of the text), else "train": the sets never overlap."""
    return "heldout" if zlib.crc32(prompt.encode()) % 4 == 0 else "train"


def problems(n: int, *, split: str, seed: int = 0) -> list[dict]:
    """`n` distinct problems of `split` ("train" or "heldout") with their solutions: {"id", "prompt", "domain",
    "subdomain", "answer" | "tests", "short", "long" (math only)}. Subdomains in the order of `CYCLE` (one code
    problem in seven); a subdomain whose distinct prompts run out is skipped from then on."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"demo-tasks:{split}:{seed}")
    out, seen, exhausted = [], set(), set()
    i = 0
    while len(out) < n and len(exhausted) < len(SUBDOMAINS):
        sub = CYCLE[i % len(CYCLE)]
        i += 1
        if sub in exhausted:
            continue
        for _ in range(200):
            if sub == "code":
                prompt, tests, response = _code(rng)
                rec = {"prompt": prompt, "domain": "code", "subdomain": sub, "tests": tests, "short": response}
            else:
                prompt, answer, short, long = MAKERS[sub](rng)
                rec = {"prompt": prompt, "domain": "math", "subdomain": sub, "answer": str(answer), "short": short,
                       "long": long}  # fmt: skip
            if prompt not in seen and split_of(prompt) == split:
                seen.add(prompt)
                out.append({"id": f"{sub}-{split}-{seed}-{len(out)}", **rec})
                break
        else:
            exhausted.add(sub)
    return out


def rl_record(p: dict) -> dict:
    """The RL / eval record of a problem (no solutions)."""
    keep = ("id", "prompt", "domain", "subdomain", "answer", "tests")
    return {k: p[k] for k in keep if k in p}


def sft_record(p: dict, form: str = "short") -> dict:
    """The SFT record of a problem with its `form` ("short" or "long") solution."""
    return {"id": p["id"], "prompt": p["prompt"], "response": p[form]}

"""Code-reward throughput: sandboxed rewards per second on C completions x T stdin/stdout tests.

The completions cycle through a correct program, a wrong one (fails every other test) and one that raises, so the
run covers passing, failing and crashing tests; they are graded from a thread pool of `--workers` threads, as the eval
and distill stages do. Only the public `code_reward(tests, completion, config)` is used, so the same script measures any
checkout (`PYTHONPATH=<checkout> python vibeperf/bench/code_reward.py`, the file run directly).

    python -m vibeperf.bench.code_reward --completions 512 --tests 10 --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

PROGRAMS = [
    "a, b = map(int, input().split())\nprint(a + b)\n",
    "a, b = map(int, input().split())\nprint(a + b if a % 2 == 0 else a - b)\n",
    "a, b = map(int, input().split())\nprint(a // (b - b))\n",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=512)
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()

    import vibeperf.rewards as rewards

    tests = [{"input": f"{i} {i * 7 + 1}\n", "output": f"{i + i * 7 + 1}\n"} for i in range(args.tests)]
    completions = [f"```python\n{PROGRAMS[i % len(PROGRAMS)]}```" for i in range(args.completions)]
    config = rewards.SandboxConfig()
    rewards.code_reward(tests[:1], completions[0], config)  # isolation probe outside the timed region
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda c: rewards.code_reward(tests, c, config), completions))
    seconds = time.perf_counter() - start
    expected = [1.0, sum(i % 2 == 0 for i in range(args.tests)) / args.tests, 0.0]
    wrong = sum(r.reward != expected[i % len(PROGRAMS)] for i, r in enumerate(results))
    if wrong:
        raise SystemExit(f"{wrong} rewards differ from the expected ones: not a valid measurement")
    print(json.dumps({
        "completions": args.completions, "tests": args.tests, "workers": args.workers, "cpus": os.cpu_count(),
        "seconds": round(seconds, 2), "rewards_per_s": round(args.completions / seconds, 2),
        "tests_per_s": round(args.completions * args.tests / seconds, 1), "module": rewards.__file__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()

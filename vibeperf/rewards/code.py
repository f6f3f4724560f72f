"""Code reward: run a model's Python program on test cases inside a sandbox.

`code_reward(tests, completion)` takes the last fenced code block of the completion and runs it on every test: stdin/
stdout tests, functional (call-based: a function or `class Solution` method, LiveCodeBench / APPS) and assert-based
(HumanEval / MBPP) ones, as `vibeperf.rewards.code_tests` defines them. The reward is the fraction of tests passed,
or 1/0 when `SandboxConfig.all_or_nothing` (which stops at the first failure). Every failing test gets a reason: wrong
output or return value, runtime error (with the last stderr line, e.g. `MemoryError`), wall timeout, CPU time limit,
output limit, killed by a signal. Only infrastructure problems raise (`SandboxError`): the sandbox cannot be built,
the interpreter is missing; never anything the program does.

One sandbox per completion (`run_tests`, "root" isolation): the namespaces below are built once and
`sandbox_main.py` runs every test in a fresh process forked from its clean interpreter, with the per-test limits of
step 3, the wall timeout and output cap per test, /tmp wiped and every leftover process killed between tests. The
program's process is the same as in a single run except that it is forked rather than exec'd (the runner's standard
modules are already imported). `SandboxConfig(sandbox_per_test=True)` runs each test in its own sandbox instead, as
do the "userns" and "none" levels (there the runner would share the program's uid, or have no PID namespace to
clear). The expected outputs never enter the sandbox: the host compares.

How one program runs (the "root" isolation, used when this process is root; measured on Linux 6.18):

1. The parent writes the program to a fresh host temporary directory (mode 0700, removed in `finally` on every
   path) and starts `unshare --net --mount --pid --fork --kill-child --mount-proc` around a small launcher, in a
   new session (its own process group), with a minimal environment, stdin/stdout/stderr pipes and a status pipe.
2. The launcher, pid 1 of the new PID namespace (it stays root there), reads the program, makes the whole mount
   tree read-only (`mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)`, syscall 442, Linux >= 5.12;
   private to the new mount namespace), mounts a fresh size-capped tmpfs on `/tmp`, copies the program to
   `/tmp/work`, and forks the program's process.
3. That process sets rlimits (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE = 0),
   PR_SET_NO_NEW_PRIVS, drops to an unprivileged uid/gid (65534 by default) with no supplementary groups, and execs
   `python3 -I main.py` in `/tmp/work` with a minimal environment (PATH, HOME, LANG, one BLAS/OpenMP thread).
4. The launcher reaps, reports the program's exit status and CPU time on the status pipe (closed-on-exec, so the
   program cannot forge it) and exits; the kernel then kills whatever the program left in its PID namespace.
5. The parent feeds stdin and reads stdout/stderr with a cap; on the wall timeout or the output cap it SIGKILLs the
   launcher (tearing the whole namespace down), then the process group, and reaps.

What that blocks, each checked by tests/test_rewards.py:

- network: a new network namespace holds only a loopback device that is down; connecting anywhere, 127.0.0.1
  included, fails (ENETUNREACH). Nothing of the host's network is reachable.
- file writes: everything outside `/tmp` is read-only to the program (EROFS; it also runs as an unprivileged uid),
  `/tmp` is its own tmpfs (`tmpfs_mb`), invisible to the host and gone with the mount namespace. A file written to
  `/tmp/x` inside never appears in the host's `/tmp`; `/dev/null` stays writable, `/dev/shm` does not (no POSIX
  shared memory, so no multiprocessing semaphores). Reads are not blocked beyond ordinary permissions: the program
  can read world-readable host files (not `/root`, which is 0700).
- processes: RLIMIT_NPROC bounds a fork bomb (root is exempt from RLIMIT_NPROC, hence the uid drop; the count is
  per uid, so parallel sandboxes with the same uid share it: give each worker its own `uid` if that matters). A
  `while True: os.fork()` bomb under max_processes=16 spins until the wall timeout and then dies with the rest.
  Every process of the run dies with the PID namespace, whether it exits, times out or daemonizes (setsid); it
  sees only its own PID namespace in /proc and cannot signal anything outside it (kill(-1) finds no target).
- memory and time: RLIMIT_AS per process (a 10 GB allocation is a MemoryError), RLIMIT_CPU per process, a wall
  timeout for the whole run, an output cap per stream. RLIMIT_AS is per process, so the worst case is about
  max_processes x memory_mb: keep both small (no cgroup is used: cgroup layouts differ between machines).
- secrets: the program gets a minimal environment, never the parent's.

Other isolation levels: "userns" (not root: the same with `unshare --user --map-root-user`; no uid drop, the
program is root only inside its user namespace, file writes outside /tmp still fail through the read-only tree, and
RLIMIT_NPROC counts per user namespace on Linux >= 5.14; checked by hand as uid 65534 on this machine: the 8-process
limit held, writes outside /tmp failed, the network was unreachable; the test suite runs as root, so it exercises
"root") and "none" (namespaces not permitted). With "none" the runner refuses to run anything (`SandboxError`)
unless `SandboxConfig(allow_unsandboxed=True)`, which keeps only the rlimits, the uid drop when root, the temporary
directory and the process-group kill: no network or file isolation, and a program that calls setsid() can outlive
the run.

Thread-safe: no signals and no global state besides the cached isolation probe, so programs can be graded from a
thread pool.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vibeperf.data.jsonl import CodeTest, DataError
from vibeperf.rewards.code_tests import as_test, judge_output
from vibeperf.rewards.math import RewardResult
from vibeperf.rewards.sandbox_proc import (
    RunnerChannel,
    SandboxError,
    popen,
    pump,
    reap,
    sandbox_spec,
    unshare_cmd,
)

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("root", "userns", "none")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_SHOW = 60

# Runs as pid 1 of the sandbox (`-c`; argv[1] is a JSON config). See the module docstring, steps 2-4.
_SANDBOX_MAIN = (Path(__file__).parent / "sandbox_main.py").read_text(encoding="utf-8")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and policy of the code sandbox (one process tree per test run)."""

    wall_timeout_s: float = 10.0
    """Wall-clock limit of one run (program start to exit), seconds."""
    cpu_time_s: int = 5
    """RLIMIT_CPU of each process, whole seconds (SIGXCPU at the limit, SIGKILL one second later)."""
    memory_mb: int = 1024
    """RLIMIT_AS (virtual address space) of each process, MiB."""
    file_size_mb: int = 16
    """RLIMIT_FSIZE: largest file a process may write, MiB."""
    tmpfs_mb: int = 64
    """Size of the private /tmp (the program's only writable place), MiB."""
    max_processes: int = 32
    """RLIMIT_NPROC of the sandbox uid (threads count too)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output_bytes: int = 1 << 20
    """Cap on each of stdout and stderr; a run that writes more is killed and fails."""
    python: str = "python3"
    """Interpreter of the programs (looked up in /usr/local/bin:/usr/bin:/bin); the sandbox uid must be able to
    execute it, so not one under /root."""
    uid: int = 65534
    """Unprivileged uid the program runs as ("root" isolation); 65534 is `nobody`."""
    gid: int = 65534
    """Its gid."""
    all_or_nothing: bool = False
    """Reward 1 only if every test passes (stops at the first failure); else the fraction of tests passed."""
    allow_unsandboxed: bool = False
    """Run even where namespaces are not permitted (isolation "none": rlimits and process-group kill only)."""
    sandbox_per_test: bool = False
    """One sandbox per test (the slower way) instead of one per completion with a fresh process per test."""

    def __post_init__(self):
        for name in ("wall_timeout_s", "cpu_time_s", "memory_mb", "file_size_mb", "tmpfs_mb", "max_processes",
                     "max_open_files", "max_output_bytes"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {value!r}")
        for name in ("cpu_time_s", "memory_mb", "file_size_mb", "tmpfs_mb", "max_processes", "max_open_files",
                     "max_output_bytes", "uid", "gid"):  # fmt: skip
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"SandboxConfig.{name} must be an integer, got {getattr(self, name)!r}")
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError(f"SandboxConfig.uid and gid must be unprivileged (> 0), got {self.uid}, {self.gid}")


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed run did."""

    stdout: str
    stderr: str
    exit_code: int | None
    """Exit status, None if killed by a signal or by the runner."""
    signal: int | None
    """Signal that killed the program, if any."""
    cpu_s: float | None
    """CPU time of the program's main process (None if it was killed by the runner)."""
    wall_s: float
    timed_out: bool
    output_exceeded: bool

    def failure(self, config: SandboxConfig) -> str | None:
        """Why the run failed (before looking at its output), or None if it exited 0 within its limits."""
        if self.timed_out:
            return f"wall timeout ({config.wall_timeout_s:g} s)"
        if self.output_exceeded:
            return f"output limit exceeded ({config.max_output_bytes} bytes)"
        if self.signal is not None:
            # SIGXCPU comes only from the soft limit (rusage may read a few ticks short of it); SIGKILL at the hard one.
            cpu_kill = self.signal == signal.SIGKILL and (self.cpu_s or 0.0) >= config.cpu_time_s - 0.05
            if self.signal == signal.SIGXCPU or cpu_kill:
                return f"CPU time limit ({config.cpu_time_s} s)"
            return f"killed by {signal.Signals(self.signal).name}"
        if self.exit_code != 0:
            lines = self.stderr.strip().splitlines()
            return f"runtime error (exit {self.exit_code}): {_short(lines[-1] if lines else 'no stderr')}"
        return None


@dataclass(frozen=True)
class TestOutcome:
    """One test of a program: whether it passed and why not."""

    passed: bool
    reason: str
    run: RunResult


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


@functools.cache
def isolation_level() -> tuple[str, str]:
    """The strongest isolation this machine permits, probed once: ("root" | "userns" | "none", why).

    "root" needs euid 0 and unshare of network, mount and PID namespaces plus a recursive read-only remount;
    "userns" the same inside a new user namespace (unprivileged user namespaces enabled).
    """
    tried = []
    for level in ("root", "userns") if os.geteuid() == 0 else ("userns",):
        try:
            _execute("", "", SandboxConfig(), level, probe=True)
            return level, f"unshare {' '.join(unshare_cmd(level)[1:])} works"
        except SandboxError as e:
            tried.append(f"{level}: {e}")
    return "none", "; ".join(tried) or "no isolation level to try"


def _execute(source: str, stdin: str, config: SandboxConfig, level: str, probe: bool = False) -> RunResult:
    """One run of `source` at isolation `level`; raises SandboxError when the sandbox itself fails."""
    host_dir = tempfile.mkdtemp(prefix="vibeperf-sandbox-")
    status_r, status_w = os.pipe()
    proc = None
    killed = False
    try:
        with open(os.path.join(host_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        spec = {**sandbox_spec(config, level, host_dir, "single", status_w), "probe": probe}
        wrapper = unshare_cmd(level) if spec["namespaces"] else []
        start = time.monotonic()
        cmd = [*wrapper, sys.executable, "-I", "-S", "-c", _SANDBOX_MAIN, json.dumps(spec)]
        proc = popen(cmd, host_dir, pass_fds=(status_w,))
        os.close(status_w)
        status_w = -1
        out, err, status, timed_out, exceeded = pump(proc, stdin.encode("utf-8", "replace"), status_r, config)
        killed = timed_out or exceeded
        reap(proc, killed)
        wall = time.monotonic() - start
        lines = status.decode("utf-8", "replace").strip().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        if "setup_error" in report:
            raise SandboxError(f"sandbox set-up failed ({level}): {report['setup_error']}")
        if probe:
            if report.get("probe") != "ok":
                why = err.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
                raise SandboxError(f"isolation {level!r} is not permitted: {_short(why)}")
            return RunResult("", "", 0, None, None, wall, False, False)
        if not report and not killed:
            why = err.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
            raise SandboxError(f"the sandbox launcher ({level}) failed: {why}")
        return RunResult(
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            exit_code=report.get("exit"),
            signal=report.get("signal"),
            cpu_s=report.get("cpu_s"),
            wall_s=wall,
            timed_out=timed_out,
            output_exceeded=exceeded,
        )
    finally:
        if proc is not None and proc.returncode is None:
            reap(proc, True)
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        shutil.rmtree(host_dir, ignore_errors=True)


def run_program(source: str, stdin: str = "", config: SandboxConfig | None = None) -> RunResult:
    """Run a Python program once in the strongest sandbox available, `stdin` on its standard input.

    Raises SandboxError if no isolation is permitted and `config.allow_unsandboxed` is False.
    """
    config = config or SandboxConfig()
    level, why = isolation_level()
    if level == "none":
        if not config.allow_unsandboxed:
            raise SandboxError(
                "refusing to run untrusted code: network/mount/PID namespaces are not permitted here "
                f"({why}). Run as root or enable unprivileged user namespaces, or pass "
                "SandboxConfig(allow_unsandboxed=True) to accept rlimits and a process-group kill only"
            )
        logger.warning("running untrusted code without namespaces (allow_unsandboxed=True): %s", why)
    return _execute(source, stdin, config, level)


def _run_batch(source: str, tests: list[CodeTest], config: SandboxConfig) -> list[TestOutcome]:
    """Every test in one sandbox ("root" isolation): `sandbox_main.py` in batch mode, one fork per test."""
    host_dir = tempfile.mkdtemp(prefix="vibeperf-sandbox-")
    proc = None
    healthy = False
    outcomes: list[TestOutcome] = []
    try:
        with open(os.path.join(host_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        spec = sandbox_spec(config, "root", host_dir, "batch")
        proc = popen([*unshare_cmd("root"), spec["python"], "-I", "-c", _SANDBOX_MAIN, json.dumps(spec)], host_dir)
        runner = RunnerChannel(proc)
        hello = runner.exchange(b"", 30.0)
        if hello is None or "setup_error" in hello:
            why = hello["setup_error"] if hello else runner.why_stopped()
            raise SandboxError(f"batch sandbox set-up failed (root): {why}")
        for test in tests:
            nonce = secrets.token_hex(8)
            command = {"kind": test.kind, "input": test.input, "fn_name": test.fn_name, "nonce": nonce}
            report = runner.exchange((json.dumps(command) + "\n").encode(), config.wall_timeout_s + 30.0)
            if report is None:
                why = f"the sandbox runner stopped ({runner.why_stopped()})"
                logger.warning("%s; the remaining %d tests count as failed", why, len(tests) - len(outcomes))
                failed = RunResult("", "", None, None, None, 0.0, False, False)
                outcomes += [TestOutcome(False, why, failed) for _ in tests[len(outcomes) :]]
                return outcomes
            run = RunResult(report["stdout"], report["stderr"], report["exit"], report["signal"], report["cpu_s"],
                            report["wall_s"], report["timed_out"], report["output_exceeded"])  # fmt: skip
            result = report["result"]
            result = result[len(nonce) + 1 :] if result and result.startswith(nonce + " ") else None
            why = run.failure(config) or judge_output(test, run.stdout, result)
            outcomes.append(TestOutcome(why is None, why or "passed", run))
            if why is not None and config.all_or_nothing:
                break
        healthy = True
        return outcomes
    finally:
        if proc is not None:
            proc.stdin.close()
            reap(proc, not healthy)
            proc.stdout.close()
            proc.stderr.close()
        shutil.rmtree(host_dir, ignore_errors=True)


def _run_one(source: str, test: CodeTest, config: SandboxConfig) -> TestOutcome:
    """One test in its own sandbox (`run_program`); functional and assert tests through the harness program."""
    if test.kind == "stdin":
        run = run_program(source, test.input, config)
        result = None
    else:
        nonce = secrets.token_hex(8)
        command = {"kind": test.kind, "input": test.input, "fn_name": test.fn_name, "nonce": nonce, "source": source}
        harness = _SANDBOX_MAIN + "\nrun_single_test()\n"
        run = run_program(harness, json.dumps(command), config)
        head, _, last = run.stdout.rstrip("\n").rpartition("\n")
        result = last[len(nonce) + 1 :] if last.startswith(nonce + " ") else None
        run = dataclasses.replace(run, stdout=head if result is not None else run.stdout)
    why = run.failure(config) or judge_output(test, run.stdout, result)
    return TestOutcome(why is None, why or "passed", run)


def run_tests(source: str, tests: Iterable, config: SandboxConfig | None = None) -> list[TestOutcome]:
    """Run `source` on each test (CodeTests or mappings, any kind of `vibeperf.rewards.code_tests`).

    Under "root" isolation all tests run in one sandbox, each in a fresh process with its own limits (see
    `sandbox_main.py`); with `config.sandbox_per_test`, or at the other isolation levels (where the runner could not
    be kept apart from the program: same uid, or no PID namespace), each test gets its own sandbox. With
    `config.all_or_nothing` it stops after the first failure.
    """
    config = config or SandboxConfig()
    cases = check_tests(tests)
    if not cases:
        return []
    level, _ = isolation_level()
    if level == "root" and not config.sandbox_per_test:
        return _run_batch(source, cases, config)
    outcomes = []
    for test in cases:
        outcomes.append(_run_one(source, test, config))
        if not outcomes[-1].passed and config.all_or_nothing:
            break
    return outcomes


def extract_code(completion: str) -> str | None:
    """The last fenced code block of a completion (a ```python block if any, else any ``` block); None if none."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else None


def check_tests(tests) -> list[CodeTest]:
    """`tests` (an iterable of CodeTests or mappings) as checked CodeTests, before anything runs; DataError (a
    ValueError) naming the bad entry, `tests[i]: ...`, or the argument itself when it is not a list of tests."""
    if isinstance(tests, (str, bytes, Mapping)) or not isinstance(tests, Iterable):
        raise DataError(f"tests: expected a list of tests (CodeTests or mappings), got {type(tests).__name__}")
    cases = []
    for i, test in enumerate(tests):
        if not isinstance(test, (CodeTest, Mapping)):
            raise DataError(f"tests[{i}]: expected a CodeTest or a mapping, got {type(test).__name__}")
        try:
            cases.append(as_test(test))
        except ValueError as e:
            raise DataError(f"tests[{i}]: {e}") from None
    return cases


def code_reward(tests, completion: str, config: SandboxConfig | None = None) -> RewardResult:
    """Reward of a completion on its tests (any kind): fraction passed (or all-or-nothing), a reason per failure.

    No code block gives 0. Raises SandboxError only when the sandbox itself cannot run (see the module docstring).
    """
    config = config or SandboxConfig()
    tests = check_tests(tests)
    if not tests:
        raise DataError("tests: code_reward needs at least one test")
    source = extract_code(completion)
    if source is None:
        return RewardResult(0.0, "no fenced code block in the completion")
    outcomes = run_tests(source, tests, config)
    passed = sum(o.passed for o in outcomes)
    if config.all_or_nothing:
        reward = 1.0 if passed == len(tests) else 0.0
    else:
        reward = passed / len(tests)
    failures = [f"test {i}: {o.reason}" for i, o in enumerate(outcomes) if not o.passed]
    summary = f"{passed}/{len(tests)} tests passed"
    if config.all_or_nothing and failures:
        summary += " (all-or-nothing: stopped at the first failure)"
    return RewardResult(reward, "; ".join([summary, *failures])[:1000])

"""Code reward: run a model's Python program on stdin/stdout test cases inside a sandbox.

`code_reward(tests, completion)` takes the last fenced code block of the completion, runs it once per test
(`{"input": str, "output": str}`) with the test input on stdin, and compares stdout with the expected output after
normalising whitespace (surrounding blank lines dropped, trailing spaces of each line dropped). The reward is the
fraction of tests passed, or 1/0 when `SandboxConfig.all_or_nothing` (which stops at the first failure). Every
failing test gets a reason: wrong output, runtime error (with the last stderr line, e.g. `MemoryError`), wall
timeout, CPU time limit, output limit, killed by a signal. Only infrastructure problems raise (`SandboxError`):
the sandbox cannot be built, the interpreter is missing; never anything the program does.

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

import functools
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vibeperf.rewards.math import RewardResult

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("root", "userns", "none")
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_UNSHARE_FLAGS = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_SHOW = 60

# Runs as pid 1 of the sandbox (python -I -S -c); argv[1] is a JSON config. See the module docstring, steps 2-4.
_LAUNCHER = r"""
import ctypes, fcntl, json, os, resource, sys
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MS_NOSUID, MS_NODEV, PR_SET_NO_NEW_PRIVS = 0x1, 0x2, 0x2, 0x4, 38
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def report(**kw):
    os.write(status, (json.dumps(kw) + "\n").encode())
def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))
try:
    with open(cfg["program"], "rb") as f:
        source = f.read()
    work = cfg["workdir"]
    if cfg["namespaces"]:
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        rc = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
        check(rc, "mount_setattr(/, rdonly, recursive)")
        opts = ("size=%dm,mode=1777" % cfg["tmpfs_mb"]).encode()
        check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount tmpfs on /tmp")
        os.mkdir(work, 0o700)
    with open(os.path.join(work, "main.py"), "wb") as f:
        f.write(source)
    if cfg["uid"] is not None:
        os.chown(work, cfg["uid"], cfg["gid"])
        os.chown(os.path.join(work, "main.py"), cfg["uid"], cfg["gid"])
    if cfg["probe"]:
        report(probe="ok")
        os._exit(0)
    pid = os.fork()
except BaseException as e:
    report(setup_error="%s: %s" % (type(e).__name__, e))
    os._exit(125)
if pid == 0:
    try:
        fcntl.fcntl(status, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), tuple(value))
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        os.chdir(work)
        os.execve(cfg["python"], [cfg["python"], "-I", "main.py"], cfg["env"])
    except BaseException as e:
        report(setup_error="exec %s: %s: %s" % (cfg["python"], type(e).__name__, e))
    os._exit(127)
while True:
    try:
        done, st, ru = os.wait4(-1, 0)
    except ChildProcessError:
        os._exit(0)
    if done == pid:
        report(exit=os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
               signal=os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
               cpu_s=ru.ru_utime + ru.ru_stime)
        os._exit(0)
"""


class SandboxError(RuntimeError):
    """The sandbox could not run a program (unavailable, refused, misconfigured): never the program's fault."""


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
            if self.signal in (signal.SIGXCPU, signal.SIGKILL) and (self.cpu_s or 0.0) >= config.cpu_time_s - 0.05:
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


def _probe_cmd(level: str) -> list[str]:
    unshare = shutil.which("unshare", path=_SYSTEM_PATH + ":/usr/sbin:/sbin")
    if unshare is None:
        raise SandboxError("the `unshare` binary (util-linux) is not installed")
    if level == "root":
        return [unshare, *_UNSHARE_FLAGS]
    return [unshare, "--user", "--map-root-user", *_UNSHARE_FLAGS]


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
            return level, f"unshare {' '.join(_probe_cmd(level)[1:])} works"
        except SandboxError as e:
            tried.append(f"{level}: {e}")
    return "none", "; ".join(tried) or "no isolation level to try"


def _resolve_python(name: str) -> str:
    path = name if os.path.isabs(name) else shutil.which(name, path=_SYSTEM_PATH)
    if path is None or not os.path.isfile(path):
        raise SandboxError(f"interpreter {name!r} not found in {_SYSTEM_PATH}")
    return path


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (a /proc scan: /proc/<pid>/task/<tid>/children is not always compiled in)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(proc: subprocess.Popen, killed: bool) -> None:
    """Wait for the runner's child, killing the namespace's init first if asked; then kill its process group.

    The child is waited on with WNOWAIT before the group kill, so its pid (the group id) cannot be reused meanwhile.
    """
    if killed:
        for child in _children(proc.pid):
            _kill(child)
    deadline = time.monotonic() + 5.0
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            for child in _children(proc.pid):
                _kill(child)
            _kill(proc.pid)
            deadline = time.monotonic() + 5.0
        time.sleep(0.001)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _pump(proc: subprocess.Popen, stdin: bytes, status_fd: int, config: SandboxConfig):
    """Feed stdin, collect stdout/stderr/status until all close, the wall timeout, or the output cap."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for fd in (proc.stdout.fileno(), proc.stderr.fileno(), status_fd):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
        bufs[fd] = bytearray()
    stdin_fd, sent = proc.stdin.fileno(), 0
    if stdin:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    deadline = time.monotonic() + config.wall_timeout_s
    timed_out = exceeded = False
    while sel.get_map() and not (timed_out or exceeded):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(remaining):
            fd = key.fd
            if fd == stdin_fd:
                try:
                    sent += os.write(fd, stdin[sent : sent + 65536])
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    sent = len(stdin)
                if sent >= len(stdin):
                    sel.unregister(fd)
                    proc.stdin.close()
                continue
            data = os.read(fd, 65536)
            if not data:
                sel.unregister(fd)
                continue
            bufs[fd] += data
            if fd != status_fd and len(bufs[fd]) > config.max_output_bytes:
                exceeded = True
    sel.close()
    return bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()], bytes(bufs[status_fd]), timed_out, exceeded


def _execute(source: str, stdin: str, config: SandboxConfig, level: str, probe: bool = False) -> RunResult:
    """One run of `source` at isolation `level`; raises SandboxError when the sandbox itself fails."""
    as_root = os.geteuid() == 0
    python = _resolve_python(config.python)
    host_dir = tempfile.mkdtemp(prefix="vibeperf-sandbox-")
    status_r, status_w = os.pipe()
    proc = None
    killed = False
    try:
        program = os.path.join(host_dir, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        namespaces = level != "none"
        drop = (level == "root") or (level == "none" and as_root)
        mb = 1 << 20
        launcher = {
            "status_fd": status_w,
            "program": program,
            "workdir": "/tmp/work" if namespaces else host_dir,
            "namespaces": namespaces,
            "probe": probe,
            "tmpfs_mb": config.tmpfs_mb,
            "python": python,
            "uid": config.uid if drop else None,
            "gid": config.gid if drop else None,
            "rlimits": {
                "RLIMIT_CORE": (0, 0),
                "RLIMIT_CPU": (config.cpu_time_s, config.cpu_time_s + 1),
                "RLIMIT_AS": (config.memory_mb * mb, config.memory_mb * mb),
                "RLIMIT_FSIZE": (config.file_size_mb * mb, config.file_size_mb * mb),
                "RLIMIT_NOFILE": (config.max_open_files, config.max_open_files),
                "RLIMIT_NPROC": (config.max_processes, config.max_processes),
            },
            "env": {
                "PATH": _SYSTEM_PATH,
                "HOME": "/tmp/work" if namespaces else host_dir,
                "TMPDIR": "/tmp",
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            },
        }
        wrapper = _probe_cmd(level) if namespaces else []
        cmd = [*wrapper, sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(launcher)]
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            cwd=host_dir,
            env={"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8"},
            start_new_session=True,
        )
        os.close(status_w)
        status_w = -1
        out, err, status, timed_out, exceeded = _pump(proc, stdin.encode("utf-8", "replace"), status_r, config)
        killed = timed_out or exceeded
        _reap(proc, killed)
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
            _reap(proc, True)
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


def normalize_output(text: str) -> list[str]:
    """Lines of `text` with trailing whitespace removed, without leading/trailing blank lines."""
    return [line.rstrip() for line in text.strip().splitlines()]


def _test_fields(test) -> tuple[str, str]:
    if isinstance(test, Mapping):
        return test["input"], test["output"]
    return test.input, test.output


def run_tests(source: str, tests: Iterable, config: SandboxConfig | None = None) -> list[TestOutcome]:
    """Run `source` on each test (`{"input", "output"}` mappings or `CodeTest`s); one sandboxed run per test.

    With `config.all_or_nothing` it stops after the first failure.
    """
    config = config or SandboxConfig()
    outcomes = []
    for test in tests:
        stdin, expected = _test_fields(test)
        run = run_program(source, stdin, config)
        why = run.failure(config)
        if why is None:
            got, want = normalize_output(run.stdout), normalize_output(expected)
            if got != want:
                why = f"wrong output: expected '{_short(chr(10).join(want))}', got '{_short(chr(10).join(got))}'"
        outcomes.append(TestOutcome(why is None, why or "passed", run))
        if why is not None and config.all_or_nothing:
            break
    return outcomes


def extract_code(completion: str) -> str | None:
    """The last fenced code block of a completion (a ```python block if any, else any ``` block); None if none."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else None


def code_reward(tests, completion: str, config: SandboxConfig | None = None) -> RewardResult:
    """Reward of a completion on stdin/stdout tests: fraction passed (or all-or-nothing), with a reason per failure.

    No code block gives 0. Raises SandboxError only when the sandbox itself cannot run (see the module docstring).
    """
    config = config or SandboxConfig()
    tests = list(tests)
    if not tests:
        raise ValueError("code_reward needs at least one test")
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

"""What runs inside the code sandbox, as pid 1 of its namespaces: standard library only, executed with `-c`.

`vibeperf.rewards.code` starts `unshare ... python -I -c <this file> <JSON config>` (see its module docstring). Modes:

- "single" (`run_program`, one run): set up the namespaces, fork the program's process, which sets the rlimits, drops
  to the sandbox uid and execs `python3 -I main.py`; report its exit status and CPU time on the status pipe.
- "batch" (`run_tests`, every test of one completion in one sandbox): set up once, then for each test command read on
  stdin (one JSON line), wipe /tmp and recreate /tmp/work, fork a child that sets the rlimits, drops to the sandbox uid
  and runs the test in that fresh process (forked from this interpreter, which never runs program code: no state of an
  earlier test survives), collect its stdout, stderr and result with the per-test wall timeout and output cap, SIGKILL
  every other process of the namespace (daemons included), and write one JSON report line on stdout.

Test kinds (`run_harness`): "stdin" runs the program as `__main__` with the test input on stdin; "functional" runs it
as a module, then calls `fn_name` (a function, or a method of `class Solution()`) with the JSON values of the input's
lines and writes the JSON return value; "assert" runs the program and then the test code (calling `check(fn_name)`
when `fn_name` is given, as HumanEval does) and writes "ok" if that completes. A result is written with the test's
nonce, on fd 3 (batch) or as the last stdout line (single mode's harness program), only after the test completed, so
a program that exits early (`exit(0)`, `os._exit(0)`) gets no result and fails. The harness runs in the program's
process: like HumanEval's and LiveCodeBench's harnesses, it cannot stop a program that inspects the harness's own
frames from forging a result; the expected outputs never enter the sandbox.
"""

import ctypes
import fcntl
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MS_NOSUID, MS_NODEV, PR_SET_NO_NEW_PRIVS = 0x1, 0x2, 0x2, 0x4, 38
RESULT_FD = 3
# What LiveCodeBench runs before a functional (LeetCode-style) solution: star imports (builtins restored after math's
# pow and the like, typing last), the modules themselves, a deep recursion limit.
PRELUDE_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random", "statistics",
                   "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing")  # fmt: skip
PRELUDE = "".join(f"from {m} import *\n" for m in PRELUDE_MODULES) + "".join(
    f"import {m}\n" for m in PRELUDE_MODULES if m not in ("builtins", "typing")
) + "sys.setrecursionlimit(50000)\n"  # fmt: skip

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))


def setup(cfg):
    """Read-only mount tree and a private size-capped tmpfs on /tmp (namespaces only); returns the program source."""
    with open(cfg["program"], "rb") as f:
        source = f.read()
    if cfg["namespaces"]:
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        rc = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
        check(rc, "mount_setattr(/, rdonly, recursive)")
        opts = f"size={cfg['tmpfs_mb']}m,mode=1777".encode()
        check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount tmpfs on /tmp")
    return source


def make_workdir(cfg, source):
    work = cfg["workdir"]
    if cfg["namespaces"]:
        os.mkdir(work, 0o700)
    with open(os.path.join(work, "main.py"), "wb") as f:
        f.write(source)
    if cfg["uid"] is not None:
        os.chown(work, cfg["uid"], cfg["gid"])
        os.chown(os.path.join(work, "main.py"), cfg["uid"], cfg["gid"])


def drop_privileges(cfg):
    """rlimits, no new privileges, the sandbox uid/gid without supplementary groups, cwd in the work directory."""
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(value))
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    os.chdir(cfg["workdir"])


def single(cfg):
    """One run of `python3 -I main.py`; exit status and CPU time on the status pipe (closed-on-exec)."""
    status = cfg["status_fd"]

    def report(**kw):
        os.write(status, (json.dumps(kw) + "\n").encode())

    try:
        make_workdir(cfg, setup(cfg))
        if cfg["probe"]:
            report(probe="ok")
            os._exit(0)
        pid = os.fork()
    except BaseException as e:
        report(setup_error=f"{type(e).__name__}: {e}")
        os._exit(125)
    if pid == 0:
        try:
            fcntl.fcntl(status, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
            drop_privileges(cfg)
            os.execve(cfg["python"], [cfg["python"], "-I", "main.py"], cfg["env"])
        except BaseException as e:
            report(setup_error="exec {}: {}: {}".format(cfg["python"], type(e).__name__, e))
        os._exit(127)
    while True:
        try:
            done, st, ru = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if done == pid:
            report(exit=os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
                   signal=os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
                   cpu_s=ru.ru_utime + ru.ru_stime)  # fmt: skip
            os._exit(0)


def fresh_stdio():
    """sys.stdin/stdout/stderr over fds 0-2 as a fresh `python3` has them (block-buffered pipes, UTF-8)."""
    import io

    def stream(fd, mode):
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", errors="backslashreplace" if fd == 2 else "strict",
                                line_buffering=fd == 2)  # fmt: skip

    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = (
        stream(0, "r"),
        stream(1, "w"),
        stream(2, "w"),
    )


def run_harness(test, source, write_result):
    """Run `source` on one test in this process (see the module docstring); `write_result(text)` reports the result.

    A "stdin" test leaves through the interpreter's normal exit (an uncaught exception: traceback, exit 1).
    """
    import builtins
    import types

    kind, name = test["kind"], test.get("fn_name")
    sys.argv = ["main.py"]
    module = types.ModuleType("__main__" if kind == "stdin" else "solution")
    module.__builtins__ = builtins
    if kind == "stdin":
        module.__file__ = "main.py"
        sys.modules["__main__"] = module
        exec(compile(source, "main.py", "exec"), module.__dict__)
        sys.exit(0)
    try:
        if kind == "functional":
            exec(PRELUDE, module.__dict__)
        exec(compile(source, "main.py", "exec"), module.__dict__)
    except SystemExit as e:
        sys.exit(f"the program exited ({e.code!r}) before the test ran")
    if kind == "functional":
        owner = module.Solution() if isinstance(getattr(module, "Solution", None), type) else module
        if not callable(getattr(owner, name, None)):
            where = "class Solution" if owner is not module else "the program"
            sys.exit(f"no function {name!r} in {where}")
        args = [json.loads(line) for line in test["input"].splitlines() if line.strip()]
        value = getattr(owner, name)(*args)
        try:
            text = json.dumps(list(value) if isinstance(value, tuple) else value)
        except (TypeError, ValueError) as e:
            sys.exit(f"return value is not JSON: {e}")
    else:
        tail = f"\n\ncheck({name})\n" if name else "\n"
        exec(compile(test["input"] + tail, "test.py", "exec"), module.__dict__)
        text = "ok"
    write_result(test["nonce"] + " " + text)
    sys.exit(0)


def run_single_test():
    """Single-mode harness program: the test arrives on stdin (never in main.py); the result is stdout's last line."""
    test = json.loads(sys.stdin.read())
    sys.stdin = sys.__stdin__ = open(os.devnull)

    def write_result(text):
        sys.stdout.flush()
        os.write(1, ("\n" + text + "\n").encode())

    run_harness(test, test.pop("source"), write_result)


def sweep():
    """SIGKILL every process of the namespace but this one (its init), and reap them, until none is left."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        alive = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != 1 and not zombie(p)]
        if not alive:
            return
        time.sleep(0.001)
    raise RuntimeError("processes of the namespace survived SIGKILL for 5 s")


def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].startswith(b"Z")


def wipe_tmp():
    for entry in os.listdir("/tmp"):
        path = os.path.join("/tmp", entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def supervise(pid, fds, cfg):
    """Collect the child's stdout, stderr and result until they close, the wall timeout or the output cap.

    When the child exits, the rest of the namespace is killed at once (a daemon holding the pipes open must not turn
    a finished test into a timeout); its output already in the pipes is still read.
    """
    bufs = {fd: bytearray() for fd in fds}
    pidfd = os.pidfd_open(pid)
    watch = [*fds, pidfd]
    deadline = time.monotonic() + cfg["wall_timeout_s"]
    timed_out = exceeded = False
    status = None
    while watch and not exceeded:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(watch, [], [], remaining)
        for fd in ready:
            if fd == pidfd:
                status = os.wait4(pid, 0)[1:]
                watch.remove(pidfd)
                sweep()
                continue
            data = os.read(fd, 65536)
            if not data:
                watch.remove(fd)
                continue
            bufs[fd] += data
            exceeded = exceeded or len(bufs[fd]) > cfg["max_output_bytes"]
    killed = timed_out or exceeded
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.wait4(pid, 0)[1:]
    sweep()
    for fd in (*fds, pidfd):
        os.close(fd)
    st, ru = status
    out, err, res = (bytes(bufs[fd][: cfg["max_output_bytes"]]).decode("utf-8", "replace") for fd in fds)
    return {
        "stdout": out, "stderr": err, "result": res or None, "timed_out": timed_out, "output_exceeded": exceeded,
        "exit": os.WEXITSTATUS(st) if os.WIFEXITED(st) and not killed else None,
        "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) and not killed else None,
        "cpu_s": ru.ru_utime + ru.ru_stime,
    }  # fmt: skip


def commands():
    """Test commands, one JSON object per line of stdin (read unbuffered: children get fd 0 replaced)."""
    pending = b""
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield json.loads(line)


def emit(**kw):
    data = (json.dumps(kw) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def child(cfg, source, test, pipes):
    """The forked test process: stdio and the result pipe on fds 0-3, nothing else open; privileges dropped."""
    stdin_fd = os.open("/tmp/stdin", os.O_RDONLY)
    for target, fd in zip((0, 1, 2, RESULT_FD), (stdin_fd, *(w for _, w in pipes))):
        os.dup2(fd, target)
    os.closerange(RESULT_FD + 1, 1 << 16)
    drop_privileges(cfg)
    os.environ.clear()
    os.environ.update(cfg["env"])
    fresh_stdio()

    def write_result(text):
        data = text.encode()
        while data:
            data = data[os.write(RESULT_FD, data) :]
        os.close(RESULT_FD)

    run_harness(test, source.decode("utf-8", "replace"), write_result)


def batch(cfg):
    try:
        source = setup(cfg)
    except BaseException as e:
        emit(setup_error=f"{type(e).__name__}: {e}")
        os._exit(125)
    emit(ready=True)
    for test in commands():
        wipe_tmp()
        make_workdir(cfg, source)
        with open("/tmp/stdin", "w", encoding="utf-8") as f:
            f.write(test["input"] if test["kind"] == "stdin" else "")
        pipes = [os.pipe() for _ in range(3)]
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(cfg, source, test, pipes)
        for _, w in pipes:
            os.close(w)
        report = supervise(pid, [r for r, _ in pipes], cfg)
        report["wall_s"] = time.monotonic() - start
        emit(**report)
    os._exit(0)


if __name__ == "__main__" and sys.argv[0] == "-c":  # not when this file is the harness program
    config = json.loads(sys.argv[1])
    if config["mode"] == "single":
        single(config)
    else:
        batch(config)

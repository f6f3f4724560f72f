"""Host side of the code sandbox: the `unshare` command, the config of `sandbox_main.py`, and starting, feeding,
reading and reaping its process tree (see `vibeperf.rewards.code` for what the sandbox does and blocks).

Only `vibeperf.rewards.code` uses this module; it holds the process plumbing so that `code.py` keeps the policy.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vibeperf.rewards.code import SandboxConfig

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
UNSHARE_FLAGS = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
_SHOW = 60


def short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


class SandboxError(RuntimeError):
    """The sandbox could not run a program (unavailable, refused, misconfigured): never the program's fault."""


def unshare_cmd(level: str) -> list[str]:
    unshare = shutil.which("unshare", path=SYSTEM_PATH + ":/usr/sbin:/sbin")
    if unshare is None:
        raise SandboxError("the `unshare` binary (util-linux) is not installed")
    if level == "root":
        return [unshare, *UNSHARE_FLAGS]
    return [unshare, "--user", "--map-root-user", *UNSHARE_FLAGS]


def resolve_python(name: str) -> str:
    path = name if os.path.isabs(name) else shutil.which(name, path=SYSTEM_PATH)
    if path is None or not os.path.isfile(path):
        raise SandboxError(f"interpreter {name!r} not found in {SYSTEM_PATH}")
    return path


def children(pid: int) -> list[int]:
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


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap(proc: subprocess.Popen, killed: bool) -> None:
    """Wait for the runner's child, killing the namespace's init first if asked; then kill its process group.

    The child is waited on with WNOWAIT before the group kill, so its pid (the group id) cannot be reused meanwhile.
    """
    if killed:
        for child in children(proc.pid):
            kill(child)
    deadline = time.monotonic() + 5.0
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            for child in children(proc.pid):
                kill(child)
            kill(proc.pid)
            deadline = time.monotonic() + 5.0
        time.sleep(0.001)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def pump(proc: subprocess.Popen, stdin: bytes, status_fd: int, config: SandboxConfig):
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


def sandbox_spec(config: SandboxConfig, level: str, host_dir: str, mode: str, status_fd: int = -1) -> dict:
    """The JSON config of `sandbox_main.py` for a run at isolation `level` (see its module docstring)."""
    namespaces = level != "none"
    drop = (level == "root") or (level == "none" and os.geteuid() == 0)
    mb = 1 << 20
    return {
        "mode": mode,
        "status_fd": status_fd,
        "program": os.path.join(host_dir, "main.py"),
        "workdir": "/tmp/work" if namespaces else host_dir,
        "namespaces": namespaces,
        "probe": False,
        "tmpfs_mb": config.tmpfs_mb,
        "python": resolve_python(config.python),
        "uid": config.uid if drop else None,
        "gid": config.gid if drop else None,
        "wall_timeout_s": config.wall_timeout_s,
        "max_output_bytes": config.max_output_bytes,
        "rlimits": {
            "RLIMIT_CORE": (0, 0),
            "RLIMIT_CPU": (config.cpu_time_s, config.cpu_time_s + 1),
            "RLIMIT_AS": (config.memory_mb * mb, config.memory_mb * mb),
            "RLIMIT_FSIZE": (config.file_size_mb * mb, config.file_size_mb * mb),
            "RLIMIT_NOFILE": (config.max_open_files, config.max_open_files),
            "RLIMIT_NPROC": (config.max_processes, config.max_processes),
        },
        "env": {
            "PATH": SYSTEM_PATH,
            "HOME": "/tmp/work" if namespaces else host_dir,
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        },
    }


def popen(cmd: list[str], cwd: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd=cwd,
        env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
        start_new_session=True,
    )


class RunnerChannel:
    """The host's end of a batch sandbox: one JSON line out (a test), one JSON line back (its report)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.stderr, self.pending = proc, bytearray(), bytearray()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)

    def exchange(self, payload: bytes, timeout_s: float) -> dict | None:
        """Send `payload`, return the next report line decoded; None if the runner closed or timed out."""
        sel = selectors.DefaultSelector()
        out_fd, err_fd, in_fd = self.proc.stdout.fileno(), self.proc.stderr.fileno(), self.proc.stdin.fileno()
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        if payload:
            sel.register(in_fd, selectors.EVENT_WRITE)
        deadline, sent = time.monotonic() + timeout_s, 0
        try:
            while b"\n" not in self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.get_map():
                    return None
                for key, _ in sel.select(remaining):
                    if key.fd == in_fd:
                        try:
                            sent += os.write(in_fd, payload[sent : sent + 65536])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            return None
                        if sent >= len(payload):
                            sel.unregister(in_fd)
                        continue
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fd)
                        if key.fd == out_fd:
                            return None
                    elif key.fd == out_fd:
                        self.pending += data
                    else:
                        self.stderr = (self.stderr + data)[-4096:]
        finally:
            sel.close()
        line, _, rest = bytes(self.pending).partition(b"\n")
        self.pending = bytearray(rest)
        return json.loads(line)

    def why_stopped(self) -> str:
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return short(lines[-1]) if lines else f"exit status {self.proc.poll()}"

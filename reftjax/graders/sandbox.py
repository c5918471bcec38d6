"""A pool of sandboxed Python fork-servers for P-CoT programs and user `python` graders.

What is enforced, and by whom (honestly):

=====================  ==========================================================  ============
threat                 mechanism                                                   enforced by
=====================  ==========================================================  ============
infinite loop          wall-clock deadline -> SIGKILL of the job's process group;   OS
                       RLIMIT_CPU
memory bomb            RLIMIT_AS (`memory_bytes`); files the job writes in its      OS
                       temp dir (on /dev/shm, i.e. RAM, where present) count only
                       against RLIMIT_FSIZE each, not their number: a job can fill
                       RAM at its write speed until its deadline, freed after it
output flood           stdout/stderr go to a file capped by RLIMIT_FSIZE; only a    OS
                       bounded JSON result comes back
fork bomb, new        RLIMIT_NPROC 0 (`nproc`) for the job's uid: no process or     OS (not
processes              thread at all, also on paths no audit event sees; as root     as root
                       the job first drops to uid 65534 (root ignores the limit);   without
                       its own PID namespace, all SIGKILLed after each job; plus    drop_uid)
                       audit-hook block of os.fork/posix_spawn/subprocess/exec      audit hook
network                `unshare --net`: a namespace with no usable interface;       OS if
                       plus audit-hook block of socket.* and `import socket`        unshare works
file writes/deletes    as root: uid 65534 cannot write or delete root's files       OS (root)
                       (but may write world-writable dirs such as /tmp, which
                       outlive the job); audit hook refuses writes/renames/         audit hook
                       deletes outside the job's throwaway temp dir (bypassable:    (weak)
                       an os.open relative to a dir_fd opened outside, fchmod of
                       an fd, os.mkfifo/mknod, a patched posixpath; reads are
                       not limited)
signals / killing      new session; the job cannot see processes outside its PID    OS
the trainer            namespace (its own /proc); uid 65534 cannot signal root's
                       processes; audit hook blocks os.kill/killpg (not             audit hook
                       pidfd_send_signal: without namespaces and uid drop, i.e.
                       a non-root trainer, a job can kill the trainer)
secrets                servers start with an environment of their own (no          the pool
                       HF_TOKEN etc.); as the trainer's uid (no uid drop: a
                       non-root trainer) a job reads what that user can: its
                       files, and without namespaces /proc/<trainer>/environ
forged results         a job's result is checked before it goes on (fd 3, and a    the server,
                       line it writes to its server's stdout); the pool takes as   the pool
                       a job's reply only the line bearing the nonce it sent with
                       that job (such a line shifted every later result by one)
=====================  ==========================================================  ============

Audit hooks (`sys.addaudithook`, PEP 578) are not a security boundary against a determined
attacker (e.g. code that finds an unaudited C path); they are a second layer. The OS layer
needs root (uid drop) and `unshare` with CAP_SYS_ADMIN: run untrusted programs (P-CoT RL) as
root, in a container, or not at all; `SandboxPool.isolation` reports which
layers are active, and without them the pool still works with the audit-hook layer only.
Whatever a program does, the trainer only sees a `SandboxResult` (status "ok", "error",
"timeout" or "crashed"), never an exception.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

log = logging.getLogger(__name__)

_WORKER = pathlib.Path(__file__).with_name("_sandbox_worker.py")
# what a math program may import from the standard library and sympy.abc (see SandboxConfig.preimport; a P-CoT
# program's `from sympy.abc import x` or `from dataclasses import dataclass` scored 0 as uid 65534), and the two
# packages of OpenAI's python-grader image that reftjax depends on anyway (their guide's example grader uses
# rapidfuzz's WRatio; numpy's submodules load lazily, so the common ones are named: np.median needs numpy.ma)
DEFAULT_PREIMPORT = ("bisect", "calendar", "cmath", "copy", "dataclasses", "datetime", "heapq", "numbers",
                     "operator", "pprint", "random", "sympy.abc", "time", "numpy", "numpy.random", "numpy.linalg",
                     "numpy.ma", "numpy.fft", "numpy.polynomial", "numpy.char", "numpy.strings", "numpy.rec",
                     "rapidfuzz", "rapidfuzz.fuzz", "rapidfuzz.utils", "rapidfuzz.process", "rapidfuzz.distance")
# a job is a fork of its server: BLAS/OpenMP worker threads the server started do not exist in it, and a numpy
# product that hands work to them waits forever (a 400 x 400 matmul timed out); one thread each, set before import
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A server's whole environment: the trainer's is not passed on, as it holds secrets (HF_TOKEN, WANDB_API_KEY, cloud
# credentials) that a program returned as its answer, into the samples files (sandbox review, session 38), and a
# fixed hash seed, so a program iterating over a set of strings answers alike on every server and process (the same
# completion scored 0.1 and 1.0 on different servers). `-I` would ignore PYTHONHASHSEED: the worker runs with `-s`
# and removes its own directory from sys.path instead.
_SERVER_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": "/nonexistent", "PYTHONHASHSEED": "0", **_ONE_THREAD}
# (--mount-proc: a /proc of the job's own PID namespace; the host's let a job list every process and read the
# trainer's command line, regression review, session 38)
_UNSHARE = ("--pid", "--fork", "--kill-child", "--net", "--mount-proc")
# Extra wall time the parent grants a fork-server beyond the job's own deadline before it
# declares the server hung and restarts it.
_SERVER_GRACE_S = 5.0
_STATUSES = ("ok", "error", "timeout", "crashed")  # what a server may report ("sandbox_failure" is the pool's own)
# a reply's fields and their types (the worker's `_RESULT_FIELDS`, which it checks on what a job sends on fd 3; a
# job that reaches the server's stdout can send its own line, checked here: regression review, session 38)
_REPLY_FIELDS = {"status": (str,), "value_float": (int, float, type(None)), "value_str": (str, type(None)),
                 "value_json": None, "error": (str, type(None)), "value_real": (bool,)}


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits for each sandboxed job.

    Attributes:
      workers: fork-servers running jobs in parallel (default: number of CPUs).
      timeout_s: wall-clock limit per job (the ReFT authors use 2 s in `train_rl_reft.py`);
        the CPU-time limit is this rounded up plus one second.
      memory_bytes: RLIMIT_AS of a job (address space, includes the ~100 MB interpreter).
      output_bytes: RLIMIT_FSIZE: cap on what a job may print or write to files.
      nproc: RLIMIT_NPROC of the job's unprivileged uid (only honoured when not root). 0 (default): the
        job cannot create any process or thread, also through paths the audit hook does not see (a job
        reached the already-imported `_posixsubprocess.fork_exec` and started a shell with 64).
      namespaces: run servers under `unshare --pid --fork --kill-child --net` when possible.
      drop_uid: when running as root, run jobs as uid/gid 65534 (nobody).
      preimport: modules each server imports before it forks jobs (beyond math, sympy and the few
        it always loads). A job running as uid 65534 may be unable to read the interpreter's install
        dir (under /root, mode 0700), so any module not already loaded fails to import there; the
        default covers the standard library a math program reaches for. A module that newly loads a
        blocked one (socket, asyncio, ...) is refused: every job then fails with that message.
    """

    workers: int = 0
    timeout_s: float = 2.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    nproc: int = 0
    namespaces: bool = True
    drop_uid: bool = True
    preimport: tuple[str, ...] = DEFAULT_PREIMPORT

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = number of CPUs), got {self.workers}")
        if not 0 < self.timeout_s <= 600:
            raise ValueError(f"timeout_s must be in (0, 600], got {self.timeout_s}")
        if self.memory_bytes < (256 << 20):
            raise ValueError(f"memory_bytes must be >= 256 MiB (the interpreter), got {self.memory_bytes}")
        if self.output_bytes < 1024 or self.nproc < 0:
            raise ValueError("output_bytes must be >= 1024 and nproc >= 0")
        bad = [m for m in self.preimport if not all(part.isidentifier() for part in str(m).split("."))]
        if bad:
            raise ValueError(f"preimport must hold module names, got {bad}")


@dataclasses.dataclass(frozen=True)
class SandboxJob:
    """One program: `source` is executed, then `entry(*args)` is called.

    `split_locals=True` reproduces the ReFT authors' `exec(code, globals, locals)` with separate
    dicts (`src/python_engine.py:run`), so top-level helpers are not visible from `solution()`.
    `args` must be JSON-serialisable.
    """

    source: str
    entry: str = "solution"
    args: tuple = ()
    split_locals: bool = False


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of a job. `value_float` is float(result) or None (the authors' `floatify`); `value_real` whether
    the result is a real number (int, float, bool, a numpy scalar), not text that float() reads."""

    status: str
    value_float: float | None = None
    value_str: str | None = None
    value_json: Any = None
    error: str | None = None
    value_real: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, *_UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _tmp_base() -> str | None:
    """/dev/shm (tmpfs) when present: creating and removing a dir per job is ~10x cheaper there."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def remove_tree(path: str) -> None:
    """`path` removed, however deep: a job nesting ~1,100 directories made `shutil.rmtree` raise RecursionError, which
    killed its server and left its files in /dev/shm for good (sandbox review, session 38); `rm -rf` takes any depth.
    (The worker holds its own copy: it imports nothing of reftjax.)"""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        pass
    if os.path.lexists(path):
        try:
            subprocess.run(["rm", "-rf", "--", path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        except OSError:  # no `rm` on the path: the directory stays (the caller goes on)
            pass


def _well_formed(reply) -> bool:
    return (isinstance(reply, dict) and set(reply) <= set(_REPLY_FIELDS)
            and all(t is None or (isinstance(reply[k], t) and (bool in t or not isinstance(reply[k], bool)))
                    for k, t in _REPLY_FIELDS.items() if k in reply))


class _Server:
    """One fork-server process, its line-buffered stdout, and the directory its jobs run in (made here, so that it is
    removed when the server is killed: SIGKILL skips the server's own clean-up, and every restart left one behind)."""

    def __init__(self, command: list[str], preimport: Sequence[str]):
        self.root = tempfile.mkdtemp(prefix="reftjax-sandbox-", dir=_tmp_base())
        try:
            self.proc = subprocess.Popen([*command, self.root, *preimport], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(_SERVER_ENV))
        except BaseException:
            remove_tree(self.root)
            raise
        self.buffer = b""
        self.deadline = 0.0
        self.index = -1
        self.nonce = ""

    def send(self, index: int, payload: dict, deadline: float) -> None:
        self.index, self.deadline, self.nonce = index, deadline, secrets.token_hex(16)
        self.proc.stdin.write((json.dumps({**payload, "nonce": self.nonce}) + "\n").encode())
        self.proc.stdin.flush()

    def read_lines(self) -> list[str]:
        """Reads what is available; returns the complete lines (EOF raises EOFError)."""
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            raise EOFError("sandbox server exited")
        *lines, self.buffer = (self.buffer + chunk).split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        remove_tree(self.root)


class SandboxPool:
    """Runs `SandboxJob`s on pre-started fork-servers; thread-safe; results keep input order.

    Example:
      with SandboxPool(SandboxConfig(timeout_s=2)) as pool:
          results = pool.run([SandboxJob("def solution():\\n    return 1")])
    """

    def __init__(self, config: SandboxConfig = SandboxConfig()):
        self.config = config
        use_ns = config.namespaces and _unshare_works()
        prefix = [shutil.which("unshare"), *_UNSHARE, "--"] if use_ns else []
        self._command = [*prefix, sys.executable, "-s", str(_WORKER)]  # + the job directory and the preimports
        root = os.geteuid() == 0
        self.isolation = {"pid_and_net_namespaces": use_ns, "uid_drop": root and config.drop_uid,
                          "rlimit_nproc_effective": (not root) or config.drop_uid,
                          "audit_hook": True}
        if not self.isolation["uid_drop"]:  # (said nowhere before: sandbox review, session 38)
            log.warning("sandbox: programs run as this process's uid %d%s: they can read what this user can (its "
                        "files%s)%s; %s", os.geteuid(), "" if use_ns else " without their own PID namespace",
                        "" if use_ns else ", /proc/<trainer>/environ",
                        "" if use_ns else " and signal its processes (pidfd_send_signal)",
                        "keep SandboxConfig.drop_uid on" if root else
                        "run untrusted programs (P-CoT RL) as root (jobs then run as uid 65534) or in a container")
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._closed = False

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for server in self._servers:
                server.kill()
            self._servers = []

    def _ensure_servers(self, n: int) -> None:
        want = self.config.workers or os.cpu_count() or 1
        while len(self._servers) < min(want, max(n, 1)):
            self._servers.append(_Server(self._command, self.config.preimport))

    def run(self, jobs: Sequence[SandboxJob]) -> list[SandboxResult]:
        """Runs every job (in parallel over the servers) and returns results in job order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxPool is closed")
            self._ensure_servers(len(jobs))
            return self._run_locked(list(jobs))

    def _payload(self, job: SandboxJob) -> dict:
        c = self.config
        return {"source": job.source, "entry": job.entry, "args": list(job.args),
                "split_locals": job.split_locals, "timeout_s": c.timeout_s,
                "memory_bytes": c.memory_bytes, "output_bytes": c.output_bytes,
                "nproc": c.nproc, "drop_uid": c.drop_uid}

    def _run_locked(self, jobs: list[SandboxJob]) -> list[SandboxResult]:
        results: list[SandboxResult | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        idle, busy = list(self._servers), []
        try:
            while pending or busy:
                while idle and pending:
                    server, i = idle.pop(), pending.pop()
                    deadline = time.monotonic() + self.config.timeout_s + _SERVER_GRACE_S
                    busy.append(server)
                    server.send(i, self._payload(jobs[i]), deadline)
                timeout = max(0.0, min(s.deadline for s in busy) - time.monotonic())
                ready = select.select([s.proc.stdout.fileno() for s in busy], [], [], timeout)[0]
                for server in list(busy):
                    result = self._poll(server, server.proc.stdout.fileno() in ready)
                    if result is None:
                        continue
                    results[server.index] = result
                    busy.remove(server)
                    idle.append(self._replace(server) if result.status == "sandbox_failure" else server)
        except BaseException:
            # a server left busy would hand its job's result to the next job sent to it: restart them
            for server in busy:
                self._replace(server)
            raise
        return results  # type: ignore[return-value]

    def _poll(self, server: _Server, readable: bool) -> SandboxResult | None:
        try:
            lines = server.read_lines() if readable else []
        except (EOFError, OSError) as exc:
            return SandboxResult("sandbox_failure", error=f"sandbox server failed: {exc}")
        for line in lines:
            # The reply to this job carries the nonce it was sent with, which no earlier job saw. A job that reached
            # the server's stdout (through /proc/<server>/fd, running as the server's uid) wrote result lines of its
            # own, and every later job took the one before's result (sandbox review, session 38): a line without
            # this job's nonce is not its reply. (A job can know its own nonce: a line it forges with it is checked
            # as a result it sent on fd 3 is, and is its own result.)
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if not isinstance(reply, dict) or reply.pop("nonce", None) != server.nonce:
                continue
            if reply.get("status") == "startup_error":  # its preimports failed: every job fails so, the grader's
                return SandboxResult("sandbox_failure", error=str(reply.get("error")))
            if not _well_formed(reply):  # (the server checks what a job sends; a line of its job's own is checked
                # here: a string value_float raised TypeError in the grader, in the trainer)
                return SandboxResult("error", error="the program sent a malformed result")
            result = SandboxResult(**reply)
            if result.status in _STATUSES:
                return result
            return SandboxResult("error", error=f"the program sent status {result.status!r}")
        if time.monotonic() > server.deadline:
            return SandboxResult("sandbox_failure", error="sandbox server hung; restarted")
        return None

    def _replace(self, server: _Server) -> _Server:
        server.kill()
        fresh = _Server(self._command, self.config.preimport)
        self._servers[self._servers.index(server)] = fresh
        return fresh

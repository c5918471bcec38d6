"""Sandbox fork-server: runs untrusted Python programs one job at a time.

Started by `reftjax.graders.sandbox.SandboxPool` as `python -s _sandbox_worker.py ROOT
[PREIMPORT...]` in an environment of its own (inside `unshare --pid --fork --kill-child --net
--mount-proc` when the host allows it); ROOT is the directory its jobs' temp dirs go in, made and removed by
the pool. It is deliberately self-contained (stdlib + the pre-imported `math`/`sympy` only) and
takes its own directory off `sys.path`. (reftjax itself may still be found through an editable
install's path hook; importing it in a job fails on its blocked imports, and as uid 65534 on
files it cannot read.)

Protocol: one JSON job per line on stdin, one JSON result per line on stdout.
  job    = {"source", "entry", "args", "split_locals", "timeout_s", "memory_bytes",
            "output_bytes", "nproc", "drop_uid", "nonce"}
  result = {"status": "ok" | "error" | "timeout" | "crashed", "value_float", "value_str",
            "value_json", "error", "value_real", "nonce" (the job's)}

Each job runs in a child forked from this (single-threaded) server, so the expensive imports
are paid once and every job starts from the same clean state. The child: starts a new session,
moves into a fresh temp dir, sends stdout/stderr to a size-capped file, sets resource limits,
drops to uid/gid 65534 when the server runs as root, and only then runs the job. After the job
(or its wall-clock deadline) the server SIGKILLs the child's process group and, when it is the
init of its own PID namespace, every other process of that namespace, then removes the temp dir.
"""
import builtins
import json
import math
import numbers
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# `-s` rather than `-I` (which would ignore the pool's PYTHONHASHSEED): the script's directory, reftjax's graders,
# comes off the path here, before anything else is imported
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]  # (realpath: Python puts a symlinked script's resolved directory there)

import sympy  # noqa: E402

# Pre-imported for jobs: once a job runs as uid 65534 it may be unable to read the interpreter's
# install dir (e.g. under /root), so the modules a program may import are loaded here, before the
# fork: these, plus `SandboxConfig.preimport` (the command-line arguments, see `_preimport`).
import collections  # noqa: E402,F401
import decimal  # noqa: E402,F401
import difflib  # noqa: E402,F401
import fractions  # noqa: E402,F401
import functools  # noqa: E402,F401
import itertools  # noqa: E402,F401
import re  # noqa: E402,F401
import statistics  # noqa: E402,F401
import string  # noqa: E402,F401
import sympy.parsing.sympy_parser  # noqa: E402,F401

_NOBODY = 65534
_RESULT_FD = 3
_RESULT_CAP = 1 << 16
_STR_CAP = 1000
# What a result may hold (value_json: anything JSON). The job can write to the result pipe itself, so what comes
# back is checked against this before it goes on: anything else is the job's error, never the trainer's crash.
_RESULT_FIELDS = {"status": (str,), "value_float": (int, float, type(None)), "value_str": (str, type(None)),
                  "value_json": None, "error": (str, type(None)), "value_real": (bool,)}
_STATUSES = ("ok", "error", "timeout", "crashed")
_BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
    "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
    "sys.setprofile", "sys.settrace", "os.chroot", "os.setxattr", "os.removexattr",
    "os.putenv", "os.unsetenv", "mmap.__new__", "winreg", "webbrowser.open",
})
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "urllib.", "http.", "ftplib.", "smtplib.",
                     "imaplib.", "poplib.", "nntplib.", "telnetlib.", "sqlite3.")
_BLOCKED_IMPORTS = frozenset({"ctypes", "_ctypes", "socket", "_socket", "_posixsubprocess",
                              "subprocess", "multiprocessing", "_multiprocessing", "pty",
                              "mmap", "_ssl", "ssl", "asyncio", "concurrent"})
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.link": (0, 1),
                "os.symlink": (0, 1), "os.utime": (0,), "shutil.rmtree": (0,),
                "shutil.copyfile": (1,), "shutil.move": (0, 1), "shutil.chown": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_audit_hook(server_pid, sandbox_root):
    """Installs a hook that is inert in the server and enforcing in every forked job.

    The on/off state is the process id (one-way: a job cannot become the server again) and the
    constants live only in the hook's default arguments, which untrusted code cannot reach
    because `gc.get_objects`/`gc.get_referrers` are themselves blocked.
    """
    def hook(event, args, _server=server_pid, _root=sandbox_root, _realpath=os.path.realpath,
             _getpid=os.getpid, _fspath=os.fspath):
        if _getpid() == _server:
            return
        if event in _BLOCKED_EVENTS or event.startswith(_BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in _BLOCKED_IMPORTS:
            # an ImportError, as where the module cannot be read (uid 65534): a grader's `except ImportError` fallback
            # takes it either way (a PermissionError went past it for non-root users; regression review)
            raise _BlockedImport(f"sandbox: import of {args[0]} is not allowed")
        paths = ()
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not isinstance(path, int):
                paths = (path,)
        elif event in _PATH_EVENTS:
            paths = tuple(args[i] for i in _PATH_EVENTS[event] if i < len(args))
        for p in paths:
            if isinstance(p, int):
                continue
            real = _realpath(_fspath(p) if not isinstance(p, bytes) else p.decode(errors="replace"))
            if not (real == _root or real.startswith(_root + "/")):
                raise PermissionError(f"sandbox: {event} outside the sandbox dir is not allowed")

    sys.addaudithook(hook)


class _BlockedImport(ImportError):
    """An import the sandbox refuses."""


def _floatify(value):
    """float(value) or None, as in the ReFT authors' `src/utils.py:floatify`."""
    try:
        return float(value)
    except Exception:  # noqa: BLE001 - any failure means "not a number"
        return None


def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass


def _child(job, tmp):
    """Runs one job in the forked child; never returns."""
    try:
        os.setsid()
        os.chdir(tmp)
        out = os.open(os.path.join(tmp, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(_RESULT_FD + 1, 1 << 16)
        timeout = job["timeout_s"]
        _limit(resource.RLIMIT_CPU, int(math.ceil(timeout)) + 1)
        _limit(resource.RLIMIT_AS, job["memory_bytes"])
        _limit(resource.RLIMIT_FSIZE, job["output_bytes"])
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_NOFILE, 64)
        if job["drop_uid"] and os.getuid() == 0:
            os.chown(tmp, _NOBODY, _NOBODY)
            os.chown(os.path.join(tmp, "output.txt"), _NOBODY, _NOBODY)
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
        if os.getuid() != 0:
            _limit(resource.RLIMIT_NPROC, job["nproc"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        result = _run_job(job)
    except BaseException as exc:  # noqa: BLE001 - every failure is a result, never a crash
        result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:_STR_CAP]}"}
        if isinstance(exc, ImportError) and os.getuid() == _NOBODY:
            result["error"] += (" (jobs run as uid 65534 and may only import modules the sandbox server "
                                "pre-imported: add it to SandboxConfig.preimport)")
    try:
        os.write(_RESULT_FD, json.dumps(result).encode()[:_RESULT_CAP])
    finally:
        os._exit(0)


def _run_job(job):
    """Executes the source and calls its entry point like the ReFT authors' `python_engine.run`."""
    global_vars = {"__builtins__": builtins, "__name__": "__sandbox__", "math": math, "sympy": sympy}
    local_vars = {} if job["split_locals"] else global_vars
    exec(compile(job["source"], "<program>", "exec"), global_vars, local_vars)  # noqa: S102
    entry = local_vars.get(job["entry"], global_vars.get(job["entry"]))
    if entry is None:
        return {"status": "error", "error": f"NameError: {job['entry']!r} is not defined"}
    value = entry(*job["args"])
    try:
        value_json = json.loads(json.dumps(value))
    except Exception:  # noqa: BLE001 - non-JSON results are reported as strings only
        value_json = None
    return {"status": "ok", "value_float": _floatify(value), "value_str": str(value)[:_STR_CAP],
            "value_json": value_json, "value_real": _is_real(value)}


def _is_real(value):
    """A real number: int, float, bool, a numpy scalar (np.bool_ too: `return np.isclose(a, b)`), a Decimal."""
    numpy = sys.modules.get("numpy")
    return isinstance(value, (numbers.Real, decimal.Decimal)) or (numpy is not None and isinstance(value, numpy.bool_))


def _reap(pid):
    """Kills the job's session (and, as namespace init, everything else) and reaps it all."""
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    if os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return status


def _serve_one(job, root):
    tmp = tempfile.mkdtemp(dir=root)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.dup2(write_fd, _RESULT_FD)
        _child(job, tmp)
    os.close(write_fd)
    data, deadline, timed_out = b"", time.monotonic() + job["timeout_s"], False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if select.select([read_fd], [], [], left)[0]:
            chunk = os.read(read_fd, _RESULT_CAP)
            if not chunk:
                break
            data += chunk[: _RESULT_CAP - len(data)]
    os.close(read_fd)
    status = _reap(pid)
    _remove_tree(tmp)
    if timed_out:
        return {"status": "timeout", "error": f"wall-clock limit of {job['timeout_s']} s exceeded"}
    try:
        result = json.loads(data.decode())
    except ValueError:
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        return {"status": "crashed", "error": f"program ended without a result ({how})"}
    return result if _well_formed(result) else {"status": "error", "error": "the program wrote a malformed result"}


def _remove_tree(path):
    """`path` removed however deep (`reftjax.graders.sandbox.remove_tree`'s twin: a job nesting ~1,100 directories
    made shutil.rmtree raise RecursionError, which killed this server)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        pass
    if os.path.lexists(path):
        try:
            subprocess.run(["rm", "-rf", "--", path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        except OSError:  # no `rm` on the path: the directory stays, the server goes on
            pass


def _well_formed(result):
    return (isinstance(result, dict) and set(result) <= set(_RESULT_FIELDS) and result.get("status") in _STATUSES
            and all(t is None or (isinstance(result[k], t) and (bool in t or not isinstance(result[k], bool)))
                    for k, t in _RESULT_FIELDS.items() if k in result))


def _warm_up():
    """Runs sympy's lazily imported paths once so jobs (maybe unable to import) find them loaded."""
    x = sympy.Symbol("x")
    expr = sympy.parsing.sympy_parser.parse_expr("2*(x+1)**2/3")
    sympy.simplify(expr - x)
    sympy.solve(expr - 1, x)
    float(sympy.Rational(1, 3))


def _preimport(names):
    """Imports `names` before any fork; returns an error message (jobs then all fail with it) or None.

    Modules already in `sys.modules` skip the audit hook's import check, so a name that newly pulls in
    a blocked module is refused rather than opening a way around it. (sympy, loaded above, already
    brings ctypes and subprocess: what stops a job using them is RLIMIT_NPROC and the uid drop.)
    """
    before = {m for m in _BLOCKED_IMPORTS if m in sys.modules}
    for name in names:
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001 - reported to every job
            return f"SandboxConfig.preimport: cannot import {name!r}: {type(exc).__name__}: {exc}"
        leaked = sorted(m for m in _BLOCKED_IMPORTS if m in sys.modules and m not in before)
        if leaked:
            return f"SandboxConfig.preimport: importing {name!r} loads blocked module(s) {leaked}"
    return None


def main():
    root = os.path.realpath(sys.argv[1])
    startup_error = _preimport(sys.argv[2:])
    _warm_up()
    os.chmod(root, 0o711)
    _install_audit_hook(os.getpid(), os.path.realpath(root))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        for line in sys.stdin:
            job = json.loads(line)
            # (a status jobs cannot report, see _well_formed: a program raising an exception named like the
            # start-up error was counted as the sandbox's failure; regression review)
            result = ({"status": "startup_error", "error": startup_error} if startup_error
                      else _serve_one(job, root))
            # (the pool takes as this job's reply only a line bearing the nonce it sent with the job; the newline
            # first ends whatever partial line a job wrote here, which would otherwise hide this reply)
            sys.stdout.write("\n" + json.dumps({**result, "nonce": job.get("nonce")}) + "\n")
            sys.stdout.flush()
    finally:
        _remove_tree(root)


if __name__ == "__main__":
    main()

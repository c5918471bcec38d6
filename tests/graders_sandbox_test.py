"""Hostile programs: each scores 0 within the limit, leaves no process or file behind."""
import hashlib
import os
import socket
import time

import pytest

from reftjax.graders.reft import ReftGrader
from reftjax.graders.sandbox import SandboxConfig, SandboxJob, SandboxPool

TIMEOUT_S = 1.0


def _hostile(target_dir, port):
    keep, gone = target_dir / "keep.txt", target_dir / "delete_me.txt"
    return {
        "infinite_loop": "    while True:\n        pass",
        "fork_bomb": "    import os\n    while True:\n        os.fork()",
        "subprocess": "    import subprocess\n    subprocess.run(['sh', '-c', 'sleep 100 &'])\n    return 7",
        "alloc_10gb": "    x = bytearray(10 * 2**30)\n    return 7",
        "write_file": f"    open({str(keep)!r}, 'w').write('pwned')\n    return 7",
        "write_tmp": "    open('/tmp/reftjax_hostile_probe', 'w').write('x')\n    return 7",
        "delete_file": f"    import os\n    os.remove({str(gone)!r})\n    return 7",
        "rmtree": f"    import shutil\n    shutil.rmtree({str(target_dir)!r})\n    return 7",
        "socket": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n    return 7",
        "os_exit": "    import os\n    os._exit(0)",
        "stdout_flood": "    while True:\n        print('x' * 100000)",
        "signal_tamper": ("    import signal\n    for s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT):\n"
                          "        signal.signal(s, signal.SIG_IGN)\n    while True:\n        pass"),
        "kill_parent": "    import os\n    os.kill(os.getppid(), 9)\n    return 7",
        "recursion_bomb": "    def f(n):\n        return f(n + 1) + 1\n    return f(0)",
        "deep_eval": "    return eval('(' * 100000 + ')' * 100000)",
        "ctypes": "    import ctypes\n    ctypes.CDLL(None).fork()\n    return 7",
        # the server has `_posixsubprocess` loaded already: no import (or other audit) event on the way; the
        # job's RLIMIT_NPROC 0 stops it (it started the shell with 64). The arguments are Python 3.11's.
        "posixsubprocess": ("    import sys, os\n    r, w = os.pipe()\n    sys.modules['_posixsubprocess'].fork_exec("
                            f"[b'/bin/sh', b'-c', b'echo pwned > {keep}'], [b'/bin/sh'], True, (w,), None, None, "
                            "-1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, True)\n"
                            "    import time\n    time.sleep(0.5)\n    return 7"),
    }


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _nobody_pids():
    """{pid: start time} of the processes running as uid 65534 (sandbox jobs drop to it)."""
    pids = {}
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == 65534:
                with open(f"/proc/{entry}/stat") as f:
                    pids[int(entry)] = f.read().rsplit(")", 1)[1].split()[19]
        except OSError:
            pass
    return pids


def _lasting_nobody_pids(wait_s=5.0):
    """uid-65534 processes that outlive `wait_s`: left behind by a job. Under the test command's two pytest-xdist
    workers the other worker's jobs come and go (each ends within its wall limit, 2 s by default) and are not
    counted."""
    first = _nobody_pids()
    if first:
        time.sleep(wait_s)
    now = _nobody_pids()
    return sorted(pid for pid, start in first.items() if now.get(pid) == start)


def test_hostile_programs_score_zero_and_leave_nothing_behind(tmp_path):
    (tmp_path / "keep.txt").write_text("original")
    (tmp_path / "delete_me.txt").write_text("still here")
    before = _digest(tmp_path)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    programs = _hostile(tmp_path, server.getsockname()[1])
    items = [{"question": name, "answer_value": "7"} for name in programs]
    with SandboxPool(SandboxConfig(timeout_s=TIMEOUT_S, memory_bytes=1 << 30)) as pool:
        grader = ReftGrader(cot="python", pool=pool)
        start = time.monotonic()
        grades = grader.grade_batch(items, ["\n" + p for p in programs.values()])
        elapsed = time.monotonic() - start
        sanity = grader.grade_batch(items[:1], ["\n    return 7"])
        servers = [s.proc.pid for s in pool._servers]
    scores = {name: g.score for name, g in zip(programs, grades)}
    assert scores == dict.fromkeys(programs, 0.0), {n: g.error for n, g in zip(programs, grades)}
    assert all(g.error for g in grades)
    assert sanity[0].score == 1.0  # the pool still works after the attacks
    # 16 programs on >= 1 worker; the slow ones are bounded by the 1 s wall limit each.
    assert elapsed < len(programs) * (TIMEOUT_S + 1.0)
    assert _digest(tmp_path) == before
    assert not os.path.exists("/tmp/reftjax_hostile_probe")
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    time.sleep(0.2)
    assert _lasting_nobody_pids() == []
    for pid in servers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_pool_reports_isolation_and_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=1 << 20)
    for bad, match in ((dict(nproc=-1), "nproc >= 0"), (dict(output_bytes=100), "output_bytes must be"),
                       (dict(workers=-1), "workers must be"), (dict(timeout_s=601), "timeout_s must be")):
        with pytest.raises(ValueError, match=match):
            SandboxConfig(**bad)
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        assert pool.isolation["audit_hook"]
        r = pool.run([SandboxJob("def grade(sample, item):\n    return {'a': [1, 2]}", "grade",
                                 args=({"output_text": "x"}, {}))])
        assert r[0].ok and r[0].value_json == {"a": [1, 2]}
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([SandboxJob("def solution():\n    return 1")])


def test_batch_keeps_order_across_workers():
    jobs = [SandboxJob(f"def solution():\n    return {i}") for i in range(40)]
    with SandboxPool(SandboxConfig(workers=3)) as pool:
        assert [r.value_float for r in pool.run(jobs)] == [float(i) for i in range(40)]


def test_programs_may_import_the_standard_library_a_math_program_uses():
    # As root a job runs as uid 65534, which cannot read an interpreter installed under /root: only modules the
    # server imported before the fork load. Correct P-CoT programs that import datetime or calendar scored 0.
    # (and sympy.abc, dataclasses, pprint, numpy: scored 0 where the authors' exec ran them; review, session 27)
    src = ("from sympy.abc import x\nfrom dataclasses import dataclass\nimport pprint\nimport numpy as np\n"
           "def solution():\n    import datetime, calendar, random, heapq, bisect\n"
           "    return (datetime.date(2020, 1, 2).day + calendar.monthrange(2020, 2)[1]\n"
           "            + int(np.ones((2, 2)).sum()) - 4)")
    grader_src = "def solution():\n    import xml.dom.minidom\n    return 1"
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        ok, missing = pool.run([SandboxJob(src), SandboxJob(grader_src)])
        assert ok.ok and ok.value_float == 31.0, ok
        if not missing.ok:  # as root with the interpreter under /root: the message says how to allow a module
            assert "SandboxConfig.preimport" in missing.error, missing
    with SandboxPool(SandboxConfig(workers=1, preimport=("xml.dom.minidom",))) as pool:
        assert pool.run([SandboxJob(grader_src)])[0].value_float == 1.0
    with pytest.raises(ValueError, match="module names"):
        SandboxConfig(preimport=("os; import x",))


def test_a_result_forged_on_the_result_pipe_is_an_error_and_later_jobs_keep_their_own_results():
    # A job can write to the worker's result pipe (fd 3) itself. A malformed result (an unknown field, a list, an
    # unknown status, a string where a number goes) raised a TypeError in the trainer in the middle of a batch and
    # left the other servers' results in their pipes, read back as the next jobs' results: rewards on wrong rows.
    forged = [b'{"status": "ok", "x": 1}', b"[1, 2]", b'{"status": "great", "value_float": 1.0}',
              b'{"status": "ok", "value_float": "1"}', b'{"status": "sandbox_failure"}']
    honest = [SandboxJob(f"def solution():\n    return {v}") for v in (1, 2, 3)]
    with SandboxPool(SandboxConfig(workers=2, timeout_s=TIMEOUT_S)) as pool:
        for blob in forged:
            hostile = SandboxJob(f"def solution():\n    import os\n    os.write(3, {blob!r})\n    os._exit(0)")
            first, *rest = pool.run([hostile, *honest])
            assert first.status == "error" and "malformed result" in first.error, (blob, first)
            assert [r.value_float for r in rest] == [1.0, 2.0, 3.0], blob
            assert [r.value_float for r in pool.run(honest[::-1])] == [3.0, 2.0, 1.0], blob
        # a well-formed result written by the job itself is what returning it would give
        own = SandboxJob("def solution():\n    import os\n    os.write(3, b'{\"status\": \"ok\", \"value_float\": 5}')"
                         "\n    os._exit(0)")
        assert pool.run([own])[0].value_float == 5.0


def test_jobs_see_no_secret_of_the_trainers_environment_and_hash_strings_alike_everywhere(monkeypatch):
    """Servers inherited the trainer's environment: a P-CoT program returned os.environ['HF_TOKEN'] as its answer, and
    the grade's extracted text took it into the samples files. And each server had its own hash seed, so the same
    completion iterating over a set of strings scored 0.1 on one server and 1.0 on another (sandbox review, session
    38). The environment is now the pool's own, with PYTHONHASHSEED=0."""
    import subprocess
    import sys

    monkeypatch.setenv("HF_TOKEN", "hf_secret_of_the_trainer")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/injected")
    env = SandboxJob("def solution():\n    import os, sys\n    return str(sorted(os.environ)) + str(sys.path)")
    spread = SandboxJob("def solution():\n    return str((hash('abc'), list({'w', 'x', 'y', 'z'})))")
    with SandboxPool(SandboxConfig(workers=2, timeout_s=TIMEOUT_S)) as pool:
        seen, *orders = pool.run([env, *[spread] * 4])
    from reftjax.graders.sandbox import _SERVER_ENV

    keys, path = seen.value_str.split("][", 1)
    assert seen.ok and set(eval(keys + "]")) <= set(_SERVER_ENV) | {"LC_CTYPE"}, seen.value_str  # nothing inherited
    assert "graders" not in path and "injected" not in path  # the worker's own directory is not importable
    want = subprocess.run([sys.executable, "-c", "print(str((hash('abc'), list({'w', 'x', 'y', 'z'}))))"],
                          env={"PYTHONHASHSEED": "0"}, capture_output=True, text=True).stdout.strip()
    assert [r.value_str for r in orders] == [want] * 4


def test_a_deeply_nested_job_directory_is_removed_and_server_directories_go_with_their_servers():
    """A job nesting ~2,000 directories (as deep as a path goes) made the server's shutil.rmtree raise RecursionError:
    the server died (the job's grade a grader error) and its files stayed in /dev/shm for good; every killed server
    (a restart, the pool's close) left its directory too (sandbox review, session 38)."""
    nest = SandboxJob("def solution():\n    import os\n    try:\n        while True:\n            os.mkdir('d')\n"
                      "            os.chdir('d')\n    except OSError:\n        pass\n    return 7")
    with SandboxPool(SandboxConfig(workers=1, timeout_s=10.0)) as pool:
        first, second = pool.run([nest, SandboxJob("def solution():\n    return 8")])
        [server] = pool._servers
        roots = [server.root]
        assert (first.value_float, second.value_float) == (7.0, 8.0), (first, second)
        assert os.listdir(server.root) == []  # the job's temp dir went, nested as it was
        pool._replace(server)  # as after a hung server
        roots.append(pool._servers[0].root)
        assert not os.path.exists(roots[0])
        assert pool.run([SandboxJob("def solution():\n    return 9")])[0].value_float == 9.0
    assert not any(os.path.exists(r) for r in roots)


def test_a_job_writing_result_lines_to_its_servers_output_shifts_no_other_jobs_result():
    """Where jobs run as the trainer's uid (a non-root trainer: no uid drop, no namespaces), a job opened its server's
    stdout through /proc/<server>/fd and wrote a result line: the pool took it as the job's result, and each later
    job of that server took the one before's, for as long as the server lived (sandbox review, session 38). Replies
    now carry the nonce their job was sent with."""
    import json

    fake = {"status": "ok", "value_float": 42.0, "value_str": "42", "value_real": True}
    lines = (json.dumps(fake) + "\n" + json.dumps({**fake, "nonce": "forged"}) + "\n" + "partial").encode()

    def writing(blob, then="return 0"):  # a job that writes `blob` to its server's stdout
        return SandboxJob("def solution():\n    import os, sys\n"
                          "    d = os.open('/proc/%d/fd' % os.getppid(), os.O_RDONLY)\n"
                          f"    os.write(os.open('1', os.O_WRONLY, dir_fd=d), {blob})\n    {then}")

    honest = [SandboxJob(f"def solution():\n    return {v}") for v in (1, 2, 3)]
    with SandboxPool(SandboxConfig(workers=1, timeout_s=TIMEOUT_S, namespaces=False, drop_uid=False)) as pool:
        start = time.monotonic()  # (a partial line hid the reply: the pool waited out the server's grace, 5 s)
        assert [r.value_float for r in pool.run([writing(repr(lines)), *honest])] == [0.0, 1.0, 2.0, 3.0]
        assert time.monotonic() - start < 4.0
        assert [r.value_float for r in pool.run(honest)] == [1.0, 2.0, 3.0]
        # with its own nonce (in the server's frame, where the job can read it) a line is its own result, checked:
        # a string value_float raised TypeError in the grader, in the trainer (regression review)
        # (and an unknown field, which raised TypeError building the result, or a bool where a number goes: mutants
        # dropping either check passed; mutation review, session 45)
        for fields in ("'status': 'ok', 'value_float': 'x'", "'status': 'ok', 'value_float': 1, 'x': 1",
                       "'status': 'ok', 'value_float': True"):
            own = (f"(__import__('json').dumps({{{fields}, 'value_real': True, "
                   "'nonce': sys._getframe(2).f_locals['job']['nonce']}) + chr(10)).encode()")
            first, *rest = pool.run([writing(own, "os._exit(0)"), *honest])
            assert first.status == "error" and "malformed" in first.error, (fields, first)
            assert [r.value_float for r in rest] == [1.0, 2.0, 3.0]
        # a status of its own (the pool's "sandbox_failure" or any other) is the program's error
        own = ("(__import__('json').dumps({'status': 'sandbox_failure', 'nonce': sys._getframe(2).f_locals['job']"
               "['nonce']}) + chr(10)).encode()")
        first, *rest = pool.run([writing(own, "os._exit(0)"), *honest])
        assert first.status == "error" and "status 'sandbox_failure'" in first.error, first
        assert [r.value_float for r in rest] == [1.0, 2.0, 3.0]


def test_a_pool_without_namespaces_or_uid_drop_says_what_programs_can_reach(caplog):
    """A non-root trainer (no uid drop, no `unshare`) ran programs behind the audit hook alone without a word; one
    killed the trainer with pidfd_send_signal (sandbox review, session 38). Any pool whose jobs keep the trainer's
    uid says so (regression review)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="reftjax.graders.sandbox"):
        SandboxPool(SandboxConfig(workers=1, namespaces=False, drop_uid=False)).close()
    assert any("without their own PID namespace" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reftjax.graders.sandbox"):
        pool = SandboxPool(SandboxConfig(workers=1))
        pool.close()
    assert bool(caplog.records) == (not pool.isolation["uid_drop"])
    caplog.clear()  # namespaces without the uid drop: jobs still read what the trainer's user can
    with caplog.at_level(logging.WARNING, logger="reftjax.graders.sandbox"):
        SandboxPool(SandboxConfig(workers=1, drop_uid=False)).close()
    assert any("they can read what this user can" in r.getMessage() for r in caplog.records)


def test_jobs_in_their_own_pid_namespace_see_only_its_processes():
    """`unshare` without --mount-proc left the host's /proc: a job (uid 65534) listed every process and read the
    trainer's command line (regression review, session 38). /proc/net is the job's network namespace's."""
    job = SandboxJob("def solution():\n    import os\n    return len([p for p in os.listdir('/proc') if p.isdigit()])")
    # and a network namespace of their own, with a loopback device only (not the host's: a mutant dropping `--net`
    # passed, the audit hook refusing sockets all the same; mutation review, session 55)
    net = SandboxJob("def solution():\n    return [line.split(':')[0].strip() for line in "
                     "open('/proc/net/dev').read().splitlines()[2:]]")
    with SandboxPool(SandboxConfig(workers=1, timeout_s=TIMEOUT_S)) as pool:
        if not pool.isolation["pid_and_net_namespaces"]:
            pytest.skip("no PID namespace on this host (unshare needs root)")
        seen, devices = pool.run([job, net])
    assert seen.ok and seen.value_float <= 3, seen  # the server and the job (and unshare's init)
    assert devices.ok and devices.value_json == ["lo"], devices


def test_each_limit_answers_with_its_own_status():
    """The hostile programs above score 0 whichever layer stops them; here each layer is seen at work (mutants
    dropping RLIMIT_AS or RLIMIT_FSIZE, calling a timeout an error, letting a job write beside its
    server's directory (`/dev/shm/reftjax-sandbox-abcX`, outside it) or signal a process passed: mutation review,
    session 45)."""
    jobs = {"flood": "    while True:\n        print('x' * 100000)",
            "loop": "    while True:\n        pass",
            "beside": "    import os\n    open(os.path.dirname(os.getcwd()) + 'x', 'w').write('x')\n    return 7",
            "signal": "    import os\n    os.kill(os.getpid(), 0)\n    return 7",
            # (ctypes is loaded, by sympy: importing ctypes.util raises no import event for ctypes itself)
            "submodule": "    import ctypes.util\n    return 7",
            # 1.5 GiB: past the default 1 GiB RLIMIT_AS, well within the wall limit
            "memory": "    return len(bytearray(3 << 29))"}
    with SandboxPool(SandboxConfig(workers=2, timeout_s=TIMEOUT_S, output_bytes=1 << 16)) as pool:
        got = dict(zip(jobs, pool.run([SandboxJob("def solution():\n" + src) for src in jobs.values()])))
        roots = [s.root for s in pool._servers]
    beside = [r + "x" for r in roots if os.path.exists(r + "x")]
    for path in beside:  # (only where the audit hook let it be written)
        os.remove(path)
    assert len(roots) == 2 and not beside
    assert got["flood"].status == "error" and "File too large" in got["flood"].error, got["flood"]
    assert got["loop"].status == "timeout", got["loop"]
    assert got["beside"].status == "error" and "outside the sandbox dir" in got["beside"].error, got["beside"]
    assert got["signal"].status == "error" and "os.kill is not allowed" in got["signal"].error, got["signal"]
    assert got["memory"].status == "error" and "MemoryError" in got["memory"].error, got["memory"]
    assert got["submodule"].status == "error" and "import of ctypes.util is not" in got["submodule"].error, got


def test_a_server_that_dies_under_a_job_is_replaced_before_the_next_job():
    """A server gone under its job (here killed by it with pidfd_send_signal, which no audit event sees, where jobs
    keep the trainer's uid) is that job's sandbox failure, and the next batch runs on a fresh server (a mutant that
    kept the dead one raised BrokenPipeError into the trainer on the next batch: mutation review, session 45)."""
    kill = SandboxJob("def solution():\n    import os, signal\n"
                      "    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n    return 7")
    with SandboxPool(SandboxConfig(workers=1, timeout_s=TIMEOUT_S, namespaces=False, drop_uid=False)) as pool:
        [dead] = pool.run([kill])
        assert dead.status == "sandbox_failure", dead
        assert [r.value_float for r in pool.run([SandboxJob(f"def solution():\n    return {v}") for v in (8, 9)])] \
            == [8.0, 9.0]


def test_a_preimport_the_server_refuses_fails_every_job_as_the_sandboxs_own_failure():
    """A server whose preimports failed answers every job with the start-up error: the pool's failure, never the
    program's error (a mutant reporting it as the program's passed: mutation review, session 45)."""
    with SandboxPool(SandboxConfig(workers=1, timeout_s=TIMEOUT_S, preimport=("asyncio",))) as pool:
        results = pool.run([SandboxJob("def solution():\n    return 1")] * 2)
    assert [r.status for r in results] == ["sandbox_failure"] * 2, results
    assert all("importing 'asyncio' loads blocked module(s)" in r.error for r in results), results


def test_a_result_says_whether_it_is_a_real_number():
    """`value_real`: a real number (a numpy bool too: `return np.isclose(a, b)`), not text that float() reads; and
    `value_float` is float() of the value as it is (mutants dropping np.bool_ or going through int() passed: mutation
    review, session 45)."""
    values = ("np.bool_(True)", "np.float64(2.5)", "2.5", "'3'", "[1]")
    with SandboxPool(SandboxConfig(workers=1, timeout_s=TIMEOUT_S)) as pool:
        got = pool.run([SandboxJob(f"import numpy as np\ndef solution():\n    return {v}") for v in values])
    assert [(r.status, r.value_float, r.value_real) for r in got] == [
        ("ok", 1.0, True), ("ok", 2.5, True), ("ok", 2.5, True), ("ok", 3.0, False), ("ok", None, False)], got


def test_a_crash_the_wall_limit_and_the_result_cap_answer_as_documented():
    """A job that ends without a result is "crashed", saying how (its exit status, or the signal); the wall limit is
    the job's own `timeout_s` (a 1.6 s sleep under 1 s is a timeout, a 0.2 s one is not); a result the job writes
    itself past the 64 KiB cap is no result; and a reply line longer than one read of the server's output (a
    ~64 KiB result plus its nonce) is put together across reads (mutants calling a crash an error, naming no
    signal, doubling the wall limit, reading the result uncapped or dropping a partial line passed: mutation
    review, session 55)."""
    import json

    def cut(value):  # the result line the worker sends for a returned string `value`
        return len(json.dumps({"status": "ok", "value_float": None, "value_str": value[:1000], "value_json": value,
                               "value_real": False}))

    size = 65536 - cut("") - 1000  # a result of exactly the cap: the server's reply line is longer than 1 << 16
    assert cut("x" * size) == 65536
    jobs = {"exit": "    import os\n    os._exit(3)",
            "abort": "    import os\n    os.abort()",
            "slow": "    import time\n    time.sleep(1.6)\n    return 1",
            "quick": "    import time\n    time.sleep(0.2)\n    return 1",
            "oversized": ("    import os, json\n    os.write(3, json.dumps({'status': 'ok', 'value_str': 'x' * 100000})"
                          ".encode())\n    os._exit(0)"),
            "long_line": f"    return 'x' * {size}"}
    with SandboxPool(SandboxConfig(workers=2, timeout_s=TIMEOUT_S)) as pool:
        got = dict(zip(jobs, pool.run([SandboxJob("def solution():\n" + src) for src in jobs.values()])))
    assert (got["exit"].status, got["exit"].error) == ("crashed", "program ended without a result (exit status 3)")
    assert (got["abort"].status, got["abort"].error) == ("crashed", "program ended without a result (signal 6)")
    assert got["slow"].status == "timeout" and got["quick"].value_float == 1.0, got
    assert got["oversized"].status == "crashed", got["oversized"]
    assert got["long_line"].ok and got["long_line"].value_json == "x" * size, got["long_line"].status


def test_a_hung_server_is_the_sandboxs_failure_and_is_replaced(tmp_path, monkeypatch):
    """A server that takes a job and never answers is the sandbox's failure once the job's limit and the grace have
    passed: it is killed and the next job runs on a fresh one (mutants calling it a timeout, which kept the hung
    server, or handing select a negative timeout past the deadline passed: mutation review, session 55)."""
    import sys

    from reftjax.graders import sandbox

    monkeypatch.setattr(sandbox, "_SERVER_GRACE_S", 0.5)
    # the first server started hangs after reading its job; the ones after it run the real worker
    hang_once = ("import os, sys, time\nif not os.path.exists(sys.argv[1]):\n    open(sys.argv[1], 'w').close()\n"
                 "    sys.stdin.readline()\n    time.sleep(60)\n"
                 f"os.execv(sys.executable, [sys.executable, '-s', {str(sandbox._WORKER)!r}, *sys.argv[2:]])")
    with SandboxPool(SandboxConfig(workers=1, timeout_s=0.5, namespaces=False)) as pool:
        pool._command = [sys.executable, "-c", hang_once, str(tmp_path / "hung")]
        pool._ensure_servers(1)
        hung_pid = pool._servers[0].proc.pid
        start = time.monotonic()
        [hung] = pool.run([SandboxJob("def solution():\n    return 1")])
        assert (hung.status, hung.error) == ("sandbox_failure", "sandbox server hung; restarted"), hung
        assert 1.0 <= time.monotonic() - start < 30.0  # (the job's limit and the grace, not the server's 60 s hang)
        with pytest.raises(ProcessLookupError):
            os.kill(hung_pid, 0)
        monkeypatch.setattr(sandbox, "_SERVER_GRACE_S", 5.0)  # (the fresh server's start-up may take more than 0.5 s)
        assert [r.value_float for r in pool.run([SandboxJob(f"def solution():\n    return {v}") for v in (2, 3)])] \
            == [2.0, 3.0]


def test_a_process_a_root_job_leaves_in_its_namespace_is_killed_with_it():
    """Where RLIMIT_NPROC does not hold (jobs run as root: `drop_uid=False`), a job can still start a process through
    the already-loaded `_posixsubprocess` (no audit event) in a session of its own, out of reach of the kill of the
    job's process group: the server, init of its PID namespace, kills every other process in it after each job (a
    mutant dropping that passed, the process living on as long as the pool: mutation review, session 55)."""
    marker = b"31.4159"  # (fork_exec's arguments are Python 3.11's, as in `_hostile`)

    def running():
        pids = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if entry.isdigit() and f.read() == b"sleep\0" + marker + b"\0":
                        pids.append(int(entry))
            except OSError:
                pass
        return pids

    spawn = SandboxJob("def solution():\n    import sys, os, time\n    r, w = os.pipe()\n"
                       "    sys.modules['_posixsubprocess'].fork_exec([b'sleep', b'" + marker.decode() + "'], "
                       "[b'/bin/sleep', b'/usr/bin/sleep'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, "
                       "True, True, -1, None, None, None, -1, None, True)\n    time.sleep(0.3)\n    return 7")
    with SandboxPool(SandboxConfig(workers=1, timeout_s=TIMEOUT_S, drop_uid=False)) as pool:
        if os.geteuid() != 0 or not pool.isolation["pid_and_net_namespaces"]:
            pytest.skip("needs root and a PID namespace")
        [started] = pool.run([spawn])
        until = time.monotonic() + 10.0  # (SIGKILLed, a process may be seen for a moment on a loaded machine)
        while running() and time.monotonic() < until:
            time.sleep(0.05)
        left = running()
    for pid in left:
        os.kill(pid, 9)
    assert started.value_float == 7.0, started  # (it ran to its end: the process it started was not refused)
    assert left == []

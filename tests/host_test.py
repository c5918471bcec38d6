"""reftjax.host: glibc malloc with transparent huge pages, applied by re-executing the CLI once."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from reftjax import host

pytestmark = pytest.mark.skipif(not host._hugepages_possible() and host.host_allocator_mode() == "system",
                                reason="needs Linux, glibc >= 2.35 and transparent huge pages not 'never'")

# A worker thread (as XLA's pool threads are) mallocs, touches and frees 256 MiB twice: glibc
# mmaps such a block and unmaps it on free, so each round faults it in again; the fault count
# says whether the pages were 4 KiB (65536 per round) or 2 MiB huge pages (128 per round).
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, threading
    from reftjax.host import host_allocator_mode
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    def work():
        for _ in range(2):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(256 << 20)
            ctypes.memset(p, 1, 256 << 20)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    t = threading.Thread(target=work); t.start(); t.join()
    print(json.dumps({"mode": host_allocator_mode(), "faults": faults}))
""")


def _run(args, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "REFTJAX_HOST_ALLOCATOR", "REFTJAX_HOST_REEXEC")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hugepage_tunable_cuts_page_faults():
    system = _run(["-c", _PROBE], {})
    huge = _run(["-c", _PROBE], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert (system["mode"], huge["mode"]) == ("system", "hugepages")
    assert min(system["faults"]) >= 60000, system  # 4 KiB pages, every round
    assert max(huge["faults"]) <= 8000, huge  # huge pages (a fallback to 4 KiB for a few is allowed)


def test_experiments_cli_reexecutes_once_with_the_tunable():
    info = _run(["-m", "experiments"], {"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert info["host_allocator"] == "hugepages"
    # the user's own tunables are kept, ours appended once
    assert info["glibc_tunables"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert "python -m experiments.gsm8k_reft" in info["experiments"]


def test_opt_out_and_no_reexec_on_plain_import():
    assert _run(["-m", "experiments"], {"REFTJAX_HOST_ALLOCATOR": "system"})["host_allocator"] == "system"
    code = "import json, os, experiments; print(json.dumps({'mode': experiments.HOST_ALLOCATOR, 'pid': os.getpid()}))"
    assert _run(["-c", code], {})["mode"] == "system"  # a notebook/library import never re-executes


def test_started_as_module(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-m", "x"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "-m", "experiments.gsm8k_reft", "x"])
    assert host.started_as_module("experiments")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "experimentsX.y"])
    assert not host.started_as_module("experiments")
    monkeypatch.setattr(sys, "argv", ["/path/pytest"])
    assert not host.started_as_module("experiments")

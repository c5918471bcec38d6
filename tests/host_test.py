"""reftjax.host: the glibc allocator settings keep freed memory mapped across steps."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc mallopt only")

# A worker thread (as XLA's pool threads are) mallocs, touches and frees 512 MiB twice; the page
# faults of the second round show whether the memory stayed mapped. Runs in a fresh interpreter:
# the settings must be made before any second thread exists.
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    from reftjax.host import tune_cpu_allocator
    tuned = tune_cpu_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    def work():
        for _ in range(2):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(512 << 20)
            ctypes.memset(p, 1, 512 << 20)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    t = threading.Thread(target=work); t.start(); t.join()
    print(json.dumps({"tuned": tuned, "faults": faults}))
""")


def _probe(env_extra: dict, code: str = _PROBE) -> dict:
    import json
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("REFTJAX_HOST_ALLOCATOR", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_freed_memory():
    tuned = _probe({})
    assert tuned["tuned"] is True
    system = _probe({"REFTJAX_HOST_ALLOCATOR": "system"})
    assert system["tuned"] is False
    # glibc's default: >32 MiB blocks are mmapped and unmapped on free, so round 2 faults again
    # (>= 256 even with 2 MiB transparent huge pages); tuned, round 2 reuses the heap.
    assert system["faults"][1] >= 256, system
    assert tuned["faults"][1] <= 16, tuned


def test_refuses_once_threads_exist():
    code = textwrap.dedent("""
        import json, threading, time
        t = threading.Thread(target=time.sleep, args=(0.5,)); t.start()
        from reftjax.host import tune_cpu_allocator
        print(json.dumps({"tuned": tune_cpu_allocator()}))
        t.join()
    """)
    assert _probe({}, code)["tuned"] is False


def test_experiments_package_applies_it():
    code = "import json, experiments; print(json.dumps({'tuned': experiments.HOST_ALLOCATOR_TUNED}))"
    assert _probe({}, code)["tuned"] is True
